"""Encoders by name per modality (issue #30): timm and torchvision backbones, pretrained weights
from local files, frozen or fine-tuned with their own learning rate, rebuilt from the checkpoint
spec by eval and resume. Random weights and local files only: nothing is downloaded."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from click.testing import CliRunner
from released import assert_one_error_line, fit_and_resume, method_fit_args

from avprep.errors import UserError
from avtrain.models import build_model, model_from_spec
from avtrain.models.encoders import (
    build_encoder,
    load_encoder_weights,
    load_pretrained,
    read_state_dict,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TIMM = "timm:test_resnet"  # timm's own small ResNet: random weights, fast on a CPU


def invoke(*args):
    from cli import avtrain

    return CliRunner().invoke(avtrain, [str(a) for a in args])


def batch(seed: int = 0, size: int = 32) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"audio": torch.randn(2, 1, size, size + 8, generator=g),
            "visual": torch.randn(2, 2, 3, size, size, generator=g)}


def saved_encoder(tmp_path, name: str = TIMM, modality: str = "visual", seed: int = 5,
                  fmt: str = "pt"):
    """A random encoder's backbone weights in a local file, as a library would save them."""
    torch.manual_seed(seed)
    encoder = build_encoder(name, modality)
    path = tmp_path / f"{modality}.{fmt}"
    state = {k: v.contiguous() for k, v in encoder.backbone.state_dict().items()}
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    return encoder, path


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_saved_weights_load_back_to_identical_features(tmp_path, fmt):
    encoder, path = saved_encoder(tmp_path, fmt=fmt)
    torch.manual_seed(6)  # other random weights first
    model = build_model("tiny", "concat", 3, encoders={"visual": TIMM})
    x = batch()["visual"]
    model.eval(), encoder.eval()
    assert not torch.allclose(model.encoders["visual"](x), encoder(x))
    load_pretrained(model, {"visual": str(path)})
    assert torch.equal(model.encoders["visual"](x), encoder(x))


def test_a_full_classification_state_dict_loads_without_its_classifier(tmp_path):
    import timm

    torch.manual_seed(1)
    full = timm.create_model("test_resnet", num_classes=10)
    torch.save(full.state_dict(), tmp_path / "full.pth")
    encoder = build_encoder(TIMM, "visual")
    load_encoder_weights(encoder, read_state_dict(str(tmp_path / "full.pth"), "visual"),
                         "visual", "full.pth")
    assert torch.equal(encoder.backbone.conv1[0].weight, full.conv1[0].weight)


def test_rgb_stem_weights_are_summed_into_a_one_channel_stem(tmp_path):
    visual, path = saved_encoder(tmp_path)
    audio = build_encoder(TIMM, "audio")
    load_encoder_weights(audio, read_state_dict(str(path), "audio"), "audio", str(path))
    rgb = visual.backbone.conv1[0].weight
    assert audio.backbone.conv1[0].weight.shape[1] == 1
    assert torch.equal(audio.backbone.conv1[0].weight, rgb.sum(dim=1, keepdim=True))
    grey = torch.randn(2, 1, 32, 32)  # a grey image: the summed stem answers as the RGB one
    torch.testing.assert_close(audio.backbone.conv1[0](grey),
                               visual.backbone.conv1[0](grey.expand(-1, 3, -1, -1)))


def test_weights_that_do_not_fit_name_the_keys(tmp_path):
    _, path = saved_encoder(tmp_path, name="timm:test_efficientnet")
    encoder = build_encoder(TIMM, "visual")
    with pytest.raises(UserError, match=r"does not fit the visual encoder: missing conv1\.0\."
                                        r"weight.*unexpected conv_stem\.weight"):
        load_encoder_weights(encoder, read_state_dict(str(path), "visual"), "visual",
                             str(path))


def test_a_pickled_file_is_refused_without_running_it(tmp_path):
    import pickle

    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"w": torch.nn.Linear(2, 2)}, f, protocol=2)  # a Module: code to rebuild
    with pytest.raises(UserError, match="not a weights-only state dict"):
        read_state_dict(str(path), "visual")


