"""Sample-level modality valuation and the re-sampling it drives.

Paper: Y. Wei, R. Feng, Z. Wang, D. Hu, "Enhancing Multimodal Cooperation via Sample-level
Modality Valuation", CVPR 2024. Released code: github.com/GeWu-Lab/
Valuate-and-Enhance-Multimodal-Cooperation (commit 7ed12b0): code/sample_level.py (argparse
defaults 32-72: warmup 5; `execute_modulation` 75-153; `train_epoch` 156-181; the schedule in
`main` 303-340), code/modality_level.py (defaults: warmup 5, part_ratio 0.2, alpha 1; its
`execute_modulation`: the subset Z and the gap), code/datasets/dataloader.py
(`AV_KS_Dataset_sample_level` 116-186: the copies; `AV_KS_Dataset_modality_level` 259-316),
code/models/models.py (`forward` 61-72: a copy's dropped modality has its encoder features
zeroed before the fusion; `exec_drop` 74-86). BalanceMM's re-implementation: GeWu-Lab/
BalanceBenchmark (commit 4c1482f) balancemm/trainer/Sample_trainer.py, balancemm/evaluation/
modalitys.py `Calculate_Shapley_Sample` (58-103), balancemm/datasets/__init__.py
(`create_dataset_sample_level` 127-219, `create_dataset_modality_level` 221-...) and
configs/trainer_config.yaml (Sample block, lines 89-95). No code is copied;
tests/test_valuation_released.py checks the rule, the copies and the step against a reference
written from the released semantics.

Level: start_epoch + a re-sampled training stream (`train_copies`) + a fusion pre-hook. The loss
is the baseline's (CE of the fused logits, mean over the batch, one backward, one step).

- valuation (released `execute_modulation`, run after every epoch): the model in eval mode,
  without grad, encodes every training sample once; for every subset S of the modalities the
  fusion is evaluated with the features of the modalities outside S zeroed (released
  `exec_drop`), and the value of S for that sample is |S| if S's prediction is right, else 0
  (released: 2 for the full pair, 1 for a single modality, v(empty) = 0). Each modality's
  contribution is its Shapley value, phi_m = sum over S without m of
  |S|!(M-|S|-1)!/M! (v(S+m) - v(S)); for two modalities (v_a + v_av - v_v) / 2, which takes the
  values -0.5, 0, 0.5, 1, 1.5;
- sample level (`--valuation-level sample`, the paper's method; released sample_level.py): for
  the next epoch every sample is kept once, plus, for each modality m, copies(phi_m) more copies
  in which only m is kept (the others' features zeroed before the fusion): 1 copy if
  0.4 < phi < 1, 2 if -0.1 < phi < 0.4, 3 if phi < -0.1, none otherwise -- a modality that
  contributed little to a sample gets that sample to learn from alone;
- modality level (`--valuation-level modality`; released modality_level.py): the mean
  contribution over a random subset Z of the training set (part_ratio of it, drawn with
  replacement), gap_m = 1 - mean phi_m; difference = alpha * 2/3 * (the mean over pairs of
  |gap_m - gap_m'|); int(difference * N) samples drawn with replacement are added once, keeping
  only the modality with the largest gap (released: audio if gap_a > gap_v, else visual);
- schedule (released `main`): epochs 0 .. warmup-1 train on the data as it is; the valuation
  after epoch e >= warmup - 1 gives epoch e + 1's training set -- here the start of epoch
  e + 1 (`start_epoch`), the same model at the same moment. The valuation is also done (and
  logged) after the earlier epochs, as released.

Options: `--valuation-level` (sample), `--valuation-warmup` (5, both released scripts),
`--valuation-part-ratio` (0.2) and `--valuation-alpha` (1), as released.

The epoch is the original set plus its copies: with exact epochs (the default) each copy is an
extra item of the epoch's permutation, shuffled globally with the rest as the released code's
appended copies under a shuffled DataLoader; with `--sampling resample` each copy follows its
original in the stream and the shuffle buffer mixes them. It has (N + copies) // batch steps,
as the released epoch has len(resampled set) / batch. With --steps-per-epoch set that count is
kept.

Signal (`step_metrics`, constant over an epoch): valuation_contrib_<m> (the mean contribution
over the training set, released cona / conv), valuation_copies_<m> (copies keeping m, over N)
and valuation_copies (all copies over N).

DDP: every rank values its part of the training split (every sample once across ranks, BatchNorm
statistics broadcast from rank 0 first); the keys and contributions are gathered on every rank
and put in key order, so every rank builds the same copies (and the modality level's draws, from
a generator seeded by (--seed, epoch), are the same: N processes = one). The step is the
baseline's, which DDP averages.

Resume: the copies for epoch e are a function of the model that starts epoch e, which the
checkpoint holds, so a resumed run rebuilds exactly the same set; the state holds the last
signal only.

Where we differ from the released code, and why:

- the valuation reads the training split with eval transforms (deterministic: needed for exact
  resume and equal ranks); the released `train_val_dataset` is a second mode-'train' dataset,
  so its frames are randomly cropped and flipped;
- each copy of a sample gets fresh augmentation draws, as released (under `--sampling
  resample` it sits next to its original in the stream until the shuffle buffer moves it);
- any number of modalities: the value |S| for a right prediction with S (released: 2 and 1);
  the copies keep one modality each (as BalanceMM); the modality level's difference is the mean
  over modality pairs (equal to the released one for two);
- the features are computed under the loop's autocast (bf16 on CUDA with --amp).

BalanceMM deviates from the authors: its sample values are 1 for any right prediction (the full
pair too), so a sample all subsets get right gives phi = 0.5 and one copy per modality (the
authors: phi = 1, none); its result cache is filled on the first batch and reused for every
later batch; it zeroes the inputs of the absent modality rather than its features; it starts at
epoch 1 (modulation_starts 1); it drops the last N mod 64 samples from the valuation; and at the
modality level it ignores alpha, doubles the difference, and adds every drawn sample once per
modality (the modality with the smaller gap as an unmasked copy).
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.distributed as dist

from avprep.errors import UserError
from avtrain.options import Option, Search

from ..shapley import subsets
from . import _dist
from ._checks import finite, fused_model, number, require_two_modalities
from .base import Balancer, EpochContext, StepContext

LEVELS = ("sample", "modality")


# --- the rule, reusable on its own ---------------------------------------------------------------


def valuation_contributions(correct: dict[tuple[str, ...], torch.Tensor],
                            modalities: list[str]) -> torch.Tensor:
    """Each sample's Shapley contribution per modality [N, M], from `correct[S]` ([N] bools:
    the prediction with only S's features is right) for every non-empty subset S; the value of
    S is |S| if right (released: 2 for the full pair, 1 for one modality), v(empty) = 0."""
    n = len(modalities)
    some = next(iter(correct.values()))
    value = {s: correct[s].long() * len(s) if s else torch.zeros_like(some, dtype=torch.long)
             for s in subsets(modalities)}
    columns = []
    for m in modalities:  # integer weights |S|!(M-|S|-1)!, one division: exact thresholds below
        total = torch.zeros_like(some, dtype=torch.long)
        for s in subsets([x for x in modalities if x != m]):
            with_m = tuple(x for x in modalities if x in s or x == m)
            weight = math.factorial(len(s)) * math.factorial(n - len(s) - 1)
            total = total + weight * (value[with_m] - value[s])
        columns.append(total.double() / math.factorial(n))
    return torch.stack(columns, dim=1)


def sample_copies(contributions: torch.Tensor) -> torch.Tensor:
    """How many extra copies keep each modality alone, per sample [N, M] (released
    AV_KS_Dataset_sample_level): 1 if 0.4 < phi < 1, 2 if -0.1 < phi < 0.4, 3 if phi < -0.1,
    else 0."""
    c = contributions
    one = (c > 0.4) & (c < 1)
    two = (c > -0.1) & (c < 0.4)
    three = c < -0.1
    return one.long() + 2 * two.long() + 3 * three.long()


def modality_gap(contributions: torch.Tensor, part: torch.Tensor, alpha: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(gap per modality [M], difference) from the contributions of the subset Z (`part`, row
    indices): gap_m = 1 - mean phi_m over Z; difference = alpha * 2/3 * mean over modality
    pairs of |gap_m - gap_m'| (released modality_level.py: |gap_a - gap_v| / 3 * 2 * alpha)."""
    gap = 1.0 - contributions[part].double().mean(dim=0)
    m = gap.numel()
    pairs = (gap.unsqueeze(0) - gap.unsqueeze(1)).abs().sum() / (m * (m - 1))
    return gap, pairs * 2.0 / 3.0 * alpha


