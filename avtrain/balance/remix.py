"""Remix: data remixing for balance and sufficiency.

Paper: X. Ma, H. Chen, Y. Deng, "Improving Multimodal Learning Balance and Sufficiency through
Data Remixing", ICML 2025 (arXiv 2506.11550). Released code: github.com/MatthewMaxy/
Remix_ICML2025 (commit 80898aa): train.py (argparse defaults 28-50: warmup 10, alpha 0.5,
beta 0.5, gamma1 1, gamma2 1; `kl_divergence` 52-57; `remix` 60-99; the warm-up epoch
`train_epoch` 101-125; the remixed epoch `special_train_epoch` 127-173; the schedule in `main`
240-250), models/models.py (`AVClassifier`: `head` Linear(1024, C) on [a; v], `head_audio` and
`head_video` Linear(512, C); `forward` 38-67, the other modality's pooled features set to 0 at
55-59), datasets/dataloader.py (`AV_CD_Dataset_Remix`: the two subsets, train transforms) and
scripts/run_train.sh (`--warmup 10`, batch 64, 60 epochs). BalanceMM has no Remix. No code is
copied; tests/test_remix_released.py checks the rule and our steps against a reference written
from the released semantics.

Level: start_epoch + a re-assembled training set (`train_groups`) + a fusion pre-hook. The
model has its own trained unimodal heads beside the fusion's classifier (released `head_audio`,
`head_video`: `trained_unimodal_heads`); `--fusion concat` is the released `head` on [a; v].

- warm-up (released `train_epoch`, epochs 0 .. warmup-1): the data as it is;
  loss = CE(fused) + warm_audio * CE(audio head) + warm_visual * CE(visual head), each CE the
  batch mean, one backward, one step;
- remix (released `remix`, before every later epoch): the model in eval mode, without grad,
  reads every training sample once (eval transforms, as the released `train_val_dataset` in mode
  'val'); for each sample and modality m, p_m = softmax of m's head, clipped to [1e-9, 1] (in
  float32), and KL_m = sum_c p_m,c log2(p_m,c / (1/C)), its divergence from the uniform
  distribution (float64, as numpy computes it); the sample goes to the modality whose head is the
  least sure of it, the smallest KL (released: audio if KL_audio < KL_video, else video; a tie
  goes to visual);
- the remixed epoch (released `special_train_epoch`): the visual group first, then the audio
  group, each shuffled and cut into batches of that group alone; in a batch of modality m's group the other modalities'
  features are zeroed before the fusion (released `forward(..., mode)`: the encoders still run
  in train mode, their gradients are zero) and loss = CE(fused) + gamma_m * CE(m's head); the
  other heads have no loss, so no gradient (None, not zero: the optimizer skips them -- no
  momentum, no weight decay -- as released); one backward, one step per batch.

Options (released train.py): `--remix-warmup` (10, line 36 and run_train.sh), `--remix-warm-audio`
(alpha 0.5, line 43), `--remix-warm-visual` (beta 0.5, line 44), `--remix-gamma-visual` (gamma1 1,
line 45), `--remix-gamma-audio` (gamma2 1, line 46). The released protocol (Adam lr 5e-5 wd 1e-4,
StepLR 30 x 0.1, batch 64, 60 epochs; lines 32-40, 233-235) is not a recipe yet.

Signals (`step_metrics`): remix_share_<m> (the share of the training set given to m alone) and
remix_kl_<m> (the mean KL of m's head, bits), constant over an epoch from the first remix on;
remix_alone_<m> per remixed step (the share of the batch that keeps m alone: 1 or 0).

The data: `train_groups` hands the loop the epoch's groups; the exact stream (avtrain.sampling)
gives each group's samples once, in an order seeded by (--seed, epoch, group), in global
batches of that group alone, each sample carrying its group's modality mask ("keep", bit i the
model's i-th modality). The epoch has sum_g N_g // (B R) steps (B the batch per rank, R the
ranks); with --steps-per-epoch that many batches of the grouped stream, which runs on into a
next pass. `--sampling resample` is refused: a shuffle buffer cannot give batches of one group.

DDP: every rank measures its part of the training split (every sample once across ranks,
BatchNorm statistics broadcast from rank 0 first); keys and divergences are gathered on every
rank and put in key order, so every rank builds the same groups; a global batch is of one group,
so every rank zeroes the same modality and drops the same head's gradient. The step is one
forward of the DDP network (the absent heads' CE enter the loss times 0, so DDP sees every
parameter used, and their gradients are set to None after the reduction): N processes = one
process with the global batch. Which heads are absent is read from the batch's keys and the
groups (on the host: no device sync); a batch without keys reads its masks from the device.

Resume: the groups of epoch e are a function of the model that starts epoch e, which the
checkpoint holds, so a resumed run rebuilds them exactly; the state holds the last signal.

Where we differ from the released code, and why:

- each group's last N_g mod (B R) samples are not seen that epoch (the exact stream's
  `drop_last`, which keeps every rank in step and N ranks = one process); the released
  DataLoader keeps a partial last batch per group. Which samples fall out changes every epoch;
- the divergence is over the dataset's C classes (released: 6, CREMA-D's, hard-coded) and the
  measuring forward runs under the loop's autocast (bf16 on CUDA with --amp);
- one modality pair only: the weights are per modality (audio, visual), as released.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from avprep.errors import UserError
from avtrain.options import Option, Search

from . import _dist
from ._checks import finite, fused_model, require_two_modalities
from .base import Balancer, EpochContext, StepContext

PAIR = ("audio", "visual")


# --- the rule, reusable on its own ---------------------------------------------------------------


def remix_divergence(logits: torch.Tensor) -> torch.Tensor:
    """Per sample [N] (float64): KL of softmax(logits), clipped to [1e-9, 1] in float32, from the
    uniform distribution over the C classes, in bits (released `kl_divergence`)."""
    p = F.softmax(logits.float(), dim=1).clamp(1e-9, 1.0).double()
    uniform = 1.0 / logits.shape[1]
    return (p * torch.log2(p / uniform)).sum(dim=1)


def remix_assign(divergence: torch.Tensor) -> torch.Tensor:
    """The modality each sample is given to [N]: the one with the smallest divergence [N, M]
    (its head least sure of the sample); on a tie the later modality (released: audio only when
    KL_audio < KL_video)."""
    m = divergence.shape[1]
    return (m - 1) - torch.argmin(divergence.flip(1), dim=1)


# --- the method ----------------------------------------------------------------------------------


class Remix(Balancer):
    """After a warm-up, each epoch trains every sample on the modality least sure of it alone, in
    batches of one modality."""

    name = "remix"
    title = "Remix"
    paper = ("X. Ma, H. Chen, Y. Deng: Improving Multimodal Learning Balance and Sufficiency "
             "through Data Remixing, ICML")
    year = 2025
    summary = "trains each sample on its least-sure modality alone"
    code = "MatthewMaxy/Remix_ICML2025 (train.py, models/models.py) @ 80898aa"
    differences = (
        "Authors' code: each group's last N mod (batch x ranks) samples wait for the next epoch "
        "(released: a partial last batch per group), for equal ranks",
        "Authors' code: KL over the dataset's classes (released: 6, hard-coded); the measuring "
        "forward under the run's autocast",
        "Authors' code: --sampling resample is refused (batches of one group need exact epochs)",
    )
    signals = ("remix_share_<m>", "remix_kl_<m>", "remix_alone_<m>")
    trained_unimodal_heads = True
    # bench --tune: the warm-up decides when remixing starts; the gammas its unimodal strength
    options = (
        Option("warmup", int, 10, "epochs trained on the data as it is (the remix starts at "
               "this epoch, 0-based)", minimum=0, search=Search(1, 12)),
        Option("warm_audio", float, 0.5, "warm-up: weight of the audio head's CE (released "
               "--alpha)", minimum=0),
        Option("warm_visual", float, 0.5, "warm-up: weight of the visual head's CE (released "
               "--beta)", minimum=0),
        Option("gamma_audio", float, 1.0, "remixed epochs: weight of the audio head's CE on the "
               "audio group's batches (released --gamma2)", minimum=0,
               search=Search(0.25, 4.0, log=True)),
        Option("gamma_visual", float, 1.0, "remixed epochs: weight of the visual head's CE on the "
               "visual group's batches (released --gamma1)", minimum=0,
               search=Search(0.25, 4.0, log=True)),
    )

    def __init__(self, model, config=None, *, modalities=None, device="cpu"):
        super().__init__(model, config, modalities=modalities, device=device)
        require_two_modalities(self.name, self.modalities)
        if tuple(self.modalities) != PAIR:
            raise UserError(f"--method remix weighs the audio and visual heads (as released), got "
                            f"{', '.join(self.modalities)}")
        if str(self.config.get("sampling") or "exact") != "exact":
            raise UserError("--method remix trains batches of one modality's group and needs "
                            "--sampling exact")
        self.bare = fused_model(model, self.name)
        if not self.bare.trained_unimodal_heads:
            raise UserError("--method remix needs a model with trained unimodal heads")
        o = self.opt
        self.warmup = o.warmup
        self.warm = {"audio": finite("--remix-warm-audio", o.warm_audio),
                     "visual": finite("--remix-warm-visual", o.warm_visual)}
        self.gamma = {"audio": finite("--remix-gamma-audio", o.gamma_audio),
                      "visual": finite("--remix-gamma-visual", o.gamma_visual)}
        self.bare.fusion.register_forward_pre_hook(self._mask)
        self.groups: list[tuple[int, list[str]]] | None = None
        self._plan: dict[str, int] = {}  # key -> its group's mask, this epoch
        self._armed: torch.Tensor | None = None  # the step's masks, for the one fusion call
        self._keep: torch.Tensor | None = None  # the step's masks, for its loss
        self._present: list[int] = []
        self.last: dict[str, float] = {}
        self._epoch_metrics: dict[str, torch.Tensor] = {}
        self._metrics: dict[str, torch.Tensor] = {}

    # -- before an epoch: measure every training sample, build the groups --

    def start_epoch(self, ctx: EpochContext) -> None:
        self.groups, self._plan = None, {}
        if ctx.epoch < self.warmup:
            return
        if ctx.eval_batches is None:
            raise RuntimeError("--method remix needs whole-split batches (eval_batches)")
        keys, kl = self.measure(ctx.eval_batches("train"), ctx.autocast)
        if not keys:
            raise UserError("--method remix: the train split gave no samples to measure")
        chosen = remix_assign(kl).tolist()
        m = len(self.modalities)
        self.groups = [(1 << i, [k for k, c in zip(keys, chosen) if c == i])
                       for i in reversed(range(m))]  # released: the video group first
        self._plan = {k: 1 << c for k, c in zip(keys, chosen)}
        n = len(keys)
        self.last = {}
        for i, mod in enumerate(self.modalities):
            self.last[f"remix_share_{mod}"] = sum(c == i for c in chosen) / n
            self.last[f"remix_kl_{mod}"] = float(kl[:, i].mean())
        self._epoch_metrics = self._as_tensors(self.last)

    @torch.no_grad()
    def measure(self, batches, autocast) -> tuple[list[str], torch.Tensor]:
        """Every training sample's divergence per modality [N, M], gathered from all ranks, in
        key order (the model in eval mode, as released `remix`)."""
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
                    logits = {m: bare.aux_heads[m](feats[m]) for m in self.modalities}
                parts.append(torch.stack([remix_divergence(logits[m]) for m in self.modalities],
                                         dim=1).cpu())
                keys.extend(batch["key"])
        finally:
            if was_training:
                bare.train()
        local = (keys, torch.cat(parts) if parts else
                 torch.zeros(0, len(self.modalities), dtype=torch.float64))
        gathered = [local]
        if _dist.world_size() > 1:
            gathered = [None] * _dist.world_size()
            dist.all_gather_object(gathered, local)
        all_keys = [k for g in gathered for k in g[0]]
        kl = torch.cat([g[1] for g in gathered])
        order = sorted(range(len(all_keys)), key=all_keys.__getitem__)
        return [all_keys[i] for i in order], kl[torch.tensor(order, dtype=torch.long)]

    def train_groups(self):
        return self.groups

    # -- the step: one forward with the other modalities zeroed, fused + unimodal CE --

    def train_step(self, ctx: StepContext):
        keep = ctx.batch.get("keep")
        self._armed = self._keep = keep
        self._present = self._present_bits(ctx.batch, keep) if keep is not None else []
        try:
            return super().train_step(ctx)
        finally:
            self._armed = self._keep = None

    def _present_bits(self, batch: dict, keep: torch.Tensor) -> list[int]:
        """The modalities some sample of the batch keeps: from its keys and this epoch's groups
        (host only), else from the masks themselves."""
        keys = batch.get("key")
        if keys is not None and keys and all(k in self._plan for k in keys):
            union = 0
            for k in keys:
                union |= self._plan[k]
        else:
            union = 0
            for mask in keep.tolist():
                union |= int(mask)
        return [i for i in range(len(self.modalities)) if union >> i & 1]

    def _kept(self, keep: torch.Tensor) -> torch.Tensor:
        bits = torch.arange(len(self.modalities), device=keep.device)
        return (keep.unsqueeze(1) >> bits) & 1  # [B, M]

    def _mask(self, module, args):
        if self._armed is None or not module.training:
            return None
        kept = self._kept(self._armed)
        self._armed = None  # one masked fusion call per step
        (feats,) = args
        return ({m: feats[m] * kept[:, i:i + 1].to(feats[m].dtype)
                 for i, m in enumerate(self.modalities)},)

    def loss(self, logits, labels, *, epoch, step):
        loss = F.cross_entropy(logits["fused"].float(), labels)
        keep = self._keep
        if keep is None:  # the warm-up (and any batch of the data as it is)
            for m in self.modalities:
                loss = loss + self.warm[m] * F.cross_entropy(logits[m].float(), labels)
            self._metrics = dict(self._epoch_metrics)
            return loss
        kept = self._kept(keep).to(torch.float32)
        n = labels.shape[0]
        self._metrics = dict(self._epoch_metrics)
        for i, m in enumerate(self.modalities):
            each = F.cross_entropy(logits[m].float(), labels, reduction="none")
            loss = loss + self.gamma[m] * (each * kept[:, i]).sum() / n
            self._metrics[f"remix_alone_{m}"] = kept[:, i].mean()
        return loss

    def before_optimizer_step(self, logits, labels, *, epoch, step):
        if self._keep is None:
            return
        for i, m in enumerate(self.modalities):
            if i not in self._present:  # no loss of this head in the released step: no gradient
                for p in self.bare.aux_heads[m].parameters():
                    p.grad = None

    # -- log and state --

    def step_metrics(self):
        return dict(self._metrics)

    def state_dict(self) -> dict:
        return {"last": dict(self.last)}

    def load_state_dict(self, state: dict) -> None:
        self.last = dict(state.get("last") or {})
        self._epoch_metrics = self._as_tensors(self.last)