def test_frozen_backbone_keeps_eval_mode_and_gets_no_gradient():
    from avtrain.optim import build_optimizer
    from avtrain.settings import make_config

    torch.manual_seed(0)
    model = build_model("tiny", "concat", 3, encoders={"visual": TIMM},
                        temporal_pool="attention")
    model.freeze(["visual"])
    model.train()
    backbone = model.encoders["visual"].backbone
    assert not backbone.training and model.encoders["visual"].pool.training
    assert model.encoders["audio"].training
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    config = make_config({"lr": 0.1, "lr_for": {"audio": 0.01, "visual": 0.5}})
    opt = build_optimizer(config, model)
    # group 0 is the run's --lr (the logged one), then one group per --lr-for modality
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.01, 0.5]
    ids = [{id(p) for p in g["params"]} for g in opt.param_groups]
    assert ids[1] == {id(p) for p in model.encoders["audio"].parameters()}
    assert ids[2] == {id(p) for p in model.encoders["visual"].pool.parameters()}
    assert not any(id(p) in set().union(*ids) for p in backbone.parameters())
    loss = sum(v.sum() for v in model(batch()).values())
    loss.backward()
    opt.step()
    after = backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN running stats too
    assert any("running_mean" in k for k in before)


def test_attention_pool_is_a_weighted_mean_over_frames():
    encoder = build_encoder("tiny", "visual", temporal_pool="attention")
    feats = torch.randn(3, 4, encoder.out_dim)
    torch.nn.init.zeros_(encoder.pool.score.weight)  # equal scores: the plain mean
    torch.testing.assert_close(encoder.temporal(feats), feats.mean(dim=1))
    torch.nn.init.normal_(encoder.pool.score.weight)
    assert not torch.allclose(encoder.temporal(feats), feats.mean(dim=1))


def test_a_spec_without_encoder_settings_builds_as_before():
    """Checkpoints written before per-modality encoders: same keys, same state dict names."""
    model = build_model("tiny", "concat", 3)
    assert set(model.spec) == {"model", "fusion", "num_classes", "modalities",
                               "trained_unimodal_heads"}
    again = model_from_spec(dict(model.spec))
    assert list(again.state_dict()) == list(model.state_dict())
    assert all(k.startswith(("encoders.audio.backbone.", "encoders.visual.backbone.",
                             "fusion.")) for k in model.state_dict())


def test_library_encoders_report_their_width():
    model = build_model("torchvision:mobilenet_v3_small", "concat", 3,
                        encoders={"visual": TIMM})
    out = model.features(batch())
    assert out["audio"].shape == (2, model.encoders["audio"].out_dim) and \
        model.encoders["audio"].out_dim == 1024
    assert out["visual"].shape == (2, 96)


def test_a_patch_vit_takes_a_spectrogram_its_patches_do_not_divide():
    """AST-style: a standard ViT over a 257x188 spectrogram (patch 16 divides neither side);
    the input is padded to whole patches and the position table has one entry per patch."""
    from avtrain.models.encoders import build_encoder

    enc = build_encoder("timm:vit_tiny_patch16_224", "audio", input_size=(257, 188))
    assert enc.backbone.patch_embed.grid_size == (17, 12)
    out = enc(torch.randn(2, 1, 257, 188))
    assert out.shape == (2, enc.out_dim) and torch.isfinite(out).all()


# --- the CLI: a timm run's files, bad input -----------------------------------------------------


def fit_args(shards, run, *extra):
    return [*method_fit_args("none", shards, run, 1), "--no-shapley", *extra]


def test_pretrained_frozen_encoder_run_records_its_settings(method_shards, tmp_path):
    _, path = saved_encoder(tmp_path)
    run = tmp_path / "run"
    out = invoke(*fit_args(method_shards, run, "--encoder", f"visual={TIMM}", "--pretrained",
                           f"visual={path}", "--freeze", "visual", "--lr-for", "audio=0.2"))
    assert out.exit_code == 0, out.output
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["encoders"] == {"visual": TIMM}
    assert config["pretrained"] == {"visual": str(path)}
    assert config["freeze"] == ["visual"] and config["lr_for"] == {"audio": 0.2}
    from avtrain.checkpoint import load_checkpoint

    ckpt = load_checkpoint(str(run / "last.pt"))
    assert ckpt["spec"]["encoders"] == {"audio": "tiny", "visual": TIMM}
    saved = torch.load(path, weights_only=True)
    for key, value in saved.items():  # frozen: the file's weights and BN statistics, unchanged
        assert torch.equal(ckpt["model"][f"encoders.visual.backbone.{key}"], value), key
    assert [g["lr"] for g in ckpt["optimizer"]["param_groups"]] == [0.05, 0.2]


