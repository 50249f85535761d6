"""Sequence transformers (emt, mbt, umt, ca) over three modalities and the byte text encoder:
shapes, padding masks, missing modalities, training with OGM-GE and OLM, bad options."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from avprep.errors import UserError
from avtrain.balance import build_balancer
from avtrain.models.sequence import (
    SEQUENCE_MODELS,
    build_sequence_model,
    input_specs,
    spectrogram_bins,
)
from avtrain.models.text import TextEncoder, encode_text, pad_tokens

NAMES = sorted(SEQUENCE_MODELS)
MODS = ["audio", "visual", "text"]
INPUTS = {"audio": {"kind": "features", "dim": 12}, "visual": {"kind": "features", "dim": 7},
          "text": {"kind": "tokens", "dim": 257}}
TINY = {"d_model": 32, "heads": 4, "layers": 1, "bottleneck": 3, "ff": 64, "text_dim": 16,
        "text_layers": 1, "fusion_layer": 0}
SENTENCES = ["I am so happy today", "leave me alone", "", "what?! no way"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(name, **kw):
    return build_sequence_model(name, 3, MODS, INPUTS, **{**TINY, **kw})


def make_batch(gen: torch.Generator, b: int = 4) -> dict:
    a_len = torch.tensor([5, 3, 8, 0])[:b]  # the 4th clip has no audio at all
    v_len = torch.tensor([2, 6, 6, 1])[:b]
    tokens, t_len = pad_tokens([encode_text(s) for s in SENTENCES[:b]])
    return {"audio": torch.randn(b, 8, 12, generator=gen), "audio_len": a_len,
            "visual": torch.randn(b, 6, 7, generator=gen), "visual_len": v_len,
            "text": tokens, "text_len": t_len, "label": torch.tensor([0, 1, 2, 1])[:b]}


def scramble_padding(batch: dict, gen: torch.Generator) -> dict:
    out = dict(batch)
    for m in ("audio", "visual"):
        x = batch[m].clone()
        for i, n in enumerate(batch[f"{m}_len"].tolist()):
            x[i, n:] = 50 * torch.randn(x[i, n:].shape, generator=gen)
        out[m] = x
    t = batch["text"].clone()
    for i, n in enumerate(batch["text_len"].tolist()):
        t[i, n:] = 200
    out["text"] = t
    return out


@pytest.mark.parametrize("name", NAMES)
def test_outputs_and_masks(name):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    model = tiny(name).eval()
    batch = make_batch(gen)
    out = model(batch)
    assert set(out) == {"fused", *MODS}
    assert all(v.shape == (4, 3) and torch.isfinite(v).all() for v in out.values())
    # padded positions (and the all-padding audio of clip 3) cannot change any output
    again = model(scramble_padding(batch, gen))
    for k in out:
        torch.testing.assert_close(again[k], out[k], rtol=0, atol=1e-5)
    # ...but a valid position does, in that modality and in the fused logits
    changed = dict(batch)
    changed["visual"] = batch["visual"].clone()
    changed["visual"][0, 0] += 3.0
    moved = model(changed)
    assert not torch.allclose(moved["visual"][0], out["visual"][0])
    assert not torch.allclose(moved["fused"][0], out["fused"][0])
    for k in out:  # clips do not see each other
        torch.testing.assert_close(moved[k][1:], out[k][1:], rtol=0, atol=1e-5)
    feats = model.features(batch)
    assert set(feats) == set(MODS) and all(f.shape == (4, 32) for f in feats.values())


@pytest.mark.parametrize("name", NAMES)
def test_length_defaults_to_full_sequence(name):
    torch.manual_seed(0)
    model = tiny(name).eval()
    batch = make_batch(torch.Generator().manual_seed(2))
    full = {k: v for k, v in batch.items() if k not in ("audio_len", "visual_len")}
    explicit = dict(batch, audio_len=torch.full((4,), 8), visual_len=torch.full((4,), 6))
    a, b = model(full), model(explicit)
    for k in a:
        torch.testing.assert_close(a[k], b[k])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("method", ["ogm_ge", "olm"])
def test_one_epoch_with_balancing(name, method):
    """Drive model + balancer through the loop's hooks (balance/base.py) for one epoch of a
    tiny learnable task: the loss falls and every branch's parameters move."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(3)
    heads = method == "olm"
    model = tiny(name, trained_unimodal_heads=heads, dropout=0.0)
    balancer = build_balancer(method, model, {"alpha": 0.5, "seed": 0, "modulate": "encoder"},
                              modalities=model.modalities)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    before = {m: [p.detach().clone() for p in model.encoders[m].parameters()] for m in MODS}
    batches = []
    for _ in range(6):
        b = make_batch(gen)
        b["audio"] = b["audio"] + 2.0 * F.one_hot(b["label"], 12)[:, None].float()
        batches.append(b)
    losses = []
    for epoch in range(2):
        for step, b in enumerate(batches):
            logits = model(b)
            loss = balancer.loss(logits, b["label"], epoch=epoch, step=step)
            opt.zero_grad()
            loss.backward()
            balancer.before_optimizer_step(logits, b["label"], epoch=epoch, step=step)
            opt.step()
            balancer.after_optimizer_step()
            losses.append(float(loss.detach()))
        balancer.end_epoch(epoch)
    assert losses[-1] < losses[0]
    metrics = balancer.step_metrics()
    if method == "ogm_ge":
        assert {f"coeff_{m}" for m in MODS} <= set(metrics)
    else:
        assert balancer.weights.shape == (4,)  # audio, visual, text, fused
    for m in MODS:
        moved = any(not torch.equal(p0, p) for p0, p in
                    zip(before[m], model.encoders[m].parameters()))
        assert moved, m


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("fusion_layer", [0, 1])
def test_fused_loss_reaches_every_parameter(name, fusion_layer):
    """A baseline trains on the fused logits only: every parameter but the measuring heads must
    get a gradient (or it never trains, and DDP stops on unused parameters)."""
    torch.manual_seed(0)
    model = tiny(name, layers=2, fusion_layer=fusion_layer)
    out = model(make_batch(torch.Generator().manual_seed(5)))
    F.cross_entropy(out["fused"], torch.tensor([0, 1, 2, 1])).backward()
    idle = [n for n, p in model.named_parameters()
            if p.grad is None and not n.startswith("aux_heads.")]
    assert idle == []


