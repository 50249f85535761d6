"""Checkpoints: atomic writes, safe loads, and a check that a checkpoint fits the model.

Also the model a checkpoint describes (`model_from_checkpoint`) and a digest of a model's
weights: the loop, evaluation and the balancing methods that load other runs' models (the
uni-modal teachers) share them here, so no method imports the training loop.

A checkpoint is a plain dict of tensors and Python primitives, loaded with
`torch.load(weights_only=True)` so opening a downloaded checkpoint can never run code. The
model's state dict is stored without the `module.` (DDP) and `_orig_mod.` (torch.compile)
prefixes, so it loads into a bare model.
"""

from __future__ import annotations

import os
import random
import re
import tempfile

import numpy as np
import torch

from avprep.errors import UserError

from .models import model_from_spec

FORMAT = "avbalance-checkpoint"
VERSION = 1
PREFIXES = ("module.", "_orig_mod.")


def bare_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP and torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def clean_state_dict(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    return out


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(path: str, state: dict) -> None:
    """Write to a temporary file in the same folder, then rename: never a half checkpoint."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, "version": VERSION, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path: str) -> dict:
    """A checkpoint written by `save_checkpoint`, loaded without unpickling arbitrary objects."""
    if os.path.isdir(path):
        for name in ("best.pt", "last.pt"):
            if os.path.isfile(os.path.join(path, name)):
                path = os.path.join(path, name)
                break
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure here means "not our checkpoint"
        raise UserError(f"{path}: not an avbalance checkpoint ({_load_failure(exc)}); "
                        "nothing in it was executed") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path}: not an avbalance checkpoint")
    state["path"] = path
    return state


def _load_failure(exc: Exception) -> str:
    """What torch.load's refusal means, in a few words: its own message is a multi-line
    how-to for unpickling, which must not be shown (or followed) for a downloaded file."""
    text = str(exc)
    needs_code = re.search(r"(?:Unsupported global|Unsupported class): GLOBAL ([\w.]+)", text)
    if needs_code:
        return (f"it holds pickled Python objects ({needs_code.group(1)}) that only code could "
                "rebuild")
    return f"torch cannot read it as a checkpoint file: {type(exc).__name__}"


def check_compatible(ckpt: dict, *, num_classes: int | None = None,
                     classes: list[str] | None = None, spec: dict | None = None) -> None:
    """Refuse a checkpoint trained for another class list or model with one clear line."""
    path = ckpt.get("path", "checkpoint")
    have = ckpt.get("spec", {})
    if num_classes is not None and have.get("num_classes") != num_classes:
        raise UserError(f"{path} was trained for {have.get('num_classes')} classes; "
                        f"these shards have {num_classes}")
    if classes is not None and ckpt.get("classes") and list(ckpt["classes"]) != list(classes):
        raise UserError(f"{path} was trained on another class list "
                        f"({', '.join(ckpt['classes'][:4])}, ...) than these shards")
    if spec is not None:
        for key in ("model", "fusion", "modalities", "num_classes", "encoders", "input_sizes",
                    "temporal_pool", "feature_dim"):
            if have.get(key) != spec.get(key):
                raise UserError(f"{path} is a {key}={have.get(key)!r} checkpoint; "
                                f"this run wants {key}={spec.get(key)!r}")


def load_model_state(model: torch.nn.Module, ckpt: dict) -> None:
    try:
        bare_model(model).load_state_dict(clean_state_dict(ckpt["model"]))
    except (RuntimeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise UserError(f"{ckpt.get('path', 'checkpoint')} does not fit this model "
                        f"({first[:160]})") from None


def model_from_checkpoint(ckpt: dict, shards=None) -> torch.nn.Module:
    """A bare model with the checkpoint's weights, checked against the classes of `shards` (an
    avtrain.data.ShardSet) when given."""
    spec = ckpt.get("spec") or {}
    if shards is not None:
        check_compatible(ckpt, num_classes=shards.num_classes, classes=shards.classes)
    try:
        model = model_from_spec(spec)
    except KeyError:
        raise UserError(f"{ckpt.get('path')}: checkpoint has no model description") from None
    load_model_state(model, ckpt)
    return model


def weights_digest(model) -> str:
    """SHA-1 of every parameter and buffer: equal on all DDP ranks when replicas agree."""
    import hashlib

    h = hashlib.sha1()
    for name, t in sorted(bare_model(model).state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
