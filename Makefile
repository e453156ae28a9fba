# Two commands for a newcomer: `make pipeline` and `make test`. Both set everything up first.
VENV   := .venv
STAMP  := $(VENV)/.installed
DATA   := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: pipeline test setup test-packages ui serve bench

pipeline: setup  ## set up, then run download -> train -> evaluate
	dvc repro

test: setup test-packages  ## set up, then run every test (unit and end-to-end)
	pytest

ui: setup  ## browse runs: MLflow UI on http://127.0.0.1:5000 (this machine only)
	@echo "runs of the first experiment, in the Model training view:"
	@echo "  http://127.0.0.1:5000/#/experiments/1/runs?workflowType=machine_learning"
	mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

# The champion model (see README, "Serving"), from the project's store unless MLFLOW_TRACKING_URI
# names another; --env-manager local: this venv, no conda or virtualenv built, nothing downloaded.
SERVE_PORT ?= 5001
serve: setup  ## serve the champion model on http://127.0.0.1:5001/invocations (this machine only)
	MLFLOW_TRACKING_URI="$${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/mlflow.db}" MLFLOW_DISABLE_TELEMETRY=true \
	  mlflow models serve -m models:/fashion-mnist-softmax@champion --env-manager local \
	  -h 127.0.0.1 -p $(SERVE_PORT)

bench: setup  ## time the pipeline against the book's loop: benchmarks/RESULTS.md
	python -m benchmarks.bench

setup: $(STAMP) $(DATA)

$(STAMP): pyproject.toml
	python3.11 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

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
