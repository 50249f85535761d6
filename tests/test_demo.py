"""The demo's steps at the smallest size: every stage runs, the report's table is the runs'."""

from __future__ import annotations

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import demo  # noqa: E402
import pytest  # noqa: E402

from avprep.errors import UserError  # noqa: E402

pytestmark = pytest.mark.slow  # whole pipelines or servers: `make test`, not the quick loop


def test_quick_demo_end_to_end_and_rerun(tmp_path, capsys):
    out = tmp_path / "demo"
    assert demo.main(["--out", str(out), "--quick", "--workers", "2"]) == 0
    printed = capsys.readouterr().out
    report = (out / "report" / "report.md").read_text()
    for figure in ("accuracy_fused.png", "accuracy_audio.png", "accuracy_visual.png",
                   "train_loss.png", "confusion_best.png", "balance_ogm_ge.png",
                   "balance_olm.png"):
        assert (out / "report" / figure).stat().st_size > 5000
        assert f"]({figure})" in report
    # each run's row in report.md and in the printed table carries its summary.json numbers
    table = [line for line in report.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    for name, _ in demo.RUNS:
        summary = json.loads((out / "runs" / name / "summary.json").read_text())
        epochs = {e["epoch"]: e for e in map(json.loads, open(out / "runs" / name / "metrics.jsonl"))
                  if e["kind"] == "epoch"}
        best = epochs[summary["best_epoch"]]
        assert best["test"]["acc"] == summary["test"]["acc"]  # summary = the best-val epoch
        line = next(row for row in table if row.startswith(f"| {name} |"))
        row = dict(zip(header, (c.strip() for c in line.strip("|").split("|"))))
        assert row["best_epoch"] == str(summary["best_epoch"])
        for column, value in [("test_acc", best["test"]["acc"]),
                              ("test_macro_f1", best["test"]["macro_f1"]),
                              ("test_acc_visual", best["test"]["acc_visual"]),
                              ("probe_visual", summary["linear_probe"]["visual"]["test_acc"])]:
            assert row[column] == f"{value:.3f}", (name, column)
        if "audio" in summary["modalities"]:
            assert row["test_acc_audio"] == f"{best['test']['acc_audio']:.3f}"
        test_acc = f"{summary['test']['acc']:.3f}"
        assert any(line.startswith(name) and test_acc in line for line in printed.splitlines())
    # a rerun reuses everything
    assert demo.main(["--out", str(out), "--quick", "--workers", "2"]) == 0
    again = capsys.readouterr().out
    assert "reusing the synthetic videos" in again and "0 written" in again
    assert again.count("reusing finished run") == len(demo.RUNS)


def test_changed_settings_rebuild_only_what_the_demo_owns(tmp_path):
    out = tmp_path / "demo"
    demo.start_afresh_if_changed(str(out), {"size": demo.QUICK})
    (out / "runs" / "none").mkdir(parents=True)
    demo.start_afresh_if_changed(str(out), {"size": demo.QUICK})  # same settings: kept
    assert (out / "runs" / "none").is_dir()
    demo.start_afresh_if_changed(str(out), {"size": demo.FULL})  # changed: rebuilt
    assert not (out / "runs").exists()
    assert json.loads((out / "demo.json").read_text()) == {"size": demo.FULL}


def test_a_folder_the_demo_did_not_write_is_left_alone(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mine.txt").write_text("precious")
    with pytest.raises(UserError, match="did not write"):
        demo.start_afresh_if_changed(str(tmp_path), {"size": demo.QUICK})
    assert (tmp_path / "data" / "mine.txt").read_text() == "precious"


def test_every_run_on_a_figure_gets_its_own_colour():
    from avtrain.report import METHOD_COLOURS, Run, colours_for

    runs = [Run("a", name, {"method": method}) for name, method in
            [("none", "none"), ("olm", "olm"), ("visual_only", "none"), ("audio_only", "none"),
             ("mystery", "agm")]]
    colours = colours_for(runs)
    assert colours["none"] == METHOD_COLOURS["none"] and colours["olm"] == METHOD_COLOURS["olm"]
    assert len(set(colours.values())) == len(runs)


def _accuracy_rows(text: str) -> dict[str, list[str]]:
    """run name -> its accuracy cells (every column of the demo's table but the wall time)."""
    rows = {}
    for line in text.splitlines():
        cells = line.split()
        if cells and cells[0] in dict(demo.RUNS) and len(cells) == 6:
            rows[cells[0]] = cells[1:5]
    return rows


@pytest.mark.slow
def test_readme_demo_table_is_what_the_demo_prints(tmp_path, capsys):
    """The first thing a new user runs must print the table the README shows (its accuracy
    columns; wall time is the machine's). Rerun `make demo` and paste its table when it fails."""
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    shown = _accuracy_rows(readme.split("## Two commands", 1)[1].split("\n## ", 1)[0])
    assert set(shown) == set(dict(demo.RUNS)), "the README's demo table lists other runs"
    assert demo.main(["--out", str(tmp_path / "demo"), "--workers", "2"]) == 0
    printed = _accuracy_rows(capsys.readouterr().out)
    assert printed == shown
