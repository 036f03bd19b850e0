"""Run a 2-process DDP script of the tests in a subprocess (CPU, gloo), one way for every test."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def run_ddp_script(script: Path, *args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``script args`` with Lightning's subprocess launcher (no fork) and one OpenMP thread.

    A hang (a collective reached on one rank only blocks forever) fails the test with the tail of
    stderr; a non-zero exit fails it with the same.
    """
    env = {**os.environ, "PL_DISABLE_FORK": "1", "OMP_NUM_THREADS": "1"}
    try:
        proc = subprocess.run(
            [sys.executable, str(script), *map(str, args)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            cwd=cwd,
        )
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"{Path(script).name} hung: {str(err.stderr)[-3000:]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc
