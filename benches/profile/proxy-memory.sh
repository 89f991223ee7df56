#!/usr/bin/env bash
# Memory of the two `rampart proxy` processes of benches/mtls-pair: idle after start, and with
# N idle HTTP/1.1 keep-alive connections held through the client proxy's upstream port
# (127.0.0.1:26001 -> mTLS -> backend proxy inbound 25081 -> nginx on 127.0.0.1:18080), one
# request each. Memory only (never time: it does not depend on the machine's load).
#
# Usage: benches/profile/proxy-memory.sh [--bin target/release/rampart] [--conns '1000 5000']
#                                       [--port-offset 0] [--detail] [--settle 10]
#                                       [--second-batch]
# --detail also lists, for each proxy idle and held, its largest anonymous mappings (size and
# RSS in KiB: [heap] is the main malloc arena, 64 MiB-aligned ones are thread arenas, 2 MiB
# or 8 MiB ones with a guard page are thread stacks).
# --settle: seconds between the last connection's response and the "held" reading (default
# 10: the backend parks an HTTP/1.1 connection idle for 5 s, checked every 2.5 s, releasing
# its HTTP buffers and app connection; `--settle 3` reads before that, as runs before
# 2026-12-06 15:00 UTC did).
# --second-batch: after the "held" reading, open N more connections (kept with the first N),
# wait --settle again and read "held2"; "B/conn2" = (held2 - held) / N, the cost of N more
# idle connections in a process whose freed memory (parked connections' hyper buffers and app
# connections, which glibc keeps resident between live allocations) can be reused.
# --port-offset moves every port of the pair (CA 25013, proxies 25000-25082, upstream 26001,
# nginx 18080) by that much, so that it can run beside another copy of benches/mtls-pair.
#
# For each N the pair is started afresh (`rampart up benches/mtls-pair`: CA, node agents,
# proxies), warmed with 16 connections (closed again) so that one-time allocations (pools,
# metrics series, TLS session state) are not charged to connections, measured ("idle"), then
# N connections are opened and held (benches/profile/hold-conns.py), and measured again.
# Figures from /proc/PID/smaps_rollup, in KiB:
#   RSS   resident pages, including the shared clean text of the `rampart` binary
#   PSS   RSS with each shared page divided by the processes mapping it
#   USS   Private_Clean + Private_Dirty: what exiting the process would free
#   anon  anonymous memory (heap, stacks)
#   text  resident part of the binary's executable mapping (from smaps)
# and per connection: (held - idle) / N for USS and anon, in bytes.
set -u
here=$(cd "$(dirname "$0")" && pwd); root=$(cd "$here/../.." && pwd)
bin=$root/target/release/rampart conns="1000 5000" off=0 detail= settle=10 second=""

while [ $# -gt 0 ]; do
  case "$1" in
    --bin) bin=$2; shift 2 ;;
    --conns) conns=$2; shift 2 ;;
    --port-offset) off=$2; shift 2 ;;
    --detail) detail=1; shift ;;
    --settle) settle=$2; shift 2 ;;
    --second-batch) second=1; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
bin=$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")
[ -x "$bin" ] || { echo "no binary at $bin (cargo build --release --bin rampart)" >&2; exit 2; }
command -v nginx >/dev/null || { echo "needs nginx" >&2; exit 2; }
W=$(mktemp -d /tmp/proxy-memory.XXXXXX)
up_pid="" hold_pid="" hold2_pid="" nginx_pid=""
stop_pair() {
  [ -n "$hold_pid" ] && kill "$hold_pid" 2>/dev/null && wait "$hold_pid" 2>/dev/null; hold_pid=""
  [ -n "$hold2_pid" ] && kill "$hold2_pid" 2>/dev/null && wait "$hold2_pid" 2>/dev/null; hold2_pid=""
  if [ -n "$up_pid" ]; then
    kill -TERM "$up_pid" 2>/dev/null
    for _ in $(seq 100); do kill -0 "$up_pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$up_pid" 2>/dev/null; wait "$up_pid" 2>/dev/null
  fi
  up_pid=""
}
cleanup() { stop_pair; [ -n "$nginx_pid" ] && kill "$nginx_pid" 2>/dev/null; sleep 0.3; rm -rf "$W"; }
trap cleanup EXIT INT TERM
bport=$((18080 + off)) uport=$((26001 + off))
# The mesh folder, its ports moved by the offset.
mkdir -p "$W/mesh"
for f in mesh.yaml workloads.yaml; do
  perl -pe 's/\b(18080|18099|25000|25001|25002|25013|25081|25082|26001)\b/$1+'"$off"'/ge' \
    "$root/benches/mtls-pair/$f" >"$W/mesh/$f"
