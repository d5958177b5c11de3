# Every target creates the virtual environment on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test lint bench demo demo-clipgen gpu-check picture app app-deps

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(PY) -m ruff check .

bench: $(STAMP)
	for f in bench/bench_*.py; do case $$f in *bench_gpu.py|*bench_attention.py|*bench_scale.py) continue;; esac; \
		echo "== $$f"; $(PY) $$f || exit 1; done

# Every trainer, evaluation and sampling on one CUDA GPU in a few minutes (exit 2 without one)
GPU ?= 0
GPU_LOG ?= gpu_check.log
gpu-check: $(STAMP)
	$(PY) gpu_check.py --gpu $(GPU) --log $(GPU_LOG)

# The whole pipeline on the synthetic shapes set, on CPU, in minutes. Each line is the command a
# user would type; re-running resumes unfinished stages and skips finished ones.
# FID/IS run when the Inception weights are available: INCEPTION_WEIGHTS=/path/to/file.pth
DEMO_OUT := output/demo
DEMO_GEN := output/shapes_DMGAN/valid/single
INCEPTION_WEIGHTS ?=
WEIGHTS_ARG := $(if $(INCEPTION_WEIGHTS),--weights $(INCEPTION_WEIGHTS),)

demo: $(STAMP)
	$(PY) prepare_data.py shapes --out data/shapes
	$(PY) pretrain_DAMSM.py --cfg cfg/DAMSM/shapes.yml
	$(PY) main.py --cfg cfg/clip_shapes_DMGAN.yml
	$(PY) main.py --cfg cfg/eval_clip_shapes.yml
	mkdir -p $(DEMO_OUT)
	$(PY) fid_score.py --data shapes --dims 2048 --allow-few-images --isc --json $(WEIGHTS_ARG) \
		> $(DEMO_OUT)/fid.tmp && mv $(DEMO_OUT)/fid.tmp $(DEMO_OUT)/fid.json \
		|| (rm -f $(DEMO_OUT)/fid.tmp; echo "FID/IS skipped (see the message above)")
	$(PY) report.py --stage1 cfg/DAMSM/shapes.yml --stage2 cfg/clip_shapes_DMGAN.yml \
		--fid $(DEMO_OUT)/fid.json --out $(DEMO_OUT)

# CLIP-GEN on the same set (README "Quick start"): the tokenizer, the token cache, the transformer,
# the test split prompted with text and with image embeddings, and the report with DM-GAN beside
# it (DM-GAN's column is filled when `make demo` has run). Stage 1 (the CLIP encoder both use)
# is trained here only when `make demo` has not already done it. The image-embedding upper
# bound draws 500 of the 2000 test pairs (seeded), which keeps the demo within 10 minutes.
CLIPGEN_CFG := cfg/clipgen_shapes.yml

demo-clipgen: $(STAMP)
	$(PY) prepare_data.py shapes --out data/shapes
	$(PY) pretrain_DAMSM.py --cfg cfg/DAMSM/shapes.yml
	$(PY) train_vqgan.py --cfg cfg/VQGAN/shapes.yml
	$(PY) train_clipgen.py --cfg $(CLIPGEN_CFG)
	$(PY) train_clipgen.py --cfg $(CLIPGEN_CFG) --eval --set CLIPGEN.CONDITION=image \
		--set EVAL.NUM_IMAGES=500
	mkdir -p $(DEMO_OUT)
	$(PY) fid_score.py --cfg $(CLIPGEN_CFG) --dims 2048 --allow-few-images --isc --json \
		$(WEIGHTS_ARG) > $(DEMO_OUT)/fid_clipgen.tmp \
		&& mv $(DEMO_OUT)/fid_clipgen.tmp $(DEMO_OUT)/fid_clipgen.json \
		|| (rm -f $(DEMO_OUT)/fid_clipgen.tmp; echo "FID/IS skipped (see the message above)")
	$(PY) report.py --stage1 cfg/DAMSM/shapes.yml --stage2 cfg/clip_shapes_DMGAN.yml \
		--fid $(DEMO_OUT)/fid.json --clipgen $(CLIPGEN_CFG) \
		--clipgen-fid $(DEMO_OUT)/fid_clipgen.json --out $(DEMO_OUT)

# README's picture (assets/shapes_side_by_side.png): the same test captions drawn by the two
# generators the demos trained
picture: $(STAMP)
	$(PY) assets/side_by_side.py

# The page that draws a typed caption with both generators (README "Try it in a browser"), on
# 127.0.0.1:$(PORT). Its packages (gradio) come from requirements-app.txt, apart from training's.
APP_STAMP := $(VENV)/.app-installed
PORT ?= 7860
DMGAN_RUN ?= output/shapes_DMGAN
CLIPGEN_RUN ?= output/shapes_CLIPGEN

$(APP_STAMP): $(STAMP) requirements-app.txt
	$(PY) -m pip install -q -r requirements-app.txt
	touch $(APP_STAMP)

app-deps: $(APP_STAMP)

app: $(APP_STAMP)
	$(PY) app.py --dmgan $(DMGAN_RUN) --clipgen $(CLIPGEN_RUN) --port $(PORT)
