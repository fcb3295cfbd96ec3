#!/usr/bin/env bash
# The main job on the embedded default: a clustermesh-apiserver for cluster "a" that hosts its
# own etcd-compatible store on 127.0.0.1:2379 (data in ./clustermesh.data) and publishes the
# example cluster in clustermesh-apiserver/tests/fixtures/eu-1 (readiness and metrics on
# 127.0.0.1:9880). Extra arguments go to clustermesh-apiserver (see --help); for another
# cluster, run `cargo run -p clustermesh-apiserver -- --help` and pass your own flags.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-deps.sh build
exec cargo run --release -p clustermesh-apiserver -- \
  --cluster-name a --cluster-id 1 \
  --manifests clustermesh-apiserver/tests/fixtures/eu-1 "$@"
