#!/bin/bash
# The checks a lent GPU machine runs, as one prepared command (the machine has Python 3.12 with
# CUDA PyTorch, pytest and pytest-xdist, but no flwr, Ray or Opacus, and no network).
#
# Here, once: download the wheels it lacks into .whl/ (ignored by git; Ray's wheel is too big to
# travel, so nothing that starts Flower's simulation engine runs there; Flower's Deployment Engine
# needs no Ray, and uvicorn, prompt_toolkit and wcwidth are what its SuperLink and the flwr CLI add):
#   echo /.whl/ >> .git/info/exclude
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 -d .whl \
#     flwr==1.42.0 opacus==1.6.0 alembic Mako SQLAlchemy cryptography fastapi starlette pydantic \
#     pydantic_core annotated-types typing-inspection grpcio grpcio-health-checking protobuf \
#     pycryptodome iterators tomli tomli_w typing_extensions cffi pycparser \
#     dp-accounting dm-tree uvicorn==0.49.0 prompt_toolkit wcwidth
# and copy CIFAR-10 into .data/ (step 5 reads it): only the checkout travels, with a shared/ inside
# it, never the ../shared/data beside it:
#   echo /.data/ >> .git/info/exclude; mkdir -p .data && cp -r ../shared/data/cifar10 .data/
# There (device tool, carry [".whl", ".data"]):  bash benchmarks/device_check.sh
#
# Writes to $OUT: env.txt, cuda_tests.log, gpu_fp32.json, gpu_bf16.json, suite.log, suite.xml,
# gpu_deployment.json.
set -u
OUT=${OUT:-/tmp/device_check}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "device_check: the carried wheels did not install"; exit 1; }
export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/env.txt"
python3 -c "import sys, torch, flwr, opacus; print(sys.version.split()[0], 'torch', torch.__version__, \
'flwr', flwr.__version__, 'opacus', opacus.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/env.txt"
nproc | tee -a "$OUT/env.txt"

echo "== 1. the GPU-only tests"
timeout 90 python3 -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py tests/test_benchmarks.py 2>&1 \
  | tee "$OUT/cuda_tests.log"

echo "== 2. clients per second and memory per client, fp32 (plain mode: fedse's train/evaluate, no Flower)"
timeout 120 python3 benchmarks/gpu.py --concurrency 1 2 4 8 16 --json "$OUT/gpu_fp32.json" 2>&1 | tail -8

echo "== 3. the whole suite with CUDA visible, but for the tests that start Ray (-m 'not slow')"
timeout 240 python3 -m pytest -q -p no:cacheprovider -n 12 -m "not slow" --timeout 200 \
  --junitxml="$OUT/suite.xml" 2>&1 | tail -80 > "$OUT/suite.log"
tail -40 "$OUT/suite.log"

echo "== 4. the same ladder in bf16"
timeout 100 python3 benchmarks/gpu.py --concurrency 1 2 4 8 16 --bf16 --json "$OUT/gpu_bf16.json" 2>&1 | tail -8

echo "== 5. the Deployment Engine: a SuperLink, K SuperNodes and flwr run, the clients on the GPU (no Ray)"
timeout 200 python3 benchmarks/gpu.py --mode plain deployment --data cifar10 --data-root .data --concurrency 1 4 \
  --json "$OUT/gpu_deployment.json" 2>&1 | tail -8
echo "device_check: done"
