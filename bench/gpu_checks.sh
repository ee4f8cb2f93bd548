#!/usr/bin/env bash
# Everything that needs CUDA, in one go (issue 19: <= 10 minutes on an H200): gsplat's JIT build and LucidDreamer's
# rasteriser (diff-gaussian-rasterization) built into submodules/, the CUDA backends' parity tests (gsplat and inria
# against torch), then bench/gpu_speed.py at SD 2.1-base scale (random weights, fp16, 512 px): stage-2 iteration
# with the UNet compiled and not, PTD / vanilla paired at w > 0 and w = 0, a paper-length run extrapolated, peak
# memory, compiled vs eager numerics. One log per step under OUTDIR; a step that fails or runs past its limit is
# reported and the next one still runs. Exit status: the number of failed steps.
#
#   bash bench/gpu_checks.sh [OUTDIR]          (PYTHON=... picks the interpreter; default python3)
#
# Limits in seconds per step: LIMIT_GSPLAT_BUILD (900), LIMIT_INRIA_BUILD (600), LIMIT_SD21 (600), LIMIT_PARITY (300),
# LIMIT_SPEED (480), LIMIT_RENDER (600), LIMIT_SCALE (900), LIMIT_OVERHEAD (900). The older steps render_bench,
# gpu_scale and ptd_overhead (docs/benchmarks.md, section 4a; ~6 more minutes) are skipped unless SKIP is set (SKIP=""
# runs everything; SKIP="parity_tests" leaves that step out); ITERATIONS (20) timed iterations per arm and round of
# bench/gpu_scale.py; SPEED_ARGS and OVERHEAD_ARGS add arguments to bench/gpu_speed.py and bench/ptd_overhead.py (e.g.
# PipelineParams.compile=off); NO_GSPLAT=1 uses the torch rasteriser and skips gsplat's build; NO_INRIA=1 skips the
# rasteriser build. The rasteriser's sources: the submodule when fetched (git submodule update --init --recursive),
# else a copy of VENDOR (default ../shared/vendor/diff-gaussian-rasterization, the pinned commit with glm), copied in
# (uncommitted).
#
# gsplat (if installed) compiles its CUDA code the first time it is used (minutes): that build runs in the background
# while the SD 2.1-base folder is built, and nothing touches gsplat before it ends (two builds at once break it). The
# rasteriser's pip build runs beside it, each with half of MAX_JOBS.
set -u
out=${1:-gpu_checks}
py=${PYTHON:-python3}
here=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export PTD_TINY_CACHE=${PTD_TINY_CACHE:-$HOME/.cache/ptd}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/torch_extensions}
export MAX_JOBS=${MAX_JOBS:-$(( $(nproc) > 4 ? $(nproc) - 2 : 2 ))}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$("$py" -c \
  'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null)}
cd "$here" || exit 1
failed=0
SKIP=${SKIP-render_bench gpu_scale ptd_overhead}

step() {  # step NAME SECONDS command...: run with a limit, log to OUTDIR/NAME.log, print the tail
  local name=$1 limit=$2 start rc
  shift 2
  case " ${SKIP:-} " in *" $name "*) echo "=== $name: skipped (SKIP)"; return 0 ;; esac
  start=$(date +%s)
  timeout --signal=INT --kill-after=20 "$limit" "$@" > "$out/$name.log" 2>&1
  rc=$?
  echo "=== $name: exit $rc after $(( $(date +%s) - start )) s (limit $limit s)"
  grep -v -E "it/s\]|s/it\]|Loading" "$out/$name.log" | tail -n "${TAIL:-25}"
  [ "$rc" -eq 0 ] || failed=$(( failed + 1 ))
  return "$rc"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$py" -c 'import sys, torch, diffusers, transformers, peft; print(sys.version.split()[0], "torch", torch.__version__,
    "cuda", torch.version.cuda, "diffusers", diffusers.__version__, "transformers", transformers.__version__,
    "peft", peft.__version__)'
  "$py" -c 'import gsplat; print("gsplat", gsplat.__version__)' 2>/dev/null || echo "gsplat: not installed"
  nvcc --version 2>/dev/null | tail -n 1; nproc; date -u +%FT%TZ; } > "$out/env.log" 2>&1
cat "$out/env.log"

