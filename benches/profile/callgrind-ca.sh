#!/usr/bin/env bash
# Instructions per certificate of `rampart ca` (end to end: TLS records, HTTP/2, protobuf,
# authentication, issuance, audit group commit), counted by callgrind, beside the crypto
# floor (one P-256 CSR verify + one P-256 sign, `citadel/examples/ca_floor.rs`) counted the
# same way. Load-independent: instruction counts, not time. See docs/PERFORMANCE.md,
# "CA instructions per certificate (callgrind)".
#
# Build first (valgrind 3.19 cannot read lld-linked binaries, hence GNU ld):
#   RUSTFLAGS="-C linker-features=-lld" CARGO_INCREMENTAL=0 \
#     cargo build --release --bin rampart -p rampart-citadel --example ca_floor
#   (the example: cargo build --release -p rampart-citadel --example ca_floor, same RUSTFLAGS)
#
# Env: BIN (rampart), FLOOR (ca_floor example), MODES (floor loops to count; "" for none),
#      WARM / RUN (load durations before zeroing the counters and counted),
#      OUT (directory for the callgrind files; default a temporary one, kept),
#      CONNS / INFLIGHT (load shape).
set -euo pipefail
BIN=${BIN:-target/release/rampart}
FLOOR=${FLOOR:-target/release/examples/ca_floor}
WARM=${WARM:-10s}
RUN=${RUN:-60s}
CONNS=${CONNS:-2}
INFLIGHT=${INFLIGHT:-16}
OUT=${OUT:-$(mktemp -d /tmp/callgrind-ca.XXXXXX)}
mkdir -p "$OUT"
echo "output in $OUT"

# --- floor: instructions per iteration = (I(2N) - I(N)) / N --------------------------------
total() { grep -E '^(summary|totals):' "$1" | head -1 | awk '{print $2}'; }
for mode in ${MODES-floor issue}; do
    for n in 100 200; do
        valgrind --tool=callgrind --callgrind-out-file="$OUT/$mode.$n.out" "$FLOOR" "$mode" "$n" \
            >/dev/null 2>"$OUT/$mode.$n.log"
    done
    a=$(total "$OUT/$mode.100.out"); b=$(total "$OUT/$mode.200.out")
    echo "$mode: $(( (b - a) / 100 )) instructions per iteration"
done

# --- the CA as its own process under callgrind ----------------------------------------------
w="$OUT/ca"
mkdir -p "$w"
"$BIN" token keygen --out "$w/iss.key" --force >/dev/null
"$BIN" token jwks --key "$w/iss.key" >"$w/jwks.json"
"$BIN" token issue --key "$w/iss.key" --issuer bench-iss --ns bench --sa load --ttl 4h \
    --out "$w/token.jwt"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
rm -f "$w/root.pem"
RUST_LOG=${RUST_LOG:-info} valgrind --tool=callgrind --callgrind-out-file="$OUT/ca.out" \
    "$BIN" ca --listen "127.0.0.1:$port" --cacerts "$w/none" --state "$w/state" \
    --jwt-issuer bench-iss --jwks "$w/jwks.json" --bundle-out "$w/root.pem" \
    --request-timeout 300s >"$w/ca.stdout" 2>"$w/ca.stderr" &
ca=$!
trap 'kill $ca 2>/dev/null || true' EXIT
for _ in $(seq 600); do
    grep -q "listening on" "$w/ca.stdout" 2>/dev/null && break
    sleep 0.5
