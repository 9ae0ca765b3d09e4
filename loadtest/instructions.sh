#!/usr/bin/env bash
# Instructions per routed message, counted by callgrind (repeatable whatever
# else the machine does, unlike CPU time on a shared 2-core VM): 3 pods and
# one Redis; 100 sessions on pods 1 and 2; 100 messages/s POSTed through
# pod 3 for 10 s (1,000 messages, every one routed between pods). With
# MEASURE=pods (default) pod 1 (a receiver) and pod 3 (the ingress pod) run
# under callgrind; with MEASURE=redis, redis-server does. Counters are zeroed
# after a 3 s warm-up and dumped after the measured load, so start-up and
# shutdown are not counted.
#
#   loadtest/instructions.sh <tag> <wsfleet binary> [serve flags...]
#   MEASURE=redis loadtest/instructions.sh one-script target/release/wsfleet
#   loadtest/instructions.sh two-step target/release/wsfleet --redis-route-in-script false
#
# Prints `<tag> <process> Ir=<instructions> per_msg=<Ir / delivered>`; the
# receiver handles half the messages, so its figure per message it received
# is twice per_msg. Env: BENCH (the bench binary), OUT (/tmp/instructions).
# OTEL_* variables reach the pods (e.g. traces on). Loopback only; stops
# everything it starts. Needs valgrind.
set -uo pipefail
TAG=$1; WSFLEET=$2; shift 2; FLAGS=("$@")
MEASURE=${MEASURE:-pods}
BENCH=${BENCH:-$(dirname "$0")/../target/release/wsfleet-bench}
PORT=${REDIS_PORT:-16700}
DIR=$(mktemp -d); OUT=${OUT:-/tmp/instructions}/$TAG; rm -rf "$OUT"; mkdir -p "$OUT"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 2
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  rm -rf "$DIR"
}
trap cleanup EXIT
# exec: the background job's PID is then valgrind's, for callgrind_control.
grind() { exec valgrind --tool=callgrind --callgrind-out-file="$OUT/$1.%p" "${@:2}"; }

redis=(redis-server --port "$PORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$DIR" --logfile "$DIR/redis.log")
if [ "$MEASURE" = redis ]; then grind redis "${redis[@]}" & else "${redis[@]}" & fi
pids+=($!); REDIS_PID=$!
for _ in $(seq 100); do redis-cli -p "$PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
declare -A pod
for i in 1 2 3; do
  serve=("$WSFLEET" serve --listen "127.0.0.1:1930$i" --pod-name "pod-$i" --redis-url "redis://127.0.0.1:$PORT" "${FLAGS[@]}")
  if [ "$MEASURE" = pods ] && [ "$i" != 2 ]; then grind "pod-$i" "${serve[@]}" >"$DIR/pod-$i.log" 2>&1 &
  else "${serve[@]}" >"$DIR/pod-$i.log" 2>&1 & fi
  pids+=($!); pod[$i]=$!
done
for i in 1 2 3; do
  for _ in $(seq 300); do curl -sf "127.0.0.1:1930$i/readyz" >/dev/null && break; sleep 0.2; done
done
if [ "$MEASURE" = redis ]; then measured=("$REDIS_PID"); names=(redis); else measured=("${pod[1]}" "${pod[3]}"); names=(pod-1 pod-3); fi
load() {
  "$BENCH" direct --url ws://127.0.0.1:19301/ws,ws://127.0.0.1:19302/ws --http-target http://127.0.0.1:19303 \
    --sessions 100 --rate 100 --max-in-flight 16 --run-id "$1$TAG" "${@:2}"
}
load warm --duration 3 >"$OUT/warm.txt" 2>&1
for p in "${measured[@]}"; do callgrind_control -z "$p" >/dev/null 2>&1; done
load load --duration 10 --json "$OUT/load.json" >"$OUT/load.txt" 2>&1
for p in "${measured[@]}"; do callgrind_control -d "$p" >/dev/null 2>&1; done
# A process handles the command when it next runs code: wait for the dumps.
for k in "${!measured[@]}"; do
  for _ in $(seq 100); do ls "$OUT/${names[$k]}.${measured[$k]}".* >/dev/null 2>&1 && break; sleep 0.2; done
done
sleep 1
delivered=$(python3 -c "import json;print(json.load(open('$OUT/load.json'))['counts']['delivered'])")
for k in "${!measured[@]}"; do
  dump=$(ls "$OUT/${names[$k]}.${measured[$k]}".* 2>/dev/null | head -1)
  ir=$(grep -h "^summary:\|^totals:" "$dump" | head -1 | awk '{print $2}')
  echo "$TAG ${names[$k]} delivered=$delivered Ir=$ir per_msg=$(python3 -c "print(round(${ir:-0}/max($delivered,1)))")"
done
