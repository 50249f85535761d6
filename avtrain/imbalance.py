"""The imbalance picture, logged per epoch by every run (`avtrain bench` plots it).

- Logit norms: the mean L2 norm of each branch's logits (fused, audio, visual, ...) over an
  epoch's training batches, as OLM's logit-norm figure. Summed on the device at every step
  (no host synchronisation), reduced over steps and ranks once per epoch.
- Epoch probe (`--probe-every N`): every N epochs (and after the last), a linear probe of each
  encoder on the features of a fixed subset of each split (the first `PROBE_SUBSET` samples
  in the eval loader's fixed order), as OGM-GE's Figure 1: how much each jointly trained
  encoder has learned so far. It runs with the random-number state saved and restored, so a
  run with probes trains exactly as one without.
"""

from __future__ import annotations

import torch

from . import distributed as D

PROBE_SUBSET = 512  # samples per split the per-epoch probe extracts (train, val, test)


class LogitNorms:
    """Mean over an epoch's steps (and ranks) of the batch-mean ‖logits‖₂ of each branch."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0

    def add(self, logits: dict) -> None:
        for name, value in logits.items():
            norm = value.detach().float().norm(dim=1).mean()
            self.sums[name] = self.sums[name] + norm if name in self.sums else norm
        self.steps += 1

    def result(self, ctx: D.Context) -> dict[str, float]:
        if not self.sums:
            return {}
        names = sorted(self.sums)
        total = D.all_reduce_sum(torch.stack([self.sums[n] for n in names]), ctx)
        return dict(zip(names, (total / (self.steps * ctx.world)).tolist()))


def probe_due(probe_every: int | None, epoch: int, epochs: int) -> bool:
    """Every `probe_every` epochs (1-based: epochs N, 2N, ...) and after the last epoch."""
    return bool(probe_every) and ((epoch + 1) % probe_every == 0 or epoch + 1 == epochs)


def epoch_probe(trainer, epoch: int) -> dict | None:
    """{"audio": test acc, "visual": ..., "fused": ..., "samples": n} of the probe on the
    fixed subset, or None when no probe is due this epoch. All ranks call it (DDP)."""
    c = trainer.config
    if not probe_due(c.probe_every, epoch, c.epochs):
        return None
    from .checkpoint import rng_state, set_rng_state
    from .probe import linear_probe

    state = rng_state()
    try:
        result = linear_probe(
            trainer.model, trainer.shards, trainer.opts,
            batch_size=c.eval_batch_size or c.batch_size, ctx=trainer.ctx, workers=c.workers,
            amp=c.amp, seed=c.seed, val_split=c.val_split,
            test_split=c.test_split if trainer.has_test else c.val_split,
            max_train=None, limit=PROBE_SUBSET)
    finally:
        set_rng_state(state)
    out = {name: r["test_acc"] for name, r in result.items() if isinstance(r, dict)}
    out["samples"] = result["train_samples"]
    return out
