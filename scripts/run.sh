#!/usr/bin/env bash
# Runs the embedded etcd-compatible store on 127.0.0.1:2379 with its data in ./kvstore.data.
# Extra arguments go to `kvstore serve` (see `--help`).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-deps.sh build
exec cargo run --release -p kvstore -- serve "$@"
