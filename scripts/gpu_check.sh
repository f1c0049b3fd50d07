#!/usr/bin/env bash
# GPU validation in one command, for a machine with an NVIDIA GPU and no internet:
#
#     bash scripts/gpu_check.sh OUT_DIR
#
# builds gptfast with its CUDA kernels (offline), runs the standalone CUDA kernel checks, the test
# suite (GPU tests included), and both benchmarks at their default sizes, writing every log, JSON,
# Markdown table and plot into OUT_DIR plus a SUMMARY.md. Each stage has its own time limit so the
# whole run stays under 10 minutes on an H100 and always leaves a summary of what ran and what failed.
set -uo pipefail
out=${1:?usage: bash scripts/gpu_check.sh OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
summary="$out/SUMMARY.md"
t_start=$(date +%s)
echo "# gptfast GPU check — $(date -u +%Y-%m-%dT%H:%M:%SZ)" > "$summary"

stage() {   # stage NAME SECONDS COMMAND...: run with a time limit, log, record the outcome
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  timeout "$limit" bash -c '"$@"' "$name" "$@" > "$out/$name.log" 2>&1   # a child bash runs shell functions too
  local rc=$?
  local verdict="ok"; [ $rc -ne 0 ] && verdict="FAILED (exit $rc$([ $rc -eq 124 ] && echo ', time limit'))"
  echo "- **$name**: $verdict in $(( $(date +%s) - t0 )) s — \`$name.log\`" >> "$summary"
  echo "[$name] $verdict"
  return $rc
}

# the CUDA toolkit: CUDA_HOME, else the directory above the real nvcc (it may be a wrapper script)
if [ -z "${CUDA_HOME:-}" ]; then
  for d in /usr/local/cuda "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"; do
    [ -x "$d/bin/nvcc" ] && export CUDA_HOME=$d && break
  done
fi
{
  echo "CUDA_HOME=${CUDA_HOME:-unset}"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  python - <<'PY'
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| cuDNN", torch.backends.cudnn.version(), "| GPU", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
try:
    import triton; print("triton", triton.__version__)
except ImportError as e:
    print("triton missing:", e)
PY
} > "$out/environment.txt" 2>&1
sed 's/^/    /' "$out/environment.txt" >> "$summary"

build() {
  pip install -e . --no-build-isolation --no-deps --no-index \
    || { echo "pip route failed; trying setup.py build_ext --inplace"; python setup.py build_ext --inplace; }
  python -c "import gptfast.compiled as c; info = c.load_extension(allow_jit=False).build_info(); print(info); \
assert 'cuda' in info['compiled_backends'], 'built without CUDA kernels'"
}
cuda_kernels() {   # the standalone checks: kernels vs CPU references, errors and timings side by side
  arch=$(python -c "import torch; p = torch.cuda.get_device_capability(); print(f'{p[0]}{p[1]}')")
  nvcc -std=c++17 -O3 -arch=sm_$arch csrc/cuda/*.cu -o "$out/gptfast_cuda_test" && "$out/gptfast_cuda_test" \
    && GPTFAST_CUDA_ATTENTION=simt "$out/gptfast_cuda_test"
}
tests() {
  python -m pytest -q -ra -p no:cacheprovider --junitxml="$out/tests.xml"
}

export out
export -f build cuda_kernels tests
stage build 180 build
stage cuda_kernels 60 cuda_kernels
stage tests 150 tests
stage bench_ops 120 python benchmarks/bench_ops.py --device cuda --repeats 20 --out "$out/bench_ops_cuda.json"
stage bench_train 150 python benchmarks/bench_train.py --device cuda --steps 10 --pad-vocab --out "$out/bench_train_cuda.json"

{
  echo
  echo "Total: $(( $(date +%s) - t_start )) s."
  echo
  echo "## Tests"
  tail -n 25 "$out/tests.log" 2>/dev/null | sed 's/^/    /'
  for f in bench_ops_cuda bench_train_cuda; do
    [ -f "$out/$f.md" ] && { echo; echo "## $f"; cat "$out/$f.md"; }
  done
} >> "$summary"
echo "summary: $summary"
