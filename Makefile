# Set-up and main tasks. VENV can point elsewhere (CI uses a fresh one): `make test VENV=/tmp/venv`.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench lint venv app screenshot

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev,app]'
	touch $(STAMP)

app: $(STAMP)
	$(BIN)/eclipse-prior app

# README's screenshot of the app: the app on the shapes world, driven in headless Chromium (apt-get install chromium)
screenshot: $(STAMP)
	$(BIN)/python scripts/app_screenshot.py docs/app.png

demo: $(STAMP)
	$(BIN)/eclipse-prior demo --out out/demo

test: $(STAMP)
	$(BIN)/python -m pytest tests

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
