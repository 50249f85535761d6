"""OGM / OGM-GE and the `ogm_ge` init against the released code (differential tests).

The reference is written in plain torch from OGM-GE's released code (Peng et al., "Balanced
Multimodal Learning via On-the-fly Gradient Modulation", CVPR 2022;
github.com/GeWu-Lab/OGM-GE_CVPR2022 at 343dc1d), with no avtrain import:

- main.py `train_epoch` (lines 57-161): CE (mean) on the fused logits, `loss.backward()`,
  per-modality logits from the concat layer's weight split plus half its bias (lines 88-93),
  scores = Σ_i softmax(out_m)[i, y_i] (105-106), ρ_v = score_v / score_a, the tanh coefficients
  with `ratio_v > 1` choosing the modulated modality (108-124), the inclusive window
  `modulation_starts <= epoch <= modulation_ends` (132), the parameter selection by the name's
  module ('audio' / 'visual' in `name.split('.')[1]`, DataParallel's `module.` prefix first)
  and a 4-D gradient (133-143), `grad *= coeff` (OGM) or
  `grad = grad * coeff + zeros_like(grad).normal_(0, grad.std().item() + 1e-8)` (OGM-GE; σ from
  the unscaled gradient), then `optimizer.step()`; `scheduler.step()` once per epoch (159);
- main.py lines 246-247: SGD(lr 1e-3 (`--learning_rate` default, line 37), momentum 0.9,
  weight decay 1e-4) over all parameters, StepLR(70, 0.1) (lines 38-39);
- models/basic_model.py / fusion_modules.py: AVClassifier with `fusion_module` built before
  `audio_net` and `visual_net` (lines 24-36), ConcatFusion `fc_out(cat(a, v))`, audio pooled with
  adaptive_avg_pool2d, visual frames folded into the batch by the ResNet (backbone.py 144-147)
  and pooled over (T, H, W) with adaptive_avg_pool3d (basic_model.py 43-52); the ResNet-18
  trunks are replaced by avtrain's tiny trunk (same layer types, so the same selection);
- utils/utils.py `weight_init` (lines 15-23), applied with `model.apply` (main.py line 239).

avtrain runs its real path: `Trainer.train_step` (avtrain/loop.py) on a tiny model built by
`build_training_model` (the `Trainer.__init__` path, `--init ogm_ge`), with the optimizer,
scheduler and balancer `Trainer` builds; the reference starts from a copy of its weights.

The one documented, deliberate difference is where OGM-GE's noise comes from: the released code
draws `normal_(0, σ)` from the global torch RNG, avtrain draws unit normals from a generator
seeded by (seed, step) and multiplies by σ, so every DDP rank adds the same noise
(avtrain/balance/ogm.py). The reference therefore takes its unit normals from avtrain's
generator (`our_unit_noise`, supplied by the test, outside the reference) and multiplies them
by the released σ = std + 1e-8; `test_ge_noise_is_the_released_distribution` checks separately
that the noise avtrain adds is N(0, σ²) with σ from the unscaled gradient (a KS test that fails
for σ from the scaled one).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from released import WIDTH, as_batch, make_batches, ref_trunk, run_gloo, step_trainer
from torch import nn

CLASSES, BATCH = 3, 4
STEPS = ((0, 1), (1, 2), (2, 1))  # (epoch, steps): 4 steps, only epoch 1 in the window
WINDOW = (1, 1)  # --modulation-start/--modulation-end: both ends inclusive
ALPHA, SEED = 0.8, 5
TOL = {"rtol": 1e-6, "atol": 1e-6}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- the reference: the released code's semantics, in plain torch ------------------------------


def released_weight_init(m: nn.Module) -> None:  # utils/utils.py lines 15-23
    if isinstance(m, nn.Linear):
        nn.init.xavier_normal_(m.weight)
        nn.init.constant_(m.bias, 0)
    elif isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.constant_(m.weight, 1)
        nn.init.constant_(m.bias, 0)


class RefConcatFusion(nn.Module):  # fusion_modules.py lines 16-24
    def __init__(self, input_dim, output_dim):
        super().__init__()
        self.fc_out = nn.Linear(input_dim, output_dim)

    def forward(self, x, y):
        return x, y, self.fc_out(torch.cat((x, y), dim=1))


class RefAVClassifier(nn.Module):  # basic_model.py, tiny trunks instead of ResNet-18
    def __init__(self, bn: bool = True):
        super().__init__()
        self.fusion_module = RefConcatFusion(4 * WIDTH, CLASSES)  # built first, as released
        self.audio_net = ref_trunk(1, bn)
        self.visual_net = ref_trunk(3, bn)

    def forward(self, audio, visual):  # audio [B, 1, F, T]; visual [B, C, T, H, W] (released)
        a = self.audio_net(audio)
        b, c, t, h, w = visual.size()  # backbone.py lines 144-147
        v = self.visual_net(visual.permute(0, 2, 1, 3, 4).contiguous().view(b * t, c, h, w))
        _, c, h, w = v.size()  # basic_model.py lines 43-52
        v = v.view(b, -1, c, h, w).permute(0, 2, 1, 3, 4)
        a = torch.flatten(F.adaptive_avg_pool2d(a, 1), 1)
        v = torch.flatten(F.adaptive_avg_pool3d(v, 1), 1)
        return self.fusion_module(a, v)


def ref_train(model, modulation: str, data, unit_noise):
    """main.py train_epoch over STEPS (epoch = the released `epoch`); `unit_noise(step,
    shapes)` gives the unit normals of OGM-GE's noise (see the module docstring)."""
    criterion = nn.CrossEntropyLoss()
    softmax, relu, tanh = nn.Softmax(dim=1), nn.ReLU(inplace=True), nn.Tanh()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 70, 0.1)
    coeffs, step = [], 0
    for epoch, steps in STEPS:
        model.train()
        for _ in range(steps):
            spec, image, label = data[step]
            image = image.permute(0, 2, 1, 3, 4)  # the released loaders give [B, C, T, H, W]
            optimizer.zero_grad()
            a, v, out = model(spec, image)
            fc = model.fusion_module.fc_out
            half = fc.weight.size(1) // 2
            out_v = torch.mm(v, torch.transpose(fc.weight[:, half:], 0, 1)) + fc.bias / 2
            out_a = torch.mm(a, torch.transpose(fc.weight[:, :half], 0, 1)) + fc.bias / 2
            loss = criterion(out, label)
            loss.backward()
            score_v = sum([softmax(out_v)[i][label[i]] for i in range(out_v.size(0))])
            score_a = sum([softmax(out_a)[i][label[i]] for i in range(out_a.size(0))])
            ratio_v = score_v / score_a
            ratio_a = 1 / ratio_v
            if ratio_v > 1:
                coeff_v, coeff_a = 1 - tanh(ALPHA * relu(ratio_v)), 1
            else:
                coeff_a, coeff_v = 1 - tanh(ALPHA * relu(ratio_a)), 1
            if WINDOW[0] <= epoch <= WINDOW[1]:
                coeffs.append([float(torch.as_tensor(c).detach()) for c in (coeff_a, coeff_v)])
                # the released loop runs under DataParallel: its names start with "module."
                chosen = [(name, p) for name, p in model.named_parameters()
                          if len(p.grad.size()) == 4]
                noise = iter(unit_noise(step, [p.grad.shape for _, p in chosen])
                             if modulation == "OGM_GE" else [])
                for name, parms in model.named_parameters():
                    layer = str("module." + name).split(".")[1]
                    for modality, coeff in (("audio", coeff_a), ("visual", coeff_v)):
                        if modality in layer and len(parms.grad.size()) == 4:
                            if modulation == "OGM_GE":
                                parms.grad = parms.grad * coeff + next(noise) * (
                                    parms.grad.std().item() + 1e-8)
                            else:
                                parms.grad *= coeff
            optimizer.step()
            step += 1
        scheduler.step()
    return optimizer, coeffs


