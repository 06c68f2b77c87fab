#!/usr/bin/env bash
# Measures moorline against the bare relay (server/examples/bare_relay.rs) in alternating runs,
# then create → first output line for each runtime. Loopback only; every run is bounded by the
# load generator's counts and its time limit. Prints the figures; see docs/BENCHMARKS.md.
#
#   server/bench/compare.sh [ROUNDS]        (default 3 rounds; needs runc, tmux, tini and
#                                            slirp4netns as root for the runc and tmux
#                                            first-line figures)
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds=${1:-3}
cargo build --release --quiet -p moorline --bin moorline --example loadgen --example bare_relay
bin=target/release
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

# Starts a server in the background, logging to $work/log; sets $pid and $url.
start_bare() {
  "$bin/examples/bare_relay" >"$work/log" 2>&1 &
  pid=$!
  url=$(wait_for 'bare relay on ' | sed 's/.*bare relay on //')
}
start_moorline() {
  local runtime=$1 network=${2:-isolated}
  rm -rf "$work/state"
  AMARRE_INSTANCES_JSON="[{\"id\":\"cat\",\"agent\":\"command\",\"command\":[\"/bin/cat\"],\"runtime\":\"$runtime\",\"network\":\"$network\"}]" \
    MOORLINE_DETECT_TAILNET_NAMES=false NO_COLOR=1 \
    "$bin/moorline" serve --port 0 --state-dir "$work/state" >"$work/log" 2>&1 &
  pid=$!
  url=http://$(wait_for 'moorline listening' | sed 's/.*addr=\([0-9.:]*\).*/\1/')
}
wait_for() {
  for _ in $(seq 200); do
    if grep -q "$1" "$work/log"; then grep -m1 "$1" "$work/log"; return; fi
    sleep 0.05
  done
  echo "server did not start:" >&2; cat "$work/log" >&2; exit 1
}
stop() { kill "$pid"; wait "$pid" 2>/dev/null || true; }
loadgen() { "$bin/examples/loadgen" --url "$url" --pid "$pid" "$@"; }

for round in $(seq "$rounds"); do
  echo "== round $round/$rounds"
  start_bare
  loadgen --only spawn,rtt,pipelined,large,fanout --fanout-count 50000 |
    grep -E '^(spawn|rtt|pipe|large|fan|\| (before|after))' | sed 's/^/bare      /'
  stop
  start_moorline process
  loadgen --only spawn,rtt,pipelined,large,fanout --fanout-count 50000 |
    grep -E '^(spawn|rtt|pipe|large|fan|\| (before|after))' | sed 's/^/moorline  /'
  stop
done

echo "== create → first output line, by runtime (runc: isolated network, then the host's)"
for variant in process tmux runc:isolated runc:host; do
  runtime=${variant%%:*}
  start_moorline "$runtime" "${variant#*:}"
  if grep -q "runtime=\"$runtime\"" "$work/log"; then
    loadgen --only spawn,first-line --spawn-count 50 --first-line-count 50 |
      grep -E '^(spawn|first)' | sed "s/^/$variant  /"
  else
    echo "$runtime: not available here (see the server log for why)"
  fi
  stop
done
