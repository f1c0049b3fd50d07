#!/usr/bin/env bash
# GPU validation in one command, for a machine with an NVIDIA GPU and no internet:
#
#     bash scripts/gpu_check.sh OUT_DIR [STAGE ...]
#
# builds gptfast with its CUDA kernels (offline), runs the GPU tests, the standalone CUDA kernel
# checks and both benchmarks at their default sizes, writing every log, JSON, Markdown table and
# plot into OUT_DIR plus a SUMMARY.md. Stages (default: all but `tests`, in this order):
#   build  compare  gpu_tests  bench_ops  auto_table  bench_train  bench_generate  bench_hf  cuda_kernels  cpu_isa  tests (the whole suite)
# `bench_generate`: gpt2-124m decoding at batch 1 with float32, bf16 and int8 weights on our CUDA
# kernels (`extension`) and Triton's, tokens/s against the HBM floor (bytes a step / measured read bandwidth);
# then w8a8 and int4 (CPU kernels only so far: their PyTorch twins on the GPU).
# `bench_hf`: a transformers GPT-2 124M training step (bf16 autocast, batch 8 x 1024): transformers' sdpa (and
# flash_attention_2 where flash-attn is installed) against attn_implementation="gptfast" and apply_gptfast
# (skipped, saying so, where transformers is not installed).
# `cpu_isa` is for the GPU host's CPU: where it has AVX-512 (our CI machine may not), the CPU kernels'
# AVX-512 build runs against the reference and against the AVX2 build (tests/test_cpu_isa.py plus
# the extension's CPU tests with GPTFAST_CPU_ISA=avx512).
# `auto_table` writes OUT_DIR/auto_table.json: the `auto` backend's table with the GPU rows from this
# run's bench_ops (and its compare vetoes) next to the committed CPU rows. To ship it as the measured
# GPU default, copy bench_ops_cuda.json and compare_cuda_*.json into benchmarks/results/ and rerun
# benchmarks/make_auto_table.py there (the shipped table names its sources inside the repository).
# Without a CUDA GPU every stage is skipped with that reason (a dry run: tests/test_gpu_check.py).
# `compare` is the correctness stage: scripts/compare.py on CUDA, every backend, fp32 and bf16, its
# tables in compare_cuda_<dtype>.log and every row in compare_cuda_<dtype>.json.
# Each stage has its own time limit, cut to what is left of GPU_CHECK_BUDGET seconds (default 540:
# 9 minutes, inside a 10-minute slot), so a run always leaves a summary of what ran and what failed. Stages can
# be run in separate calls on the same machine (the build stays in place).
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
  objs=()
  for f in csrc/cuda/*.cu; do   # one nvcc per file, in parallel
    objs+=("$out/$(basename "$f" .cu).o")
    nvcc -std=c++17 -O3 -arch=sm_$arch -c "$f" -o "$out/$(basename "$f" .cu).o" &
  done
  wait
  nvcc -o "$out/gptfast_cuda_test" "${objs[@]}" && rm -f "${objs[@]}" \
    && "$out/gptfast_cuda_test" && GPTFAST_CUDA_ATTENTION=simt "$out/gptfast_cuda_test"
}
gpu_tests() {   # the tests with GPU paths first: CUDA kernels, Triton kernels, every op's contract, the Llama/Qwen3 ops
  python -m pytest -q -ra -p no:cacheprovider --junitxml="$out/gpu_tests.xml" tests/test_extension_cuda.py \
    tests/test_triton.py tests/test_op_contract.py tests/test_attention.py tests/test_rms_norm.py tests/test_llama.py \
    tests/test_transformers_llama.py
}
cpu_isa() {   # the CPU kernels per instruction set this host has (AVX-512 is never run on an AVX2-only CI)
  grep -o -w -m1 'avx512[a-z_0-9]*' /proc/cpuinfo | sort -u | tr '\n' ' '; echo
  python -m pytest -q -ra -p no:cacheprovider tests/test_cpu_isa.py || return 1
  if grep -q -w avx512bw /proc/cpuinfo; then
    GPTFAST_CPU_ISA=avx512 python -m pytest -q -ra -p no:cacheprovider -x tests/test_extension.py -k "not cuda"
  fi
}
bench_generate() {   # decoding: our CUDA linear kernels, then the Triton ones (the auto table has no GPU rows yet)
  python benchmarks/bench_generate.py --device cuda --presets gpt2-124m --batch-sizes 1,8 --quantize none,bf16,int8 \
    --backend extension --rounds 2 --out "$out/bench_generate_cuda_extension.json" || return 1
  python benchmarks/bench_generate.py --device cuda --presets gpt2-124m --batch-sizes 1 --quantize bf16,int8 \
    --backend triton --rounds 2 --no-baseline --out "$out/bench_generate_cuda_triton.json" || return 1
  # last (the stage's time limit may cut it): w8a8 and 4-bit weights, which have CPU kernels only so far - on a GPU
  # their PyTorch twins run; the figure says where a GPU kernel for them would start from
  python benchmarks/bench_generate.py --device cuda --presets gpt2-124m --batch-sizes 1 --quantize int8,w8a8,int4 \
    --backend extension --rounds 1 --new-tokens 50 --no-baseline --out "$out/bench_generate_cuda_int4.json"
}
bench_hf() {   # our kernels inside transformers' GPT-2, against its own attentions
  python -c "import transformers" 2>/dev/null || { echo "skipped: transformers is not installed here"; return 0; }
  local configs=unpatched,attention,patched
  python -c "import flash_attn" 2>/dev/null && configs=$configs,flash_attention_2
  python benchmarks/bench_hf.py --device cuda --dtype bfloat16 --batch 8 --rounds 1 --warmup 3 --steps 10 \
    --configs $configs --out "$out/bench_hf_cuda"
}
tests() {
  python -m pytest -q -ra -p no:cacheprovider --junitxml="$out/tests.xml"
}
compare() {   # every backend against the float64 reference, ops and model, in both training precisions
  local rc=0
  for dtype in float32 bfloat16; do
    python scripts/compare.py --device cuda --backend all --dtype $dtype --json "$out/compare_cuda_$dtype.json" \
      2>&1 | tee "$out/compare_cuda_$dtype.log" | tail -n 5
    [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
  done
  return $rc
}

auto_table() {   # the committed CPU measurements plus this run's GPU ones
  python benchmarks/make_auto_table.py --bench $(ls benchmarks/results/bench_ops_*.json | grep -v quick) \
    "$out/bench_ops_cuda.json" --compare benchmarks/results/compare_*.json "$out"/compare_cuda_*.json \
    --out "$out/auto_table.json"
}

export out
export -f build compare cuda_kernels gpu_tests tests auto_table cpu_isa bench_generate bench_hf
budget=${GPU_CHECK_BUDGET:-540}
gpu=$(python -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
run() {   # run NAME LIMIT COMMAND...: stage with LIMIT cut to the budget left
  if [ "$gpu" != 1 ]; then
    echo "- **$1**: skipped: no CUDA GPU here (torch.cuda.is_available() is False)" >> "$summary"
    echo "[$1] skipped: no CUDA GPU here"; return 0
  fi
  local left=$(( budget - ($(date +%s) - t_start) ))
  if [ "$left" -lt 20 ]; then echo "- **$1**: not run (time budget spent)" >> "$summary"; echo "[$1] not run"; return 0; fi
  local name=$1 limit=$2; shift 2
  stage "$name" $(( limit < left ? limit : left )) "$@"
}
stages=("${@:2}")
[ ${#stages[@]} -eq 0 ] && stages=(build compare gpu_tests bench_ops auto_table bench_train bench_generate bench_hf cuda_kernels cpu_isa)
for s in "${stages[@]}"; do
  case $s in
    build) run build 150 build ;;
    compare) run compare 100 compare ;;
    gpu_tests) run gpu_tests 120 gpu_tests ;;
    bench_ops) run bench_ops 90 python benchmarks/bench_ops.py --device cuda --repeats 20 --out "$out/bench_ops_cuda.json" ;;
    auto_table) run auto_table 20 auto_table ;;
    bench_train) run bench_train 100 python benchmarks/bench_train.py --device cuda --preset gpt2-124m --dtype auto \
                   --compile both --backends auto,torch,extension,triton --steps 10 --pad-vocab \
                   --out "$out/bench_train_cuda.json" ;;
    bench_generate) run bench_generate 90 bench_generate ;;
    bench_hf) run bench_hf 60 bench_hf ;;
    cuda_kernels) run cuda_kernels 45 cuda_kernels ;;
    cpu_isa) run cpu_isa 90 cpu_isa ;;
    tests) run tests 400 tests ;;
    *) echo "unknown stage $s (build compare gpu_tests bench_ops auto_table bench_train bench_generate bench_hf cuda_kernels cpu_isa tests)"; exit 2 ;;
  esac
done

{
  echo
  echo "Total: $(( $(date +%s) - t_start )) s."
  echo
  for t in compare gpu_tests tests; do
    [ -f "$out/$t.log" ] && { echo "## $t"; tail -n 25 "$out/$t.log" | sed 's/^/    /'; }
  done
  for f in bench_ops_cuda bench_train_cuda bench_hf_cuda; do
    [ -f "$out/$f.md" ] && { echo; echo "## $f"; cat "$out/$f.md"; }
  done
} >> "$summary"
echo "summary: $summary"
