#!/usr/bin/env bash
# What a session with a GPU runs, in one call of the device tool: build the CUDA library,
# run the CUDA tests and the CPU kernel tests (the GPU host's CPU may have AVX-512, which
# CI's does not), then the optimizer-step and embedding benchmarks on the GPU, beside
# bitsandbytes' CUDA kernels when its wheel is carried. One log and the benchmarks' JSON and
# PNG files go to $OUT (default results/gpu); the exit code is non-zero if a step failed.
#
# bitsandbytes is not on the device image and nothing can be fetched there. Prepare its
# wheel here once (.whl/ is git-ignored), then carry it:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_24_x86_64 -d .whl bitsandbytes==0.50.2
#   device run: command="bash benchmarks/gpu_check.sh", carry=[".whl"]
set -u -o pipefail
cd "$(dirname "$0")/.."
out=${OUT:-results/gpu}
mkdir -p "$out"
log="$out/gpu_check.log"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
failed=()

step() {  # step NAME COMMAND...: runs it, appends its output to the log, records a failure
  local name=$1
  shift
  echo "==== $name: $*" | tee -a "$log"
  local start=$SECONDS
  "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  echo "==== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$log"
  [ "$rc" -eq 0 ] || failed+=("$name")
}

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --target /tmp/bnbfuse-site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/bnbfuse-site"
fi
step machine bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv;
  lscpu | grep -E '^(Model name|CPU\(s\))'; grep -o -w -m1 'avx512[a-z]*' /proc/cpuinfo | sort -u | tr '\n' ' ';
  python3 -c 'import torch; print(\"torch\", torch.__version__, torch.version.cuda)'"
step build bash -c "cmake -S . -B build-gpu -DCMAKE_BUILD_TYPE=Release > /dev/null &&
  cmake --build build-gpu -j \$(nproc)"
step backends python3 -m bnbfuse
# Without the CUDA library the CUDA tests would exercise the reference kernels only.
step cuda_library python3 -c "import bnbfuse, sys; sys.exit(0 if bnbfuse._native.cuda.loaded
  else 'the CUDA library did not build or load: see the build step')"
step cuda_tests python3 -m pytest -q -p no:cacheprovider -m cuda
step cpu_kernel_tests python3 -m pytest -q -p no:cacheprovider tests/test_optimizer_kernels.py \
  tests/test_functional.py tests/test_backends.py -m "not cuda"
step optimizer_step python3 benchmarks/optimizer_step.py --device cuda --sizes 1,16,64,256 \
  --dtypes fp32,bf16 --repeats 25 --no-progress --out "$out/optimizer_step_cuda"
step embedding python3 benchmarks/embedding.py --devices cuda --out "$out"

if [ ${#failed[@]} -gt 0 ]; then
  echo "failed steps: ${failed[*]}" | tee -a "$log"
  exit 1
fi
echo "all steps passed" | tee -a "$log"
