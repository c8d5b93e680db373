#!/usr/bin/env bash
# One GPU check in one go (see bench/README.md): build the extension, run the GPU
# tests, compute-sanitizer memcheck on small cases of every GPU kernel, the
# benchmark matrix against cuDNN, then a short summary, printed last.
#
#   bash bench/gpu_run.sh OUTDIR
#
# Sized for ONE call of at most 6 minutes on an H200 (16 cores): the run aims to end
# by GPU_RUN_TOTAL_S (330 s) plus the summary. Steps in order of what matters, each with
# its own limit (seconds; expected times are estimates, nothing has run on a GPU yet):
#   step                              limit       runs                              expected
#   env probe                            30       first                             ~10
#   build (pip install -e .)            150       on the critical path              ~90
#   sanitizer, triton                   170       beside the build (no extension)   ~90
#   Triton warm-up of the bench kernels 140       beside the build                  ~50
#   tests (-m gpu, pytest-xdist)        100       after the build                   ~70
#   sanitizer, cuda                      60       beside the tests                  ~30
#   benchmark (two processes)         the rest    alone (it is timing)             ~150
#   merge + summary                   20+15       last                              ~10
# Sum of the limits on the critical path: 30 + 150 + 100 = 280 s before the benchmark (the
# background steps end by then), which gets what is left of TOTAL less 20 s, at least 40 s,
# and is stopped at TOTAL - 10 s (or 40 s after its start); then 35 s for merge and summary:
# at most max(320, 280 + 40) + 35 = 355 s. When every step keeps to its estimate the run
# ends at about 330 s (the benchmark fills its budget: its repeats adapt).
#
# OUTDIR receives at most 7 files: log.txt (everything, in order), tests.txt,
# sanitize.txt, results.json, results.csv, results.md, plot.png. A run cut short
# still has the build log and the test results: they come first.
# Without a GPU the run degrades step by step: the build, the tests (GPU ones skip with their
# reason), "no CUDA device" for the sanitizer and the warm-up, the benchmark's own refusal;
# GPU_RUN_DRY=1 runs the GPU-only steps anyway, to check the script's plumbing there.
# Environment: PYTHON (default python3), GPU_RUN_TOTAL_S (330), GPU_RUN_BUILD (the build
# command; default pip install --no-build-isolation --no-deps -e .), GPU_RUN_TESTS (test
# paths, default tests), GPU_RUN_TEST_WORKERS (pytest-xdist workers, default 12),
# GPU_RUN_ALL_TESTS=1 (the whole suite instead of -m gpu, limit 400 s, nothing after it).
set -u -o pipefail
OUT=${1:?usage: bash bench/gpu_run.sh OUTDIR}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.." || exit 1
export PYTHONUNBUFFERED=1
# python3: the GPU machine's interpreter with torch (a plain "python" may be absent there).
PY=${PYTHON:-$(command -v python3 || command -v python)}
TOTAL=${GPU_RUN_TOTAL_S:-330}
LOG=$OUT/log.txt
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
: >"$LOG"
: >"$OUT/sanitize.txt"
T0=$SECONDS
say() { echo "[gpu_run +$((SECONDS - T0))s] $*" | tee -a "$LOG"; }
left() { echo $((TOTAL - (SECONDS - T0))); }
STEPS=()  # "name|limit|seconds|status" for the summary
step_done() { STEPS+=("$1|$2|$3|$4"); }

# --- environment (limit 30 s) --------------------------------------------------
if [ -z "${CUDA_HOME:-}" ]; then
    # The toolkit root holds bin/nvcc and lib64/libcudart; nvcc on PATH may be a wrapper elsewhere.
    for d in "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc 2>/dev/null || echo /x/x/x)")")")" \
             /usr/local/cuda /usr/local/cuda-*; do
        if [ -x "$d/bin/nvcc" ] && ls "$d"/lib*/libcudart* >/dev/null 2>&1; then export CUDA_HOME=$d; break; fi
    done
