#!/usr/bin/env bash
# The one prepared GPU check (issue 14's CUDA item), for a machine with an NVIDIA GPU, nvcc,
# CMake, ninja, pybind11 and a CUDA build of torch (the device tool's machines have them):
#   1. builds qkern._C and qkern._cuda against that machine's python3 and torch (sm_90 only,
#      QKERN_CUDA_ARCHS=... for another card), into build/gpu, and copies them into python/qkern;
#   2. runs the CUDA tests (tests/test_cuda*.py: bits equal to the CPU ops and to the host
#      emulation, bounds against float64, errors, opcheck, QuantLinear moved to the GPU);
#   3. runs bench/cuda_matmul.py (qkern's CUDA matmuls beside torch's fp16 / int4 / int8 ops).
# Logs and the bench table go to $OUT (the device tool's folder that comes back), else
# ./gpu_out. Usage: bash bench/gpu_check.sh   (about 6-8 minutes on an H100)
set -u -o pipefail
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
PY=${PY:-python3}
export PYTHONUNBUFFERED=1
{ nvidia-smi -L; $PY -c "import torch; print('torch', torch.__version__, 'cuda',
torch.version.cuda, 'available', torch.cuda.is_available())"; } 2>&1 | tee "$OUT/device.txt"

t0=$(date +%s)
if ! { cmake -S . -B build/gpu -G Ninja -DQKERN_CUDA=ON -DQKERN_CUDA_ARCHS="${QKERN_CUDA_ARCHS:-90}" \
         -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$(command -v "$PY")" \
         -Dpybind11_DIR="$($PY -m pybind11 --cmakedir)" \
       && cmake --build build/gpu --target _C _cuda -j"$(nproc)"; } >"$OUT/build.log" 2>&1; then
  echo "build failed:"; tail -40 "$OUT/build.log"; exit 1
fi
echo "build: $(( $(date +%s) - t0 )) s"
rm -f python/qkern/_C*.so python/qkern/_cuda*.so
cp build/gpu/_C*.so build/gpu/_cuda*.so python/qkern/

echo "== CUDA tests"
PYTHONPATH=python timeout "${TEST_TIMEOUT:-300}" $PY -m pytest -q -p no:cacheprovider -rs \
  tests/test_cuda.py tests/test_cuda_gemm.py tests/test_cuda_host_helpers.py \
  >"$OUT/cuda_tests.log" 2>&1
echo "pytest exit $?"; tail -25 "$OUT/cuda_tests.log"

echo "== CUDA bench"
PYTHONPATH=python timeout "${BENCH_TIMEOUT:-240}" $PY bench/cuda_matmul.py 2>&1 \
  | tee "$OUT/cuda_bench.md"
echo "total: $(( $(date +%s) - t0 )) s"
