#!/usr/bin/env bash
# Installs what the tests, the e2e runtimes, the benchmarks and the demo need --
# only what is missing (idempotent, quiet).  Debian 12, root.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# command-or-file -> Debian package
declare -A APT=(
  [etcd]=etcd-server [etcdctl]=etcd-client [ip]=iproute2 [ping]=iputils-ping [openssl]=openssl
  [/usr/lib/cni/bridge]=containernetworking-plugins [go]=golang-go
  [/usr/share/gocode/src/github.com/containernetworking/cni/libcni/api.go]=golang-github-appc-cni-dev
  [containerd]=containerd [runc]=runc [podman]=podman [/bin/busybox]=busybox-static
  [iptables]=iptables [hyperfine]=hyperfine [/usr/bin/time]=time [setpriv]=util-linux
  [gcc]=gcc [/usr/include/stdio.h]=libc6-dev
)
need=()
for what in "${!APT[@]}"; do
  if [[ $what == /* ]]; then [ -e "$what" ] || need+=("${APT[$what]}")
  else command -v "$what" >/dev/null 2>&1 || need+=("${APT[$what]}"); fi
done
if [ ${#need[@]} -gt 0 ]; then
  echo "install-deps: apt-get install ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq "${need[@]}" >/dev/null
fi

# Prometheus (the controller's end-to-end metrics test) without its recommends (no exporters/daemons)
if ! command -v prometheus >/dev/null 2>&1; then
  echo "install-deps: apt-get install --no-install-recommends prometheus" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi

here=$(pwd)
if ! $PY -c 'import etcd3, yaml, pytest, xdist, hypothesis, pyroute2, PyInstaller, cri_api, kubernetes, prometheus_client' >/dev/null 2>&1 \
   || ! $PY -c "import cni_ipam, os, sys; sys.exit(0 if os.path.realpath(cni_ipam.__file__).startswith(os.path.realpath('$here') + '/') else 1)" >/dev/null 2>&1; then
  echo "install-deps: pip install -e .[test,dev,controller]" >&2
  $PY -m pip install -q --disable-pip-version-check --root-user-action=ignore -e '.[test,dev,controller]'
fi

# deploy/ manifests are validated against the Kubernetes API schemas it bundles (offline)
if ! $PY -c 'import kubernetes_validate' >/dev/null 2>&1; then
  echo "install-deps: pip install kubernetes-validate" >&2
  $PY -m pip install -q --disable-pip-version-check --root-user-action=ignore 'kubernetes-validate>=1.30'
fi

# the type checker `make typecheck` (part of `make test`) runs over cni_ipam/
if ! $PY -c 'import mypy' >/dev/null 2>&1; then
  echo "install-deps: pip install mypy" >&2
  $PY -m pip install -q --disable-pip-version-check --root-user-action=ignore 'mypy>=1.8'
fi
