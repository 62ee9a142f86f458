# Train GPT language models from scratch. `make help` lists the targets; `make train` then `make generate`.
# Every target uses ./venv's python (made on first use); nobody needs to activate anything.

.DEFAULT_GOAL := help
SHELL := /bin/bash

VENV ?= venv
PY := $(VENV)/bin/python
SYSTEM_PYTHON ?= python3
# Without an NVIDIA GPU, pin the CPU build of torch first (a plain `torch` pulls a CUDA build of several GB).
# Override with e.g. TORCH_SPEC="torch==2.13.0 --index-url <your CPU wheel index>" or TORCH_SPEC= to skip.
TORCH_SPEC ?= $(if $(shell command -v nvidia-smi 2>/dev/null),,torch==2.13.0)

PRESET ?=
ARGS ?=
DATASET ?=
NPROC ?= 2
PROMPT ?=
MAX_NEW_TOKENS ?= 200
TEMPERATURE ?= 0.8
TOP_K ?= 200
NUM_SAMPLES ?= 1
SEED ?= 1337
CKPT ?=
RUN ?=
INIT ?=
SPLIT ?=
STRIDE ?=
OUT ?=
PORT ?=
HOST ?=
BPE_SIZE ?= 4096

preset_arg = $(if $(PRESET),--preset=$(PRESET))
dataset_arg = $(if $(DATASET),--dataset=$(DATASET))

.PHONY: help setup-all setup install install-force test quick-test lint train train-ddp resume data generate info check-deps \
        tokenizer init plot bench gpu-check classify instruct chat serve finetune-gpt2 eval export gguf average sweep clean clean-checkpoints \
        clean-all

help: ## List the targets (PRESET=tiny|small|gpt2|..., ARGS="--key=value ...")
	@echo "Targets:"
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'
	@echo "Variables: PRESET, ARGS, DATASET, PROMPT, MAX_NEW_TOKENS, TEMPERATURE, TOP_K, NUM_SAMPLES, SEED, CKPT, RUN, PORT, HOST"

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || $(SYSTEM_PYTHON) -m venv $(VENV)
	$(if $(TORCH_SPEC),$(PY) -m pip install $(TORCH_SPEC))
	$(PY) -m pip install -r requirements.txt -r requirements-dev.txt
	touch $@

setup-all: $(VENV)/.installed init ## Make ./venv, install everything, create data/ and checkpoints/
	@$(PY) -c "import torch; print(f'ready: torch {torch.__version__}, cuda available: {torch.cuda.is_available()}')"

setup: setup-all ## Same as setup-all

install: $(VENV)/.installed ## Install the requirements into ./venv (reruns only when requirements change)

install-force: ## Install the requirements into the active python instead of ./venv (containers, images)
	@out=$$($(SYSTEM_PYTHON) -m pip install $(TORCH_SPEC) -r requirements.txt -r requirements-dev.txt 2>&1); rc=$$?; \
	echo "$$out" | tail -n 3; \
	if echo "$$out" | grep -q externally-managed-environment; then \
	  echo "error: this python is managed by the system (PEP 668); use 'make setup-all' (a venv), or activate a venv first"; exit 2; fi; \
	exit $$rc

test: $(VENV)/.installed ## Run the test suite (10-15 minutes on 2 CPU cores; make quick-test: under a minute)
	$(PY) -m pytest -q tests

quick-test: $(VENV)/.installed ## Prove in under a minute that the model trains and samples
	$(PY) -m pytest -q tests/test_quick.py

lint: $(VENV)/.installed ## Lint with ruff
	$(PY) -m ruff check .

data: $(VENV)/.installed ## Prepare a data set's token files (DATASET=wikitext2|shakespeare|tang_poems|PATH)
	$(PY) data.py $(dataset_arg) $(ARGS)

tokenizer: $(VENV)/.installed ## Learn a byte-level BPE of BPE_SIZE tokens on DATASET's train split; bytes per token vs GPT-2's
	$(PY) data.py $(dataset_arg) --tokenizer=bpe:$(BPE_SIZE) $(ARGS)

