#!/usr/bin/env bash
# The H200 re-run of the GPU tests, the GPU semantics check and the sparse, linear and flow benchmarks, in one
# device call: each benchmark in its own time box, each writing its table after every row, all results in
# one archive (the device returns at most 8 files). Run from the repository root on the device machine:
#   bash benchmarks/h200_rerun.sh        (with fla-core's wheel in .whl/ for the linear baseline)
set -u
OUT=${OUT:-/tmp/h200_out}
R="$OUT/res"
mkdir -p "$R"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
python -m pip install -q --no-deps --no-build-isolation . > "$R/install.log" 2>&1 || { tail "$R/install.log"; exit 1; }
{ nvidia-smi --query-gpu=name,driver_version --format=csv; python -c "import torch, triton; print(torch.__version__, triton.__version__)"; } > "$R/versions.txt"
box() {  # box SECONDS NAME COMMAND...: run one benchmark, keep its log
  local t=$1 name=$2; shift 2
  echo "== $name ($t s): $*"
  timeout "$t" "$@" > "$R/$name.log" 2>&1; echo "   rc=$?"; tail -n 12 "$R/$name.log"
}
box "${T_TESTS:-150}" gpu_tests python -P -m pytest -q -p no:cacheprovider -m gpu -n 8 tests/
box "${T_SEM:-40}" gpu_semantics python -P benchmarks/gpu_semantics_check.py
box "${T_SPARSE:-200}" sparse python -P benchmarks/bench_sparse.py --out "$R" --cases 1d_w512 2d_13x13 2d_13x13_dil2 --ns 65536
box "${T_BLOCK:-110}" block_sparse python -P benchmarks/bench_block_sparse.py --out "$R" --ns 65536 --no-builders
box "${T_LINEAR:-130}" linear python -P benchmarks/bench_linear.py --out "$R" --ns 16384,65536
box "${T_FLOW:-110}" flow python -P benchmarks/bench_flow.py --out "$R" --ns 16384,65536
tar czf "$OUT/results.tgz" -C "$R" .
