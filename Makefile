# The two commands of the README: `make demo` and `make test`. Both build .venv on first use.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

# DDS stays on loopback; every entry point picks its own domain.
export ROS_AUTOMATIC_DISCOVERY_RANGE := LOCALHOST
ROS_DOMAIN_ID ?= 61
export ROS_DOMAIN_ID

.PHONY: venv test test-unit demo bench clean

$(STAMP): requirements.txt setup.py scripts/setup_env.sh
	PYTHON=$(PYTHON) bash scripts/setup_env.sh
	touch $@

venv: $(STAMP)

test: $(STAMP)
	$(VENV)/bin/python -m pytest

test-unit: $(STAMP)
	$(VENV)/bin/python -m pytest -m unit

demo: $(STAMP)
	ROS_DOMAIN_ID=63 $(VENV)/bin/quantvla demo

bench: $(STAMP)
	$(VENV)/bin/python bench/latency.py

clean:
	rm -rf $(VENV) build
