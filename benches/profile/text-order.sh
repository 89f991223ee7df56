#!/usr/bin/env bash
# Regenerates build/text-order.txt, the symbol ordering file that build.rs hands to lld for
# release builds of the `rampart` binary (docs/PERFORMANCE.md, "Text ordering"): the functions a
# `rampart proxy` executes first, then those only the node agent executes, so that the code a
# proxy touches is contiguous at the start of .text instead of spread over all of it (the kernel
# maps up to 64 KiB around every faulting code page, so scattered code makes most of .text
# resident).
#
# The functions come from callgrind, which sees every function that runs (a sampling profiler
# misses the start-up code that runs once). valgrind 3.19 cannot read the symbols of an
# lld-linked binary, so profile a GNU-ld build of the same source; its mangled names are the
# lld build's (cargo leaves RUSTFLAGS out of -C metadata; checked with cargo 1.95):
#   RUSTFLAGS="-C linker-features=-lld" CARGO_TARGET_DIR=target-prof \
#       cargo build --release --bin rampart
#   benches/profile/text-order.sh target-prof/release/rampart [OUT]
# (build.rs leaves the ordering out of that build: its linker is not lld.)
#
# What runs: `rampart up benches/mtls-pair` with the two proxies and the node agent under
# callgrind (the CA natively), nginx as the backend app (started here when nothing answers on
# 127.0.0.1:18080), then what a proxy does in a workload's life: SDS start-up, 16 keep-alive
# connections through both proxies (benches/profile/hold-conns.py), single requests, wrk for a
# few seconds when installed, the admin endpoints a kubelet probe and a Prometheus scrape use,
# then SIGTERM (drain and exit). Functions are ordered by instructions executed (hottest first)
# within each group: proxy, then agent-only.
#
# Second stage, natively: callgrind's CPU has no SHA-NI, ADX or VPCLMULQDQ, so ring and libcrux
# take other code paths under it than on the machine, and timing-dependent paths differ too.
#   benches/profile/text-order.sh --native target/release/rampart [OUT]
# runs the same exercise with a release (lld) build that already uses OUT, records the
# proxies' and agents' page faults (perf record -e page-faults -d), and appends each function
# whose code page faulted outside its group to that group. A fault is only the first touch of
# a 64 KiB window, so rebuild and repeat until it adds nothing (a relink is enough:
# `cargo rustc --release --bin rampart -- -C save-temps --print link-args` prints the link
# command, which can be rerun with the new file).
#
# Stale names (after code changes) are harmless: lld skips symbols it does not find
# (--no-warn-symbol-ordering), the binary is only laid out less well; rerun this script.
set -eu
native=
[ "${1:-}" = --native ] && { native=1; shift; }
bin=$(realpath "${1:?usage: $0 [--native] RAMPART_BINARY [OUT]}")
here=$(cd "$(dirname "$0")" && pwd); root=$(cd "$here/../.." && pwd)
out=${2:-$root/build/text-order.txt}
need="curl nginx python3 nm"
if [ -n "$native" ]; then need="$need perf"; else need="$need valgrind callgrind_control"; fi
for b in $need; do
  command -v $b >/dev/null || { echo "needs $b" >&2; exit 2; }
done
lld=$(readelf -p .comment "$bin" 2>/dev/null | grep -c 'Linker: LLD' || true)
if [ -z "$native" ] && [ "$lld" != 0 ]; then
  echo "$bin is linked with lld, which valgrind 3.19 cannot read; build it with" \
    'RUSTFLAGS="-C linker-features=-lld"' >&2
  exit 2
fi
if [ -n "$native" ] && [ ! -s "$out" ]; then
  echo "--native adds to an existing $out; run the callgrind stage first" >&2
  exit 2
fi
W=$(mktemp -d /tmp/text-order.XXXXXX)
pids=() up_pid=""
cleanup() {
  [ -n "$up_pid" ] && kill -TERM "$up_pid" 2>/dev/null
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [ -n "${KEEP:-}" ] && cp -a "$W/cg" "$KEEP"; rm -rf "$W"
}
trap cleanup EXIT INT TERM
if ! curl -s -m 2 -o /dev/null http://127.0.0.1:18080/; then
  mkdir -p "$W/nginx/logs"
  cat >"$W/nginx/nginx.conf" <<EOF
