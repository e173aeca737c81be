# Operator shortcuts. Variables can be overridden: make images REGISTRY=registry.example.org/ml
# Every target is a thin wrapper over a documented command (docs/cluster.md).

PYTHON       ?= .venv/bin/python
REGISTRY     ?= localhost:5000
# Read from the source, so that the tag is right without a virtual environment.
VERSION      ?= $(shell sed -n 's/^__version__ = "\(.*\)"$$/\1/p' src/veorl/__init__.py)
CODE_VERSION ?= $(shell git rev-parse HEAD 2>/dev/null || echo unknown)
CPU_IMAGE    ?= $(REGISTRY)/veorl:$(VERSION)-cpu
CUDA_IMAGE   ?= $(REGISTRY)/veorl:$(VERSION)-cuda
DOCKER       ?= docker
# submit: the KFP endpoint, the preset and extra `python -m pipelines.cli submit` flags (e.g. SUBMIT_ARGS="--set evaluate.episodes=20")
KFP_HOST     ?=
PRESET       ?= paper
SUBMIT_ARGS  ?=

.PHONY: help compile submit images image-cpu image-cuda images-local images-local-stop push test test-slow test-containers

help:
	@echo "make compile      compile the KFP pipeline to pipelines/veorl_pipeline.yaml (the checked-in file)"
	@echo "make images       build $(CPU_IMAGE) and $(CUDA_IMAGE) (needs a Docker daemon)"
	@echo "make images-local build $(CPU_IMAGE) with no registry in reach (installs and starts Docker if needed)"
	@echo "make images-local-stop   stop the Docker daemon images-local started"
	@echo "make push         push both images to $(REGISTRY)"
	@echo "make submit KFP_HOST=https://...   compile for the pushed images and start a run (token: \$$KFP_TOKEN)"
	@echo "make test         default test suite;  make test-slow: the slow ones (full local pipeline run)"
	@echo "make test-containers     the smoke pipeline in $(CPU_IMAGE) through kfp.local's DockerRunner"

compile:
	$(PYTHON) -m pipelines.cli compile

image-cpu:
	$(DOCKER) build -f docker/Dockerfile.cpu --build-arg VEORL_CODE_VERSION=$(CODE_VERSION) -t $(CPU_IMAGE) .

image-cuda:
	$(DOCKER) build -f docker/Dockerfile.cuda --build-arg VEORL_CODE_VERSION=$(CODE_VERSION) -t $(CUDA_IMAGE) .

images: image-cpu image-cuda

# The CPU image on a machine that reaches no registry: debootstrapped base, local torch wheel (scripts/images_local.sh).
images-local:
	IMAGE=$(CPU_IMAGE) VEORL_CODE_VERSION=$(CODE_VERSION) bash scripts/images_local.sh

images-local-stop:
	bash scripts/images_local.sh stop

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

test-containers:
	VEORL_IMAGE=$(CPU_IMAGE) $(PYTHON) -m pytest -m containers
