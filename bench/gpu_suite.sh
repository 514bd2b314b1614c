#!/usr/bin/env bash
# The whole fast path on one GPU machine, offline, in under 10 minutes: bench/gpu_suite.sh OUTDIR [STEP...]
#
# Installs nothing from the network: diffusers (for the side-by-side rows) comes from the wheels in .whl/
# (fetch them with bench/fetch_wheels.sh where there is network, and carry .whl/ with the repository);
# without them the diffusers rows are skipped with the reason recorded. Steps run in this order (most
# valuable first), each under its own time cap and all under one deadline (SDRT_SUITE_SECONDS, 570 s), each
# logging to OUTDIR/STEP.log and recording its exit code in OUTDIR/summary.txt; a step that finds too little
# time left is skipped and says so. Give STEP names to run only those (e.g. a second call for skipped ones).
#   tests        CUDA graph + triton backend + triton U-Net tests (SD and SDXL)  -> tests.log, tests.xml
#   bench        sdrt torch/triton vs diffusers eager (main, batch 4, SD 2.1 rows) -> bench-*.json (rewritten
#                after every row), bench-*.png, bench.log
#   bench-sdxl   SDXL (random:sdxl, 1024x1024, 30 steps, CFG 5): sdrt triton vs diffusers eager
#                (StableDiffusionXLPipeline) -> a second bench-*.json/.png, bench-sdxl.log
#   check        sdrt check on the full-size SD 1.5 config, triton fp16 -> check-sd15-triton.json, check.log
#   compile      the diffusers torch.compile row (SDRT_COMPILE_MODE, max-autotune), budget = time left - 75 s
#                -> a second bench-*.json
#   kernel-tests attention / GroupNorm kernels vs torch (many Triton compiles)   -> kernel-tests.log, .xml
#   kernels      kernel benchmarks                                   -> kernels-*.json, kernels.log
#   components   pytest-benchmark component suite                   -> components.json, components.log
# Timeouts send SIGINT first: pytest then still prints its failures and writes its XML.
# Everything (and suite.log, device.txt) is written into OUTDIR.
set -uo pipefail

out="${1:?usage: bench/gpu_suite.sh OUTDIR [STEP...]}"
shift
all_steps=(tests bench bench-sdxl check compile kernel-tests kernels components)
wanted=("${@:-${all_steps[@]}}")
for name in "${wanted[@]}"; do
  [[ " ${all_steps[*]} " == *" $name "* ]] || { echo "gpu_suite.sh: unknown step '$name' (steps: ${all_steps[*]})" >&2; exit 2; }
done
mkdir -p "$out"
out="$(cd "$out" && pwd)"
cd "$(dirname "$0")/.."
exec > >(tee -a "$out/suite.log") 2>&1

deadline=$((SECONDS + ${SDRT_SUITE_SECONDS:-570}))
py=python3
: > "$out/summary.txt"

