#!/usr/bin/env bash
# Regenerates build/text-order.txt, the symbol ordering file that build.rs hands to lld for
# release builds of the `rampart` binary (docs/PERFORMANCE.md, "Text ordering"), so that the
# code a `rampart proxy` touches is contiguous at the start of .text instead of spread over all
# of it (the kernel maps up to 64 KiB around every faulting code page, so scattered code makes
# most of .text resident). Three groups, each hottest first:
#   proxy   what the proxies of benches/mtls-pair execute (plain mTLS HTTP, no policy)
#   policy  what the proxies of examples/quickstart execute beyond that (outbound HTTP proxy,
#           RBAC, JWT, TCP)
#   agent   what the node agent executes beyond that
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
# Second stage, natively: callgrind's CPU has no SHA-NI, ADX or VPCLMULQDQ, so ring and libcrux
# take other code paths under it than on the machine, and timing-dependent paths differ too.
#   benches/profile/text-order.sh --native target/release/rampart [OUT]
# runs the same with a release (lld) build that already uses OUT, records the processes' page
# faults (perf record -e page-faults -d), and appends each function whose code page faulted
# outside the groups before it to its group. A fault is only the first touch of a 64 KiB
# window, so rebuild and repeat until it adds nothing (a relink is enough: `cargo rustc
# --release --bin rampart -- -C save-temps --print link-args` prints the link command, which
# reruns in a second with the new file).
#
# What runs (default ports; nginx as benches/mtls-pair's app, started here when nothing answers
# on 127.0.0.1:18080): `rampart up benches/mtls-pair` (proxies and node agents traced, not the
# CA): 20 requests, 16 keep-alive connections (hold-conns.py), wrk for 5 s when installed,
# /ready and /stats/prometheus of both admin ports, SIGTERM. Then `rampart up
# examples/quickstart` (proxies traced): the calls of its README (allowed, denied, JWT, TCP).
#
# `benches/profile/text-order.sh --check BIN [MAX_PERCENT]` counts the file's names BIN lacks
# and fails above MAX_PERCENT (5): .ci/run runs it on the release build.
#
# Stale names (after code changes) are harmless: lld skips symbols it does not find
# (--no-warn-symbol-ordering), the binary is only laid out less well; rerun this script.
set -eu
native=
if [ "${1:-}" = --check ]; then
  # --check BIN [MAX_PERCENT]: how many names of build/text-order.txt BIN lacks. Names go
  # stale when a crate's -C metadata changes (a dependency added or bumped renames every
  # generic function instantiated in it: 827 of 3,428 names after session 10, idle RSS ~6 MiB
  # higher, docs/PERFORMANCE.md); lld skips them silently and the proxies' code spreads over
  # .text again. Exits 1 above MAX_PERCENT (default 5): then regenerate the file as this
  # script's header says; 2 when it cannot tell (no file, no binary, no symbol table).
  # Ordinary edits rename some names too (closures renumbered, functions changed: 91 of
  # 3,363, 2.7%, after the ten commits of session 12), which the limit lets pass; a
  # dependency change renames far more.
  export LC_ALL=C
  bin=${2:?usage: $0 --check RAMPART_BINARY [MAX_PERCENT]} max=${3:-5}
  root=$(cd "$(dirname "$0")/../.." && pwd)
  file=$root/build/text-order.txt
  case "$max" in ''|*[!0-9]*) echo "MAX_PERCENT must be a whole number, not '$max'" >&2; exit 2 ;; esac
  command -v nm >/dev/null || { echo "needs nm (binutils)" >&2; exit 2; }
  [ -s "$file" ] || { echo "no $file" >&2; exit 2; }
  [ -f "$bin" ] || { echo "no binary at $bin" >&2; exit 2; }
  # lld's reading of the file: each line trimmed, '#' starts a comment.
  names=$(sed -e 's/\r$//' -e 's/#.*//' -e 's/^[[:space:]]*//' -e 's/[[:space:]]*$//' "$file" | grep . | sort -u)
  syms=$(nm --defined-only "$bin" 2>/dev/null | awk '{print $3}' | sort -u) || syms=
  if [ -z "$syms" ]; then
    echo "$bin has no symbol table (stripped? CARGO_PROFILE_RELEASE_STRIP?): cannot check" >&2
    exit 2
  fi
  listed=$(printf '%s\n' "$names" | grep -c .)
  absent=$(comm -23 <(printf '%s\n' "$names") <(printf '%s\n' "$syms"))
  # Fat LTO gives the out-of-line copies of one inline function from several crates names
  # ending in .N, numbered anew by almost any code change: those go stale on every edit and
  # are reported, not counted (each costs up to one 64 KiB window of resident code).
  bases=$(printf '%s\n' "$syms" | sed -E 's/\.[0-9]+$//' | sort -u)
  renumbered=$(printf '%s\n' "$absent" | awk 'NR == FNR { b[$0]; next }
    /\.[0-9]+$/ { n = $0; sub(/\.[0-9]+$/, "", n); if (n in b) c++ } END { print c + 0 }' \
    <(printf '%s\n' "$bases") -)
  missing=$(($(printf '%s\n' "$absent" | grep -c . || true) - renumbered))
  echo "build/text-order.txt: $missing of $listed names not in $bin (limit $max%);" \
    "$renumbered LTO copies renumbered (regenerate before measuring or releasing)"
  if [ $((missing * 100)) -gt $((max * listed)) ]; then
    echo "stale: regenerate it (benches/profile/text-order.sh, docs/PERFORMANCE.md \"Text ordering\")" >&2
    exit 1
  fi
  exit 0
fi
[ "${1:-}" = --native ] && { native=1; shift; }
bin=$(realpath "${1:?usage: $0 [--native] RAMPART_BINARY [OUT]}")
here=$(cd "$(dirname "$0")" && pwd); root=$(cd "$here/../.." && pwd)
out=${2:-$root/build/text-order.txt}
need="curl nginx python3 nm"
if [ -n "$native" ]; then need="$need perf"; else need="$need valgrind callgrind_control"; fi
for b in $need; do
  command -v $b >/dev/null || { echo "needs $b" >&2; exit 2; }
done
if [ -z "$native" ]; then
  # Can valgrind read this binary's symbols? (valgrind 3.19 could not read some lld-linked
  # builds; the lld-linked release build of 2026-12-07 it reads.) One short run tells.
  probe=$(mktemp /tmp/text-order-probe.XXXXXX)
  valgrind --tool=callgrind --callgrind-out-file="$probe" "$bin" --version >/dev/null 2>&1 || true
  if ! grep -q 'clap_builder' "$probe" 2>/dev/null; then
    rm -f "$probe"
    echo "valgrind cannot read the symbols of $bin; build it with GNU ld:" \
      'RUSTFLAGS="-C linker-features=-lld"' >&2
    exit 2
  fi
  rm -f "$probe"
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
  [ -n "${KEEP:-}" ] && cp -a "$W/cg" "$KEEP"
  rm -rf "$W"
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
: >"$W/roles"

pair_ok() { curl -s -m 10 -H 'Host: backend.bench:8080' http://127.0.0.1:26001/ 2>/dev/null | grep -qx ok; }
pair_load() {
  for _ in $(seq 20); do pair_ok || true; done
  python3 "$here/hold-conns.py" 127.0.0.1 26001 16 backend.bench:8080 </dev/null >"$W/hold.out" 2>&1 & h=$!
  for _ in $(seq 240); do grep -q '^held' "$W/hold.out" && break; kill -0 $h 2>/dev/null || break; sleep 0.5; done
  kill $h 2>/dev/null; wait $h 2>/dev/null || true
  if command -v wrk >/dev/null; then
    wrk -c 8 -t 1 -d 5s --timeout 30s -H 'Host: backend.bench:8080' http://127.0.0.1:26001/ >/dev/null
  fi
  for port in 25000 25002; do
    for path in /ready /stats/prometheus; do curl -s -m 10 -o /dev/null "http://127.0.0.1:$port$path"; done
  done
}
q() { curl -s -m 10 -o /dev/null -w '%{http_code}' -x http://127.0.0.1:15001 "$@" 2>/dev/null || true; }
quick_ok() { [ "$(q http://backend.api:8080/api/hello)" = 200 ]; }
quick_load() {
  local token
  token=$(cat "$W/state/demo-token.jwt" 2>/dev/null || true)
  for _ in 1 2 3; do
    q http://backend.api:8080/api/hello; q http://backend.api:8080/admin
    q --path-as-is 'http://backend.api:8080/api/../admin'
    q -X POST http://backend.api:8080/api/orders
    q -X POST -H 'authorization: Bearer not.a.token' http://backend.api:8080/api/orders
    q -X POST -H "authorization: Bearer $token" http://backend.api:8080/api/orders
    echo hello | curl -s --max-time 2 telnet://127.0.0.1:16532 || true
    echo hello | curl -s --max-time 2 telnet://127.0.0.1:16432 || true
    curl -s -m 10 -o /dev/null http://127.0.0.1:15180/api/hello || true
  done >/dev/null
  for port in 15000 15100; do
    for path in /ready /stats/prometheus; do curl -s -m 10 -o /dev/null "http://127.0.0.1:$port$path"; done
  done
}

# run TAG MESH_DIR SKIP_ARGS READY LOAD ROLE...: `rampart up MESH_DIR` under callgrind (the
# processes whose arguments include one of SKIP_ARGS natively) or perf, LOAD, then stop it;
# the pids of the ROLEs (`rampart ROLE ...`) go to $W/roles as "pid TAG-ROLE".
run() {
  local tag=$1 mesh=$2 skip=$3 ready=$4 load=$5; shift 5
  local wrap
  rm -rf "$W/state"
  if [ -n "$native" ]; then
    wrap=(perf record -q -e page-faults -c 1 -d -o "$W/cg/$tag.data" --)
  else
    wrap=(valgrind --tool=callgrind --demangle=no --trace-children=yes
      --trace-children-skip-by-arg="$skip" --callgrind-out-file="$W/cg/$tag.%p")
  fi
  RUST_LOG=warn "${wrap[@]}" "$bin" up "$mesh" --state-dir "$W/state" >"$W/up.log" 2>&1 &
  up_pid=$!
  for _ in $(seq 300); do $ready && break; kill -0 "$up_pid" 2>/dev/null || break; sleep 1; done
  $ready || { echo "$mesh did not come up:" >&2; tail -20 "$W/up.log" >&2; exit 1; }
  echo "$mesh up; exercising it" >&2
  $load
  sleep 5
  for role in "$@"; do pgrep -f -- "^$bin $role " | sed "s/\$/ $tag-$role/"; done >>"$W/roles"
  if [ -z "$native" ]; then
    # dump each profile now, in case a process is killed rather than exiting at the end
    for p in $(pgrep -P "$up_pid"); do callgrind_control -d "$p" >/dev/null 2>&1 || true; done
  fi
  kill -TERM "$up_pid"
  for _ in $(seq 120); do kill -0 "$up_pid" 2>/dev/null || break; sleep 1; done
  wait "$up_pid" 2>/dev/null || true
  up_pid=""
}
run pair "$root/benches/mtls-pair" ca pair_ok pair_load proxy agent
# The quickstart's apps (`rampart echo`) run natively, started here: under valgrind `rampart up`
# cannot watch its children (valgrind 3.19 has no pidfd_open). Its frontend app takes 18080.
for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
cp -r "$root/examples/quickstart" "$W/quick"
grep -o 'command: \[rampart, echo, [^]]*\]' "$root/examples/quickstart/workloads.yaml" |
  sed 's/^command: \[rampart, //; s/\]$//; s/,//g' >"$W/apps"
sed -i '/^ *command: /d' "$W/quick/workloads.yaml"
while read -r app; do
  # shellcheck disable=SC2086
  "$bin" $app >/dev/null 2>&1 & pids+=($!)
done <"$W/apps"
run quick "$W/quick" ca,agent quick_ok quick_load proxy

nm --defined-only "$bin" | awk '$2 ~ /^[tTwW]$/ {print $3}' | sort -u >"$W/text-symbols"
if [ -n "$native" ]; then
  # instruction fetches (ip == faulting address) in the binary, by process
  for f in "$W"/cg/*.data; do
    perf script --no-demangle -i "$f" -F pid,ip,addr,sym,dso 2>/dev/null |
      awk -v exe="($bin)" '$2 == $5 && $7 == exe {print $1, $6}'
  done >"$W/fetches"
fi
python3 - "$W/cg" "$W/roles" "$W/text-symbols" "$bin" "$out" "$native" <<'PY'
import collections, glob, os, re, sys
cgdir, roles, symfile, binary, out, native = sys.argv[1:7]
text = set(open(symfile).read().split())
base = os.path.basename(binary)
# process role -> group; groups in layout order
GROUP = {"pair-proxy": "proxy", "quick-proxy": "policy", "pair-agent": "agent"}
ORDER = ["proxy", "policy", "agent"]
DESC = {"proxy": "benches/mtls-pair's proxies", "policy": "examples/quickstart's proxies, beyond that",
        "agent": "the node agent, beyond that"}
group_of = {}
for line in open(roles):
    pid, role = line.split()
    if role in GROUP:
        group_of[pid] = GROUP[role]

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
            fn = name(names, line[3:])
            cur_fn = fn if os.path.basename(cur_ob or "") == base else None
        elif line.startswith("cfn="):
            name(names, line[4:])
        elif line.startswith("calls="):
            skip_next = True
        elif cur_fn and line[:1] in "0123456789+-*":
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                cost[re.sub(r"'\d+$", "", cur_fn)] += int(parts[1])
    return cost

head = ["# lld --symbol-ordering-file for release builds of `rampart` (build.rs).",
        "# Generated by benches/profile/text-order.sh; regenerate after larger code changes."]
groups = {g: [] for g in ORDER}
if not native:
    costs = {g: collections.Counter() for g in ORDER}
    for path in glob.glob(os.path.join(cgdir, "*")):
        # under valgrind a process's command line is valgrind's: take the role from the profile
        with open(path, errors="replace") as f:
            args = next((l for l in f if l.startswith("cmd:")), "cmd:").split()[1:]
        g = GROUP.get(os.path.basename(path).split(".")[0] + "-" + (args[1] if len(args) > 1 else ""))
        if g:
            costs[g].update(self_costs(path))
    if not costs["proxy"]:
        sys.exit("no proxy profile found")
    seen = set()
    for g in ORDER:
        groups[g] = [f for f, c in costs[g].most_common() if c > 0 and f in text and f not in seen]
        seen.update(groups[g])
    added = {g: len(v) for g, v in groups.items()}
else:
    cur = None
    for line in open(out):
        line = line.rstrip("\n")
        m = re.match(r"# (\w+): ", line)
        if m and m.group(1) in groups:
            cur = m.group(1)
        elif line and not line.startswith("#") and cur:
            groups[cur].append(line)
    added = {g: 0 for g in ORDER}
    for line in open(os.path.join(os.path.dirname(cgdir), "fetches")):
        pid, sym = line.split(None, 1)
        sym, g = sym.strip(), group_of.get(pid)
        if g is None or sym not in text:
            continue
        upto = ORDER[: ORDER.index(g) + 1]
        if any(sym in groups[h] for h in upto):
            continue
        for h in ORDER:
            if sym in groups[h]:
                groups[h].remove(sym)
        groups[g].append(sym)
        added[g] += 1
with open(out, "w") as f:
    f.write("\n".join(head) + "\n")
    for g in ORDER:
        f.write(f"# {g}: {len(groups[g])} functions executed by {DESC[g]}; by callgrind's "
                "instruction counts, then those only a native run showed\n")
        f.write("".join(s + "\n" for s in groups[g]))
print(f"{out}: " + ", ".join(f"{g} {len(groups[g])} (+{added[g]})" for g in ORDER), file=sys.stderr)
PY
