#!/usr/bin/env bash
# Where the CPU of the two `rampart proxy` processes of benches/mtls-pair goes, per request:
# user space against kernel, and which system calls. Two phases against the same pair:
#   1. `wrk -c CONNS` for SECONDS with nothing attached: each proxy's CPU per request from
#      /proc/PID/stat (utime+stime before and after, divided by wrk's request count);
#   2. the same load under `perf record -e cpu-clock -g` on both proxies: each proxy's share
#      of samples in the kernel, in libc and in the `rampart` binary, and the system calls
#      under the kernel share (children of `do_syscall_64`).
# Multiplying phase 1 by phase 2's shares gives microseconds per request in each part.
# Run it on an otherwise idle machine (phase 1 is a CPU-time figure).
#
# Usage: benches/profile/pair-perf.sh [--bin target/release/rampart] [--secs 10] [--conns 32]
#                                     [--port-offset 0] [--out DIR] [--call-graph fp|dwarf]
# Needs nginx, wrk and perf. --port-offset moves every port of the pair as in
# proxy-memory.sh. --out: where the perf.data files and reports stay (default: a new
# /tmp/pair-perf-out.* directory, kept). --call-graph dwarf unwinds user-space stacks through
# code built without frame pointers (bigger perf.data, slower reports); with inferno
# (`cargo install inferno`) on PATH, a flame graph of each proxy is written to OUT/PROXY.svg.
set -u
here=$(cd "$(dirname "$0")" && pwd); root=$(cd "$here/../.." && pwd)
bin=$root/target/release/rampart secs=10 conns=32 off=0 out= cg=fp
while [ $# -gt 0 ]; do
  case "$1" in
    --bin) bin=$2; shift 2 ;;
    --secs) secs=$2; shift 2 ;;
    --conns) conns=$2; shift 2 ;;
    --port-offset) off=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --call-graph) cg=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
bin=$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")
[ -x "$bin" ] || { echo "no binary at $bin (cargo build --release --bin rampart)" >&2; exit 2; }
for c in nginx wrk perf; do command -v $c >/dev/null || { echo "needs $c" >&2; exit 2; }; done
W=$(mktemp -d /tmp/pair-perf.XXXXXX)
[ -n "$out" ] || out=$(mktemp -d /tmp/pair-perf-out.XXXXXX)
mkdir -p "$out"
up_pid="" nginx_pid=""
cleanup() {
  if [ -n "$up_pid" ]; then
    kill -TERM "$up_pid" 2>/dev/null
    for _ in $(seq 100); do kill -0 "$up_pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$up_pid" 2>/dev/null; wait "$up_pid" 2>/dev/null
  fi
  [ -n "$nginx_pid" ] && kill "$nginx_pid" 2>/dev/null
  sleep 0.3; rm -rf "$W"
}
trap cleanup EXIT INT TERM
bport=$((18080 + off)) uport=$((26001 + off))
mkdir -p "$W/mesh" "$W/nginx/logs"
for f in mesh.yaml workloads.yaml; do
  perl -pe 's/\b(18080|18099|25000|25001|25002|25013|25081|25082|26001)\b/$1+'"$off"'/ge' \
    "$root/benches/mtls-pair/$f" >"$W/mesh/$f"
