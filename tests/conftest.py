import json
import os

# Triton reads this when a kernel is defined: on a machine without CUDA the exact step's kernels run under
# its interpreter, whichever test imports them first (on a GPU machine they compile for the GPU).
if not os.environ.get("CUDA_VISIBLE_DEVICES") and not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]


def coordinator_cmd(*args):
    return [sys.executable, "-m", "coordinator", *map(str, args)]


def run_cli(*args, timeout=120, env=None, check=False):
    proc = subprocess.run(coordinator_cmd(*args), capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def load_results(out_dir):
    return json.loads((Path(out_dir) / "results.json").read_text())


def worker_processes():
    """Worker processes of this user still alive anywhere (children of any coordinator)."""
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = p.info.get("cmdline") or []
        if "workers" in cmd and "--role" in cmd and "-m" in cmd:
            found.append(p)
    return found


def wait_gone(pids, timeout=10.0):
    deadline = time.monotonic() + timeout
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        time.sleep(0.1)
    return alive


@pytest.fixture
def fake_input(tmp_path):
    root = tmp_path / "seq"
    for name in ("s1", "s2", "s3"):
        (root / name).mkdir(parents=True)
        (root / name / "frame.txt").write_text(name)
    return root
