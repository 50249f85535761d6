"""Stop a child process at a known point, then signal it: no sleep-and-poll, no file watching.

`start_held(patch, argv)` runs the avprep/avtrain CLI in a new Python process after `patch`
(test code) has wrapped some library function so that, at the chosen moment, it calls
`hold()`: that prints a marker line and sleeps until a signal arrives.
`wait_until_held(proc)` reads the child's stdout up to the marker, so when it returns the child
is provably inside that call; a SIGINT then raises KeyboardInterrupt right there (the sleep
is interrupted), and a SIGKILL of the process group kills it there. (An earlier version
blocked reading stdin: closing stdin in `communicate()` right after the SIGINT could end the
read before the signal was handled, a race.)
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

MARKER = "AVBALANCE-TEST-HELD"
# How long a test waits for a child process before calling it hung: a bound, never an
# expected duration. Two suites at once beside other jobs (load average 20 on 2 cores) made
# a README block that takes ~1 min on a quiet machine pass its old 600 s limit and fail.
HUNG_AFTER_S = 1800
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_PRELUDE = f'''
import signal
import sys
import time

# Ctrl-C as a terminal user sends it: a shell running the suite in the background (nohup, &,
# CI) starts children with SIGINT ignored, and Python keeps it ignored; restore Python's handler.
signal.signal(signal.SIGINT, signal.default_int_handler)


def hold():
    """Block this process until the test interrupts or kills it. Sleeping (not reading stdin)
    means nothing but a signal can end the wait: SIGINT raises KeyboardInterrupt right here."""
    print({MARKER!r}, flush=True)
    while True:
        time.sleep(3600)
'''


def start_held(patch: str, group: str, argv: list[str], env: dict | None = None
               ) -> subprocess.Popen:
    """`python -c PRELUDE+patch+run CLI group` with argv; stdout/stderr are pipes, new session."""
    code = _PRELUDE + textwrap.dedent(patch) + f"\nfrom cli import {group}\n{group}()\n"
    return subprocess.Popen(
        [sys.executable, "-c", code, *argv], cwd=REPO, start_new_session=True,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def wait_until_held(proc: subprocess.Popen) -> None:
    """Read the child's stdout until the marker; fail if it ends without reaching it."""
    for line in proc.stdout:
        if line.strip() == MARKER:
            return
    proc.wait()
    raise AssertionError(f"the process ended (exit {proc.returncode}) before reaching its "
                         f"hold point: {proc.stderr.read()[-2000:]}")
