#!/usr/bin/env bash
# The first thing a GPU machine (H100/H200) runs: bash benchmarks/gpu_check.sh OUT_DIR
#
#   1. compile_all for this GPU's arch (every Triton kernel x dtype x config; catches compile
#      errors, shared memory and spills before any test),
#   2. builds vlmfast._C and vlmfast._C_cuda in place (VLMFAST_CUDA=1, no build isolation, no
#      network; _C_cuda only where an nvcc is found: PATH, CUDA_HOME, /usr/local/cuda or NVIDIA's
#      wheels), with ptxas's resource report of the CUDA kernels,
#   3. the GPU tests (every test with "cuda" or "gpu" in its id, tests/kernels/test_gpu.py, the
#      CUDA-graph decode test),
#   4. the GPU benchmarks (op suites against torch / transformers in the same run),
#   5. a short table last.
# Cold compile included it fits in 8 minutes: each stage has a time limit (75 + 120 + 180 + 90 s)
# and fails when it runs past it. Its exit status is 0
# only when every stage passed. OUT_DIR receives machine.json and the JSON records (benchmark
# rows with the card, date and versions; compile and runtime kernel reports) to commit under
# benchmarks/results/.
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
export VLMFAST_KERNEL_REPORT="$out/kernels_runtime.jsonl"
rm -f "$VLMFAST_KERNEL_REPORT"
py=${PYTHON:-python3}
jobs=$(nproc 2>/dev/null || echo 8)
started=$(date +%s)
declare -A status

stage() {  # stage NAME SECONDS COMMAND...: runs it with a time limit, records its exit status
    local name=$1 limit=$2
    shift 2
    local t0=$(date +%s)
    echo "== $name (limit ${limit} s)"
    timeout "$limit" "$@"
    status[$name]=$?
    echo "-- $name: exit ${status[$name]} in $(( $(date +%s) - t0 )) s"
}

echo "== machine"
$py - "$out/machine.json" <<'EOF' || exit 1
import datetime, json, platform, sys
import torch, triton
info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
        "cuda": torch.version.cuda, "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "capability": list(torch.cuda.get_device_capability(0)) if torch.cuda.is_available() else None}
json.dump(info, open(sys.argv[1], "w"), indent=1)
print(json.dumps(info))
if not torch.cuda.is_available():
    sys.exit("gpu_check: no CUDA device")
EOF
arch=$($py -c "import torch; m, n = torch.cuda.get_device_capability(0); print(f'sm_{m}{n}' + ('a' if m == 9 else ''))")

# vlmfast importable from this checkout without installing (no network, and pip's editable
# install would need setuptools >= 77): vlmfast.kernels is kernels/ through a link, removed at
# exit; the extensions are built in place below.
restore() {
    rm -f vlmfast/kernels
    [ -f "$out/pyproject.toml.orig" ] && mv "$out/pyproject.toml.orig" pyproject.toml
}
trap restore EXIT
[ -e vlmfast/kernels ] || ln -s ../kernels vlmfast/kernels
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# setuptools < 77 rejects pyproject's SPDX license string: give it the older table form meanwhile.
if ! $py -c "import setuptools, sys; sys.exit(int(setuptools.__version__.split('.')[0]) < 77)" 2>/dev/null; then
    cp pyproject.toml "$out/pyproject.toml.orig"
    sed -i 's/^license = "\(.*\)"/license = {text = "\1"}/' pyproject.toml
fi

# 1. Every Triton kernel for this GPU's arch (CI compiles sm_90a and sm_80): ~30 s on 16 cores.
stage compile_all 75 $py -m vlmfast.kernels.compile_all --arch "$arch" --jobs "$jobs" \
    --json "$out/compile_all.jsonl" 2> >(tee "$out/compile_all.txt" >&2)

# 2. The extensions, in place. _C_cuda needs an nvcc; without network none can be installed here.
cuda_flag=1
if ! command -v nvcc >/dev/null 2>&1 && [ -z "${CUDA_HOME:-}" ] && [ ! -x /usr/local/cuda/bin/nvcc ] \
    && ! $py -c "import nvidia, pathlib, sys; sys.exit(not any((p / 'bin' / 'nvcc').exists() for f in nvidia.__path__ for p in pathlib.Path(f).glob('cu1*')))" 2>/dev/null; then
    echo "gpu_check: no nvcc on this machine: building vlmfast._C only (the CUDA C++ kernels are not tested)"
    cuda_flag=0
fi
build_dir=$(mktemp -d)
stage build 120 env VLMFAST_CUDA=$cuda_flag $py setup.py -q build_ext --inplace --build-temp "$build_dir"
if ls "$build_dir"/cuda/*.ptxas.log >/dev/null 2>&1; then
    $py .ci/ptxas_report.py "$build_dir"/cuda/*.ptxas.log --json "$out/ptxas.jsonl" >"$out/ptxas.txt" 2>&1 \
        || status[build]=1
    tail -2 "$out/ptxas.txt"
fi
rm -rf "$build_dir"

# 3. GPU tests: every test parametrised over backends runs its cuda variants (-k); the files named
# hold GPU-only tests (each also matches -k; pytest collects a file once).
gpu_tests="tests/kernels/test_gpu.py tests/generation/test_cuda_graphs.py"
stage tests 180 $py -m pytest -q --maxfail=25 $gpu_tests tests -k "cuda or gpu" -p no:cacheprovider \
    --junitxml="$out/tests.xml" > >(tee "$out/tests.log" | tail -25) 2>&1

# 4. GPU benchmarks: the op suites, vlmfast against its peers in the same run.
stage bench 90 $py -m vlmfast.bench.runner ops --device cuda --no-peaks --json "$out/bench.jsonl" \
    > >(tee "$out/bench.txt") 2>&1

# 5. Summary, last.
echo
echo "== summary ($(( $(date +%s) - started )) s)"
tail -n +1 "$out/bench.txt" 2>/dev/null | sed -n '/^suite/,$p'
[ -f "$out/compile_all.txt" ] && grep -E "compiles in|^FAIL" "$out/compile_all.txt" | head -20
$py - "$VLMFAST_KERNEL_REPORT" <<'EOF'
import json, sys
try:
    rows = [json.loads(l) for l in open(sys.argv[1])]
except FileNotFoundError:
    rows = []
spilling = [r for r in rows if r.get("spills")]
print(f"runtime kernels: {len(rows)} compiled, max {max((r['registers'] or 0 for r in rows), default=0)} registers, "
      f"{len(spilling)} spilling")
for r in spilling[:20]:
    print(f"  SPILLS {r['spills']} B: {r['kernel']} {r['config']}")
EOF
echo "tests: $(grep -o '[0-9]* passed\|[0-9]* failed\|[0-9]* error' "$out/tests.log" 2>/dev/null | tr '\n' ' ')"
failed=0
for name in compile_all build tests bench; do
    printf '%-12s %s\n' "$name" "$([ "${status[$name]:-1}" -eq 0 ] && echo ok || echo "FAILED (exit ${status[$name]:-none})")"
    [ "${status[$name]:-1}" -eq 0 ] || failed=1
done
exit $failed
