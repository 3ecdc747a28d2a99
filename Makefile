# The two commands a new user needs: `make demo` and `make test`.
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

install: $(INSTALL_STAMP)

$(INSTALL_STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@rm -f $(VENV)/.installed-* && touch $@

demo: install
	$(VENV)/bin/fedkube demo

# The reference peer: OpenFL 1.6 from PyPI in a virtualenv of its own (it pins protobuf<5).
openfl: $(OPENFL_STAMP)

$(OPENFL_STAMP):
	rm -rf $(OPENFL_VENV)
	$(PYTHON) -m venv $(OPENFL_VENV)
	$(OPENFL_VENV)/bin/pip install -q --upgrade pip
	# OpenFL 1.6's director calls np.reshape(newshape=...), gone in numpy 2.4: with a newer
	# numpy it refuses every experiment (benchmarks/round_processes.py found it).
	$(OPENFL_VENV)/bin/pip install -q 'openfl==1.6' 'numpy<2.1'
	touch $@

# The Kubernetes test control plane, built from Go modules and cached under $(CACHE).
testenv:
	bash tools/k8s-testenv/build.sh

# The fedkube image: `docker build` where Docker runs; else buildah, with no registry
# (tools/image/build.sh: also the Pod sandbox's pause, both cached as tars for containerd).
image:
	@if command -v docker >/dev/null && docker info >/dev/null 2>&1; then \
		echo docker build -f deploy/Dockerfile -t fedkube:$(VERSION) .; \
		docker build -f deploy/Dockerfile -t fedkube:$(VERSION) .; \
	else \
		$(MAKE) install && bash tools/image/build.sh; \
	fi

# The tests' control plane by hand (etcd, apiserver, controller-manager, scheduler, kwok).
dev-cluster: install testenv
	$(VENV)/bin/fedkube dev cluster up --dir .fedkube-cluster

# ruff, and the layers of .importlinter (which module may import which).
lint: install
	$(VENV)/bin/ruff check fedkube tests tools benchmarks examples
	$(VENV)/bin/lint-imports

typecheck: install
	$(VENV)/bin/mypy fedkube benchmarks tests

# The fast loop: no control plane, no OpenFL, no fedkube processes (`slow`).
unit: install
	$(VENV)/bin/pytest -m "not k8s and not compat and not slow" -q

# A real kubelet node for tests/k8s_node: its Debian packages (containerd, runc, CNI
# plugins, iptables, buildah, mmdebstrap), kubelet, kube-proxy and CoreDNS from Go modules,
# and the pause and fedkube images; each cached under $(CACHE), keyed on its inputs.
nodeenv: install testenv
	bash tools/k8s-testenv/host-packages.sh
	bash tools/k8s-testenv/build-node.sh
	bash tools/image/build.sh

test: install openfl testenv nodeenv lint typecheck
	FEDKUBE_OPENFL_PYTHON=$(OPENFL_VENV)/bin/python \
	KUBEBUILDER_ASSETS=$${KUBEBUILDER_ASSETS:-$$(bash tools/k8s-testenv/build.sh)/bin} \
	$(VENV)/bin/pytest -q

protos: install
	$(PY) tools/gen_protos.py

crds: install
	$(PY) -m fedkube.cli crds --out crds --out charts/fedkube/crds \
		--reference docs/crd-reference.md

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
plots: install
	$(PY) -m benchmarks.plot docs/benchmark-runs/*.json --out docs/benchmark-runs

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

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache demo-output
