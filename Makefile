.PHONY: install test lint demo

install:
	python -m pip install -e ".[dev]"

test:
	python -m pip install -e ".[dev]" && python -m pytest -q

lint:
	ruff check . && ruff format --check .

demo:
	python -m pip install -e . && mmdiff demo
