"""Methods from outside avbalance and method options as the user writes them: a plug-in file
through `fit` (flags, signal, config.yaml, resume), config.yaml files written before
method_options, and the one-line errors of options given to the wrong method."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from held import HUNG_AFTER_S

AVTRAIN = str(Path(sys.executable).parent / "avtrain")
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "unimodal_aux.py"
TINY = ["--model", "tiny", "--image-size", "32", "--batch-size", "8", "--steps-per-epoch", "2",
        "--workers", "0", "--device", "cpu", "--no-progress", "--no-shapley", "--log-every", "1"]


def avtrain(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([AVTRAIN, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          timeout=HUNG_AFTER_S)


def records(run: Path, kind: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("kind") == kind]


@pytest.mark.slow
def test_plugin_runs_through_fit_and_resumes_from_another_folder(train_shards, tmp_path):
    plugin = tmp_path / "mine.py"
    plugin.write_text(EXAMPLE.read_text())
    help_text = avtrain("fit", "--method-module", plugin, "--help").stdout
    assert "--method unimodal_aux (plug-in:" in help_text and "--unimodal-aux-weight" in help_text
    assert "--unimodal-aux-weight" not in avtrain("fit", "--help").stdout  # only when named

    run = tmp_path / "run"
    first = avtrain("fit", "--method-module", "mine.py", "--method", "unimodal_aux",
                    "--unimodal-aux-weight", "0.25", "--shards", train_shards, "--run-dir", run,
                    "--epochs", "1", *TINY, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["method_module"] == str(plugin)  # absolute: found again from anywhere
    assert saved["method_options"] == {"weight": 0.25}
    steps = records(run, "step")
    assert steps and all({"aux_audio", "aux_visual"} <= set(r) for r in steps)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    again = avtrain("fit", "--resume", run, "--epochs", "2", cwd=elsewhere)
    assert again.returncode == 0, again.stderr
    assert [r["epoch"] for r in records(run, "epoch")] == [0, 1]
    report = avtrain("report", run, "-o", tmp_path / "report")
    assert report.returncode == 0, report.stderr
    assert (tmp_path / "report" / "balance_run.png").is_file()


def _old_style(config: dict, **flat) -> dict:
    """config.yaml as avbalance wrote it before method_options: every method's options at the
    top level, at their defaults, plus the given ones."""
    old = {k: v for k, v in config.items() if k not in ("method_options", "method_module")}
    old.update({"modulate": "conv", "olm_initial": "mean", "olm_lr": None,
                "olm_reduction": "sum", "olm_heldout": "train", "greedy_loss": "unimodal",
                "mla_gate": "entropy", "mmpareto_gamma": None, "unimodal_teacher_runs": [],
                "gblending_offline": None, "lfm_schedule": "learnable"})
    old.update(flat)
    return old


@pytest.mark.slow
def test_a_run_written_before_method_options_resumes_with_one_warning(train_shards, tmp_path):
    run = tmp_path / "run"
    first = avtrain("fit", "--method", "olm", "--olm-reduction", "mean", "--shards",
                    train_shards, "--run-dir", run, "--epochs", "1", *TINY)
    assert first.returncode == 0, first.stderr
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["method_options"] == {"reduction": "mean"}
    (run / "config.yaml").write_text(yaml.safe_dump(_old_style(config, olm_reduction="mean")))

    again = avtrain("fit", "--resume", run, "--epochs", "2")
    assert again.returncode == 0, again.stderr
    warnings = [line for line in again.stderr.splitlines() if line.startswith("Warning:")]
    assert len(warnings) == 1 and "olm_reduction" in warnings[0] and "method_options" in \
        warnings[0]
    # the old file's olm values are kept as given (a later default never changes a resumed
    # run); other methods' options at their defaults (olm_heldout: OLM-com's) are dropped
    assert yaml.safe_load((run / "config.yaml").read_text())["method_options"] == \
        {"initial": "mean", "reduction": "mean"}
    assert [r["epoch"] for r in records(run, "epoch")] == [0, 1]


@pytest.mark.parametrize("args, message", [
    (["--method", "ogm_ge", "--mmpareto-gamma", "2"],
     "Error: --mmpareto-gamma is an option of --method mmpareto, not of --method ogm_ge"),
    (["--method", "mmpareto", "--method-option", "gama=2"],
     "Error: --method mmpareto has no option 'gama'; its options: gamma"),
    (["--method", "mmpareto", "--mmpareto-gamma", "0"],
     "Error: --mmpareto-gamma must be above 0, got 0.0"),
    (["--method", "opm", "--opm-q-base", "1.5"],
     "Error: --opm-q-base must be in [0, 1], got 1.5"),
    (["--method", "olm", "--method-option", "reduction=median"],
     "Error: --olm-reduction must be one of sum, mean, got 'median'"),
    (["--method-module", "no/such/file.py", "--method", "x"],
     "Error: --method-module no/such/file.py: no such file"),
])
@pytest.mark.slow
def test_method_options_given_wrongly_are_one_error_line(train_shards, tmp_path, args, message):
    result = avtrain("fit", "--shards", train_shards, "--run-dir", tmp_path / "run", *TINY,
                     *args)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [message + result.stderr.strip()[len(message):]]
    assert result.stderr.startswith(message) and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_config_files_with_another_methods_option(tmp_path):
    """A config file written by hand with another method's option is refused; an old saved
    config.yaml listing every method's options at their defaults is not."""
    mine = tmp_path / "mine.yaml"
    mine.write_text("method: ogm_ge\nmmpareto_gamma: 2.0\n")
    result = avtrain("fit", "--config", mine, "--shards", "S", "--run-dir", tmp_path / "r",
                     "--print-config")
    assert result.returncode == 2
    assert result.stderr.strip() == (f"Error: {mine}: --mmpareto-gamma is an option of "
                                     "--method mmpareto, not of --method ogm_ge; drop it or "
                                     "change the method")
    new = tmp_path / "new.yaml"
    new.write_text("method: mmpareto\nmethod_options: {gamma: 2}\nalpha: 0.3\n")
    shown = avtrain("fit", "--config", new, "--shards", "S", "--run-dir", tmp_path / "r",
                    "--print-config")
    assert shown.returncode == 0, shown.stderr
    assert yaml.safe_load(shown.stdout)["method_options"] == {"gamma": 2.0}
    assert shown.stderr.strip() == "Warning: --method mmpareto does not read --alpha (ignored)"


