#!/usr/bin/env bash
# What the backend `rampart proxy` of benches/mtls-pair keeps on the heap per idle connection,
# by allocation site: a valgrind massif profile of that one process (the CA, the node agents
# and the client proxy run natively), with detailed snapshots taken over vgdb before and after
# N idle keep-alive connections are held (benches/profile/hold-conns.py) and parked.
# Memory only, never time: massif slows the proxy down some 50x, which changes nothing here.
#
# Usage: benches/profile/proxy-heap.sh [--bin target/release/rampart] [--conns 500]
#                                      [--port-offset -4000] [--settle 15] [--top 25]
#                                      [--out DIR]
# Prints the heap before and after, the difference per connection, and the top allocation
# sites live after (bytes, then the first frames outside the allocator and the standard
# library, innermost first). DIR (default: a temporary one, removed) keeps the two massif
# snapshots for `ms_print`.
# --settle: seconds between the last response and the snapshot (the backend parks an idle
# HTTP/1.1 connection after 5 s, checked every 2.5 s: longer than that under massif).
set -u
here=$(cd "$(dirname "$0")" && pwd); root=$(cd "$here/../.." && pwd)
bin=$root/target/release/rampart n=500 off=-4000 settle=15 top=25 out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --bin) bin=$2; shift 2 ;;
    --conns) n=$2; shift 2 ;;
    --port-offset) off=$2; shift 2 ;;
    --settle) settle=$2; shift 2 ;;
    --top) top=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
bin=$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")
[ -x "$bin" ] || { echo "no binary at $bin (cargo build --release --bin rampart)" >&2; exit 2; }
for b in nginx valgrind vgdb python3 curl; do
  command -v $b >/dev/null || { echo "needs $b" >&2; exit 2; }
done
W=$(mktemp -d /tmp/proxy-heap.XXXXXX)
[ -n "$out" ] && mkdir -p "$out"
snaps=${out:-$W}
up_pid="" hold_pid="" nginx_pid=""
cleanup() {
  [ -n "$hold_pid" ] && kill "$hold_pid" 2>/dev/null
  if [ -n "$up_pid" ]; then
    kill -TERM "$up_pid" 2>/dev/null
    for _ in $(seq 300); do kill -0 "$up_pid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$up_pid" 2>/dev/null
  fi
  [ -n "$nginx_pid" ] && kill "$nginx_pid" 2>/dev/null
  wait 2>/dev/null
  rm -rf "$W"
}
trap cleanup EXIT INT TERM
mkdir -p "$W/mesh" "$W/nginx/logs"
for f in mesh.yaml workloads.yaml; do
  perl -pe 's/\b(18080|18099|25000|25001|25002|25013|25081|25082|26001)\b/$1+'"$off"'/ge' \
    "$root/benches/mtls-pair/$f" >"$W/mesh/$f"
done
bport=$((18080 + off)) uport=$((26001 + off))
ulimit -n "$(ulimit -Hn)" 2>/dev/null
cat >"$W/nginx/nginx.conf" <<NGX
worker_processes 1; daemon off; user root; error_log $W/nginx/logs/error.log warn; pid $W/nginx/nginx.pid;
events { worker_connections 16384; }
http { access_log off; keepalive_requests 1000000; keepalive_timeout 300s;
  client_body_temp_path $W/nginx/b; proxy_temp_path $W/nginx/p; fastcgi_temp_path $W/nginx/f; uwsgi_temp_path $W/nginx/u; scgi_temp_path $W/nginx/s;
  server { listen 127.0.0.1:$bport; location / { default_type text/plain; return 200 "ok\n"; } } }
