#!/usr/bin/env bash
# ../shared/bench/compare-mtls.sh, run unchanged, with the haproxy + nginx pair's CPU and memory
# counted whole.
#
# compare-mtls.sh measures the baseline pair through `pgrep -f "nginx -c DIR/side"` and haproxy.
# That pattern matches nginx's master process only: the worker that terminates the mTLS,
# verifies the client certificate and proxies to the backend has the command line
# "nginx: worker process", so its CPU and RSS are left out of the baseline rows (found in issue
# #15, session 17; every "rampart/haproxy" CPU ratio before then compared our pair with
# haproxy alone).
#
# This wrapper reads the script's output as it is printed. The side nginx worker (the child of
# the master whose command line names `/side/nginx.conf`) serves only the baseline rows' wrk
# runs (and the script's one readiness request), so its utime+stime between the "direct" row
# (the baseline run starts right after it) and the "baseline" row, divided by that row's
# requests (req/s × --duration), is its CPU per request. After each baseline row it prints
# that, the whole pair's figure, and the worker's RSS; after each candidate row, the
# candidate's CPU per request against the whole pair's.
#
# With SYSCALLS=1 (needs perf) it also splits each pair's CPU per request into user and kernel
# time (utime and stime from /proc, every process of the pair: haproxy and both nginx
# processes; the Envoy processes; the candidate's) and counts the pair's system calls per
# request: `perf stat -e raw_syscalls:sys_enter,...` attached to those processes for the
# middle of the row's wrk run (from 1 s after it starts to 1 s before it ends), divided by
# the row's req/s times that time. The Envoy processes are found by their `-c` file in the
# script's directory, the candidate's with --candidate-match. These lines follow each row ("split:" and "syscalls:").
#
# Usage: [SYSCALLS=1] benches/profile/compare-mtls-whole.sh [compare-mtls.sh arguments]
#   e.g. benches/profile/compare-mtls-whole.sh --candidate-url http://127.0.0.1:26001/ \
#          --candidate-cmd "$PWD/benches/mtls-pair/run.sh" --candidate-match "rampart proxy" \
#          --envoy "$ENVOY" --duration 10 --conns '32'
set -u -o pipefail
# compare-mtls.sh finds the candidate's processes with `pgrep -f` on --candidate-match; this
# process's own command line would match too (its RSS and CPU counted as the candidate's), so
# the arguments move to a file and the wrapper starts again without them.
if [ "${1:-}" != --args-from ]; then
  f=$(mktemp /tmp/compare-mtls-whole.XXXXXX)
  printf '%s\0' "$@" >"$f"
  exec bash "$0" --args-from "$f"
fi
mapfile -d '' saved <"$2"
rm -f "$2"
set -- "${saved[@]}"
here=$(cd "$(dirname "$0")/../.." && pwd)
script=${COMPARE_MTLS:-$here/../shared/bench/compare-mtls.sh}
[ -x "$script" ] || { echo "no $script (set COMPARE_MTLS)" >&2; exit 2; }
dur=10 match=""
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[$i]}" in
    --duration) dur=${args[$((i + 1))]} ;;
    --candidate-match) match=${args[$((i + 1))]} ;;
  esac
done
syscalls=${SYSCALLS:-}
if [ -n "$syscalls" ]; then
  command -v perf >/dev/null || { echo "SYSCALLS=1 needs perf" >&2; exit 2; }
  [ "$dur" -ge 4 ] || { echo "SYSCALLS=1 needs --duration 4 or more" >&2; exit 2; }
fi
sysdir=$(mktemp -d /tmp/compare-mtls-sys.XXXXXX)
trap 'rm -rf "$sysdir"' EXIT
tick=$(getconf CLK_TCK)

side_workers() {
  local w pp
  for w in $(pgrep -f "nginx: worker process"); do
    pp=$(awk '{print $4}' "/proc/$w/stat" 2>/dev/null) || continue
    tr '\0' ' ' <"/proc/$pp/cmdline" 2>/dev/null | grep -q "/side/nginx.conf" && echo "$w"
  done
}
ticks() { local s=0 w t; for w in $(side_workers); do t=$(awk '{print $14+$15}' "/proc/$w/stat" 2>/dev/null) && s=$((s + t)); done; echo $s; }
rss_mib() { local s=0 w r; for w in $(side_workers); do r=$(awk '/^VmRSS/{print $2}' "/proc/$w/status" 2>/dev/null) && s=$((s + r)); done; echo $((s / 1024)); }

