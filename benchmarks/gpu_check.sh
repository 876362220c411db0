#!/usr/bin/env bash
# On a GPU machine (H100/H200): build the CUDA extension, run the GPU tests and the GPU benchmarks
# in one go (well under 6 minutes), write everything into the folder given as $1, print a short
# table last.  Usage: bash benchmarks/gpu_check.sh OUT_DIR
# The device machine has no network: it installs with what is there (torch, triton, pybind11).
set -uo pipefail
out=${1:?usage: gpu_check.sh OUT_DIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}

{
    echo "== machine"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    $py -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$out/machine.txt"

echo "== build (VLMFAST_CUDA=1)"
start=$(date +%s)
VLMFAST_CUDA=1 $py -m pip install -q --no-build-isolation --no-deps -e . >"$out/build.log" 2>&1 \
    || { tail -40 "$out/build.log"; echo "BUILD FAILED"; exit 1; }
echo "built in $(( $(date +%s) - start )) s"

echo "== GPU tests"
# Every test parametrised over backends runs its cuda variants here; -k keeps the CPU-only ones out.
# GPU-only tests named here explicitly (each also matches -k; pytest collects a file once):
#   tests/generation/test_cuda_graphs.py: graph-replayed greedy SmolVLM generation == eager
gpu_tests="tests/generation/test_cuda_graphs.py"
timeout 240 $py -m pytest -q -x $gpu_tests tests -k "cuda or gpu" -p no:cacheprovider \
    --junitxml="$out/tests.xml" 2>&1 | tee "$out/tests.log" | tail -25
tests_status=${PIPESTATUS[0]}

echo "== benchmarks"
timeout 240 $py -m vlmfast.bench.runner all --device cuda --json "$out/bench.jsonl" 2>&1 | tee "$out/bench.txt"
# The README's Markdown table of this run (benchmarks/results/ keeps the records worth publishing).
$py -m vlmfast.bench.runner --report --results "$out/bench.jsonl" >"$out/report.md" 2>&1

echo "== summary"
echo "tests exit status: $tests_status ($(grep -o '[0-9]* passed\|[0-9]* failed' "$out/tests.log" | tr '\n' ' '))"
tail -n +1 "$out/bench.txt" | sed -n '/^suite/,$p'
exit "$tests_status"