BAD = [
    (["--encoder", "sound=tiny"], "--encoder sound: unknown modality"),
    (["--encoder", "visual=timm:no_such_model"], "timm.list_models("),
    (["--encoder", "visual=no_such_net"], "unknown model 'no_such_net'"),
    (["--pretrained", "visual=missing.pt"], "no such file"),
    (["--freeze", "text"], "--freeze text: this run's modalities are audio, visual"),
    (["--lr-for", "visual=fast"], "expected a number"),
    (["--pretrained", "audio=timm"], "has no timm weights"),
    (["--encoder", f"visual={TIMM}", "--fusion", "attention"], "--feature-dim"),
    (["--model", "timm:test_vit", "--method", "greedy"], "does not run as its feature stages"),
    (["--model", "timm:test_vit", "--method", "ogm", "--alpha", "0.8"],
     "use --modulate encoder"),
    (["--model", "emt", "--freeze", "audio"], "not to the sequence model"),
]


@pytest.mark.parametrize("extra,words", BAD)
def test_bad_encoder_input_is_one_error_line(method_shards, tmp_path, extra, words):
    run = tmp_path / "run"
    args = fit_args(method_shards, run)
    for flag in ("--model", "--method", "--fusion"):
        if flag in extra and flag in args:
            i = args.index(flag)
            del args[i:i + 2]
    assert_one_error_line(invoke(*args, *extra), words, run)


def test_a_file_that_does_not_fit_is_one_error_line(method_shards, tmp_path):
    _, path = saved_encoder(tmp_path, name="tiny")
    run = tmp_path / "run"
    out = invoke(*fit_args(method_shards, run, "--encoder", f"visual={TIMM}", "--pretrained",
                           f"visual={path}"))
    assert_one_error_line(out, f"--pretrained visual={path} does not fit the visual encoder: "
                               "missing conv1.0.weight", run)


@pytest.mark.slow
def test_timm_run_resumes_and_evaluates_exactly(method_shards, tmp_path):
    """An audio ViT over the spectrogram (img_size from the preset: 129 x 126), a timm visual
    encoder with attention over time: --resume gives the uninterrupted run's weights, eval of
    best.pt its val accuracy, and its visual encoder loads into a new run (--pretrained
    RUN/best.pt) with identical features."""
    extra = ["--encoder", "audio=timm:test_vit", "--encoder", f"visual={TIMM}",
             "--temporal-pool", "attention", "--no-shapley"]
    full, part = tmp_path / "full", tmp_path / "part"
    a, b = fit_and_resume(lambda run, n: [*method_fit_args("none", method_shards, run, n),
                                          *extra], full, part, epochs=2)
    assert a["spec"]["input_sizes"] == {"audio": [129, 126]}
    for key in a["model"]:
        torch.testing.assert_close(b["model"][key], a["model"][key], rtol=1e-6, atol=1e-7,
                                   msg=key)
    out = invoke("report", full, part, "-o", tmp_path / "report")
    assert out.exit_code == 0, out.output
    assert (tmp_path / "report" / "report.md").is_file()
    summary = json.loads((full / "summary.json").read_text())
    out = invoke("eval", "--ckpt", full / "best.pt", "--split", "val", "--workers", "0",
                 "--device", "cpu", "--json", "--no-shapley")
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["acc"] == pytest.approx(summary["val"]["acc"])
    from avtrain.checkpoint import load_checkpoint, model_from_checkpoint

    trained = model_from_checkpoint(load_checkpoint(str(full / "best.pt"))).eval()
    torch.manual_seed(3)
    fresh = build_model("tiny", "concat", 3, encoders={"visual": TIMM},
                        temporal_pool="attention")
    load_pretrained(fresh, {"visual": str(full / "best.pt")})
    x = batch()["visual"]
    assert torch.equal(fresh.eval().encoders["visual"](x), trained.encoders["visual"](x))
