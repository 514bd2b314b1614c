#!/usr/bin/env bash
# Download the wheels bench/gpu_suite.sh installs on a GPU machine without network, into .whl/ (git-ignored;
# carry it with the repository). diffusers is pure Python; so are the few of its dependencies the GPU image
# may lack (transformers 5 there already brings huggingface_hub, regex, requests, safetensors, filelock).
# Usage: bench/fetch_wheels.sh [DIR]   (default .whl; run from the repository root, with network)
set -euo pipefail
dest="${1:-.whl}"
mkdir -p "$dest"
version="$(python3 -c 'import importlib.metadata as m; print(m.version("diffusers"))' 2>/dev/null || echo 0.42.1)"
for req in "diffusers==$version" importlib_metadata zipp; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation py \
    --platform any -d "$dest" "$req"
done
ls -l "$dest"
