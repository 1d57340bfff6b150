#!/usr/bin/env bash
# eventspec's local pipeline.
#   ./launch.sh              set up on first use, then the demo: tiny trained models on generated data, every mode
#   ./launch.sh test [ARGS]  run the test suite (ARGS go to pytest)
#   ./launch.sh ARGS...      forward ARGS to `coordinator run` (e.g. --input DIR --draft-model ... --no-mps)
# The coordinator starts a private CUDA MPS daemon where a GPU and nvidia-cuda-mps-control exist (--no-mps
# skips it) and always stops it on exit.
set -euo pipefail
cd "$(dirname "$0")"
HERE=$(pwd)
VENV=${EVENTSPEC_VENV:-$HERE/.venv}
PY=${PYTHON:-python3}

setup() {
    local stamp="$VENV/.eventspec-installed"
    if [[ -f "$stamp" && "$stamp" -nt pyproject.toml ]]; then
        return
    fi
    echo "launch.sh: setting up $VENV (first use)" >&2
    [[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
    # torch: keep an existing install (e.g. a CUDA build); otherwise 2.13.0 (a CPU build where it lies on disk)
    if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
        "$VENV/bin/pip" install -q "torch==2.13.0" || "$VENV/bin/pip" install -q torch
    fi
    "$VENV/bin/pip" install -q -e ".[models,test,cluster]"     # cluster: Ray, for --ray and its tests
    touch "$stamp"
}

demo() {
    # Both written afresh each time (a few seconds), so they always match this checkout's code.
    local demo_dir="$HERE/demo"
    local out="$HERE/runs/demo-$(date +%Y%m%d-%H%M%S)"
    rm -rf "$demo_dir/data" "$demo_dir/models"
    "$VENV/bin/coordinator" make-demo "$demo_dir/data" >/dev/null
    "$VENV/bin/coordinator" make-tiny "$demo_dir/models" --trained >/dev/null
    "$VENV/bin/coordinator" demo --data "$demo_dir/data/dataset" --models "$demo_dir/models" --output-dir "$out" "$@"
    echo "launch.sh: demo outputs in $out (demo.md, summary.md; open trace.json in ui.perfetto.dev)"
}

case "${1:-}" in
    test)
        shift
        setup
        exec "$VENV/bin/python" -m pytest -q "$@"
        ;;
    "")
        setup
        demo
        ;;
    --no-mps|--mps)
        setup
        demo "$@"
        ;;
    *)
        setup
        exec "$VENV/bin/coordinator" run "$@"
        ;;
esac
