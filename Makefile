# Operator shortcuts. Variables can be overridden: make images REGISTRY=registry.example.org/ml
# Every target is a thin wrapper over a documented command (docs/cluster.md).

PYTHON       ?= .venv/bin/python
REGISTRY     ?= localhost:5000
VERSION      ?= $(shell $(PYTHON) -c "import veorl; print(veorl.__version__)")
CODE_VERSION ?= $(shell git rev-parse HEAD 2>/dev/null || echo unknown)
CPU_IMAGE    ?= $(REGISTRY)/veorl:$(VERSION)-cpu
CUDA_IMAGE   ?= $(REGISTRY)/veorl:$(VERSION)-cuda
DOCKER       ?= docker
# submit: the KFP endpoint, the preset and extra `python -m pipelines.cli submit` flags (e.g. SUBMIT_ARGS="--set evaluate.episodes=20")
KFP_HOST     ?=
PRESET       ?= paper
SUBMIT_ARGS  ?=

.PHONY: help compile submit images image-cpu image-cuda push test test-slow

help:
	@echo "make compile      compile the KFP pipeline to pipelines/veorl_pipeline.yaml (the checked-in file)"
	@echo "make images       build $(CPU_IMAGE) and $(CUDA_IMAGE) (needs a Docker daemon)"
	@echo "make push         push both images to $(REGISTRY)"
	@echo "make submit KFP_HOST=https://...   compile for the pushed images and start a run (token: \$$KFP_TOKEN)"
	@echo "make test         default test suite;  make test-slow: the slow ones (full local pipeline run)"

compile:
	$(PYTHON) -m pipelines.cli compile

image-cpu:
	$(DOCKER) build -f docker/Dockerfile.cpu --build-arg VEORL_CODE_VERSION=$(CODE_VERSION) -t $(CPU_IMAGE) .

image-cuda:
	$(DOCKER) build -f docker/Dockerfile.cuda --build-arg VEORL_CODE_VERSION=$(CODE_VERSION) -t $(CUDA_IMAGE) .

images: image-cpu image-cuda

push:
	$(DOCKER) push $(CPU_IMAGE)
	$(DOCKER) push $(CUDA_IMAGE)

submit:
	@test -n "$(KFP_HOST)" || { echo "set KFP_HOST, e.g. make submit KFP_HOST=https://kubeflow.example.org/pipeline"; exit 2; }
	$(PYTHON) -m pipelines.cli submit --host $(KFP_HOST) --preset $(PRESET) --image $(CPU_IMAGE) --gpu-image $(CUDA_IMAGE) $(SUBMIT_ARGS)

test:
	$(PYTHON) -m pytest

test-slow:
	$(PYTHON) -m pytest -m slow
