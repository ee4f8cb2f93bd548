#!/usr/bin/env bash
# The oldest Hugging Face stack setup.py admits, checked: builds a second virtual environment with setup.py's minimum
# diffusers / peft / transformers / huggingface_hub / accelerate / safetensors (and tokenizers as transformers needs
# it), everything else as requirements-test.txt pins it, installs this checkout there, and runs the tests that depend
# on those APIs: the LoRA save / load round trip (adapter metadata, lora_alpha), the prior-LoRA fusion, lora_diffusion
# files, the LoRA scale / merge code, the tiny model's save / load, both stages in bfloat16 (the dtype keyword of
# from_pretrained) and a prior LoRA fitted on images then loaded as the prior. Offline; ~6 minutes on 2 cores after
# the install. Not part of `make test` / CI.
#
#   bash bench/oldest_deps.sh [VENV]      (default /tmp/ptd-oldest-deps; PYTHON=... picks the interpreter, 3.11)
#
# An existing VENV is reused (pip install is then a no-op). Change the pins below together with setup.py.
set -euo pipefail
venv=${1:-/tmp/ptd-oldest-deps}
py=${PYTHON:-python3.11}
here=$(cd "$(dirname "$0")/.." && pwd)
OLDEST=(diffusers==0.34.0 peft==0.15.0 transformers==4.44.2 tokenizers==0.19.1 huggingface_hub==0.27.0
        accelerate==0.34.2 safetensors==0.4.3)
TESTS=(tests/test_hf_compat.py tests/test_tiny.py tests/test_lora_training.py tests/test_sd_guidance.py
       tests/test_lora_diffusion.py tests/test_ptd_utils.py tests/test_lora_merge.py
       tests/test_end_to_end.py::test_both_stages_in_half_precision
       tests/test_end_to_end.py::test_prior_finetune_lora_on_images_then_used_as_prior)

cd "$here"
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
# requirements-test.txt without the packages pinned above (and ray: batch.py's extra, not needed here)
rest=$(mktemp)
trap 'rm -f "$rest"' EXIT
grep -v -i -E '^(diffusers|peft|transformers|tokenizers|huggingface[-_]hub|accelerate|safetensors|ray)([=<>!~ ]|$)' \
  requirements-test.txt > "$rest"
"$venv/bin/python" -m pip install -q -r "$rest" "${OLDEST[@]}"
"$venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e .
"$venv/bin/python" -m pip check
"$venv/bin/python" -m pip freeze |
  grep -i -E '^(torch|torchvision|diffusers|peft|transformers|tokenizers|huggingface.hub|accelerate|safetensors)( @|==)'
# its own tiny-model cache: the folders are written by the installed diffusers / transformers
HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PTD_TINY_CACHE="$venv/ptd-tiny-cache" \
  "$venv/bin/python" -m pytest -q -p no:cacheprovider "${TESTS[@]}"
