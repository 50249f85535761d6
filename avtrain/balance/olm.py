"""OLM and OLM-com: online logit modulation.

Paper: D. Zong, C. Ding, B. Li, J. Li, K. Zheng, Q. Zhou, "Balancing Multimodal Learning via
Online Logit Modulation", IJCAI 2024. Released code: github.com/anonymous-gitlab/OLM (commit
c4a4244): engines/engine_logits.py and engine_logits_com.py (ResNet-18 audio-visual models),
engines/engine_trans_logits*.py (MER transformers), losses/loss.py (CE, reduction `sum`),
main_logits*.py / main_trans_logits*.py and scripts/run_*.sh (optimizers, batch sizes).
No code is copied; this module follows those files step for step, and
tests/test_olm_released.py checks it against a reference step written from them.

Every branch k (each modality, then the fusion) gets a learnable scalar w_k (init 1, its own
Adam). One step, in the released order:

1. forward the training batch; (`olm_com`) forward a held-out batch with the same weights;
2. network loss sum_k CE(w_k * s_k, y), CE summed over the batch (`olm_reduction`, below);
3. backward;
4. coefficient loss: n_k = w_k * ||s_k|| per sample (logits detached), target
   t_k = mean_k(n_k) * r_k (detached); L1(n, t) summed over samples and branches; backward --
   its gradient joins the CE gradient that step 3 left in w;
5. the network's optimizer steps, then w's Adam.

The ratio r says which branch should speak louder:

- `olm`: r_k = lambda_k / mean(lambda), lambda_k = L_k(now) / L_k(initial): a branch whose
  loss fell less than the others' gets larger logits;
- `olm_com`: with a held-out (val) batch, G_k = L_k^val(init) - L_k^val(now) (generalisation),
  O_k = (L_k^train(init) - L_k^train(now)) - G_k (over-fitting), r = softmax(G' / O') with
  G' = max(G, 1e-6) and O' = max(O, 1e-6). (This r sums to 1, olm's to K: as released.)

The losses in r are the released code's: weighted CE summed over the (global) batch.

Options (config keys; flags `--olm-...`):

- `olm_reduction` (sum | mean, default sum): the released network loss sums CE over the
  batch, so its gradient is batch-size times the mean's. `sum` is the released network
  update; under the OLM recipe (Adam 1e-4, weight decay 2e-4) only it equals the released step
  (Adam is nearly scale-free, but its L2 term is not). With SGD the sum multiplies the
  effective learning rate by the global batch size; at the toolkit's SGD lr 1e-3 and batch 64
  that trained better than the mean in our measurement (docs/balancing.md), so `sum` stays the default
  with SGD too; `mean` is for SGD runs whose lr was tuned for a mean loss or whose global
  batch is large. Either way w's gradient is the released one: its CE part is always the
  batch sum. In DDP the sums are global: the
  network loss is scaled by the world size (DDP averages gradients), and w's gradient is the
  mean over ranks of world-size-scaled local sums.
- `olm_initial` (mean | last-batch, default mean): the released code records the initial
  losses on every batch of epoch 0 (`iteration == 0` is the epoch index), so r is uniform for
  the whole first epoch and the initial losses are those of the *last batch* of epoch 0:
  `last-batch` is that. The default `mean` takes the mean over epoch 0 (r uniform until then,
  as released) because one batch is a noisy reference, and with our resampled streams an
  arbitrary one (DESIGN §5); set `last-batch` to reproduce the released run.
- `olm_lr`, `olm_weight_decay` (default None): w's Adam. None means the released choice for
  the model family: Adam(lr 1e-3, no decay) for the CNN models (main_logits*.py), Adam(lr =
  the network's lr, weight decay = the network's) for emt/mbt/umt/ca (main_trans_logits*.py:
  1e-4 / 2e-4 in its scripts).
- `olm_heldout` (train | eval, default train; read by the loop): the released held-out forward
  runs the model in train mode on batches with train transforms (BatchNorm batch statistics,
  running statistics updated, dropout, augmentation); `eval` keeps the model in eval mode with
  no augmentation, so val data never enters the BatchNorm running statistics. Either way the
  batch comes from `val`, never `test` (the released code draws it from the held-out fold of
  its 5-fold split of train+val, engine_logits_com.py / datasets/*_dataset.py).

In DDP the loss vectors are averaged over ranks before r is computed and w's gradient is
averaged, so every rank holds the same w.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from avprep.errors import UserError
from avtrain.options import Option, Search

from . import _dist
from ._checks import number, require_two_modalities
from .base import Balancer

CLAMP = 1e-6
REDUCTIONS = ("sum", "mean")


# w's Adam for the CNN encoders, as released (main_logits.py: Adam(lr=0.001), no decay)
CNN_COEFFICIENT_LR, CNN_COEFFICIENT_WEIGHT_DECAY = 1e-3, 0.0


def _declared(config: dict, name: str):
    """OLM's option `name` from a config dict (`method_options`, else the flat `olm_NAME`),
    checked by its declaration; the declared default when absent."""
    opt = next(o for o in OLM.options if o.name == name)
    value = (config.get("method_options") or {}).get(name)
    if value is None:
        value = config.get(opt.key(OLM.prefix()))
    return opt.coerce(opt.default if value is None else value, opt.flag_name(OLM.prefix()))


def olm_reduction(config: dict) -> str:
    """`sum` (released, the default) or `mean`: the network loss's reduction over the batch."""
    return _declared(config, "reduction")