def test_ogm_default_conv_rule_finds_kernels():
    model = tiny("emt")
    balancer = build_balancer("ogm", model, {}, modalities=model.modalities)
    assert len(balancer.groups) == 3 and all(balancer.groups)


def test_detached_heads_do_not_train_encoders():
    model = tiny("ca")
    out = model(make_batch(torch.Generator().manual_seed(4)))
    F.cross_entropy(out["text"], torch.tensor([0, 1, 2, 1])).backward()
    assert all(p.grad is None for p in model.encoders["text"].parameters())
    assert model.aux_heads["text"].weight.grad is not None


def test_raw_inputs_spectrogram_frames_tokens():
    index = {"preset": {"spectrogram": {"recipe": "log_mel", "n_mels": 16}},
             "features": {}}
    inputs = input_specs(index, MODS)
    assert inputs == {"audio": {"kind": "spectrogram", "dim": 16},
                      "visual": {"kind": "frames", "dim": 3},
                      "text": {"kind": "tokens", "dim": 257}}
    model = build_sequence_model("umt", 4, MODS, inputs, **TINY).eval()
    tokens, lengths = pad_tokens([encode_text("héllo"), encode_text("")])
    batch = {"audio": torch.randn(2, 1, 16, 30), "visual": torch.randn(2, 3, 3, 32, 32),
             "text": tokens, "text_len": lengths}
    out = model(batch)
    assert all(v.shape == (2, 4) for v in out.values())
    # audio padded to 30 columns with 21 valid: columns past 21 are ignored
    scrambled = dict(batch, audio_len=torch.tensor([21, 30]))
    ref = model(scrambled)
    noisy = batch["audio"].clone()
    noisy[0, :, :, 21:] = 99.0
    torch.testing.assert_close(model(dict(scrambled, audio=noisy))["fused"], ref["fused"])


def test_input_specs_features_and_spectrogram_bins():
    index = {"features": {"audio": {"dim": 1024}, "text": {"dim": 768}},
             "preset": {"spectrogram": {"recipe": "stft_log", "n_fft": 512}}}
    spec = input_specs(index, ["audio", "text"])
    assert spec == {"audio": {"kind": "features", "dim": 1024},
                    "text": {"kind": "features", "dim": 768}}
    assert spectrogram_bins(index["preset"]) == 257
    with pytest.raises(UserError, match="face"):
        input_specs(index, ["face"])


def test_defaults_match_the_olm_code():
    model = build_sequence_model("emt", 6, ["audio", "visual"],
                                 {"audio": {"kind": "features", "dim": 1024},
                                  "visual": {"kind": "features", "dim": 1024}})
    assert model.d_model == 768 and model.n_layers == 3
    assert model.fusion.bottleneck.shape == (1, 12, 768)
    assert model.encoders["audio"].layers[0].attn.num_heads == 8
    assert model.spec["options"]["d_model"] == 768


def test_bad_options():
    with pytest.raises(UserError, match="multiple of heads"):
        tiny("emt", d_model=30)
    with pytest.raises(UserError, match="two or more"):
        build_sequence_model("mbt", 3, ["audio"], INPUTS, **TINY)
    with pytest.raises(UserError, match="fusion_layer"):
        tiny("mbt", fusion_layer=5)
    with pytest.raises(UserError, match="no input description"):
        build_sequence_model("ca", 3, ["audio", "depth"], INPUTS, **TINY)
    with pytest.raises(UserError, match="unknown option 'heds'"):
        tiny("ca", heds=2)
    with pytest.raises(UserError, match="unknown sequence model"):
        build_sequence_model("bert", 3, MODS, INPUTS)


def test_text_encoder_bytes_and_padding():
    ids = encode_text("añ")
    assert ids.tolist() == [ord("a") + 1, 0xC3 + 1, 0xB1 + 1]
    assert encode_text("x" * 999, max_len=10).numel() == 10
    tokens, lengths = pad_tokens([ids, encode_text("")])
    assert tokens.shape == (2, 3) and lengths.tolist() == [3, 0]
    enc = TextEncoder(dim=16, layers=1, heads=2).eval()
    out = enc(tokens, lengths)
    assert out.shape == (2, 16) and torch.isfinite(out).all()
    tokens[1, :] = 5  # beyond its length 0: still the empty transcript
    torch.testing.assert_close(enc(tokens, lengths), out)
