"""Each modality's Shapley contribution to the fused accuracy: the rule by hand, and what every
run reports (summary.json, `avtrain eval`) checked against evaluations done here by hand."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from released import method_fit_args
from test_balance_ogm import build_test_shards

from avtrain.shapley import shapley_summary, shapley_values, subsets, zero_absent

AV = ("audio", "visual")


def test_two_modalities_by_hand():
    # v(none) .1, v(a) .6, v(v) .3, v(av) .8:
    # phi_a = 1/2 (v(a) - v(none)) + 1/2 (v(av) - v(v)) = 1/2 (.5) + 1/2 (.5) = .5
    # phi_v = 1/2 (v(v) - v(none)) + 1/2 (v(av) - v(a)) = 1/2 (.2) + 1/2 (.2) = .2
    v = {(): 0.1, ("audio",): 0.6, ("visual",): 0.3, AV: 0.8}
    phi = shapley_values(v, AV)
    assert phi["audio"] == pytest.approx(0.5) and phi["visual"] == pytest.approx(0.2)
    summary = shapley_summary(v, AV)
    assert summary["subsets"] == {"none": 0.1, "audio": 0.6, "visual": 0.3,
                                  "audio+visual": 0.8}


def test_three_modalities_by_hand():
    mods = ("audio", "visual", "text")
    assert subsets(mods)[0] == () and subsets(mods)[-1] == mods and len(subsets(mods)) == 8
    # an additive game v(S) = sum of w over S: each modality gets exactly its w
    w = {"audio": 0.4, "visual": 0.25, "text": 0.05}
    phi = shapley_values({s: sum(w[m] for m in s) for s in subsets(mods)}, mods)
    assert phi == pytest.approx(w)
    # majority game (1 when two or more are present): symmetric, 1/3 each
    phi = shapley_values({s: float(len(s) >= 2) for s in subsets(mods)}, mods)
    assert list(phi.values()) == pytest.approx([1 / 3] * 3)
    # audio alone adds .5; visual and text only together add .3: of the 6 orders of arrival,
    # text completes the pair in the 3 where visual came first (v,t,a / v,a,t / a,v,t):
    # 3/6 * .3 = .15 each for visual and text, and audio its .5
    v = {s: 0.5 * ("audio" in s) + 0.3 * ({"visual", "text"} <= set(s)) for s in subsets(mods)}
    phi = shapley_values(v, mods)
    assert phi["audio"] == pytest.approx(0.5)
    assert phi["visual"] == pytest.approx(0.15) and phi["text"] == pytest.approx(0.15)


def test_per_sample_values_are_tensors():
    # two samples, 0/1 correctness per subset: sample 0 right only with audio, 1 always right
    v = {(): torch.tensor([0.0, 1.0]), ("audio",): torch.tensor([1.0, 1.0]),
         ("visual",): torch.tensor([0.0, 1.0]), AV: torch.tensor([1.0, 1.0])}
    phi = shapley_values(v, AV)
    assert phi["audio"].tolist() == [1.0, 0.0] and phi["visual"].tolist() == [0.0, 0.0]


def test_zero_absent_keeps_the_batch():
    batch = {"audio": torch.ones(2, 1, 4, 4), "visual": torch.ones(2, 1, 3, 4, 4),
             "label": torch.tensor([0, 1]), "key": ["a", "b"]}
    out = zero_absent(batch, ("audio",), AV)
    assert torch.equal(out["audio"], batch["audio"]) and out["key"] == ["a", "b"]
    assert out["visual"].shape == batch["visual"].shape and not out["visual"].any()
    assert batch["visual"].all()  # the caller's batch is untouched


@pytest.fixture(scope="module")
def finished_run(synth_dir, tmp_path_factory):
    from cli import avtrain

    tmp = tmp_path_factory.mktemp("shapley")
    shards = build_test_shards(synth_dir, tmp / "shards")
    run = tmp / "run"
    out = CliRunner().invoke(avtrain, method_fit_args("none", shards, run, 2))
    assert out.exit_code == 0, out.output
    assert "Shapley share of acc: audio" in out.output
    return shards, run, json.loads((run / "summary.json").read_text())


class _Zeroing(torch.nn.Module):
    """The model with some modalities' inputs replaced by zeros: the subset's value, by hand."""

    def __init__(self, model, present):
        super().__init__()
        self.inner, self.present = model, present
        self.modalities = [m for m in model.modalities if m in present]

    def forward(self, batch):
        batch = dict(batch)
        for m in self.inner.modalities:
            if m not in self.present:
                batch[m] = batch[m] * 0
        return self.inner(batch)


def test_every_run_reports_shapley_equal_to_hand_evaluations(finished_run):
    from avtrain.checkpoint import load_checkpoint, model_from_checkpoint
    from avtrain.data import open_shards
    from avtrain.evaluate import data_options, evaluate

    shards_dir, run, summary = finished_run
    ckpt = load_checkpoint(str(run / "best.pt"))
    shards = open_shards(str(shards_dir))
    model = model_from_checkpoint(ckpt, shards)
    opts = data_options(ckpt["config"], shards, model.modalities)
    for split in ("val", "test"):
        got = summary["shapley"][split]
        assert set(got) == {"audio", "visual", "subsets"}
        assert got["subsets"]["audio+visual"] == pytest.approx(summary[split]["acc"], abs=1e-6)
        for present in ((), ("audio",), ("visual",)):
            want = evaluate(_Zeroing(model, present), shards, split, opts, batch_size=4,
                            workers=0)["acc"]
            assert got["subsets"]["+".join(present) or "none"] == pytest.approx(want, abs=1e-6)
        v = got["subsets"]
        assert got["audio"] == pytest.approx(
            0.5 * (v["audio"] - v["none"]) + 0.5 * (v["audio+visual"] - v["visual"]), abs=1e-5)
        assert got["audio"] + got["visual"] == pytest.approx(v["audio+visual"] - v["none"],
                                                             abs=1e-5)


def test_eval_reports_it_and_no_shapley_skips_it(finished_run):
    from cli import avtrain

    shards, run, summary = finished_run
    args = ["eval", "--ckpt", str(run / "best.pt"), "--split", "val", "--workers", "0",
            "--device", "cpu"]
    out = CliRunner().invoke(avtrain, [*args, "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["shapley"] == summary["shapley"]["val"]
    table = CliRunner().invoke(avtrain, args)
    assert table.exit_code == 0 and "Shapley share of acc: audio" in table.output
    skipped = CliRunner().invoke(avtrain, [*args, "--json", "--no-shapley"])
    assert skipped.exit_code == 0 and "shapley" not in json.loads(skipped.output)


def test_unimodal_and_no_shapley_runs_have_none(finished_run, tmp_path):
    from cli import avtrain

    shards, _, _ = finished_run
    for name, extra in (("audio", {"modalities": "audio"}), ("off", {})):
        run = tmp_path / name
        args = method_fit_args("none", shards, run, 1, **extra)
        if name == "off":
            args.append("--no-shapley")
        out = CliRunner().invoke(avtrain, args)
        assert out.exit_code == 0, out.output
        assert "shapley" not in json.loads((run / "summary.json").read_text())


def test_report_lists_each_modalitys_share(finished_run, tmp_path):
    from avtrain.report import write_report

    _, run, summary = finished_run
    result = write_report([str(run)], str(tmp_path / "out"))
    (row,) = result["rows"]
    assert row["shapley_audio"] == summary["shapley"]["test"]["audio"]
    assert row["shapley_visual"] == summary["shapley"]["test"]["visual"]
    assert "shapley_audio" in (tmp_path / "out" / "report.md").read_text()