# --- the method ----------------------------------------------------------------------------------


class Valuation(Balancer):
    """Re-samples the training set from each sample's modality contributions (sample level) or
    the modalities' mean contributions (modality level)."""

    name = "valuation"
    title = "Sample-level modality valuation"
    paper = ("Y. Wei, R. Feng, Z. Wang, D. Hu: Enhancing Multimodal Cooperation via "
             "Sample-level Modality Valuation, CVPR")
    year = 2024
    summary = "re-samples training data by per-sample Shapley value"
    code = ("GeWu-Lab/Valuate-and-Enhance-Multimodal-Cooperation (code/sample_level.py, "
            "code/modality_level.py, code/datasets/dataloader.py) @ 7ed12b0; "
            "GeWu-Lab/BalanceBenchmark (Sample_trainer.py, trainer_config.yaml) @ 4c1482f")
    differences = (
        "Authors' code: the valuation reads the training split with eval transforms "
        "(released: randomly cropped and flipped), for exact resume and equal ranks",
        "Authors' code: any number of modalities (value |S|, one modality kept per copy); "
        "features under the run's autocast",
        "BalanceMM: value 1 for any right prediction, a result cache from the first batch, "
        "inputs zeroed instead of features, from epoch 1, modality level ignores alpha",
    )
    signals = ("valuation_contrib_<m>", "valuation_copies_<m>", "valuation_copies")
    # bench --tune: the warm-up, when re-sampling starts (the sample level, the default, has no
    # strength of its own; part_ratio and alpha act only at the modality level)
    options = (
        Option("level", str, "sample", "sample (sample_level.py, the paper's method) or modality (modality_level.py)", choices=LEVELS),
        Option("warmup", int, 5, "epochs trained on the data as it is before the re-sampling (the first re-sampling uses the valuation after epoch warmup-1)", minimum=1, search=Search(1, 8)),
        Option("part_ratio", float, 0.2, "modality level: share of the training set drawn to estimate the gap", minimum=0, maximum=1, exclusive_minimum=True),
        Option("gap_alpha", float, 1.0, "modality level: factor on the gap difference, the re-sampled share", minimum=0, setting="valuation_alpha"),
    )

    def __init__(self, model, config=None, *, modalities=None, device="cpu"):
        super().__init__(model, config, modalities=modalities, device=device)
        c = self.config
        require_two_modalities(self.name, self.modalities)
        self.level = self.opt.level
        self.warmup = self.opt.warmup
        self.part_ratio = finite("--valuation-part-ratio", self.opt.part_ratio)
        self.alpha = finite("--valuation-alpha", self.opt.gap_alpha)
        self.seed = int(number(c, "seed", 0))
        bare = fused_model(model, self.name)
        self.bare = bare
        bare.fusion.register_forward_pre_hook(self._mask)
        self.copies: dict[str, tuple[int, ...]] | None = None
        self._keep: torch.Tensor | None = None
        self.last: dict[str, float] = {}
        self._metrics: dict[str, torch.Tensor] = {}

    # -- before an epoch: value the training set, build the copies --

    def start_epoch(self, ctx: EpochContext) -> None:
        self.copies = None
        if ctx.epoch < 1:
            return
        if ctx.eval_batches is None:
            raise RuntimeError("--method valuation needs whole-split batches (eval_batches)")
        keys, phi = self.value(ctx.eval_batches("train"), ctx.autocast)
        if not keys:
            raise UserError("--method valuation: the train split gave no samples to value")
        counts = torch.zeros(len(self.modalities), dtype=torch.float64)
        if ctx.epoch >= self.warmup:
            self.copies, counts = self.plan(keys, phi, ctx.epoch)
        n = len(keys)
        self.last = {f"valuation_contrib_{m}": float(phi[:, i].mean())
                     for i, m in enumerate(self.modalities)}
        self.last.update({f"valuation_copies_{m}": float(counts[i]) / n
                          for i, m in enumerate(self.modalities)})
        self.last["valuation_copies"] = float(counts.sum()) / n
        self._metrics = self._as_tensors(self.last)

    @torch.no_grad()
    def value(self, batches, autocast) -> tuple[list[str], torch.Tensor]:
        """Every training sample's contributions, gathered from all ranks, in key order."""
        bare = self.bare
        _dist.broadcast_buffers(bare.encoders[m] for m in self.modalities)  # eval reads them
        was_training = bare.training
        bare.eval()
        keys: list[str] = []
        parts = []
        try:
            for batch in batches:
                with autocast():
                    feats = bare.features(batch)
                    correct = {}
                    for s in subsets(self.modalities)[1:]:
                        logits = bare.fusion({m: feats[m] if m in s else torch.zeros_like(feats[m])
                                              for m in self.modalities})
                        if bare.output_layer is not None:
                            logits = bare.output_layer(logits)
                        correct[s] = logits.argmax(dim=1) == batch["label"]
                parts.append(valuation_contributions(correct, self.modalities).cpu())
                keys.extend(batch["key"])
        finally:
            if was_training:
                bare.train()
        local = (keys, torch.cat(parts) if parts else torch.zeros(0, len(self.modalities),
                                                                  dtype=torch.float64))
        gathered = [local]
        if _dist.world_size() > 1:
            gathered = [None] * _dist.world_size()
            dist.all_gather_object(gathered, local)
        all_keys = [k for g in gathered for k in g[0]]
        phi = torch.cat([g[1] for g in gathered])
        order = sorted(range(len(all_keys)), key=all_keys.__getitem__)
        return [all_keys[i] for i in order], phi[torch.tensor(order, dtype=torch.long)]

    def plan(self, keys: list[str], phi: torch.Tensor, epoch: int
             ) -> tuple[dict[str, tuple[int, ...]], torch.Tensor]:
        """The copies of this epoch (key -> modality masks) and how many keep each modality."""
        m = len(self.modalities)
        copies: dict[str, list[int]] = {}
        if self.level == "sample":
            counts = sample_copies(phi)
            for row in torch.nonzero(counts.sum(dim=1)).flatten().tolist():
                copies[keys[row]] = [1 << i for i in range(m) for _ in range(int(counts[row, i]))]
            return {k: tuple(v) for k, v in copies.items()}, counts.sum(dim=0).double()
        n = len(keys)
        generator = torch.Generator().manual_seed(
            zlib.crc32(f"valuation:{self.seed}:{epoch}".encode()))
        part = torch.randint(n, (max(1, int(n * self.part_ratio)),), generator=generator)
        gap, difference = modality_gap(phi, part, self.alpha)
        weakest = int(torch.argmax(gap))  # released: the first on ties (gap_a > gap_v: audio)
        chosen = torch.randint(n, (int(float(difference) * n),), generator=generator)
        for row in chosen.tolist():
            copies.setdefault(keys[row], []).append(1 << weakest)
        counts = torch.zeros(m, dtype=torch.float64)
        counts[weakest] = float(chosen.numel())
        return {k: tuple(v) for k, v in copies.items()}, counts

    def train_copies(self):
        return self.copies

    # -- the step: the baseline's, with each copy's dropped modalities zeroed before fusing --

    def train_step(self, ctx: StepContext):
        self._keep = ctx.batch.get("keep")
        try:
            return super().train_step(ctx)
        finally:
            self._keep = None

    def _mask(self, module, args):
        if self._keep is None or not module.training:
            return None
        keep = self._keep
        self._keep = None  # one masked fusion call per step
        (feats,) = args
        bits = torch.arange(len(self.modalities), device=keep.device)
        kept = (keep.unsqueeze(1) >> bits) & 1  # [B, M]
        return ({m: feats[m] * kept[:, i:i + 1].to(feats[m].dtype)
                 for i, m in enumerate(self.modalities)},)

    # -- log and state --

    def step_metrics(self):
        return dict(self._metrics)

    def state_dict(self) -> dict:
        return {"last": dict(self.last)}

    def load_state_dict(self, state: dict) -> None:
        self.last = dict(state.get("last") or {})
        self._metrics = self._as_tensors(self.last)
