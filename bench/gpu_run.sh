#!/usr/bin/env bash
# One GPU check in one go (see bench/README.md): build the extension, run the
# GPU tests, compute-sanitizer memcheck on small cases of every GPU kernel, the
# benchmark matrix against cuDNN, then a short summary.
#
#   bash bench/gpu_run.sh OUTDIR
#
# OUTDIR receives exactly: log.txt (everything), tests.txt, sanitize.txt,
# results.json, results.csv, results.md, plot.png. Whole run: at most about 9
# minutes on an H100: each step has a time limit (build 200 s, tests 120 s,
# sanitizer 60 + 90 s) and the benchmark gets what is left of GPU_RUN_TOTAL_S,
# at least 100 s, so even the worst case stays under 10 minutes.
# Environment: PYTHON (default python), GPU_RUN_TOTAL_S (default 540),
# GPU_RUN_ALL_TESTS=1 runs the whole test suite instead of the `gpu` marker, with
# a 400 s limit and nothing after it (Triton compiles every shape the suite meets:
# sanitizer and benchmark would not fit in the same 10 minutes),
# GPU_RUN_BENCH_ARGS (default "--device cuda") replaces the benchmark's arguments.
set -u -o pipefail
OUT=${1:?usage: bash bench/gpu_run.sh OUTDIR}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python}
TOTAL=${GPU_RUN_TOTAL_S:-540}
LOG=$OUT/log.txt
: >"$LOG"
T0=$SECONDS
say() { echo "[gpu_run +$((SECONDS - T0))s] $*" | tee -a "$LOG"; }
left() { echo $((TOTAL - (SECONDS - T0))); }

# --- environment -------------------------------------------------------------
if [ -z "${CUDA_HOME:-}" ]; then
    # The toolkit root holds bin/nvcc and lib64/libcudart; nvcc on PATH may be a wrapper elsewhere.
    for d in "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc 2>/dev/null || echo /x/x/x)")")")" \
             /usr/local/cuda /usr/local/cuda-*; do
        if [ -x "$d/bin/nvcc" ] && ls "$d"/lib*/libcudart* >/dev/null 2>&1; then export CUDA_HOME=$d; break; fi
    done
fi
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
unset TRITON_INTERPRET
say "repo $(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet 2>/dev/null || echo '+changes'), CUDA_HOME=${CUDA_HOME:-unset}, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv >>"$LOG" 2>&1
$PY -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)" 2>&1 | tee -a "$LOG"

# --- build -------------------------------------------------------------------
say "build: pip install --no-build-isolation --no-deps -e ."
b0=$SECONDS
if timeout 200 $PY -m pip install --no-build-isolation --no-deps -e . >>"$LOG" 2>&1; then
    BUILD="ok ($((SECONDS - b0)) s)"
else
    BUILD="FAILED ($((SECONDS - b0)) s, see log.txt); backends below say what is missing"
fi
say "build: $BUILD"
BACKENDS=$($PY -c "import lstm_fast
for n, (ok, why) in lstm_fast.available_backends().items(): print(f'  {n:9s} {\"yes\" if ok else \"no \"} {why.splitlines()[0][:150] if why else \"\"}')" 2>&1)
echo "$BACKENDS" | tee -a "$LOG"

# --- tests -------------------------------------------------------------------
ALL=${GPU_RUN_ALL_TESTS:-0}
if [ "$ALL" = 1 ]; then SEL=(); TLIM=400; else SEL=(-m gpu); TLIM=120; fi
say "tests: pytest tests ${SEL[*]} (limit ${TLIM}s)"
timeout "$TLIM" $PY -m pytest tests "${SEL[@]}" -q -rs -p no:cacheprovider >"$OUT/tests.txt" 2>&1
rc=$?
TESTS="$(tail -n 1 "$OUT/tests.txt") (exit $rc$([ $rc = 124 ] && echo ', time limit'))"
say "tests: $TESTS"
cat "$OUT/tests.txt" >>"$LOG"

# --- compute-sanitizer ---------------------------------------------------------
SAN=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
: >"$OUT/sanitize.txt"
SANITIZE=""
[ "$ALL" = 1 ] && SANITIZE=" skipped (whole-suite run)"
for backend in cuda triton; do
    [ "$ALL" = 1 ] && break
    if ! [ -x "$SAN" ]; then SANITIZE=" compute-sanitizer not found ($SAN)"; break; fi
    say "sanitizer: memcheck on bench/sanitize_case.py $backend"
    # No caching allocator: each tensor is its own allocation, so an out-of-bounds access faults.
    # Triton gets longer: it compiles and autotunes its kernels under the sanitizer.
    lim=60; [ "$backend" = triton ] && lim=90
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "$lim" "$SAN" --tool memcheck --error-exitcode 99 --print-limit 20 \
        $PY bench/sanitize_case.py "$backend" >>"$OUT/sanitize.txt" 2>&1
    rc=$?
    sum=$(grep -E "ERROR SUMMARY" "$OUT/sanitize.txt" | tail -n 1)
    SANITIZE="$SANITIZE $backend: exit $rc$([ $rc = 124 ] && echo ' (time limit)') ${sum:+[$sum]};"
done
cat "$OUT/sanitize.txt" >>"$LOG"
say "sanitizer:$SANITIZE"

# --- benchmark -----------------------------------------------------------------
# Budget: what is left of TOTAL minus ~25 s for the report and summary, at least 100 s.
budget=$(( $(left) - 25 )); [ "$budget" -lt 100 ] && budget=100
read -r -a BARGS <<<"${GPU_RUN_BENCH_ARGS:---device cuda}"
if [ "$ALL" = 1 ]; then
    BENCH="skipped (whole-suite run)"
else
    say "benchmark: python -m bench ${BARGS[*]} (budget ${budget}s)"
    timeout -s TERM $((budget + 40)) $PY -m bench "${BARGS[@]}" --out "$OUT" --budget "$budget" >>"$LOG" 2>&1
    BENCH="exit $?"
fi
say "benchmark: $BENCH"

# --- summary (printed last) ------------------------------------------------------
{
    echo
    echo "== gpu_run summary ($((SECONDS - T0)) s) =="
    echo "build:     $BUILD"
    echo "backends:"; echo "$BACKENDS"
    echo "tests:     $TESTS"
    echo "sanitizer:$SANITIZE"
    echo "benchmark: $BENCH; $OUT/results.md"
    [ -f "$OUT/results.json" ] && $PY -m bench --summary "$OUT/results.json"
} 2>&1 | tee -a "$LOG"
