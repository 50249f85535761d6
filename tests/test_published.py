"""Published tables shipped as package data, and `avtrain report BENCH --published NAME`."""

from __future__ import annotations

import csv
import json
import re
import statistics
from pathlib import Path

import pytest
from click.testing import CliRunner

from avtrain.published import COLUMNS, available, load_table
from cli import avtrain

HERE = Path(__file__).resolve().parent.parent / "avtrain" / "published"


def one_error(result, *needles):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    for needle in needles:
        assert needle in errors[0], errors[0]


def test_every_shipped_row_parses_and_names_its_source():
    from avtrain.balance import METHODS

    names = available()
    assert {"balancebenchmark", "ogm_ge", "reconboost"} <= set(names)
    for name in names:
        table = load_table(name)
        assert table.header.get("source") and table.header.get("protocol"), name
        assert table.rows, name
        for row in table.rows:
            assert row["source"], (name, row)
            assert isinstance(row["acc"], float) and 0 < row["acc"] < 100, (name, row)
            assert row["macro_f1"] is None or 0 < row["macro_f1"] < 100, (name, row)
            assert row["selection"] in ("last", "best_on_test", "best_on_val"), (name, row)
            # `ours` names a bench row that can exist: a method of ours or a reference
            assert row["ours"] in ("", "audio only", "visual only") or row["ours"] in METHODS, row
        with open(HERE / f"{name}.csv", encoding="utf-8") as fh:
            body = [line for line in fh if not line.startswith("#")]
        assert tuple(next(csv.reader(body))) == COLUMNS


def test_balancebenchmark_figures_as_checked_against_the_figure():
    """A few cells read off images/Results.jpeg @ 4c1482f (every cell was checked by eye)."""
    rows = {(r["method"], r["dataset"]): r for r in load_table("balancebenchmark").rows}
    assert len(rows) == 138  # 20 methods x 7 datasets, minus the figure's dashes, plus Unimodal-3
    assert (rows["MMPareto", "cremad"]["acc"], rows["MMPareto", "cremad"]["macro_f1"]) == \
        (79.97, 80.57)
    assert rows["UMT", "vggsound"]["macro_f1"] == 50.48
    assert rows["Unimodal-1", "kinetics_sounds"]["ours"] == "audio only"
    assert rows["OGM", "cremad"]["ours"] == "ogm_ge"  # BalanceMM's OGM row runs OGM_GE
    assert ("Greedy", "ucf101") not in rows
    assert {r["epochs"] for r in rows.values()} == {30}


def test_an_unknown_name_is_one_error_line_listing_the_names(tmp_path):
    bench = tmp_path / "B"
    bench.mkdir()
    (bench / "bench.json").write_text(json.dumps({"protocol": {}, "last": {"runs": []}}))
    result = CliRunner().invoke(avtrain, ["report", str(bench), "--published", "nope"])
    one_error(result, "nope", "balancebenchmark", "ogm_ge", "reconboost")


@pytest.fixture(scope="module")
def cremad_bench(synth_dir, tmp_path_factory):
    """A real bench (none + ogm_ge + references, 2 seeds, 1 epoch, tiny) on synth clips built
    into shards that call themselves cremad."""
    from avprep.manifest import read_manifest
    from avprep.presets import get_preset
    from avprep.shards import build_shards
    from avtrain.bench import run_bench

    manifest = read_manifest(synth_dir / "manifest.jsonl")
    shards = tmp_path_factory.mktemp("cremad-shards")
    build_shards(manifest.records, str(shards), get_preset("synth"), classes=manifest.classes,
                 dataset="cremad", shard_size=50, workers=1)
    out = tmp_path_factory.mktemp("bench") / "B"
    run_bench(str(shards), str(out), {"model": "tiny", "image_size": 32, "batch_size": 4,
                                      "epochs": 1, "workers": 0, "lr": 0.05,
                                      "linear_probe": False, "shapley": False},
              methods="none,ogm_ge", seeds="2", say=lambda *a: None)
    return out


@pytest.mark.usefixtures("one_torch_thread")
def test_bench_beside_balancebenchmark(cremad_bench):
    result = CliRunner().invoke(avtrain, ["report", str(cremad_bench), "--published",
                                          "balancebenchmark"])
    assert result.exit_code == 0, result.output
    path = cremad_bench / "published-balancebenchmark.md"
    assert f"published: {path}" in result.output
    assert "dataset cremad" in result.output
    text = path.read_text()

    # Δ for OGM (ours: ogm_ge) by hand from the two runs' summary.json
    accs = [json.loads((cremad_bench / "runs" / "ogm_ge" / f"seed{s}" / "summary.json")
                       .read_text())["test"]["acc"] * 100 for s in (0, 1)]
    mean, sd = statistics.mean(accs), statistics.stdev(accs)
    line = next(x for x in text.splitlines() if x.startswith("| OGM |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[1] == "ogm_ge" and cells[2] == "2"
    assert cells[3] == f"{mean:.2f} ± {sd:.2f}"
    assert cells[4] == "67.76"
    assert cells[5] == f"{mean - 67.76:+.2f}"
    assert cells[7] == "68.02"

    # the references stand for Unimodal-1/2; methods the bench did not run say so
    assert re.search(r"^\| Unimodal-1 \| audio only \| 2 \|", text, re.M)
    assert re.search(r"^\| MMPareto \| mmpareto \(not run\) \| – \|", text, re.M)
    # protocol differences come from bench.json against the published protocol
    assert "optimizer: ours sgd, published adamw" in text
    assert "epochs: ours 1, published 30" in text
    assert "batch_size: ours 4, published 32" in text
    assert "selection: ours best_on_val, published last" in text
    # and each method's own BalanceMM differences
    assert "**OGM** (`ogm_ge`)" in text and "alpha 0.3, window [10, 80]" in text
    assert "**MMPareto**" not in text  # not run here


@pytest.mark.usefixtures("one_torch_thread")
def test_another_dataset_or_a_table_without_it_is_one_error_line(cremad_bench, tmp_path):
    result = CliRunner().invoke(avtrain, ["report", str(cremad_bench), "--published",
                                          "ogm_ge:vggsound"])
    one_error(result, "ogm_ge", "'vggsound'", "covers: cremad")
    # a dataset the table covers may be named: the ave rows of reconboost (references only)
    result = CliRunner().invoke(avtrain, ["report", str(cremad_bench), "--published",
                                          "reconboost:ave", "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "published-reconboost.md").read_text()
    assert "| Audio encoder (pre-trained) | audio only | 2 |" in text
    assert "59.38" in text


def test_a_synth_bench_has_no_published_counterpart(tmp_path, synth_dir):
    """The dataset comes from the runs' summaries; synth is in no table."""
    bench = tmp_path / "B"
    run = bench / "runs" / "none" / "seed0"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"dataset": "synth", "test": {"acc": 0.5}}))
    (bench / "bench.json").write_text(json.dumps({
        "protocol": {}, "last": {"runs": [{"row": "none", "slug": "none", "seed": 0,
                                           "run_dir": "runs/none/seed0"}]}}))
    result = CliRunner().invoke(avtrain, ["report", str(bench), "--published",
                                          "balancebenchmark"])
    one_error(result, "'synth'", "covers: kinetics_sounds, cremad", "balancebenchmark:DATASET")
    result = CliRunner().invoke(avtrain, ["report", str(bench), str(bench), "--published",
                                          "balancebenchmark"])
    one_error(result, "--published compares one bench folder")
