#!/usr/bin/env bash
# Syntax-check every C++ source as C++17: torch 2.11 (the GPU machines) compiles extensions with
# -std=c++17 while torch 2.13 uses c++20, so code must stay valid C++17.
set -euo pipefail
cd "$(dirname "$0")/.."
T=$(python -c "import torch, os; print(os.path.dirname(torch.__file__))")
PYINC=$(python -c "import sysconfig; print(sysconfig.get_paths()['include'])")
for f in csrc/*.cpp csrc/cpu/*.cpp; do
  g++ -std=c++17 -fsyntax-only -w -fopenmp -DTORCH_EXTENSION_NAME=_C -I"$T/include" \
      -I"$T/include/torch/csrc/api/include" -I"$PYINC" "$f"
done
echo "C++17 syntax check: $(ls csrc/*.cpp csrc/cpu/*.cpp | wc -l) files OK"
