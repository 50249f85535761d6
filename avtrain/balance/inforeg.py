"""InfoReg: slow the information-sufficient modality down during the prime learning window.

Paper: C. Huang, Y. Wei, Z. Yang, D. Hu, "Adaptive Unimodal Regulation for Balanced Multimodal
Information Acquisition", CVPR 2025 (arXiv 2503.18595). Released code: GeWu-Lab/InfoReg_CVPR2025
(commit 939b2ed), main.py: `train_epoch` (lines 231-604: the acquisition rate k from the audio
trace history 237-243, the epoch-start copy of the model 259, forward and the three CE losses
359-380, the summed backward 456-458, the scores 460-461, the regulation coefficients 465-485,
the proximal gradient 489-495, the audio encoder's Fisher trace 507-514 and 569-572, appended
595), `main` (the ten leading zeros of the trace history 694; SGD lr 0.002, momentum 0.9, wd
1e-4, StepLR 30 / 0.1, 50 epochs, batch 64: 39-45, 714-715), models/basic_model.py
(`AVClassifier`: the concat `head` on [audio; visual] features). BalanceMM has no InfoReg. No
code is copied; tests/test_inforeg_released.py checks our steps against a reference written from
the released semantics.

Before each epoch e: the encoders' parameters are copied (theta_0, the released
`global_model`), and the acquisition rate of the epochs so far is read from the history of the
trace modality's (audio) Fisher traces T_0..T_{e-1}, padded in front with W zeros (W = 10):
k = (mean of the last W - mean of the W before the last) / mean of the last W, and k = 1 at
epoch 0. k > threshold (0.05) means the information is still being acquired fast: the prime
learning window, where the regulation acts.

One step:

- one forward; loss = CE(fused) + sum_m CE(z_m), z_m the per-modality logits of the fused layer
  (concat's weight split with bias / M, as released `out_a`, `out_v`), CE the batch mean; one
  backward (the encoders and the fused layer get all three losses' gradients);
- s_m = sum over the batch of softmax(z_m)[y] (summed over all ranks in DDP);
- in the window, the modality with the strictly highest score (the information-sufficient one)
  gets beta = c_m * exp(tanh(s_m - mean of the other scores)), c_audio = 0.95 and c = 0.1 for
  the other modalities (released: 0.95 when audio leads, 0.1 when visual leads); the others and
  a tie get 0;
- grad(p) += beta_m * (p - theta_0(p)) for every parameter p of modality m's encoder (the
  gradient of a proximal term (beta/2) |p - theta_0|^2 that pulls the leader back towards where
  it started the epoch: BatchNorm affine included, as released);
- the trace modality's Fisher trace of the epoch grows by sum over its encoder's Conv/Linear
  weights of mean(grad^2), read after the proximal term (released: `fim_audio` accumulates
  grad^2 elementwise over the epoch, then each layer's mean, summed; the same sum in another
  order) -- then the optimizer step.

After the epoch the trace is appended to the history (`end_epoch`).

Options: `--inforeg-beta-audio` (0.95, line 468), `--inforeg-beta-other` (0.1, line 476),
`--inforeg-threshold` (0.05, lines 465/473), `--inforeg-window` (10: the `[-10:]` / `[-11:-1]`
slices of lines 240-241 and the ten zeros of line 694), `--inforeg-trace-modality` (audio: the
released history holds only `fim_trace_audio`). The released code has no modulation window of
its own (its `--modulation_starts/-ends` are never read): `--modulation-start/-end` do not apply.

Where we differ, and why:

- the released main.py does not run as committed: it imports `utils.utils` and
  `dataset.VGGSoundDataset`, which the repository lacks, and its trace loop over every Conv2d/
  Linear of the model multiplies the gradients of `head_audio`, `head_video`, `head2`, `fc_x`,
  `fc_y` -- layers no loss reaches, whose `.grad` is None -- so it stops at the first step; the
  rule above is what the rest of the step computes (those heads never train and are absent here);
- more than two modalities (the released rule is audio-visual): the strictly highest score leads,
  its gap is to the mean of the other scores (the released gap for two), and every modality but
  audio takes `--inforeg-beta-other`;
- k when the last window's traces are all zero (released: a ZeroDivisionError) is 0: nothing was
  acquired, nothing to regulate;
- `sum` fusion (our extension): its summands are the per-modality logits; other fusions have no
  per-modality logits that train the encoders: an error.

DDP: the losses are batch means, so the averaged gradients are the global batch's; the scores are
summed over the ranks; the proximal term and the trace read the averaged gradients, identical on
every rank. Per step nothing leaves the device (beta is a tensor; k is a number fixed before the
epoch). `state_dict` holds the trace history and the running trace, so `--resume` continues
exactly; theta_0 is taken again before the resumed epoch (the same weights).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from avprep.errors import UserError
from avtrain.models import MODALITIES
from avtrain.options import Option, Search

from . import _dist
from ._checks import fused_model, require_two_modalities, summed_fusion
from .base import Balancer, EpochContext


def inforeg_rate(history: list[float], window: int = 10) -> float:
    """The acquisition rate k before the next epoch from the trace history T_0..T_{e-1}: 1 before
    any epoch (released: `epoch == 0`), else (mean of the last `window` - mean of the `window`
    before the last) / mean of the last `window`, the history padded with `window` zeros in front
    (released main.py 237-243, 694); 0 when the last window's traces are all zero."""
    if not history:
        return 1.0
    padded = [0.0] * window + [float(t) for t in history]
    now = sum(padded[-window:]) / window
    before = sum(padded[-window - 1:-1]) / window
    if now == 0:
        return 0.0
    return (now - before) / now


