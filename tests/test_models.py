"""Models: the logit dict of DESIGN §5 for every fusion, detached auxiliary heads, unimodal
models, frame folding in the visual encoder, and the registry's refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

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


# --- references written from the released fusion modules, in plain torch ----------------------
# OLM (anonymous-gitlab/OLM @ c4a4244, models/fusion_modules.py) gives every fusion the two
# trained unimodal heads o_x, o_y beside its classifier; OGM-GE (GeWu-Lab/OGM-GE_CVPR2022 @
# 343dc1d, models/fusion_modules.py) has the same fused formulas without them. Each reference
# owns its parameters under the released names; ours are copied in through an explicit table
# (released name <- our name), so a formula, an operand order or a shape that differs fails.


class RefSum(nn.Module):  # OLM fusion_modules.py 81-94 (OGM-GE 5-13 without o_x, o_y)
    def __init__(self, d, c):
        super().__init__()
        self.fc_x, self.fc_y = nn.Linear(d, c), nn.Linear(d, c)
        self.o_x, self.o_y = nn.Linear(d, c), nn.Linear(d, c)

    def forward(self, x, y):
        return self.o_x(x), self.o_y(y), self.fc_x(x) + self.fc_y(y)


class RefConcat(nn.Module):  # OLM 97-109 (OGM-GE 16-24)
    def __init__(self, d, c):
        super().__init__()
        self.fc_out = nn.Linear(2 * d, c)
        self.o_x, self.o_y = nn.Linear(d, c), nn.Linear(d, c)

    def forward(self, x, y):
        return self.o_x(x), self.o_y(y), self.fc_out(torch.cat((x, y), dim=1))


class RefFiLM(nn.Module):  # OLM 112-142 (OGM-GE 27-56), x_film=True: audio conditions visual
    def __init__(self, d, c):
        super().__init__()
        self.dim = d
        self.fc, self.fc_out = nn.Linear(d, 2 * d), nn.Linear(d, c)
        self.o_x, self.o_y = nn.Linear(d, c), nn.Linear(d, c)

    def forward(self, x, y):
        gamma, beta = torch.split(self.fc(x), self.dim, 1)
        return self.o_x(x), self.o_y(y), self.fc_out(gamma * y + beta)


class RefGated(nn.Module):  # OLM 145-173 (OGM-GE 59-87), x_gate=True, dim 512
    def __init__(self, d, c, dim=512):
        super().__init__()
        self.fc_x, self.fc_y, self.fc_out = nn.Linear(d, dim), nn.Linear(d, dim), nn.Linear(dim, c)
        self.o_x, self.o_y = nn.Linear(d, c), nn.Linear(d, c)

    def forward(self, x, y):
        gate = torch.sigmoid(self.fc_x(x))
        return self.o_x(x), self.o_y(y), self.fc_out(torch.mul(gate, self.fc_y(y)))


class RefBilinear(nn.Module):  # OLM 59-78: o_x is the *visual* head, o_y the audio one
    def __init__(self, d, c, width=None):  # width: d (512 -> 512) as released
        super().__init__()
        w = width or d
        self.tucker_a, self.tucker_v = nn.Linear(d, w), nn.Linear(d, w)
        self.classifier = nn.Linear(w, c)
        self.o_x, self.o_y = nn.Linear(d, c), nn.Linear(d, c)

    def forward(self, audio, video):
        fused = self.tucker_v(video) * self.tucker_a(audio)
        return self.o_y(audio), self.o_x(video), self.classifier(fused)


class RefAttention(nn.Module):  # OLM 5-31
    def __init__(self, d, c):
        super().__init__()
        self.o_x, self.o_y = nn.Linear(d, c), nn.Linear(d, c)
        self.attention_mlp, self.fc_att = nn.Linear(2 * d, d), nn.Linear(d, 2)
        self.o_union = nn.Linear(d, c)

    def forward(self, x, y):
        score = self.fc_att(self.attention_mlp(torch.cat([x, y], dim=1))).unsqueeze(2)
        fused = torch.matmul(torch.stack([x, y], dim=2), score).squeeze(-1)
        return self.o_x(x), self.o_y(y), self.o_union(fused)


# released module name -> ours (fusion.* or aux_heads.*); the heads: audio, visual
RELEASED = {
    "sum": (RefSum, {"fc_x": "fusion.fc.audio", "fc_y": "fusion.fc.visual"}, ("o_x", "o_y")),
    "concat": (RefConcat, {"fc_out": "fusion.fc_out"}, ("o_x", "o_y")),
    "film": (RefFiLM, {"fc": "fusion.fc", "fc_out": "fusion.fc_out"}, ("o_x", "o_y")),
    "gated": (RefGated, {"fc_x": "fusion.fc_gate", "fc_y": "fusion.fc_value",
                         "fc_out": "fusion.fc_out"}, ("o_x", "o_y")),
    "bilinear": (RefBilinear, {"tucker_a": "fusion.proj_first", "tucker_v": "fusion.proj_second",
                               "classifier": "fusion.fc_out"}, ("o_y", "o_x")),
    "attention": (RefAttention, {"attention_mlp": "fusion.attention_mlp",
                                 "fc_att": "fusion.fc_att", "o_union": "fusion.fc_out"},
                  ("o_x", "o_y")),
}


@pytest.mark.parametrize("fusion", sorted(RELEASED))
def test_fusions_and_olm_heads_equal_the_released_modules(fusion):
    """With OLM's trained unimodal heads, the fused, audio and visual logits equal the released
    AVClassifier's fusion module on the same features (weights copied by the table above)."""
    torch.manual_seed(3)
    model = build_model("tiny", fusion, num_classes=5, trained_unimodal_heads=True).eval()
    ref_cls, table, (head_a, head_v) = RELEASED[fusion]
    ours = model.state_dict()
    width = model.features(batch())["audio"].shape[1]
    ref = ref_cls(width, 5)
    table = {**table, head_a: "aux_heads.audio", head_v: "aux_heads.visual"}
    ref.load_state_dict({f"{theirs}.{p}": ours[f"{mine}.{p}"] for theirs, mine in table.items()
                         for p in ("weight", "bias")}, strict=True)  # released shapes, all of them
    b = batch()
    feats = model.features(b)
    audio, visual, fused = ref(feats["audio"], feats["visual"])
    out = model(b)
    torch.testing.assert_close(out["fused"], fused, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out["audio"], audio, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out["visual"], visual, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(out["audio"], out["visual"])  # the heads are not one another


def test_fusion_reference_has_teeth():
    """The comparison above fails for a fusion that swaps its operands (FiLM conditioned on
    visual, the gate taken from visual) or adds a non-linearity (bilinear_tanh)."""
    torch.manual_seed(3)
    for fusion, swapped in (("film", True), ("gated", True), ("bilinear_tanh", False)):
        model = build_model("tiny", fusion, num_classes=5).eval()
        feats = {m: 10 * f for m, f in model.features(batch()).items()}  # out of tanh's linear part
        if fusion == "bilinear_tanh":
            ref = RefBilinear(feats["audio"].shape[1], 5, width=512)
            table = {"tucker_a": "proj_first", "tucker_v": "proj_second", "classifier": "fc_out"}
        else:
            ref = (RefFiLM if fusion == "film" else RefGated)(feats["audio"].shape[1], 5)
            table = ({"fc": "fc", "fc_out": "fc_out"} if fusion == "film" else
                     {"fc_x": "fc_gate", "fc_y": "fc_value", "fc_out": "fc_out"})
        fusion_state = model.fusion.state_dict()
        ref.load_state_dict({f"{t}.{p}": fusion_state[f"{m}.{p}"] for t, m in table.items()
                             for p in ("weight", "bias")}, strict=False)
        x, y = (feats["visual"], feats["audio"]) if swapped else (feats["audio"], feats["visual"])
        assert not torch.allclose(model.fusion(feats), ref(x, y)[2], rtol=1e-3, atol=1e-3), fusion


def test_attention_fusion_sizes_are_the_released_ones():
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