half_jobs=$(( MAX_JOBS > 3 ? MAX_JOBS / 2 : 2 ))
gsplat=0
if [ -z "${NO_GSPLAT:-}" ] && "$py" -c 'import gsplat' 2>/dev/null; then
  gsplat=1
  (start=$(date +%s)
   MAX_JOBS=$half_jobs timeout "${LIMIT_GSPLAT_BUILD:-900}" "$py" -c \
     'from gsplat.cuda._backend import _C; assert _C is not None, "gsplat did not build"' > "$out/gsplat_build.log" 2>&1
   echo "$? $(( $(date +%s) - start ))" > "$out/gsplat_build.rc") &
  build=$!
fi

# LucidDreamer's rasteriser: sources from the submodule, else from VENDOR; pip builds it against the installed torch
rast=submodules/diff-gaussian-rasterization
vendor=${VENDOR:-../shared/vendor/diff-gaussian-rasterization}
inria=0
if [ -z "${NO_INRIA:-}" ] && command -v nvcc > /dev/null; then
  if [ ! -f "$rast/setup.py" ] && [ -f "$vendor/setup.py" ]; then cp -r "$vendor/." "$rast/"; fi
  if [ -f "$rast/setup.py" ] && [ -f "$rast/third_party/glm/glm/glm.hpp" ]; then
    inria=1
    (start=$(date +%s)
     MAX_JOBS=$half_jobs timeout "${LIMIT_INRIA_BUILD:-600}" "$py" -m pip install --no-build-isolation --no-deps \
       "./$rast" > "$out/inria_build.log" 2>&1
     echo "$? $(( $(date +%s) - start ))" > "$out/inria_build.rc") &
    inria_build=$!
  else
    echo "=== inria_build: skipped: no sources with glm in $rast or $vendor (git submodule update --init --recursive)"
  fi
fi

TAIL=3 step sd21_folder "${LIMIT_SD21:-600}" "$py" -c 'import sys; sys.path.insert(0, "bench"); import gpu_scale
print(gpu_scale.sd21_model_dir(None, "cuda"))'

backends=(torch)
if [ "$gsplat" = 1 ]; then
  wait "$build"
  read -r rc secs < "$out/gsplat_build.rc"
  echo "=== gsplat_build: exit $rc after $secs s"
  tail -n 5 "$out/gsplat_build.log"
  if [ "$rc" = 0 ]; then backends+=(gsplat); else failed=$(( failed + 1 )); gsplat=0; fi
fi
backend=${backends[-1]}
if [ "$inria" = 1 ]; then
  wait "$inria_build"
  read -r rc secs < "$out/inria_build.rc"
  echo "=== inria_build: exit $rc after $secs s (pip install --no-build-isolation ./$rast)"
  tail -n 3 "$out/inria_build.log"
  [ "$rc" = 0 ] || failed=$(( failed + 1 ))
fi

select=(-m gpu)
[ "$gsplat" = 1 ] || select+=(-k "not gsplat")
step parity_tests "${LIMIT_PARITY:-300}" "$py" -m pytest -q -rs -p no:cacheprovider "${select[@]}" tests/test_renderer.py
model=$(tail -n 1 "$out/sd21_folder.log")
TAIL=30 step gpu_speed "${LIMIT_SPEED:-480}" "$py" bench/gpu_speed.py --model-dir "$model" \
  "PipelineParams.backend=$backend" ${SPEED_ARGS:-}
step render_bench "${LIMIT_RENDER:-600}" "$py" bench/render_bench.py --backends "${backends[@]}" --sizes 128 256 512 \
  --counts 4000 16000 100000 --opacities init --views 4 --repeats 3
TAIL=30 step gpu_scale "${LIMIT_SCALE:-900}" "$py" bench/gpu_scale.py --iterations "${ITERATIONS:-20}" --rounds 2 \
  "PipelineParams.backend=$backend"
# the paired, interleaved comparison (same t and noise per iteration) with the phase breakdown and the UNet-call
# micro-benchmark, at SD 2.1-base scale; path LoRA with B = 0 so both arms follow one trajectory; T = 24: the 40
# timed iterations are half at w > 0, half at w = 0
TAIL=45 step ptd_overhead "${LIMIT_OVERHEAD:-900}" "$py" bench/ptd_overhead.py --opt configs/paper.yaml \
  --iterations 44 --warmup 4 --memory-iterations 4 --micro-repeats 20 "GuidanceParams.model_key=$model" device=cuda \
  "PipelineParams.backend=$backend" PTDParams.total_steps=24 ${OVERHEAD_ARGS:-}
echo "gpu_checks: $failed step(s) failed; logs in $out"
exit "$failed"
