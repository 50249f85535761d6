"""Models: the logit dict of DESIGN §5 for every fusion, detached auxiliary heads, unimodal
models, frame folding in the visual encoder, and the registry's refusals."""

from __future__ import annotations

import pytest
import torch

from avprep.errors import UserError
from avtrain.models import FUSIONS, build_model

ALL_FUSIONS = ["sum", "concat", "film", "gated", "bilinear", "attention", "bilinear_tanh", "mha",
               "boost", "shared", "cosine"]
MIXING = ["film", "gated", "bilinear", "attention", "bilinear_tanh", "mha"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def batch(b=4, t=2, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"audio": torch.randn(b, 1, 40, 30, generator=g),
            "visual": torch.randn(b, t, 3, size, size, generator=g),
            "label": torch.arange(b) % 3}


def test_registry_lists_the_fusions():
    assert sorted(FUSIONS) == sorted(ALL_FUSIONS)


@pytest.mark.parametrize("fusion", ALL_FUSIONS)
def test_every_fusion_returns_fused_and_per_modality_logits(fusion):
    model = build_model("tiny", fusion, num_classes=5)
    out = model(batch())
    assert set(out) == {"fused", "audio", "visual"}
    assert all(v.shape == (4, 5) for v in out.values())
    feats = model.features(batch())
    assert set(feats) == {"audio", "visual"} and feats["audio"].shape[0] == 4


@pytest.mark.parametrize("fusion", ["sum", "concat"])
def test_decomposable_fusions_sum_exactly(fusion):
    model = build_model("tiny", fusion, num_classes=4)
    with torch.no_grad():  # a non-zero bias, so concat's b/2 split is really exercised
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.5)
    model.eval()
    out = model(batch())
    torch.testing.assert_close(out["fused"], out["audio"] + out["visual"], atol=1e-5, rtol=1e-5)


