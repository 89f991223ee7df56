#!/usr/bin/env bash
# The candidate pair for ../../shared/bench/compare-mtls.sh, built from the real parts:
# `rampart up` on this folder runs `rampart ca`, one `rampart agent` per workload and the two
# `rampart proxy` processes. The backend app is the script's nginx on 127.0.0.1:18080, so the
# registry gives it no command. wrk -> 127.0.0.1:26001 (client proxy upstream port) -> mTLS ->
# backend proxy inbound 25081 -> nginx.
#
# Usage: benches/mtls-pair/run.sh                        real CA + node agents (default)
#        benches/mtls-pair/run.sh --standin [ARGS...]    the SDS stand-in instead
#            (proxy/examples/sds_standin.rs; e.g. --rotate-every 20 to push new certificates
#            every 20 s; build it with `cargo build --release -p rampart-proxy --examples`)
set -u
here=$(cd "$(dirname "$0")" && pwd); root=$(cd "$here/../.." && pwd)
bin=$root/target/release; W=$(mktemp -d /tmp/mtls-pair.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null; done; wait; rm -rf "$W"; }
trap cleanup EXIT INT TERM
export RUST_LOG=${RUST_LOG:-warn}
if [ "${1:-}" != "--standin" ]; then
  "$bin/rampart" up "$here" --state-dir "$W/state" & pids+=($!)
  wait
  exit
fi
shift
# MTLS_PAIR_CA: reuse a CA directory (e.g. to mint a client leaf for openssl s_time)
ca=${MTLS_PAIR_CA:-$W/ca}
[ -f "$ca/root-cert.pem" ] || "$bin/rampart" certs root --out "$ca" >/dev/null
"$bin/examples/sds_standin" --ca "$ca" \
  --serve "$W/backend.sock=spiffe://cluster.local/ns/bench/sa/backend" \
  --serve "$W/client.sock=spiffe://cluster.local/ns/bench/sa/client" "$@" & pids+=($!)
for s in backend client; do for _ in $(seq 50); do [ -S "$W/$s.sock" ] && break; sleep 0.1; done; done
"$bin/rampart" proxy --mesh "$here" --workload bench/backend --sds-socket "$W/backend.sock" & pids+=($!)
"$bin/rampart" proxy --mesh "$here" --workload bench/client --sds-socket "$W/client.sock" & pids+=($!)
wait
