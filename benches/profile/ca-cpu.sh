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
#
# SYSCALLS=1 (needs perf) also prints the CA's user and kernel time per certificate apart, and
# its system calls, context switches and `fdatasync`s (audit group commits) per certificate:
# `perf stat` attached to the CA for the length of the measured run.
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
measure=("${load_pin[@]}" "$bin" ca bench --addr "127.0.0.1:$port" --ca-root "$work/root.pem"
    --token "$work/token.jwt" --spiffe-id spiffe://cluster.local/ns/bench/sa/load --duration "${secs}s"
    --connections "$conns" --concurrency "$inflight" --threads 1 --pid "$ca_pid")
if [ -n "${SYSCALLS:-}" ]; then
  command -v perf >/dev/null || { echo "SYSCALLS=1 needs perf" >&2; exit 2; }
  read -r u0 k0 < <(awk '{print $14, $15}' "/proc/$ca_pid/stat")
  ev=raw_syscalls:sys_enter
  for c in read recvfrom write writev sendto epoll_wait futex fdatasync getrandom statx newfstat; do ev=$ev,syscalls:sys_enter_$c; done
  perf stat -x, -e "$ev,context-switches,cpu-migrations,page-faults" -p "$ca_pid" -o "$work/perf.stat" -- \
      "${measure[@]}" | tee "$work/bench.out"
  read -r u1 k1 < <(awk '{print $14, $15}' "/proc/$ca_pid/stat")
  n=$(awk '/^issued/ {print $2}' "$work/bench.out")
  awk -v u=$((u1 - u0)) -v k=$((k1 - k0)) -v t="$(getconf CLK_TCK)" -v n="${n:-0}" \
    'BEGIN{if (n > 0) printf "CA split: user %.1f + kernel %.1f us per certificate\n", u * 1e6 / t / n, k * 1e6 / t / n}'
  awk -F, -v n="${n:-0}" '$1 ~ /^[0-9]+$/ && n > 0 {
      e = $3; sub(/^(raw_)?syscalls:sys_enter_?/, "", e); sub(/:u$/, "", e); if (e == "") e = "all"
      line = line sprintf(" %s %.2f", e, $1 / n) }
    END { if (line != "") printf "CA per certificate:%s\n", line }' "$work/perf.stat"
else
  "${measure[@]}"
fi
awk "{print \"CA utime \" \$14 \" stime \" \$15 \" (ticks, whole life)\"}" /proc/$ca_pid/stat
"$floor" floor 20000
