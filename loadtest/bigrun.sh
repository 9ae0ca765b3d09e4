#!/usr/bin/env bash
# Big idle-connection run on one machine: P wsfleet pods (embedded mode, one
# process and one port each), C client connections from wsfleet-bench spread
# over worker processes and 127.0.0.0/8 source addresses, then pings over a
# subset while every connection is held. Samples server RSS, client RSS and
# kernel memory (/proc/meminfo Slab/SUnreclaim, /proc/net/sockstat) with no
# connections, with all of them up, and after; writes a JSON and a markdown
# summary into loadtest/results/.
#
# Why the shape: one process may hold < 20,000 sockets here (`ulimit -n` is
# 20000 and cannot be raised), so both sides are split over processes; and
# the bench binds every client socket to a source address before connecting,
# which makes the kernel pick its ephemeral port per *source address* (about
# 28,000 of them, from ip_local_port_range); the script uses C / 14,000
# source addresses whatever the number of pods.
#
# Parameters (environment):
#   PODS=6  CONNECTIONS=100000  PROCESSES=(auto: C/18000 rounded up)
#   DURATION=40            seconds every connection is held after the ramp
#   PING_CONNECTIONS=1000  extra connections that ping while the rest are held
#   PING_RATE=2000         pings/s over them;  PING_DURATION=10 seconds
#   SOURCE_IPS=(auto)      e.g. 127.0.0.2-127.0.0.9
#   BASE_PORT=19100        pods listen on BASE_PORT .. BASE_PORT+PODS-1
#   READ_BUFFER=1024  WRITE_BUFFER=0   both sides' WebSocket buffers
#   CONNECT_RATE=(unlimited) new connections/s over all bench processes: at
#                 a million connections an unthrottled ramp starves the
#                 2 cores, and pongs to the pods' heartbeats arrive late
#   CONNECT_RETRIES=0 retries of a failed or timed-out handshake per
#                 connection, with jittered exponential backoff (real
#                 clients retry; at a million the slowest handshakes time out)
#   HEARTBEAT_S=25 the pods' ping period: a million connections at 25 s is
#                 40,000 pings and pongs a second, a real load on 2 cores
#   RAMP_TIMEOUT=(C/1500+60) seconds the bench may take to open everything
#   PLATEAU_S=15   if the connection count stops growing this long (some
#                 handshakes failed), measure what is up; keep DURATION above
#                 PLATEAU_S + PING_DURATION + 20 so the hold outlasts it
#   WSFLEET_BIN, BENCH_BIN (default: target/release/{wsfleet,wsfleet-bench}
#   under CARGO_TARGET_DIR or ./target; build with
#   `cargo build --release -p wsfleet -p wsfleet-bench`)
#   OUT_DIR=loadtest/results  TAG=(timestamp)
#   REDIS=0        1: cluster mode. Starts a redis-server (no persistence)
#                 on REDIS_PORT (BASE_PORT-1) and gives every pod its URL;
#                 then measures Redis at rest over REST_S (10) seconds with
#                 every connection held and idle: commands/s, CPU, and
#                 memory per idle session
# Everything it starts is stopped on exit (trap), and every step is bounded
# by `timeout`; the whole run by MAX_SECONDS (default: ramp + hold + 300).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
target_dir=${CARGO_TARGET_DIR:-$repo/target}

PODS=${PODS:-6}
CONNECTIONS=${CONNECTIONS:-100000}
DURATION=${DURATION:-40}
PING_CONNECTIONS=${PING_CONNECTIONS:-1000}
PING_RATE=${PING_RATE:-2000}
PING_DURATION=${PING_DURATION:-10}
BASE_PORT=${BASE_PORT:-19100}
READ_BUFFER=${READ_BUFFER:-1024}
WRITE_BUFFER=${WRITE_BUFFER:-0}
WSFLEET_BIN=${WSFLEET_BIN:-$target_dir/release/wsfleet}
BENCH_BIN=${BENCH_BIN:-$target_dir/release/wsfleet-bench}
OUT_DIR=${OUT_DIR:-$here/results}
TAG=${TAG:-$(date -u +%Y%m%dT%H%M%SZ)}

