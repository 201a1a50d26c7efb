# Entry points of the pipeline; `make help` lists them. Each stage reads only the artifacts of
# the stage before it, so each can be rerun alone. Every target first runs `setup` (idempotent).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# PY=<python> on the command line (a GPU machine's own torch, no network): that interpreter with
# the packages it has, and no setup.
SETUP = $(if $(filter $(VENV)/bin/python,$(PY)),VENV=$(VENV) bash scripts/ops/setup.sh,echo "setup: skipped: $(PY) runs with the packages it has")
# The repository first; packages a GPU machine was given with `pip install --target` stay after it.
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))

# make data: IMAGENET=<root> builds imagenet50 from the split lists shipped in data_prep/vipriors/
# SPLITS=<dir with the toolkit's train/val/test.pickle> uses those once they equal the shipped ones;
# FOLDER=<class folders> builds data/<folder name>; neither builds the embedded fashion50.
IMAGENET ?=
SPLITS ?=
FOLDER ?=
PER_CLASS ?= 50,50,0.5
DATA_ARGS ?=
# make train / logits: MODEL=<configs/models name or .yaml>, DATA=<configs/data name or .yaml>,
# ARGS="key=value ..."
MODEL ?= effnet_b7
DATA ?=
ARGS ?=
ACCELERATE_CONFIG ?=
NPROC ?=
# make logits NPROC=N: N processes under torchrun's agent (train/agent.py: bad input is one line,
# exit 2); a free port, every value given (a user's accelerate default config is not read for
# them), the precision the logits take from their config
LOGITS_LAUNCH = --quiet --multi_gpu --num_machines 1 --gpu_ids all --main_process_port 0 \
	--mixed_precision no --dynamo_backend no
# make ensemble: ENSEMBLE=<configs/ensembles name or .yaml>, or MODELS="a b" WEIGHTS="1 2" NAME=<name>
ENSEMBLE ?= vipriors16
MODELS ?=
WEIGHTS ?=
SEARCH ?=
NAME ?=
SUBMISSION ?=
LABELS ?=
# make smoke: PRECISION=native trains in the CPU's native precision (fp32 where bf16 is emulated)
PRECISION ?=
# make tensorboard: LOGDIR= (the runs), PORT=
LOGDIR ?= runs
PORT ?= 6006
# make tsne: RUNS="<ablation rows or run folders>" (default: the strong baseline and the full recipe)
RUNS ?=
# make plan: GPU memory (GiB) and GPU count to plan for; TFLOPS=<model TFLOP/s per GPU> (optional)
GPU_MEM ?= 80
GPUS ?= 8
TFLOPS ?=


.PHONY: help setup data train logits ensemble evaluate demo ablation sweep long-run frontier tsne bench bench-data chaos test test-fast test-gpu lint clean slurm slurm-ensemble status tensorboard smoke plan gpu-check

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

setup: ## .venv with the pinned requirements, and Debian's Fashion-MNIST (PY= skips it)
	@$(SETUP)

data: setup ## build a dataset (IMAGENET= [SPLITS=] | FOLDER= | the embedded fashion50)
ifneq ($(IMAGENET),)
	$(PY) -m data_prep imagenet --imagenet "$(IMAGENET)"$(if $(SPLITS), --splits "$(SPLITS)") $(DATA_ARGS)
else ifneq ($(FOLDER),)
	$(PY) -m data_prep folder --root "$(FOLDER)" --per-class "$(PER_CLASS)" $(DATA_ARGS)
else
	$(PY) -m data_prep fashion $(DATA_ARGS)
endif

train: setup ## train MODEL= [DATA=] [ARGS="epochs=2 ..."] under accelerate launch
	$(PY) -m train.launch $(if $(ACCELERATE_CONFIG),--config_file $(ACCELERATE_CONFIG)) $(if $(NPROC),--num_processes $(NPROC)) \
		$(MODEL) $(if $(DATA),data=$(DATA)) $(ARGS)

logits: setup ## TenCrop probabilities of MODEL= for val and test (NPROC= processes)
	$(if $(filter-out 1,$(or $(NPROC),1)),$(PY) -m train.agent $(LOGITS_LAUNCH) --num_processes $(NPROC),$(PY)) \
		-m ensemble.logits $(MODEL) $(if $(DATA),data=$(DATA)) $(ARGS)

ensemble: setup ## average models into submissions/<name>.csv/.zip/.json (ARGS=key=value as for logits)
	$(PY) -m ensemble.blend $(if $(DATA),data=$(DATA)) $(ARGS) \
		$(if $(MODELS),--models $(MODELS),--config "$(ENSEMBLE)") \
		$(if $(WEIGHTS),--weights $(WEIGHTS)) $(if $(filter-out 0 no No NO false False FALSE,$(SEARCH)),--search-weights) $(if $(NAME),--name "$(NAME)")