# The processes of the pair the next row measures: baseline, envoy or candidate.
pair_pids() {
  case "$1" in
    baseline)
      pgrep -f "haproxy -db -f /tmp/compare-mtls"
      for m in $(pgrep -f "nginx -c /tmp/compare-mtls.*/side"); do echo "$m"; done
      side_workers ;;
    envoy) pgrep -f -- "-c /tmp/compare-mtls[^ ]*/envoy-" ;;
    candidate) [ -n "$match" ] && pgrep -f -- "$match" | grep -vx "$$" ;;
  esac | sort -u | tr '\n' ' '
}
# "USER_TICKS SYSTEM_TICKS" summed over PIDS
split_ticks() { local u=0 k=0 p a; for p in "$@"; do a=($(awk '{print $14, $15}' "/proc/$p/stat" 2>/dev/null)) && u=$((u + a[0])) && k=$((k + a[1])); done; echo "$u $k"; }
events=raw_syscalls:sys_enter
for c in read recvfrom readv write writev sendto sendmsg epoll_wait futex; do events=$events,syscalls:sys_enter_$c; done
events=$events,context-switches,cpu-migrations,page-faults
# A row's wrk run starts: remember its pair's CPU split and count its system calls.
row_start() { # NAME
  [ -n "$syscalls" ] || return 0
  local pids; pids=$(pair_pids "$1")
  [ -n "${pids// /}" ] || return 1
  echo "$pids" >"$sysdir/$1.pids"
  split_ticks $pids >"$sysdir/$1.t0"
  (sleep 1; perf stat -x, -e "$events" -p "$(echo $pids | tr ' ' ,)" -o "$sysdir/$1.stat" -- sleep $((dur - 2)) >/dev/null 2>&1) &
}
row_end() { # NAME REQ_PER_S
  [ -n "$syscalls" ] && [ -f "$sysdir/$1.pids" ] || return 0
  local t0 t1; read -ra t0 <"$sysdir/$1.t0"; read -ra t1 < <(split_ticks $(cat "$sysdir/$1.pids"))
  awk -v u=$((t1[0] - t0[0])) -v k=$((t1[1] - t0[1])) -v t="$tick" -v r="${2:-0}" -v s="$dur" -v n="$1" \
    'BEGIN{if (r + 0 <= 0) exit; q = r * s; printf "       %s split: user %.1f + kernel %.1f us/req (all its processes)\n", n, u * 1e6 / t / q, k * 1e6 / t / q}'
  for _ in $(seq 30); do [ -s "$sysdir/$1.stat" ] && grep -q sys_enter "$sysdir/$1.stat" && break; sleep 0.2; done
  awk -F, -v r="${2:-0}" -v s=$((dur - 2)) -v n="$1" '$1 ~ /^[0-9]+$/ && r > 0 {
      e = $3; sub(/^(raw_)?syscalls:sys_enter_?/, "", e); if (e == "") e = "all"
      sub(/:u$/, "", e); if (e == "context-switches") e = "| cs"; if (e == "cpu-migrations") e = "migrations"; if (e == "page-faults") e = "faults"
      line = line sprintf(" %s %.2f", e, $1 / (r * s)) }
    END { if (line != "") printf "       %s syscalls per request:%s\n", n, line }' "$sysdir/$1.stat"
}

t0=0 pair=""
"$script" "$@" 2>&1 | while IFS= read -r line; do
  echo "$line"
  read -ra f <<<"$line"
  case "${f[1]:-}" in
    direct) t0=$(ticks); row_start baseline ;;
    envoy) row_end envoy "${f[2]:-0}"; row_start candidate ;;
    baseline)
      row_end baseline "${f[2]:-0}"
      # no Envoy row when the script found no Envoy: the candidate's row comes next
      row_start envoy || row_start candidate
      t1=$(ticks)
      pair=$(awk -v d=$((t1 - t0)) -v t="$tick" -v r="${f[2]:-0}" -v s="$dur" -v h="${f[6]:--}" \
        'BEGIN{if (r + 0 <= 0 || h == "-") exit; w = d * 1e6 / t / (r * s); printf "%.1f %.1f", w, w + h}')
      if [ -n "$pair" ]; then
        read -ra p <<<"$pair"
        echo "       side nginx worker: ${p[0]} us/req (RSS $(rss_mib) MiB); haproxy + nginx pair: ${p[1]} us/req"
        pair=${p[1]}
      else
        echo "       (no whole-pair figure: the baseline row has no req/s or CPU)"
      fi
      ;;
    candidate)
      row_end candidate "${f[2]:-0}"
      if [ -n "$pair" ] && [ "${f[6]:--}" != - ]; then
        awk -v c="${f[6]}" -v p="$pair" 'BEGIN{printf "       candidate/(haproxy + nginx pair) CPU per request = %.2f\n", c / p}'
      fi
      ;;
  esac
done
