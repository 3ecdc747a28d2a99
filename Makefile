# The two commands a new user needs: `make demo` and `make test`; `make` alone lists them all.
# Everything installed or built is cached (.venv, ~/.cache/fedkube) and keyed on its inputs.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
CACHE ?= $(HOME)/.cache/fedkube
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
# Reinstall only when the dependency list changes.
INSTALL_STAMP := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-12)
OPENFL_VENV := $(CACHE)/openfl-1.6-venv
OPENFL_STAMP := $(OPENFL_VENV)/.installed

.PHONY: install demo test lint typecheck unit testenv nodeenv openfl protos crds clean bench bench-full plots dev-cluster image

# `make` alone lists the targets: each one's `## name: what it does` line above it.
.DEFAULT_GOAL := help
.PHONY: help
## help: this list (the default target)
help:
	@echo "make TARGET, where TARGET is one of:"
	@awk '/^## [a-z-]+: / { sub(/^## /, ""); i = index($$0, ":"); \
		printf "  %-12s %s\n", substr($$0, 1, i - 1), substr($$0, i + 2) }' $(MAKEFILE_LIST)

## install: .venv with fedkube and its test tools (3-4 minutes once, again on a new pyproject)
install: $(INSTALL_STAMP)

$(INSTALL_STAMP): pyproject.toml
	@echo "make install: .venv with fedkube and its test tools (3-4 minutes; pip is quiet)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@rm -f $(VENV)/.installed-* && touch $@

## demo: director + 3 envoys on digits shards, 20 rounds of FedAvg, vs a centralized baseline
demo: install
	$(VENV)/bin/fedkube demo

# The reference peer: OpenFL 1.6 from PyPI in a virtualenv of its own (it pins protobuf<5).
## openfl: OpenFL 1.6, the compatibility peer, in its own virtualenv (a few minutes once)
openfl: $(OPENFL_STAMP)

$(OPENFL_STAMP):
	@echo "make openfl: OpenFL 1.6 in $(OPENFL_VENV) (2-4 minutes; pip is quiet)"
	rm -rf $(OPENFL_VENV)
	$(PYTHON) -m venv $(OPENFL_VENV)
	$(OPENFL_VENV)/bin/pip install -q --upgrade pip
	# OpenFL 1.6's director calls np.reshape(newshape=...), gone in numpy 2.4: with a newer
	# numpy it refuses every experiment (benchmarks/round_processes.py found it).
	$(OPENFL_VENV)/bin/pip install -q 'openfl==1.6' 'numpy<2.1'
	touch $@

# The Kubernetes test control plane, built from Go modules and cached under $(CACHE).
## testenv: the Kubernetes control plane, built from Go modules (15-30 minutes once)
testenv:
	@echo "make testenv: the Kubernetes control plane (cached: instant; cold: 15-30 minutes of Go build)"
	bash tools/k8s-testenv/build.sh

# The fedkube image: `docker build` where Docker runs; else buildah, with no registry
# (tools/image/build.sh: also the Pod sandbox's pause, both cached as tars for containerd).
## image: the fedkube image fedkube:VERSION, with Docker or else buildah
image:
	@if command -v docker >/dev/null && docker info >/dev/null 2>&1; then \
		echo docker build -f deploy/Dockerfile -t fedkube:$(VERSION) .; \
		docker build -f deploy/Dockerfile -t fedkube:$(VERSION) .; \
	else \
		$(MAKE) install && bash tools/image/build.sh; \
	fi

# The tests' control plane by hand (etcd, apiserver, controller-manager, scheduler, kwok),
# in the background: it prints the `export` lines for its kubectl and helm; `fedkube dev
# cluster status` and `down` (docs/quickstart.md, section 4).
## dev-cluster: testenv, then `fedkube dev cluster up`: fake GPU nodes, in the background
dev-cluster: install testenv
	$(VENV)/bin/fedkube dev cluster up --dir .fedkube-cluster

# ruff, and the layers of .importlinter (which module may import which).
## lint: ruff, and the import layers of .importlinter
lint: install
	$(VENV)/bin/ruff check fedkube tests tools benchmarks examples
	$(VENV)/bin/lint-imports

