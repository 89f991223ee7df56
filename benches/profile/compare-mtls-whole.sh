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
# Usage: benches/profile/compare-mtls-whole.sh [compare-mtls.sh arguments]
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
dur=10
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  [ "${args[$i]}" = --duration ] && dur=${args[$((i + 1))]}
done
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

t0=0 pair=""
"$script" "$@" 2>&1 | while IFS= read -r line; do
  echo "$line"
  read -ra f <<<"$line"
  case "${f[1]:-}" in
    direct) t0=$(ticks) ;;
    baseline)
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
      if [ -n "$pair" ] && [ "${f[6]:--}" != - ]; then
        awk -v c="${f[6]}" -v p="$pair" 'BEGIN{printf "       candidate/(haproxy + nginx pair) CPU per request = %.2f\n", c / p}'
      fi
      ;;
  esac
done
