#!/usr/bin/env bash
# Cluster-mode routing benchmark (issue 3): 3 pods and one Redis on this
# machine; 1,000 sessions connected to pods 1 and 2; messages POSTed through
# pod 3, which owns none of them, so every message is routed between pods.
# For each rate: end-to-end delivery latency (bench tool, HDR histogram),
# Redis commands per routed message (INFO commandstats) and CPU per process.
#
#   loadtest/cluster-latency.sh 1000 5000 20000      # rates in messages/s
#
# Env: DURATION (s, default 10), SESSIONS (1000), OUT (loadtest/results),
# REDIS_PERSIST=1 to run Redis with appendonly everysec, BATCH=N to send
# POST /v1/messages batches of N messages instead of one POST per message
# (results then go to cluster-<rate>-batch<N>.*). WSFLEET=/path and
# BENCH=/path run other builds (NO_BUILD=1 skips the build), e.g. to compare
# two commits; TRACES=1 turns OpenTelemetry on in the pods, exporting to a
# sink on 127.0.0.1:4318 that accepts and drops every span (docs/tracing.md);
# TAG=x adds -x to the result names; POD_FLAGS adds `wsfleet serve` flags
# (e.g. POD_FLAGS="--redis-route-in-script false").
# Loopback only; every process it starts is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10}
SESSIONS=${SESSIONS:-1000}
OUT=${OUT:-loadtest/results}
REDIS_PORT=${REDIS_PORT:-16500}
mkdir -p "$OUT"
[ -n "${NO_BUILD:-}" ] || cargo build --release -q -p wsfleet -p wsfleet-bench
WSFLEET=${WSFLEET:-target/release/wsfleet}
BENCH=${BENCH:-target/release/wsfleet-bench}
DIR=$(mktemp -d)
pids=()
pods=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  redis-cli -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
  rm -rf "$DIR"
}
trap cleanup EXIT

if [ "${TRACES:-0}" = 1 ]; then
  # An OTLP/HTTP endpoint that reads each export and answers 200.
  python3 - <<'PY' &
import http.server
class Sink(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", 4318), Sink).serve_forever()
PY
  pids+=($!)
  export OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4318
  sleep 0.5
fi

persist=(--appendonly no)
[ "${REDIS_PERSIST:-0}" = 1 ] && persist=(--appendonly yes --appendfsync everysec)
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" "${persist[@]}" --dir "$DIR" \
  --daemonize yes --logfile "$DIR/redis.log" --pidfile "$DIR/redis.pid"
sleep 0.5
REDIS_PID=$(cat "$DIR/redis.pid")
for i in 1 2 3; do
  # shellcheck disable=SC2086
  "$WSFLEET" serve --listen "127.0.0.1:1910$i" --pod-name "pod-$i" \
    --redis-url "redis://127.0.0.1:$REDIS_PORT" ${POD_FLAGS:-} >"$DIR/pod-$i.log" 2>&1 &
  pids+=($!)
  pods+=($!)
done
for i in 1 2 3; do
  for _ in $(seq 50); do curl -sf "127.0.0.1:1910$i/readyz" >/dev/null && break; sleep 0.1; done
done

cpu() { awk '{print $14+$15}' "/proc/$1/stat"; }   # clock ticks (1/100 s)
BATCH=${BATCH:-1}
for RATE in "$@"; do
  name="cluster-$RATE"
  [ "$BATCH" -gt 1 ] && name="cluster-$RATE-batch$BATCH"
  [ -n "${TAG:-}" ] && name="$name-$TAG"
  redis-cli -p "$REDIS_PORT" config resetstat >/dev/null
  before=()
  for p in "${pods[@]}" "$REDIS_PID"; do before+=("$(cpu "$p")"); done
  "$BENCH" direct --url ws://127.0.0.1:19101/ws,ws://127.0.0.1:19102/ws \
    --http-target http://127.0.0.1:19103 --sessions "$SESSIONS" --rate "$RATE" \
    --duration "$DURATION" --max-in-flight 256 --batch "$BATCH" \
    --json "$OUT/$name.json" >"$OUT/$name.txt" 2>&1
  after=()
  for p in "${pods[@]}" "$REDIS_PID"; do after+=("$(cpu "$p")"); done
  delivered=$(python3 -c "import json;print(json.load(open('$OUT/$name.json'))['counts']['delivered'])")
  # Per delivered message, by command. EVALSHA is one APPEND script per
  # message (plus a few claims/renewals); the XADD count includes the XADD
  # inside each APPEND as well as the one to the owner's inbox.
  stats=$(redis-cli -p "$REDIS_PORT" info commandstats)
  per_msg=$(for c in evalsha xadd xreadgroup xack xdel; do
    v=$(echo "$stats" | awk -F'[=,:]' -v c="cmdstat_$c" '$1==c {print $3}')
    python3 -c "print('$c', round(${v:-0}/max($delivered,1),2), end='  ')"
  done)
  echo "== $RATE msg/s offered, $DURATION s, $BATCH per request"
  grep -E "delivered_per_s| delivery |http_post |http_batch |undelivered|post_err" "$OUT/$name.txt" || true
  echo "  redis commands per delivered message: $per_msg"
  echo "  cpu % (pod-1 pod-2 pod-3/http redis): $(for k in 0 1 2 3; do printf '%s ' $(( (${after[$k]} - ${before[$k]}) / DURATION )); done)"
  # One clock tick is 10 ms of CPU.
  echo "  cpu us per delivered message (pod-1 pod-2 pod-3/http redis): $(for k in 0 1 2 3; do printf '%s ' $(( (${after[$k]} - ${before[$k]}) * 10000 / (delivered > 0 ? delivered : 1) )); done)"
done
