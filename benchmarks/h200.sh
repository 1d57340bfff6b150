#!/usr/bin/env bash
# The H200 runs of issues 10 and 11: a bf16 target beside an nf4 draft, random full-size weights
# (--synthetic-weights 7b), DSEC-size inputs with mp4 decoding included, 10 samples, one GPU and two.
#   benchmarks/h200.sh OUT_DIR [same-gpu|two-gpu|seed50|nf4-target|lossless|step|nf4-tune|nf4-layout|prefill|nf4-stalls|attention|attention-sweep|attention-ab|same-gpu-5|pdl-ab|prefetch-ab|dense-prefetch-ab|early-ab|argtable-ab|wcache-ab|depth-ab|wcache-check|persist-ab|trigger-ab|l2ahead-ab|dq-ab|all]
# two-gpu needs two GPUs of one host. Needs PyAV (writing and reading the mp4 clips), Triton (the exact
# step) and bitsandbytes (nf4). Each part is one `coordinator bench` run; bench.json/bench.md are written
# after every (placement, MPS) session, so a run cut short keeps what it finished. MPS=on,off adds the MPS
# setting to the one-GPU run (twice as long).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/h200}
WHAT=${2:-all}
PY=${PYTHON:-python3}
DATA=${DATA:-$OUT/data}
mkdir -p "$OUT"
if [[ $WHAT == step || $WHAT == all ]]; then      # exactness, step times, floors; the NF4 kernel sweep
    "$PY" benchmarks/step_bench.py --out "$OUT/step.json" --repeats 15
    "$PY" benchmarks/kernel_probe.py --sweep nf4-cuda > "$OUT/kernel_probe-nf4-cuda.json"
fi
if [[ $WHAT == nf4-tune ]]; then   # the NF4 tensor-core kernel: sweep, Nsight Compute, the best configs in the step
    "$PY" -m pytest -q tests/test_nf4_cuda.py 2>&1 | tail -3
    "$PY" benchmarks/kernel_probe.py --sweep nf4-cuda > "$OUT/kernel_probe-nf4-cuda.json" 2> "$OUT/kernel_probe-nf4-cuda.log"
    [[ ${NCU:-1} == 1 ]] && ncu --section SpeedOfLight --section WarpStateStats --section Occupancy --section LaunchStats \
        --section SchedulerStats --section MemoryWorkloadAnalysis -k regex:eventspec_nf4 -s 3 -c 1 \
        "$PY" benchmarks/ncu_nf4_cuda.py > "$OUT/ncu-nf4-cuda.txt" 2>&1 || true     # NCU=0 skips it
    for config in "" $("$PY" benchmarks/nf4_cuda_pick.py "$OUT/kernel_probe-nf4-cuda.json" 3); do
        name=${config:-default}
        EVENTSPEC_NF4_CUDA=$config "$PY" -m pytest -q tests/test_nf4_cuda.py 2>&1 | tail -1 | sed "s/^/$name: /"
        EVENTSPEC_NF4_CUDA=$config "$PY" benchmarks/step_bench.py --out "$OUT/step-nf4-${name//[=,]/_}.json" \
            --precisions nf4 --kinds eventgpt --repeats 15 --no-previous | tail -1 | cut -c1-400
    done
    exit 0
fi
if [[ $WHAT == prefill ]]; then   # each worker's prefill (vision tower + language model): time, kernels by GPU time
    "$PY" benchmarks/step_bench.py --out "$OUT/prefill-eventgpt-nf4.json" --kinds eventgpt --precisions nf4 \
        --repeats 5 --prefill --no-previous | cut -c1-3000
    "$PY" benchmarks/step_bench.py --out "$OUT/prefill-videollava-bf16.json" --kinds videollava --precisions bf16 \
        --repeats 5 --prefill --no-previous | cut -c1-3000
    exit 0
fi
if [[ $WHAT == nf4-layout ]]; then   # tile-major weight bytes (Config.layout): bits, then launch times at 1 and 9 rows
    "$PY" -m pytest -q tests/test_nf4_cuda.py 2>&1 | tail -3
    "$PY" benchmarks/kernel_probe.py --sweep nf4-cuda --rows 1,9 --configs \
        "layout=1;layout=1,depth=4,minb=3;layout=1,depth=2;probe=1;layout=1,probe=1" \
        > "$OUT/kernel_probe-layout.json" 2> "$OUT/kernel_probe-layout.log"
    exit 0
