#!/usr/bin/env bash
# CA CPU per certificate from /proc (issue #15 item 3): a release `rampart ca` (self-signed,
# bearer-token callers, audit log with group commit) driven over TLS by `rampart ca bench`,
# a separate process whose CPU is not counted; `ca bench --pid` reads the CA's utime+stime
# before and after the run. Beside it, in the same run, the floor: ring's P-256 verify of a
# CSR + P-256 sign of a TBS certificate, in a bare loop (citadel/examples/ca_floor.rs).
#
#   cargo build --release --bin rampart
#   cargo build --release -p rampart-citadel --example ca_floor
#   benches/profile/ca-cpu.sh [SECONDS] [CONNECTIONS] [IN_FLIGHT]
#
# Run it on an otherwise idle machine: CPU time per operation grows when other processes
# share the cores' caches.
set -euo pipefail
secs=${1:-5}; conns=${2:-2}; inflight=${3:-64}
root=$(cd "$(dirname "$0")/../.." && pwd)
bin=${RAMPART_BIN:-$root/target/release/rampart}
floor=${CA_FLOOR_BIN:-$root/target/release/examples/ca_floor}
work=$(mktemp -d)
trap 'kill $ca_pid 2>/dev/null || true; rm -rf "$work"' EXIT
"$bin" token keygen --out "$work/iss.key" >/dev/null
"$bin" token jwks --key "$work/iss.key" > "$work/jwks.json"
"$bin" token issue --key "$work/iss.key" --issuer bench-iss --ns bench --sa load \
    --out "$work/token.jwt"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
# CA_CPUS / LOAD_CPUS (taskset lists, e.g. 0 and 1) pin the CA and the load generator to
# cores of their own, so that they do not share one core's caches.
ca_pin=(); load_pin=()
[ -n "${CA_CPUS:-}" ] && ca_pin=(taskset -c "$CA_CPUS")
[ -n "${LOAD_CPUS:-}" ] && load_pin=(taskset -c "$LOAD_CPUS")
RUST_LOG=warn "${ca_pin[@]}" "$bin" ca --listen "127.0.0.1:$port" --cacerts "$work/none" --state "$work/state" \
    --jwt-issuer bench-iss --jwks "$work/jwks.json" --bundle-out "$work/root.pem" \
    > "$work/ca.out" 2> "$work/ca.log" &
ca_pid=$!
for _ in $(seq 100); do grep -q "listening on" "$work/ca.out" 2>/dev/null && break; sleep 0.1; done
# Warm-up (connections, token cache, audit file), then the measured run.
"${load_pin[@]}" "$bin" ca bench --addr "127.0.0.1:$port" --ca-root "$work/root.pem" --token "$work/token.jwt" \
    --spiffe-id spiffe://cluster.local/ns/bench/sa/load --duration 1s \
    --connections "$conns" --concurrency "$inflight" --threads 1 >/dev/null
"${load_pin[@]}" "$bin" ca bench --addr "127.0.0.1:$port" --ca-root "$work/root.pem" --token "$work/token.jwt" \
    --spiffe-id spiffe://cluster.local/ns/bench/sa/load --duration "${secs}s" \
    --connections "$conns" --concurrency "$inflight" --threads 1 --pid "$ca_pid"
awk "{print \"CA utime \" \$14 \" stime \" \$15 \" (ticks, whole life)\"}" /proc/$ca_pid/stat
"$floor" floor 20000