done
ulimit -n "$(ulimit -Hn)" 2>/dev/null
# The backend app: nginx answering 200 "ok\n" (as ../../shared/bench/compare-mtls.sh runs it).
# The backend proxy opens one app connection per downstream HTTP/1.1 connection: room for N.
mkdir -p "$W/nginx/logs"
cat > "$W/nginx/nginx.conf" <<NGX
worker_processes 1; daemon off; user root; error_log $W/nginx/logs/error.log warn; pid $W/nginx/nginx.pid;
events { worker_connections 16384; }
http {
  access_log off; keepalive_requests 1000000; keepalive_timeout 120s;
  client_body_temp_path $W/nginx/b; proxy_temp_path $W/nginx/p; fastcgi_temp_path $W/nginx/f; uwsgi_temp_path $W/nginx/u; scgi_temp_path $W/nginx/s;
  server { listen 127.0.0.1:$bport; location / { default_type text/plain; return 200 "ok\n"; } }
}
NGX
nginx -c "$W/nginx/nginx.conf" -p "$W/nginx" & nginx_pid=$!

# smaps_rollup fields of PID: "rss pss uss anon text" in KiB.
mem() {
  local pid=$1
  awk '/^Rss:/{r=$2} /^Pss:/{p=$2} /^Private_Clean:/{pc=$2} /^Private_Dirty:/{pd=$2} /^Anonymous:/{a=$2}
       END{printf "%d %d %d %d", r, p, pc+pd, a}' "/proc/$pid/smaps_rollup"
  # the executable mapping of the binary
  awk -v exe="$(readlink "/proc/$pid/exe")" '
    /^[0-9a-f]+-[0-9a-f]+ / {in_text = ($2 ~ /x/ && $6 == exe)}
    in_text && /^Rss:/ {t += $2} END{printf " %d\n", t}' "/proc/$pid/smaps"
}
# the anonymous mappings of PID with the most RSS: "size_kib rss_kib name"
anon_maps() {
  awk '/^[0-9a-f]+-[0-9a-f]+ /{split($1,a,"-"); name=($6==""?"anon":$6); size=0; file=($6!="" && $6 !~ /^\[/)}
       /^Size:/{size=$2} /^Rss:/{ if (!file && $2>0) printf "%8d %8d %s\n", size, $2, name }' "/proc/$1/smaps" |
    sort -k2 -nr | head -8
}
proxy_pid() { # WORKLOAD
  pgrep -P "$up_pid" -f -- "proxy --mesh .* --workload bench/$1( |\$)" | head -1
}
get_ok() { curl -s -m 5 -H 'Host: backend.bench:8080' http://127.0.0.1:$uport/ 2>/dev/null | grep -qx ok; }

start_pair() {
  rm -rf "$W/state"
  RUST_LOG=warn "$bin" up "$W/mesh" --state-dir "$W/state" >"$W/up.log" 2>&1 & up_pid=$!
  for _ in $(seq 300); do get_ok && break; sleep 0.2; done
  get_ok || { echo "the pair did not come up:" >&2; tail -20 "$W/up.log" >&2; exit 1; }
  back=$(proxy_pid backend) client=$(proxy_pid client)
  [ -n "$back" ] && [ -n "$client" ] || { echo "proxy processes not found" >&2; exit 1; }
  # warm-up: a few connections, closed again
  : >"$W/warm.out"
  python3 "$here/hold-conns.py" 127.0.0.1 "$uport" 16 backend.bench:8080 </dev/null >"$W/warm.out" 2>&1 & local w=$!
  for _ in $(seq 120); do grep -q '^held' "$W/warm.out" && break; sleep 0.5; done
  kill $w 2>/dev/null; wait $w 2>/dev/null
  sleep 2
}

printf '# %s, binary %s (%s)\n' "$(date -u +%FT%TZ)" "$bin" "$(git -C "$root" rev-parse --short HEAD 2>/dev/null)"
printf '%-8s %-7s %-10s %8s %8s %8s %8s %8s\n' proxy N state RSS PSS USS anon text
for n in $conns; do
  start_pair
  b0=($(mem "$back")); c0=($(mem "$client"))
  if [ -n "$detail" ]; then
    for p in client backend; do
      pid=$back; [ $p = client ] && pid=$client
      echo "# $p, idle: largest anonymous mappings (size KiB, RSS KiB); threads: $(ls /proc/$pid/task | wc -l)"
      anon_maps "$pid" | sed 's/^/#   /'
    done
  fi
  : >"$W/hold.out"
  python3 "$here/hold-conns.py" 127.0.0.1 "$uport" "$n" backend.bench:8080 </dev/null >"$W/hold.out" 2>&1 & hold_pid=$!
  for _ in $(seq 1200); do grep -q '^held' "$W/hold.out" && break; kill -0 $hold_pid 2>/dev/null || break; sleep 0.5; done
  grep -q '^held' "$W/hold.out" || { echo "holding $n connections failed:" >&2; cat "$W/hold.out" >&2; exit 1; }
  sleep "$settle"
  b1=($(mem "$back")); c1=($(mem "$client"))
  if [ -n "$detail" ]; then
    for p in client backend; do
      pid=$back; [ $p = client ] && pid=$client
      echo "# $p, $n held: largest anonymous mappings (size KiB, RSS KiB)"; anon_maps "$pid" | sed 's/^/#   /'
    done
  fi
  for p in client backend; do
    if [ $p = client ]; then a=("${c0[@]}") z=("${c1[@]}"); else a=("${b0[@]}") z=("${b1[@]}"); fi
    printf '%-8s %-7s %-10s %8d %8d %8d %8d %8d\n' $p "$n" idle "${a[@]}"
    printf '%-8s %-7s %-10s %8d %8d %8d %8d %8d\n' $p "$n" held "${z[@]}"
    printf '%-8s %-7s %-10s %8d %8d %8d %8d %8s\n' $p "$n" "B/conn" \
      $(( (z[0]-a[0])*1024/n )) $(( (z[1]-a[1])*1024/n )) $(( (z[2]-a[2])*1024/n )) $(( (z[3]-a[3])*1024/n )) -
  done
  if [ -n "$second" ]; then
    : >"$W/hold2.out"
    python3 "$here/hold-conns.py" 127.0.0.1 "$uport" "$n" backend.bench:8080 </dev/null >"$W/hold2.out" 2>&1 & hold2_pid=$!
    for _ in $(seq 1200); do grep -q '^held' "$W/hold2.out" && break; kill -0 $hold2_pid 2>/dev/null || break; sleep 0.5; done
    grep -q '^held' "$W/hold2.out" || { echo "holding $n more connections failed:" >&2; cat "$W/hold2.out" >&2; exit 1; }
    sleep "$settle"
    b2=($(mem "$back")); c2=($(mem "$client"))
    for p in client backend; do
      if [ $p = client ]; then a=("${c1[@]}") z=("${c2[@]}"); else a=("${b1[@]}") z=("${b2[@]}"); fi
      printf '%-8s %-7s %-10s %8d %8d %8d %8d %8d\n' $p "$n+$n" held2 "${z[@]}"
      printf '%-8s %-7s %-10s %8d %8d %8d %8d %8s\n' $p "$n" "B/conn2" \
        $(( (z[0]-a[0])*1024/n )) $(( (z[1]-a[1])*1024/n )) $(( (z[2]-a[2])*1024/n )) $(( (z[3]-a[3])*1024/n )) -
    done
  fi
  stop_pair
done