## typecheck: mypy over fedkube, benchmarks and tests
typecheck: install
	$(VENV)/bin/mypy fedkube benchmarks tests

# The fast loop: no control plane, no OpenFL, no fedkube processes (`slow`).
## unit: the fast loop: no control plane, no OpenFL, no fedkube processes (seconds)
unit: install
	$(VENV)/bin/pytest -m "not k8s and not compat and not slow" -q

# A real kubelet node for tests/k8s_node: its Debian packages (containerd, runc, CNI
# plugins, iptables, buildah, mmdebstrap), kubelet, kube-proxy and CoreDNS from Go modules,
# and the pause and fedkube images; each cached under $(CACHE), keyed on its inputs.
## nodeenv: a real kubelet node for tests/k8s_node, and its images (root; about 6 minutes once)
nodeenv: install testenv
	@echo "make nodeenv: host packages, kubelet/kube-proxy/CoreDNS and the images (cached: seconds; cold: about 10 minutes)"
	bash tools/k8s-testenv/host-packages.sh
	bash tools/k8s-testenv/build-node.sh
	bash tools/image/build.sh

## test: lint, typecheck, every test; installs all they need (~27 min once, cold 2 cores)
test: install openfl testenv nodeenv lint typecheck
	FEDKUBE_OPENFL_PYTHON=$(OPENFL_VENV)/bin/python \
	KUBEBUILDER_ASSETS=$${KUBEBUILDER_ASSETS:-$$(bash tools/k8s-testenv/build.sh)/bin} \
	$(VENV)/bin/pytest -q

## protos: regenerate fedkube/proto from protos/
protos: install
	$(PY) tools/gen_protos.py

## crds: regenerate crds/, the chart's CRDs and docs/crd-reference.md
crds: install
	$(PY) -m fedkube.cli crds --out crds --out charts/fedkube/crds \
		--reference docs/crd-reference.md

## bench: the benchmarks, small sizes
bench: install openfl
	FEDKUBE_OPENFL_PYTHON=$(OPENFL_VENV)/bin/python $(PY) -m benchmarks.health_checks
	$(PY) -m benchmarks.aggregation --updates 8,32 --mib 64
	$(PY) -m benchmarks.transfer --mib 16,256
	$(PY) -m benchmarks.bulk_handshakes
	$(PY) -m benchmarks.model_save --mib 64,256
	$(PY) -m benchmarks.round_close --mib 64,256
	$(PY) -m benchmarks.round_latency --collaborators 8 --rounds 10
	FEDKUBE_OPENFL_PYTHON=$(OPENFL_VENV)/bin/python $(PY) -m benchmarks.round_processes \
		--envoys 8 --rounds 5

# The recorded runs behind docs/benchmarks.md, drawn again (each a benchmark's --json object).
## plots: redraw docs/benchmark-runs from its recorded runs
plots: install
	$(PY) -m benchmarks.plot docs/benchmark-runs/*.json --out docs/benchmark-runs

## bench-full: the benchmarks at the sizes of docs/benchmarks.md
bench-full: install openfl testenv
	FEDKUBE_OPENFL_PYTHON=$(OPENFL_VENV)/bin/python $(PY) -m benchmarks.health_checks \
		--envoys 1000,5000,10000,20000 --period 10,2
	$(PY) -m benchmarks.aggregation --updates 8,32,128 --mib 64,256
	$(PY) -m benchmarks.transfer --mib 16,64,256,1024
	$(PY) -m benchmarks.bulk_handshakes
	$(PY) -m benchmarks.model_save --mib 64,256,1024
	$(PY) -m benchmarks.round_close --mib 64,256,1024
	$(PY) -m benchmarks.round_latency --collaborators 8,32 --rounds 20
	FEDKUBE_OPENFL_PYTHON=$(OPENFL_VENV)/bin/python $(PY) -m benchmarks.round_processes \
		--envoys 32 --rounds 6
	$(PY) -m benchmarks.operator_scale --nodes 1000

## clean: remove .venv, the tools' caches and demo-output
clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache demo-output
