#!/usr/bin/env bash
# Checks of the CUDA code that need no GPU: every kernel file compiles for sm_80 and sm_90 (ptxas
# register/spill report; a file saying "cuda_check: no spills" must not spill), every op's torch glue
# syntax-checks against the installed torch headers, and the standalone check program links.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvcc >/dev/null; then echo "CUDA check: no nvcc here, skipped"; exit 0; fi
out=$(mktemp -d)
gencode="-gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90"
for f in csrc/cuda/*.cu; do
  name=$(basename "$f" .cu)
  strict="-Xptxas -v"
  if grep -q "cuda_check: no spills" "$f"; then strict="-Xptxas -v,-warn-spills,-Werror"; fi   # spills: a bug
  nvcc -std=c++17 -O3 -c "$f" -o "$out/$name.o" $gencode $strict 2> "$out/$name.log" \
    || { cat "$out/$name.log"; echo "CUDA check: $f failed"; exit 1; }
  spills=$(grep -c "[1-9][0-9]* bytes spill" "$out/$name.log" || true)
  echo "CUDA check: $f compiles for sm_80/sm_90 ($spills kernels with spills)"
done
python .ci/cuda_resources.py "$out"/*.o     # registers, shared memory, spills per kernel and arch
nvcc -o "$out/gptfast_cuda_test" "$out"/*.o
echo "CUDA check: standalone test program links"
T=$(python -c "import torch, os; print(os.path.dirname(torch.__file__))")
PYINC=$(python -c "import sysconfig; print(sysconfig.get_paths()['include'])")
for f in csrc/cuda/*.cpp; do
  g++ -std=c++17 -fsyntax-only -w -I"$T/include" -I"$T/include/torch/csrc/api/include" -I"$PYINC" "$f"
done
echo "CUDA check: torch glue syntax OK"
rm -rf "$out"
