#!/usr/bin/env bash
# The whole fast path on one GPU machine, offline, in under 10 minutes: bench/gpu_suite.sh OUTDIR
#
# Installs nothing from the network: diffusers (for the side-by-side rows) comes from the wheels in .whl/
# (fetch them with bench/fetch_wheels.sh where there is network, and carry .whl/ with the repository);
# without them the diffusers rows are skipped with the reason recorded. Steps, each under its own time cap
# and all under one 10-minute deadline, each logging to OUTDIR and recording its exit code in OUTDIR/summary.txt:
#   1. CUDA tests: graphs, triton backend, kernels               -> tests.log, tests.xml
#   2. sdrt bench (sdrt torch/triton vs diffusers eager/compile) -> bench-*.json, bench-*.png, bench.log
#   3. sdrt check on the full-size SD 1.5 config, triton fp16    -> check-sd15-triton.json, check.log
#   4. kernel benchmarks                                         -> kernels-*.json, kernels.log
#   5. pytest-benchmark component suite                          -> components.json, components.log
# Everything (and suite.log, device.txt) is written into OUTDIR.
set -uo pipefail

out="${1:?usage: bench/gpu_suite.sh OUTDIR}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
cd "$(dirname "$0")/.."
exec > >(tee -a "$out/suite.log") 2>&1

deadline=$((SECONDS + ${SDRT_SUITE_SECONDS:-590}))
py=python3
: > "$out/summary.txt"

# -- environment: local wheels only, sdrt from this checkout
site=/tmp/sdrt-suite-site
if compgen -G ".whl/*.whl" > /dev/null; then
  $py -m pip install -q --no-index --no-deps --target "$site" .whl/*.whl && export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! $py -c "import sdrt.kernels, sdrt.bench" 2>/dev/null; then
  $py -m pip install -q --no-index --no-deps --no-build-isolation -e . \
    || $py -m pip install -q --no-index --no-deps --no-build-isolation --target "$site" .
fi
export PYTHONPATH="${PYTHONPATH:-}"
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-/tmp/sdrt-suite-inductor}"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null
  $py -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  $py -c "import diffusers; print('diffusers', diffusers.__version__)" 2>&1 | tail -1
  git rev-parse HEAD 2>/dev/null
} | tee "$out/device.txt"

# step NAME CAP_SECONDS COMMAND...: run under min(cap, time left), log to OUTDIR/NAME.log
step() {
  local name="$1" cap="$2"; shift 2
  local left=$((deadline - SECONDS))
  if (( left < 20 )); then
    echo "$name: skipped (suite deadline reached)" | tee -a "$out/summary.txt"; return
  fi
  (( cap > left )) && cap=$left
  echo "== $name (cap ${cap}s): $*"
  local start=$SECONDS
  timeout --kill-after=10 "$cap" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  tail -n 40 "$out/$name.log"
  echo "$name: exit $rc in $((SECONDS - start))s$( ((rc == 124)) && echo ' (timed out)')" | tee -a "$out/summary.txt"
}

step tests 150 $py -m pytest -q tests/test_graphs.py tests/test_triton_backend.py tests/test_kernel_attention.py \
  tests/test_kernel_group_norm.py tests/test_triton_unet.py --junitxml="$out/tests.xml"
step bench 300 $py -m sdrt.cli -v bench --out "$out" --compile-budget "${SDRT_COMPILE_BUDGET:-120}"
step check 90 $py -m sdrt.cli check --model random:sd15 --backend triton --dtype float16 --steps 20 \
  --json "$out/check-sd15-triton.json"
step kernels 60 $py -m sdrt.bench.bench_kernels --output-dir "$out"
step components 60 $py -m pytest -q -p no:cacheprovider bench/test_bench_components.py \
  --benchmark-json="$out/components.json"

echo "== summary (${SECONDS}s)"
cat "$out/summary.txt"
ls -l "$out"