fi
if [[ $WHAT == nf4-stalls ]]; then   # why the NF4 kernel waits: stall reasons, bank conflicts, L2 requests vs sectors
    ncu --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio,l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum,l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum,lts__t_requests_srcunit_tex.sum,lts__t_sectors_srcunit_tex.sum,dram__bytes_read.sum,gpu__time_duration.sum,sm__warps_active.avg.pct_of_peak_sustained_active" \
        -k regex:eventspec_nf4 -s 3 -c 1 "$PY" benchmarks/ncu_nf4_cuda.py > "$OUT/ncu-stalls.txt" 2>&1
    exit 0
fi
if [[ $WHAT == attention-sweep ]]; then   # the attention's launch shapes alone (attention.Config)
    "$PY" -m pytest -q tests/test_engine_exact.py -k "attention or ticket" 2>&1 | tail -2
    "$PY" benchmarks/attention_sweep.py > "$OUT/attention_sweep.json" 2> "$OUT/attention_sweep.md"
    exit 0
fi
if [[ $WHAT == attention-ab ]]; then   # the step with the attention's launch shape before and after, same call
    "$PY" -m pytest -q tests/test_engine_exact.py tests/test_nf4_cuda.py 2>&1 | tail -2
    for config in "" "block_m=32,merge=combine"; do
        name=${config:-default}
        EVENTSPEC_ATTENTION=$config "$PY" benchmarks/step_bench.py --out "$OUT/step-attention-${name//[=,]/_}.json" \
            --kinds eventgpt,videollava --precisions bf16,nf4 --repeats 15 --profile --no-previous | cut -c1-300
    done
    exit 0
fi
if [[ $WHAT == pdl-ab ]]; then   # programmatic dependent launch of the step's Triton kernels, off and on, same call
    EVENTSPEC_PDL=1 "$PY" -m pytest -q tests/test_engine_exact.py 2>&1 | tail -2
    "$PY" -m pytest -q tests/test_pdl.py 2>&1 | tail -2      # on and off in two processes: the same bits
    for pdl in 0 1; do
        for pair in "eventgpt nf4" "videollava bf16"; do
            read -r kind precision <<< "$pair"
            EVENTSPEC_PDL=$pdl "$PY" benchmarks/step_bench.py --out "$OUT/step-pdl$pdl-$kind-$precision.json" \
                --kinds "$kind" --precisions "$precision" --repeats 21 --no-previous | cut -c1-300
        done
    done
    exit 0
fi
if [[ $WHAT == prefetch-ab ]]; then   # weights into L2 before a kernel waits for the one ahead (PDL): bits, step, launches
    "$PY" -m pytest -q tests/test_nf4_cuda.py tests/test_pdl.py 2>&1 | tail -2
    EVENTSPEC_PDL=1 EVENTSPEC_NF4_CUDA=prefetch=1 EVENTSPEC_DENSE_PREFETCH=2 "$PY" -m pytest -q tests/test_engine_exact.py \
        tests/test_nf4_cuda.py 2>&1 | tail -2
    for run in "0 0" "1 0" "1 1" "1 2" "0 1"; do
        read -r pdl prefetch <<< "$run"
        echo "$(date +%T) step eventgpt nf4 pdl=$pdl prefetch=$prefetch"
        EVENTSPEC_PDL=$pdl EVENTSPEC_NF4_CUDA=prefetch=$prefetch "$PY" benchmarks/step_bench.py --kinds eventgpt \
            --precisions nf4 --repeats 15 --profile --no-previous --out "$OUT/step-nf4-pdl$pdl-prefetch$prefetch.json" \
            | cut -c1-300
    done
    echo "$(date +%T) kernel_probe"
    EVENTSPEC_PDL=1 "$PY" benchmarks/kernel_probe.py --sweep nf4-cuda --rows 1 --configs "prefetch=1;prefetch=2" \
        > "$OUT/kernel_probe-pdl1.json" 2> "$OUT/kernel_probe-pdl1.log"
    echo "$(date +%T) done"
    exit 0
