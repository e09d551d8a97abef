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

# One torch thread per process: the simulator and the policy node share a small CPU, and
# OpenMP threads waiting on a descheduled sibling slow a 2-core machine down several times.
demo: $(STAMP)
	ROS_DOMAIN_ID=63 OMP_NUM_THREADS=1 $(VENV)/bin/quantvla demo

bench: $(STAMP)
	$(VENV)/bin/python bench/e2e.py

clean:
	rm -rf $(VENV) build
