"""A private CUDA MPS daemon for one run, so the draft and target workers can share the GPU concurrently.

Owns starting the daemon with its own pipe/log directories, the environment its clients need, and
stopping it on every exit path. Never changes GPU settings (compute mode, clocks): MPS runs as is.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

CONTROL = "nvidia-cuda-mps-control"


class MpsError(RuntimeError):
    pass


def gpu_present() -> bool:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return False
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


def unavailable_reason() -> str | None:
    """Why a private MPS daemon cannot run here (no control binary, no GPU), or None when it can."""
    if not shutil.which(CONTROL):
        return f"{CONTROL} is not on PATH (the CUDA MPS tools are not installed)"
    if not gpu_present():
        return "no NVIDIA GPU found (nvidia-smi -L lists none)"
    return None


def mps_wanted(setting: str) -> bool:
    """setting: on | off | auto (on where a GPU and the control binary exist)."""
    if setting == "off":
        return False
    if setting == "on":
        if not shutil.which(CONTROL):
            raise MpsError(f"--mps on: {CONTROL} is not on PATH; install the CUDA MPS tools or use --mps off")
        return True
    return bool(shutil.which(CONTROL)) and gpu_present()


class MpsDaemon:
    def __init__(self):
        self.dir: str | None = None
        self.env: dict[str, str] = {}
        self.running = False

    def start(self) -> "MpsDaemon":
        self.dir = tempfile.mkdtemp(prefix="es-mps-")
        os.chmod(self.dir, 0o700)
        pipe, log = os.path.join(self.dir, "pipe"), os.path.join(self.dir, "log")
        os.makedirs(pipe)
        os.makedirs(log)
        self.env = {"CUDA_MPS_PIPE_DIRECTORY": pipe, "CUDA_MPS_LOG_DIRECTORY": log}
        self.running = True             # from here on stop() sends quit, whatever interrupts the start
        try:
            out = subprocess.run([CONTROL, "-d"], env={**os.environ, **self.env}, capture_output=True, text=True,
                                 timeout=30)
        except (OSError, subprocess.TimeoutExpired) as exc:
            self.stop()
            raise MpsError(f"starting the MPS daemon failed ({CONTROL} -d: {exc}); run with --mps off to go "
                           f"without it") from None
        if out.returncode != 0:
            self.stop()
            raise MpsError(f"starting the MPS daemon failed ({CONTROL} -d exited {out.returncode}): "
                               f"{(out.stderr or out.stdout).strip()}; run with --mps off to go without it")
        return self

    def client_env(self, sm_percent: int | None = None) -> dict[str, str]:
        env = dict(self.env)
        if sm_percent:
            env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(int(sm_percent))
        return env

    def stop(self) -> None:
        if self.running:
            try:
                subprocess.run([CONTROL], input="quit\n", env={**os.environ, **self.env}, capture_output=True,
                               text=True, timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                pass
            self.running = False
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
