"""`avtrain bench --tune N`: each method tuned on val (Optuna trials as fit runs under
BENCH/tune), then a tuned row on the bench's seeds; resumable, prunable, on Ray; bad input."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import signal
import tempfile
from pathlib import Path

import optuna
import pytest
import yaml
from click.testing import CliRunner
from held import HUNG_AFTER_S, start_held, wait_until_held

from cli import avtrain

pytestmark = [pytest.mark.usefixtures("one_torch_thread")]

TINY = ["--model", "tiny", "--image-size", "32", "--batch-size", "8", "--steps-per-epoch", "2",
        "--workers", "0", "--lr", "0.05"]
# a plug-in method with a declared tuning range (built-in ranges belong to each method module)
PLUGIN = '''
import torch.nn.functional as F

from avtrain.balance import Balancer, Option
from avtrain.options import Search


class TunableAux(Balancer):
    """Fused CE + weight x each modality's own CE, its weight searched by bench --tune."""

    name = "tunable_aux"
    title = "tunable aux (test plug-in)"
    summary = "fused CE plus weight x each modality's CE"
    options = (Option("weight", float, 1.0, "weight of each modality's own CE", minimum=0,
                      search=Search(0.1, 2.0, log=True)),)

    def loss(self, logits, labels, *, epoch, step):
        fused = F.cross_entropy(logits["fused"].float(), labels)
        own = sum(F.cross_entropy(logits[m].float(), labels) for m in self.modalities)
        return fused + self.opt.weight * own
