#!/usr/bin/env bash
# Rebuilds the committed eBPF object from its C source. `cargo build` needs no clang because
# the object is committed; CI runs `bpf/build.sh --check` and fails when it is stale.
# -fdebug-compilation-dir=. keeps the build directory out of the debug info, so a fresh clone
# rebuilds the same bytes.
set -euo pipefail
cd "$(dirname "$0")/c"
out=mesh.bpf.o
if [[ "${1:-}" == --check ]]; then
  out=$(mktemp --suffix=.bpf.o)
  trap 'rm -f "$out"' EXIT
fi
clang -O2 -g -target bpf -Wall -Werror \
  -I/usr/include/x86_64-linux-gnu -fdebug-compilation-dir=. \
  -c mesh.bpf.c -o "$out"
if [[ "${1:-}" == --check ]]; then
  if ! cmp -s "$out" mesh.bpf.o; then
    echo "bpf/c/mesh.bpf.o is stale: run bpf/build.sh and commit the object" >&2
    exit 1
  fi
  echo "bpf/c/mesh.bpf.o is current"
fi
