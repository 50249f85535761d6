"""Streaming data from avprep shards: `index.json` + WebDataset tars -> batches of tensors.

    shards = open_shards("OUT")                      # classes, preset, split sizes
    opts = DataOptions.for_shards(shards, image_size=224, frames=None)
    for batch in train_loader(shards, "train", opts, batch_size=64, steps=100, epoch=0): ...
    for batch in eval_loader(shards, "test", opts, batch_size=64): ...

A batch is a dict: "audio" [B, 1, F, T] in the shards' dtype (float16; `to_device` makes it
float32 on the device), "visual" [B, T, 3, H, W] uint8 (cropped and flipped; `to_device` makes
it float32, ImageNet normalised, on the device: a quarter of the bytes cross the worker queue
and the bus), "label" [B] long, "key" list of str. Sequences are right-padded with zeros and come
with their lengths: "text" [B, L] long UTF-8 byte ids of the `{key}.txt` transcript (0 = pad)
and "text_len" [B]; a modality the index lists under `features` (avprep import-features) is
read from `{key}.{modality}.npy` as [B, T, D] float32 with "{modality}_len" [B] (0 where the
clip lacks it), instead of the spectrogram or frames.

Train, `sampling="exact"` (the default; avtrain.sampling): every sample once per epoch in an
order that is a function of (seed, epoch) only, split evenly over ranks, the remainder of
N // (batch·ranks) dropped, as the papers' DataLoader(shuffle=True) (+ DistributedSampler);
samples read by byte range out of the tars, augmentation drawn per sample position, so neither
the worker count nor `--resume` changes a batch.
Train, `sampling="resample"` (web-scale sets, where an order over every sample costs too
much): shards resampled with a seed shared by every rank and worker, so the shard stream is
the same everywhere and each (rank, worker) takes its own slice of it (split by node, then by
worker); a shuffle buffer; per-sample augmentation; full batches only; `with_epoch(steps)` so
every rank runs the same number of steps. Each epoch's stream is a function of (seed, epoch,
rank, worker) only, which is what makes `--resume` reproduce an uninterrupted run; an epoch
sees about 2/3 of a small set's distinct samples.
Eval: every sample exactly once across all ranks and workers, the last partial batch kept.
Either way a sample that cannot be decoded is dropped, not fatal: its batch lists it under
"skipped" as (key, tar, reason), for the loop to count and name.

Transforms selectable for exactness to released code (TrainConfig fields; defaults first):
- `eval_crop`: "centre" (the middle window of a preset's `train_crop_columns`, deterministic) or
  "random" (OGM-GE's VGGSound test loader draws a random 5 s window at test time too,
  GeWu-Lab/OGM-GE_CVPR2022 dataset/VGGSoundDataset.py; here drawn from (eval_seed, sample key),
  so every eval of a run sees the same windows whatever the ranks and workers).
- `eval_resize`: "crop" (short side to the size, centre crop) or "square"
  (`transforms.Resize((224, 224))`, aspect ignored: the eval transform of OGM-GE's
  dataset/CramedDataset.py, VGGSoundDataset.py, dataset.py and OLM's datasets/*.py).
- `train_crop`: "clip" (one RandomResizedCrop + flip shared by a clip's frames) or "frame" (a
  fresh one per frame: the released loaders call the transform on each frame).
A preset's `audio_layout: time_freq` hands the audio net [1, T, F] (OGM-GE's KS fbank) instead
of the stored [1, F, T]; its `frame_pick: segment-start` takes frames seg*i, seg = n // t, in
train and eval (OGM-GE dataset/dataset.py, used for Kinetics-Sounds).

Decoding handles only the member types of the shard format (`npy` without pickle, `jpg`,
`cls`, `json`); anything else in a tar is ignored, never unpickled.
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import random
import re
import zlib
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
import webdataset as wds
from torchvision.io import ImageReadMode, decode_jpeg

from avprep.errors import UserError
from avprep.storage import ShardOpener, Store, finish_stream

from .tarstream import tar_samples

# torchvision is imported above, not lazily: forked loader workers (new ones every epoch)
# inherit it instead of each paying its import, which takes seconds.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FRAME_MEMBER = re.compile(r"^f(\d+)\.jpg$")
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
EVAL_CROPS = ("centre", "random")
EVAL_RESIZES = ("crop", "square")
TRAIN_CROPS = ("clip", "frame")
AUDIO_LAYOUTS = ("freq_time", "time_freq")
SAMPLINGS = ("exact", "resample")
SKIPPED = "__skipped__"  # a decoded-stream item standing for a sample that could not be read
FRAME_PICKS = ("random", "segment-start")


# --- the shard set ------------------------------------------------------------------------


class ShardSet:
    """A shard set described by its index.json: a local folder or an object-storage prefix
    (s3://, gs://, https://; avprep.storage). `cache_dir`/`cache_size`: a bounded local cache
    that remote tars are copied into while they stream (off by default)."""

    def __init__(self, root: str, index: dict, cache_dir: str | None = None,
                 cache_size: int | None = None):
        self.root = root
        self.store = Store.at(root)
        self.index = index
        self.cache_dir, self.cache_size = cache_dir, cache_size
        self.dataset = index.get("dataset")
        self.classes = list(index.get("classes") or [])
        self.num_classes = int(index.get("num_classes") or len(self.classes))
        self.preset = dict(index.get("preset") or {})
        self.modalities = list(index.get("modalities") or ["audio", "visual"])
        self.splits = dict(index.get("splits") or {})

    def samples(self, split: str) -> int:
        return int(self.splits.get(split, {}).get("samples", 0))

    def urls(self, split: str) -> list[str]:
        shards = self.splits.get(split, {}).get("shards", [])
        out = []
        for entry in shards:
            if not entry.get("samples", 1):
                continue
            url = str(entry["url"])
            if os.path.isabs(url) or ".." in url.replace("\\", "/").split("/"):
                raise UserError(f"{self.root}/index.json: shard path {url!r} leaves the folder")
            out.append(self.store.url(url))
        return out

    def opener(self) -> ShardOpener:
        """Opens this set's tars by URL (and nothing else) for the loader's workers."""
        sizes = {str(e["url"]): int(e["bytes"]) for info in self.splits.values()
                 for e in info.get("shards", []) if e.get("bytes") is not None}
        return ShardOpener(self.store, self.cache_dir, self.cache_size, sizes)

    def require(self, split: str, batch_size: int | None = None, world_size: int = 1,
                items: int | None = None) -> None:
        """One clear line when a split cannot feed training or evaluation; `items`: the
        samples one pass holds, when not the index's count (an exact epoch's sample table)."""
        if split not in self.splits:
            raise UserError(f"{self.root}: no {split!r} split (has: "
                            f"{', '.join(self.splits) or 'none'})")
        n = self.samples(split)
        if n == 0 or not self.urls(split):
            raise UserError(f"{self.root}: the {split!r} split is empty")
        if self.store.local:
            missing = [u for u in self.urls(split) if not os.path.isfile(u)]
        elif self.store.writable:  # s3/gs: one listing of the prefix
            names = self.store.names()
            missing = [u for u in self.urls(split)
                       if u[len(self.store.root) + 1:] not in names]
        else:  # http(s) cannot list: ask for each tar
            missing = [u for u in self.urls(split)
                       if self.store.size(u[len(self.store.root) + 1:]) is None]
        if missing:
            raise UserError(f"{self.root}: shard listed in index.json is missing: {missing[0]}")
        n = n if items is None else items
        if batch_size is not None and batch_size * world_size > n:
            raise UserError(f"--batch-size {batch_size} x {world_size} process(es) is larger "
                            f"than the {split!r} split ({n} samples)")


def open_shards(path: str, cache_dir: str | None = None,
                cache_size: int | None = None) -> ShardSet:
    """The shard set at a folder or URL (s3://, gs://, https://); index.json read through the
    store, the tars later streamed by the loader."""
    if not path:
        raise UserError("no shard folder given (--shards)")
    store = Store.at(path)
    index_path = store.url("index.json")
    if store.local:
        if not os.path.isdir(path):
            raise UserError(f"shard folder not found: {path}")
        if not os.path.isfile(index_path):
            raise UserError(f"{path}: no index.json (not a shard folder written by avprep "
                            f"build-shards, or the build did not finish)")
        try:
            with open(index_path, encoding="utf-8") as f:
                index = json.load(f)
        except (OSError, ValueError) as exc:
            raise UserError(f"{index_path}: unreadable ({exc})") from None
    else:
        if store.size("index.json") is None:
            raise UserError(f"{path}: no index.json (not a shard set written by avprep "
                            f"build-shards, or the build did not finish)")
        index = store.read_json("index.json")
    if not isinstance(index, dict) or index.get("format") != "avbalance-shards":
        raise UserError(f"{index_path}: not an avbalance shard index")
    if int(index.get("format_version", 0)) > 1:
        raise UserError(f"{index_path}: format_version {index['format_version']} is newer than "
                        f"this avtrain understands (1)")
    if not index.get("classes") and not index.get("num_classes"):
        raise UserError(f"{index_path}: lists no classes")
    return ShardSet(path, index, cache_dir, cache_size)


# --- per-sample decoding and augmentation -------------------------------------------------


@dataclass
class DataOptions:
    modalities: tuple[str, ...] = ("audio", "visual")
    image_size: int = 224
    frames: int = 1
    crop_columns: int | None = None
    decode_device: str = "cpu"  # "cuda": JPEG bytes travel to the main process, decoded there
    features: tuple[str, ...] = ()  # modalities read from {key}.{modality}.npy sequences
    eval_crop: str = "centre"  # centre | random (seeded by eval_seed and the sample key)
    eval_resize: str = "crop"  # crop (short side + centre crop) | square (Resize((s, s)))
    train_crop: str = "clip"  # clip (one crop per clip) | frame (one per frame)
    audio_layout: str = "freq_time"  # freq_time | time_freq (from the preset)
    frame_pick: str = "random"  # random | segment-start (from the preset)
    eval_seed: int = 0

    @classmethod
    def for_shards(cls, shards: ShardSet, *, modalities=("audio", "visual"), image_size=224,
                   frames=None, crop_columns=None, decode_device="cpu", eval_crop="centre",
                   eval_resize="crop", train_crop="clip", eval_seed=0) -> DataOptions:
        """Frames and spectrogram crop default to what the shard set's preset recommends."""
        frames = frames or int(shards.preset.get("train_frames") or 1)
        crop = crop_columns or shards.preset.get("train_crop_columns")
        missing = [m for m in modalities if m not in shards.modalities]
        if missing:
            raise UserError(f"{shards.root}: these shards hold no {missing[0]!r} modality")
        features = tuple(m for m in modalities if m in (shards.index.get("features") or {}))
        layout = shards.preset.get("audio_layout") or "freq_time"
        pick = shards.preset.get("frame_pick") or "random"
        for name, value, choices in (("audio_layout", layout, AUDIO_LAYOUTS),
                                     ("frame_pick", pick, FRAME_PICKS)):
            if value not in choices:
                raise UserError(f"{shards.root}/index.json: preset {name} {value!r} is not one "
                                f"of {', '.join(choices)}")
        return cls(tuple(modalities), int(image_size), int(frames),
                   int(crop) if crop else None, decode_device, features, eval_crop,
                   eval_resize, train_crop, layout, pick, int(eval_seed or 0))


def _crop_draw(rng: np.random.Generator) -> np.ndarray:
    """Ten RandomResizedCrop attempts as uniform numbers, resolved once the size is known, plus
    a flip bit: the same draw gives the same crop on the CPU and the GPU path."""
    return rng.random(41)


def resolve_crop(draw: np.ndarray, height: int, width: int) -> tuple[int, int, int, int]:
    """(top, left, h, w) of RandomResizedCrop(scale=(0.08, 1), ratio=(3/4, 4/3))."""
    area = height * width
    log_lo, log_hi = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    for i in range(10):
        u_scale, u_ratio, u_top, u_left = draw[4 * i:4 * i + 4]
        target = area * (CROP_SCALE[0] + u_scale * (CROP_SCALE[1] - CROP_SCALE[0]))
        ratio = math.exp(log_lo + u_ratio * (log_hi - log_lo))
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = min(int(u_top * (height - h + 1)), height - h)
            left = min(int(u_left * (width - w + 1)), width - w)
            return top, left, h, w
    ratio = width / height  # fallback: the central crop within the ratio bounds
    if ratio < CROP_RATIO[0]:
        w, h = width, int(round(width / CROP_RATIO[0]))
    elif ratio > CROP_RATIO[1]:
        h, w = height, int(round(height * CROP_RATIO[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def normalise_frames(x: torch.Tensor) -> torch.Tensor:
    """uint8 frames [..., 3, H, W] -> float32, ImageNet normalised: torchvision's ToTensor then
    Normalize, the same operations in the same order (so the same numbers)."""
    shape = (3, 1, 1)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(shape)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(shape)
    return x.float().div_(255.0).sub_(mean).div_(std)


def transform_frames(images: list[torch.Tensor], size: int, draw: np.ndarray | None,
                     eval_resize: str = "crop", normalise: bool = True) -> torch.Tensor:
    """uint8 [3, H, W] frames -> float32 [T, 3, size, size], ImageNet normalised (uint8 with
    `normalise=False`: the loaders normalise whole batches after the copy, in `to_device`).

    Train (`draw` given): a random resized crop and flip; a draw of shape [41] is shared by all
    frames of the clip (consistent in time), one of shape [T, 41] gives each frame its own.
    Eval: `eval_resize` "crop" = short side to `size`, centre crop; "square" = resize to
    size x size, aspect ignored (torchvision `Resize((size, size))`).
    """
    out = []
    for i, img in enumerate(images):
        h, w = img.shape[-2:]
        if draw is not None:
            d = draw[i] if draw.ndim == 2 else draw
            top, left, ch, cw = resolve_crop(d, h, w)
            img = TF.resized_crop(img, top, left, ch, cw, [size, size], antialias=True)
            if d[40] < 0.5:
                img = TF.horizontal_flip(img)
        elif eval_resize == "square":
            img = TF.resize(img, [size, size], antialias=True)
        else:
            img = TF.resize(img, size, antialias=True)
            img = TF.center_crop(img, [size, size])
        out.append(img)
    x = torch.stack(out)
    return normalise_frames(x) if normalise else x


def pick_frames(n: int, t: int, rng: np.random.Generator | None, policy: str = "random"
                ) -> list[int]:
    """Train: t random frames in time order (with repeats only when the clip has fewer).
    Eval: the centres of t equal segments. `policy="segment-start"`: frames seg*i with
    seg = n // t in train and eval (OGM-GE dataset/dataset.py: `t[i] = seg * i + 1` of 1-based
    file numbers), the last frame where a clip has fewer than t."""
    if n <= 0:
        return []
    if policy == "segment-start":
        seg = n // t
        return [min(n - 1, seg * i) for i in range(t)]
    if rng is None:
        return [min(n - 1, int((i + 0.5) * n / t)) for i in range(t)]
    return sorted(int(i) for i in rng.choice(n, size=t, replace=n < t))


def crop_spectrogram(spec: np.ndarray, columns: int | None, rng: np.random.Generator | None
                     ) -> np.ndarray:
    """A window of `columns` time steps: random when `rng` is given (train, or eval with
    eval_crop random), else the centre; padded with the spectrogram's minimum (silence) when
    the clip is shorter."""
    if not columns:
        return spec
    total = spec.shape[1]
    if total < columns:
        pad = np.full((spec.shape[0], columns - total), spec.min(), dtype=spec.dtype)
        return np.concatenate([spec, pad], axis=1)
    start = int(rng.integers(0, total - columns + 1)) if rng is not None else (total - columns) // 2
    return spec[:, start:start + columns]


@functools.lru_cache(maxsize=64)
def _npy_layout(header: bytes) -> tuple[np.dtype, tuple[int, ...], bool, int]:
    """(dtype, shape, fortran order, data offset) of an .npy header; the shards' arrays share a
    handful of headers, so each is parsed once (numpy's parse compiles the header each time)."""
    stream = io.BytesIO(header)
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
    elif version in ((2, 0), (3, 0)):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
    else:
        raise ValueError(f"unsupported .npy version {version}")
    if dtype.hasobject:
        raise ValueError(".npy member holds Python objects; refusing to unpickle it")
    return dtype, shape, fortran, stream.tell()


def load_npy(data: bytes) -> np.ndarray:
    """An .npy member as a read-only array over its bytes (no pickle, ever): np.load's result
    without its copy and its per-call header parse."""
    if data[:6] != b"\x93NUMPY":
        raise ValueError("not an .npy member")
    size = 10 + int.from_bytes(data[8:10], "little") if data[6] == 1 else \
        12 + int.from_bytes(data[8:12], "little")
    dtype, shape, fortran, offset = _npy_layout(bytes(data[:size]))
    count = math.prod(shape)
    array = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return array.reshape(shape, order="F" if fortran else "C")


def decode_sample(sample: dict, opts: DataOptions, rng: np.random.Generator | None) -> dict:
    """One raw WebDataset sample (member name -> bytes) -> tensors. `rng` None means eval."""
    key = sample["__key__"]
    if "cls" not in sample:
        raise ValueError(f"sample {key} has no .cls member")
    out = {"key": key, "label": int(bytes(sample["cls"]).decode("ascii").strip())}
    if "__keep__" in sample:  # a re-sampled stream (`copies`): which modalities this copy keeps
        out["keep"] = int(sample["__keep__"])
    for m in opts.features:  # precomputed [time, dim] sequences
        if f"{m}.npy" not in sample:
            raise ValueError(f"sample {key} has no .{m}.npy member")
        seq = load_npy(sample[f"{m}.npy"])
        seq = np.array(seq, dtype=np.float32).reshape(-1, seq.shape[-1])  # a writable copy
        out[m], out[f"{m}_len"] = torch.from_numpy(seq), seq.shape[0]
    if "text" in opts.modalities and "text" not in opts.features:  # the raw transcript
        from avtrain.models.text import encode_text

        ids = encode_text(bytes(sample.get("txt", b"")).decode("utf-8", errors="replace"))
        out["text"], out["text_len"] = ids, int(ids.numel())
    if "audio" in opts.modalities and "audio" not in opts.features:
        if "spec.npy" not in sample:
            raise ValueError(f"sample {key} has no .spec.npy member")
        spec = load_npy(sample["spec.npy"])
        crop_rng = rng
        if rng is None and opts.eval_crop == "random" and opts.crop_columns:
            crop_rng = np.random.default_rng([opts.eval_seed, zlib.crc32(key.encode("utf-8"))])
        spec = crop_spectrogram(spec, opts.crop_columns, crop_rng)  # in the stored dtype
        if opts.audio_layout == "time_freq":
            spec = spec.T
        # the window only, C order, writable, still float16: `to_device` converts per batch
        out["audio"] = torch.from_numpy(np.array(spec, order="C")).unsqueeze(0)
    if "visual" in opts.modalities and "visual" not in opts.features:
        names = sorted((int(m.group(1)), k) for k in sample if (m := FRAME_MEMBER.match(k)))
        chosen = [names[i][1] for i in pick_frames(len(names), opts.frames, rng, opts.frame_pick)]
        draw = None
        if rng is not None:
            draw = (np.stack([_crop_draw(rng) for _ in chosen]) if opts.train_crop == "frame"
                    and chosen else _crop_draw(rng))
        jpegs = [torch.frombuffer(bytearray(sample[k]), dtype=torch.uint8) for k in chosen]
        if opts.decode_device == "cuda":
            out["visual_jpeg"], out["visual_draw"] = jpegs, draw
        elif jpegs:
            images = [decode_jpeg(j, mode=ImageReadMode.RGB) for j in jpegs]
            out["visual"] = transform_frames(images, opts.image_size, draw, opts.eval_resize,
                                             normalise=False)
        else:  # a clip without frames: black frames, so eval still counts it
            out["visual"] = transform_frames(
                [torch.zeros(3, opts.image_size, opts.image_size, dtype=torch.uint8)]
                * opts.frames, opts.image_size, None, normalise=False)
    return out


def collate(samples: list[dict]) -> dict:
    batch = {"key": [s["key"] for s in samples],
             "label": torch.tensor([s["label"] for s in samples], dtype=torch.long)}
    if "keep" in samples[0]:
        batch["keep"] = torch.tensor([s["keep"] for s in samples], dtype=torch.long)
    if "audio" in samples[0] and "audio_len" not in samples[0]:
        specs = [s["audio"] for s in samples]
        height = max(x.shape[-2] for x in specs)
        width = max(x.shape[-1] for x in specs)
        if any(x.shape[-2:] != (height, width) for x in specs):  # variable length: pad, silence
            specs = [torch.nn.functional.pad(x, (0, width - x.shape[-1], 0, height - x.shape[-2]),
                                             value=float(x.min())) for x in specs]
        batch["audio"] = torch.stack(specs)
    if "visual" in samples[0] and "visual_len" not in samples[0]:
        batch["visual"] = torch.stack([s["visual"] for s in samples])
    if "visual_jpeg" in samples[0]:
        batch["visual_jpeg"] = [s["visual_jpeg"] for s in samples]
        batch["visual_draw"] = [s["visual_draw"] for s in samples]
    for name in [k for k in samples[0] if f"{k}_len" in samples[0]]:  # variable-length
        seqs = [s[name] for s in samples]
        size = max(1, max(x.shape[0] for x in seqs))
        padded = seqs[0].new_zeros((len(seqs), size, *seqs[0].shape[1:]))
        for i, x in enumerate(seqs):
            padded[i, :x.shape[0]] = x
        batch[name] = padded
        batch[f"{name}_len"] = torch.tensor([x.shape[0] for x in seqs], dtype=torch.long)
    return batch


def to_device(batch: dict, device: torch.device, opts: DataOptions) -> dict:
    """Move a batch to the device, its uint8 frames normalised there (a quarter of the bytes
    cross the worker queue and the bus) and its float16 spectrograms (as the shards store them:
    half the bytes, and one vectorised conversion per batch instead of one per sample in the
    workers) made float32 there; with `decode_device="cuda"` decode its JPEGs there."""
    out = dict(batch)
    out.pop("skipped", None)  # the loop counts a batch's damaged samples before this
    non_blocking = device.type == "cuda"
    for name, value in batch.items():
        if isinstance(value, torch.Tensor):
            out[name] = value.to(device, non_blocking=non_blocking)
    if "visual" in out and out["visual"].dtype == torch.uint8:  # frames travel as uint8
        out["visual"] = normalise_frames(out["visual"])
    if "audio" in out and out["audio"].dtype == torch.float16:  # spectrograms as stored
        out["audio"] = out["audio"].float()
    if "visual_jpeg" in out:
        clips = out.pop("visual_jpeg")
        draws = out.pop("visual_draw")
        flat = [j for clip in clips for j in clip]
        images = decode_jpeg(flat, mode=ImageReadMode.RGB, device=device)
        frames, i = [], 0
        for clip, draw in zip(clips, draws):
            frames.append(transform_frames(images[i:i + len(clip)], opts.image_size, draw,
                                           opts.eval_resize))
            i += len(clip)
        out["visual"] = torch.stack(frames)
    return out


def check_decode_device(decode_device: str) -> None:
    if decode_device == "cuda" and not torch.cuda.is_available():
        raise UserError("--decode-device cuda needs a CUDA GPU, and torch sees none on this "
                        "machine; use --decode-device cpu")


# --- pipelines ----------------------------------------------------------------------------


def _worker() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def _same_everywhere() -> int:
    """Worker seed for ResampledShards: identical on every rank and worker, so they all see
    one shard stream and the split stages below hand out disjoint slices of it."""
    return 0


# Stages are module-level generators bound with functools.partial, so a pipeline pickles
# (DataLoader workers started with spawn/forkserver get a copy) and nothing is shared.


def _slice_stage(src, *, rank: int, world: int):
    """Keep item i where i ≡ rank·W + worker (mod world·W): split by node, then by worker."""
    worker, nworkers = _worker()
    start, step = rank * nworkers + worker, world * nworkers
    for i, item in enumerate(src):
        if i % step == start:
            yield item


def _slice_for(rank: int, world: int):
    return functools.partial(_slice_stage, rank=rank, world=world)


def _copies_stage(src, *, copies: dict[str, tuple[int, ...]], everything: int):
    """Each sample as it is (keeping every modality), then one more time per entry of
    `copies[key]`, each with its modality mask (bit i: the model's i-th modality is kept): the
    re-sampled training set of a data-level method, mixed by the shuffle stage after it."""
    for sample in src:
        yield {**sample, "__keep__": everything}
        for mask in copies.get(sample["__key__"], ()):
            yield {**sample, "__keep__": mask}


def _shuffle_stage(src, *, bufsize: int, seed: int, epoch: int, rank: int, salt: int):
    """A shuffle buffer that starts yielding after `min(100, bufsize)` samples and grows by
    one sample per yield up to `bufsize` (so the first batch does not wait for a full buffer).
    """
    worker, _ = _worker()
    rng = random.Random(wds.utils.make_seed(seed, epoch, rank, worker, salt, 17))
    initial = min(100, bufsize)
    src = iter(src)
    buf: list = []
    for sample in src:
        buf.append(sample)
        if len(buf) < bufsize:
            nxt = next(src, None)
            if nxt is not None:
                buf.append(nxt)
        if len(buf) >= initial:
            i = rng.randrange(len(buf))
            buf[i], buf[-1] = buf[-1], buf[i]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


def _shuffle(bufsize: int, seed: int, epoch: int, rank: int, salt: int):
    return functools.partial(_shuffle_stage, bufsize=bufsize, seed=seed, epoch=epoch,
                             rank=rank, salt=salt)


def _decode_stage(src, *, opts: DataOptions, seed: int | None, epoch: int, rank: int):
    """Augmentation randomness from (seed, epoch, rank, worker) only; `seed` None = eval. A
    sample that cannot be decoded (a member missing, corrupt bytes) becomes a SKIPPED marker
    that `_batch_stage` hands to the loop, instead of ending the stream."""
    worker, _ = _worker()
    rng = np.random.default_rng([seed, epoch, rank, worker]) if seed is not None else None
    for sample in src:
        try:
            yield decode_sample(sample, opts, rng)
        except UserError:
            raise
        except Exception as exc:
            yield {SKIPPED: skip_reason(sample.get("__key__", "?"), sample.get("__url__", "?"),
                                        exc)}


def skip_reason(key: str, url: str, exc: BaseException) -> tuple[str, str, str]:
    text = str(exc).strip().splitlines()
    return key, url, f"{type(exc).__name__}: {text[0] if text else 'unreadable'}"


def _batch_stage(src, *, batch_size: int, partial: bool):
    """Batches of decoded samples; the SKIPPED markers met on the way ride along with the
    next batch as its "skipped" list of (key, tar, reason)."""
    samples, skipped = [], []
    for item in src:
        if SKIPPED in item:
            skipped.append(item[SKIPPED])
            continue
        samples.append(item)
        if len(samples) == batch_size:
            out = collate(samples)
            out["skipped"] = skipped
            yield out
            samples, skipped = [], []
    if samples and partial:
        out = collate(samples)
        out["skipped"] = skipped
        yield out


def _batches(batch_size: int, partial: bool):
    return functools.partial(_batch_stage, batch_size=batch_size, partial=partial)


def _decode(opts: DataOptions, seed: int | None, epoch: int, rank: int):
    return functools.partial(_decode_stage, opts=opts, seed=seed, epoch=epoch, rank=rank)


def _tar_stage(src, *, opener, handler):
    """Each tar's samples (avtrain.tarstream: webdataset's grouping, less Python per member),
    each tar opened by the shard set's own opener (its prefix only, fsspec streams for remote
    stores, never gopen's `pipe:`). A tar that fails part-way is reported by `handler` and the
    stream goes on with the next one."""
    for item in src:
        url = item["url"]
        try:
            stream = opener(url)
        except Exception as exn:
            exn.args = (*exn.args, url)
            if handler(exn):
                continue
            raise
        try:
            yield from tar_samples(stream, url)
            finish_stream(stream)
        except Exception as exn:
            exn.args = (*exn.args, url)
            if not handler(exn):
                raise
        finally:
            stream.close()


def _tars(shards: ShardSet):
    return functools.partial(_tar_stage, opener=shards.opener(), handler=wds.warn_and_continue)


def _loader(pipeline, workers: int, device_type: str, limit: int | None):
    kwargs = {"num_workers": workers, "batch_size": None, "pin_memory": device_type == "cuda"}
    if workers > 0:
        kwargs["prefetch_factor"] = 4
    loader = wds.WebLoader(pipeline, **kwargs)
    return loader.with_epoch(limit) if limit else loader


def train_loader(shards: ShardSet, split: str, opts: DataOptions, *, batch_size: int,
                 steps: int | None = None, epoch: int = 0, seed: int = 0, rank: int = 0,
                 world: int = 1, workers: int = 2, shuffle_buffer: int = 1000,
                 augment: bool = True, device_type: str = "cpu", salt: int | None = None,
                 copies: dict[str, tuple[int, ...]] | None = None, modalities: int = 0,
                 sampling: str = "exact"):
    """`steps` batches per rank (`loader.steps`), augmented unless `augment=False` (OLM-com's
    held-out val stream with --olm-heldout eval). `salt` gives a second stream (the held-out
    one) its own order and augmentation draws. `copies` (sample key -> modality masks, over the
    model's `modalities` in order) re-samples the set: every batch then has a "keep" mask per
    sample (the valuation method). Each batch lists the samples dropped from it as damaged
    under "skipped" (key, tar, reason).

    sampling "exact" (avtrain.sampling): every sample once per pass in a (seed, epoch) order;
    `steps` None = one pass less the remainder, more runs on into the next pass (an endless
    stream). "resample": shards drawn with replacement, a shuffle buffer, cut to `steps`."""
    salt = (0 if augment else 99) if salt is None else salt
    if sampling == "exact":
        from .sampling import ExactStream, sample_table

        stream = ExactStream(shards, sample_table(shards, split), opts, batch_size=batch_size,
                             epoch=epoch, seed=seed, rank=rank, world=world, steps=steps,
                             augment=augment, salt=salt, copies=copies, modalities=modalities)
        loader = _loader(stream, max(0, min(workers, stream.steps)), device_type, None)
        loader.steps = stream.steps
        return loader
    if sampling != "resample":
        raise UserError(f"--sampling must be exact or resample, got {sampling!r}")
    if steps is None:
        raise ValueError("a resampled stream is endless: give it `steps`")
    urls = shards.urls(split)
    resample = ([functools.partial(_copies_stage, copies=copies,
                                   everything=(1 << modalities) - 1)]
                if copies is not None else [])
    pipeline = wds.DataPipeline(
        wds.ResampledShards(urls, seed=wds.utils.make_seed(seed, epoch, salt),
                            deterministic=True, worker_seed=_same_everywhere),
        _slice_for(rank, world),
        _tars(shards),
        *resample,
        _shuffle(shuffle_buffer, seed, epoch, rank, salt),
        _decode(opts, (seed if not salt else wds.utils.make_seed(seed, salt)) if augment
                else None, epoch, rank),
        _batches(batch_size, partial=False),
    )
    loader = _loader(pipeline, workers, device_type, steps)
    loader.steps = steps
    return loader


def eval_loader(shards: ShardSet, split: str, opts: DataOptions, *, batch_size: int,
                rank: int = 0, world: int = 1, workers: int = 2, device_type: str = "cpu"):
    """Every sample of the split exactly once across all ranks and workers.

    With at least one shard per (rank, worker) whole shards are handed out; with fewer shards
    every reader opens all of them and keeps every (ranks·workers)-th sample instead.
    """
    urls = shards.urls(split)
    workers = max(0, min(workers, len(urls)))
    readers = world * max(1, workers)
    if len(urls) >= readers:
        source = [wds.SimpleShardList(urls), _slice_for(rank, world),
                  _tars(shards)]
    else:
        source = [wds.SimpleShardList(urls),
                  _tars(shards),
                  _slice_for(rank, world)]
    pipeline = wds.DataPipeline(
        *source,
        _decode(opts, None, 0, rank),
        _batches(batch_size, partial=True),
    )
    return _loader(pipeline, workers, device_type, None)