# --- the avtrain side --------------------------------------------------------------------------


def our_unit_noise(step: int, shapes) -> list[torch.Tensor]:
    """The unit normals avtrain's OGM-GE draws at `step`: one flat draw over the modulated
    gradients in order, from the generator seeded by (seed, step)."""
    from avtrain.balance.ogm import _mix, draw_unit_noise

    sizes = [int(torch.Size(s).numel()) for s in shapes]
    flat = torch.empty(sum(sizes))
    draw_unit_noise(flat, _mix(SEED, step))
    return [part.view(s) for part, s in zip(flat.split(sizes), shapes)]


def ours(method: str, bn: bool = True):
    """The released protocol as avtrain settings: SGD 1e-3/0.9/1e-4, StepLR 70/0.1, concat,
    the released init."""
    return step_trainer(method, "concat", CLASSES, bn=bn, optimizer="sgd", lr=1e-3,
                        momentum=0.9, weight_decay=1e-4, scheduler="step", lr_step=70,
                        lr_gamma=0.1, alpha=ALPHA, modulation_start=WINDOW[0],
                        modulation_end=WINDOW[1], seed=SEED, init="ogm_ge")


def train_ours(t, data, part=slice(None)) -> list[dict]:
    metrics = []
    step = 0
    for epoch, steps in STEPS:
        t.net.train()
        for _ in range(steps):
            t.train_step(as_batch(data[step], part), epoch)
            metrics.append({k: float(v) for k, v in t.balancer.step_metrics().items()})
            t.step += 1
            step += 1
        t.scheduler.step()
        t.balancer.end_epoch(epoch)
    return metrics


