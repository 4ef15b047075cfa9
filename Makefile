# The two commands of the README. Each sets up .venv on first use (and reuses it afterwards).
PY := .venv/bin/python

.PHONY: demo test setup

demo: setup
	$(PY) tools/demo.py

test: setup
	$(PY) -m pytest -q tests

setup:
	bash scripts/setup.sh
