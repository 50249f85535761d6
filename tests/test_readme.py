"""The shell blocks marked `<!-- tested -->` in the README and the guides (docs/*.md) run, in
order, in one folder, as a new user would: the README first, then the guides in the order of
mkdocs.yml's nav, since later blocks use what earlier ones made (synth-shards, runs/none)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from held import HUNG_AFTER_S

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BIN = str(Path(sys.executable).parent)


def guides() -> list[Path]:
    """The pages of docs/ written by hand (not generated), in mkdocs.yml's nav order."""

    def pages(entry) -> list[str]:
        if isinstance(entry, str):
            return [entry]
        if isinstance(entry, list):
            return [page for item in entry for page in pages(item)]
        return [page for value in entry.values() for page in pages(value)]

    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text("utf-8"))["nav"]
    return [ROOT / "docs" / page for page in pages(nav)
            if page != "index.md" and (ROOT / "docs" / page).is_file()]


def sources() -> list[Path]:
    """README.md, then the guides: the order their tested blocks run in."""
    return [README, *guides()]


def readme_blocks(text: str) -> list[str]:
    return re.findall(r"<!-- tested -->\s*```(?:sh|bash)\n(.*?)```", text, flags=re.S)


def marked_blocks() -> list[tuple[Path, str]]:
    return [(path, block) for path in sources() for block in readme_blocks(path.read_text())]


def page_with(marker: str) -> str:
    """The text of the one README or guide page that holds `marker`."""
    holding = [path for path in sources() if marker in path.read_text()]
    assert len(holding) == 1, (marker, holding)
    return holding[0].read_text()


def test_guides_are_the_nav():
    """Every hand-written page of docs/ is in the nav (so its blocks run), and the nav holds
    the guides the README points to."""
    listed = {path.name for path in guides()}
    written = {path.name for path in (ROOT / "docs").glob("*.md")} - {"index.md"}
    assert listed == written
    readme = README.read_text()
    for name in listed - {"cli.md", "api.md"}:
        assert f"](docs/{name})" in readme, name


def test_readme_has_tested_walkthrough():
    commands = "\n".join(block for _, block in marked_blocks())
    for needed in ("avprep synth", "avprep build-shards", "avprep inspect", "avprep verify",
                   "avtrain fit", "avtrain eval", "avtrain report", "avprep extract-frames",
                   "avprep extract-audio", "--print-config", "--config", "--resume"):
        assert needed in commands


@pytest.mark.slow
def test_readme_commands_run(tmp_path):
    env = {**os.environ, "PATH": BIN + os.pathsep + os.environ["PATH"]}
    for path, block in marked_blocks():
        script = "set -euo pipefail\n" + block
        result = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=HUNG_AFTER_S)
        assert result.returncode == 0, (f"{path.relative_to(ROOT)} block failed:\n{block}\n"
                                        f"{result.stderr[-3000:]}")
    # what the walk-through promises its report holds
    report = (tmp_path / "reports" / "first" / "report.md").read_text()
    for figure in ("accuracy_fused.png", "accuracy_audio.png", "accuracy_visual.png",
                   "balance_ogm_ge.png", "confusion_best.png"):
        assert f"]({figure})" in report and (tmp_path / "reports" / "first" / figure).is_file()
    header = next(line for line in report.splitlines() if line.startswith("| run |"))
    assert "probe_visual" in header and "test_acc_visual" in header


def untested_commands(text: str) -> list[str]:
    """avprep/avtrain lines of a page's unmarked blocks (they need real datasets or GPUs)."""
    tested = set(readme_blocks(text))
    lines = []
    for block in re.findall(r"```(?:sh|bash)\n(.*?)```", text, flags=re.S):
        if block in tested:
            continue
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#")[0].strip()
            if line.startswith(("avprep ", "avtrain ")) and "[" not in line:
                lines.append(line)
    return lines


@pytest.mark.slow
def test_readme_untested_commands_still_parse(tmp_path):
    """The dataset walk-throughs cannot run here, but their flags must still exist: `fit` lines
    must print their config, `avprep` lines must fail only on the missing dataset root."""
    commands = [line for path in sources() for line in untested_commands(path.read_text())]
    assert sum(c.startswith("avtrain fit") for c in commands) >= 6
    env = {**os.environ, "PATH": BIN + os.pathsep + os.environ["PATH"]}
    for command in commands:
        if command.startswith("avtrain fit"):
            command += " --print-config"
        elif command.startswith(("avprep synth", "avtrain bench")):
            command += " --help"  # they would really run (a dataset, a bench): parse them only
        result = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=HUNG_AFTER_S)
        output = result.stdout + result.stderr
        if command.endswith(" --help"):  # every flag before --help was parsed
            assert result.returncode == 0 and "No such option" not in output, command + output
            continue
        assert "No such option" not in output and "Usage:" not in output, command + output
        if command.startswith("avtrain fit"):
            assert result.returncode == 0 and "method:" in result.stdout, command + output
        else:
            assert result.returncode in (0, 2) and "Traceback" not in output, command + output


def test_readme_methods_table_is_the_registry():
    """The methods table (Balancing methods) is one line per method generated from the modules
    (`avtrain methods`)."""
    from avtrain.balance import METHODS
    from avtrain.balance.describe import readme_table

    marker = ("<!-- methods table: generated by avtrain.balance.describe.readme_table;"
              " tests keep it equal -->\n")
    table = page_with(marker).split(marker)[1].split("\n<!-- end of methods table -->")[0]
    built_in = {name: cls for name, cls in METHODS.items() if cls.origin is None}
    assert table.strip() == readme_table(built_in).strip()
    assert len(table.strip().splitlines()) == len(built_in) + 2


def test_readme_plugin_example_is_the_shipped_file():
    """The plug-in the docs write and bench is examples/unimodal_aux.py, byte for byte."""
    text = page_with("cat > unimodal_aux.py <<'EOF'\n")
    example = text.split("cat > unimodal_aux.py <<'EOF'\n")[1].split("\nEOF\n")[0] + "\n"
    assert example == (README.parent / "examples" / "unimodal_aux.py").read_text()