train: $(VENV)/.installed ## Train a model (PRESET=..., DATASET=..., ARGS="--max_iters=100 ...")
	$(PY) train.py $(preset_arg) $(dataset_arg) $(ARGS)

train-ddp: $(VENV)/.installed ## Train with DDP on NPROC processes of this machine, one per GPU (NPROC=2, PRESET=, ARGS=)
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) train.py $(preset_arg) $(dataset_arg) $(ARGS)

resume: $(VENV)/.installed ## Continue the latest pretraining run exactly where it stopped (ARGS="--out_dir=DIR" for another)
	$(PY) train.py --resume $(ARGS)

generate: $(VENV)/.installed ## Sample from the latest language-model run (PROMPT="...", CKPT=PATH, RUN=NAME, INIT=gpt2, ARGS=...)
	$(PY) generate.py $(if $(PROMPT),--prompt="$(PROMPT)") $(if $(INIT),--init_from=$(INIT)) --max_new_tokens=$(MAX_NEW_TOKENS) --temperature=$(TEMPERATURE) \
	  --top_k=$(TOP_K) --num_samples=$(NUM_SAMPLES) --seed=$(SEED) $(if $(CKPT),--ckpt=$(CKPT)) $(if $(RUN),--run=$(RUN)) $(ARGS)

classify: $(VENV)/.installed ## Fine-tune the latest run into a classifier (offline: Shakespeare genres; ARGS="--dataset=F.csv ...")
	$(PY) classify.py $(if $(INIT),--init_from=$(INIT)) $(dataset_arg) $(ARGS)

instruct: $(VENV)/.installed ## Instruction-tune the latest run (offline: chatterbot-corpus dialogues; ARGS="--dataset=F.json ...")
	$(PY) instruct.py $(if $(INIT),--init_from=$(INIT)) $(dataset_arg) $(ARGS)

.PHONY: addition dpo rl post-training-bench
addition: $(VENV)/.installed ## The SFT start for dpo/rl: a tiny model taught two-digit sums by a sloppy teacher (about 2 minutes on a CPU)
	$(PY) train.py --preset=tiny --dataset=addition --tokenizer=bpe:257 --max_iters=300 --eval_interval=300 --run_name=addition-base-$$(date +%Y%m%d-%H%M%S)
	$(PY) instruct.py --dataset=addition --max_iters=1200 --batch_size=64 --learning_rate=1.5e-3 $(ARGS)

dpo: $(VENV)/.installed ## DPO on the latest instruct run (offline: pairs from its own samples of the addition task; ARGS="--beta=0.1 ...")
	$(PY) dpo.py $(if $(INIT),--init_from=$(INIT)) $(dataset_arg) $(ARGS)

rl: $(VENV)/.installed ## GRPO with verifiable rewards on the latest instruct run (offline: the addition task; ARGS="--reward=f.py:fn ...")
	$(PY) rl.py $(if $(INIT),--init_from=$(INIT)) $(dataset_arg) $(ARGS)

post-training-bench: $(VENV)/.installed ## SFT alone, more SFT, DPO (with/without NLL) and RL from one SFT start, same steps (docs/post-training.md)
	OMP_NUM_THREADS=1 $(PY) -m tools.post_training_bench $(ARGS)

chat: $(VENV)/.installed ## Chat in the terminal with the latest instruct, dpo or rl run (CKPT=PATH, RUN=NAME, ARGS="--system=...")
	$(PY) chat.py $(if $(CKPT),--ckpt=$(CKPT)) $(if $(RUN),--run=$(RUN)) $(ARGS)

serve: $(VENV)/.installed ## OpenAI-compatible API + chat page at http://127.0.0.1:8000 (CKPT=, RUN=, PORT=, HOST=)
	$(PY) serve.py $(if $(CKPT),--ckpt=$(CKPT)) $(if $(RUN),--run=$(RUN)) $(if $(PORT),--port=$(PORT)) $(if $(HOST),--host=$(HOST)) $(ARGS)