fi
# An A/B of NF4 kernel configurations (EVENTSPEC_NF4_CUDA): the GPU bit tests, the EventGPT nf4 step once per
# entry of STEP_CONFIGS (space-separated) in that order, then the launches of PROBE_CONFIGS
nf4_ab() {
    local tag=$1 step_configs=$2 probe_configs=$3 test_config=${4:-} config
    EVENTSPEC_NF4_CUDA=$test_config "$PY" -m pytest -q tests/test_nf4_cuda.py 2>&1 | tail -2
    for config in $step_configs; do
        echo "$(date +%T) step eventgpt nf4 $config"
        EVENTSPEC_NF4_CUDA=$config "$PY" benchmarks/step_bench.py --kinds eventgpt --precisions nf4 --repeats 15 \
            --no-previous --out "$OUT/step-nf4-${config//[=,]/_}-$SECONDS.json" | cut -c1-300
    done
    echo "$(date +%T) kernel_probe"
    "$PY" benchmarks/kernel_probe.py --sweep nf4-cuda --rows 1,9 --configs "$probe_configs" \
        > "$OUT/kernel_probe-$tag.json" 2> "$OUT/kernel_probe-$tag.log"
}
if [[ $WHAT == early-ab ]]; then   # the NF4 kernel's first ring loaded before its PDL wait (early=1) or after (0)
    nf4_ab early "early=0 early=1 early=0 early=1" "early=1"
    echo "$(date +%T) exact step and PDL tests, early=1"
    EVENTSPEC_NF4_CUDA=early=1 "$PY" -m pytest -q tests/test_engine_exact.py tests/test_pdl.py 2>&1 | tail -2
    echo "$(date +%T) done"
    exit 0
fi
if [[ $WHAT == argtable-ab ]]; then   # the NF4 kernel's table from the codes as kernel arguments (no global load first)
    nf4_ab argtable "argtable=0 argtable=1 argtable=1,early=1 argtable=0 argtable=1" "argtable=1;argtable=1,early=1"
    echo "$(date +%T) done"
    exit 0
fi
if [[ $WHAT == wcache-ab ]]; then   # the NF4 weight loads kept out of L1 (wcache=1: L1::no_allocate, 2: evict-first), x in L1
    nf4_ab wcache "wcache=0 wcache=1 wcache=2 wcache=0 wcache=1" \
        "probe=1;probe=3;probe=5;probe=6;probe=7;wcache=1;wcache=2;xring=1;wcache=1,xring=1,minb=3;programs=1024;programs=1536"
    echo "$(date +%T) done"
    exit 0
fi
if [[ $WHAT == depth-ab ]]; then   # evict-first weight loads with deeper rings for the 1-8-row kernel (depth1)
    nf4_ab depth "wcache=1 wcache=2 wcache=2,depth1=4 wcache=2,depth1=5 wcache=1 wcache=2 wcache=2,depth1=5" \
        "wcache=2;wcache=2,depth=4;wcache=2,depth=5;wcache=2,depth=4,minb=3;wcache=2,depth=6,minb=3;wcache=2,depth=8,minb=2;wcache=2,probe=1;wcache=2,probe=6" \
        "wcache=2,depth1=5"
    echo "$(date +%T) done"
    exit 0
fi
if [[ $WHAT == persist-ab ]]; then   # persistent NF4 programs whose rings run on across (tile, split) items
    nf4_ab persist "persist=0 persist=1 persist=1,programs=1536 persist=0 persist=1" \
        "persist=1;persist=1,programs=1536;persist=1,programs=3072"
    echo "$(date +%T) done"
    exit 0
fi
if [[ $WHAT == trigger-ab ]]; then   # PDL triggers at the kernels' entry, attention K/V prefetched before its wait
    # letters: T = the Triton kernels trigger at entry (EVENTSPEC_PDL_TRIGGER=early), N = the NF4 kernel too
    # (EVENTSPEC_NF4_CUDA=trigger=1), A = the attention asks L2 for its chunk first (EVENTSPEC_ATTENTION=prefetch=1)
    variant_env() {
        local v=$1
        echo "EVENTSPEC_PDL_TRIGGER=$([[ $v == *T* ]] && echo early || echo after)" \
             "EVENTSPEC_NF4_CUDA=$([[ $v == *N* ]] && echo trigger=1)" \
             "EVENTSPEC_ATTENTION=$([[ $v == *A* ]] && echo prefetch=1)"
    }
    env $(variant_env TNA) "$PY" -m pytest -q tests/test_nf4_cuda.py tests/test_engine_exact.py tests/test_pdl.py 2>&1 | tail -2
    for v in ${VARIANTS:-0p TNAp T A TA TNA 0 TNA TA}; do
        profile=""
        if [[ $v == *p ]]; then profile=--profile; fi
        echo "$(date +%T) step ${KINDS:-eventgpt} ${PRECISIONS:-nf4} $v: $(variant_env "${v%p}")"
        env $(variant_env "${v%p}") "$PY" benchmarks/step_bench.py --kinds "${KINDS:-eventgpt}" --precisions "${PRECISIONS:-nf4}" \
            --repeats 15 --no-previous $profile --out "$OUT/step-$v-$SECONDS.json" | cut -c1-300
    done
    echo "$(date +%T) done"
    exit 0
