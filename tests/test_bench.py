"""`avtrain bench`: methods x seeds under one protocol, resumable, local or on Ray (CPU)."""

from __future__ import annotations

import csv
import json
import os
import signal
import statistics
import tempfile
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from held import HUNG_AFTER_S, start_held, wait_until_held
from test_balance_ogm import step_records

from cli import avtrain

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.slow]  # pipelines, servers

EXAMPLE_PLUGIN = Path(__file__).resolve().parent.parent / "examples" / "unimodal_aux.py"
TINY = ["--model", "tiny", "--image-size", "32", "--batch-size", "8", "--steps-per-epoch", "2",
        "--workers", "0", "--lr", "0.05"]


def bench(shards, out, *args):
    return CliRunner().invoke(avtrain, ["bench", "--shards", str(shards), "-o", str(out),
                                        *TINY, *args])


def summaries(out):
    return {p.relative_to(out / "runs").parent.as_posix(): json.loads(p.read_text())
            for p in (out / "runs").glob("*/seed*/summary.json")}


def mtimes(out):
    return {str(p): p.stat().st_mtime_ns for p in (out / "runs").rglob("*") if p.is_file()}


def one_error(result, *needles):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    for needle in needles:
        assert needle in errors[0], errors[0]


@pytest.fixture(scope="module")
def main_bench(train_shards, tmp_path_factory):
    """2 methods x 2 seeds + audio-only and visual-only references, probes every epoch."""
    out = tmp_path_factory.mktemp("bench") / "B"
    result = bench(train_shards, out, "--methods", "none,ogm_ge", "--seeds", "2",
                   "--epochs", "2", "--probe-every", "1")
    assert result.exit_code == 0, result.output
    return out


def test_table_numbers_are_the_runs_numbers(main_bench):
    runs = summaries(main_bench)
    assert sorted(runs) == ["none/seed0", "none/seed1", "ogm_ge/seed0", "ogm_ge/seed1",
                            "ref-audio/seed0", "ref-audio/seed1", "ref-visual/seed0",
                            "ref-visual/seed1"]
    assert runs["ref-visual/seed0"]["modalities"] == ["visual"]
    assert runs["ogm_ge/seed1"]["method"] == "ogm_ge"
    with open(main_bench / "results.csv", newline="") as fh:
        table = {r["row"]: r for r in csv.DictReader(fh)}
    assert set(table) == {"none", "ogm_ge", "audio only", "visual only"}

    def of(slug, get):
        return [get(runs[f"{slug}/seed{s}"]) for s in (0, 1)]

    checks = {"acc": lambda s: s["test"]["acc"], "macro_f1": lambda s: s["test"]["macro_f1"],
              "acc_visual": lambda s: s["test"]["acc_visual"],
              "probe_visual": lambda s: s["linear_probe"]["visual"]["test_acc"],
              "probe_audio": lambda s: s["linear_probe"]["audio"]["test_acc"],
              "wall_time": lambda s: s["wall_time"]}
    for row, slug in (("none", "none"), ("ogm_ge", "ogm_ge")):
        for key, get in checks.items():
            values = of(slug, get)
            assert float(table[row][key]) == pytest.approx(statistics.mean(values), abs=1e-12)
            assert float(table[row][f"{key}_std"]) == pytest.approx(statistics.stdev(values),
                                                                    abs=1e-12)
    ref = of("ref-visual", lambda s: s["linear_probe"]["visual"]["test_acc"])
    assert float(table["visual only"]["probe_visual"]) == pytest.approx(statistics.mean(ref))
    base = statistics.mean(of("none", lambda s: s["linear_probe"]["visual"]["test_acc"]))
    ours = statistics.mean(of("ogm_ge", lambda s: s["linear_probe"]["visual"]["test_acc"]))
    if statistics.mean(ref) - base > 1e-9:
        assert float(table["ogm_ge"]["gap_closed_visual"]) == pytest.approx(
            (ours - base) / (statistics.mean(ref) - base))
    assert float(table["none"]["step_time_ratio"]) == pytest.approx(1.0)
    md = (main_bench / "results.md").read_text()
    assert "| ogm_ge | 2 |" in md and "## Paired comparison with `none`" in md
    assert "sign test gives p = 0.5" in md  # 2 seeds: nothing can be shown
    assert "not a side-by-side benchmark" in md


