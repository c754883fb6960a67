#!/usr/bin/env bash
# The open GPU figures of the GPU issue (BENCHMARKS.md) in one call of the device tool, most wanted first.
#
#   bash scripts/gpu_session.sh --wheels     # here, once: the packages the device's image lacks, into .whl/ (ignored)
#   bash scripts/gpu_session.sh [SECONDS]    # there: device run(command="bash scripts/gpu_session.sh 540",
#                                            #                  carry=[".whl"], timeout_s=600)
#   GPU_SESSION_TINY=1 bash scripts/gpu_session.sh 300   # the same commands, tiny components on the CPU: do they run?
#
# Each measurement is skipped when less time is left (of SECONDS, default 540) than it needs, and stopped at twice
# that; the log says so. Everything lands in $OUT (the device tool's folder that comes
# back), else ./gpu_session/: log.txt (every table), bench.json (every bench row, tagged with its measurement).
# The device's image has PyTorch, transformers, accelerate, safetensors, rich, tqdm and matplotlib; diffusers,
# Hydra, OmegaConf and ANTLR's runtime travel as wheels (6.8 MB).
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--wheels" ]; then
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  mkdir -p .whl
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    diffusers==0.42.1 hydra-core==1.3.8 omegaconf==2.3.1 importlib_metadata==10.2.0
  python3 -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3  # an sdist on PyPI: built here, pure Python
  ls -la .whl
  exit 0
fi

budget=${1:-540}
out=${OUT:-gpu_session}
mkdir -p "$out" /tmp/gpu_session
log="$out/log.txt"
export PYTHONUNBUFFERED=1
if [ -d .whl ] && ! python3 -c "import diffusers, hydra" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "installing the wheels failed" | tee -a "$log"; exit 1; }
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # seedselect_cli from this tree, its assets included
export TORCHINDUCTOR_CACHE_DIR=/tmp/gpu_session/inductor

tiny=${GPU_SESSION_TINY:-}
if [ -n "$tiny" ]; then  # the tiny components, 3 steps, 1 timed iteration; the toy world on the CPU
  bench=(python3 scripts/bench.py --tiny --steps 3 --warmup 0 --iterations 1)
  device=cpu
else
  bench=(python3 scripts/bench.py --warmup 1 --iterations 3)
  device=cuda
fi
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__,
'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"; } 2>&1 | tee -a "$log"

deadline=$((SECONDS + budget))
# measure NAME SECONDS_NEEDED COMMAND...: run it if that much time is left, for at most twice that
measure() {
  local name=$1 needs=$2 left=$((deadline - SECONDS))
  shift 2
  if [ "$left" -lt "$needs" ]; then
    echo "== $name: skipped, ${left} s left of ${budget}, it needs about ${needs} s" | tee -a "$log"
    return
  fi
  echo "== $name ($*)" | tee -a "$log"
  local begin=$SECONDS
  timeout "$((left < 2 * needs ? left : 2 * needs))" "$@" 2>&1 | grep -v -e "it/s]" -e "s/it]" | tee -a "$log"
  echo "== $name: rc ${PIPESTATUS[0]}, $((SECONDS - begin)) s" | tee -a "$log"
}

# 1. The issue's three targets in one run beside the plain path: batch 1 s/iteration (<= 0.4), plain/ours (>= 10),
#    peak reserved GB (<= 12); its s/img boot column is bootstrap's figure at batch 1.
measure "paper setting, default path beside the plain one" 150 \
  "${bench[@]}" --modes graphed plain --batch 1 --json /tmp/gpu_session/paper.json
# 1b. The demo as a GPU user runs it first: the toy world on CUDA with its steps kept (its configs set
#     runtime.memory_budget=auto) beside CUDA-graphed decodes and CLIP calls, a path no CPU test takes.
rm -rf /tmp/gpu_session/demo /tmp/gpu_session/redrawn  # a run left by an earlier call would be resumed, or refused
measure "the demo on $device" 40 python3 -m seedselect_cli optimize runtime.device="$device" runtime.progress=false \
  hydra.run.dir=/tmp/gpu_session/demo
# 1c. Are its images redrawn pixel for pixel from their seeds on CUDA (cuDNN may choose other kernels)? The last
#     line says how many of the 4.
measure "the demo redrawn from its seeds" 30 python3 -m seedselect_cli generate runtime.device="$device" \
  seed_file=/tmp/gpu_session/demo/seeds out=/tmp/gpu_session/redrawn