worker_processes 1; daemon off; user root; error_log $W/nginx/logs/error.log warn; pid $W/nginx/nginx.pid;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  client_body_temp_path $W/nginx/b; proxy_temp_path $W/nginx/p; fastcgi_temp_path $W/nginx/f; uwsgi_temp_path $W/nginx/u; scgi_temp_path $W/nginx/s;
  server { listen 127.0.0.1:18080; location / { default_type text/plain; return 200 "ok\n"; } } }
EOF
  nginx -c "$W/nginx/nginx.conf" -p "$W/nginx" >/dev/null 2>&1 & pids+=($!)
fi
mkdir -p "$W/cg"
if [ -n "$native" ]; then
  # every process's page faults, with the faulting address
  wrap=(perf record -q -e page-faults -c 1 -d -o "$W/faults.data" --)
else
  # every process but the CA under callgrind (`rampart up` too; its profile is not used)
  wrap=(valgrind --tool=callgrind --demangle=no --trace-children=yes
    --trace-children-skip-by-arg='ca' --callgrind-out-file="$W/cg/callgrind.%p")
fi
RUST_LOG=warn "${wrap[@]}" "$bin" up "$root/benches/mtls-pair" --state-dir "$W/state" \
  >"$W/up.log" 2>&1 & up_pid=$!