def test_probe_every_epoch_and_the_figures(main_bench, tmp_path):
    metrics = main_bench / "runs" / "ogm_ge" / "seed0" / "metrics.jsonl"
    epochs = [json.loads(x) for x in metrics.read_text().splitlines()]
    epochs = [r for r in epochs if r["kind"] == "epoch"]
    assert [e["epoch"] for e in epochs] == [0, 1]
    for e in epochs:
        assert set(e["probe"]) >= {"audio", "visual", "fused"}
        assert 0 <= e["probe"]["visual"] <= 1
        assert set(e["logit_norm"]) == {"fused", "audio", "visual"}
        assert e["step_time"] > 0
    out = CliRunner().invoke(avtrain, ["report", str(main_bench), "-o", str(tmp_path / "r")])
    assert out.exit_code == 0, out.output
    for name in ("probe_curves.png", "logit_norms.png"):
        data = (tmp_path / "r" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert "![probe_curves.png](probe_curves.png)" in (tmp_path / "r" / "results.md").read_text()


def test_rerun_trains_nothing(main_bench, train_shards, monkeypatch):
    before = mtimes(main_bench)

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr("avtrain.loop.fit", no_training)
    result = bench(train_shards, main_bench, "--methods", "none,ogm_ge", "--seeds", "2",
                   "--epochs", "2", "--probe-every", "1")
    assert result.exit_code == 0, result.output
    assert result.output.count("finished earlier, kept") == 8
    assert mtimes(main_bench) == before


def test_settings_added_later_keep_finished_runs(main_bench, train_shards, tmp_path,
                                                 monkeypatch):
    """A bench made before a setting existed (bench.json and each run's config.yaml lack it)
    is resumed, not refused, when the setting is at its default; a missing setting whose value
    now differs from its default is still a change."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(main_bench, old)

    def strip(path, key):
        if path.name == "bench.json":
            data = json.loads(path.read_text())
            data["protocol"].pop(key)
            path.write_text(json.dumps(data))
        else:
            data = yaml.safe_load(path.read_text())
            data.pop(key)
            data["run_dir"] = str(path.parent)  # the copy's own run folder
            path.write_text(yaml.safe_dump(data))

    files = [old / "bench.json", *old.glob("runs/*/*/config.yaml")]
    for path in files:
        strip(path, "epoch_steps")  # added after this bench was made; default "train"
        strip(path, "method_options")  # a mapping added later: default {}
    monkeypatch.setattr("avtrain.loop.fit", lambda *a, **k: pytest.fail("trained again"))
    common = ["--methods", "none,ogm_ge", "--seeds", "2", "--probe-every", "1"]
    result = bench(train_shards, old, *common, "--epochs", "2")
    assert result.exit_code == 0, result.output
    assert result.output.count("finished earlier, kept") == 8
    strip(old / "bench.json", "epochs")  # the default is not what this bench ran
    one_error(bench(train_shards, old, *common, "--epochs", "2"), "made with other settings",
              "epochs")


OLD_FLAT = {"modulate": "conv", "olm_initial": "mean", "olm_lr": None, "olm_reduction": "sum",
            "olm_heldout": "train", "pmr_momentum": None, "opm_theta_grad": "released",
            "agm_after_window": "hold", "greedy_loss": "unimodal", "mla_gate": "entropy",
            "mmpareto_gamma": None, "valuation_level": "sample", "cml_form": "balancemm",
            "lfm_schedule": "learnable", "gblending_offline": None, "mmcosine_eval_fused":
            "concat", "unimodal_teacher_runs": [], "unimodal_teacher_mode": "train"}


def test_a_bench_written_before_method_options_is_kept_and_reported(main_bench, train_shards,
                                                                   tmp_path, monkeypatch):
    """bench.json and config.yaml files as avbalance wrote them before method_options (every
    method's options at the top level, at their defaults): rerunning the bench keeps every
    run, and `avtrain report` still draws it."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(main_bench, old)
    data = json.loads((old / "bench.json").read_text())
    data["protocol"].pop("method_options")
    data["protocol"].pop("method_module")
    data["protocol"].update(OLD_FLAT)
    (old / "bench.json").write_text(json.dumps(data))
    for path in old.glob("runs/*/*/config.yaml"):
        config = yaml.safe_load(path.read_text())
        config.pop("method_options")
        config.pop("method_module")
        config.update(OLD_FLAT, run_dir=str(path.parent))
        path.write_text(yaml.safe_dump(config))
    monkeypatch.setattr("avtrain.loop.fit", lambda *a, **k: pytest.fail("trained again"))
    result = bench(train_shards, old, "--methods", "none,ogm_ge", "--seeds", "2",
                   "--probe-every", "1", "--epochs", "2")
    assert result.exit_code == 0, result.output
    assert result.output.count("finished earlier, kept") == 8
    report = CliRunner().invoke(avtrain, ["report", str(old)])
    assert report.exit_code == 0, report.output
    assert "ogm_ge" in (old / "results.md").read_text()


def test_changed_settings_and_bad_input_are_one_line(main_bench, train_shards, tmp_path):
    before = mtimes(main_bench)
    common = ["--methods", "none,ogm_ge", "--seeds", "2", "--probe-every", "1"]
    one_error(bench(train_shards, main_bench, *common, "--epochs", "3"),
              "made with other settings", "epochs 2 -> 3", "--overwrite")
    one_error(bench(train_shards, main_bench, "--methods", "none,nope", "--epochs", "2"),
              "unknown balancing method 'nope'")
    one_error(bench(train_shards, main_bench, "--methods", "none", "--seeds", ""), "--seeds")
    one_error(bench(train_shards, main_bench, "--methods", "none", "--seeds", "0"), "--seeds")
    one_error(bench(train_shards, main_bench, "--methods", "ogm_ge", "--set",
                    "ogm_ge.alpah=0.1"), "'alpah' is neither a setting nor an option of ogm_ge")
    one_error(bench(train_shards, main_bench, "--methods", "none", "--set", "ogm_ge.alpha=1"),
              "not in --methods")
    one_error(bench(train_shards, main_bench, "--methods", "ogm_ge", "--set",
                    "ogm_ge.alpha=x", "--epochs", "2"), "alpha")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    one_error(bench(train_shards, tmp_path / "other", "--methods", "none"), "not a bench folder")
    assert mtimes(main_bench) == before  # nothing computed was lost


def test_sweep_rows_and_overwrite(train_shards, tmp_path):
    out = tmp_path / "sweep"
    args = ["--methods", "ogm_ge", "--set", "ogm_ge.alpha=0.1,0.8", "--seeds", "1",
            "--no-references", "--epochs", "1"]
    result = bench(train_shards, out, *args)
    assert result.exit_code == 0, result.output
    runs = summaries(out)
    assert sorted(runs) == ["ogm_ge-alpha0.1/seed0", "ogm_ge-alpha0.8/seed0"]
    configs = {k: (out / "runs" / k / "config.yaml").read_text() for k in runs}
    assert "alpha: 0.1" in configs["ogm_ge-alpha0.1/seed0"]
    assert "alpha: 0.8" in configs["ogm_ge-alpha0.8/seed0"]
    with open(out / "results.csv", newline="") as fh:
        assert [r["row"] for r in csv.DictReader(fh)] == ["ogm_ge alpha=0.1", "ogm_ge alpha=0.8"]
    one_error(bench(train_shards, out, *args, "--lr", "0.1"), "lr 0.05 -> 0.1")
    result = bench(train_shards, out, *args, "--lr", "0.1", "--overwrite")
    assert result.exit_code == 0, result.output
    assert result.output.count(": trained in") == 2
    assert "lr: 0.1" in (out / "runs" / "ogm_ge-alpha0.1" / "seed0" / "config.yaml").read_text()


# Hold the bench inside its 2nd run, in that run's 2nd epoch (its epoch 0 has a last.pt).
HOLD_IN_RUN_2 = """
from avtrain import loop

_train_epoch = loop.Trainer.train_epoch


def hold_in_second_run(self, epoch, log):
    if self.config.run_dir.endswith("seed1") and epoch == 1:
        hold()
    return _train_epoch(self, epoch, log)


loop.Trainer.train_epoch = hold_in_second_run
"""


def test_killed_bench_resumes_its_interrupted_run(train_shards, tmp_path):
    out = tmp_path / "killed"
    args = ["bench", "--shards", str(train_shards), "-o", str(out), *TINY, "--methods", "none",
            "--seeds", "2", "--no-references", "--epochs", "2"]
    proc = start_held(HOLD_IN_RUN_2, "avtrain", args)
    wait_until_held(proc)  # provably inside run 2 (none/seed1), epoch 1
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=HUNG_AFTER_S)
    first = out / "runs" / "none" / "seed0"
    second = out / "runs" / "none" / "seed1"
    assert (first / "summary.json").is_file() and not (second / "summary.json").exists()
    assert (second / "last.pt").is_file()
    first_done = (first / "summary.json").stat().st_mtime_ns

    result = CliRunner().invoke(avtrain, args)
    assert result.exit_code == 0, result.output
    assert "none seed 0: finished earlier, kept" in result.output
    assert "none seed 1: resumed" in result.output
    assert (first / "summary.json").stat().st_mtime_ns == first_done
    records = [json.loads(x) for x in (second / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records].count("start") == 1  # continued, not restarted
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [0, 1]


def test_ray_gives_the_local_results(train_shards, tmp_path, monkeypatch):
    ray = pytest.importorskip("ray", reason="Ray is the optional extra avbalance[ray]")
    from avtrain.bench import run_bench

    settings = {"model": "tiny", "image_size": 32, "batch_size": 8, "steps_per_epoch": 2,
                "workers": 0, "epochs": 1, "tensorboard": False,
                "method_module": str(EXAMPLE_PLUGIN)}
    # unimodal_teacher: Ray must hold it back until its teachers (the references) finish;
    # unimodal_aux: a plug-in method, which each Ray task loads from its file
    kw = dict(methods="ogm_ge,unimodal_teacher,unimodal_aux", seeds=[0], say=lambda line: None)
    run_bench(str(train_shards), str(tmp_path / "local"), settings, **kw)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    except Exception as exc:  # no shared memory, no ports, ...: not the code under test
        pytest.skip(f"a local Ray cluster cannot start here: {exc}")
    try:
        run_bench(str(train_shards), str(tmp_path / "ray"), settings, executor="ray", **kw)
    finally:
        ray.shutdown()
    for row in ("ogm_ge", "unimodal_teacher", "unimodal_aux", "ref-audio", "ref-visual"):
        local = summaries(tmp_path / "local")[f"{row}/seed0"]
        remote = summaries(tmp_path / "ray")[f"{row}/seed0"]
        for key in ("best_epoch", "steps", "val", "test", "linear_probe", "replica_digests"):
            assert remote[key] == local[key], (row, key)
    assert sorted(os.listdir(tmp_path / "ray" / "runs" / "ogm_ge" / "seed0")) == \
        sorted(os.listdir(tmp_path / "local" / "runs" / "ogm_ge" / "seed0"))


def test_a_taught_method_learns_from_the_same_seeds_references(train_shards, tmp_path):
    """unimodal_teacher in a bench: its teachers are the bench's `X only` runs of its seed,
    trained before it; a given --teacher applies to its rows only; no references: one line."""
    from avtrain.bench import plan_runs
    from avtrain.settings import make_config

    out = tmp_path / "B"
    result = bench(train_shards, out, "--methods", "none,unimodal_teacher", "--seeds", "0,3",
                   "--epochs", "1", "--log-every", "1")
    assert result.exit_code == 0, result.output
    for seed in (0, 3):
        config = yaml.safe_load((out / "runs" / "unimodal_teacher" / f"seed{seed}" /
                                 "config.yaml").read_text())
        assert config["method_options"]["runs"] == [
            f"{m}={out / 'runs' / f'ref-{m}' / f'seed{seed}'}" for m in ("audio", "visual")]
        steps = step_records(out / "runs" / "unimodal_teacher" / f"seed{seed}")
        assert steps and all("distill_visual" in r for r in steps)
    none = yaml.safe_load((out / "runs" / "none" / "seed0" / "config.yaml").read_text())
    assert "runs" not in (none.get("method_options") or {})
    order = [line.split("] ")[1].split(":")[0] for line in result.output.splitlines()
             if line.startswith("[")]
    for seed in (0, 3):
        taught = order.index(f"unimodal_teacher seed {seed}")
        assert order.index(f"audio only seed {seed}") < taught
        assert order.index(f"visual only seed {seed}") < taught

    base = make_config({"model": "tiny", "shards": str(train_shards)})
    given = {"unimodal_teacher_runs": ["audio=/x", "visual=/y"]}
    runs = plan_runs(base, str(tmp_path / "C"), ["none", "unimodal_teacher"], [0],
                     references=False, teachers=given)
    assert [r.config["method_options"].get("runs", []) for r in runs] == [[], given[
        "unimodal_teacher_runs"]]
    assert all(r.needs == () for r in runs)
    one_error(bench(train_shards, tmp_path / "D", "--methods", "unimodal_teacher",
                    "--no-references"), "takes its teachers from the bench's", "--teacher")


def test_recorded_files_are_relative_to_the_bench_folder(tmp_path):
    """Shards and --pretrained weights are recorded relative to the folder (a moved bench
    still matches its protocol); hub weights, URLs and a --method-module (code, imported to
    compare settings) as given; an older bench.json with absolute paths compares equal."""
    from avtrain.bench import portable_protocol

    out = tmp_path / "bench"
    weights, plugin = tmp_path / "w" / "visual.pt", str(tmp_path / "my_method.py")
    absolute = {"shards": str(tmp_path / "shards"), "epochs": 3,
                "pretrained": {"visual": str(weights), "audio": "timm"},
                "method_module": plugin}
    recorded = portable_protocol(absolute, str(out))
    assert recorded == {"shards": "../shards", "epochs": 3,
                        "pretrained": {"visual": "../w/visual.pt", "audio": "timm"},
                        "method_module": plugin}
    assert portable_protocol(recorded, str(out)) == recorded
    named = portable_protocol({"shards": "s3://b/x", "pretrained": {}}, str(out))
    assert named == {"shards": "s3://b/x", "pretrained": {}}
