"""`avtrain report` on run folders written the way `fit` writes them: the best run is chosen on
val, folders that cannot be compared are skipped with a reason, nothing usable is one line."""

from __future__ import annotations

import json

from click.testing import CliRunner

from avtrain.report import write_report
from cli import avtrain


def write_run(path, *, dataset="synth", method="ogm_ge", val_acc=0.5, test_acc=0.5,
              steps=True, confusion=((3, 1), (0, 4))):
    """A finished run folder: metrics.jsonl with step and epoch records, summary.json."""
    path.mkdir(parents=True)
    records = []
    for epoch in range(2):
        if steps:
            records.append({"kind": "step", "epoch": epoch, "step": 2 * epoch + 1, "loss": 1.0,
                            "lr": 0.1, "rho_audio": 1.5, "coeff_audio": 0.3})
        metrics = {"acc": val_acc * (epoch + 1) / 2, "acc_audio": 0.4, "acc_visual": 0.3}
        records.append({"kind": "epoch", "epoch": epoch, "train": {"loss": 1.0},
                        "val": metrics, "test": {**metrics, "acc": test_acc * (epoch + 1) / 2}})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = {"method": method, "dataset": dataset, "modalities": ["audio", "visual"],
               "best_epoch": 1, "wall_time": 2.0,
               "val": {"acc": val_acc, "acc_audio": 0.4, "acc_visual": 0.3},
               "test": {"acc": test_acc, "acc_audio": 0.4, "acc_visual": 0.3,
                        "macro_f1": test_acc, "confusion": [list(r) for r in confusion]}}
    (path / "summary.json").write_text(json.dumps(summary))
    return path


def test_best_run_is_chosen_on_val_not_test(tmp_path):
    lucky = write_run(tmp_path / "lucky", val_acc=0.60, test_acc=0.90)
    sound = write_run(tmp_path / "sound", val_acc=0.80, test_acc=0.70)
    result = write_report([str(lucky), str(sound)], str(tmp_path / "out"))
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## Confusion matrix of the best run on val (sound)" in report
    assert [row["test_acc"] for row in result["rows"]] == [0.90, 0.70]
    assert (tmp_path / "out" / "balance_lucky.png").stat().st_size > 5000


def test_folders_that_cannot_be_compared_are_skipped_with_a_reason(tmp_path):
    good = write_run(tmp_path / "good")
    other = write_run(tmp_path / "other", dataset="cremad")
    unfinished = write_run(tmp_path / "unfinished")
    (unfinished / "summary.json").unlink()
    (tmp_path / "empty").mkdir()
    out = CliRunner().invoke(avtrain, ["report", str(good), str(other), str(unfinished),
                                       str(tmp_path / "empty"), "-o", str(tmp_path / "out")])
    assert out.exit_code == 0, out.output
    assert "1 runs" in out.output
    report = (tmp_path / "out" / "report.md").read_text()
    skipped = report.split("## Skipped", 1)[1].split("##", 1)[0]
    assert "dataset 'cremad' differs from 'synth'" in skipped
    assert "the run has not finished" in skipped
    assert "not an avtrain run directory" in skipped


def test_a_balancing_run_without_step_records_is_named(tmp_path):
    quiet = write_run(tmp_path / "quiet", steps=False)
    write_report([str(quiet)], str(tmp_path / "out"))
    report = (tmp_path / "out" / "report.md").read_text()
    assert "`quiet` logged no step records" in report
    assert not (tmp_path / "out" / "balance_quiet.png").exists()


def test_nothing_to_report_is_one_clear_line(tmp_path):
    (tmp_path / "empty").mkdir()
    out = CliRunner().invoke(avtrain, ["report", str(tmp_path / "empty"), str(tmp_path / "gone"),
                                       "-o", str(tmp_path / "out")])
    assert out.exit_code == 2
    assert "Traceback" not in out.output
    errors = [line for line in out.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "nothing to report" in errors[0]


def test_any_number_of_rows_gets_a_colour_and_a_method_keeps_its_own():
    """A bench of every method, default and tuned, with both references (46 rows) once ran out
    of spare colours while drawing its figures, after every run had finished."""
    from avtrain.report import METHOD_COLOURS, assign_colours

    rows = ["none", "none (tuned)"] + [f"m{i}" for i in range(60)]
    colours = assign_colours(rows, METHOD_COLOURS.get)
    assert list(colours) == rows
    assert colours["none"] == METHOD_COLOURS["none"]
    assert colours["none (tuned)"] != colours["none"]
    assert len(set(colours[r] for r in rows[:50])) == 50
