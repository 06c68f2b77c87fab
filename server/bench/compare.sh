#!/usr/bin/env bash
# Measures moorline's three runtimes (process, tmux, runc in tmux) against the bare relay
# (server/examples/bare_relay.rs) through the same workloads, alternating the four servers
# within each round, then prints the medians side by side with the ratios the project targets,
# and create → first output line for each runtime. Loopback only; every run is bounded by the
# load generator's counts and its time limit. See docs/BENCHMARKS.md.
#
#   server/bench/compare.sh [ROUNDS]        (default 3 rounds; the tmux and runc runtimes need
#                                            tmux, and runc, tini and slirp4netns as root; a
#                                            runtime that is not available is skipped)
#
# BEFORE=path/to/another/moorline adds that build, on the process runtime, as a fifth server
# ("before"), so a change is measured against the build before it in the same run.
set -euo pipefail
cd "$(dirname "$0")/../.."
rounds=${1:-3}
cargo build --release --quiet -p moorline --bin moorline --example loadgen --example bare_relay
bin=target/release
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
servers="bare process tmux runc${BEFORE:+ before}"
workloads=(--only spawn,rtt,pipelined,large,fanout --large-count 4000 --fanout-count 50000 --time-limit-secs 300)

# Starts a server in the background, logging to $work/log; sets $pid and $url.
start_bare() {
  "$bin/examples/bare_relay" >"$work/log" 2>&1 &
  pid=$!
  url=$(wait_for 'bare relay on ' | sed 's/.*bare relay on //')
}
start_moorline() {
  local runtime=$1 network=${2:-isolated} exe=${3:-$bin/moorline}
  rm -rf "$work/state"
  AMARRE_INSTANCES_JSON="[{\"id\":\"cat\",\"agent\":\"command\",\"command\":[\"/bin/cat\"],\"runtime\":\"$runtime\",\"network\":\"$network\"}]" \
    MOORLINE_DETECT_TAILNET_NAMES=false NO_COLOR=1 \
    "$exe" serve --port 0 --state-dir "$work/state" >"$work/log" 2>&1 &
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
# Whether the moorline just started offers runtime $1 (it logs the runtimes it has).
has_runtime() { grep -q "runtime=\"$1\"" "$work/log"; }
stop() { kill "$pid"; wait "$pid" 2>/dev/null || true; }
loadgen() { "$bin/examples/loadgen" --url "$url" --pid "$pid" "$@"; }

# Runs the workloads against the server just started, as $1: prints the per-workload lines and
# appends "server<TAB>figure<TAB>value" records (from loadgen's tables) to $work/figures.
measure() {
  local name=$1 out="$work/out"
  loadgen "${workloads[@]}" >"$out"
  grep -E '^(spawn|rtt|pipe|large|fan)' "$out" | sed "s/^/$(printf '%-9s' "$name") /"
  awk -F'|' -v s="$name" '
    function trim(x) { gsub(/^ +| +$/, "", x); return x }
    NF == 5 && $2 !~ /Workload|---|Server memory|before the run|after the run/ { printf "%s\t%s %s\t%s\n", s, trim($2), trim($3), trim($4) }
    /^\| after the run \|/ { v = trim($3); sub(/ MiB/, "", v); printf "%s\tRSS after (MiB)\t%s\n", s, v }
    /^\| after the run \|/ { v = trim($4); sub(/ MiB/, "", v); printf "%s\tRSS peak (MiB)\t%s\n", s, v }
  ' "$out" >>"$work/figures"
}

: >"$work/figures"
for round in $(seq "$rounds"); do
  echo "== round $round/$rounds"
  for server in $servers; do
    if [ "$server" = bare ]; then
      start_bare
    elif [ "$server" = before ]; then
      start_moorline process isolated "$BEFORE"
    else
      start_moorline "$server"
      if ! has_runtime "$server"; then
        echo "$server: not available here (see the server log for why)"
        stop
        continue
      fi
    fi
    measure "$server"
    stop
  done
done

echo
echo "== medians of $rounds round(s)"
awk -F'\t' -v servers="$servers" '
  function median(key,   n, i, j, t, a) {
    n = split(vals[key], a, " ")
    if (n == 0) return ""
    for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] + 0 < a[i] + 0) { t = a[i]; a[i] = a[j]; a[j] = t }
    return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
  }
  function ratio(a, b) { return (a == "" || b == "" || b + 0 == 0) ? "-" : sprintf("%.2f", a / b) }
  {
    key = $1 SUBSEP $2
    vals[key] = vals[key] " " $3
    if (!($2 in seen)) { seen[$2] = 1; order[++nf] = $2 }
  }
  END {
    ns = split(servers, s, " ")
    before = servers ~ /before/
    printf "| figure |"; for (i = 1; i <= ns; i++) printf " %s |", s[i]
    printf " process / bare | tmux / process | runc / process |"
    print before ? " process / before |" : ""
    printf "|---|"; for (i = 1; i <= ns; i++) printf "---:|"
    print before ? "---:|---:|---:|---:|" : "---:|---:|---:|"
    for (f = 1; f <= nf; f++) {
      name = order[f]
      printf "| %s |", name
      for (i = 1; i <= ns; i++) { m[s[i]] = median(s[i] SUBSEP name); printf " %s |", m[s[i]] == "" ? "-" : m[s[i]] }
      printf " %s | %s | %s |", ratio(m["process"], m["bare"]), ratio(m["tmux"], m["process"]), ratio(m["runc"], m["process"])
      print before ? " " ratio(m["process"], m["before"]) " |" : ""
      for (i = 1; i <= ns; i++) med[s[i], name] = m[s[i]]
    }
    print ""
    print "targets (ratios of medians; higher is better for throughput, lower for time and memory):"
    target("runc round trip p50 / process", med["runc", "rtt_64B p50 (µs)"], med["process", "rtt_64B p50 (µs)"], "<=", 1.3)
    target("tmux round trip p50 / process", med["tmux", "rtt_64B p50 (µs)"], med["process", "rtt_64B p50 (µs)"], "<=", 1.3)
    target("runc 64 KiB / process", med["runc", "large_64KiB MiB/s"], med["process", "large_64KiB MiB/s"], ">=", 0.8)
    target("tmux 64 KiB / process", med["tmux", "large_64KiB MiB/s"], med["process", "large_64KiB MiB/s"], ">=", 0.8)
    target("process pipelined 64 B / bare", med["process", "pipelined_64B msgs/s"], med["bare", "pipelined_64B msgs/s"], ">=", 0.9)
    target("process 64 KiB / bare", med["process", "large_64KiB MiB/s"], med["bare", "large_64KiB MiB/s"], ">=", 0.9)
    target("process fan-out / bare", med["process", "fanout_20x64B deliveries/s"], med["bare", "fanout_20x64B deliveries/s"], ">=", 0.9)
    target("process spawn p50 / bare", med["process", "spawn p50 (ms)"], med["bare", "spawn p50 (ms)"], "<=", 1.5)
    target("process RSS after / bare", med["process", "RSS after (MiB)"], med["bare", "RSS after (MiB)"], "<=", 2)
  }
  function target(what, a, b, op, goal,   r, ok) {
    r = ratio(a, b)
    if (r == "-") { printf "  %-32s -  (not measured)\n", what; return }
    ok = (op == "<=") ? (r + 0 <= goal) : (r + 0 >= goal)
    printf "  %-32s %5s  (target %s %s: %s)\n", what, r, op, goal, ok ? "met" : "NOT met"
  }
' "$work/figures"

echo
echo "== create → first output line, by runtime (runc: isolated network, then the host's)"
for variant in process tmux runc:isolated runc:host; do
  runtime=${variant%%:*} network=isolated
  [[ $variant == *:* ]] && network=${variant#*:}
  start_moorline "$runtime" "$network"
  if has_runtime "$runtime"; then
    loadgen --only spawn,first-line --spawn-count 50 --first-line-count 50 |
      grep -E '^(spawn|first)' | sed "s/^/$variant  /"
  else
    echo "$runtime: not available here (see the server log for why)"
  fi
  stop
done