fi
if [[ $WHAT == l2ahead-ab ]]; then   # the o projection's weight asked into L2 while the attention runs (EVENTSPEC_L2_AHEAD)
    # entries kind/precision/value, a trailing p adds the profile (kernel times and the critical path)
    EVENTSPEC_L2_AHEAD=2 "$PY" -m pytest -q tests/test_engine_exact.py 2>&1 | tail -2
    for e in ${ENTRIES:-eventgpt/nf4/0p eventgpt/nf4/2p eventgpt/nf4/1 eventgpt/nf4/0 eventgpt/nf4/2 eventgpt/nf4/1 \
                       videollava/bf16/0p videollava/bf16/1p videollava/bf16/0 videollava/bf16/1}; do
        IFS=/ read -r kind precision v <<< "$e"
        profile=""
        if [[ $v == *p ]]; then profile=--profile; fi
        echo "$(date +%T) step $kind $precision EVENTSPEC_L2_AHEAD=${v%p}"
        EVENTSPEC_L2_AHEAD=${v%p} "$PY" benchmarks/step_bench.py --kinds "$kind" --precisions "$precision" --repeats 15 \
            --no-previous $profile --out "$OUT/step-$kind-$precision-$v-$SECONDS.json" | cut -c1-300
    done
    echo "$(date +%T) done"
    exit 0
fi
if [[ $WHAT == dq-ab ]]; then   # the NF4 kernel reading double-quantized scale bytes (dq=1, default) or float32 scales (0)
    "$PY" -m pytest -q ${DQ_TESTS:-tests/test_nf4_cuda.py tests/test_pdl.py tests/test_engine_exact.py} 2>&1 | tail -2
    for e in ${ENTRIES:-eventgpt/1 eventgpt/0 eventgpt/1 eventgpt/0 videollava/1 videollava/0 videollava/1 eventgpt/1p}; do
        IFS=/ read -r kind v <<< "$e"
        profile=""
        if [[ $v == *p ]]; then profile=--profile; fi
        echo "$(date +%T) step $kind nf4 dq=${v%p}"
        EVENTSPEC_NF4_CUDA=dq=${v%p} "$PY" benchmarks/step_bench.py --kinds "$kind" --precisions nf4 --repeats 15 \
            --no-previous $profile --out "$OUT/step-$kind-nf4-dq$v-$SECONDS.json" | cut -c1-300
    done
    echo "$(date +%T) done"
    exit 0
fi
if [[ $WHAT == wcache-check ]]; then   # wcache=1 as the default: exactness tests, steps (a wcache=0 run between), profile
    "$PY" -m pytest -q tests/test_nf4_cuda.py tests/test_engine_exact.py tests/test_pdl.py 2>&1 | tail -2
    for config in "" wcache=0 ""; do
        echo "$(date +%T) step nf4 ${config:-default}"
        EVENTSPEC_NF4_CUDA=$config "$PY" benchmarks/step_bench.py --kinds eventgpt,videollava --precisions nf4 \
            --repeats 15 --no-previous --out "$OUT/step-nf4-${config:-default}-$SECONDS.json" | cut -c1-300
    done
    "$PY" benchmarks/step_bench.py --kinds eventgpt --precisions nf4 --repeats 15 --profile --no-previous \
        --out "$OUT/step-nf4-profile.json" | cut -c1-300
    echo "$(date +%T) done"
    exit 0
fi
if [[ $WHAT == dense-prefetch-ab ]]; then   # the dense kernel's L2 prefetch before its wait, PDL on
    for prefetch in 0 2 0 2 0 2; do
        echo "$(date +%T) step videollava bf16 pdl=1 dense prefetch=$prefetch"
        EVENTSPEC_PDL=1 EVENTSPEC_DENSE_PREFETCH=$prefetch "$PY" benchmarks/step_bench.py --kinds videollava \
            --precisions bf16 --repeats 15 --profile --no-previous --out "$OUT/step-bf16-pdl1-prefetch$prefetch-$SECONDS.json" \
            | cut -c1-300
    done
    exit 0
