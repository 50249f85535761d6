"""The foundation commands as a user runs them: real processes, one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def run(*args, env=None):
    return subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def test_version_and_help():
    for tool in ("avprep", "avtrain"):
        result = run(tool, "--version")
        assert result.returncode == 0 and "0.2.0" in result.stdout
        assert run(tool, "--help").returncode == 0


@pytest.mark.slow
def test_doctor_reports_ffmpeg_and_torch():
    result = run("avprep", "doctor")
    assert result.returncode == 0
    assert "ffmpeg:" in result.stdout and "version" in result.stdout
    assert "torch:" in result.stdout and "cpu cores:" in result.stdout


def test_synth_cli_and_refusal(tmp_path):
    out = tmp_path / "data"
    result = run("avprep", "synth", str(out), "--classes", "2", "--per-class", "2",
                 "--seconds", "0.5", "--size", "16", "--workers", "1")
    assert result.returncode == 0, result.stderr
    assert "wrote 4 clips" in result.stdout
    again = run("avprep", "synth", str(out), "--classes", "2")
    assert again.returncode == 2
    assert again.stderr.strip().startswith("Error:") and "Traceback" not in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
    assert len(list(out.glob("videos/*/*.mp4"))) == 4


def test_missing_ffmpeg_is_one_clear_line(tmp_path):
    result = run("avprep", "synth", str(tmp_path / "x"), "--per-class", "1",
                 env={"FFMPEG_BINARY": "/nowhere/ffmpeg"})
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "FFMPEG_BINARY" in result.stderr
