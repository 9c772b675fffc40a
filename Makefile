.PHONY: install install-locked test test-floors lint demo ci

install:
	python -m pip install -e ".[dev]"

# the exact versions behind the README's figures
install-locked:
	python -m pip install -e ".[dev]" -c constraints/lock.txt

test:
	python -m pip install -e ".[dev]" && python -m pytest -q

# the oldest supported release of every dependency, in a fresh environment (.venv-floors)
test-floors:
	rm -rf .venv-floors && python -m venv .venv-floors
	.venv-floors/bin/pip install -e ".[dev]" -c constraints/floors.txt
	.venv-floors/bin/python -m pytest -q -p no:cacheprovider

lint:
	ruff check . && ruff format --check .

demo:
	python -m pip install -e . && mmdiff demo

# what CI runs: fresh environments for the README's install and for the floors, ruff, pytest
ci:
	.ci/run
