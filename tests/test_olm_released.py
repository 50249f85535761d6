"""OLM / OLM-com against the released code's training step (differential tests).

The reference below is written in plain torch from the released code's semantics (Zong et al.,
IJCAI 2024; github.com/anonymous-gitlab/OLM: engines/engine_logits.py and
engine_logits_com.py for the step, losses/loss.py for CE with reduction `sum`,
main_logits*.py for the optimizers, models/basic_model.py and models/fusion_modules.py for
AVClassifier): no avtrain import. avtrain runs its real path: `Trainer.train_step` of
avtrain/loop.py (the function `avtrain fit` calls per batch) with a real tiny model, the
balancer and the optimizer `Trainer` builds. After 4 steps (2 in epoch 0, which records the
initial losses, 2 in epoch 1) the two agree to 1e-6: parameters, BatchNorm statistics, OLM's
weights and both optimizers' states, under the OLM recipe (Adam 1e-4, weight decay 2e-4).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from released import WIDTH, as_batch, ref_trunk, run_gloo, step_trainer
from released import make_batches as _make_batches
from torch import nn

CLASSES, BATCH = 3, 4
STEPS = ((0, 2), (1, 2))  # (epoch, steps)
TOL = {"rtol": 1e-6, "atol": 1e-6}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- the reference: the released code's semantics, in plain torch ------------------------------


class RefConcat(nn.Module):  # fusion_modules.ConcatFusion
    def __init__(self, dim, n):
        super().__init__()
        self.fc_out = nn.Linear(2 * dim, n)
        self.o_x = nn.Linear(dim, n)
        self.o_y = nn.Linear(dim, n)

    def forward(self, x, y):
        return self.o_x(x), self.o_y(y), self.fc_out(torch.cat((x, y), dim=1))


class RefBilinear(nn.Module):  # fusion_modules.Bilinear (its o_x reads the video features)
    def __init__(self, dim, n):
        super().__init__()
        self.tucker_a = nn.Linear(dim, dim)
        self.tucker_v = nn.Linear(dim, dim)
        self.classifier = nn.Linear(dim, n)
        self.o_x = nn.Linear(dim, n)
        self.o_y = nn.Linear(dim, n)

    def forward(self, audio, video):
        fused = self.tucker_v(video) * self.tucker_a(audio)
        return self.o_y(audio), self.o_x(video), self.classifier(fused)


class RefAVClassifier(nn.Module):
    """models/basic_model.py AVClassifier with tiny trunks: visual frames folded into the
    batch, features pooled over (T, H, W) with adaptive_avg_pool3d, fusion(audio, visual)."""

    def __init__(self, fusion: str, bn: bool = True):
        super().__init__()
        self.audio_net = ref_trunk(1, bn)
        self.visual_net = ref_trunk(3, bn)
        dim = 2 * WIDTH
        self.fusion_module = (RefConcat if fusion == "concat" else RefBilinear)(dim, CLASSES)

    def forward(self, audio, visual):  # audio [B, 1, F, T]; visual [B, T, 3, H, W]
        b, t = visual.shape[:2]
        a = F.adaptive_avg_pool2d(self.audio_net(audio), 1).flatten(1)
        v = self.visual_net(visual.reshape(b * t, *visual.shape[2:]))
        c, h, w = v.shape[1:]
        v = v.view(b, t, c, h, w).permute(0, 2, 1, 3, 4)
        v = F.adaptive_avg_pool3d(v, 1).flatten(1)
        return self.fusion_module(a, v)  # audio, visual, fused logits


def ref_train(model, method, data, heldout, world_scale=1):
    """engine_logits(_com).train_or_eval_model(train=True) over STEPS, `iteration` = epoch."""
    ce = nn.CrossEntropyLoss(reduction="sum")  # losses/loss.py CELoss
    weights = nn.Parameter(torch.tensor([1.0, 1.0, 1.0]))  # order: visual, audio, fused
    opt_logits = torch.optim.Adam([weights], lr=0.001)  # main_logits*.py
    opt_net = torch.optim.Adam(model.parameters(), lr=1e-4, weight_decay=2e-4)
    model.train()
    step = 0
    for iteration, steps in STEPS:
        for _ in range(steps):
            (audio, visual, y), (e_audio, e_visual, e_y) = data[step], heldout[step]
            out_a, out_v, out_b = model(audio, visual)
            if method == "olm_com":
                ev_a, ev_v, ev_b = model(e_audio, e_visual)  # train mode, as released
            logits = torch.stack([out_v, out_a, out_b])
            loss_v = ce(weights[0] * out_v, y)
            loss_a = ce(weights[1] * out_a, y)
            loss_b = ce(weights[2] * out_b, y)
            loss = loss_v + loss_a + loss_b
            now = torch.stack([loss_v, loss_a, loss_b]).detach()
            if method == "olm_com":
                e_now = torch.stack([ce(weights[0] * ev_v, e_y), ce(weights[1] * ev_a, e_y),
                                     ce(weights[2] * ev_b, e_y)]).detach()
            if iteration == 0:
                model.train_initial_loss = now
                if method == "olm_com":
                    model.eval_initial_loss = e_now
            opt_net.zero_grad()
            opt_logits.zero_grad()
            loss.backward()
            norms = torch.stack([weights[i] * torch.norm(lg, dim=-1).detach()
                                 for i, lg in enumerate(logits)], dim=-1)
            if method == "olm":
                ratio = now / model.train_initial_loss
                rt = ratio / ratio.mean()
            else:
                gen = model.eval_initial_loss - e_now
                conv = model.train_initial_loss - now - gen
                rt = torch.softmax(torch.clamp(gen, 1e-6) / torch.clamp(conv, 1e-6), dim=-1)
            target = (norms.mean(-1).detach().unsqueeze(-1) @ rt.unsqueeze(0)).detach()
            torch.abs(norms - target).sum().backward()
            opt_net.step()
            opt_logits.step()
            step += 1
    return weights, opt_net, opt_logits


# --- shared data and the avtrain side ------------------------------------------------------------


def make_batches(seed: int, n: int = BATCH):
    return _make_batches(seed, n, sum(s for _, s in STEPS), CLASSES)


def ours(method: str, fusion: str, bn: bool = True, **settings):
    """The real Trainer under the OLM recipe (Adam 1e-4, weight decay 2e-4, last-batch)."""
    return step_trainer(method, fusion, CLASSES, bn=bn, **{
        "optimizer": "adam", "lr": 1e-4, "weight_decay": 2e-4, "scheduler": "none",
        "olm_initial": "last-batch", **settings})


def train_ours(t, data, heldout, part=slice(None)):
    step = 0
    for epoch, steps in STEPS:
        for _ in range(steps):
            batch = as_batch(data[step], part)
            held = None
            if t.balancer.needs_heldout:
                held = iter([as_batch(heldout[step], part)])
            t.train_step(batch, epoch, held)
            t.step += 1
            step += 1
        t.scheduler.step()
        t.balancer.end_epoch(epoch)


def name_map(fusion: str) -> dict[str, str]:
    """avtrain state-dict name -> reference name (same layers, other names)."""
    heads = ({"aux_heads.audio": "fusion_module.o_x", "aux_heads.visual": "fusion_module.o_y",
              "fusion.fc_out": "fusion_module.fc_out"} if fusion == "concat" else
             {"aux_heads.audio": "fusion_module.o_y", "aux_heads.visual": "fusion_module.o_x",
              "fusion.proj_first": "fusion_module.tucker_a",
              "fusion.proj_second": "fusion_module.tucker_v",
              "fusion.fc_out": "fusion_module.classifier"})
    heads.update({"encoders.audio.backbone": "audio_net", "encoders.visual.backbone": "visual_net"})
    return heads


def ref_name(name: str, fusion: str) -> str:
    for mine, theirs in name_map(fusion).items():
        if name.startswith(mine + "."):
            return theirs + name[len(mine):]
    raise KeyError(name)


def reference_like(t, fusion: str, bn: bool = True) -> RefAVClassifier:
    ref = RefAVClassifier(fusion, bn)
    state = {ref_name(k, fusion): v.clone() for k, v in t.model.state_dict().items()}
    ref.load_state_dict(state)  # strict: every parameter and buffer maps one to one
    return ref


PERM = [1, 0, 2]  # reference order (visual, audio, fused) -> ours (audio, visual, fused)


def compare(t, ref, weights, opt_net, opt_logits, fusion: str, **tol) -> None:
    tol = tol or TOL
    ref_state = ref.state_dict()
    for name, value in t.model.state_dict().items():
        torch.testing.assert_close(value, ref_state[ref_name(name, fusion)], **tol, msg=name)
    torch.testing.assert_close(t.balancer.weights.detach(), weights.detach()[PERM], **tol)
    ref_params = dict(ref.named_parameters())
    for name, p in t.model.named_parameters():
        mine, theirs = t.optimizer.state[p], opt_net.state[ref_params[ref_name(name, fusion)]]
        assert float(mine["step"]) == float(theirs["step"]) == 4
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(mine[key], theirs[key], **tol, msg=f"{name} {key}")
    mine = t.balancer.optimizer.state[t.balancer.weights]
    theirs = opt_logits.state[weights]
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(mine[key], theirs[key][PERM], **tol, msg=key)
    assert t.balancer.optimizer.param_groups[0]["lr"] == opt_logits.param_groups[0]["lr"]
    assert t.balancer.optimizer.param_groups[0]["weight_decay"] == 0


# --- one process -------------------------------------------------------------------------------


@pytest.mark.parametrize("fusion", ["concat", "bilinear"])
@pytest.mark.parametrize("method", ["olm", "olm_com"])
def test_three_plus_steps_equal_the_released_step(method, fusion):
    torch.manual_seed(0)
    t = ours(method, fusion)
    ref = reference_like(t, fusion)
    data, held = make_batches(1), make_batches(2)
    weights, opt_net, opt_logits = ref_train(ref, method, data, held)
    train_ours(t, data, held)
    compare(t, ref, weights, opt_net, opt_logits, fusion)
    # it really did something: w moved, and in epoch 1 r was no longer uniform
    assert not torch.allclose(t.balancer.weights.detach(), torch.ones(3))
    m = t.balancer.step_metrics()
    assert len({round(float(m[f"r_{b}"]), 6) for b in ("audio", "visual", "fused")}) > 1


def test_the_old_choices_differ_from_the_released_step():
    """mean reduction, eval-mode held-out forwards and mean initial losses are options: each
    changes the step, so the test above really pins the released choices down."""
    data, held = make_batches(1), make_batches(2)
    for method, settings in (("olm_com", {"olm_reduction": "mean"}),
                             ("olm_com", {"olm_heldout": "eval"})):
        torch.manual_seed(0)
        t = ours(method, "concat", **settings)
        ref = reference_like(t, "concat")
        weights, *_ = ref_train(ref, method, data, held)
        train_ours(t, data, held)
        differs = not torch.allclose(t.balancer.weights.detach(), weights.detach()[PERM],
                                     rtol=1e-6, atol=1e-6)
        differs = differs or any(
            not torch.allclose(v, ref.state_dict()[ref_name(k, "concat")], rtol=1e-6,
                               atol=1e-6) for k, v in t.model.state_dict().items())
        assert differs, settings
    # initial losses: the mean of epoch 0 vs its last batch give other r (w's L1 gradient is a
    # sign, so 2 steps may not show it in w)
    rs = []
    for initial in ("mean", "last-batch"):
        torch.manual_seed(0)
        t = ours("olm", "concat", olm_initial=initial)
        train_ours(t, data, held)
        rs.append(torch.stack([t.balancer.step_metrics()[f"r_{b}"]
                               for b in ("audio", "visual", "fused")]))
    assert not torch.allclose(rs[0], rs[1], rtol=1e-6, atol=1e-6)


def test_defaults_follow_the_released_optimizers():
    from avtrain.balance.olm import coefficient_optimizer_settings, olm_reduction

    assert olm_reduction({}) == "sum"  # losses/loss.py: CrossEntropyLoss(reduction="sum")
    assert olm_reduction({"olm_reduction": "mean"}) == "mean"
    # main_logits*.py: Adam([w], lr=0.001); main_trans_logits*.py: Adam([w], lr, l2)
    assert coefficient_optimizer_settings({"model": "resnet18", "lr": 1e-4,
                                           "weight_decay": 2e-4}) == (1e-3, 0.0)
    assert coefficient_optimizer_settings({"model": "emt", "lr": 1e-4,
                                           "weight_decay": 2e-4}) == (1e-4, 2e-4)
    assert coefficient_optimizer_settings({"model": "emt", "lr": 1e-4, "olm_lr": 0.01,
                                           "olm_weight_decay": 0}) == (0.01, 0.0)


@pytest.mark.parametrize("flags,words", [
    # choices are click's: its usage lines, then one Error line
    (["--olm-reduction", "max"], "Invalid value for '--olm-reduction'"),
    (["--olm-heldout", "test"], "Invalid value for '--olm-heldout'"),
    (["--olm-weight-decay", "-1"], "--olm-weight-decay must be 0 or more"),
    (["--olm-lr", "-0.5"], "--olm-lr must be 0 or more"),
])
def test_bad_olm_options_are_one_error_line(tmp_path, flags, words):
    from click.testing import CliRunner

    from cli import avtrain

    result = CliRunner().invoke(avtrain, ["fit", "--shards", str(tmp_path), "--run-dir",
                                          str(tmp_path / "run"), "--method", "olm", *flags])
    assert result.exit_code != 0
    lines = [x for x in result.output.splitlines() if x.strip()]
    if not words.startswith("Invalid value"):  # ours: the Error line alone
        assert len(lines) == 1, result.output
    assert lines[-1].startswith("Error:") and words in lines[-1], result.output
    assert "Traceback" not in result.output


# --- two gloo processes == one process with the global batch ------------------------------------


def _ddp_run(rank: int, world: int) -> dict:
    results = {}
    data, held = make_batches(1, 2 * BATCH), make_batches(2, 2 * BATCH)
    for method in ("olm", "olm_com"):
        torch.manual_seed(0)
        t = ours(method, "concat", bn=False)
        train_ours(t, data, held, slice(rank * BATCH, (rank + 1) * BATCH))
        results[method] = {"model": t.model.state_dict(),
                           "w": t.balancer.weights.detach().clone()}
    return results


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    return run_gloo(_ddp_run, tmp_path_factory.mktemp("olm-ddp"))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["olm", "olm_com"])
def test_two_gloo_processes_equal_one_with_the_global_batch(ddp_results, method):
    r0, r1 = ddp_results[0][method], ddp_results[1][method]
    for name, value in r0["model"].items():
        assert torch.equal(value, r1["model"][name]), name
    assert torch.equal(r0["w"], r1["w"])
    data, held = make_batches(1, 2 * BATCH), make_batches(2, 2 * BATCH)
    torch.manual_seed(0)
    t = ours(method, "concat", bn=False)
    ref = reference_like(t, "concat", bn=False)
    weights, *_ = ref_train(ref, method, data, held)  # the released step, global batch
    train_ours(t, data, held)
    for name, value in t.model.state_dict().items():
        torch.testing.assert_close(r0["model"][name], value, **TOL, msg=name)
        torch.testing.assert_close(value, ref.state_dict()[ref_name(name, "concat")], **TOL)
    torch.testing.assert_close(r0["w"], t.balancer.weights.detach(), **TOL)
    torch.testing.assert_close(r0["w"], weights.detach()[PERM], **TOL)
