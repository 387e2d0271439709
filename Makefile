# Two commands do everything on a fresh clone:
#   make run    set up .venv (once) and run the whole batch flow on the sample
#   make test   set up .venv (once), fetch the jars (once) and run the tests
#   make jars   fetch Beam's Flink job server, Flink's and Kafka's jars (mvn)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv

.PHONY: setup run test jars
setup: $(VENV)/.installed

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $@

run: setup
	$(VENV)/bin/python -m pipelines.batch --runner DirectRunner

jars:
	runners/fetch_jars.sh

test: setup jars
	$(VENV)/bin/python -m pytest
