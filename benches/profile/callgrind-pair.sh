#!/usr/bin/env bash
# Instructions per request of each proxy of benches/mtls-pair, counted by callgrind: user-space
# instructions only (no kernel time), but the same count for the same binary and load whatever
# else the machine is doing, so two builds can be compared on a busy machine.
#
# The binary must be linked with GNU ld: valgrind 3.19 cannot read the symbols of what rustc's
# default lld writes, and then attributes everything to "???".
#   RUSTFLAGS="-C linker-features=-lld" CARGO_TARGET_DIR=target-prof \
#       cargo build --release --bin rampart
#   benches/profile/callgrind-pair.sh target-prof/release/rampart [SECONDS] [OUT_DIR]
#
# Path: wrk -c32 -> client proxy upstream port 26001 -> mTLS -> backend proxy -> nginx on
# 127.0.0.1:18080 (started here with a minimal config when nothing answers there). The CA and
# the node agents run natively; only the two proxies (and `rampart up` itself) run under
# callgrind. Counters are zeroed after a warm-up, so start-up is not counted.
set -eu
bin=$(realpath "${1:?usage: $0 BIN [SECONDS] [OUT_DIR]}")
secs=${2:-20}
out=${3:-$(mktemp -d /tmp/callgrind-pair.XXXXXX)}
here=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
W=$(mktemp -d /tmp/callgrind-pair-run.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$W"
}
trap cleanup EXIT INT TERM
for b in valgrind callgrind_control callgrind_annotate wrk nginx curl; do
  command -v $b >/dev/null || { echo "needs $b" >&2; exit 2; }
done
if ! curl -s -m 2 -o /dev/null http://127.0.0.1:18080/; then
  mkdir -p "$W/nginx/logs"
  cat > "$W/nginx/nginx.conf" <<EOF
worker_processes 1; daemon off; user root; error_log $W/nginx/logs/error.log warn; pid $W/nginx/nginx.pid;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  server { listen 127.0.0.1:18080; location / { default_type text/plain; return 200 "ok\n"; } } }
EOF
  nginx -c "$W/nginx/nginx.conf" -p "$W/nginx" >/dev/null 2>&1 & pids+=($!)
fi
RUST_LOG=warn valgrind --tool=callgrind --trace-children=yes \
  --trace-children-skip-by-arg='ca,agent' \
  --callgrind-out-file="$out/callgrind.%p" \
  "$bin" up "$here/mtls-pair" --state-dir "$W/state" >"$out/up.log" 2>&1 & pids+=($!)
for _ in $(seq 300); do
  curl -s -m 5 -o /dev/null http://127.0.0.1:26001/ && break
  sleep 1
done
curl -sf -m 5 -o /dev/null http://127.0.0.1:26001/ || { echo "pair not ready; see $out/up.log" >&2; exit 1; }
proxies=$(pgrep -f "valgrind.*rampart proxy" || true)
[ -n "$proxies" ] || proxies=$(pgrep -f "callgrind.*--workload" || true)
wrk -c 32 -t 2 -d 5s --timeout 60s http://127.0.0.1:26001/ >/dev/null
for p in $proxies; do callgrind_control -z "$p" >/dev/null; done
wrk -c 32 -t 2 -d "${secs}s" --timeout 60s http://127.0.0.1:26001/ | tee "$out/wrk.txt"
for p in $proxies; do callgrind_control -d "$p" >/dev/null; done
requests=$(awk '/requests in/ {print $1}' "$out/wrk.txt")
for f in "$out"/callgrind.*.1; do
  [ -s "$f" ] || continue
  who=$(grep -m1 '^cmd:' "$f" | grep -o -- '--workload [^ ]*' | cut -d' ' -f2)
  total=$(callgrind_annotate "$f" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",","",$1); print $1}')
  echo "$who: $total instructions over $requests requests = $((total / requests)) per request"
  callgrind_annotate --inclusive=yes "$f" 2>/dev/null | sed -n '/file:function/,$p' | head -40 \
    > "$out/top-$(basename "$who").txt"
done
echo "profiles and top functions in $out"
