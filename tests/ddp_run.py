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


def run_torchrun(script: Path, *args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc_per_node 2 script args`` (CPU, gloo,
    one OpenMP thread, a free port: other tests may run beside it), failing the test on a hang or
    a non-zero exit as :func:`run_ddp_script` does."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command = [*launcher, str(script)]
    try:
        proc = subprocess.run(
            [*command, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd
        )
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"{Path(script).name} hung: {str(err.stderr)[-3000:]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def leave_worker() -> None:
    """End a ``torchrun`` worker script after its work without the interpreter's teardown.

    Now and then (about one run in five under pytest, torch 2.13, gloo) a thread of torch's C++
    side was still joinable when its static destructor ran at exit, and the rank aborted
    ("terminate called without an active exception", SIGABRT) after its results were saved,
    failing the test. The scripts call this last, so an error before it still fails the run."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
