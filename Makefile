# The two commands of the README. Both set everything up first (idempotent, fast when done).
.PHONY: setup demo test
setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/vlmcook demo

test: setup
	.venv/bin/python -m pytest