NGX
nginx -c "$W/nginx/nginx.conf" -p "$W/nginx" & nginx_pid=$!
# Only the backend proxy runs under massif: valgrind skips every child with one of these
# arguments (the `up` process itself, first, is light).
RUST_LOG=warn valgrind --tool=massif --trace-children=yes \
  --trace-children-skip-by-arg='agent,ca,bench/client' --depth=40 --threshold=0.2 \
  --massif-out-file="$W/massif.%p" "$bin" up "$W/mesh" --state-dir "$W/state" \
  >"$W/up.log" 2>&1 & up_pid=$!
get_ok() { curl -s -m 5 -H 'Host: backend.bench:8080' "http://127.0.0.1:$uport/" 2>/dev/null | grep -qx ok; }
for _ in $(seq 300); do get_ok && break; sleep 1; done
get_ok || { echo "the pair did not come up:" >&2; tail -20 "$W/up.log" >&2; exit 1; }
vg=$(pgrep -f -- "valgrind.*proxy --mesh .* --workload bench/backend( |\$)" | head -1)
[ -n "$vg" ] || { echo "the backend proxy is not under valgrind" >&2; exit 1; }
for _ in $(seq 8); do get_ok; done
sleep 5
vgdb --pid="$vg" detailed_snapshot "$snaps/idle.massif" >/dev/null 2>&1
python3 "$here/hold-conns.py" 127.0.0.1 "$uport" "$n" backend.bench:8080 </dev/null >"$W/hold.out" 2>&1 & hold_pid=$!
for _ in $(seq 600); do grep -q '^held' "$W/hold.out" && break; kill -0 $hold_pid 2>/dev/null || break; sleep 1; done
grep -q '^held' "$W/hold.out" || { echo "holding $n connections failed:" >&2; cat "$W/hold.out" >&2; exit 1; }
sleep "$settle"
vgdb --pid="$vg" detailed_snapshot "$snaps/held.massif" >/dev/null 2>&1
printf '# %s, binary %s (%s), %s connections held\n' "$(date -u +%FT%TZ)" "$bin" \
  "$(git -C "$root" rev-parse --short HEAD 2>/dev/null)" "$n"
python3 - "$snaps/idle.massif" "$snaps/held.massif" "$n" "$top" <<'PY'
import re, sys

def tree(path):
    text = open(path).read()
    heap = int(re.search(r"mem_heap_B=(\d+)", text).group(1))
    lines = text.split("heap_tree=detailed\n", 1)[1].splitlines()
    nodes = []
    for l in lines:
        m = re.match(r"^( *)n(\d+): (\d+) (.*)$", l)
        if not m:
            break
        nodes.append((int(m.group(2)), int(m.group(3)), re.sub(r"^0x[0-9A-Fa-f]+: ", "", m.group(4))))
    pos = 0
    def parse():
        nonlocal pos
        k, b, s = nodes[pos]; pos += 1
        return (b, s, [parse() for _ in range(k)])
    return heap, parse()

# frames of the allocator, the standard library and async plumbing say nothing of the site
noise = re.compile(r"\(library/|alloc::|RawVec|finish_grow|__rust|__rdl|core::ptr|^alloc \(|^alloc_impl|^allocate \(|malloc/new")
idle, _ = tree(sys.argv[1])
held, root = tree(sys.argv[2])
n, top = int(sys.argv[3]), int(sys.argv[4])
sites = []
def walk(node, path):
    b, s, ch = node
    path = path + [s]
    if not ch:
        sites.append((b, path)); return
    rest = b - sum(c[0] for c in ch)
    for c in ch:
        walk(c, path)
    if rest > 0:
        sites.append((rest, path))
for c in root[2]:
    walk(c, [])
print(f"heap idle {idle} B, held {held} B: {(held - idle) / n:.0f} B per connection")
print(f"top {top} sites after (bytes, bytes per connection, innermost frames):")
for b, path in sorted(sites, key=lambda x: -x[0])[:top]:
    frames = [f for f in path if not noise.search(f)][:3]
    print(f"{b:>10} {b / n:>8.0f}  " + " <- ".join(f[:90] for f in frames))
PY