finetune-gpt2: $(VENV)/.installed ## Fine-tune OpenAI's GPT-2 (INIT=gpt2|PATH) on DATASET (WikiText-2 by default)
	$(PY) train.py --preset=gpt2-finetune --init_from=$(or $(INIT),gpt2) $(dataset_arg) $(ARGS)

eval: $(VENV)/.installed ## Perplexity over a whole split (CKPT=|RUN=|INIT=gpt2, SPLIT=val|test, STRIDE=N)
	$(PY) -m tools.evaluate --split=$(or $(SPLIT),val) $(if $(STRIDE),--stride=$(STRIDE)) $(if $(INIT),--init_from=$(INIT)) \
	  $(if $(CKPT),--ckpt=$(CKPT)) $(if $(RUN),--run=$(RUN)) $(dataset_arg) $(ARGS)

export: $(VENV)/.installed ## Write a checkpoint as a transformers folder: GPT-2, GPT-NeoX or Llama form (CKPT=|RUN=, OUT=DIR)
	$(PY) -m tools.export $(if $(CKPT),--ckpt=$(CKPT)) $(if $(RUN),--run=$(RUN)) $(if $(OUT),--out=$(OUT))

gguf: $(VENV)/.installed ## Write a checkpoint as a GGUF for llama.cpp/Ollama, with a Modelfile (CKPT=|RUN=, OUT=FILE.gguf, DTYPE=f32|f16|q8_0)
	$(PY) -m tools.gguf $(if $(CKPT),--ckpt=$(CKPT)) $(if $(RUN),--run=$(RUN)) $(if $(OUT),--out=$(OUT)) $(if $(DTYPE),--dtype=$(DTYPE))

average: $(VENV)/.installed ## Average a run's last step checkpoints into average.pt, scored beside the last (RUN=NAME|DIR, ARGS="--last=3")
	$(PY) -m tools.average $(if $(RUN),--run=$(RUN)) $(ARGS)

sweep: $(VENV)/.installed ## train.py once per setting, a table of val loss vs step and minutes (ARGS="--vary=learning_rate=1e-3,2e-3 -- --max_iters=400")
	$(PY) -m tools.sweep $(ARGS)

plot: $(VENV)/.installed ## Plot the loss curves of the latest run (RUN=NAME for another) to loss.png
	$(PY) -m tools.plot $(if $(RUN),--run=$(RUN))

bench: $(VENV)/.installed ## Benchmark training, decoding, attention, matmul peak, tokenisation to bench.json (ARGS="--quick")
	$(PY) -m tools.bench $(ARGS)

gpu-check: $(VENV)/.installed ## On a CUDA GPU: the cuda tests, gpt2 bf16 training MFU, decode speed (~8 min; gpu_check.txt)
	$(PY) -m tools.gpu_check

info: $(VENV)/.installed ## Parameters, FLOPs per token and training memory of a config (PRESET=..., ARGS=...)
	$(PY) -m tools.info $(preset_arg) $(ARGS)

check-deps: $(VENV)/.installed ## Versions of the dependencies; is the GPT-2 tokenizer / WikiText-2 available?
	$(PY) -m tools.info --check_deps

init: ## Create the data/ and checkpoints/ folders
	@mkdir -p data checkpoints

clean: ## Remove caches and generated reports (never checkpoints, data or the venv)
	rm -rf .pytest_cache .ruff_cache bench.json gpu_check.json gpu_check.txt
	find . -name __pycache__ -type d -not -path './$(VENV)/*' -prune -exec rm -rf {} +

clean-checkpoints: ## Delete every run under checkpoints/ (asks first)
	@read -p "Delete everything under checkpoints/? [y/N] " ans && [ "$$ans" = y ] && rm -rf checkpoints/*/ || echo "kept"

clean-all: clean ## Remove the venv, data/ and checkpoints/ too (asks first)
	@read -p "Delete venv/, data/ and checkpoints/? [y/N] " ans && [ "$$ans" = y ] && rm -rf $(VENV) data checkpoints/*/ || echo "kept"