fi
if [[ $WHAT == attention ]]; then    # the attention's cache chunk length: programs per head vs merge work
    for split in 256 128 64; do
        EVENTSPEC_ATTENTION=split=$split "$PY" benchmarks/step_bench.py --out "$OUT/step-attention-$split.json" \
            --precisions bf16,nf4 --repeats 15 --profile --no-previous | cut -c1-300
    done
    exit 0
fi
if [[ $WHAT == step ]]; then exit 0; fi
if [[ ! -f "$DATA/dataset/EventGPT_Instruction_Subset.json" ]]; then
    "$PY" -m coordinator make-demo "$DATA" --profile dsec --clips 10   # rates 0.3..3 M events/s
fi
bench() {
    "$PY" -m coordinator bench --input "$DATA/dataset" --synthetic-weights 7b --target-precision bf16 \
        --draft-precision nf4 --samples 10 --warmup 1 "$@"
}
sweep=(--max-new-tokens 200 --alphas 0,0.5,0.7,0.9,1 --oracle-profile seed --no-hf-generate)
if [[ $WHAT == same-gpu-5 ]]; then    # the short one-GPU run of the sessions since the fourth; then its hand-overs
    "$PY" -m coordinator bench --input "$DATA/dataset" --synthetic-weights 7b --target-precision bf16 \
        --draft-precision nf4 --samples 5 --warmup 1 --max-new-tokens 200 --alphas 0,0.9,1 --oracle-profile seed \
        --no-hf-generate --placement same-gpu --bench-mps off --modes speculative --output-dir "$OUT/same-gpu-5"
    "$PY" benchmarks/handover.py "$OUT/same-gpu-5/events.jsonl" "$OUT/same-gpu-5/bench.json" > "$OUT/same-gpu-5/handover.txt"
fi
if [[ $WHAT == same-gpu || $WHAT == all ]]; then
    bench "${sweep[@]}" --placement same-gpu --bench-mps "${MPS:-off}" --output-dir "$OUT/same-gpu-200"
fi
if [[ $WHAT == two-gpu || $WHAT == all ]]; then
    bench "${sweep[@]}" --placement two-gpu --bench-mps off --output-dir "$OUT/two-gpu-200"
fi
if [[ $WHAT == seed50 || $WHAT == all ]]; then     # the seed profile's goals are at 50 tokens; hf-generate too
    bench --max-new-tokens 50 --alphas 0 --oracle-profile seed --placement same-gpu,two-gpu --bench-mps off \
        --output-dir "$OUT/seed-50"
fi
if [[ $WHAT == lossless ]]; then     # drafting forced on (--draft-policy always): every record must match baseline
    always=(--samples 10 --warmup 1 --max-new-tokens 200 --alphas 0,0.5,1 --oracle-profile seed
            --modes parallel,speculative --no-hf-generate --placement same-gpu --bench-mps off --draft-policy always)
    if [[ ${LOSSLESS:-bf16,nf4} == *bf16* ]]; then     # LOSSLESS=nf4 runs the nf4 pair alone
        "$PY" -m coordinator bench --input "$DATA/dataset" --synthetic-weights 7b "${always[@]}" \
            --target-precision bf16 --draft-precision nf4 --output-dir "$OUT/always-bf16"
    fi
    if [[ ${LOSSLESS:-bf16,nf4} == *nf4* ]]; then
        "$PY" -m coordinator bench --input "$DATA/dataset" --synthetic-weights 7b "${always[@]}" --precision nf4 \
            --output-dir "$OUT/always-nf4"
    fi
fi
if [[ $WHAT == nf4-target || $WHAT == all ]]; then   # nf4 target: lossless with drafting forced on
    "$PY" -m coordinator bench --input "$DATA/dataset" --synthetic-weights 7b --precision nf4 --samples 10 \
        --warmup 1 --max-new-tokens 200 --alphas 0,0.5,1 --oracle-profile seed --no-hf-generate \
        --placement same-gpu --bench-mps off --draft-policy always --output-dir "$OUT/nf4-target"
fi
