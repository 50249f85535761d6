"""The README's shell blocks marked `<!-- tested -->` run, in order, as a new user would."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from held import HUNG_AFTER_S

README = Path(__file__).resolve().parent.parent / "README.md"
BIN = str(Path(sys.executable).parent)


def readme_blocks(text: str) -> list[str]:
    return re.findall(r"<!-- tested -->\s*```(?:sh|bash)\n(.*?)```", text, flags=re.S)


def test_readme_has_tested_walkthrough():
    blocks = readme_blocks(README.read_text())
    commands = "\n".join(blocks)
    for needed in ("avprep synth", "avprep build-shards", "avprep inspect", "avprep verify",
                   "avtrain fit", "avtrain eval", "avtrain report", "avprep extract-frames",
                   "avprep extract-audio", "--print-config", "--config", "--resume"):
        assert needed in commands


def test_readme_commands_run(tmp_path):
    env = {**os.environ, "PATH": BIN + os.pathsep + os.environ["PATH"]}
    for block in readme_blocks(README.read_text()):
        script = "set -euo pipefail\n" + block
        result = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=HUNG_AFTER_S)
        assert result.returncode == 0, f"README block failed:\n{block}\n{result.stderr[-3000:]}"
    # what the walk-through promises its report holds
    report = (tmp_path / "reports" / "first" / "report.md").read_text()
    for figure in ("accuracy_fused.png", "accuracy_audio.png", "accuracy_visual.png",
                   "balance_ogm_ge.png", "confusion_best.png"):
        assert f"]({figure})" in report and (tmp_path / "reports" / "first" / figure).is_file()
    header = next(line for line in report.splitlines() if line.startswith("| run |"))
    assert "probe_visual" in header and "test_acc_visual" in header


def untested_commands(text: str) -> list[str]:
    """avprep/avtrain lines of the README's unmarked blocks (they need real datasets or GPUs)."""
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


def test_readme_untested_commands_still_parse(tmp_path):
    """The dataset walk-throughs cannot run here, but their flags must still exist: `fit` lines
    must print their config, `avprep` lines must fail only on the missing dataset root."""
    commands = untested_commands(README.read_text())
    assert sum(c.startswith("avtrain fit") for c in commands) >= 6
    env = {**os.environ, "PATH": BIN + os.pathsep + os.environ["PATH"]}
    for command in commands:
        if command.startswith("avtrain fit"):
            command += " --print-config"
        result = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=HUNG_AFTER_S)
        output = result.stdout + result.stderr
        assert "No such option" not in output and "Usage:" not in output, command + output
        if command.startswith("avtrain fit"):
            assert result.returncode == 0 and "method:" in result.stdout, command + output
        else:
            assert result.returncode in (0, 2) and "Traceback" not in output, command + output
