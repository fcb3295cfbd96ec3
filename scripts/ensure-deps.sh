#!/usr/bin/env bash
# Makes sure the Debian packages the build and the tests need are present.
# As root it installs what is missing; otherwise it names exactly what to install.
# Usage: scripts/ensure-deps.sh build|demo|test
set -euo pipefail

need=(protobuf-compiler)                       # etcd-client's build script runs protoc
if [[ "${1:-build}" == demo ]]; then
  need+=(iproute2 util-linux nftables)         # clustermesh dev: network namespaces, nsenter, dev cut
fi
if [[ "${1:-build}" == test ]]; then
  need+=(etcd-server etcd-client)              # the conformance suite runs against real etcd 3.4
  need+=(clang libbpf-dev bpftool)             # bpf/build.sh --check; the layout test reads BTF
  need+=(iproute2 util-linux nftables)         # datapath tests: namespaces, nsenter; e2e: dev cut
fi

missing=()
for pkg in "${need[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
[[ ${#missing[@]} -eq 0 ]] && exit 0

if [[ $(id -u) -eq 0 ]]; then
  echo "installing missing Debian packages: ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
else
  echo "missing Debian packages: ${missing[*]}" >&2
  echo "install them with: sudo apt-get install -y ${missing[*]}" >&2
  exit 1
fi