def coefficient_optimizer_settings(config: dict) -> tuple[float, float]:
    """(lr, weight decay) of w's Adam: given, else the released choice for the model family
    (the network's own for the transformers, main_trans_logits.py)."""
    from avtrain.models import SEQUENCE_MODELS

    transformer = config.get("model") in SEQUENCE_MODELS
    lr, wd = _declared(config, "lr"), _declared(config, "weight_decay")
    if lr is None:
        lr = number(config, "lr", 1e-3) if transformer else CNN_COEFFICIENT_LR
    if wd is None:
        wd = number(config, "weight_decay", 1e-4) if transformer else CNN_COEFFICIENT_WEIGHT_DECAY
    return lr, wd


def olm_ratios(rule: str, train_now: torch.Tensor, train_init: torch.Tensor,
               val_now: torch.Tensor | None = None,
               val_init: torch.Tensor | None = None) -> torch.Tensor:
    """OLM's target ratios r, one per branch in the order of the loss vectors.

    `rule` is "olm" (train losses only) or "olm_com" (needs the held-out losses as well);
    the formulas are in the module docstring. Pure tensor arithmetic: no host sync.
    """
    now = torch.as_tensor(train_now, dtype=torch.float32)
    init = torch.as_tensor(train_init, dtype=torch.float32, device=now.device)
    if rule == "olm":
        lam = now / init
        return lam / lam.mean()
    if rule == "olm_com":
        if val_now is None or val_init is None:
            raise UserError("olm_com needs held-out (val) losses, now and initial")
        vnow = torch.as_tensor(val_now, dtype=torch.float32, device=now.device)
        vinit = torch.as_tensor(val_init, dtype=torch.float32, device=now.device)
        gen = vinit - vnow
        over = (init - now) - gen
        return torch.softmax(gen.clamp_min(CLAMP) / over.clamp_min(CLAMP), dim=-1)
    raise UserError(f"unknown OLM rule {rule!r}; choose olm or olm_com")


