.PHONY: install install-locked test test-floors lint demo ci docs

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

# the documentation site, strict (a warning is an error), into site/; needs pip install -e ".[docs]"
docs:
	NO_MKDOCS_2_WARNING=1 python -m mkdocs build --strict

# what CI runs: fresh environments for the README's install and for the floors, ruff, pytest
ci:
	.ci/run

# diffusers' own pipeline tests (PipelineTesterMixin, unmodified) against both pipelines, from a diffusers clone:
#   make conformance DIFFUSERS=/path/to/diffusers.git   (see assets/conformance/README.md)
.PHONY: conformance
conformance:
	@test -n "$(DIFFUSERS)" || { echo "usage: make conformance DIFFUSERS=/path/to/diffusers(.git)"; exit 2; }
	PYTHON="$${PYTHON:-python}" bash assets/conformance/run.sh "$(DIFFUSERS)"