def inforeg_betas(scores: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """Proximal coefficients [M] from the scores [M] and the per-modality constants c [M]: the
    strictly highest score gets c * exp(tanh(its score - mean of the others)), every other
    modality (and all at a tie for the highest) 0 (released main.py 465-485, for two)."""
    scores = scores.float()
    m = scores.numel()
    top = torch.topk(scores, 2).values
    leader = torch.argmax(scores)
    others = (scores.sum() - scores) / (m - 1)
    beta = coeffs.to(scores) * torch.exp(torch.tanh(scores - others))
    chosen = (torch.arange(m, device=scores.device) == leader) & (top[0] > top[1])
    return torch.where(chosen, beta, torch.zeros_like(beta))


def fisher_trace(weights: list[torch.Tensor]) -> torch.Tensor:
    """One step's share of the Fisher trace: sum over the layers of mean(grad^2) (0-d)."""
    return torch.stack([(w.grad.float() ** 2).mean() for w in weights]).sum()


def traced_weights(encoder: nn.Module) -> list[nn.Parameter]:
    """The weights whose squared gradients make the trace: every Conv / Linear layer's weight
    (released: the Conv2d and Linear modules of `audio_net`)."""
    return [mod.weight for mod in encoder.modules()
            if isinstance(mod, (nn.modules.conv._ConvNd, nn.Linear)) and mod.weight.requires_grad]


class InfoReg(Balancer):
    """Unimodal CE plus a proximal pull on the leading encoder while k is high (hooks +
    start_epoch)."""

    name = "inforeg"
    title = "InfoReg"
    paper = ("C. Huang, Y. Wei, Z. Yang, D. Hu, \"Adaptive Unimodal Regulation for Balanced "
             "Multimodal Information Acquisition\", CVPR 2025")
    year = 2025
    summary = "proximal pull on the leading encoder in the prime window"
    code = "GeWu-Lab/InfoReg_CVPR2025 (main.py, models/basic_model.py) @ 939b2ed"
    differences = (
        "Authors' code: main.py stops at its first step as committed (missing utils module; "
        "its trace multiplies the None gradients of heads no loss reaches); ours is the rule",
        "Authors' code: written for two modalities; for N, the strictly highest score leads, "
        "its gap to the mean of the others, non-audio modalities take --inforeg-beta-other",
        "Authors' code: k = 0 when the last window's traces are all zero (released: division "
        "by zero)",
        "Authors' code: under DDP the scores are summed over all ranks (released: one process)",
        "BalanceMM: has no InfoReg",
    )
    signals = ("inforeg_k", "inforeg_score_<m>", "inforeg_beta_<m>")
    # bench --tune: the proximal constants are its strength; the threshold decides how long the
    # prime learning window lasts
    options = (
        Option("beta_audio", float, 0.95, "proximal constant when audio leads: beta = c * "
               "exp(tanh(score gap))", minimum=0, search=Search(0.1, 5.0, log=True)),
        Option("beta_other", float, 0.1, "proximal constant when another modality (visual, "
               "text) leads", minimum=0, search=Search(0.01, 1.0, log=True)),
        Option("threshold", float, 0.05, "the regulation acts in epochs whose acquisition rate "
               "k exceeds this (the prime learning window)", minimum=0, maximum=1,
               search=Search(0.01, 0.5, log=True)),
        Option("window", int, 10, "epochs of Fisher traces averaged on each side of k",
               minimum=1),
        Option("trace_modality", str, "audio", "the modality whose encoder's Fisher trace "
               "gives k", choices=MODALITIES),
    )

    def __init__(self, model, config=None, *, modalities=None, device="cpu"):
        super().__init__(model, config, modalities=modalities, device=device)
        require_two_modalities(self.name, self.modalities)
        bare = fused_model(model, self.name)
        summed_fusion(bare, self.name, "trains the per-modality logits of the fused layer")
        if self.opt.trace_modality not in self.modalities:
            raise UserError(f"--inforeg-trace-modality {self.opt.trace_modality} is not a "
                            f"modality of this model ({', '.join(self.modalities)})")
        self.encoders = [[p for p in bare.encoders[m].parameters() if p.requires_grad]
                         for m in self.modalities]
        self.traced = traced_weights(bare.encoders[self.opt.trace_modality])
        if not self.traced:
            raise UserError(f"the {self.opt.trace_modality} encoder has no Conv or Linear "
                            "weight to take the Fisher trace of")
        self.coeffs = torch.tensor([self.opt.beta_audio if m == "audio" else
                                    self.opt.beta_other for m in self.modalities],
                                   device=self.device)
        self.history: list[float] = []  # one Fisher trace per finished epoch
        self.trace = torch.zeros((), device=self.device)  # this epoch's, so far
        self.rate = 1.0
        self.start: list[list[torch.Tensor]] = []  # theta_0: the encoders at the epoch's start
        self._metrics: dict[str, torch.Tensor] = {}

    def start_epoch(self, ctx: EpochContext) -> None:
        self.start = [[p.detach().clone() for p in params] for params in self.encoders]
        self.rate = inforeg_rate(self.history, self.opt.window)
        self.trace = torch.zeros((), device=self.device)

    def active(self) -> bool:
        return self.rate > self.opt.threshold

    def loss(self, logits, labels, *, epoch, step):
        loss = F.cross_entropy(logits["fused"].float(), labels)
        for m in self.modalities:
            loss = loss + F.cross_entropy(logits[m].float(), labels)
        return loss

    def before_optimizer_step(self, logits, labels, *, epoch, step):
        if not self.start:
            raise RuntimeError("InfoReg's step ran before start_epoch took the epoch's weights")
        index = labels.long().unsqueeze(1)
        scores = _dist.sum_(torch.stack([
            F.softmax(logits[m].detach().float(), dim=1).gather(1, index).sum()
            for m in self.modalities]))
        beta = inforeg_betas(scores, self.coeffs)
        if self.active():
            for i, params in enumerate(self.encoders):
                for p, p0 in zip(params, self.start[i]):
                    if p.grad is not None:
                        p.grad.add_(beta[i] * (p.detach() - p0))
        else:
            beta = torch.zeros_like(beta)
        grads = [w for w in self.traced if w.grad is not None]
        if grads:
            self.trace = self.trace + fisher_trace(grads)
        self._metrics = {"inforeg_k": torch.tensor(self.rate)}
        for i, m in enumerate(self.modalities):
            self._metrics[f"inforeg_score_{m}"] = scores[i]
            self._metrics[f"inforeg_beta_{m}"] = beta[i]

    def end_epoch(self, epoch: int) -> None:
        self.history.append(float(self.trace))

    def step_metrics(self):
        return dict(self._metrics)

    def state_dict(self) -> dict:
        return {"history": torch.tensor(self.history, dtype=torch.float64),
                "trace": self.trace.detach().cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        if "history" in state:
            self.history = [float(t) for t in state["history"].tolist()]
            self.trace = state["trace"].to(self.device).clone()
