# The two quickstart commands (see README.md). Both create or reuse the cached environment
# (scripts/setup_env.sh: a venv outside the checkout, keyed by a hash of the dependency pins).
.PHONY: demo test lint

demo:  ## set up if needed, then train conservative eSEN with and without DeNS on bundled MD17 data
	@bash scripts/run.sh demo

test:  ## set up if needed, then run the test suite (a few CPU minutes)
	@bash scripts/run.sh test

lint:  ## ruff with the project's rule set
	@bash scripts/run.sh lint
