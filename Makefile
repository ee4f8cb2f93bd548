# Set-up on a fresh clone needs only Python 3.11 and pip: both targets create or reuse .venv.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
VPY := $(VENV)/bin/python
# re-install when the pinned environment or the package metadata change
STAMP := $(VENV)/.installed-$(shell cat requirements-test.txt setup.py | cksum | cut -d' ' -f1)
OFFLINE := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1

.PHONY: test demo venv bench clean

venv: $(STAMP)

$(STAMP): requirements-test.txt setup.py
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q -r requirements-test.txt
	$(VPY) -m pip install -q --no-deps --no-build-isolation -e .
	rm -f $(VENV)/.installed-* && touch $@

test: venv
	$(OFFLINE) $(VPY) -m pytest -q

# the main job end to end on the tiny model on CPU: stage 1 (form the path), stage 2 (trace it), PLY + 360-degree video
demo: venv
	$(OFFLINE) $(VPY) form_path.py --opt configs/smoke.yaml --overwrite
	$(OFFLINE) $(VPY) train.py --opt configs/smoke.yaml --overwrite
	@echo "demo outputs in output/smoke/:" && find output/smoke -maxdepth 3 -name '*.ply' -o -maxdepth 3 -name '*.mp4' | sort

bench: venv
	$(OFFLINE) $(VPY) bench/render_bench.py

clean:
	rm -rf output/smoke