# -- environment: local wheels only, sdrt from this checkout
site=/tmp/sdrt-suite-site
if compgen -G ".whl/*.whl" > /dev/null; then
  $py -m pip install -q --no-index --no-deps --target "$site" .whl/*.whl && export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! $py -c "import sdrt.kernels, sdrt.bench" 2>/dev/null; then
  # setup.py's layout (sdrt.kernels = kernels/, sdrt.export = export/, sdrt.bench = bench/) as a tree of
  # links: no build, no setuptools needed (a Python 3.12 environment may have none), nothing written here
  tree=/tmp/sdrt-suite-src
  rm -rf "$tree" && mkdir -p "$tree/sdrt"
  for entry in sdrt/*; do ln -s "$PWD/$entry" "$tree/sdrt/"; done
  ln -s "$PWD/kernels" "$tree/sdrt/kernels"; ln -s "$PWD/export" "$tree/sdrt/export"; ln -s "$PWD/bench" "$tree/sdrt/bench"
  export PYTHONPATH="$tree${PYTHONPATH:+:$PYTHONPATH}"
  $py -c "import sdrt.kernels, sdrt.bench, sdrt.cli" || { echo "gpu_suite.sh: cannot import sdrt from this checkout"; exit 2; }
fi
export PYTHONPATH="${PYTHONPATH:-}"
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-/tmp/sdrt-suite-inductor}"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null
  $py -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  $py -c "import diffusers; print('diffusers', diffusers.__version__)" 2>&1 | tail -1
  git rev-parse HEAD 2>/dev/null
} | tee "$out/device.txt"

cuda="$($py -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)"
if [[ "$cuda" != 1 ]]; then
  echo "gpu_suite.sh: no CUDA GPU visible to torch: running only the CPU-capable steps (tests, bench, components)"
fi

# step NAME CAP_SECONDS [cuda] COMMAND...: run under min(cap, time left), log to OUTDIR/NAME.log. On the cap,
# SIGINT first (pytest prints its failures and writes its XML; sdrt bench has already written its finished
# rows), SIGKILL 10 s later.
step() {
  local name="$1" cap="$2"; shift 2
  if [[ " ${wanted[*]} " != *" $name "* ]]; then return; fi
  if [[ "$1" == cuda ]]; then
    shift
    if [[ "$cuda" != 1 ]]; then echo "$name: skipped (needs CUDA)" | tee -a "$out/summary.txt"; return; fi
  fi
  local left=$((deadline - SECONDS))
  if (( left < 30 )); then
    echo "$name: skipped (suite deadline reached; run it alone: bench/gpu_suite.sh OUTDIR2 $name)" \
      | tee -a "$out/summary.txt"; return
  fi
  (( cap > left )) && cap=$left
  echo "== $name (cap ${cap}s): $*"
  local start=$SECONDS
  timeout --signal=INT --kill-after=10 "$cap" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  tail -n 40 "$out/$name.log"
  echo "$name: exit $rc in $((SECONDS - start))s$( ((rc == 124 || rc == 137)) && echo ' (timed out)')" \
    | tee -a "$out/summary.txt"
}

pytest=($py -m pytest -q -rfE -p no:cacheprovider)
step tests 140 "${pytest[@]}" tests/test_graphs.py tests/test_triton_backend.py tests/test_triton_unet.py \
  tests/test_sdxl_graphs.py tests/test_sdxl_triton.py --junitxml="$out/tests.xml"
step bench 240 $py -m sdrt.cli -v bench --out "$out" --rows "sdrt torch" --rows "sdrt triton" --rows "diffusers eager"
step bench-sdxl 150 cuda $py -m sdrt.cli -v bench --model random:sdxl --out "$out" --rows "sdrt triton" \
  --rows "diffusers eager"
step check 75 cuda $py -m sdrt.cli check --model random:sd15 --backend triton --dtype float16 --steps 20 \
  --json "$out/check-sd15-triton.json"
# torch.compile cannot be interrupted: the row gets the time left but for model building and its timed runs
budget=$((deadline - SECONDS - 75))
(( budget > 300 )) && budget=300
step compile $((budget + 75)) cuda $py -m sdrt.cli -v bench --out "$out" --rows "diffusers compile" --no-secondary \
  --compile-budget "$(( budget > 30 ? budget : 30 ))" --compile-mode "${SDRT_COMPILE_MODE:-max-autotune}"
step kernel-tests 150 "${pytest[@]}" tests/test_kernel_attention.py tests/test_kernel_group_norm.py tests/test_upcast_attention.py \
  --junitxml="$out/kernel-tests.xml"
step kernels 60 cuda $py -m sdrt.bench.bench_kernels --output-dir "$out"
step components 60 "${pytest[@]}" bench/test_bench_components.py --benchmark-json="$out/components.json"

echo "== summary (${SECONDS}s)"
cat "$out/summary.txt"
ls -l "$out"
