#!/usr/bin/env bash
# The README's demo: two clusters on this machine (kind-configs/two-clusters.yaml), connected
# with `clustermesh connect`, checked with `clustermesh status --wait`, a global service
# answering from both clusters, and a failover: cluster b killed (a's clients move to a's
# backend) and revived. The environment stays up afterwards; `clustermesh dev down` removes it.
#
# As root with eBPF: network namespaces running the real apiservers with their embedded
# stores, kvstoremeshes and eBPF agents, every store behind mutual TLS, pods running echo
# servers, traffic counted per cluster. Without root or eBPF (or with DEMO_DATAPATH=none): the
# same daemons on loopback with the agents' datapath off (`dev up --datapath none`); the
# agents' merged service tables are shown instead of traffic.
set -euo pipefail
cd "$(dirname "$0")/.."

datapath="${DEMO_DATAPATH:-bpf}"
if [[ $datapath == bpf && $(id -u) -ne 0 ]]; then
  echo "not root: network namespaces, cgroups and eBPF programs need it (sudo bash scripts/demo.sh" >&2
  echo "shows traffic). Running the control plane alone instead: the agents' tables, no packets." >&2
  datapath=none
elif [[ $datapath == bpf && ! -e /sys/kernel/btf/vmlinux ]]; then
  echo "this kernel has no BTF (/sys/kernel/btf/vmlinux), which the eBPF datapath needs." >&2
  echo "Running the control plane alone instead: the agents' tables, no packets." >&2
  datapath=none
fi
if ! command -v cargo >/dev/null; then
  echo "demo.sh needs cargo (https://rustup.rs) on the PATH; as root with rustup in your home:" >&2
  echo "  sudo env PATH=\"\$PATH\" bash scripts/demo.sh" >&2
  exit 1
fi
if [[ $datapath == bpf ]]; then scripts/ensure-deps.sh demo; else scripts/ensure-deps.sh build; fi

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

step "build (cargo build --workspace: clustermesh and the daemons beside it)"
cargo build --workspace --bins --quiet
bin="${CARGO_TARGET_DIR:-target}/debug"
cm="$bin/clustermesh"
home="${CLUSTERMESH_HOME:-$HOME/.clustermesh}"

if [[ $datapath == bpf ]]; then
  step "two clusters, a and b: stores with TLS and per-cluster users, not connected yet"
else
  step "two clusters, a and b, control plane only: stores with TLS and per-cluster users on loopback, not connected yet"
fi
run "$cm" dev up -f kind-configs/two-clusters.yaml --datapath "$datapath"

step "connect them: each reads the other's store with its own remote identity"
run "$cm" connect --source a --destination b

step "wait until every peer is synced and every node connected"
run "$cm" status --wait --wait-duration 2m

step "the same app in both clusters: an echo backend behind the global service shop/echo, and a client"
for c in a b; do
  run "$cm" dev apply -c "$c" -f scripts/demo-app.yaml
done

# The node's agent API, from the cluster's context (dev up wrote it).
agent_of() { sed -n 's/^  api: http:\/\///p' "$home/contexts/two-clusters/$1.yaml" | head -1; }
# Prints cluster $1's agent's service table once shop/echo has backends of both clusters (or
# none of cluster $2, when given), and sets $vip to shop/echo's address.
table() {
  local agent table
  agent=$(agent_of "$1")
  for _ in $(seq 100); do
    table=$("$cm" agent services --api "$agent")
    if [[ -n ${2:-} ]]; then
      grep -q "shop/echo" <<<"$table" && ! grep "shop/echo" <<<"$table" | grep -q "($2)" && break
    else
      grep -q "(a).*(b)\|(b).*(a)" <<<"$table" && break
    fi
    sleep 0.2
  done
  printf '$ %s agent services --api %s\n%s\n' "$cm" "$agent" "$table"
  vip=$(awk '$2 == "shop/echo" {sub("/TCP", "", $1); print $1}' <<<"$table")
}
# 100 requests from cluster $1's client pod to $vip (with a datapath).
probe() {
  if [[ $datapath == bpf ]]; then
    step "cluster $1: 100 requests from its client pod to shop/echo at $vip"
    run "$cm" dev exec -c "$1" client -- "$bin/mesh-echo" probe --tcp "$vip" --count 100
    echo
  fi
}

for c in a b; do
  step "cluster $c: its agent's service table (backends from both clusters)"
  table "$c"
  probe "$c"
done

step "failover: every process of cluster b is killed (its store, kvstoremesh, agent and pods)"
run "$cm" dev kill -c b
run "$cm" status || true
step "a's agent withdraws b's backends after its grace (1 s): a's service table holds a's backend only"
sleep 2
table a b
probe a

step "b comes back: the same processes, restarted; b's backends are used again"
run "$cm" dev revive -c b
run "$cm" status --wait --wait-duration 2m
table a
probe a

step "done: the environment stays up"
if [[ $datapath == bpf ]]; then
  cat <<EOF
  $cm status                                   every cluster, peer and node
  $cm dev exec -c a client -- $bin/mesh-echo probe --tcp <vip> --count 100
  $cm disconnect --source a --destination b    a's client then reaches a's backend only
  $cm dev down                                 removes everything the demo made
EOF
else
  cat <<EOF
  $cm status                                   every cluster, peer and node
  $cm agent services --api $(agent_of a)    a's merged service table
  $cm disconnect --source a --destination b    a's table then holds a's backend only
  $cm dev down                                 removes everything the demo made
As root, sudo bash scripts/demo.sh runs the same with the eBPF datapath and real traffic.
EOF
fi
echo "Logs: $home/dev/two-clusters/logs/; more in docs/dev.md and docs/cli.md."