NAMES = {"encoders.audio.backbone": "audio_net", "encoders.visual.backbone": "visual_net",
         "fusion.fc_out": "fusion_module.fc_out"}


def ref_name(name: str) -> str:
    for mine, theirs in NAMES.items():
        if name.startswith(mine + "."):
            return theirs + name[len(mine):]
    raise KeyError(name)


def reference_like(t, bn: bool = True) -> RefAVClassifier:
    ref = RefAVClassifier(bn)
    ref.load_state_dict({ref_name(k): v.clone() for k, v in t.model.state_dict().items()})
    return ref  # strict: every parameter and buffer maps one to one


def compare(t, ref, optimizer) -> None:
    ref_state = ref.state_dict()
    for name, value in t.model.state_dict().items():
        torch.testing.assert_close(value, ref_state[ref_name(name)], **TOL, msg=name)
    ref_params = dict(ref.named_parameters())
    for name, p in t.model.named_parameters():
        mine, theirs = t.optimizer.state[p], optimizer.state[ref_params[ref_name(name)]]
        torch.testing.assert_close(mine["momentum_buffer"], theirs["momentum_buffer"], **TOL,
                                   msg=f"{name} momentum")
    assert t.optimizer.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
    assert t.scheduler.state_dict()["last_epoch"] == len(STEPS)


# --- one process -------------------------------------------------------------------------------


@pytest.mark.parametrize("method,modulation", [("ogm", "OGM"), ("ogm_ge", "OGM_GE")])
def test_steps_equal_the_released_step(method, modulation):
    data = make_batches(1, BATCH, sum(n for _, n in STEPS), CLASSES)
    torch.manual_seed(0)
    t = ours(method)
    ref = reference_like(t)
    optimizer, coeffs = ref_train(ref, modulation, data, our_unit_noise)
    metrics = train_ours(t, data)
    compare(t, ref, optimizer)
    # the window is inclusive at both ends and nothing happens outside it
    applied = [[m["coeff_audio"], m["coeff_visual"]] for m in metrics]
    assert applied[0] == applied[3] == [1.0, 1.0]
    for got, want in zip(applied[1:3], coeffs, strict=True):
        assert got == pytest.approx(want, rel=1e-6, abs=1e-6)
    assert min(a for a, _ in coeffs) < 0.9  # audio dominated and really was slowed


def test_the_comparison_has_teeth():
    """Without modulation, or with OGM's rule where OGM-GE's is expected, the step is not the
    released one at 1e-6: the test above pins the method down."""
    data = make_batches(1, BATCH, sum(n for _, n in STEPS), CLASSES)
    for method, modulation in (("none", "OGM"), ("ogm", "OGM_GE")):
        torch.manual_seed(0)
        t = ours(method)
        ref = reference_like(t)
        ref_train(ref, modulation, data, our_unit_noise)
        train_ours(t, data)
        ref_state = ref.state_dict()
        assert any(not torch.allclose(v, ref_state[ref_name(k)], **TOL)
                   for k, v in t.model.state_dict().items()), method


