"""One sample's bytes -> tensors, a batch of them, and the batch on the device.

    opts = DataOptions.for_shards(shards, image_size=224, frames=None)
    sample = decode_sample(raw, opts, rng)        # rng None: the eval transforms
    batch = to_device(collate(samples), device, opts)

Both streams decode here: avtrain.data's WebDataset pipelines and avtrain.sampling's exact
epochs (which avtrain.data's train_loader streams), so sampling never imports data.

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
import math
import re
import zlib
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torchvision.io import ImageReadMode, decode_jpeg

from avprep.errors import UserError

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
FRAME_PICKS = ("random", "segment-start")


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
    def for_shards(cls, shards, *, modalities=("audio", "visual"), image_size=224,
                   frames=None, crop_columns=None, decode_device="cpu", eval_crop="centre",
                   eval_resize="crop", train_crop="clip", eval_seed=0) -> DataOptions:
        """Frames and spectrogram crop default to what the shard set's preset recommends
        (`shards`: an avtrain.data.ShardSet)."""
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


def skip_reason(key: str, url: str, exc: BaseException) -> tuple[str, str, str]:
    text = str(exc).strip().splitlines()
    return key, url, f"{type(exc).__name__}: {text[0] if text else 'unreadable'}"