get_ok() { curl -s -m 10 -H 'Host: backend.bench:8080' http://127.0.0.1:26001/ 2>/dev/null | grep -qx ok; }
for _ in $(seq 300); do get_ok && break; kill -0 "$up_pid" 2>/dev/null || break; sleep 1; done
get_ok || { echo "the pair did not come up:" >&2; tail -20 "$W/up.log" >&2; exit 1; }
echo "pair up; exercising it" >&2
for _ in $(seq 20); do get_ok || true; done
python3 "$here/hold-conns.py" 127.0.0.1 26001 16 backend.bench:8080 </dev/null >"$W/hold.out" 2>&1 & h=$!
for _ in $(seq 240); do grep -q '^held' "$W/hold.out" && break; kill -0 $h 2>/dev/null || break; sleep 0.5; done
kill $h 2>/dev/null; wait $h 2>/dev/null || true
if command -v wrk >/dev/null; then
  wrk -c 8 -t 1 -d 5s --timeout 30s -H 'Host: backend.bench:8080' http://127.0.0.1:26001/ >/dev/null
fi
for port in 25000 25002; do
  for path in /ready /stats/prometheus; do curl -s -m 10 -o /dev/null "http://127.0.0.1:$port$path"; done
done
sleep 5
for role in proxy agent; do pgrep -f -- "^$bin $role " | sed "s/\$/ $role/"; done >"$W/roles"
if [ -z "$native" ]; then
  # dump each profile now, in case a process is killed rather than exiting at the end
  for p in $(pgrep -P "$up_pid"); do callgrind_control -d "$p" >/dev/null 2>&1 || true; done
fi
kill -TERM "$up_pid"
for _ in $(seq 120); do kill -0 "$up_pid" 2>/dev/null || break; sleep 1; done
wait "$up_pid" 2>/dev/null || true
up_pid=""
nm --defined-only "$bin" | awk '$2 ~ /^[tTwW]$/ {print $3}' | sort -u >"$W/text-symbols"
if [ -n "$native" ]; then
  # instruction fetches (ip == faulting address) in the binary, by process
  perf script --no-demangle -i "$W/faults.data" -F pid,ip,addr,sym,dso 2>/dev/null |
    awk -v exe="($bin)" '$2 == $5 && $7 == exe {print $1, $6}' >"$W/fetches"
  python3 - "$W/fetches" "$W/roles" "$W/text-symbols" "$out" <<'PY'
import sys
fetches, roles, symfile, out = sys.argv[1:5]
text = set(open(symfile).read().split())
role_of = dict(l.split() for l in open(roles))
head, groups, order = [], {}, []
cur = None
for line in open(out):
    line = line.rstrip("\n")
    if line.startswith("# ") and line[2:].split(":")[0] in ("proxy", "agent"):
        cur = line[2:].split(":")[0]
        groups[cur] = []
        order.append(cur)
    elif line.startswith("#") or not line:
        if cur is None:
            head.append(line)
    elif cur:
        groups[cur].append(line)
added = {"proxy": [], "agent": []}
for line in open(fetches):
    pid, sym = line.split(None, 1)
    sym = sym.strip()
    role = role_of.get(pid)
    if role not in groups or sym not in text or sym in groups[role] or sym in added[role]:
        continue
    if role == "agent" and sym in groups.get("proxy", []):
        continue
    added[role].append(sym)
for role, syms in added.items():
    groups[role].extend(syms)
    if role == "proxy":
        drop = set(syms)
        groups["agent"] = [s for s in groups.get("agent", []) if s not in drop]
with open(out, "w") as f:
    f.write("\n".join(head) + "\n")
    for role in order:
        f.write(f"# {role}: {len(groups[role])} functions, most instructions first, then those"
                " only the native run showed\n")
        f.write("".join(s + "\n" for s in groups[role]))
print(f"{out}: added " + ", ".join(f"{len(v)} {k}" for k, v in added.items()), file=sys.stderr)
PY
  exit 0
fi
python3 - "$W/cg" "$W/text-symbols" "$bin" "$out" <<'PY'
import collections, glob, os, re, sys
cgdir, symfile, binary, out = sys.argv[1:5]
text = set(open(symfile).read().split())
base = os.path.basename(binary)

def self_costs(path):
    """Self instruction counts per function of the binary in one callgrind output file."""
    names, objs, cost = {}, {}, collections.Counter()
    cur_ob = cur_fn = None
    skip_next = False
    def name(table, spec):
        m = re.match(r"\((\d+)\)(?: (.*))?$", spec)
        if not m:
            return spec
        if m.group(2) is not None:
            table[m.group(1)] = m.group(2)
        return table.get(m.group(1), "")
    for line in open(path, errors="replace"):
        line = line.rstrip("\n")
        if skip_next:  # the cost line after calls= is the callee's inclusive cost
            skip_next = False
            continue
        if line.startswith("ob="):
            cur_ob = name(objs, line[3:])
        elif line.startswith("cob="):
            name(objs, line[4:])
        elif line.startswith("fn="):
            cur_fn = name(names, line[3:]) if os.path.basename(cur_ob or "") == base else None
            if cur_fn is None:
                name(names, line[3:])
        elif line.startswith("cfn="):
            name(names, line[4:])
        elif line.startswith("calls="):
            skip_next = True
        elif cur_fn and line[:1] in "0123456789+-*":
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                cost[re.sub(r"'\d+$", "", cur_fn)] += int(parts[1])
    return cost

groups = {"proxy": collections.Counter(), "agent": collections.Counter()}
for path in sorted(glob.glob(os.path.join(cgdir, "callgrind.*"))):
    with open(path, errors="replace") as f:
        cmd = next((l for l in f if l.startswith("cmd:")), "")
    args = cmd.split()
    role = "proxy" if "proxy" in args else "agent" if "agent" in args else None
    if role:
        groups[role].update(self_costs(path))
if not groups["proxy"]:
    sys.exit("no proxy profile found")
seen, lines = set(), []
for role in ("proxy", "agent"):
    picked = [f for f, c in groups[role].most_common() if c > 0 and f in text and f not in seen]
    seen.update(picked)
    lines.append(f"# {role}: {len(picked)} functions, most instructions first")
    lines.extend(picked)
os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
with open(out, "w") as f:
    f.write("# lld --symbol-ordering-file for release builds of `rampart` (build.rs).\n"
            "# Generated by benches/profile/text-order.sh; regenerate after larger code changes.\n")
    f.write("\n".join(lines) + "\n")
print(f"{out}: " + ", ".join(l[2:] for l in lines if l.startswith("# ")), file=sys.stderr)
PY
