# The two commands of the README. Each creates what it needs: the virtual environment in
# .venv (from the pinned requirements) and, on first use, the embedded default model.
PY := .venv/bin/python

.PHONY: train test
train: .venv/.runtime
	$(PY) train.py $(ARGS)

test: .venv/.test
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest $(ARGS)

.venv/.runtime: requirements.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

.venv/.test: requirements.txt requirements-test.txt .venv/.runtime
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-test.txt
	touch $@
