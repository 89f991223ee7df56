#!/usr/bin/env bash
# The candidate pair for compare-mtls.sh: an SDS stand-in (proxy/examples/sds_standin.rs,
# until `rampart up`/`rampart agent` are on main) and two `rampart proxy` processes.
# Usage: benches/mtls-pair/run.sh [extra stand-in args, e.g. --rotate-every 20]
set -u
here=$(cd "$(dirname "$0")" && pwd); root=$(cd "$here/../.." && pwd)
bin=$root/target/release; W=$(mktemp -d /tmp/mtls-pair.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done; wait; rm -rf "$W"; }
trap cleanup EXIT INT TERM
# MTLS_PAIR_CA: reuse a CA directory (e.g. to mint a client leaf for openssl s_time)
ca=${MTLS_PAIR_CA:-$W/ca}
[ -f "$ca/root-cert.pem" ] || "$bin/rampart" certs root --out "$ca" >/dev/null
"$bin/examples/sds_standin" --ca "$ca" \
  --serve "$W/backend.sock=spiffe://cluster.local/ns/bench/sa/backend" \
  --serve "$W/client.sock=spiffe://cluster.local/ns/bench/sa/client" "$@" & pids+=($!)
for s in backend client; do for _ in $(seq 50); do [ -S "$W/$s.sock" ] && break; sleep 0.1; done; done
RUST_LOG=${RUST_LOG:-warn} "$bin/rampart" proxy --mesh "$here" --workload bench/backend --sds-socket "$W/backend.sock" & pids+=($!)
RUST_LOG=${RUST_LOG:-warn} "$bin/rampart" proxy --mesh "$here" --workload bench/client --sds-socket "$W/client.sock" & pids+=($!)
wait
