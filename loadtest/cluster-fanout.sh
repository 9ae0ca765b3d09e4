#!/usr/bin/env bash
# Cluster-mode fan-out delivery check (issue 8): 3 pods and one Redis on
# this machine; SUBSCRIBERS subscribers of one channel spread over the 3
# pods; publishes POSTed round-robin through all 3 pods at RATE/s for
# DURATION s, faster than the pods can deliver. After the last publish the
# bench waits SETTLE s (above the pods' delivery bound) and counts, per
# subscriber, what never arrived: `missing_deliveries_steady` counts losses
# of subscribers that were never closed and never resubscribed (no close,
# no gap notice), i.e. losses nobody was told about.
#
#   loadtest/cluster-fanout.sh                 # 1,000 subscribers, 300/s, 10 s
#   RATE=500 SUBSCRIBERS=1000 loadtest/cluster-fanout.sh
#
# Env: SUBSCRIBERS (1000), RATE (300), DURATION (10), SETTLE (6), WSFLEET (the
# server binary, target/release/wsfleet), OUT
# (loadtest/results), TAG (name of the result files), POD_FLAGS (extra
# `wsfleet serve` flags), OVERLOAD (a publish rate: first overload the
# same fleet at that rate for DURATION s on another channel with other
# subscribers, then run the measured phase; its results go to
# $TAG-overload.*), BENCH (the bench binary). Loopback only; every process it starts is stopped
# on exit. Needs a release build (`cargo build --release -p wsfleet -p wsfleet-bench`).
set -euo pipefail
cd "$(dirname "$0")/.."
SUBSCRIBERS=${SUBSCRIBERS:-1000}
RATE=${RATE:-300}
DURATION=${DURATION:-10}
SETTLE=${SETTLE:-6}
OUT=${OUT:-loadtest/results}
TAG=${TAG:-fanout-$SUBSCRIBERS-$RATE}
REDIS_PORT=${REDIS_PORT:-16600}
POD_FLAGS=${POD_FLAGS:-}
mkdir -p "$OUT"
WSFLEET=${WSFLEET:-target/release/wsfleet}
BENCH=${BENCH:-target/release/wsfleet-bench}
DIR=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  redis-cli -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
  rm -rf "$DIR"
}
trap cleanup EXIT

redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$DIR" \
  --daemonize yes --logfile "$DIR/redis.log" --pidfile "$DIR/redis.pid"
sleep 0.5
for i in 1 2 3; do
  # shellcheck disable=SC2086
  "$WSFLEET" serve --listen "127.0.0.1:1920$i" --pod-name "pod-$i" \
    --redis-url "redis://127.0.0.1:$REDIS_PORT" $POD_FLAGS >"$DIR/pod-$i.log" 2>&1 &
  pids+=($!)
done
for i in 1 2 3; do
  for _ in $(seq 50); do curl -sf "127.0.0.1:1920$i/readyz" >/dev/null && break; sleep 0.1; done
done

if [ -n "${OVERLOAD:-}" ]; then
  # Each bench run has its own run id: a new channel and new sessions.
  "$BENCH" fanout --url ws://127.0.0.1:19201/ws,ws://127.0.0.1:19202/ws,ws://127.0.0.1:19203/ws \
    --http-target http://127.0.0.1:19201,http://127.0.0.1:19202,http://127.0.0.1:19203 \
    --subscribers "$SUBSCRIBERS" --rate "$OVERLOAD" --duration "$DURATION" --settle "$SETTLE" \
    --drain 30 --max-in-flight 64 --json "$OUT/$TAG-overload.json" >"$OUT/$TAG-overload.txt" 2>&1 || true
  echo "== overload first: $OVERLOAD publishes/s asked, delivery p99 $(python3 -c "import json;print(json.load(open('$OUT/$TAG-overload.json'))['latency_ms']['delivery']['p99_ms'])") ms"
fi

"$BENCH" fanout --url ws://127.0.0.1:19201/ws,ws://127.0.0.1:19202/ws,ws://127.0.0.1:19203/ws \
  --http-target http://127.0.0.1:19201,http://127.0.0.1:19202,http://127.0.0.1:19203 \
  --subscribers "$SUBSCRIBERS" --rate "$RATE" --duration "$DURATION" --settle "$SETTLE" \
  --drain 30 --max-in-flight 64 --json "$OUT/$TAG.json" >"$OUT/$TAG.txt" 2>&1 || true

echo "== $SUBSCRIBERS subscribers over 3 pods, $RATE publishes/s for $DURATION s, counted $SETTLE s+ after the last"
python3 - "$OUT/$TAG.json" <<'EOF'
import json, sys
c = json.load(open(sys.argv[1]))["counts"]
keys = ["post_ok", "subscribed", "expected_deliveries", "delivered", "missing_deliveries",
        "steady_subscribers", "missing_deliveries_steady", "resubscribed", "duplicates_deduped"]
for k in keys:
    print(f"  {k:28} {c.get(k, 0)}")
for k, v in sorted(c.items()):
    if k.startswith("closed_by_server") or k.startswith("welcome_gap") or k.startswith("server_error"):
        print(f"  {k:28} {v}")
EOF
for i in 1 2 3; do
  curl -s "127.0.0.1:1920$i/metrics" | grep -E '^wsfleet_(route_|queue_overflows|bus_errors)' | sed "s/^/  pod-$i /" || true
  n=$(grep -c "cannot fill a hole" "$DIR/pod-$i.log" || true)
  echo "  pod-$i log: $n x 'cannot fill a hole from the log; delivering what arrived'"
done