def _ks_normal(z: torch.Tensor) -> float:
    """Kolmogorov-Smirnov distance between the sample z and N(0, 1)."""
    x = z.flatten().double().sort().values
    n = x.numel()
    cdf = torch.special.ndtr(x)
    upper = torch.arange(1, n + 1, dtype=torch.float64) / n
    return float(torch.maximum(upper - cdf, cdf - (upper - 1 / n)).max())


def test_ge_noise_is_the_released_distribution():
    """The released step adds `zeros_like(g).normal_(0, σ)` with σ = std of the *unscaled*
    gradient + 1e-8 (main.py lines 138-139, 145-146) beside `grad * coeff`. With audio
    dominant (k < 1) the noise avtrain adds, divided by that σ, passes a Kolmogorov-Smirnov
    test against N(0, 1) at every step, while σ taken from the scaled gradient (k·std, the
    mistake this pins down) fails it; the draws change from step to step; a zero gradient
    gets std 1e-8."""
    from avtrain.balance.ogm import OGMGE

    model = nn.Module()
    model.encoders = nn.ModuleDict({"audio": nn.Conv2d(64, 64, 3), "visual": nn.Conv2d(8, 8, 1)})
    balancer = OGMGE(model, {"alpha": 0.5, "seed": SEED}, modalities=["audio", "visual"])
    grad = torch.randn(64, 64, 3, 3, generator=torch.Generator().manual_seed(1)) * 0.01
    labels = torch.arange(4) % 3
    audio = 4 * F.one_hot(labels, 3).float()  # audio sure of the label, visual at chance
    critical = 1.63 / grad.numel() ** 0.5  # KS at the 1 % level for 36,864 draws
    zs = []
    for step in range(2):
        model.encoders["audio"].weight.grad = grad.clone()
        model.encoders["visual"].weight.grad = torch.zeros(8, 8, 1, 1)
        balancer.before_optimizer_step({"audio": audio, "visual": torch.zeros(4, 3)}, labels,
                                       epoch=0, step=step)
        k = float(balancer.step_metrics()["coeff_audio"])
        assert 0.1 < k < 0.8 and float(balancer.step_metrics()["coeff_visual"]) == 1.0
        noise = model.encoders["audio"].weight.grad - k * grad
        z = noise / (grad.std() + 1e-8)
        assert _ks_normal(z) < critical
        assert _ks_normal(noise / (k * grad.std() + 1e-8)) > 10 * critical
        zs.append(z)
        assert float(model.encoders["visual"].weight.grad.abs().max()) < 1e-6
        assert float(model.encoders["visual"].weight.grad.std()) == pytest.approx(1e-8, rel=0.5)
    assert not torch.allclose(zs[0], zs[1])


# --- the ogm_ge init -----------------------------------------------------------------------------


@pytest.mark.parametrize("fusion", ["concat", "gated", "sum"])
def test_ogm_ge_init_is_the_released_weight_init(fusion):
    """Same seed: `--init ogm_ge` gives exactly `model.apply(weight_init)` of the released
    utils.py on the freshly built model (all of it, encoders and fusion), and `--init torch`
    leaves PyTorch's defaults."""
    from avtrain.loop import build_training_model
    from avtrain.models import build_model
    from avtrain.settings import make_config

    wants = {}
    for init in ("ogm_ge", "torch"):
        torch.manual_seed(7)
        mine = build_training_model(make_config({"model": "tiny", "fusion": fusion,
                                                 "init": init}), CLASSES)
        torch.manual_seed(7)
        theirs = build_model("tiny", fusion, CLASSES)
        if init == "ogm_ge":
            theirs.apply(released_weight_init)
        want = wants[init] = theirs.state_dict()
        assert mine.state_dict().keys() == want.keys()
        for name, value in mine.state_dict().items():
            assert torch.equal(value, want[name]), (init, name)
    # the init really changed every weight it touches (BatchNorm scales were already 1)
    for name, value in wants["ogm_ge"].items():
        if name.endswith("weight") and value.dim() > 1:
            assert not torch.equal(value, wants["torch"][name]), name


