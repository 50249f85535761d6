"""OLM and OLM-com: online logit modulation (Zong et al., IJCAI 2024).

Every branch k (each modality, then the fusion) gets a learnable scalar w_k (init 1, its own
Adam). The network trains on sum_k CE(w_k * s_k, y). After `backward()`, a second objective
pulls each branch's scaled logit norm n_k = w_k * ||s_k|| (per sample, logits detached)
towards t_k = mean_k(n_k) * r_k, with the L1 distance summed over samples and branches (as
the released code); its gradient joins the CE gradient already in w, and w's Adam steps right
after the network's optimizer. The ratio r says which branch should speak louder:

- `olm`: r_k = lambda_k / mean(lambda), lambda_k = L_k(now) / L_k(initial): a branch whose
  loss fell less than the others' gets larger logits;
- `olm_com`: with a held-out (val) batch, G_k = L_k^val(init) - L_k^val(now) (generalisation),
  O_k = (L_k^train(init) - L_k^train(now)) - G_k (over-fitting), r = softmax(G' / O') with
  G' = max(G, 1e-6) and O' = max(O, 1e-6).

Initial losses are the mean over the first epoch (r uses now == initial, i.e. uniform, until
then); `olm_initial="last-batch"` keeps the released code's last batch of epoch 0. In DDP the
loss vectors are averaged over ranks before r is computed and w's gradient is averaged, so
every rank holds the same w.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from avprep.errors import UserError

from . import _dist
from ._checks import choice, number, require_two_modalities
from .base import Balancer

CLAMP = 1e-6


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
    rule = "olm"
    trained_unimodal_heads = True

    def __init__(self, model, config=None, *, modalities=None, device="cpu"):
        super().__init__(model, config, modalities=modalities, device=device)
        c = self.config
        require_two_modalities(self.name, self.modalities)
        self.initial = choice(c, "olm_initial", "mean", ("mean", "last-batch"))
        lr = number(c, "olm_lr", 1e-3)
        if lr < 0:
            raise UserError(f"--olm-lr must be 0 or more, got {lr}")
        self.branches = [*self.modalities, "fused"]
        k = len(self.branches)
        self.weights = torch.ones(k, device=self.device, requires_grad=True)
        self.optimizer = torch.optim.Adam([self.weights], lr=lr)
        zeros = torch.zeros(k, device=self.device)
        self.have_initial = False
        self.init_train: torch.Tensor | None = None
        self.init_val: torch.Tensor | None = None
        self.sum_train, self.n_train = zeros.clone(), 0
        self.sum_val, self.n_val = zeros.clone(), 0
        self.last_train: torch.Tensor | None = None
        self.last_val: torch.Tensor | None = None
        self.val_now: torch.Tensor | None = None  # latest held-out losses (this rank)
        self._losses: torch.Tensor | None = None
        self._norms: torch.Tensor | None = None
        self._metrics: dict[str, torch.Tensor] = {}

    # -- the step --

    def _branch_losses(self, logits, labels, weights) -> torch.Tensor:
        return torch.stack([F.cross_entropy(weights[i] * logits[b].float(), labels)
                            for i, b in enumerate(self.branches)])

    def loss(self, logits, labels, *, epoch, step):
        self.weights.grad = None
        losses = self._branch_losses(logits, labels, self.weights)
        self._losses = losses.detach()
        self._norms = torch.stack([logits[b].detach().float().norm(dim=1)
                                   for b in self.branches], dim=1)  # [B, K]
        return losses.sum()

    def before_optimizer_step(self, logits, labels, *, epoch, step):
        if self._losses is None or self._norms is None:
            raise RuntimeError(f"{self.name}: loss() must run before before_optimizer_step()")
        k = len(self.branches)
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
        r = self._ratios(train_now, val_now)
        norms = self.weights.unsqueeze(0) * self._norms
        target = (norms.mean(dim=1, keepdim=True) * r.unsqueeze(0)).detach()
        # the released code sums over the batch; x world size keeps that sum global in DDP
        ((norms - target).abs().sum() * _dist.world_size()).backward()
        _dist.mean_(self.weights.grad)
        self._metrics = self._make_metrics(r, train_now, val_now)
        self._losses = self._norms = None

    def _ratios(self, train_now, val_now) -> torch.Tensor:
        init = self.init_train if self.have_initial else train_now
        return olm_ratios("olm", train_now, init)

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
    rule = "olm_com"
    needs_heldout = True

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
        with torch.no_grad():
            self.val_now = self._branch_losses(logits, labels, self.weights.detach())

    def _ratios(self, train_now, val_now) -> torch.Tensor:
        if not self.have_initial:
            # uniform, as the released code (initial == now gives softmax of equal values)
            return olm_ratios("olm_com", train_now, train_now, train_now, train_now)
        if val_now is None:  # no held-out batch seen yet in this process: G = 0
            val_now = self.init_val
        return olm_ratios("olm_com", train_now, self.init_train, val_now, self.init_val)

    def _initial_val(self) -> torch.Tensor | None:
        if self.n_val:
            if self.initial == "mean":
                return self.sum_val / self.n_val
            return self.last_val.clone()
        if self.val_now is None:
            raise RuntimeError("olm_com saw no held-out batch in its first epoch; the loop must "
                               "call heldout() every step")
        return _dist.mean_(self.val_now.clone())
