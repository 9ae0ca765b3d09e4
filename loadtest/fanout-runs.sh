#!/usr/bin/env bash
# Fan-out latency, run after run (issue 10): RUNS fresh fleets (3 pods, one
# Redis), each with SUBSCRIBERS subscribers of one channel and RATE
# publishes/s for DURATION s; every second run first overloads the same
# fleet at OVERLOAD publishes/s (another channel, other subscribers), so a
# slow mode that survives an overload shows. Prints one line per run and a
# summary table (delivery p50/p99/max, deliveries/s, losses).
#
#   loadtest/fanout-runs.sh                       # 10 runs, 1,000 subscribers, 100/s
#   RUNS=4 RATE=150 loadtest/fanout-runs.sh
#
# Env: RUNS (10), RATE (100), SUBSCRIBERS (1000), DURATION (10), OVERLOAD
# (600), NAME (fanout-runs), plus what cluster-fanout.sh takes (WSFLEET,
# BENCH, POD_FLAGS, OUT). Results: $OUT/$NAME-<run>.json. Loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-10}
export RATE=${RATE:-100}
export SUBSCRIBERS=${SUBSCRIBERS:-1000}
export DURATION=${DURATION:-10}
OVERLOAD_RATE=${OVERLOAD:-600}
NAME=${NAME:-fanout-runs}
OUT=${OUT:-loadtest/results}
export OUT
for run in $(seq "$RUNS"); do
  if [ $((run % 2)) -eq 0 ]; then
    OVERLOAD=$OVERLOAD_RATE TAG="$NAME-$run" loadtest/cluster-fanout.sh >"$OUT/$NAME-$run.log" 2>&1
  else
    OVERLOAD="" TAG="$NAME-$run" loadtest/cluster-fanout.sh >"$OUT/$NAME-$run.log" 2>&1
  fi
  echo "run $run done"
done
python3 - "$OUT" "$NAME" "$RUNS" "$OVERLOAD_RATE" <<'PY'
import json, sys
out, name, runs, overload = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
print("| run | before it | publishes accepted | deliveries/s | delivery p50 ms | p99 ms | max ms | missing (steady) |")
print("|---|---|---|---|---|---|---|---|")
for run in range(1, runs + 1):
    d = json.load(open(f"{out}/{name}-{run}.json"))
    c, lat = d["counts"], d["latency_ms"]["delivery"]
    before = f"overload {overload}/s" if run % 2 == 0 else "fresh fleet"
    print(f"| {run} | {before} | {c.get('post_ok', 0)} | {d['rates'].get('delivered_per_s', 0):,.0f} "
          f"| {lat['p50_ms']:.2f} | {lat['p99_ms']:.2f} | {lat['max_ms']:.1f} "
          f"| {c.get('missing_deliveries_steady', 0)} |")
PY