done
grep -q "listening on" "$w/ca.stdout" || { echo "CA did not start"; cat "$w/ca.stderr"; exit 1; }
load() {
    "$BIN" ca bench --addr "127.0.0.1:$port" --ca-root "$w/root.pem" --token "$w/token.jwt" \
        --spiffe-id spiffe://cluster.local/ns/bench/sa/load --connections "$CONNS" \
        --concurrency "$INFLIGHT" --threads 1 --csrs 64 --duration "$1"
}
load "$WARM" >"$w/warm.txt"
cpu() { awk '{print $14 + $15}' "/proc/$ca/stat"; }
audit="$w/state/audit.jsonl"
callgrind_control -z "$ca" >/dev/null
c0=$(wc -l <"$audit"); t0=$(cpu)
load "$RUN" | tee "$w/run.txt"
c1=$(wc -l <"$audit"); t1=$(cpu)
callgrind_control -d "$ca" >/dev/null
sleep 2
kill "$ca"; wait "$ca" 2>/dev/null || true
certs=$((c1 - c0))
dump=$(ls -t "$OUT"/ca.out.* 2>/dev/null | head -1)
[ -n "$dump" ] || dump="$OUT/ca.out"
ir=$(total "$dump")
hz=$(getconf CLK_TCK)
echo "CA: $certs certificates, $ir instructions, $(( ir / certs )) per certificate ($dump)"
echo "CA CPU under valgrind: $(( (t1 - t0) * 1000000 / hz / certs )) us per certificate (callgrind-slowed; not comparable)"
callgrind_annotate --inclusive=yes --threshold=100 "$dump" 2>/dev/null >"$OUT/ca.inclusive.txt"
callgrind_annotate --inclusive=no --threshold=100 "$dump" 2>/dev/null >"$OUT/ca.self.txt"
# The floor inside the same run: ring's ECDSA verification (the CSR's self-signature) and
# signing (the certificate), inclusive.
first() { grep -E "^ *[0-9,]+ .*$1" "$OUT/ca.inclusive.txt" | head -1 | awk '{gsub(",", "", $1); print $1}'; }
v=$(first 'ecdsa/verification.rs:<ring::ec::suite_b::ecdsa::verification::EcdsaVerificationAlgorithm as ring::signature::VerificationAlgorithm>::verify')
s=$(first 'ecdsa/signing.rs:ring::ec::suite_b::ecdsa::signing::EcdsaKeyPair::sign \[')
echo "in-run floor: verify $(( v / certs )) + sign $(( s / certs )) = $(( (v + s) / certs )) per certificate;" \
    "CA/floor = $(python3 -c "print(f'{$ir / ($v + $s):.3f}')")"
echo "top functions: $OUT/ca.inclusive.txt (inclusive), $OUT/ca.self.txt (self)"

# --- secondary: CPU seconds per certificate of the CA running natively (/proc) -------------
# utime and stime (user and kernel) of the CA process over a RUN_NATIVE load; noisy on a
# shared machine (cache and frequency effects of the neighbours), and it includes the kernel
# work callgrind does not see (socket reads and writes, fdatasync, futex and epoll).
if [ -n "${RUN_NATIVE-20s}" ]; then
    rm -rf "$w/state" "$w/root.pem"
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    "$BIN" ca --listen "127.0.0.1:$port" --cacerts "$w/none" --state "$w/state" \
        --jwt-issuer bench-iss --jwks "$w/jwks.json" --bundle-out "$w/root.pem" \
        >"$w/native.stdout" 2>"$w/native.stderr" &
    ca=$!
    for _ in $(seq 100); do
        grep -q "listening on" "$w/native.stdout" 2>/dev/null && break
        sleep 0.2
    done
    load 3s >/dev/null
    read -r u0 s0 < <(awk '{print $14, $15}' "/proc/$ca/stat")
    c0=$(wc -l <"$audit")
    INFLIGHT=${INFLIGHT_NATIVE:-64} load "${RUN_NATIVE-20s}" >"$w/native.txt"
    c1=$(wc -l <"$audit")
    read -r u1 s1 < <(awk '{print $14, $15}' "/proc/$ca/stat")
    kill "$ca"; wait "$ca" 2>/dev/null || true
    n=$((c1 - c0))
    echo "native CA: $n certificates; user $(( (u1 - u0) * 1000000 / hz / n )) us + kernel $(( (s1 - s0) * 1000000 / hz / n )) us CPU per certificate ($(cat "$w/native.txt"))"
fi
