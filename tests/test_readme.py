"""The README's shell blocks marked `<!-- tested -->` run, in order, as a new user would."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

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
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"README block failed:\n{block}\n{result.stderr[-3000:]}"