# Per-process socket budget: the open-files limit minus the bench's reserve
# (200) and some slack for the pods' own files.
fd_limit=$(ulimit -n)
per_process_max=$((fd_limit - 500))

die() { echo "bigrun: $*" >&2; exit 1; }

[[ -x $WSFLEET_BIN ]] || die "no wsfleet binary at $WSFLEET_BIN (cargo build --release -p wsfleet)"
[[ -x $BENCH_BIN ]] || die "no bench binary at $BENCH_BIN (cargo build --release -p wsfleet-bench)"
for v in PODS CONNECTIONS DURATION PING_CONNECTIONS PING_DURATION BASE_PORT; do
    [[ ${!v} =~ ^[0-9]+$ ]] || die "$v must be a whole number"
done
((PODS >= 1 && PODS <= 200)) || die "PODS must be 1..200"
((CONNECTIONS >= 1)) || die "CONNECTIONS must be at least 1"
((PING_DURATION + 5 <= DURATION)) || die "DURATION must exceed PING_DURATION by 5 s"

total=$((CONNECTIONS + PING_CONNECTIONS))
per_pod=$(((total + PODS - 1) / PODS))
((per_pod <= per_process_max)) ||
    die "$per_pod connections per pod exceed $per_process_max (open files $fd_limit): use PODS=$(((total + per_process_max - 1) / per_process_max))"
PROCESSES=${PROCESSES:-$(((CONNECTIONS + 17999) / 18000))}
((PROCESSES >= 1)) || PROCESSES=1
(((CONNECTIONS + PROCESSES - 1) / PROCESSES <= per_process_max)) ||
    die "$((CONNECTIONS / PROCESSES)) connections per bench process exceed $per_process_max: raise PROCESSES"

# Ephemeral ports: ~28k per source address (see the header); use half, so
# TIME_WAIT leftovers of earlier runs and other users never run them out.
read -r port_lo port_hi </proc/sys/net/ipv4/ip_local_port_range
ports=$((port_hi - port_lo + 1))
per_ip=$((ports / 2))
if [[ -z ${SOURCE_IPS:-} ]]; then
    n_ips=$(((total + per_ip - 1) / per_ip))
    ((n_ips >= 1)) || n_ips=1
    ((n_ips <= 250)) || die "needs $n_ips source addresses; set SOURCE_IPS with ranges over 127.0.x.y"
    SOURCE_IPS="127.0.0.2-127.0.0.$((1 + n_ips))"
    # The ping phase uses its own addresses, so it never competes with the
    # held connections for ports.
    PING_SOURCE_IPS="127.0.0.$((2 + n_ips))-127.0.0.$((3 + n_ips))"
else
    PING_SOURCE_IPS=${PING_SOURCE_IPS:-127.0.1.2-127.0.1.3}
fi

conntrack_max=$(cat /proc/sys/net/netfilter/nf_conntrack_max 2>/dev/null || echo 0)
conntrack_count=$(cat /proc/sys/net/netfilter/nf_conntrack_count 2>/dev/null || echo 0)
if ((conntrack_count > 0 && conntrack_max > 0 && total > conntrack_max)); then
    echo "bigrun: warning: conntrack is tracking ($conntrack_count entries) and nf_conntrack_max=$conntrack_max < $total connections" >&2
fi

ramp_timeout=${RAMP_TIMEOUT:-$((CONNECTIONS / 1500 + 60))}
MAX_SECONDS=${MAX_SECONDS:-$((ramp_timeout + DURATION + 300))}
mkdir -p "$OUT_DIR"
work=$(mktemp -d /tmp/bigrun.XXXXXX)
prefix="$OUT_DIR/bigrun-$TAG"