class OLM(Balancer):
    """Learns one logit scale per branch so that the branches' logit norms follow r."""

    name = "olm"
    title = "OLM"
    paper = ("D. Zong, C. Ding, B. Li, J. Li, K. Zheng, Q. Zhou, \"Balancing Multimodal Learning "
             "via Online Logit Modulation\", IJCAI 2024")
    year = 2024
    summary = "learns one logit scale per branch from its loss ratio"
    code = ("anonymous-gitlab/OLM (engines/engine_logits.py, losses/loss.py, main_logits.py, "
            "main_trans_logits.py) @ c4a4244")
    differences = (
        "Authors' code: initial losses are the mean over epoch 0 (released: its last batch; "
        "--olm-initial last-batch)",
        "Authors' code: --olm-reduction mean is ours (released: CE summed over the batch)",
        "Authors' code: under DDP the losses are averaged over the ranks and the sums kept "
        "global (released: one process)",
        "BalanceMM: has no OLM",
    )
    signals = ("w_<branch>", "r_<branch>", "loss_<branch>")
    # bench --tune: the coefficients' lr is how fast the loss weights follow the learning
    # speeds, the method's one strength (initial/reduction/heldout are variants)
    options = (
        Option("initial", str, "mean", "initial losses: mean over the first epoch, or "
               "last-batch (its last batch, as released)", choices=("mean", "last-batch"),
               released="last-batch", differs="one batch is a noisy reference; r is uniform "
               "for the first epoch either way (the recipes set last-batch)"),
        Option("lr", float, None, "learning rate of the coefficients' Adam", minimum=0,
               none_means="1e-3 for the CNN encoders; --lr for emt/mbt/umt/ca, as released",
               search=Search(1e-4, 1e-2, log=True)),
        Option("weight_decay", float, None, "weight decay of the coefficients' Adam", minimum=0,
               none_means="0 for the CNN encoders; --weight-decay for emt/mbt/umt/ca, as "
               "released"),
        Option("reduction", str, "sum", "the network loss's CE over the batch: sum (released) "
               "or mean", choices=REDUCTIONS),
    )
    option_prefix = "olm"
    rule = "olm"
    trained_unimodal_heads = True

    def __init__(self, model, config=None, *, modalities=None, device="cpu"):
        super().__init__(model, config, modalities=modalities, device=device)
        require_two_modalities(self.name, self.modalities)
        self.initial = self.opt.initial
        self.reduction = self.opt.reduction
        self.coefficient_lr, self.coefficient_weight_decay = coefficient_optimizer_settings(
            self.config)
        self.branches = [*self.modalities, "fused"]
        k = len(self.branches)
        self.weights = torch.ones(k, device=self.device, requires_grad=True)
        self.optimizer = torch.optim.Adam([self.weights], lr=self.coefficient_lr,
                                          weight_decay=self.coefficient_weight_decay)
        zeros = torch.zeros(k, device=self.device)
        self.have_initial = False
        self.init_train: torch.Tensor | None = None
        self.init_val: torch.Tensor | None = None
        self.sum_train, self.n_train = zeros.clone(), 0
        self.sum_val, self.n_val = zeros.clone(), 0
        self.last_train: torch.Tensor | None = None
        self.last_val: torch.Tensor | None = None
        self.val_now: torch.Tensor | None = None  # latest held-out losses (this rank)
        self._batch = 0  # this rank's training batch size
        self._val_batch = 0  # this rank's held-out batch size
        self._losses: torch.Tensor | None = None
        self._norms: torch.Tensor | None = None
        self._metrics: dict[str, torch.Tensor] = {}

    # -- the step --

    def _branch_losses(self, logits, labels, weights) -> torch.Tensor:
        """[K] weighted CE summed over this rank's batch (losses/loss.py's CELoss)."""
        return torch.stack([F.cross_entropy(weights[i] * logits[b].float(), labels,
                                            reduction="sum")
                            for i, b in enumerate(self.branches)])

    def loss(self, logits, labels, *, epoch, step):
        self.weights.grad = None
        n = labels.numel()
        sums = self._branch_losses(logits, labels, self.weights)
        self._batch = n
        self._losses = sums.detach() / n  # per-sample means: what is logged and checkpointed
        self._norms = torch.stack([logits[b].detach().float().norm(dim=1)
                                   for b in self.branches], dim=1)  # [B, K]
        if self.reduction == "mean":
            return sums.sum() / n
        # DDP averages the ranks' gradients; x world size makes them the global batch's sum
        return sums.sum() * _dist.world_size()

    def before_optimizer_step(self, logits, labels, *, epoch, step):
        if self._losses is None or self._norms is None:
            raise RuntimeError(f"{self.name}: loss() must run before before_optimizer_step()")
        k, world = len(self.branches), _dist.world_size()
        grad = self.weights.grad
        if grad is not None and self.reduction == "mean":
            grad.mul_(self._batch * world)  # w's CE gradient is the batch sum's, as released
        val = self.val_now
        packed = self._losses if val is None else torch.cat([self._losses, val])
        packed = _dist.mean_(packed.clone())
        train_now = packed[:k]
        val_now = None if val is None else packed[k:]
        if not self.have_initial:
            self.sum_train += train_now
            self.n_train += 1
            self.last_train = train_now
            if val_now is not None:
                self.sum_val += val_now
                self.n_val += 1
                self.last_val = val_now
        r = self._ratios(train_now, val_now, self._batch * world,
                         (self._val_batch or self._batch) * world)
        norms = self.weights.unsqueeze(0) * self._norms
        target = (norms.mean(dim=1, keepdim=True) * r.unsqueeze(0)).detach()
        # the released code sums over the batch; x world size keeps that sum global in DDP
        ((norms - target).abs().sum() * world).backward()
        _dist.mean_(self.weights.grad)
        self._metrics = self._make_metrics(r, train_now, val_now)
        self._losses = self._norms = None

    def _ratios(self, train_now, val_now, batch, val_batch) -> torch.Tensor:
        """r from per-sample mean losses; x the global batch sizes gives the released sums."""
        init = self.init_train if self.have_initial else train_now
        return olm_ratios("olm", train_now * batch, init * batch)

    def after_optimizer_step(self):
        self.optimizer.step()
        self.weights.grad = None

    def end_epoch(self, epoch):
        if self.have_initial or self.n_train == 0:
            return
        if self.initial == "mean":
            self.init_train = self.sum_train / self.n_train
        else:
            self.init_train = self.last_train.clone()
        self.init_val = self._initial_val()
        self.have_initial = True

    def _initial_val(self) -> torch.Tensor | None:
        return None

    def _make_metrics(self, r, train_now, val_now) -> dict[str, torch.Tensor]:
        w = self.weights.detach().clone()
        out = {}
        for i, b in enumerate(self.branches):
            out[f"w_{b}"] = w[i]
            out[f"r_{b}"] = r[i]
            out[f"loss_{b}"] = train_now[i]
            if val_now is not None:
                out[f"val_loss_{b}"] = val_now[i]
        return out

    def step_metrics(self):
        """w_<branch> (the weights this step's loss used), r_<branch>, loss_<branch> (the
        weighted CE, averaged over ranks) and, for olm_com, val_loss_<branch>."""
        return dict(self._metrics)

    # -- checkpoints --

    def state_dict(self) -> dict:
        def keep(t):
            return None if t is None else t.detach().clone()

        return {
            "method": self.name, "branches": list(self.branches),
            "weights": keep(self.weights), "optimizer": self.optimizer.state_dict(),
            "olm_initial": self.initial, "have_initial": self.have_initial,
            "init_train": keep(self.init_train), "init_val": keep(self.init_val),
            "sum_train": keep(self.sum_train), "n_train": self.n_train,
            "sum_val": keep(self.sum_val), "n_val": self.n_val,
            "last_train": keep(self.last_train), "last_val": keep(self.last_val),
            "val_now": keep(self.val_now),
        }

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return  # a checkpoint of a method without state: start OLM fresh
        if state.get("method") != self.name or list(state.get("branches", [])) != self.branches:
            raise UserError(f"the checkpoint's balancer state is for "
                            f"{state.get('method')!r} with branches {state.get('branches')}, "
                            f"not {self.name!r} with {self.branches}")

        def put(t):
            return None if t is None else torch.as_tensor(t).to(self.device, torch.float32).clone()

        with torch.no_grad():
            self.weights.copy_(put(state["weights"]))
        self.optimizer.load_state_dict(state["optimizer"])
        self.have_initial = bool(state["have_initial"])
        self.init_train, self.init_val = put(state["init_train"]), put(state["init_val"])
        self.sum_train, self.n_train = put(state["sum_train"]), int(state["n_train"])
        self.sum_val, self.n_val = put(state["sum_val"]), int(state["n_val"])
        self.last_train, self.last_val = put(state["last_train"]), put(state["last_val"])
        self.val_now = put(state["val_now"])


