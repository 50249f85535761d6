"""Step time and peak memory per encoder, and whether the shard loader keeps up with each.

For each encoder name (`--encoder` / `--model` spellings: resnet18, resnet50,
timm:efficientnet_b0, timm:vit_small_patch16_224, ...) an audio-visual model with that encoder
for both modalities and a `concat` fusion takes SGD steps (forward + backward + step) on
batches of the `cremad` preset's shapes (a 257x188 spectrogram, frames cropped to 224 px) at
batch 16. Each encoder runs in a fresh process, so its peak memory is its own: the resident-set
peak during the steps minus the process's size just before the model was built (weights,
gradients, optimizer state and activations). The audio ViT gets the spectrogram's size
(AST-style patches over the spectrogram; `avtrain.models.encoders.input_sizes`).

The loader's rate (`avtrain.data.train_loader`, exact epochs, JPEG decode + crop, the same batch
and frames) is measured in the same run on the same shards; headroom = loader samples/s ÷ model
samples/s (> 1: the loader keeps up; measured apart, while a real run shares the cores).

    .venv/bin/python benchmarks/encoders.py --results benchmarks/RESULTS-encoders.md
    .venv/bin/python benchmarks/encoders.py --device cuda --batch-size 64   # on a GPU
"""

from __future__ import annotations

import argparse
import datetime as dt
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

DEFAULT = "tiny,resnet18,resnet50,timm:efficientnet_b0,timm:vit_small_patch16_224"


def _rss_mb() -> float:
    """This process's peak resident set so far, MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(name: str, batch: dict, index: dict, classes: int, device: str, steps: int,
            queue) -> None:
    """In a fresh process: build, one warm-up step, `steps` timed steps; put the figures."""
    from avtrain.models import build_model
    from avtrain.models.encoders import input_sizes

    try:
        torch.manual_seed(0)
        dev = torch.device(device)
        batch = {k: v.to(dev) for k, v in batch.items()}
        before = _rss_mb()
        names = {"audio": name, "visual": name}
        sizes = input_sizes(names, index, image_size=batch["visual"].shape[-1],
                            crop_columns=batch["audio"].shape[-1])
        model = build_model(name, "concat", classes, input_sizes=sizes).to(dev)
        params = sum(p.numel() for p in model.parameters())
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

        def step():
            loss = torch.nn.functional.cross_entropy(model(batch)["fused"], batch["label"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        step()
        times = []
        for _ in range(steps):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        peak = (torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda"
                else _rss_mb() - before)
        queue.put({"name": name, "params": params, "step": min(times),
                   "median": sorted(times)[len(times) // 2], "peak_mb": peak})
    except Exception as exc:  # noqa: BLE001 - one encoder failing is a row, not a crash
        queue.put({"name": name, "error": f"{type(exc).__name__}: {exc}"})


def in_fresh_process(*args) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=measure, args=(*args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--encoders", default=DEFAULT, help="comma list of encoder names")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per encoder")
    ap.add_argument("--frames", type=int, default=1)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--workers", type=int, default=2, help="loader processes")
    ap.add_argument("--clips", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--work", help="folder for clips and shards (default: a temp dir)")
    ap.add_argument("--date", default=dt.date.today().isoformat())
    ap.add_argument("--results", help="write the markdown table to this file")
    args = ap.parse_args(argv)

    from loader import machine, make_shards, shard_rate

    from avtrain.data import open_shards, train_loader
    from avtrain.decode import DataOptions, to_device

    load = os.getloadavg()[0]
    work = args.work or tempfile.mkdtemp(prefix="avbench-encoders-")
    shards = open_shards(make_shards(work, args.clips, max(1, os.cpu_count() or 1)))
    opts = DataOptions.for_shards(shards, image_size=args.image_size, frames=args.frames)
    run = argparse.Namespace(batch_size=args.batch_size, batches=24, workers=args.workers,
                             shuffle_buffer=200, device=args.device)
    loader_rate = max(shard_rate(shards, opts, run, r) for r in range(2))
    print(f"loader: {loader_rate:.1f} samples/s ({args.workers} workers)")
    sample = next(iter(train_loader(shards, "train", opts, batch_size=args.batch_size,
                                    steps=1, workers=0, shuffle_buffer=16)))
    sample = to_device(sample, torch.device("cpu"), opts)
    batch = {k: sample[k] for k in ("audio", "visual", "label")}

    rows = []
    for name in [n for n in args.encoders.split(",") if n]:
        row = in_fresh_process(name, batch, shards.index, shards.num_classes, args.device,
                               args.steps)
        rows.append(row)
        print(row)

    shape_a = "x".join(str(s) for s in batch["audio"].shape[-2:])
    lines = [
        f"# Encoders: step time, peak memory, loader headroom ({args.date})", "",
        f"Machine: {machine()}; {torch.get_num_threads()} torch threads; load average "
        f"{load:.2f} at the start. Model: the named encoder for audio (spectrogram {shape_a}) "
        f"and visual ({args.frames} frame(s), {args.image_size} px), `concat` fusion, SGD; "
        f"batch {args.batch_size}, fastest of {args.steps} timed steps after one warm-up "
        f"(median beside it). Peak memory: "
        + ("`torch.cuda.max_memory_allocated`." if args.device != "cpu" else
           "resident-set peak during the steps minus the size before the model was built "
           "(one fresh process per encoder).")
        + f" Loader: exact epochs, {args.workers} workers, {loader_rate:.1f} samples/s.", "",
        "| encoder | parameters | step s (median) | train samples/s | peak memory MB | "
        "loader headroom |",
        "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | – | – | – | – | {r['error']} |")
            continue
        rate = args.batch_size / r["step"]
        lines.append(f"| {r['name']} | {r['params'] / 1e6:.1f} M | {r['step']:.3f} "
                     f"({r['median']:.3f}) | {rate:.1f} | {r['peak_mb']:.0f} | "
                     f"{loader_rate / rate:.2f}x |")
    text = "\n".join(lines) + "\n"
    print()
    print(text)
    if args.results:
        with open(args.results, "w", encoding="utf-8") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