done
cat > "$W/nginx/nginx.conf" <<NGX
worker_processes 1; daemon off; user root; error_log $W/nginx/logs/error.log warn; pid $W/nginx/nginx.pid;
events { worker_connections 4096; }
http {
  access_log off; keepalive_requests 1000000; keepalive_timeout 120s;
  client_body_temp_path $W/nginx/b; proxy_temp_path $W/nginx/p; fastcgi_temp_path $W/nginx/f; uwsgi_temp_path $W/nginx/u; scgi_temp_path $W/nginx/s;
  server { listen 127.0.0.1:$bport; location / { default_type text/plain; return 200 "ok\n"; } }
}
NGX
nginx -c "$W/nginx/nginx.conf" -p "$W/nginx" & nginx_pid=$!
get_ok() { curl -s -m 5 -H 'Host: backend.bench:8080' http://127.0.0.1:$uport/ 2>/dev/null | grep -qx ok; }
RUST_LOG=warn "$bin" up "$W/mesh" --state-dir "$W/state" >"$W/up.log" 2>&1 & up_pid=$!
for _ in $(seq 300); do get_ok && break; sleep 0.2; done
get_ok || { echo "the pair did not come up:" >&2; tail -20 "$W/up.log" >&2; exit 1; }
proxy_pid() { pgrep -P "$up_pid" -f -- "proxy --mesh .* --workload bench/$1( |\$)" | head -1; }
back=$(proxy_pid backend) client=$(proxy_pid client)
[ -n "$back" ] && [ -n "$client" ] || { echo "proxy processes not found" >&2; exit 1; }
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)
load() { # SECONDS -> prints wrk's request count
  wrk -t 2 -c "$conns" -d "${1}s" -H 'Host: backend.bench:8080' "http://127.0.0.1:$uport/" >"$W/wrk.out" 2>&1
  awk '/requests in/ {print $1}' "$W/wrk.out"
}
load 3 >/dev/null # warm-up
printf '# %s, binary %s (%s), wrk -c %s, %s s per phase\n' "$(date -u +%FT%TZ)" "$bin" \
  "$(git -C "$root" rev-parse --short HEAD 2>/dev/null)" "$conns" "$secs"
b0=$(ticks "$back") c0=$(ticks "$client")
n=$(load "$secs")
b1=$(ticks "$back") c1=$(ticks "$client")
awk -v n="$n" -v b=$((b1 - b0)) -v c=$((c1 - c0)) -v hz="$hz" -v s="$secs" 'BEGIN {
  printf "phase 1: %d requests (%.0f/s); CPU per request: client %.1f us, backend %.1f us, pair %.1f us\n",
    n, n / s, c * 1e6 / hz / n, b * 1e6 / hz / n, (b + c) * 1e6 / hz / n }' | tee "$out/cpu.txt"
# phase 2: the same load under perf
load "$secs" >"$W/n2" &
lp=$!
sleep 1
perf record -q -e cpu-clock -F 2000 --call-graph "$cg" -p "$back" -o "$out/backend.perf.data" -- sleep $((secs - 2)) 2>/dev/null &
p1=$!
perf record -q -e cpu-clock -F 2000 --call-graph "$cg" -p "$client" -o "$out/client.perf.data" -- sleep $((secs - 2)) 2>/dev/null &
p2=$!
wait $p1 $p2 $lp
for p in client backend; do
  data=$out/$p.perf.data
  perf report -i "$data" --no-children --sort dso -g none 2>/dev/null | grep -v '^#' | grep -v '^$' >"$out/$p.dso.txt"
  perf report -i "$data" --children --sort sym -g none 2>/dev/null | grep -v '^#' |
    grep -E '\[k\] (__x64_sys_[a-z_0-9]+|do_writev|do_readv|ksys_read|ksys_write|do_syscall_64|asm_common_interrupt|irqentry_exit_to_user_mode) *$' \
    >"$out/$p.kernel.txt"
  perf report -i "$data" --no-children --sort dso,sym -g none 2>/dev/null | grep -v '^#' | grep -v '^$' |
    head -40 >"$out/$p.top.txt"
  if command -v inferno-flamegraph >/dev/null && command -v inferno-collapse-perf >/dev/null; then
    perf script --no-inline -i "$data" 2>/dev/null | inferno-collapse-perf |
      inferno-flamegraph --minwidth 0.3 \
        --title "rampart proxy ($p), benches/mtls-pair, wrk -c $conns, perf cpu-clock, call graph $cg" \
        >"$out/$p.svg"
  fi
  echo "phase 2, $p: share of samples by object"
  sed 's/^/  /' "$out/$p.dso.txt" | head -6
  echo "phase 2, $p: kernel entry points (inclusive share of samples)"
  sed 's/^/  /' "$out/$p.kernel.txt" | sort -k1 -nr | head -10
done
echo "reports and perf.data in $out"
