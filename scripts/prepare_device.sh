#!/usr/bin/env bash
# Builds .device-bundle/ for a lent GPU machine (no package registry there): the shared bundle
# (nvshmem4py, cffi, NVSHMEM 3.8 overlay) plus pytest, which the GPU image may not have and which
# .device-bundle/activate installs with the other wheels. Run here, from the repo root:
#     bash scripts/prepare_device.sh
set -euo pipefail
root="$(git rev-parse --show-toplevel)"
bash "$root/../shared/device/prepare.sh"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d "$root/.device-bundle" \
  "pytest==9.*" pluggy iniconfig
du -sh "$root/.device-bundle"