evaluate: setup ## validate SUBMISSION= (default: the ENSEMBLE's, or NAME's) and score it against its dataset's labels or LABELS=
	$(PY) -m ensemble.evaluate "$(or $(SUBMISSION),submissions/$(or $(NAME),$(if $(MODELS),ensemble,$(notdir $(basename $(ENSEMBLE))))).csv)" \
		$(if $(LABELS),--labels "$(LABELS)")

demo: ## the whole pipeline on the embedded benchmark (CPU; ends with where the minutes went)
	@started=$$(date +%s.%N); $(SETUP) && $(PY) -m scripts.ops.demo --started $$started

ablation: setup ## the paper's Tables 2 and 3 on the embedded benchmark (resumable; prints its estimate)
	$(PY) -m scripts.studies.ablation $(ARGS)

sweep: setup ## the paper's Figure 4: alpha, beta, gamma, delta swept around the full recipe
	$(PY) -m scripts.studies.ablation --sweep $(ARGS)

long-run: setup ## the full recipe against the baseline at equal epochs, equal time and 4x length
	$(PY) -m scripts.studies.long_run $(ARGS)

frontier: setup ## the full recipe against the baseline at equal wall-clock, 12 to 96 epochs (resumable)
	$(PY) -m scripts.studies.frontier $(ARGS)

tsne: setup ## the paper's Figure 5: t-SNE of test features of RUNS="a b" (ablation rows or run folders)
	$(PY) -m scripts.studies.tsne $(RUNS) $(ARGS)

bench: setup ## every benchmark; ratios measured side by side in one run
	$(PY) -m scripts.bench

bench-data: setup ## make data: link vs copy on 150,000 synthetic files
	$(PY) -m scripts.bench.data

chaos: setup ## SIGKILL a tiny run at 10 random moments; it must end bit-identical (~1 CPU-minute)
	$(PY) -m scripts.ops.chaos $(ARGS)

smoke: setup ## every real config end to end on the CPU, bf16, 1,000 classes (MODELS= for a subset; PRECISION=native)
	$(PY) -m scripts.ops.smoke $(if $(MODELS),--models $(MODELS)) $(if $(PRECISION),--precision $(PRECISION))

plan: setup ## parameters, FLOPs, memory, micro-batch and hours per config (GPU_MEM= GPUS= TFLOPS=)
	$(PY) -m scripts.ops.plan --gpu-mem $(GPU_MEM) --gpus $(GPUS) $(if $(TFLOPS),--tflops $(TFLOPS)) \
		$(if $(MODELS),--models $(MODELS))

gpu-check: setup ## the GPU path in 8 min: bare steps, loader, real loop, B7 memory, demo + GPU/CPU agreement, compile (ARGS=)
	$(PY) -m scripts.bench.gpu_check $(ARGS)

# Two pytest workers of one thread each: the suite is mostly single-threaded process start-up
# (about 300 commands), during which one worker left the second core idle; two threads per
# worker would put four on two cores (README, Tests).
TEST = OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2

test: setup ## the whole test suite (CI runs exactly this)
	$(TEST) --durations=15

test-fast: setup ## the tests not marked slow
	$(TEST) -m "not slow"

# Refused without CUDA: there its tests would all skip, and a broken driver would pass as green.
test-gpu: setup ## the GPU's own tests, on a CUDA machine (the suite above runs on the CPU, GPU hidden)
	@$(PY) -c "import torch, sys; torch.cuda.is_available() or sys.exit('make test-gpu: torch sees no CUDA device (check nvidia-smi and torch.version.cuda); make test is the CPU suite')"
	GPU_TESTS=1 $(PY) -m pytest -q -rs tests/test_gpu.py

lint: setup ## ruff check and ruff format --check (the tree is formatted by ruff format)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean: ## remove generated runs, logits and submissions (keeps data/ and .venv)
	rm -rf runs logits submissions/*.csv submissions/*.zip submissions/*.json submissions/.*.lock

slurm: setup ## print a requeueing SLURM job for MODEL= on NODES= nodes (multi-node accelerate)
	@$(PY) -m train.slurm $(MODEL) $(if $(DATA),data=$(DATA)) $(ARGS) --nodes $(or $(NODES),2)

slurm-ensemble: setup ## submit ENSEMBLE='s training, logits and ensemble jobs, chained (NODES= per model)
	$(PY) -m scripts.ops.slurm_ensemble --config $(ENSEMBLE) --nodes $(or $(NODES),1) $(if $(DATA),data=$(DATA)) $(ARGS)

status: setup ## one table of ENSEMBLE='s models: epochs, best top-1, running, logits, next step
	@$(PY) -m scripts.ops.status --config $(ENSEMBLE) $(if $(DATA),data=$(DATA)) $(ARGS)

tensorboard: setup ## serve the runs' curves on http://127.0.0.1:PORT (LOGDIR=runs)
	$(PY) -m tensorboard.main --logdir "$(LOGDIR)" --host 127.0.0.1 --port $(PORT)
