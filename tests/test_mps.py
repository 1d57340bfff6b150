"""MPS handling with a stub nvidia-cuda-mps-control (and nvidia-smi) on PATH: started, used, always stopped."""
import os
import stat
import subprocess

import psutil

from tests.conftest import ROOT, coordinator_cmd, load_results, run_cli

FAKE = ["--draft-backend", "fake", "--target-backend", "fake"]


def make_stubs(bin_dir, log, start_rc=0):
    bin_dir.mkdir()
    control = bin_dir / "nvidia-cuda-mps-control"
    control.write_text(f"""#!/bin/sh
if [ "$1" = "-d" ]; then
  echo "start pipe=$CUDA_MPS_PIPE_DIRECTORY log=$CUDA_MPS_LOG_DIRECTORY" >> {log}
  exit {start_rc}
fi
read cmd
echo "$cmd pipe=$CUDA_MPS_PIPE_DIRECTORY" >> {log}
""")
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: Stub GPU (UUID: GPU-0)'\n")
    for f in (control, smi):
        f.chmod(f.stat().st_mode | stat.S_IEXEC)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


def test_mps_daemon_is_started_shared_and_stopped(fake_input, tmp_path):
    log = tmp_path / "mps.log"
    env = make_stubs(tmp_path / "bin", log)
    out = tmp_path / "out"
    run_cli("run", "--input", fake_input, *FAKE, "--output-dir", out, "--mode", "parallel", "--quiet",
            "--draft-sm-percent", "30", env=env, check=True)
    lines = log.read_text().splitlines()
    assert lines[0].startswith("start pipe=") and lines[-1].startswith("quit pipe=")
    pipe = lines[0].split()[1].split("=", 1)[1]
    assert lines[-1].endswith(pipe)
    info = load_results(out)["run_info"]
    assert info["mps"] is True
    assert info["worker_info"]["draft"]["mps_pipe"] == pipe == info["worker_info"]["target"]["mps_pipe"]
    assert info["worker_info"]["draft"]["mps_sm_percent"] == "30"
    assert info["worker_info"]["target"]["mps_sm_percent"] is None
    assert not os.path.exists(os.path.dirname(pipe))        # private directory removed


def test_mps_daemon_stopped_when_a_worker_fails(fake_input, tmp_path):
    log = tmp_path / "mps.log"
    env = make_stubs(tmp_path / "bin", log)
    proc = run_cli("run", "--input", fake_input, *FAKE, "--output-dir", tmp_path / "out",
                   "--target-option", "crash_on_load=gpu-fault", env=env, timeout=60)
    assert proc.returncode != 0
    assert log.read_text().splitlines()[-1].startswith("quit")


def test_no_mps_skips_the_daemon(fake_input, tmp_path):
    log = tmp_path / "mps.log"
    env = make_stubs(tmp_path / "bin", log)
    run_cli("run", "--input", fake_input, *FAKE, "--output-dir", tmp_path / "out", "--no-mps", "--quiet",
            "--mode", "baseline", env=env, check=True)
    assert not log.exists()


def test_daemon_that_fails_to_start_is_a_clear_error(fake_input, tmp_path):
    env = make_stubs(tmp_path / "bin", tmp_path / "mps.log", start_rc=1)
    proc = subprocess.Popen(coordinator_cmd("run", "--input", fake_input, *FAKE, "--output-dir", tmp_path / "out"),
                            cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "MPS daemon" in stderr and "--mps off" in stderr
    assert "Traceback" not in stderr
    assert not [p for p in psutil.process_iter(["cmdline"]) if "--parent-pid" in (p.info["cmdline"] or [])
                and str(proc.pid) in (p.info["cmdline"] or [])]


def test_launch_sh_forwards_arguments_and_handles_mps(fake_input, tmp_path):
    log = tmp_path / "mps.log"
    env = {**os.environ, **make_stubs(tmp_path / "bin", log)}
    out = tmp_path / "out"
    proc = subprocess.run([str(ROOT / "launch.sh"), "--input", str(fake_input), *FAKE, "--output-dir", str(out),
                           "--mode", "speculative", "--quiet"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert len(load_results(out)["records"]) == 3
    assert log.read_text().splitlines()[-1].startswith("quit")
