# apigee_mtls: developer entry points. Everything runs as root (the lab boots machines).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
TOPOLOGY ?= tests/topologies/5-node.yaml
export LAB_STATE ?= /var/lib/apigee-mtls-lab
export LAB_CACHE ?= /var/cache/apigee-mtls-lab

.PHONY: help venv lab lab-down lab-status test unit lab-test bench clean

help:
	@echo "make lab        boot the lab ($(TOPOLOGY)) and run salt '*' state.apply apigee_mtls"
	@echo "make lab-down   remove every machine, link, mount and process the lab created"
	@echo "make test       every test: unit tests, then the lab tests (boots its own lab)"
	@echo "make bench      benchmarks: prints a table, writes bench/results.json"

venv: $(VENV)/.complete
$(VENV)/.complete: requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -r requirements.txt
	touch $@

lab: venv
	$(PY) lab/labctl.py up --topology $(TOPOLOGY)

lab-down: venv
	$(PY) lab/labctl.py down

lab-status: venv
	$(PY) lab/labctl.py status

unit: venv
	$(PY) -m pytest tests/unit -q

lab-test: venv
	$(PY) -m pytest tests/lab -v -x --durations=15

test: venv
	$(PY) -m pytest tests -v --durations=20

bench: venv
	$(PY) bench/run.py

clean: lab-down
	rm -rf $(VENV)
