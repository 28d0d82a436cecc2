# chexforge — make targets for people and CI pipelines.  `make help` lists them.
#
#   make demo                               set up, then generate recipes/quickstart.yaml into out/quickstart
#   make test                               set up, then run the test suite
#   make dataset RECIPE=r.yaml OUT=out/x    generate any recipe (re-run to resume)
#   make plan RECIPE=r.yaml                 dry run: the jobs, the mix, the estimated time
#   make balance LABELS=train.csv BY=sex,age BALANCE=balance.yaml   audit a label file, write the top-up recipe
#   make validate                           check every recipe in recipes/
#   make verify OUT=out/x                   re-hash every file of a dataset against its manifest
#   make push OUT=out/x TO=pacs:104 AET=PACS   send its DICOM images and SEGs to a PACS (resumable)
#   make report OUT=out/x                   static HTML report of a dataset: OUT/report/index.html
#   make eval OUT=out/x [REFERENCE=real/]   metrics into OUT/report/metrics.json: no REFERENCE needed for composition,
#                                           laterality/severity, sizes, diversity; REFERENCE (images folder, chexforge
#                                           OUT, or label CSV with ARGS=--image-root DIR) adds FID/KID, PRDC, memorization
#   make bench                              the benchmarks in bench/ (figures go to docs/benchmarks.md)
#   make gpu-check                          every GPU target in one table, < 8 min on one GPU (bench/results/gpu_check.md)

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.chexforge-installed
RECIPE ?= recipes/quickstart.yaml
LABELS ?= xrv:chexpert
BY     ?= sex,age
BALANCE ?= balance.yaml
OUT    ?= out/$(basename $(notdir $(RECIPE)))
ARGS   ?=

.PHONY: help install demo test test-fast lint dataset plan validate inspect verify balance audit priors bench clean

help:  ## this list
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 14

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	@# diffdrr without its dependency list: that list pulls pyvista[all] for 3-D plots we never make.
	$(BIN)/python -m pip install -q --no-deps "diffdrr>=0.4,<0.8"
	@# torchxrayvision for the public label files its wheel ships; its code is never imported (xrv-densenet is built with torchvision).
	$(BIN)/python -m pip install -q --no-deps "torchxrayvision>=1.2"
	@touch $(STAMP)

install: $(STAMP)  ## create .venv if missing and install chexforge into it

demo: install  ## generate the quickstart dataset into out/quickstart and draw its contact sheet
	$(BIN)/chexforge generate recipes/quickstart.yaml --out out/quickstart $(ARGS)
	$(BIN)/chexforge inspect out/quickstart

test: install  ## run the whole test suite
	$(BIN)/python -m pytest -q $(ARGS)

test-fast: install  ## the tests without the slow ones
	$(BIN)/python -m pytest -q -m "not slow" $(ARGS)

lint: install  ## ruff
	$(BIN)/ruff check chexforge tests bench

dataset: install  ## generate RECIPE into OUT (resumable), e.g. make dataset RECIPE=recipes/effusion-laterality.yaml OUT=out/eff
	$(BIN)/chexforge generate $(RECIPE) --out $(OUT) $(ARGS)

plan: install  ## show the jobs RECIPE expands to and write $(OUT)/jobs.parquet
	@mkdir -p $(OUT)
	$(BIN)/chexforge plan $(RECIPE) --out $(OUT)/jobs.parquet $(ARGS)

validate: install  ## check every recipe in recipes/
	$(BIN)/chexforge validate recipes/*.yaml

inspect: install  ## counts and a contact sheet for OUT
	$(BIN)/chexforge inspect $(OUT)

verify: install  ## re-hash every file of OUT against its manifest (exit 1 on missing, corrupt or orphan files)
	$(BIN)/chexforge verify $(OUT)

.PHONY: push
TO  ?=
AET ?=
push: install  ## C-STORE OUT's DICOM images and SEGs to a PACS, e.g. make push OUT=out/x TO=pacs:104 AET=ORTHANC (re-run to resume)
	@test -n "$(TO)" -a -n "$(AET)" || { echo "make push: give TO=host:port and AET=the PACS's AE title" >&2; exit 2; }
	$(BIN)/chexforge push $(OUT) --to $(TO) --aet $(AET) $(ARGS)

.PHONY: eval
REFERENCE ?=
FEATURES  ?= auto
eval: install  ## metrics of OUT (no REFERENCE or weights needed for composition, laterality/severity, sizes, diversity); REFERENCE (images folder, chexforge OUT or label CSV) with FEATURES (default auto: real features when on disk, else those metrics say what they need) adds fidelity and memorization
	$(BIN)/chexforge eval $(OUT) $(if $(REFERENCE),--reference $(REFERENCE)) --features $(FEATURES) $(ARGS)

.PHONY: report
report: install  ## the HTML report of OUT into OUT/report (contact sheets, composition, failures, metrics)
	$(BIN)/chexforge report $(OUT) $(ARGS)

balance: install  ## audit LABELS (default xrv:chexpert) by BY and write the top-up recipe BALANCE (default balance.yaml)
	$(BIN)/chexforge balance $(LABELS) --by $(BY) --out $(BALANCE) $(ARGS)

audit: install  ## the bias audit of LABELS by BY (table, and with ARGS="--out DIR" a JSON and a chart)
	$(BIN)/chexforge audit $(LABELS) --by $(BY) $(ARGS)

priors: install  ## rebuild chexforge/priors/data from the label files in torchxrayvision
	$(BIN)/python -m chexforge.priors.build

bench: install  ## run the benchmarks (prints ratios against baselines measured in the same run)
	$(BIN)/python bench/plan_bench.py
	$(BIN)/python bench/drr_bench.py
	$(BIN)/python bench/export_bench.py
	$(BIN)/python bench/labels_bench.py
	$(BIN)/python bench/pipeline_bench.py
	$(BIN)/python bench/diffusion_bench.py --config tiny
	$(BIN)/python bench/diffusion_bench.py --config xl   # GPU only; says so on a CPU

.PHONY: gpu-check
gpu-check: install  ## every GPU target in one table, under 8 min on one GPU; fail-soft without CUDA (table: bench/results/gpu_check.md, or ARGS="--out FILE")
	PYTHON=$(BIN)/python bench/gpu_check.sh $(ARGS)

.PHONY: bench-patients
bench-patients: install  ## are rendered patients different people? sex/age from pixels, lung-shape diversity, CTR by sex and age (minutes)
	$(BIN)/python bench/virtual_patients.py $(ARGS)

clean:  ## remove generated outputs (keeps .venv)
	rm -rf out .pytest_cache
