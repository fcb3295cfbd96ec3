#!/usr/bin/env bash
# The README's demo: two clusters on this machine (kind-configs/two-clusters.yaml: network
# namespaces running the real apiservers with their embedded stores, kvstoremeshes and eBPF
# agents, every store behind mutual TLS), connected with `clustermesh connect`, checked with
# `clustermesh status --wait`, a global service answering from both clusters, and a failover:
# cluster b killed (a's clients move to a's backend) and revived. The environment stays up
# afterwards; `clustermesh dev down` removes it.
# Needs root (network namespaces, cgroups, eBPF); installs missing Debian packages.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $(id -u) -ne 0 ]]; then
  echo "demo.sh needs root: it creates network namespaces, a bridge, cgroups and eBPF programs." >&2
  echo "run it as: sudo bash scripts/demo.sh" >&2
  exit 1
fi
if ! command -v cargo >/dev/null; then
  echo "demo.sh needs cargo (https://rustup.rs) on root's PATH; with rustup in your own home:" >&2
  echo "  sudo env PATH=\"\$PATH\" bash scripts/demo.sh" >&2
  exit 1
fi
scripts/ensure-deps.sh demo

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

step "build (cargo build --workspace: clustermesh and the daemons beside it)"
cargo build --workspace --bins --quiet
bin="${CARGO_TARGET_DIR:-target}/debug"
cm="$bin/clustermesh"

step "two clusters, a and b: stores with TLS and per-cluster users, not connected yet"
run "$cm" dev up -f kind-configs/two-clusters.yaml

step "connect them: each reads the other's store with its own remote identity"
run "$cm" connect --source a --destination b

step "wait until every peer is synced and every node connected"
run "$cm" status --wait --wait-duration 2m

step "the same app in both clusters: an echo backend behind the global service shop/echo, and a client"
for c in a b; do
  run "$cm" dev apply -c "$c" -f scripts/demo-app.yaml
done

for c in a b; do
  # The node's agent API, from the cluster's context (dev up wrote it).
  agent=$(sed -n 's/^  api: http:\/\///p' "${CLUSTERMESH_HOME:-$HOME/.clustermesh}/contexts/two-clusters/$c.yaml" | head -1)
  step "cluster $c: its agent's service table (backends from both clusters)"
  for _ in $(seq 50); do
    table=$("$cm" agent services --api "$agent")
    grep -q "(a).*(b)\|(b).*(a)" <<<"$table" && break
    sleep 0.2
  done
  printf '$ %s agent services --api %s\n%s\n' "$cm" "$agent" "$table"
  vip=$(awk '$2 == "shop/echo" {sub("/TCP", "", $1); print $1}' <<<"$table")
  if [[ $c == a ]]; then agent_a=$agent vip_a=$vip; fi
  step "cluster $c: 100 requests from its client pod to shop/echo at $vip"
  run "$cm" dev exec -c "$c" client -- "$bin/mesh-echo" probe --tcp "$vip" --count 100
  echo
done

step "failover: every process of cluster b is killed (its store, kvstoremesh, agent and pods)"
run "$cm" dev kill -c b
run "$cm" status || true
step "a's agent withdraws b's backends after its grace (5 s): a's client is answered by a"
sleep 6
run "$cm" dev exec -c a client -- "$bin/mesh-echo" probe --tcp "$vip_a" --count 100

step "b comes back: the same processes, restarted; traffic is shared again"
run "$cm" dev revive -c b
run "$cm" status --wait --wait-duration 2m
for _ in $(seq 50); do
  "$cm" agent services --api "$agent_a" | grep -q "(a).*(b)\|(b).*(a)" && break
  sleep 0.2
done
run "$cm" dev exec -c a client -- "$bin/mesh-echo" probe --tcp "$vip_a" --count 100

step "done: the environment stays up"
cat <<EOF
  $cm status                                   every cluster, peer and node
  $cm dev exec -c a client -- $bin/mesh-echo probe --tcp <vip> --count 100
  $cm disconnect --source a --destination b    a's client then reaches a's backend only
  $cm dev down                                 removes everything the demo made
Logs: ${CLUSTERMESH_HOME:-$HOME/.clustermesh}/dev/two-clusters/logs/; more in docs/dev.md and docs/cli.md.
EOF
