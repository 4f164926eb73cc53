# Two commands do everything: `make demo` and `make test`. Each creates the
# virtual environment on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
DEMO_OUT ?= demo-output

.PHONY: install demo test test-tools test-faults test-all lint-imports clean

$(BIN)/diffcolor: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# Install the pinned torch first when none is present: an unpinned torch
	# would pull the CUDA build (gigabytes) on machines that do not need it.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(BIN)/diffcolor

install: $(BIN)/diffcolor

demo: install
	$(BIN)/diffcolor demo --out $(DEMO_OUT)

# The layer contract first (import-linter, pyproject.toml), then the default test suite.
test: install
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

# The tests that drive real outside tools: pages in headless Chromium (Debian's chromium and
# chromium-driver), derivatives read back by exiftool (libimage-exiftool-perl); .ci/run installs them.
test-tools: install
	$(BIN)/python -m pytest -q -m "browser or exiftool"

# The fault-injection matrix (docs/RELIABILITY.md): its documented table checked against the code,
# then every storage operation of one item faulted in every mode, on local disk and S3 (moto).
test-faults: install
	$(BIN)/python -m diffcolor.tools.faults --check docs/RELIABILITY.md
	$(BIN)/python -m diffcolor.tools.faults

# The CLI reference written from the parser; tests/test_docs.py fails when docs/CLI.md is out of date.
.PHONY: cli-doc
cli-doc: install
	$(BIN)/python -m diffcolor.clidoc > docs/CLI.md

lint-imports: install
	$(BIN)/lint-imports

test-all: install
	$(BIN)/python -m pytest -q -m ""

clean:
	rm -rf $(VENV) $(DEMO_OUT)