def test_boost_is_the_shared_head_ensemble():
    """ReconBoost's: one head for every modality, fused = beta * sum of the members' logits."""
    model = build_model("tiny", "boost", num_classes=3).eval()
    b = batch()
    feats, out, f = model.features(b), model(b), model.fusion
    for m in ("audio", "visual"):
        torch.testing.assert_close(out[m], f.head(feats[m]))
    assert [type(x).__name__ for x in f.head] == ["Linear", "ReLU", "Linear"]
    assert f.head[0].out_features == 256 and float(f.boost_rate.detach()) == 1.0
    with torch.no_grad():
        f.boost_rate.fill_(0.5)
        f.members.copy_(torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(model(b)["fused"], 0.5 * f.head(feats["audio"]))
    assert "fusion.members" in model.state_dict()


def test_concat_per_modality_logits_are_the_weight_split():
    model = build_model("tiny", "concat", num_classes=3).eval()
    b = batch()
    feats = model.features(b)
    w, bias = model.fusion.fc_out.weight, model.fusion.fc_out.bias
    d = feats["audio"].shape[1]
    expected = feats["audio"] @ w[:, :d].t() + bias / 2
    torch.testing.assert_close(model(b)["audio"], expected)


@pytest.mark.parametrize("fusion", MIXING)
def test_auxiliary_heads_do_not_train_the_encoders(fusion):
    model = build_model("tiny", fusion, num_classes=3)
    out = model(batch())
    out["audio"].sum().backward()
    assert all(p.grad is None for p in model.encoders.parameters())
    assert model.heads["audio"].weight.grad is not None


@pytest.mark.parametrize("fusion", ALL_FUSIONS)
def test_trained_unimodal_heads_reach_the_encoders(fusion):
    model = build_model("tiny", fusion, num_classes=3, trained_unimodal_heads=True)
    model(batch())["visual"].sum().backward()
    grads = [p.grad for p in model.encoders["visual"].parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in model.encoders["audio"].parameters())
    # the unimodal heads are their own layers, not the fusion's (OLM's o_x, o_y)
    assert all(p.grad is None for p in model.fusion.parameters())
    assert model.heads["visual"].weight.grad is not None


@pytest.mark.parametrize("fusion", ["sum", "concat"])
def test_olm_models_give_sum_and_concat_separate_unimodal_heads(fusion):
    model = build_model("tiny", fusion, num_classes=3, trained_unimodal_heads=True).eval()
    b = batch()
    out, feats = model(b), model.features(b)
    assert set(model.aux_heads) == {"audio", "visual"}
    for m in ("audio", "visual"):
        torch.testing.assert_close(out[m], model.aux_heads[m](feats[m]))
    assert model.spec["trained_unimodal_heads"] is True
    plain = build_model("tiny", fusion, num_classes=3)
    assert len(plain.state_dict()) < len(model.state_dict())  # the extra heads are saved


def test_olm_fusions_are_the_released_formulas():
    """bilinear = fc(W_v v * W_a a) (no tanh); attention = fc(s0 a + s1 v), s = fc_att(mlp([a; v]))
    (no activation, no softmax); film = fc(gamma(a) v + beta(a)); gated = fc(sigmoid(W_a a) W_v v)."""
    b = batch()
    for fusion in ("bilinear", "attention", "film", "gated"):
        model = build_model("tiny", fusion, num_classes=3).eval()
        f = model.fusion
        feats = model.features(b)
        a, v = feats["audio"], feats["visual"]
        if fusion == "bilinear":
            want = f.fc_out(f.proj_second(v) * f.proj_first(a))
        elif fusion == "attention":
            s = f.fc_att(f.attention_mlp(torch.cat([a, v], 1)))
            want = f.fc_out(a * s[:, 0:1] + v * s[:, 1:2])
        elif fusion == "film":
            gamma, beta = f.fc(a).chunk(2, dim=1)
            want = f.fc_out(gamma * v + beta)
        else:
            want = f.fc_out(torch.sigmoid(f.fc_gate(a)) * f.fc_value(v))
        torch.testing.assert_close(model(b)["fused"], want, msg=fusion)
    sizes = {n: tuple(p.shape) for n, p in build_model("tiny", "attention", 3).fusion
             .named_parameters()}
    assert sizes == {"attention_mlp.weight": (64, 128), "attention_mlp.bias": (64,),
                     "fc_att.weight": (2, 64), "fc_att.bias": (2,),
                     "fc_out.weight": (3, 64), "fc_out.bias": (3,)}


@pytest.mark.parametrize("modality", ["audio", "visual"])
def test_unimodal_model(modality):
    model = build_model("tiny", "concat", num_classes=3, modalities=[modality])
    b = batch()
    b.pop("visual" if modality == "audio" else "audio")  # the other input is not needed
    out = model(b)
    assert set(out) == {"fused", modality}
    assert torch.equal(out["fused"], out[modality])
    assert list(model.encoders) == [modality]


def test_visual_encoder_averages_frames_folded_into_the_batch():
    model = build_model("tiny", "sum", num_classes=3).eval()
    b = batch(b=2, t=3)
    together = model.features(b)["visual"]
    one_by_one = torch.stack([model.encoders["visual"](b["visual"][:, i]) for i in range(3)])
    torch.testing.assert_close(together, one_by_one.mean(dim=0), atol=1e-5, rtol=1e-5)


def test_resnet18_takes_one_channel_spectrograms_and_rgb_frames():
    model = build_model("resnet18", "concat", num_classes=6).eval()
    assert model.encoders["audio"].backbone.conv1.in_channels == 1
    assert model.encoders["visual"].backbone.conv1.in_channels == 3
    with torch.no_grad():
        out = model({"audio": torch.randn(2, 1, 64, 48), "visual": torch.randn(2, 2, 3, 64, 64)})
    assert out["fused"].shape == (2, 6)
    assert model.fusion.fc_out.in_features == 1024


def test_state_dict_has_no_shared_duplicates():
    model = build_model("tiny", "sum", num_classes=3)
    keys = list(model.state_dict())
    assert not any(k.startswith("heads.") for k in keys)  # `heads` is a view, not a copy
    assert model.heads["audio"] is model.fusion.fc["audio"]


@pytest.mark.parametrize("kwargs, words", [
    ({"model": "vgg"}, "unknown model"),
    ({"fusion": "product"}, "unknown fusion"),
    ({"modalities": ["audio", "depth"]}, "unknown modality"),
    ({"num_classes": 1}, "at least 2 classes"),
])
def test_bad_model_arguments_are_user_errors(kwargs, words):
    args = {"model": "tiny", "fusion": "concat", "num_classes": 3, **kwargs}
    with pytest.raises(UserError, match=words):
        build_model(**args)


def test_two_modality_fusions_refuse_a_single_modality():
    from avtrain.models.fusions import build_fusion

    with pytest.raises(UserError, match="exactly two"):
        build_fusion("film", ["audio"], {"audio": 8}, 3)