fi
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
# A failed build must show as "not built", not as a JIT build of minutes inside every test process.
export LSTM_FAST_JIT=0
# Inductor (tests/test_torch_compile.py) compiles in-process: the xdist workers are the parallelism.
export TORCHINDUCTOR_COMPILE_THREADS=1
unset TRITON_INTERPRET
s0=$SECONDS
say "repo $(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet 2>/dev/null || echo '+changes'), CUDA_HOME=${CUDA_HOME:-unset}, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
timeout 10 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv >>"$LOG" 2>&1 \
    || echo "nvidia-smi: not available" >>"$LOG"
ENV_LINE=$(timeout 30 "$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)" 2>&1 | tail -n 1)
echo "$ENV_LINE" | tee -a "$LOG"
case "$ENV_LINE" in "python "*" gpu None") HAS_CUDA=0 ;; "python "*" gpu "*) HAS_CUDA=1 ;; *) HAS_CUDA=0 ;; esac
step_done env 30 $((SECONDS - s0)) "$([ $HAS_CUDA = 1 ] && echo "GPU seen" || echo "no CUDA device")"

# --- background steps beside the build: they need no compiled extension ------------
SAN=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
ALL=${GPU_RUN_ALL_TESTS:-0}
GPU=$HAS_CUDA; [ "${GPU_RUN_DRY:-0}" = 1 ] && GPU=1  # run the GPU-only steps (plumbing check)
SAN_OK=1
if [ "$ALL" = 1 ]; then SAN_OK=0; SAN_WHY="skipped (whole-suite run)"
elif ! [ -x "$SAN" ]; then SAN_OK=0; SAN_WHY="compute-sanitizer not found ($SAN)"
elif [ "$GPU" != 1 ]; then SAN_OK=0; SAN_WHY="skipped: no CUDA device"
fi

# sanitize BACKEND LIMIT: memcheck on bench/sanitize_case.py, lines prefixed with the backend
# (both runs may write at once). No caching allocator: each tensor is its own allocation, so
# an out-of-bounds access faults instead of landing in a neighbour's block.
sanitize() {
    local b=$1 lim=$2 t=$SECONDS
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout -k 5 "$lim" "$SAN" --tool memcheck --error-exitcode 99 \
        --print-limit 20 "$PY" bench/sanitize_case.py "$b" 2>&1 | sed -u "s/^/[$b] /" >>"$OUT/sanitize.txt"
    echo "${PIPESTATUS[0]} $((SECONDS - t))" >"$WORK/san_$b.rc"
}
san_result() {  # one summary line for backend $1
    local b=$1 rc secs sum fails why=""
    [ -f "$WORK/san_$b.rc" ] || { echo "$b: not run"; return; }
    read -r rc secs <"$WORK/san_$b.rc"
    sum=$(grep -E "^\[$b\] =+ ERROR SUMMARY" "$OUT/sanitize.txt" | tail -n 1 | sed 's/^.*ERROR SUMMARY/ERROR SUMMARY/')
    fails=$(grep -E "^\[$b\] [0-9]+ failure" "$OUT/sanitize.txt" | tail -n 1 | cut -d' ' -f2-)
    # Refused: the sanitizer says so, or torch under it saw no device (sanitize_case then checks nothing).
    if grep -qE "^\[$b\] .*(Device not supported|error 999|Target application terminated before first instrumented)" \
        "$OUT/sanitize.txt" || { [ "$HAS_CUDA" = 1 ] && grep -q "^\[$b\] no CUDA device" "$OUT/sanitize.txt"; }; then
        why=" REFUSED the device"
    fi
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then why="$why (time limit)"; fi
    echo "$b: exit $rc in ${secs}s$why${sum:+ [$sum]}${fails:+ [$fails]}"
}

if [ "$SAN_OK" = 1 ]; then
    say "sanitizer: memcheck on bench/sanitize_case.py triton (limit 170 s, in the background)"
    sanitize triton 170 &
    SAN_TRITON_PID=$!
fi