'''


@pytest.fixture(scope="session")
def plugin(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("plugin") / "tunable_aux.py"
    path.write_text(PLUGIN)
    return path


def bench(shards, out, plugin, *args):
    return CliRunner().invoke(avtrain, ["bench", "--shards", str(shards), "-o", str(out), *TINY,
                                        "--method-module", str(plugin), *args])


def one_error(result, *needles):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    for needle in needles:
        assert needle in errors[0], errors[0]


def study(out, method="tunable_aux", storage=None):
    return optuna.load_study(study_name=method,
                             storage=storage or f"sqlite:///{out / 'tune.db'}")


def states(out, method="tunable_aux"):
    return [t.state.name for t in study(out, method).get_trials()]


def mtimes(folder: Path) -> dict:
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def table(out) -> dict:
    with open(out / "results.csv", newline="") as fh:
        return {r["row"]: r for r in csv.DictReader(fh)}


def val_accs(run_dir: Path) -> list[float]:
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["val"]["acc"] for r in records if r["kind"] == "epoch"]


TUNED = ["--methods", "none,tunable_aux", "--seeds", "1", "--no-references", "--epochs", "2",
         "--tune-epochs", "3"]


@pytest.fixture(scope="module")
def tuned(train_shards, plugin, tmp_path_factory):
    """A bench tuned with 2 trials: `none` declares nothing, tunable_aux searches its weight."""
    import torch

    out = tmp_path_factory.mktemp("tune") / "B"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as one_torch_thread, which a module fixture runs before
    try:
        result = bench(train_shards, out, plugin, *TUNED, "--tune", "2")
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    return out, result.output


def test_tune_then_the_seeded_runs(tuned):
    out, output = tuned
    assert "tune none: nothing to tune" in output
    rows = table(out)
    assert list(rows) == ["none", "tunable_aux", "tunable_aux (tuned)"]  # none: no tuned row
    assert rows["none"]["chosen"] == "nothing to tune"
    trials = study(out).get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    for t in trials:  # each trial is a fit run that reported its own val accuracy per epoch
        run = out / "tune" / "tunable_aux" / f"trial{t.number:03d}"
        config = yaml.safe_load((run / "config.yaml").read_text())
        assert config["seed"] == 1000 and config["epochs"] == 3 and config["test_split"] == ""
        assert config["method_options"]["weight"] == t.params["tunable_aux_weight"]
        assert [t.intermediate_values[e] for e in range(3)] == val_accs(run)
        assert t.value == max(val_accs(run))
        summary = json.loads((run / "summary.json").read_text())
        assert summary["test"] is None  # tuning never read the test split
    best = max(trials, key=lambda t: (t.value, -t.number))
    weight = best.params["tunable_aux_weight"]
    tuned_run = out / "runs" / "tunable_aux-tuned" / "seed0"
    config = yaml.safe_load((tuned_run / "config.yaml").read_text())
    assert config["method_options"]["weight"] == weight
    assert config["epochs"] == 2 and config["seed"] == 0 and config["test_split"] == "test"
    test_acc = json.loads((tuned_run / "summary.json").read_text())["test"]["acc"]
    assert float(rows["tunable_aux (tuned)"]["acc"]) == pytest.approx(test_acc)
    assert rows["tunable_aux (tuned)"]["chosen"] == f"tunable_aux_weight={weight:.4g}"
    assert rows["tunable_aux (tuned)"]["trial_budget"] == \
        "2 × 3 epochs (2 complete, 0 pruned, 0 failed)"
    md = (out / "results.md").read_text()
    assert "## Tuning on val" in md and "![tune.png](tune.png)" in md
    assert f"| tunable_aux | tunable_aux_weight 0.1..2 (log) | tunable_aux_weight={weight:.4g}" \
        in md
    assert "| tunable_aux (tuned) | acc |" in md  # paired with none, like every row
    record = json.loads((out / "tune.json").read_text())
    assert record["methods"]["none"]["nothing_to_tune"]
    assert [t["run_dir"] for t in record["methods"]["tunable_aux"]["trials"]] == \
        ["tune/tunable_aux/trial000", "tune/tunable_aux/trial001"]


def test_rerun_adds_trials_prunes_and_keeps_what_finished(tuned, train_shards, plugin):
    """Three trials that scored 1.5 (above any accuracy) are added to the study: the next real
    trial falls below the median at its 2nd epoch and is pruned there; the best is now one of
    them, so the tuned row is trained again with its weight; nothing finished is rerun."""
    out, _ = tuned
    s = study(out)
    dist = {"tunable_aux_weight": optuna.distributions.FloatDistribution(0.1, 2.0, log=True)}
    for weight in (0.5, 0.6, 0.7):
        s.add_trial(optuna.trial.create_trial(params={"tunable_aux_weight": weight},
                                              distributions=dist, value=1.5,
                                              intermediate_values={0: 1.5, 1: 1.5, 2: 1.5}))
    kept = {k: v for k, v in mtimes(out).items() if "/runs/tunable_aux-tuned/" not in k
            and k.endswith(("summary.json", "best.pt"))}
    result = bench(train_shards, out, plugin, *TUNED, "--tune", "6")
    assert result.exit_code == 0, result.output
    assert "tune tunable_aux: trial 5 (6/6) tunable_aux_weight=" in result.output
    assert "pruned after 2 epochs" in result.output
    assert states(out) == ["COMPLETE"] * 5 + ["PRUNED"]
    pruned = out / "tune" / "tunable_aux" / "trial005"
    assert len(val_accs(pruned)) == 2  # stopped after its 2nd epoch, of 3
    assert json.loads((pruned / "summary.json").read_text())["stopped_after_epoch"] == 1
    assert "tunable_aux (tuned) seed 0: the chosen values changed; trained again" in result.output
    config = yaml.safe_load((out / "runs" / "tunable_aux-tuned" / "seed0" / "config.yaml")
                            .read_text())
    assert config["method_options"]["weight"] == 0.5  # the first of the best (ties: earliest)
    assert table(out)["tunable_aux (tuned)"]["trial_budget"] == \
        "6 × 3 epochs (5 complete, 1 pruned, 0 failed)"
    now = mtimes(out)
    assert {k: now[k] for k in kept} == kept  # trials and default runs: not trained again
    again = bench(train_shards, out, plugin, *TUNED, "--tune", "6")
    assert again.exit_code == 0 and "tune tunable_aux: trial" not in again.output


def test_report_redraws_from_the_folder_alone_wherever_it_is(tuned, tmp_path):
    out, _ = tuned
    moved = tmp_path / "elsewhere" / "B"
    shutil.copytree(out, moved)
    for name in ("results.md", "results.csv", "runs.csv", "tune.png"):
        (moved / name).unlink()
    result = CliRunner().invoke(avtrain, ["report", str(moved)])
    assert result.exit_code == 0, result.output
    assert (moved / "tune.png").is_file()
    assert (moved / "results.md").read_text() == (out / "results.md").read_text()
    assert (moved / "results.csv").read_text() == (out / "results.csv").read_text()
    saved = json.loads((moved / "bench.json").read_text())
    assert not os.path.isabs(saved["protocol"]["shards"])
    for name in ("bench.json", "results.md", "results.csv", "runs.csv", "tune.json"):
        assert str(out) not in (moved / name).read_text(), name


def test_bad_input_is_one_line_and_loses_nothing(tuned, train_shards, plugin, tmp_path):
    out, _ = tuned
    before = mtimes(out)
    digest = hashlib.sha256((out / "tune.db").read_bytes()).hexdigest()
    count = len(study(out).get_trials())

    def run(*args):
        return bench(train_shards, out, plugin, *TUNED, *args)

    one_error(run("--tune", "0"), "--tune must be at least 1")
    one_error(run("--tune", "-3"), "--tune must be at least 1")
    one_error(run("--tune", "2", "--tune-space", "lr=0.1..0.01"), "lr=0.1..0.01", "empty")
    one_error(run("--tune", "2", "--tune-space", "lr=0..0.1:log"), "above 0")
    one_error(run("--tune", "2", "--tune-space", "lr=a..b"), "must be numbers")
    one_error(run("--tune", "2", "--tune-space", "lr=0.01..0.1:sqrt"), "only scale is :log")
    one_error(run("--tune", "2", "--tune-space", "lr=0.1"), "two or more choices")
    one_error(run("--tune", "2", "--tune-space", "lr=-1..0.1"), "lr")
    one_error(run("--tune", "2", "--tune-space", "lrr=0.01..0.1"), "'lrr' is not a setting")
    one_error(run("--tune", "2", "--tune-space", "epochs=1..3"), "--tune-epochs")
    one_error(run("--tune", "2", "--tune-space", "tunable_aux.wieght=0.1..1"),
              "tunable_aux has no option 'wieght'")
    one_error(run("--tune", "2", "--tune-space", "tunable_aux.weight=-1..1"),
              "must be 0 or more")
    one_error(run("--tune", "2", "--tune-space", "ogm_ge.alpha=0.1..1"), "not in --methods")
    one_error(run("--tune-epochs", "2"), "add --tune N")
    one_error(run("--tune", "2", "--tune-epochs", "0"), "--tune-epochs must be at least 1")
    one_error(run("--tune", "2", "--storage", "not a url"), "--storage not a url: cannot open")
    one_error(run("--tune", "2", "--storage", f"sqlite:///{tmp_path}/no/such/dir/t.db"),
              "cannot open")
    # the study there searched tunable_aux's weight alone, for 3 epochs a trial
    one_error(run("--tune", "2", "--tune-space", "tunable_aux.weight=0.2..1"),
              "the study of tunable_aux searched tunable_aux_weight 0.1..2 (log)",
              "0.2..1", "--overwrite")
    one_error(run("--tune", "2", "--tune-space", "lr=0.01..0.1"), "the study of tunable_aux")
    one_error(bench(train_shards, out, plugin, *TUNED[:-2], "--tune-epochs", "2", "--tune", "2"),
              "3 epochs", "--tune-epochs 3")
    assert mtimes(out) == before
    assert hashlib.sha256((out / "tune.db").read_bytes()).hexdigest() == digest
    assert len(study(out).get_trials()) == count


def test_seeds_default_to_five_when_tuning(train_shards, plugin, tmp_path, monkeypatch):
    from avtrain import bench as B

    seen = []

    def stop(config, out, methods, seeds, *args, **kwargs):
        seen.append(seeds)
        raise SystemExit(0)

    monkeypatch.setattr(B, "plan_runs", stop)
    for tune, seeds in ((None, [0, 1, 2]), (3, [0, 1, 2, 3, 4])):
        with pytest.raises(SystemExit):
            B.run_bench(str(train_shards), str(tmp_path / "B"), {"model": "tiny"},
                        methods="none", tune=tune)
        assert seen.pop() == seeds


# Hold the bench inside trial 1's 2nd epoch (trial 0 finished; trial 1 has reported epoch 0).
HOLD_IN_TRIAL_1 = """
from avtrain import loop

_train_epoch = loop.Trainer.train_epoch


def hold_in_trial_1(self, epoch, log):
    if self.config.run_dir.endswith("trial001") and epoch == 1:
        hold()
    return _train_epoch(self, epoch, log)


loop.Trainer.train_epoch = hold_in_trial_1
"""


def test_killed_mid_trial_loses_only_that_trial(train_shards, plugin, tmp_path):
    out = tmp_path / "killed"
    args = ["bench", "--shards", str(train_shards), "-o", str(out), *TINY, "--method-module",
            str(plugin), "--methods", "tunable_aux", "--seeds", "1", "--no-references",
            "--epochs", "1", "--tune", "3", "--tune-epochs", "2"]
    proc = start_held(HOLD_IN_TRIAL_1, "avtrain", args)
    wait_until_held(proc)  # provably inside trial 1, epoch 1
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=HUNG_AFTER_S)
    assert states(out) == ["COMPLETE", "RUNNING"]
    trials = out / "tune" / "tunable_aux"
    assert not (trials / "trial001" / "summary.json").exists()
    kept = {k: v for k, v in mtimes(out).items()
            if "/trial000/" in k or "/runs/tunable_aux/" in k}

    result = CliRunner().invoke(avtrain, args)
    assert result.exit_code == 0, result.output
    assert "tune tunable_aux: trial 1 was stopped before it finished; marked failed" \
        in result.output
    assert "trial 0 " not in result.output  # finished: not asked again
    assert states(out)[:2] == ["COMPLETE", "FAIL"] and len(states(out)) == 4
    assert sorted(os.listdir(trials)) == ["trial000", "trial001", "trial002", "trial003"]
    now = mtimes(out)
    assert {k: now[k] for k in kept} == kept
    budget = table(out)["tunable_aux (tuned)"]["trial_budget"]
    assert budget.startswith("3 × 2 epochs (") and budget.endswith(", 1 failed)")


@pytest.mark.slow
def test_ray_runs_the_trials_as_ray_tasks(train_shards, tmp_path, monkeypatch):
    """Every run and trial is a Ray task (training in this process fails the test), each
    trial reporting to the study in the --storage database given."""
    ray = pytest.importorskip("ray", reason="Ray is the optional extra avbalance[ray]")
    from avtrain import loop
    from avtrain.bench import run_bench

    def not_here(*args, **kwargs):
        raise AssertionError("trained in the bench process, not in a Ray task")

    monkeypatch.setattr(loop, "fit", not_here)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    except Exception as exc:  # no shared memory, no ports, ...: not the code under test
        pytest.skip(f"a local Ray cluster cannot start here: {exc}")
    settings = {"model": "tiny", "image_size": 32, "batch_size": 8, "steps_per_epoch": 2,
                "workers": 0, "epochs": 1, "tensorboard": False}
    out = tmp_path / "ray"
    shared = f"sqlite:///{tmp_path / 'shared' / 'studies.db'}"
    (tmp_path / "shared").mkdir()
    try:
        run_bench(str(train_shards), str(out), settings, methods="none", seeds=[0],
                  references=False, executor="ray", tune=3, tune_epochs=2,
                  tune_space=["lr=0.01..0.1:log"], storage=shared, say=lambda line: None)
    finally:
        ray.shutdown()
    assert not (out / "tune.db").exists()
    trials = study(out, "none", shared).get_trials()
    assert len(trials) == 3 and {t.state.name for t in trials} <= {"COMPLETE", "PRUNED"}
    for t in trials:  # the Ray task reported to the study itself
        run = out / "tune" / "none" / f"trial{t.number:03d}"
        assert [t.intermediate_values[e] for e in sorted(t.intermediate_values)] == \
            val_accs(run)
        assert yaml.safe_load((run / "config.yaml").read_text())["lr"] == t.params["lr"]
    rows = table(out)
    assert list(rows) == ["none", "none (tuned)"]
    assert rows["none (tuned)"]["chosen"].startswith("lr=")


def test_methods_all_is_every_registered_method_baseline_first():
    from avprep.errors import UserError
    from avtrain.balance import all_methods
    from avtrain.bench import parse_methods

    methods = parse_methods("all")
    assert methods[0] == "none"
    assert sorted(methods) == sorted(all_methods())
    assert len(methods) >= 21
    with pytest.raises(UserError, match="unknown|no method|choose"):
        parse_methods("all,nosuch")