# 2. Part 1 on CUDA: does float16 (the GPU default) find float32's seeds? 8 seeds, the default's 24 iterations (and
#    its backtracking, optim.backtrack=0.5), the toy world; then float32 again with float16-sized gradient noise (3
#    draws): how many low-dtype ends lie within 5 % of float32's worst own end (BENCHMARKS.md, "float16 against
#    float32's own spread").
if [ -n "$tiny" ]; then
  measure "precision on the toy world" 120 python3 scripts/precision_check.py --device "$device" \
    --concepts "marsh finch" --n-images 1 --iterations 2 --dtypes float32 float16 --gradient-noise 0.015 1
else
  measure "precision on the toy world" 150 python3 scripts/precision_check.py --device "$device" \
    --n-images 4 --iterations 24 --dtypes float32 float16 bfloat16 --gradient-noise 0.015 3
fi
# 3. runtime.memory_budget: keep the steps that fit instead of recomputing them.
measure "memory budget auto" 90 "${bench[@]}" --modes graphed --batch 1 --memory-budget auto \
  --json /tmp/gpu_session/budget.json
# 4. Bootstrap at most 1 s per image: SD-Turbo's setting at batch 8 (its s/img boot column).
measure "SD-Turbo, bootstrap's batch" 90 "${bench[@]}" --model sd_turbo --modes graphed --batch 8 \
  --json /tmp/gpu_session/turbo.json
# 5. Peak reserved memory at 10 and 50 steps (within 10 % of each other).
measure "10 steps" 60 "${bench[@]}" --modes graphed --batch 1 --steps 10 --json /tmp/gpu_session/steps10.json
measure "50 steps" 120 "${bench[@]}" --modes graphed --batch 1 --steps 50 --json /tmp/gpu_session/steps50.json
# 6. The layouts: channels-last for the UNet alone, and group norm that keeps it.
measure "channels-last unet" 70 "${bench[@]}" --modes graphed --batch 1 --channels-last unet \
  --json /tmp/gpu_session/cl_unet.json
measure "group norm reduced, channels-last" 70 "${bench[@]}" --modes graphed --batch 1 --channels-last \
  --group-norm reduced --json /tmp/gpu_session/gn_reduced.json
# 7. torch.compile with a cold, then a warm Inductor cache (the warm-up column).
#    The warm run only after a cold one that finished: without it the cache is empty, and the "warm" run would be a
#    cold compile under the warm label, spending the time the measurements after it need.
measure "compiled, cold cache" 260 "${bench[@]}" --modes compiled-graphed --batch 1 --iterations 2 \
  --json /tmp/gpu_session/compiled_cold.json
if [ -f /tmp/gpu_session/compiled_cold.json ]; then
  measure "compiled, warm cache" 120 "${bench[@]}" --modes compiled-graphed --batch 1 --iterations 2 \
    --json /tmp/gpu_session/compiled_warm.json
else
  echo "== compiled, warm cache: skipped, the cold run did not finish (the Inductor cache would be empty)" | tee -a "$log"
fi
# 8. The samplers' open figures: SDXL at 1024 px, batch 1 (peak within 40 GB), beside the plain path.
measure "SDXL 1024 px" 150 "${bench[@]}" --model sdxl --modes graphed plain --batch 1 --json /tmp/gpu_session/sdxl.json
# 9. Part 1 again without the default's backtracking (optim.backtrack=null; BENCHMARKS.md, "The default backtracks
#    in optimize"): does float16 on CUDA end elsewhere then, as it did on the CPU? Last: it matters least.
if [ -n "$tiny" ]; then
  measure "precision without backtracking" 120 python3 scripts/precision_check.py --device "$device" \
    --concepts "marsh finch" --n-images 1 --iterations 2 --dtypes float32 float16 --set optim.backtrack=null
else
  measure "precision without backtracking" 120 python3 scripts/precision_check.py --device "$device" \
    --n-images 4 --iterations 24 --dtypes float32 float16 --set optim.backtrack=null
fi

shopt -s nullglob
python3 - "$out/bench.json" /tmp/gpu_session/*.json <<'EOF'
import json, sys
from pathlib import Path
rows = []
for path in map(Path, sys.argv[2:]):
    data = json.loads(path.read_text())
    rows += [{"measurement": path.stem, "device": data["device"], **row} for row in data["rows"]]
Path(sys.argv[1]).write_text(json.dumps(rows, indent=2))
print(f"{len(rows)} bench rows in {sys.argv[1]}")
EOF
echo "== done in ${SECONDS} s" | tee -a "$log"
