"""OGM / OGM-GE against hand-computed values on a small conv model shaped like AVModel."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from held import HUNG_AFTER_S
from torch import nn

from avprep.errors import UserError
from avtrain.balance import build_balancer, modulated_parameters, ogm_coefficients, ogm_scores

LN3 = math.log(3.0)


class ToyAV(nn.Module):
    """AVModel's shape: `.modalities`, `.encoders` (conv + BN + a linear layer), heads, and a
    forward returning {"fused", <modality>...} logits (sum fusion)."""

    def __init__(self, modalities=("audio", "visual"), classes=3, width=8, bn=True):
        super().__init__()
        self.modalities = list(modalities)
        chans = {"audio": 1, "visual": 3, "text": 2}
        self.encoders = nn.ModuleDict({m: nn.Sequential(
            nn.Conv2d(chans[m], width, 3, padding=1),
            nn.BatchNorm2d(width) if bn else nn.Identity(),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(2 * width, 2 * width),
        ) for m in self.modalities})
        self.heads = nn.ModuleDict({m: nn.Linear(2 * width, classes) for m in self.modalities})

    def forward(self, batch):
        out = {m: self.heads[m](self.encoders[m](batch[m])) for m in self.modalities}
        out["fused"] = sum(out[m] for m in self.modalities)
        return out


def toy_batch(n=6, modalities=("audio", "visual"), classes=3, seed=0, size=8):
    g = torch.Generator().manual_seed(seed)
    chans = {"audio": 1, "visual": 3, "text": 2}
    batch = {m: torch.randn(n, chans[m], size, size, generator=g) for m in modalities}
    return batch, torch.randint(0, classes, (n,), generator=g)


def fixed_logits(p_audio: float, p_visual: float, n=4):
    """Two-class logits whose true-class (0) probability is exactly p for every sample."""
    def rows(p):
        return torch.tensor([[math.log(p / (1 - p)), 0.0]] * n)
    return {"audio": rows(p_audio), "visual": rows(p_visual)}, torch.zeros(n, dtype=torch.long)


def grads_after_backward(model, balancer, batch, labels):
    logits = model(batch)
    model.zero_grad(set_to_none=True)
    balancer.loss(logits, labels, epoch=0, step=0).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# --- the rule itself --------------------------------------------------------------------------


def k(scores, alpha):
    out = ogm_coefficients({m: torch.tensor(float(s)) for m, s in scores.items()}, alpha)
    return {m: float(v) for m, v in out.items()}


def test_visual_dominant_scales_visual_only():
    got = k({"audio": 10.0, "visual": 20.0}, 0.8)  # rho = 2
    assert got["visual"] == pytest.approx(1 - math.tanh(1.6), abs=1e-7)
    assert got["visual"] == pytest.approx(0.0783314, abs=1e-7)
    assert got["audio"] == 1.0


def test_audio_dominant_scales_audio_only():
    got = k({"audio": 30.0, "visual": 10.0}, 0.8)  # rho_v = 1/3, audio gets tanh(0.8 * 3)
    assert got["audio"] == pytest.approx(1 - math.tanh(2.4), abs=1e-7)
    assert got["audio"] == pytest.approx(0.0163251, abs=1e-7)
    assert got["visual"] == 1.0


def test_jump_at_rho_one_follows_the_released_rule():
    alpha = 0.5
    tie = k({"audio": 10.0, "visual": 10.0}, alpha)  # the released `else` branch: audio scaled
    assert tie == {"audio": pytest.approx(1 - math.tanh(0.5)), "visual": 1.0}
    above = k({"audio": 10.0, "visual": 10.001}, alpha)
    below = k({"audio": 10.0, "visual": 9.999}, alpha)
    assert above["audio"] == 1.0 and above["visual"] == pytest.approx(
        1 - math.tanh(alpha * 1.0001))
    assert below["visual"] == 1.0 and below["audio"] == pytest.approx(
        1 - math.tanh(alpha * 10 / 9.999))
    # the discontinuity: crossing rho = 1 moves a 1 - tanh(alpha) ~ 0.54 cut to the other side
    assert above["visual"] - below["visual"] == pytest.approx(-math.tanh(alpha), abs=1e-3)


def test_three_modalities_use_the_mean_of_the_others():
    got = k({"audio": 6.0, "visual": 2.0, "text": 4.0}, 0.5)
    assert got["audio"] == pytest.approx(1 - math.tanh(0.5 * 6 / 3))  # rho 2
    assert got["visual"] == 1.0  # rho 0.4
    assert got["text"] == 1.0  # rho exactly 1 is not > 1
    assert k({"audio": 1.0, "visual": 1.0, "text": 1.0}, 0.5) == {
        "audio": 1.0, "visual": 1.0, "text": 1.0}


def test_n_modality_rule_equals_two_modality_rule_off_the_tie():
    for sa, sv in ((3.0, 5.0), (7.0, 2.0), (1.0, 1.2)):
        two = k({"audio": sa, "visual": sv}, 0.7)
        for m, own, other in (("audio", sa, sv), ("visual", sv, sa)):
            rho = own / other
            assert two[m] == pytest.approx(1 - math.tanh(0.7 * rho) if rho > 1 else 1.0)


def test_coefficients_stay_on_device_and_reject_bad_input():
    out = ogm_coefficients({"audio": torch.tensor(2.0), "visual": torch.tensor(1.0)}, 1.0)
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in out.values())
    with pytest.raises(UserError, match="alpha"):
        ogm_coefficients({"audio": torch.tensor(2.0), "visual": torch.tensor(1.0)}, -0.1)
    with pytest.raises(UserError, match="two modalities"):
        ogm_coefficients({"audio": torch.tensor(2.0)}, 1.0)


def test_scores_are_true_class_probabilities_summed():
    logits = {"audio": torch.tensor([[0.0, LN3], [0.0, 0.0]]),
              "visual": torch.tensor([[LN3, 0.0, 0.0], [0.0, 0.0, 0.0]])}
    scores = ogm_scores(logits, torch.tensor([1, 0]), ["audio", "visual"])
    assert float(scores["audio"]) == pytest.approx(0.75 + 0.5)
    # softmax([ln3, 0, 0])[1] = 1/5, softmax([0, 0, 0])[0] = 1/3
    assert float(scores["visual"]) == pytest.approx(1 / 5 + 1 / 3)


# --- the balancer on a model ----------------------------------------------------------------


def ogm(model, method="ogm", **config):
    config = {"alpha": 0.5, "modulation_start": 0, "modulation_end": 10, **config}
    return build_balancer(method, model, config, modalities=model.modalities)


def kind_of(name):
    if name.startswith("heads."):
        return "head"
    layer = int(name.split(".")[2])
    return {0: "conv", 1: "bn", 3: "conv", 7: "linear"}[layer]


@pytest.mark.parametrize("dominant", ["visual", "audio", "tie"])
def test_step_scales_the_dominant_encoders_conv_kernels(dominant):
    torch.manual_seed(0)
    model = ToyAV(classes=2)
    balancer = ogm(model)
    batch, _ = toy_batch(4, classes=2)
    p = {"visual": (0.5, 0.75), "audio": (0.75, 0.5), "tie": (0.5, 0.5)}[dominant]
    logits, labels = fixed_logits(*p)
    before = grads_after_backward(model, balancer, batch, labels)
    balancer.before_optimizer_step(logits, labels, epoch=0, step=0)
    # hand: scores 2.0 and 3.0 -> rho 1.5 -> the dominant one gets 1 - tanh(0.75)
    cut = {"visual": 1 - math.tanh(0.75), "audio": 1 - math.tanh(0.75),
           "tie": 1 - math.tanh(0.5)}[dominant]
    expect = {"audio": cut if dominant in ("audio", "tie") else 1.0,
              "visual": cut if dominant == "visual" else 1.0}
    for name, param in model.named_parameters():
        modality = name.split(".")[1]
        scaled = kind_of(name) == "conv" and name.endswith("weight")
        factor = expect[modality] if scaled else 1.0
        torch.testing.assert_close(param.grad, before[name] * factor, rtol=1e-6, atol=0)
    m = balancer.step_metrics()
    assert float(m["coeff_audio"]) == pytest.approx(expect["audio"])
    assert float(m["coeff_visual"]) == pytest.approx(expect["visual"])
    assert float(m["score_audio"]) == pytest.approx(4 * p[0])
    assert float(m["rho_visual"]) == pytest.approx(p[1] / p[0])


def test_modulate_encoder_scales_every_matrix_but_not_bn_bias_or_heads():
    torch.manual_seed(0)
    model = ToyAV(classes=2)
    balancer = ogm(model, modulate="encoder")
    batch, _ = toy_batch(4, classes=2)
    logits, labels = fixed_logits(0.5, 0.75)
    before = grads_after_backward(model, balancer, batch, labels)
    balancer.before_optimizer_step(logits, labels, epoch=0, step=0)
    cut = 1 - math.tanh(0.75)
    changed = set()
    for name, param in model.named_parameters():
        if not torch.equal(param.grad, before[name]):
            changed.add(name)
            torch.testing.assert_close(param.grad, before[name] * cut, rtol=1e-6, atol=0)
    assert changed == {"encoders.visual.0.weight", "encoders.visual.3.weight",
                       "encoders.visual.7.weight"}
    conv_only = [n for n, p in model.named_parameters()
                 if any(p is q for q in modulated_parameters(model.encoders["visual"], "conv"))]
    assert conv_only == ["encoders.visual.0.weight", "encoders.visual.3.weight"]


@pytest.mark.parametrize("epoch,active", [(1, False), (2, True), (3, True), (5, True), (6, False)])
def test_modulation_window_is_inclusive(epoch, active):
    torch.manual_seed(0)
    model = ToyAV(classes=2)
    balancer = ogm(model, method="ogm_ge", modulation_start=2, modulation_end=5)
    batch, _ = toy_batch(4, classes=2)
    logits, labels = fixed_logits(0.5, 0.75)
    before = grads_after_backward(model, balancer, batch, labels)
    balancer.before_optimizer_step(logits, labels, epoch=epoch, step=7)
    same = all(torch.equal(p.grad, before[n]) for n, p in model.named_parameters())
    assert same is (not active)
    assert float(balancer.step_metrics()["coeff_visual"]) == pytest.approx(
        1 - math.tanh(0.75) if active else 1.0)


def ge_setup(seed=0, step=3, config_seed=11):
    """A wider toy model whose conv gradients are replaced by known Gaussian tensors."""
    torch.manual_seed(seed)
    model = ToyAV(classes=2, width=32)
    balancer = ogm(model, method="ogm_ge", seed=config_seed)
    batch, _ = toy_batch(4, classes=2)
    logits, labels = fixed_logits(0.5, 0.75)
    grads_after_backward(model, balancer, batch, labels)
    g = torch.Generator().manual_seed(1234)
    for i, p in enumerate(balancer.groups[0] + balancer.groups[1]):
        p.grad = torch.randn(p.shape, generator=g) * (0.01 * (i + 1))
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    balancer.before_optimizer_step(logits, labels, epoch=0, step=step)
    return model, balancer, before


def test_ge_noise_has_the_std_of_the_unscaled_gradient():
    model, balancer, before = ge_setup()
    cut = {"audio": 1.0, "visual": 1 - math.tanh(0.75)}
    selected = {id(p) for group in balancer.groups for p in group}
    checked = 0
    for name, p in model.named_parameters():
        if id(p) not in selected:
            assert torch.equal(p.grad, before[name]), name  # BN, biases, linear, heads
            continue
        modality = name.split(".")[1]
        noise = p.grad - before[name] * cut[modality]
        sigma = before[name].std()
        n = noise.numel()
        # std of a sample std is sigma / sqrt(2n); allow 5 of those, mean within 5 sigma/sqrt(n)
        assert abs(float(noise.std() / sigma) - 1) < 5 / math.sqrt(2 * n), name
        assert abs(float(noise.mean())) < 5 * float(sigma) / math.sqrt(n), name
        corr = torch.corrcoef(torch.stack([noise.flatten(), before[name].flatten()]))[0, 1]
        assert abs(float(corr)) < 5 / math.sqrt(n), name  # independent of the gradient
        checked += 1
    assert checked == 4  # two conv kernels per modality, both modalities get noise


def test_ge_noise_depends_only_on_seed_and_step():
    def noise_of(**kw):
        model, balancer, before = ge_setup(**kw)
        p = balancer.groups[0][1]
        name = next(n for n, q in model.named_parameters() if q is p)
        return p.grad - before[name]

    a, b = noise_of(step=3), noise_of(step=3)
    assert torch.equal(a, b)
    assert not torch.allclose(a, noise_of(step=4))
    assert not torch.allclose(a, noise_of(config_seed=12))


def test_ge_noise_is_the_same_whatever_the_thread_count(monkeypatch):
    """Ranks with different thread counts must add the same noise, or replicas drift; each
    piece has its own seed, so pieces do not repeat one another."""
    from avtrain.balance import ogm

    monkeypatch.setattr(ogm, "NOISE_CHUNK", 1000)
    threads = torch.get_num_threads()
    draws = []
    try:
        for n_threads in (1, 2, 3):
            torch.set_num_threads(n_threads)
            out = torch.empty(4500)
            ogm.draw_unit_noise(out, seed=7)
            draws.append(out)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(draws[0], draws[1]) and torch.equal(draws[0], draws[2])
    pieces = draws[0][:4000].view(4, 1000)
    assert all(not torch.allclose(pieces[0], pieces[i]) for i in range(1, 4))
    assert abs(float(draws[0].mean())) < 5 / math.sqrt(4500)
    assert abs(float(draws[0].std()) - 1) < 5 / math.sqrt(2 * 4500)
    other = torch.empty(4500)
    ogm.draw_unit_noise(other, seed=8)
    assert not torch.allclose(other, draws[0])


def test_ogm_without_ge_adds_no_noise():
    torch.manual_seed(0)
    model = ToyAV(classes=2)
    balancer = ogm(model, method="ogm")
    batch, _ = toy_batch(4, classes=2)
    logits, labels = fixed_logits(0.75, 0.5)
    before = grads_after_backward(model, balancer, batch, labels)
    balancer.before_optimizer_step(logits, labels, epoch=0, step=0)
    conv = balancer.groups[1][0]  # visual: k = 1, untouched without noise
    name = next(n for n, q in model.named_parameters() if q is conv)
    assert torch.equal(conv.grad, before[name])


def test_three_modality_model_gets_the_n_modality_coefficients():
    torch.manual_seed(0)
    mods = ("audio", "visual", "text")
    model = ToyAV(mods, classes=2)
    balancer = ogm(model)
    batch, _ = toy_batch(4, mods, classes=2)
    logits, labels = fixed_logits(0.75, 0.25)  # scores: audio 3, visual 1
    logits["text"] = fixed_logits(0.5, 0.5)[0]["audio"]  # text 2
    before = grads_after_backward(model, balancer, batch, labels)
    balancer.before_optimizer_step(logits, labels, epoch=0, step=0)
    # rho_audio = 3 / mean(1, 2) = 2 -> 1 - tanh(1); visual 1/2.5, text 2/2 = 1: untouched
    expect = {"audio": 1 - math.tanh(1.0), "visual": 1.0, "text": 1.0}
    for m in mods:
        w = model.encoders[m][0].weight
        torch.testing.assert_close(w.grad, before[f"encoders.{m}.0.weight"] * expect[m])
        assert float(balancer.step_metrics()[f"coeff_{m}"]) == pytest.approx(expect[m])


class NoHostSync:
    """Makes every Python-level tensor -> host conversion raise inside the block."""

    names = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__")

    def __enter__(self):
        self.saved = {n: getattr(torch.Tensor, n) for n in self.names}

        def fail(*a, **kw):
            raise AssertionError("host sync in the balancing step")
        for n in self.names:
            setattr(torch.Tensor, n, fail)

    def __exit__(self, *exc):
        for n, f in self.saved.items():
            setattr(torch.Tensor, n, f)


@pytest.mark.parametrize("method", ["ogm", "ogm_ge"])
def test_step_reads_nothing_back_to_the_host(method):
    torch.manual_seed(0)
    model = ToyAV(classes=3)
    balancer = ogm(model, method=method)
    batch, labels = toy_batch(6)
    logits = model(batch)
    balancer.loss(logits, labels, epoch=0, step=0).backward()
    with NoHostSync():
        balancer.before_optimizer_step(logits, labels, epoch=0, step=0)
    assert float(balancer.step_metrics()["coeff_audio"]) <= 1.0


def test_loss_is_the_baseline_fused_ce():
    torch.manual_seed(0)
    model = ToyAV()
    batch, labels = toy_batch()
    logits = model(batch)
    loss = ogm(model).loss(logits, labels, epoch=0, step=0)
    torch.testing.assert_close(loss, F.cross_entropy(logits["fused"], labels))


@pytest.mark.parametrize("config,match", [
    ({"alpha": -0.5}, "alpha"),
    ({"modulation_start": 5, "modulation_end": 4}, "modulation-end"),
    ({"modulate": "all"}, "modulate"),
])
@pytest.mark.parametrize("method", ["ogm", "ogm_ge"])
def test_bad_options_are_one_clear_user_error(method, config, match):
    with pytest.raises(UserError, match=match):
        ogm(ToyAV(), method=method, **config)


@pytest.mark.parametrize("method", ["ogm", "ogm_ge", "olm", "olm_com"])
def test_single_modality_is_a_user_error(method):
    model = ToyAV(("audio",))
    with pytest.raises(UserError, match="at least two"):
        build_balancer(method, model, {}, modalities=model.modalities)


# --- through the real trainer -----------------------------------------------------------------


def build_test_shards(synth_dir, out):
    """The conftest synth clips as a shard set (avprep build-shards, preset synth)."""
    from avprep.manifest import read_manifest
    from avprep.presets import get_preset
    from avprep.shards import build_shards

    manifest = read_manifest(synth_dir / "manifest.jsonl")
    build_shards(manifest.records, str(out), get_preset("synth"), classes=manifest.classes,
                 dataset="synth", shard_size=50, workers=1)
    return out


def trainer_config(shards, run, method, **changes):
    return {"shards": str(shards), "run_dir": str(run), "method": method, "model": "tiny",
            "fusion": "concat", "epochs": 2, "batch_size": 4, "optimizer": "sgd", "lr": 0.05,
            "scheduler": "none", "image_size": 32, "workers": 0, "device": "cpu", "seed": 0,
            "progress": False, "tensorboard": False, "log_every": 1, **changes}


def step_records(run):
    import json

    with open(run / "metrics.jsonl", encoding="utf-8") as f:
        return [r for r in map(json.loads, f) if r.get("kind") == "step"]


@pytest.fixture(scope="module")
def shards(synth_dir, tmp_path_factory):
    return build_test_shards(synth_dir, tmp_path_factory.mktemp("balance-shards"))


def test_trainer_logs_and_applies_ogm_ge_only_inside_the_window(shards, tmp_path):
    from avtrain.loop import fit

    run = tmp_path / "run"
    fit(trainer_config(shards, run, "ogm_ge", alpha=0.8, modulation_start=1,
                       modulation_end=1))
    records = step_records(run)
    assert {r["epoch"] for r in records} == {0, 1}
    for r in records:
        assert r["score_audio"] > 0 and r["score_visual"] > 0
        assert r["rho_visual"] == pytest.approx(r["score_visual"] / r["score_audio"], rel=1e-5)
        coeffs = (r["coeff_audio"], r["coeff_visual"])
        if r["epoch"] == 0:
            assert coeffs == (1.0, 1.0)
        else:  # the released two-modality rule always slows exactly one modality
            assert min(coeffs) < 1.0 and max(coeffs) == 1.0


@pytest.mark.parametrize("args,match", [
    (["--method", "ogm_ge", "--alpha", "-1"], "--alpha must be 0 or more"),
    (["--method", "ogm", "--modulation-start", "3", "--modulation-end", "2"],
     "--modulation-end"),
    (["--method", "ogm", "--modalities", "audio"], "at least two"),
])
@pytest.mark.slow
def test_cli_bad_balancing_options_are_one_line(shards, tmp_path, args, match):
    import subprocess
    import sys
    from pathlib import Path

    avtrain = Path(sys.executable).with_name("avtrain")
    run = tmp_path / "run"
    proc = subprocess.run([str(avtrain), "fit", "--shards", str(shards), "--run-dir", str(run),
                           "--model", "tiny", "--epochs", "1", "--batch-size", "4",
                           "--workers", "0", "--device", "cpu", "--no-progress", *args],
                          capture_output=True, text=True, timeout=HUNG_AFTER_S)
    out = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 2, out
    assert match in out and "Traceback" not in out
    assert len(out.splitlines()) == 1
    assert not run.exists()  # nothing written for a run that cannot start
