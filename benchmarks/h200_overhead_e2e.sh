#!/usr/bin/env bash
# The H200 runs of issue 12/15 in two device calls (each under the 600 s limit), logs and tables under
# $OUT. From the repository root:
#   bash benchmarks/h200_overhead_e2e.sh tests   # the GPU tests, then the per-call overhead table
#   bash benchmarks/h200_overhead_e2e.sh recheck # after a change: touched GPU tests, both tables at 4k
#   bash benchmarks/h200_overhead_e2e.sh e2e     # one op call's host time in pieces, then the end-to-end
#                                                # table (Llama and Mistral, bf16)
set -u
STAGE=${1:-tests}
OUT=${OUT:-/tmp/h200_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python -m pip install -q --no-deps --no-build-isolation . > "$OUT/install.log" 2>&1 || { tail "$OUT/install.log"; exit 1; }
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
  git rev-parse --short HEAD 2>/dev/null; date -u; } > "$OUT/versions_$STAGE.txt" 2>&1
box() {  # box SECONDS NAME COMMAND...
  local t=$1 name=$2; shift 2
  echo "== $name ($t s): $*"
  timeout "$t" "$@" > "$OUT/$name.log" 2>&1; echo "   rc=$?"; tail -n "${TAIL:-6}" "$OUT/$name.log"
}
if [ "$STAGE" = recheck ]; then  # one call after a change: the touched GPU tests, then both tables at 4k
  box 150 gpu_tests_touched python -P -X faulthandler -m pytest -q -p no:cacheprovider -m gpu -rfE \
    tests/test_score_mod_tiles.py tests/test_export.py tests/test_dynamic_shapes.py tests/test_inductor_gpu.py \
    tests/test_direct_sdpa.py tests/test_settle_bound.py
  TAIL=8 box 60 profile_op_host python -P benchmarks/profile_op_host.py
  box 150 overhead python -P benchmarks/bench_overhead.py --out "$OUT" --cudagraphs
  box 280 e2e python -P benchmarks/bench_e2e.py --out "$OUT" --prefill 4096 --prompt 1024 --new-tokens 32 \
    --cache static --repeats 2 --budget-s 230
  grep "^| " "$OUT"/overhead_*.md; sed -n '/^## llama/,/^## Cells/p' "$OUT"/e2e_*.md
elif [ "$STAGE" = tests ]; then
  box "${T_TESTS:-200}" gpu_tests python -P -X faulthandler -m pytest -q -p no:cacheprovider -m gpu -n 8 -rfE tests/
  box "${T_OVERHEAD:-200}" overhead python -P benchmarks/bench_overhead.py --out "$OUT" --cudagraphs --profile
  grep -A3 "^| N" "$OUT"/overhead_*.md | head -3; grep "^| " "$OUT"/overhead_*.md | tail -n +3
else
  TAIL=40 box 60 profile_op_host python -P benchmarks/profile_op_host.py
  box "${T_E2E:-480}" e2e python -P benchmarks/bench_e2e.py --out "$OUT" --prefill "${E2E_PREFILL:-4096,32768}" \
    --prompt "${E2E_PROMPT:-1024}" --new-tokens "${E2E_TOKENS:-32}" --cache "${E2E_CACHE:-static}" --repeats 2 \
    --budget-s "${E2E_BUDGET:-380}"
  cat "$OUT"/e2e_*.md 2>/dev/null | head -40
fi
