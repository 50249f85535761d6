"""Classification metrics and the run log (metrics.jsonl + TensorBoard).

Metrics are computed on rank 0 from gathered predictions, in NumPy: accuracy of the fused
logits (`acc`) and of each modality's logits (`acc_audio`, `acc_visual`, ...), macro-F1,
weighted-F1 and the confusion matrix (rows = true class, columns = predicted).
"""

from __future__ import annotations

import json
import math
import os
import time

import numpy as np


def confusion_matrix(labels, preds, num_classes: int) -> np.ndarray:
    labels = np.asarray(labels, dtype=np.int64)
    preds = np.asarray(preds, dtype=np.int64)
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (labels, preds), 1)
    return cm


def accuracy(labels, preds) -> float:
    labels, preds = np.asarray(labels), np.asarray(preds)
    return float((labels == preds).mean()) if labels.size else float("nan")


def macro_f1(cm: np.ndarray) -> float:
    """Mean over classes present in the labels or predictions of 2·P·R/(P+R)."""
    tp = np.diag(cm).astype(np.float64)
    support, predicted = cm.sum(axis=1), cm.sum(axis=0)
    present = (support + predicted) > 0
    if not present.any():
        return float("nan")
    denom = support + predicted
    f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
    return float(f1[present].mean())


def weighted_f1(cm: np.ndarray) -> float:
    """Per-class F1 averaged with the classes' true counts as weights (MER 2023's metric)."""
    tp = np.diag(cm).astype(np.float64)
    support, predicted = cm.sum(axis=1), cm.sum(axis=0)
    if support.sum() == 0:
        return float("nan")
    denom = support + predicted
    f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
    return float((f1 * support).sum() / support.sum())


def summarize(labels, preds: dict[str, np.ndarray], num_classes: int,
              loss: float | None = None) -> dict:
    """Metrics of one evaluation. `preds` maps "fused" and each modality to predicted ids."""
    labels = np.asarray(labels, dtype=np.int64)
    cm = confusion_matrix(labels, preds["fused"], num_classes)
    out = {"n": int(labels.size), "acc": accuracy(labels, preds["fused"])}
    for name, p in preds.items():
        if name != "fused":
            out[f"acc_{name}"] = accuracy(labels, p)
    out["macro_f1"] = macro_f1(cm)
    out["weighted_f1"] = weighted_f1(cm)
    if loss is not None:
        out["loss"] = float(loss)
    out["confusion"] = cm.tolist()
    return out


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    return value


class RunLog:
    """Appends JSON lines to RUN/metrics.jsonl and mirrors scalars to TensorBoard.

    Only rank 0 writes; other ranks get a RunLog with `enabled=False` and every call is a no-op.
    """

    def __init__(self, run_dir: str, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._tb = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=os.path.join(run_dir, "tb"))
        self._file = open(self.path, "a", encoding="utf-8") if enabled else None

    def write(self, record: dict, *, step: int | None = None, prefix: str = "") -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        self._file.write(json.dumps(_jsonable(record)) + "\n")
        self._file.flush()
        if self._tb is not None and step is not None:
            for key, value in _scalars(record, prefix):
                self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _scalars(record: dict, prefix: str):
    for key, value in record.items():
        if key in ("time", "kind", "epoch", "step", "confusion"):
            continue
        if isinstance(value, dict):
            yield from _scalars(value, f"{prefix}{key}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(
                value):
            yield f"{prefix}{key}", value


def read_metrics(run_dir: str) -> list[dict]:
    """All records of RUN/metrics.jsonl (the report reads runs through this)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
