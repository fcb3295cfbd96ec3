#!/usr/bin/env bash
# The whole test suite: formatting, lints, then every test of every crate
# (the conformance suite starts real etcd 3.4 and our server on free loopback ports).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-deps.sh test
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
