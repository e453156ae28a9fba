# Two commands for a newcomer: `make pipeline` and `make test`. Both set everything up first.
VENV   := .venv
STAMP  := $(VENV)/.installed
DATA   := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
NODE_STAMP := node_modules/.package-lock.json
export PATH := $(abspath $(VENV))/bin:$(PATH)
# Nothing calls home, whichever entry point runs: MLflow's telemetry off (and the generic opt-out).
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true

.PHONY: pipeline test setup test-packages ui serve bench exps

pipeline: setup  ## set up, then run download -> train -> evaluate
	dvc repro

test: setup test-packages  ## set up, then run every test (unit and end-to-end)
	pytest

UI_PORT ?= 5000
ui: setup  ## browse runs: MLflow UI on http://127.0.0.1:5000 (this machine only); Ctrl-C stops it
	@echo "starting the MLflow UI (one worker, no job runner); the link follows once it answers"
	@MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow ui --backend-store-uri sqlite:///mlflow.db \
	  --host 127.0.0.1 --port $(UI_PORT) --workers 1 & pid=$$!; trap 'kill $$pid 2>/dev/null' INT TERM EXIT; \
	until curl -sf -o /dev/null http://127.0.0.1:$(UI_PORT)/health; do \
	  kill -0 $$pid 2>/dev/null || { echo "error: mlflow ui exited; see its output above" >&2; exit 1; }; sleep 1; \
	done; \
	echo; echo "MLflow UI ready; the runs of the first experiment, in the Model training view:"; \
	echo "  http://127.0.0.1:$(UI_PORT)/#/experiments/1/runs?workflowType=machine_learning"; \
	echo "The MLflow Assistant panel (right) and the Model registry's \"new Model Registry UI\" dialog close with their ×."; \
	echo; \
	wait $$pid

# `dvc exp show` lists every dependency's md5 and every setting (about 1000 columns); this keeps the
# params that differ between the rows shown and the metrics that matter. ARGS adds options (e.g. -A).
EXPS_DROP := 'Created|.*/|(data|evaluate|tracking)\.|(device|determinism|model_md5|val_seed|f1_weighted|precision_.*|recall_.*)$$'
exps:  ## experiments, best test_acc first: changed params and key metrics in 160 columns
	dvc exp show --no-pager --only-changed --drop $(EXPS_DROP) --sort-by test_acc --sort-order desc --precision 4 $(ARGS)

# The champion model (see README, "Serving"), from the project's store unless MLFLOW_TRACKING_URI
# names another; --env-manager local: this venv, no conda or virtualenv built, nothing downloaded.
SERVE_PORT ?= 5001
serve: setup  ## serve the champion model on http://127.0.0.1:5001/invocations (this machine only)
	MLFLOW_TRACKING_URI="$${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/mlflow.db}" \
	  mlflow models serve -m models:/fashion-mnist-softmax@champion --env-manager local \
	  -h 127.0.0.1 -p $(SERVE_PORT)

bench: setup  ## a train epoch, portable against fast, a lower bound and the book's script: benchmarks/RESULTS.md
	python -m benchmarks.bench

setup: $(STAMP) $(NODE_STAMP) $(DATA)

$(STAMP): pyproject.toml
	@echo "installing the Python packages of pyproject.toml into $(VENV) (first time: about 3 minutes)"
	@start=$$(date +%s); python3.11 -m venv $(VENV) && \
	  $(VENV)/bin/pip install --disable-pip-version-check --progress-bar on -e '.[dev]' && \
	  echo "installed $(VENV) in $$(( $$(date +%s) - start )) s"
	touch $@

# vega, vega-lite and vega-embed at package-lock.json's versions, for the page `dvc plots show` writes
# (.dvc/plots.html loads them from node_modules/, so the charts draw offline).
$(NODE_STAMP): package.json package-lock.json
	@echo "installing vega, vega-lite and vega-embed into node_modules/ (npm ci, about 10 s)"
	@command -v npm >/dev/null || $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm >/dev/null || \
	  echo "warning: npm not installed; the pages of \`dvc plots\` will show only the PNGs"
	@if command -v npm >/dev/null; then npm ci --no-audit --no-fund; fi

# What the tests start on loopback and nothing on PyPI provides: an OpenSSH server (an SSH remote),
# PostgreSQL (a team's MLflow store) and Chromium (the MLflow UI test). Installed once, from Debian.
TEST_PACKAGES := openssh-server postgresql chromium
test-packages:
	@missing=$$(for p in $(TEST_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing" $$missing; \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

# Debian/Ubuntu ship Fashion-MNIST; elsewhere the download stage falls back to HTTPS mirrors.
$(DATA):
	$(SUDO) apt-get install -y dataset-fashion-mnist || \
	  { $(SUDO) apt-get update && $(SUDO) apt-get install -y dataset-fashion-mnist; } || \
	  echo "warning: dataset-fashion-mnist not installed; the download stage will use the mirrors"