def test_ogm_ge_init_statistics_on_resnet18():
    """On the released architecture's shapes: the concat classifier is xavier-normal
    (std sqrt(2/(1024+C)), 0.044 for CREMA-D's 6 classes, not PyTorch's 0.018), zero bias;
    every BatchNorm2d scale 1 and shift 0; conv kernels kaiming-normal, fan_out, ReLU gain."""
    from avtrain.loop import build_training_model
    from avtrain.settings import make_config

    torch.manual_seed(0)
    model = build_training_model(make_config({"model": "resnet18", "init": "ogm_ge"}), 6)
    model.requires_grad_(False)
    fc = model.fusion.fc_out
    assert float(fc.weight.std()) == pytest.approx((2 / (1024 + 6)) ** 0.5, rel=0.03)
    assert torch.equal(fc.bias, torch.zeros(6))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.weight, torch.ones_like(m.weight))
            assert torch.equal(m.bias, torch.zeros_like(m.bias))
    conv = model.encoders["visual"].backbone.layer4[1].conv2.weight  # 512x512x3x3
    fan_out = conv.shape[0] * conv.shape[2] * conv.shape[3]
    assert float(conv.std()) == pytest.approx((2 / fan_out) ** 0.5, rel=0.01)
    torch.manual_seed(0)
    default = build_training_model(make_config({"model": "resnet18"}), 6).fusion.fc_out
    assert float(default.weight.detach().std()) == pytest.approx(1 / (3 * 1024) ** 0.5, rel=0.03)


@pytest.mark.parametrize("flags,words", [
    (["--init", "xavier"], "--init must be one of torch, ogm_ge, got 'xavier'"),
])
def test_bad_init_is_one_error_line(tmp_path, flags, words):
    from click.testing import CliRunner

    from cli import avtrain

    result = CliRunner().invoke(avtrain, ["fit", "--shards", str(tmp_path), "--run-dir",
                                          str(tmp_path / "run"), *flags])
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert lines == [f"Error: {words}"], result.output


def test_init_is_a_recorded_setting(tmp_path):
    from click.testing import CliRunner

    from cli import avtrain

    result = CliRunner().invoke(avtrain, ["fit", "--shards", str(tmp_path), "--run-dir",
                                          str(tmp_path / "run"), "--init", "ogm_ge",
                                          "--print-config"])
    assert result.exit_code == 0, result.output
    assert "init: ogm_ge" in result.output.splitlines()


# --- two gloo processes == one process with the global batch ------------------------------------


def _ddp_run(rank: int, world: int) -> dict:
    data = make_batches(1, 2 * BATCH, sum(n for _, n in STEPS), CLASSES)
    torch.manual_seed(0)
    t = ours("ogm_ge", bn=False)
    metrics = train_ours(t, data, slice(rank * BATCH, (rank + 1) * BATCH))
    return {"model": t.model.state_dict(), "metrics": metrics}


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    return run_gloo(_ddp_run, tmp_path_factory.mktemp("ogm-ddp"))


@pytest.mark.slow
def test_two_gloo_processes_equal_one_with_the_global_batch(ddp_results):
    r0, r1 = ddp_results
    for name, value in r0["model"].items():
        assert torch.equal(value, r1["model"][name]), name  # identical noise on both ranks
    assert r0["metrics"] == r1["metrics"]
    data = make_batches(1, 2 * BATCH, sum(n for _, n in STEPS), CLASSES)
    torch.manual_seed(0)
    t = ours("ogm_ge", bn=False)
    ref = reference_like(t, bn=False)
    ref_train(ref, "OGM_GE", data, our_unit_noise)  # the released step, global batch
    metrics = train_ours(t, data)
    for name, value in t.model.state_dict().items():
        torch.testing.assert_close(r0["model"][name], value, **TOL, msg=name)
        torch.testing.assert_close(value, ref.state_dict()[ref_name(name)], **TOL, msg=name)
    for got, want in zip(r0["metrics"], metrics):
        assert got == pytest.approx(want, rel=1e-6, abs=1e-6)