# The benchmark's two invocations (see bench/configs.py for the matrix and its time estimate).
BENCH1=(--device cuda --configs flashrnn-gpu --dtype "fp16,bf16,tf32,fp32")
BENCH2=(--device cuda --configs h200-sweep-gpu --dtype "bf16,fp32")
WARM_PID=""
if [ "$GPU" = 1 ] && [ "$ALL" != 1 ]; then
    # Triton autotunes each (H, B bucket, dtype) of the benchmark on first use, compiling every
    # candidate config (~1-2 s each, 8-15 per pair: ~5 minutes for the matrix in one process).
    # Compiling them here, 8 processes beside the build, leaves the benchmark disk-cache hits.
    say "warm-up: Triton kernels of the benchmark matrix, 8 processes (limit 140 s, in the background)"
    (
        for k in 0 1 2 3 4 5 6 7; do
            timeout -k 5 140 "$PY" - "$k" 8 "${BENCH1[*]}" "${BENCH2[*]}" >"$WORK/warm_$k.txt" 2>&1 <<'EOF' &
import sys, time
import torch
import lstm_fast
from bench import configs as cfg
from bench.machine import TORCH_DTYPES, tf32

k, n = int(sys.argv[1]), int(sys.argv[2])
jobs = []
for argv in sys.argv[3:]:
    a = argv.split()
    jobs += [(s, d) for s in cfg.resolve_configs(a[a.index("--configs") + 1], "cuda", False)
             for d in a[a.index("--dtype") + 1].split(",")]
for s, d in jobs[k::n]:
    t0 = time.time()
    try:
        with tf32(d == "tf32"):
            base = torch.nn.LSTM(s.I, s.H, s.L, bidirectional=s.bidir, proj_size=s.proj).to("cuda", TORCH_DTYPES[d])
            m = lstm_fast.LSTM.from_torch(base, backend="triton")
            x = torch.randn(2, s.B, s.I, device="cuda", dtype=TORCH_DTYPES[d])  # T=2: T is no autotune key
            with torch.inference_mode():
                m.eval()(x)
            m.train()
            y, _ = m(x.requires_grad_(True))
            y.backward(torch.randn_like(y))
            torch.cuda.synchronize()
        print(f"warm {d} {s.name}: {time.time() - t0:.1f} s")
    except Exception as exc:
        print(f"warm {d} {s.name}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
EOF
        done
        wait
    ) &
    WARM_PID=$!
fi

# --- build (limit 150 s) ----------------------------------------------------------
read -r -a BUILD_CMD <<<"${GPU_RUN_BUILD:-"$PY" -m pip install --no-build-isolation --no-deps -e .}"
say "build: ${BUILD_CMD[*]} (limit 150 s)"
s0=$SECONDS
timeout -k 5 150 "${BUILD_CMD[@]}" >>"$LOG" 2>&1
rc=$?
if [ $rc = 0 ]; then BUILD="ok ($((SECONDS - s0)) s)"
else BUILD="FAILED (exit $rc$([ $rc = 124 ] && echo ', time limit'), $((SECONDS - s0)) s, see log.txt); backends below say what is missing"
fi
say "build: $BUILD"
step_done build 150 $((SECONDS - s0)) "$BUILD"
BACKENDS=$(timeout 60 "$PY" -c "import lstm_fast
for n, (ok, why) in lstm_fast.available_backends().items(): print(f'  {n:9s} {\"yes\" if ok else \"no \"} {why.splitlines()[0][:150] if why else \"\"}')" 2>&1)
echo "$BACKENDS" | tee -a "$LOG"

# --- tests (limit 100 s), the cuda sanitizer beside them ------------------------------
if [ "$SAN_OK" = 1 ]; then
    if [ -f "$WORK/san_triton.rc" ] && san_result triton | grep -q REFUSED; then
        SAN_CUDA_SKIP="cuda: not run, the sanitizer refused the device in the triton run"
    else
        say "sanitizer: memcheck on bench/sanitize_case.py cuda (limit 60 s, in the background)"
        sanitize cuda 60 &
        SAN_CUDA_PID=$!
    fi
fi
read -r -a TPATHS <<<"${GPU_RUN_TESTS:-tests}"
if [ "$ALL" = 1 ]; then SEL=(); TLIM=400; else SEL=(-m gpu); TLIM=100; fi
XDIST=()
# Parallel workers: most of the GPU tests' time is Triton compiling on the CPU (16 cores there).
"$PY" -c "import xdist" 2>/dev/null && XDIST=(-n "${GPU_RUN_TEST_WORKERS:-12}")
"$PY" -c "import pytest_timeout" 2>/dev/null && XDIST+=(--timeout 90)  # a hung test fails alone
say "tests: pytest ${TPATHS[*]} ${SEL[*]} ${XDIST[*]} (limit ${TLIM}s)"
s0=$SECONDS
# SIGINT first: pytest then still prints its summary of what ran.
timeout -s INT -k 10 "$TLIM" "$PY" -m pytest "${TPATHS[@]}" "${SEL[@]}" "${XDIST[@]}" -q -rfEs --durations=10 \
    -p no:cacheprovider >"$OUT/tests.txt" 2>&1
rc=$?
TESTS="$(tail -n 1 "$OUT/tests.txt") (exit $rc$([ $rc = 124 ] && echo ', time limit'))"
say "tests: $TESTS"
step_done tests "$TLIM" $((SECONDS - s0)) "$TESTS"
cat "$OUT/tests.txt" >>"$LOG"

# --- join the background steps: the benchmark must have the GPU to itself -------------
s0=$SECONDS
for pid in ${SAN_TRITON_PID:-} ${SAN_CUDA_PID:-} $WARM_PID; do wait "$pid" 2>/dev/null; done
if [ "$SAN_OK" = 1 ]; then
    if [ -n "${SAN_CUDA_SKIP:-}" ]; then SANITIZE="$(san_result triton); $SAN_CUDA_SKIP"
    else SANITIZE="$(san_result triton); $(san_result cuda)"; fi
else
    SANITIZE=$SAN_WHY
fi
say "sanitizer: $SANITIZE"
step_done sanitizer "170+60" "-" "$SANITIZE"
if [ -n "$WARM_PID" ]; then
    cat "$WORK"/warm_*.txt >>"$LOG"
    WARM="$(cat "$WORK"/warm_*.txt | grep -c ': [0-9.]* s$') (shape, dtype) pairs compiled, $(cat "$WORK"/warm_*.txt | grep -vc ': [0-9.]* s$') failed"
else
    WARM="skipped ($([ "$HAS_CUDA" = 1 ] && echo "whole-suite run" || echo "no CUDA device"))"
fi
say "warm-up: $WARM (joined after $((SECONDS - s0)) s)"
step_done warm-up 140 "-" "$WARM"

# --- benchmark: what is left, FlashRNN's configuration first ---------------------------
s0=$SECONDS
END=$((T0 + TOTAL - 10))  # the benchmark's hard end (SECONDS clock)
budget=$(( $(left) - 20 )); [ "$budget" -lt 40 ] && budget=40 && END=$((SECONDS + 40))
# FlashRNN's 8 rows need ~35 s (bench/configs.py), the sweep's 24 ~80 s: 30% and the rest.
b1=$(( budget * 30 / 100 )); [ "$b1" -lt 40 ] && b1=40
BENCH=""
if [ "$ALL" = 1 ]; then
    BENCH="skipped (whole-suite run)"
else
    say "benchmark 1/2: python -m bench ${BENCH1[*]} (budget ${b1}s of ${budget}s)"
    timeout -s TERM -k 5 $(( END - SECONDS < b1 + 20 ? END - SECONDS : b1 + 20 )) \
        "$PY" -m bench "${BENCH1[@]}" --out "$OUT" --budget "$b1" --no-progress >>"$LOG" 2>&1
    rc=$?
    BENCH="flashrnn-gpu: exit $rc$([ $rc = 124 ] && echo ' (time limit)')"
    if [ "$rc" = 1 ] && [ "$HAS_CUDA" != 1 ]; then BENCH="$BENCH, refused: torch sees no CUDA device"; fi
    b2=$(( END - SECONDS - 20 ))
    if [ "$GPU" != 1 ]; then
        BENCH="$BENCH; h200-sweep-gpu: skipped, no CUDA device"
    elif [ "$b2" -lt 30 ]; then
        BENCH="$BENCH; h200-sweep-gpu: skipped, ${b2}s left"
    else
        say "benchmark 2/2: python -m bench ${BENCH2[*]} (budget ${b2}s)"
        timeout -s TERM -k 5 $(( END - SECONDS )) \
            "$PY" -m bench "${BENCH2[@]}" --out "$WORK/sweep" --budget "$b2" --no-progress >>"$LOG" 2>&1
        rc=$?
        BENCH="$BENCH; h200-sweep-gpu: exit $rc$([ $rc = 124 ] && echo ' (time limit)')"
        if [ "$rc" = 1 ] && [ "$HAS_CUDA" != 1 ]; then BENCH="$BENCH, refused: torch sees no CUDA device"; fi
    fi
fi
say "benchmark: $BENCH"
step_done benchmark "$budget" $((SECONDS - s0)) "$BENCH"

# --- merge the two reports into OUT, then the summary (printed last) ---------------------
s0=$SECONDS
if [ -f "$WORK/sweep/results.json" ] && [ -f "$OUT/results.json" ]; then
    timeout 20 "$PY" - "$OUT" "$WORK/sweep/results.json" >>"$LOG" 2>&1 <<'EOF' || say "merge: failed, see log.txt"
import os, sys
from bench import report as rep

out, other = sys.argv[1], rep.load(sys.argv[2])
r = rep.load(os.path.join(out, "results.json"))
r["rows"] += other["rows"]
for d, v in other.get("matmul_peak", {}).items():  # the better rate of the two processes, as the harness does
    if (v.get("gflops") or 0) > (r["matmul_peak"].get(d, {}).get("gflops") or 0):
        r["matmul_peak"][d] = v
for row in r["rows"]:
    peak = r["matmul_peak"].get(row["dtype"], {}).get("gflops")
    if peak and row.get("gflops"):
        row["pct_peak"] = 100.0 * row["gflops"] / peak
r["run"]["command"] += " ; " + other["run"]["command"]
r["run"]["wall_s"] = r["run"].get("wall_s", 0) + other["run"].get("wall_s", 0)
r["run"]["stopped"] = "; ".join(s for s in (r["run"].get("stopped"), other["run"].get("stopped")) if s) or None
r["machine"]["loadavg_end"] = other["machine"].get("loadavg_end")
rep.write_json(os.path.join(out, "results.json"), r)
rep.write_csv(os.path.join(out, "results.csv"), r)
png = rep.plot(r, os.path.join(out, "plot.png"))
with open(os.path.join(out, "results.md"), "w") as f:
    f.write(rep.markdown(r) + ("\n![speedup vs hidden size](plot.png)\n" if png else ""))
print(f"merged {len(other['rows'])} rows of the sweep into {out}/results.json")
EOF
fi
{
    echo
    echo "== gpu_run summary ($((SECONDS - T0)) s; GPU: $(echo "$ENV_LINE" | sed -n 's/.* gpu //p')) =="
    printf '%-10s %7s %6s  %s\n' step "limit_s" "took_s" status
    for s in "${STEPS[@]}"; do IFS='|' read -r n l t st <<<"$s"; printf '%-10s %7s %6s  %s\n' "$n" "$l" "$t" "$st"; done
    echo "backends:"; echo "$BACKENDS"
    grep -E "^(FAILED|ERROR) " "$OUT/tests.txt" | head -n 15
    [ -f "$OUT/results.json" ] && timeout 15 "$PY" -m bench --summary "$OUT/results.json"
    echo "files: $(find "$OUT" -maxdepth 1 -type f -printf '%f ')"
} 2>&1 | tee -a "$LOG"
