# Set-up on a fresh clone needs only Python 3.11 and pip: both targets create or reuse .venv.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
VPY := $(VENV)/bin/python
# re-install when the pinned environment or the package metadata change
STAMP := $(VENV)/.installed-$(shell cat requirements-test.txt setup.py | cksum | cut -d' ' -f1)
OFFLINE := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1

.PHONY: test demo smoke venv bench clean

venv: $(STAMP)

$(STAMP): requirements-test.txt setup.py
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q -r requirements-test.txt
	$(VPY) -m pip install -q --no-deps --no-build-isolation -e .
	rm -f $(VENV)/.installed-* && touch $@

# CI has 2 cores: the suite runs on 2 xdist workers, a test file per worker at a time (module fixtures, Ray's local
# instance and the end-to-end runs stay on one worker); TEST_WORKERS=0 runs it in this process
TEST_WORKERS ?= 2
test: venv
	$(OFFLINE) $(VPY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15

# the main job end to end on the toy prior on CPU: stage 1 (form the path), stage 2 (trace it), PLY + 360-degree video,
# scored against the toy world's ground truth
demo: venv
	$(OFFLINE) $(VPY) form_path.py --opt configs/toy.yaml --overwrite
	$(OFFLINE) $(VPY) train.py --opt configs/toy.yaml --overwrite
	$(OFFLINE) $(VPY) -m toyworld.score output/toy_demo
	@echo "demo outputs in output/toy_demo/:" && find output/toy_demo -maxdepth 3 \( -name 'point_cloud.ply' -o -name '*.mp4' -o -name 'toy_score*' \) | sort

# the same on the random-weight tiny model: plumbing only
smoke: venv
	$(OFFLINE) $(VPY) form_path.py --opt configs/smoke.yaml --overwrite
	$(OFFLINE) $(VPY) train.py --opt configs/smoke.yaml --overwrite

bench: venv
	$(OFFLINE) $(VPY) bench/render_bench.py

clean:
	rm -rf output/smoke output/toy_demo