pod_pids=()
bench_pgids=()
redis_pid=
REDIS=${REDIS:-0}
REDIS_PORT=${REDIS_PORT:-$((BASE_PORT - 1))}
REST_S=${REST_S:-10}
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    for g in "${bench_pgids[@]}"; do kill -TERM -- "-$g" 2>/dev/null || true; done
    for p in "${pod_pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    sleep 1
    for g in "${bench_pgids[@]}"; do kill -KILL -- "-$g" 2>/dev/null || true; done
    for p in "${pod_pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
    [[ -n $redis_pid ]] && kill -KILL "$redis_pid" 2>/dev/null
    wait 2>/dev/null || true
    rm -rf "$work"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Whole-run bound: a watchdog that ends this script (and so the trap runs).
# In its own process group, so that stopping it also stops its `sleep`
# (an orphaned sleep would hold this script's stdout open for MAX_SECONDS).
setsid bash -c 'sleep "$1"; echo "bigrun: over MAX_SECONDS=$1, stopping" >&2; kill -TERM "$2"' \
    _ "$MAX_SECONDS" $$ </dev/null >/dev/null &
watchdog=$!
bench_pgids+=("$watchdog")

meminfo() { awk -v k="$1:" '$1 == k { print $2 }' /proc/meminfo; }
sockstat_tcp() { awk -v k="$1" '$1 == "TCP:" { for (i = 2; i < NF; i++) if ($i == k) print $(i + 1) }' /proc/net/sockstat; }
rss_kib() { awk '$1 == "VmRSS:" { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; }

# One JSON object of machine-wide memory facts.
sample() {
    local label=$1 servers=0 p
    for p in "${pod_pids[@]}"; do servers=$((servers + $(rss_kib "$p"))); done
    printf '{"label":"%s","t":%s,"mem_available_kib":%s,"slab_kib":%s,"sunreclaim_kib":%s,"sreclaimable_kib":%s,"tcp_inuse":%s,"tcp_orphan":%s,"tcp_tw":%s,"tcp_mem_pages":%s,"sockets_used":%s,"servers_rss_kib":%s,"conntrack_count":%s}\n' \
        "$label" "$(date +%s)" "$(meminfo MemAvailable)" "$(meminfo Slab)" "$(meminfo SUnreclaim)" \
        "$(meminfo SReclaimable)" "$(sockstat_tcp inuse)" "$(sockstat_tcp orphan)" "$(sockstat_tcp tw)" \
        "$(sockstat_tcp mem)" "$(awk '$1 == "sockets:" { print $3 }' /proc/net/sockstat)" "$servers" \
        "$(cat /proc/sys/net/netfilter/nf_conntrack_count 2>/dev/null || echo 0)"
}

echo "bigrun: $PODS pods, $CONNECTIONS held + $PING_CONNECTIONS pinging connections, $PROCESSES bench processes, sources $SOURCE_IPS (ping: $PING_SOURCE_IPS), hold ${DURATION}s"
sample before_pods >"$work/samples.jsonl"

cluster_args=()
if ((REDIS)); then
    command -v redis-server >/dev/null || die "REDIS=1 needs redis-server"
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
        --dir "$work" --logfile "$work/redis.log" --maxclients 10000 &
    redis_pid=$!
    for _ in $(seq 50); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
    redis-cli -p "$REDIS_PORT" ping >/dev/null || die "redis-server did not start: $(tail -5 "$work/redis.log")"
    cluster_args=(--redis-url "redis://127.0.0.1:$REDIS_PORT")
fi
# Redis facts for the rest window: total commands, CPU seconds, memory.
redis_info() {
    redis-cli -p "$REDIS_PORT" info all | tr -d '\r' | awk -F: '
        $1 == "total_commands_processed" { c = $2 }
        $1 == "used_cpu_user" { u = $2 } $1 == "used_cpu_sys" { s = $2 }
        $1 == "used_memory" { m = $2 }
        END { printf "{\"commands\":%s,\"cpu_s\":%s,\"used_memory\":%s,\"t\":%s}\n", c, u + s, m, systime() }'
}
((REDIS)) && redis_info >"$work/redis-idle.json"

urls=()
for ((i = 0; i < PODS; i++)); do
    port=$((BASE_PORT + i))
    RUST_LOG=${RUST_LOG:-warn} "$WSFLEET_BIN" serve --listen "127.0.0.1:$port" --pod-name "bigrun-$i" \
        --read-buffer-bytes "$READ_BUFFER" --write-buffer-bytes "$WRITE_BUFFER" --heartbeat-s "${HEARTBEAT_S:-25}" \
        --max-connections $((per_pod + 1000)) "${cluster_args[@]}" >"$work/pod-$i.log" 2>&1 &
    pod_pids+=($!)
    urls+=("ws://127.0.0.1:$port/ws")
done
for ((i = 0; i < PODS; i++)); do
    port=$((BASE_PORT + i))
    ok=0
    for _ in $(seq 100); do
        if curl -fsS -m 1 "http://127.0.0.1:$port/healthz" >/dev/null 2>&1; then ok=1; break; fi
        kill -0 "${pod_pids[$i]}" 2>/dev/null || die "pod $i exited: $(tail -5 "$work/pod-$i.log")"
        sleep 0.1
    done
    ((ok)) || die "pod $i not healthy on port $port"
done
sleep 1
sample pods_idle >>"$work/samples.jsonl"

url_list=$(IFS=,; echo "${urls[*]}")
server_pid_args=()
for p in "${pod_pids[@]}"; do server_pid_args+=(--server-pid "$p"); done

# Phase 1: the held connections, in their own process group (killed as one).
setsid timeout -k 10 $((ramp_timeout + DURATION + 120)) "$BENCH_BIN" connect \
    --url "$url_list" --connections "$CONNECTIONS" --processes "$PROCESSES" \
    --source-ips "$SOURCE_IPS" "${server_pid_args[@]}" --duration "$DURATION" \
    --ramp-timeout "$ramp_timeout" --read-buffer "$READ_BUFFER" --write-buffer "$WRITE_BUFFER" \
    ${CONNECT_RATE:+--connect-rate "$CONNECT_RATE"} --connect-retries "${CONNECT_RETRIES:-0}" \
    --json "$prefix-connect.json" >"$work/connect.out" 2>"$work/connect.err" &
connect_pid=$!
bench_pgids+=("$connect_pid")

# Wait until the servers hold every connection (established TCP on loopback
# counts both ends: 2 sockets per connection).
base_inuse=$(sockstat_tcp inuse)
want=$((base_inuse + 2 * CONNECTIONS))
up_deadline=$((SECONDS + ramp_timeout + 30))
# At the edge of what the machine holds some handshakes time out and never
# come back: when the count stops growing for PLATEAU_S seconds, measure
# what is up instead of giving up (the bench's JSON counts the failures).
best=$base_inuse
last_growth=$SECONDS
while :; do
    inuse=$(sockstat_tcp inuse)
    ((inuse >= want)) && break
    if ((inuse > best)); then best=$inuse; last_growth=$SECONDS; fi
    if ((SECONDS - last_growth >= ${PLATEAU_S:-15} && best > base_inuse)); then
        echo "bigrun: ramp stopped growing at about $(((best - base_inuse) / 2)) of $CONNECTIONS connections; measuring those" >&2
        break
    fi
    kill -0 "$connect_pid" 2>/dev/null || die "bench connect ended early: $(tail -20 "$work/connect.err")"
    if ((SECONDS >= up_deadline)); then
        # Still growing (retries trickling in) at the deadline: measure what
        # is up rather than lose the whole run.
        ((inuse > base_inuse)) || die "no connections up in time"
        echo "bigrun: ramp deadline with $(((inuse - base_inuse) / 2)) of $CONNECTIONS connections up; measuring those" >&2
        break
    fi
    sleep 1
done
ramp_seconds=$SECONDS
sleep 3
sample all_connected >>"$work/samples.jsonl"
echo '{}' >"$work/redis-rest.json"
if ((REDIS)); then
    # Every connection held and idle: what Redis does at rest.
    redis_info >"$work/redis-rest-start.json"
    sleep "$REST_S"
    redis_info >"$work/redis-rest-end.json"
    jq -n --slurpfile a "$work/redis-rest-start.json" --slurpfile b "$work/redis-rest-end.json" \
        --slurpfile idle "$work/redis-idle.json" --argjson held "$(((($(sockstat_tcp inuse) - base_inuse)) / 2))" '
        ($a[0]) as $a | ($b[0]) as $b | ($idle[0]) as $i | (($b.t - $a.t) | if . < 1 then 1 else . end) as $dt
        | {window_s: $dt, connections_held: $held,
           commands_per_s: (($b.commands - $a.commands - 1) / $dt),
           cpu_percent: (($b.cpu_s - $a.cpu_s) / $dt * 100),
           used_memory_bytes: $b.used_memory,
           memory_bytes_per_session: (if $held > 0 then ($a.used_memory - $i.used_memory) / $held else null end)}' \
        >"$work/redis-rest.json"
    redis-cli -p "$REDIS_PORT" info commandstats | tr -d '\r' >"$prefix-redis-commandstats.txt"
fi

# Phase 2: pings flow over extra connections while the rest are held.
set +e
timeout -k 10 $((PING_DURATION + 120)) "$BENCH_BIN" ping \
    --url "$url_list" --connections "$PING_CONNECTIONS" --rate "$PING_RATE" \
    --duration "$PING_DURATION" --processes 1 --source-ips "$PING_SOURCE_IPS" \
    --read-buffer "$READ_BUFFER" --write-buffer "$WRITE_BUFFER" \
    --json "$prefix-ping.json" >"$work/ping.out" 2>"$work/ping.err"
ping_rc=$?
sample after_ping >>"$work/samples.jsonl"
wait "$connect_pid"
connect_rc=$?
set -e
bench_pgids=("$watchdog")
sleep 2
sample after_close >>"$work/samples.jsonl"
kill -TERM -- "-$watchdog" 2>/dev/null || true
bench_pgids=()

cp "$work/connect.out" "$prefix-connect.txt"
cp "$work/ping.out" "$prefix-ping.txt"
((connect_rc == 0)) || echo "bigrun: bench connect exited $connect_rc: $(tail -5 "$work/connect.err")" >&2
((ping_rc == 0)) || echo "bigrun: bench ping exited $ping_rc: $(tail -5 "$work/ping.err")" >&2

# The result: parameters, the samples, both bench reports, and the
# per-connection-pair costs derived from them.
jq -n \
    --slurpfile samples "$work/samples.jsonl" \
    --slurpfile connect <(cat "$prefix-connect.json" 2>/dev/null || echo null) \
    --slurpfile ping <(cat "$prefix-ping.json" 2>/dev/null || echo null) \
    --slurpfile redis_rest "$work/redis-rest.json" --argjson redis "$REDIS" \
    --argjson pods "$PODS" --argjson connections "$CONNECTIONS" --argjson processes "$PROCESSES" \
    --argjson duration "$DURATION" --argjson ping_connections "$PING_CONNECTIONS" \
    --arg source_ips "$SOURCE_IPS" --argjson connect_rc "$connect_rc" --argjson ping_rc "$ping_rc" \
    --argjson ramp_wall_s "$ramp_seconds" --argjson read_buffer "$READ_BUFFER" \
    '
    ($samples | map({(.label): .}) | add) as $s
    | ($connect[0]) as $c
    | ($c.memory.connections // 0) as $n
    | def per(x): if $n > 0 then (x * 1024 / $n) else null end;
    {
      redis_at_rest: (if $redis == 1 then $redis_rest[0] else null end),
      params: {pods: $pods, cluster_mode: ($redis == 1), connections: $connections, processes: $processes,
               duration_s: $duration, ping_connections: $ping_connections,
               source_ips: $source_ips, read_buffer: $read_buffer},
      exit_codes: {connect: $connect_rc, ping: $ping_rc},
      samples: $s,
      connections_held: $n,
      handshakes_per_s: $c.rates.handshakes_per_s,
      per_connection_bytes: {
        server_rss: per($s.all_connected.servers_rss_kib - $s.pods_idle.servers_rss_kib),
        client_rss: $c.memory.client_bytes_per_connection,
        kernel_slab: per($s.all_connected.slab_kib - $s.pods_idle.slab_kib),
        kernel_sunreclaim: per($s.all_connected.sunreclaim_kib - $s.pods_idle.sunreclaim_kib),
        tcp_buffers: per(($s.all_connected.tcp_mem_pages - $s.pods_idle.tcp_mem_pages) * 4),
        mem_available_drop: per($s.pods_idle.mem_available_kib - $s.all_connected.mem_available_kib)
      },
      connect: $c,
      ping: $ping[0]
    }
    | .per_connection_bytes.pair_total =
        ((.per_connection_bytes.server_rss // 0) + (.per_connection_bytes.client_rss // 0)
         + (.per_connection_bytes.kernel_slab // 0) + (.per_connection_bytes.tcp_buffers // 0))
    ' >"$prefix.json"

mem_total_kib=$(meminfo MemTotal)
jq -r --argjson mem_total_kib "$mem_total_kib" '
  def kib: if . == null then "n/a" else ((. / 1024 * 100 | round) / 100 | tostring) + " KiB" end;
  def fmt1: if . == null then "n/a" else ((. * 10 | round) / 10 | tostring) end;
  .per_connection_bytes as $p
  | "# bigrun \(.params.pods) pods, \(.params.connections) connections\n",
    "- held: \(.connections_held) of \(.params.connections) (bench exit \(.exit_codes.connect)), \(.params.processes) bench processes, sources \(.params.source_ips)",
    "- handshakes/s: \(.handshakes_per_s | fmt1); handshake p99 \(.connect.latency_ms.handshake.p99_ms | fmt1) ms",
    (if .redis_at_rest then "- cluster mode, Redis at rest over \(.redis_at_rest.window_s) s with \(.redis_at_rest.connections_held) idle connections: \(.redis_at_rest.commands_per_s | fmt1) commands/s, \(.redis_at_rest.cpu_percent | fmt1)% of a core, \(.redis_at_rest.memory_bytes_per_session | fmt1) bytes of Redis memory per idle session" else empty end),
    "- ping phase: \(.ping.counts.ping_sent // 0) sent, \(.ping.counts.pong_received // 0) answered, RTT p50 \(.ping.latency_ms.rtt.p50_ms | fmt1) / p99 \(.ping.latency_ms.rtt.p99_ms | fmt1) / p99.9 \(.ping.latency_ms.rtt.p999_ms | fmt1) ms (bench exit \(.exit_codes.ping))",
    "",
    "| per connection pair | bytes |",
    "|---|---|",
    "| server RSS (all pods) | \($p.server_rss | kib) |",
    "| client RSS (bench) | \($p.client_rss | kib) |",
    "| kernel slab | \($p.kernel_slab | kib) |",
    "| of which unreclaimable | \($p.kernel_sunreclaim | kib) |",
    "| TCP buffers (sockstat mem) | \($p.tcp_buffers | kib) |",
    "| **total** | **\($p.pair_total | kib)** |",
    "| MemAvailable drop (whole machine) | \($p.mem_available_drop | kib) |",
    "",
    (if $p.pair_total > 0 then
      "At this cost, \($mem_total_kib) KiB of RAM (minus 2 GiB for the system) holds about \((($mem_total_kib - 2097152) * 1024 / $p.pair_total) | floor) connection pairs."
     else "" end)
' "$prefix.json" >"$prefix.md"

cat "$prefix.md"
echo "bigrun: wrote $prefix.json, $prefix.md (+ -connect.json/.txt, -ping.json/.txt)"
((connect_rc == 0))
