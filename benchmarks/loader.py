"""Does the shard loader keep up? Loader samples/s against a seed-style folder dataset and
against the model's training step rate, measured side by side in one run.

Data: synth clips (real H.264/AAC mp4s, 256x256, 3 s) turned into shards with the `cremad`
preset (257x188 log-STFT, 1 fps frames stored at 256 px), and the *same* samples written out
the way the seed code keeps them: one pickled float32 spectrogram per clip plus a folder of
JPEG frames per clip.

exact     `avtrain.data.train_loader` with `sampling="exact"` (the default): each sample read by
          byte range from its tar in a (seed, epoch) permutation (avtrain.sampling), decode of
          the chosen frames only, RandomResizedCrop + flip + ImageNet norm, full batches.
resample  the same with `sampling="resample"`: resampled tars streamed through a shuffle
          buffer (the loader before exact epochs; `--sampling resample`).
exact_gpu the exact loader with `decode_device="cuda"`: the workers pass the chosen JPEG bytes
          on, `to_device` decodes them on the GPU (nvjpeg) and crops there (`--decode-device
          cuda`); listed in --loaders on a GPU machine only.
seed      a map-style torch Dataset as the OGM-GE/OLM scripts write it: per sample
          `pickle.load` of the spectrogram, `os.listdir` of the clip's frame folder, random
          frames opened with PIL and transformed one by one with torchvision transforms;
          DataLoader(shuffle=True, drop_last=True).

All use the same batch size, image size, frames per clip and number of worker processes;
rounds are interleaved (exact, resample, seed, exact, ...) and the fastest round of each is
kept, because the machines are shared and noisy. Then the model's step rate (forward +
backward + SGD step on batches of the same shape) for `tiny` and `resnet18`: if the loader
delivers fewer samples/s than the model consumes, training is loader-bound.

    .venv/bin/python benchmarks/loader.py                            # prints the table
    .venv/bin/python benchmarks/loader.py --results benchmarks/RESULTS-loader.md
    .venv/bin/python benchmarks/loader.py --device cuda --batch-size 64 \
        --loaders exact,exact_gpu,resample,seed              # on a GPU (fp32 and bf16 steps)

With `--device cuda` every loader's batches are moved to the GPU (and the copy waited for)
before they count, so CPU and GPU JPEG decoding are compared as the trainer uses them.
    .venv/bin/python benchmarks/loader.py --loaders exact,resample --models ""  # exact vs stream
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import io
import os
import pickle
import platform
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from avtrain.data import open_shards, train_loader  # noqa: E402
from avtrain.decode import DataOptions  # noqa: E402
from avtrain.models import build_model  # noqa: E402

# --- data ----------------------------------------------------------------------------------


def make_shards(work: str, clips: int, workers: int) -> str:
    """Synth clips -> cremad-preset shards under work/shards (reused when present)."""
    from avprep.manifest import read_manifest
    from avprep.presets import get_preset
    from avprep.shards import build_shards
    from avprep.synth import SynthConfig, write_synth

    shards = os.path.join(work, "shards")
    if os.path.isfile(os.path.join(shards, "index.json")):
        return shards
    media = os.path.join(work, "media")
    per_class = max(1, clips // 4)
    write_synth(media, SynthConfig(classes=4, per_class=per_class, seconds=3.0, size=256,
                                   fps=10, val_fraction=0.05, test_fraction=0.05),
                workers=workers, overwrite=True)
    manifest = read_manifest(os.path.join(media, "manifest.jsonl"))
    build_shards(manifest.records, shards, get_preset("cremad"), classes=manifest.classes,
                 dataset="synth", shard_size=32, workers=workers)
    return shards


def make_seed_folder(shards_dir: str, work: str) -> tuple[str, list[tuple[str, int]]]:
    """The same train samples as seed-style files: {key}.pkl + frames/{key}/*.jpg."""
    import webdataset as wds

    folder = os.path.join(work, "seed")
    items: list[tuple[str, int]] = []
    shards = open_shards(shards_dir)
    os.makedirs(os.path.join(folder, "frames"), exist_ok=True)
    for url in shards.urls("train"):
        for sample in wds.WebDataset(url, shardshuffle=False):
            key = sample["__key__"]
            items.append((key, int(sample["cls"].decode())))
            spec_path = os.path.join(folder, f"{key}.pkl")
            frame_dir = os.path.join(folder, "frames", key)
            if os.path.exists(spec_path) and os.path.isdir(frame_dir):
                continue
            spec = np.load(io.BytesIO(sample["spec.npy"]), allow_pickle=False)
            with open(spec_path, "wb") as f:
                pickle.dump(spec.astype(np.float32), f)  # the seeds pickle float32 arrays
            os.makedirs(frame_dir, exist_ok=True)
            for name, data in sample.items():
                if name.endswith(".jpg"):
                    with open(os.path.join(frame_dir, f"frame_{name[1:4]}.jpg"), "wb") as f:
                        f.write(data)
    return folder, items


class SeedStyleDataset(torch.utils.data.Dataset):
    """Per sample: unpickle the spectrogram, list the frame folder, PIL-open the chosen frames
    and transform each with torchvision (the shape of the seeds' CREMA-D/AVE datasets)."""

    def __init__(self, folder: str, items, frames: int, image_size: int):
        from torchvision import transforms

        self.folder, self.items, self.frames = folder, items, frames
        self.transform = transforms.Compose([
            transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        from PIL import Image

        key, label = self.items[i]
        with open(os.path.join(self.folder, f"{key}.pkl"), "rb") as f:
            spec = pickle.load(f)  # noqa: S301 - the seed way, on files this script wrote
        frame_dir = os.path.join(self.folder, "frames", key)
        files = sorted(os.listdir(frame_dir))
        pick = np.sort(np.random.choice(len(files), size=self.frames,
                                        replace=len(files) < self.frames))
        images = [self.transform(Image.open(os.path.join(frame_dir, files[j])).convert("RGB"))
                  for j in pick]
        return torch.from_numpy(spec).unsqueeze(0), torch.stack(images), label


# --- measurements --------------------------------------------------------------------------


def rate(batches, batch_size: int, count: int, warmup: int) -> float:
    """Samples/s over `count` batches, after `warmup` batches (one per worker: start-up)."""
    it = iter(batches)
    for _ in range(warmup):
        next(it)
    start = time.perf_counter()
    for _ in range(count):
        next(it)
    return batch_size * count / (time.perf_counter() - start)


def limit_rate(shards, opts, frames: int, image_size: int, rounds: int = 3) -> float:
    """The decode-and-augment limit, samples/s on one core: the chosen frames of the same train
    samples, already in memory (no I/O, no tar), decoded with torchvision and given the
    RandomResizedCrop + flip + ImageNet normalisation, in this process on one thread."""
    from torchvision.io import ImageReadMode, decode_jpeg

    from avtrain.decode import FRAME_MEMBER, _crop_draw, pick_frames, transform_frames
    from avtrain.tarstream import tar_samples

    clips = []
    for url in shards.urls("train"):
        with open(url, "rb") as f:
            for sample in tar_samples(f, url):
                names = sorted(k for k in sample if FRAME_MEMBER.match(k))
                clips.append([sample[k] for k in names])
    rng = np.random.default_rng(0)
    chosen = [[clip[i] for i in pick_frames(len(clip), frames, rng)] for clip in clips]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    best = float("inf")
    try:
        for _ in range(rounds):
            start = time.perf_counter()
            for jpegs in chosen:
                images = [decode_jpeg(torch.frombuffer(bytearray(j), dtype=torch.uint8),
                                      mode=ImageReadMode.RGB) for j in jpegs]
                transform_frames(images, image_size, _crop_draw(rng))
            best = min(best, time.perf_counter() - start)
    finally:
        torch.set_num_threads(before)
    return len(chosen) / best


def warmup(args) -> int:
    return max(1, args.workers)


def shard_rate(shards, opts, args, round_no: int, sampling: str = "exact") -> float:
    """Batches ready for the model: the loader's, then `to_device` (which normalises the uint8
    frames, and decodes the JPEGs for `exact_gpu`) onto `--device`, so the rate counts every
    step between the tar and the network. Exact epochs run on into the next pass when the
    timed batches outnumber one."""
    from avtrain.decode import to_device

    if sampling == "exact_gpu":
        opts, sampling = dataclasses.replace(opts, decode_device="cuda"), "exact"
    loader = train_loader(shards, "train", opts, batch_size=args.batch_size,
                          steps=args.batches + warmup(args), epoch=round_no, workers=args.workers,
                          shuffle_buffer=args.shuffle_buffer, sampling=sampling)
    device = torch.device(args.device)

    def ready(batch):
        out = to_device(batch, device, opts)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    return rate((ready(b) for b in loader), args.batch_size, args.batches, warmup(args))


def seed_rate(dataset, args) -> float:
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True,
                                         num_workers=args.workers, drop_last=True,
                                         persistent_workers=args.workers > 0)
    batches = (b for _ in range(1000) for b in loader)  # cycle past one pass if needed
    return rate(batches, args.batch_size, args.batches, warmup(args))


def model_rate(name: str, shape_batch: dict, classes: int, device: torch.device,
               steps: int, amp: bool = True) -> float:
    """Train samples/s of one model; on CUDA under the loop's bf16 autocast unless not `amp`."""
    from avtrain.evaluate import autocast as loop_autocast

    model = build_model(name, "concat", classes).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    batch = {k: v.to(device) for k, v in shape_batch.items() if torch.is_tensor(v)}
    autocast = loop_autocast(device, amp)

    def step():
        with autocast:
            loss = torch.nn.functional.cross_entropy(model(batch)["fused"].float(),
                                                     batch["label"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return len(batch["label"]) * steps / (time.perf_counter() - start)


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, {gpu}; "
            f"torch {torch.__version__}")


def main(argv=None) -> int:
    load_at_start = os.getloadavg()[0]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", help="folder for clips/shards/seed files (default: a temp dir)")
    ap.add_argument("--clips", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--batches", type=int, default=48,
                    help="timed batches per round (12 proved too short: rounds spread 30 %%)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", default="1,2", help="loader workers, comma-separated")
    ap.add_argument("--frames", default="1,3", help="frames per clip, comma-separated")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--shuffle-buffer", type=int, default=200)
    ap.add_argument("--loaders", default="exact,resample,seed",
                    help="loaders to time, comma-separated: exact, resample, seed, exact_gpu (CUDA)")
    ap.add_argument("--model-steps", type=int, default=3)
    ap.add_argument("--models", default="tiny,resnet18")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads for the model steps (0: torch's default)")
    ap.add_argument("--date", default=dt.date.today().isoformat())
    ap.add_argument("--results", help="write the markdown table to this file")
    args = ap.parse_args(argv)

    work = args.work or tempfile.mkdtemp(prefix="avbench-loader-")
    os.makedirs(work, exist_ok=True)
    t0 = time.time()
    shards_dir = make_shards(work, args.clips, max(1, os.cpu_count() or 1))
    seed_dir, items = make_seed_folder(shards_dir, work)
    print(f"data ready in {time.time() - t0:.1f} s: {len(items)} train clips under {work}")

    shards = open_shards(shards_dir)
    configs = [(int(f), int(w)) for f in args.frames.split(",") for w in args.workers.split(",")]
    loaders = [x for x in args.loaders.split(",") if x]
    rows, limits = [], {}
    for frames, workers in configs:
        run = argparse.Namespace(**{**vars(args), "frames": frames, "workers": workers})
        opts = DataOptions.for_shards(shards, image_size=args.image_size, frames=frames)
        dataset = SeedStyleDataset(seed_dir, items, frames, args.image_size)
        if frames not in limits:
            limits[frames] = limit_rate(shards, opts, frames, args.image_size)
            print(f"limit, {frames} frame(s): {limits[frames]:.1f} samples/s per core")
        rounds = {name: [] for name in loaders}
        for r in range(args.rounds):
            for name in loaders:
                rounds[name].append(seed_rate(dataset, run) if name == "seed"
                                    else shard_rate(shards, opts, run, r, name))
            print(f"{frames} frame(s), {workers} worker(s), round {r}: " + ", ".join(
                f"{name} {rounds[name][-1]:.1f}" for name in loaders) + " samples/s")
        rows.append((frames, workers, limits[frames], rounds))
    frames0, workers0 = configs[0]
    ours = "exact" if "exact" in loaders else loaders[0]
    best_ours = next(max(r[3][ours]) for r in rows if r[:2] == (frames0, workers0))
    opts = DataOptions.for_shards(shards, image_size=args.image_size, frames=frames0)
    sample = next(iter(train_loader(shards, "train", opts, batch_size=args.batch_size, steps=1,
                                    workers=0, shuffle_buffer=16)))
    from avtrain.decode import to_device

    sample = to_device(sample, torch.device("cpu"), opts)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    models = {}
    for name in [m for m in args.models.split(",") if m]:
        for amp in ((False, True) if device.type == "cuda" else (False,)):
            label = f"{name} {'bf16' if amp else 'fp32'}" if device.type == "cuda" else name
            models[label] = model_rate(name, sample, shards.num_classes, device,
                                       args.model_steps, amp)
            print(f"model {label}: {models[label]:.1f} samples/s "
                  f"({models[label] / args.batch_size:.2f} steps/s)")

    spec_shape = "x".join(str(s) for s in sample["audio"].shape[-2:])
    lines = [
        f"# Loader benchmark ({args.date})",
        "",
        f"Machine: {machine()}; load average {load_at_start:.2f} when it started (other jobs "
        "slow both loaders alike), so only ratios measured side by side in this run mean "
        "anything; the fastest of the interleaved rounds is kept.",
        "",
        f"Data: {len(items)} synth train clips (H.264 256x256, 3 s) as `cremad`-preset shards "
        f"(spectrogram {spec_shape}, 1 fps JPEG frames at 256 px); batch {args.batch_size}, "
        f"frames cropped to {args.image_size} px, {args.batches} timed batches x "
        f"{args.rounds} interleaved rounds (fastest kept); model steps with "
        f"{torch.get_num_threads()} torch thread(s).",
        "",
        "Limit: the same samples' chosen frames, in memory, decoded (torchvision) + "
        "RandomResizedCrop 224 + flip + ImageNet normalisation in one process on one thread: "
        "samples/s per core. exact / resample: `train_loader` with that `sampling`, then "
        "`to_device` (batches ready for the model). Seed: the folder loader below.",
        "",
        "| frames | workers | limit / core | " + " | ".join(loaders) + " | "
        + (f"{ours} per worker / limit | " if ours != "seed" else "")
        + ("**exact / resample** | " if {"exact", "resample"} <= set(loaders) else "")
        + (f"{ours} / seed-style | " if "seed" in loaders and ours != "seed" else "")
        + "rounds (" + "; ".join(loaders) + ") |",
    ]
    ncols = 3 + len(loaders) + (ours != "seed") + ({"exact", "resample"} <= set(loaders)) + (
        "seed" in loaders and ours != "seed") + 1
    lines.append("|" + "---:|" * (ncols - 1) + "---|")
    for frames, workers, limit, rounds in rows:
        best = {name: max(values) for name, values in rounds.items()}
        cells = [str(frames), str(workers), f"{limit:.1f}"]
        cells += [f"{best[name]:.1f}" for name in loaders]
        if ours != "seed":
            cells.append(f"{best[ours] / workers / limit:.2f}x")
        if {"exact", "resample"} <= set(loaders):
            cells.append(f"**{best['exact'] / best['resample']:.2f}x**")
        if "seed" in loaders and ours != "seed":
            cells.append(f"{best[ours] / best['seed']:.2f}x")
        cells.append("; ".join(", ".join(f"{x:.0f}" for x in rounds[name]) for name in loaders))
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"| model ({device.type}, batch {args.batch_size}) | train samples/s | steps/s | "
        "loader headroom (shard loader / model) |",
        "|---|---:|---:|---:|",
    ]
    for name, value in models.items():
        lines.append(f"| {name} | {value:.1f} | {value / args.batch_size:.2f} | "
                     f"{best_ours / value:.2f}x |")
    lines += ["", "Headroom > 1: the loader delivers samples faster than the model consumes "
              "them (measured separately; in a real run loader workers and the model share the "
              "same cores)."]
    text = "\n".join(lines) + "\n"
    print()
    print(text)
    if args.results:
        with open(args.results, "w", encoding="utf-8") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
