#!/usr/bin/env bash
# The whole test suite: formatting, lints, then every test of every crate
# (the conformance suite starts real etcd 3.4 and our server on free loopback ports).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-deps.sh test
# Incremental caches double the disk a clean build needs and buy nothing on a one-off run.
if [[ -n "${CI:-}" ]]; then export CARGO_INCREMENTAL=0; fi
cargo fmt --all --check
bpf/build.sh --check                 # the committed eBPF object is what its source builds
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
