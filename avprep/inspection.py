"""Look at a shard set before training on it: `inspect` (summary, one sample as a PNG) and
`verify` (decode everything, compare with index.json). A shard set is a folder or an
s3://, gs://, https:// prefix (avprep.storage); tars are read as streams."""

from __future__ import annotations

import io
import json
import os
from collections import Counter

import numpy as np

from .errors import UserError
from .outputs import make_output_dir
from .storage import Store

SAFE_SUFFIXES = ("npy", "jpg", "cls", "json", "txt")


def load_index(out: str) -> dict:
    store = Store.at(out)
    if not store.local:
        if store.size("index.json") is None:
            raise UserError(f"{out}: no index.json (not a finished shard set; rerun "
                            "build-shards)")
        return store.read_json("index.json")
    path = os.path.join(out, "index.json")
    if not os.path.isdir(out):
        raise UserError(f"{out}: no such folder")
    if not os.path.isfile(path):
        raise UserError(f"{out}: no index.json (not a finished shard set; rerun build-shards)")
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except ValueError as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None


def _decode_member(suffix: str, data: bytes):
    """Decode one member without ever unpickling (npy with allow_pickle=False)."""
    if suffix == "npy":
        return np.load(io.BytesIO(data), allow_pickle=False)
    if suffix == "jpg":
        import cv2

        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        if image is None:
            raise ValueError("undecodable JPEG")
        return image[:, :, ::-1]
    if suffix == "cls":
        return int(data.decode("ascii"))
    if suffix == "json":
        return json.loads(data)
    if suffix == "txt":
        return data.decode("utf-8")
    raise ValueError(f"unexpected member type .{suffix}")


def iter_samples(url: str, store: Store | None = None):
    """(key, {suffix: bytes}) for each sample of one tar, in order; raises on a broken tar.
    With `store`, `url` is a member name of that store, read as one stream."""
    import tarfile

    current, members = None, {}
    with (store.open_read(url) if store is not None else open(url, "rb")) as stream, \
            tarfile.open(fileobj=stream, mode="r|*") as tar:
        for info in tar:
            if not info.isfile():
                continue
            key, _, suffix = info.name.partition(".")
            if "/" in key or key.startswith(".."):
                raise ValueError(f"member {info.name!r} has a path in its key")
            if key != current and current is not None:
                yield current, members
                members = {}
            current = key
            members[suffix] = tar.extractfile(info).read()
    if current is not None:
        yield current, members


def summary(out: str) -> str:
    index = load_index(out)
    preset = index.get("preset", {})
    lines = [f"shard set {out}: dataset {index.get('dataset')}, {index.get('num_classes')} "
             f"classes, preset {preset.get('name')} ({preset.get('description', '')})",
             f"modalities: {', '.join(index.get('modalities', []))}; built by avbalance "
             f"{index.get('tool_version')} on {index.get('created')}"]
    classes = index.get("classes", [])
    for split, info in index.get("splits", {}).items():
        counts = info.get("class_counts", [])
        hist = ", ".join(f"{c}={n}" for c, n in zip(classes, counts))
        size = sum(s.get("bytes", 0) for s in info["shards"]) / 1e6
        lines.append(f"  {split:>5}: {info['samples']} samples, {len(info['shards'])} shard(s), "
                     f"{size:.1f} MB; {hist}")
    store = Store.at(out)
    if store.size("failures.jsonl") is not None:
        text = store.read_bytes("failures.jsonl").decode("utf-8")
        failures = [json.loads(line) for line in text.splitlines() if line.strip()]
        stages = Counter(f["stage"] for f in failures)
        lines.append(f"failures: {len(failures)}" +
                     (f" ({', '.join(f'{s} {n}' for s, n in stages.most_common())})"
                      if failures else ""))
    return "\n".join(lines)


def find_sample(out: str, key: str) -> dict:
    index = load_index(out)
    store = Store.at(out)
    for info in index.get("splits", {}).values():
        for shard in info["shards"]:
            for sample_key, members in iter_samples(shard["url"], store):
                if sample_key == key:
                    return {s: _decode_member(s.rsplit(".", 1)[-1], d)
                            for s, d in members.items() if s.rsplit(".", 1)[-1] in SAFE_SUFFIXES}
    raise UserError(f"no sample with key {key!r} in {out}")


def show_sample(out: str, key: str, png: str) -> str:
    """Write a PNG of one sample: its spectrogram and frames, titled with its label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sample = find_sample(out, key)
    make_output_dir(os.path.dirname(os.path.abspath(png)))  # with its missing parents
    classes = load_index(out).get("classes", [])
    frames = [sample[k] for k in sorted(sample) if k.startswith("f") and k.endswith("jpg")]
    label = sample.get("cls")
    name = classes[label] if label is not None and label < len(classes) else label
    cols = max(1, min(len(frames), 8))
    fig = plt.figure(figsize=(2.2 * max(cols, 3), 5.0))
    grid = fig.add_gridspec(2, cols, height_ratios=[1.1, 1])
    ax = fig.add_subplot(grid[0, :])
    spec = sample["spec.npy"].astype(np.float32)
    ax.imshow(spec, origin="lower", aspect="auto", cmap="magma")
    ax.set(title=f"{key}: label {name} (id {label})", xlabel="time (frames)",
           ylabel="frequency bin")
    for i, frame in enumerate(frames[:cols]):
        fax = fig.add_subplot(grid[1, i])
        fax.imshow(frame)
        fax.set_title(f"frame {i}", fontsize=8)
        fax.axis("off")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def verify(out: str) -> list[str]:
    """Every problem found: unreadable tars or members, counts unlike index.json, duplicates."""
    index = load_index(out)
    store = Store.at(out)
    problems: list[str] = []
    seen: Counter = Counter()
    for info in index.get("splits", {}).values():
        for shard in info["shards"]:
            url = store.check_name(shard["url"])
            if store.size(url) is None:
                problems.append(f"{shard['url']}: missing")
                continue
            count = 0
            try:
                for key, members in iter_samples(url, store):
                    count += 1
                    seen[key] += 1
                    missing = [s for s in ("cls", "json") if s not in members]
                    if not any(s.endswith("npy") for s in members):
                        missing.append("spec.npy")
                    if missing:
                        problems.append(f"{shard['url']}: {key} lacks .{', .'.join(missing)}")
                    for suffix, data in members.items():
                        try:
                            _decode_member(suffix.rsplit(".", 1)[-1], data)
                        except Exception as exc:
                            problems.append(f"{shard['url']}: {key}.{suffix}: {exc}")
            except Exception as exc:
                problems.append(f"{shard['url']}: unreadable tar ({exc})")
                continue
            if count != shard["samples"]:
                problems.append(f"{shard['url']}: {count} samples, index.json says "
                                f"{shard['samples']}")
    problems += [f"key {k!r} appears {n} times" for k, n in seen.items() if n > 1]
    return problems
