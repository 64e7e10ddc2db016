#!/usr/bin/env bash
# Downloads (here, where PyPI is reachable) the wheels that benches/saelens_step.py needs
# on the GPU machines and they lack, into .whl/ (ignored by git): SAELens and the
# packages its training-step classes import. torch, transformers, safetensors, einops,
# jaxtyping, pyarrow and the rest are in those machines' image (the device tool's
# KINDS.md); wandb is replaced by a stand-in at import. Versions: the SAELens 6.54.12
# environment the fixtures were made with (tests/fixtures/README.md).
#   then: run(command="bash kernels/cuda/device_check.sh run", carry=["device-bin", ".whl"])
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl \
    sae-lens==6.54.12 transformer-lens==3.9.0 better-abc==0.0.3 datasets==5.2.0 \
    dill==0.4.1 multiprocess==0.70.19 simple-parsing==0.1.9 docstring-parser==0.18.0
du -ch .whl/*.whl | tail -1