@pytest.mark.slow
def test_methods_command_lists_every_method_and_shows_one(tmp_path):
    listing = avtrain("methods").stdout.splitlines()
    from avtrain.balance import METHODS

    built_in = [name for name, cls in METHODS.items() if cls.origin is None]
    assert [line.split()[0] for line in listing[1:]] == built_in
    page = avtrain("methods", "opm").stdout
    assert "`--opm-q-base`" in page and "| 0.5 | 0.5 |" in page and "## Details" in page
    unknown = avtrain("methods", "nope")
    assert unknown.returncode == 2 and unknown.stderr.startswith(
        "Error: unknown balancing method 'nope'")
    assert os.path.isfile(EXAMPLE)


def _installed(site: Path, body: str) -> dict:
    """A package announcing a method in the avbalance.methods entry-point group, installed as
    pip would (a dist-info with entry_points.txt) in `site`; the environment that sees it."""
    (site / "halfpkg").mkdir(parents=True)
    (site / "halfpkg" / "__init__.py").write_text(body)
    info = site / "halfpkg-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: halfpkg\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[avbalance.methods]\nhalf = halfpkg:HalfCE\n")
    return {**os.environ, "PYTHONPATH": str(site)}


@pytest.mark.slow
def test_an_installed_package_announces_its_method_by_entry_point(tmp_path):
    env = _installed(tmp_path / "site", '''
import torch.nn.functional as F
from avtrain.balance import Balancer, Option

class HalfCE(Balancer):
    name = "half"
    options = (Option("factor", float, 0.5, "factor on the fused CE", minimum=0),)

    def loss(self, logits, labels, *, epoch, step):
        return self.opt.factor * F.cross_entropy(logits["fused"].float(), labels)
''')
    run = lambda *args: subprocess.run([AVTRAIN, *args], capture_output=True, text=True,  # noqa
                                       env=env, timeout=HUNG_AFTER_S)
    assert "half " in run("methods").stdout
    page = run("methods", "half").stdout
    assert "entry point half = halfpkg:HalfCE" in page and "`--half-factor`" in page
    shown = run("fit", "--method", "half", "--half-factor", "0.25", "--shards", "S",
                "--run-dir", str(tmp_path / "r"), "--print-config")
    assert shown.returncode == 0, shown.stderr
    assert yaml.safe_load(shown.stdout)["method_options"] == {"factor": 0.25}


@pytest.mark.slow
def test_a_broken_entry_point_stops_only_its_own_method(tmp_path, method_shards):
    """A package that fails to load is one Warning line for every command (its flags would be
    built with everyone's), and one Error line when its method is the one asked for."""
    env = _installed(tmp_path / "site", "raise RuntimeError('half is broken')\n")
    run = lambda *args: subprocess.run([AVTRAIN, *args], capture_output=True, text=True,  # noqa
                                       env=env, timeout=HUNG_AFTER_S)
    broken = ("plug-in entry point half = halfpkg:HalfCE: loading failed: RuntimeError: "
              "half is broken")
    listed = run("methods")
    assert listed.returncode == 0 and "ogm_ge " in listed.stdout
    assert listed.stderr.strip() == f"Warning: {broken} (its methods are not available)"
    fit = run("fit", "--shards", str(method_shards), "--run-dir", str(tmp_path / "none"),
              "--model", "tiny", "--epochs", "1", "--batch-size", "8", "--image-size", "32",
              "--workers", "0", "--no-progress", "--no-shapley")
    assert fit.returncode == 0, fit.stderr
    assert (tmp_path / "none" / "summary.json").is_file()
    asked = run("fit", "--method", "half", "--shards", "S", "--run-dir", str(tmp_path / "h"),
                "--print-config")
    assert asked.returncode == 2
    assert asked.stderr.strip().splitlines()[-1] == f"Error: --method half: {broken}"


def test_a_methods_own_flag_given_to_the_bench_applies_to_its_rows():
    """`avtrain bench --mmpareto-gamma 2` sets gamma on the mmpareto rows only (as --set
    mmpareto.gamma=2); a flag of a method not benched is one line."""
    from avprep.errors import UserError
    from avtrain.bench import method_flags_to_sets, parse_sets

    base, sets = {"mmpareto_gamma": 2.0, "lr": 0.1}, {}
    method_flags_to_sets(base, ["none", "mmpareto"], sets)
    assert base == {"lr": 0.1} and sets == {"mmpareto": [("mmpareto_gamma", [2.0])]}
    assert parse_sets(["mmpareto.gamma=3"], ["mmpareto"]) == {"mmpareto": [("mmpareto_gamma",
                                                                             [3])]}
    with pytest.raises(UserError, match=r"^--olm-reduction is an option of --method olm, "
                                        r"olm_com, which is not in --methods$"):
        method_flags_to_sets({"olm_reduction": "mean"}, ["none"], {})
