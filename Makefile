PYTHON ?= python3
PYTEST_ARGS ?=
# two pytest workers (pytest-xdist); the e2e and chaos tests stay on one of them (tests/conftest.py)
PYTEST_JOBS ?= -n 2 --dist loadgroup

.PHONY: test deps demo unit help

help:
	@echo "make demo   - the seed's walkthrough on a throwaway etcd"
	@echo "make test   - install what is missing, type-check cni_ipam/ (mypy), run every test (starts its own etcd)"

deps:
	@PYTHON=$(PYTHON) bash scripts/install-deps.sh

test: deps typecheck
	$(PYTHON) -m pytest -q $(PYTEST_JOBS) $(PYTEST_ARGS)

# mypy over cni_ipam/ (config: [tool.mypy] in pyproject.toml; lenient, no strict mode)
.PHONY: typecheck
typecheck: deps
	$(PYTHON) -m mypy

unit: deps
	$(PYTHON) -m pytest -q $(PYTEST_JOBS) -m "not slow" $(PYTEST_ARGS)

# The seed's walkthrough for real (scripts/demo.py): throwaway etcd, apply conf/pools.yaml, annotate
# external-ns/internal-ns, three pods per namespace through containerd's CRI, table, show --blocks,
# teardown.  `binary` installs what is missing (deps) and builds or reuses dist/cni-ipam/cni-ipam.
demo: binary
	$(PYTHON) scripts/demo.py --binary dist/cni-ipam/cni-ipam $(DEMO_ARGS)

# Chaos (issue 8): 20 simulated nodes, >= 1,000 ADD/DEL through the plugin binary (built if stale)
# on a 3-member etcd cluster while the leader is killed, members are SIGSTOPped and plugin processes
# are SIGKILLed; invariants checked from etcd.  CHAOS_SEED=N replays a plan, CHAOS_OPS=N resizes,
# CNI_IPAM_PLUGIN=python|PATH picks another plugin.  A short version runs in `make test`.
.PHONY: chaos
chaos: deps
	$(PYTHON) -m tests.chaos --ops $(or $(CHAOS_OPS),1000) --plugin $(or $(CNI_IPAM_PLUGIN),binary)

# Packaging (issue 6): the PyInstaller binary (packaging/).  `make binary` -> dist/cni-ipam/cni-ipam
# (onedir: what ships; rebuilt only when the sources changed), `make binary-onefile` ->
# dist/cni-ipam-onefile (for comparison), `make install` -> bundle in $(CNI_LIB_DIR)/cni-ipam/<build>/,
# relative symlink $(CNI_BIN_DIR)/cni-ipam; no conflist unless asked
# (INSTALL_ARGS="--conflist conf/10-cni-ipam-bridge.conflist"; an existing conflist that differs is
# never overwritten: --force keeps a .bak).  `cni-ipam uninstall` removes what install wrote.
CNI_BIN_DIR ?= /opt/cni/bin
CNI_CONF_DIR ?= /etc/cni/net.d
CNI_LIB_DIR ?= /opt/cni/lib
INSTALL_ARGS ?=
.PHONY: binary binary-onefile binary-controller install
binary: deps
	$(PYTHON) packaging/build.py --if-stale -q

binary-onefile: deps
	$(PYTHON) packaging/build.py --mode onefile --if-stale -q

# dist/cni-ipam-controller/cni-ipam: the same CLI plus grpc/etcd3/kubernetes/prometheus_client, for
# `cni-ipam controller` (the image's /opt/cni-ipam-controller/, what deploy/controller.yaml runs)
binary-controller: deps
	$(PYTHON) packaging/build.py --flavor controller --if-stale -q

install: binary
	dist/cni-ipam/cni-ipam install --bin-dir $(CNI_BIN_DIR) --conf-dir $(CNI_CONF_DIR) --lib-dir $(CNI_LIB_DIR) $(INSTALL_ARGS)

# Benchmarks (issue 7): all six (engine vs bare CAS, exec vs Go host-local, burst, claim vs pool size,
# 20 nodes on a 3-member etcd, peak RSS), each starting its own etcd; tables + bench/results/*.json/png
# and the table in docs/performance.md.  Builds the binary first if stale (falls back to
# `python -m cni_ipam` if that fails).  BENCH_ARGS="exec burst" runs some; "--quick" fewer repetitions.
.PHONY: bench
bench: deps
	@$(MAKE) --no-print-directory binary || echo "bench: 'make binary' failed; benchmarking python -m cni_ipam instead" >&2
	@$(PYTHON) -c 'import matplotlib' 2>/dev/null || $(PYTHON) -m pip install -q --disable-pip-version-check --root-user-action=ignore 'matplotlib>=3.6'
	$(PYTHON) -m bench $(BENCH_ARGS)

# Container image (issue 14): FROM scratch + the onedir bundles (plugin at /opt/cni-ipam/, controller at
# /opt/cni-ipam-controller/) + the shared libraries ldd lists,
# built with podman under a private config (nothing pulled from a registry), saved as
# dist/cni-ipam-image.tar (`podman load -i` / `ctr -n k8s.io images import`), tagged
# localhost/cni-ipam:<version> as deploy/ names it.  `make e2e-deploy`: the DaemonSet's install
# container from that image under podman, pods through containerd, upgrade, uninstall.
.PHONY: image e2e-deploy
image: binary binary-controller
	$(PYTHON) packaging/image.py

e2e-deploy: deps
	$(PYTHON) -m pytest -q tests/e2e/test_deploy.py $(PYTEST_ARGS)
