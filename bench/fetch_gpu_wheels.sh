#!/usr/bin/env bash
# Fetch the wheels a machine with one GPU lacks for bench/gpu_suite.py (Python 3.12, x86-64) into
# .whl/ (ignored by git). Run here, where PyPI is reachable; the checkout then carries .whl/ there.
#
# On the GPU machine (torch, triton, transformers, safetensors, numpy, pyarrow, msgpack, ninja,
# py-cpuinfo present; nothing fetched from outside):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
#
# Left out on purpose: torch (the machine's own CUDA build), wandb (imported only when
# logging.backend=wandb, which the suite never sets), msgpack, ninja, py-cpuinfo (present there).
# deepspeed and antlr4-python3-runtime are published as source only: they are built here into
# pure-Python wheels (DS_BUILD_OPS=0: no compiled op; the optimizer-offload stage JIT-builds
# DeepSpeed's CPU Adam there with ninja and the system C++ compiler at first use).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.whl
mkdir -p "$DEST"
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
BINARY=(
  # DeepSpeed's needs
  hjson==3.1.0 einops==0.8.2 psutil==7.2.2
  pydantic==2.13.4 pydantic_core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2 typing_extensions==4.16.0
  # Hydra / OmegaConf
  hydra-core==1.3.8 omegaconf==2.3.1
  # datasets and its needs (pyarrow, fsspec's users, huggingface_hub and filelock come with transformers there)
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 xxhash==4.1.0 fsspec==2026.9.0 pandas==3.1.1
  # the baseline's fused loss
  liger-kernel==0.8.5
)
SOURCE_ONLY=(deepspeed==0.19.8 antlr4-python3-runtime==4.9.3)

python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$DEST" "${BINARY[@]}"
# Built with this machine's torch (deepspeed's setup imports it); the result is py3-none-any.
DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "${SOURCE_ONLY[@]}"

for w in "$DEST"/*.whl; do
  case "$w" in
    *-py3-none-any.whl|*-py2.py3-none-any.whl|*-py312-none-any.whl|*-cp312-*manylinux*x86_64*.whl|*-abi3-*manylinux*x86_64*.whl) ;;
    *) echo "fetch_gpu_wheels: $w is not for CPython 3.12 on x86-64" >&2; exit 1 ;;
  esac
done
ls -l "$DEST"
du -ch "$DEST"/*.whl | tail -1