class OLMCom(OLM):
    """OLM whose ratios weigh each branch's generalisation against its over-fitting, measured
    on a held-out batch from `val` every step."""

    name = "olm_com"
    title = "OLM-com"
    summary = "OLM with ratios of held-out generalisation to over-fitting"
    code = ("anonymous-gitlab/OLM (engines/engine_logits_com.py, losses/loss.py, "
            "main_logits_com.py, main_trans_logits_com.py) @ c4a4244")
    differences = (
        *OLM.differences[:3],
        "Authors' code: the held-out batch comes from val (released: the held-out fold of its "
        "5-fold split of train+val)",
        *OLM.differences[3:],
    )
    signals = (*OLM.signals, "val_loss_<branch>")
    options = (
        *OLM.options,
        Option("heldout", str, "train", "the held-out forward: train (train mode and "
               "augmentation, as released) or eval (eval mode, no augmentation)",
               choices=("train", "eval")),
    )
    rule = "olm_com"
    needs_heldout = True

    @property
    def heldout_train_mode(self) -> bool:
        return self.opt.heldout == "train"

    def __init__(self, model, config=None, *, modalities=None, device="cpu"):
        super().__init__(model, config, modalities=modalities, device=device)
        c = self.config
        val, test = c.get("val_split", "val"), c.get("test_split", "test")
        if not val or val == test or val == "test":
            raise UserError(f"--method olm_com needs a validation split for its held-out batches,"
                            f" never the test split (val split: {val!r})")
        if c.get("val_samples") == 0:
            raise UserError(f"--method olm_com needs held-out batches, but the {val!r} split "
                            "is empty")

    def heldout(self, logits, labels):
        """This step's held-out losses, with this step's w (call before the step, as released)."""
        with torch.no_grad():
            n = labels.numel()
            self._val_batch = n
            self.val_now = self._branch_losses(logits, labels, self.weights.detach()) / n

    def _ratios(self, train_now, val_now, batch, val_batch) -> torch.Tensor:
        if not self.have_initial:
            # uniform, as the released code (initial == now gives softmax of equal values)
            return olm_ratios("olm_com", train_now, train_now, train_now, train_now)
        if val_now is None:  # no held-out batch seen yet in this process: G = 0
            val_now = self.init_val
        return olm_ratios("olm_com", train_now * batch, self.init_train * batch,
                          val_now * val_batch, self.init_val * val_batch)

    def _initial_val(self) -> torch.Tensor | None:
        if self.n_val:
            if self.initial == "mean":
                return self.sum_val / self.n_val
            return self.last_val.clone()
        if self.val_now is None:
            raise RuntimeError("olm_com saw no held-out batch in its first epoch; the loop must "
                               "call heldout() every step")
        return _dist.mean_(self.val_now.clone())
