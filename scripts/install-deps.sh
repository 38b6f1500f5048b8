#!/usr/bin/env bash
# Installs what the tests and the demo need, only when missing (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

need_apt=()
command -v etcd >/dev/null 2>&1 || need_apt+=(etcd-server)
command -v ip >/dev/null 2>&1 || need_apt+=(iproute2)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "install-deps: apt-get install ${need_apt[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

if ! $PY -c 'import etcd3, yaml, pytest, hypothesis, pyroute2, cni_ipam' >/dev/null 2>&1 \
   || ! $PY -c 'import cni_ipam, os, sys; sys.exit(0 if os.path.dirname(cni_ipam.__file__).startswith(os.getcwd()) else 1)' >/dev/null 2>&1; then
  echo "install-deps: pip install -e .[test]" >&2
  $PY -m pip install -q --disable-pip-version-check -e '.[test]'
fi
