// soak: a realistic mix held for hours, to find what only time shows:
// memory growth per connection, leaked subscriptions or timers, log trimming
// that falls behind, latency that creeps up, and resumes that go wrong on the
// hundredth reconnect rather than the first.
//
// Two scenarios:
//   clients     VUS connections. Each holds a session, subscribes to channel
//               (vu mod CHANNELS), sends an application ping every PING_S,
//               POSTs a direct message to itself every DIRECT_EVERY_S, and
//               every HOLD_S closes and resumes (`last` for the session,
//               `since` for the channel). Server-initiated closes (drains
//               during a deploy, 1012 + reconnect) are resumed the same way,
//               so deploying during a soak is part of the test.
//   publishers  PUBLISH_RATE channel messages per second via the HTTP API.
//
// Watch the fleet's dashboard while it runs: RSS per pod divided by its
// connections should stay flat; wsfleet_bus_pending_entries should not grow.
//
//   k6 run -e VUS=2000 -e DURATION=4h loadtest/k6/soak.js
//
// Env (besides common.js; DURATION defaults to 1h here): CHANNELS (10),
// PING_S (15), DIRECT_EVERY_S (10), PUBLISH_RATE (5), HOLD_S (600), WARMUP
// (30s, before the publishers start), and
// thresholds PING_P99_MS (100), DIRECT_P99_MS (500), FANOUT_P99_MS (1000).

import exec from 'k6/execution';
import { Counter, Rate, Trend } from 'k6/metrics';
import {
  SeqTracker,
  VUS,
  channelName,
  envInt,
  envStr,
  makeRunId,
  pauseBeforeReconnect,
  postToChannel,
  postToSession,
  primeCounters,
  runConnection,
  sessionId,
} from './common.js';

const DURATION = envStr('DURATION', '1h');
const CHANNELS = envInt('CHANNELS', 10);
const PING_S = envInt('PING_S', 15);
const DIRECT_EVERY_S = envInt('DIRECT_EVERY_S', 10);
const PUBLISH_RATE = envInt('PUBLISH_RATE', 5);
const HOLD_S = envInt('HOLD_S', 600);
// Publishing starts this long after the clients (they connect and subscribe
// first). A run shorter than it publishes nothing: k6 then passes the fan-out
// threshold on no samples, so short runs must lower it.
const WARMUP = envStr('WARMUP', '30s');

const pingRtt = new Trend('wsfleet_ping_rtt', true);
const directLatency = new Trend('wsfleet_direct_latency', true);
const fanoutLatency = new Trend('wsfleet_fanout_latency', true);
const gaps = new Counter('wsfleet_gaps');
const retentionGaps = new Counter('wsfleet_retention_gaps');
const subscribeOk = new Rate('wsfleet_subscribe_ok');
const published = new Counter('wsfleet_fanout_published');
const received = new Counter('wsfleet_fanout_received');

export const options = {
  scenarios: {
    clients: {
      executor: 'constant-vus',
      exec: 'client',
      vus: VUS,
      duration: DURATION,
      gracefulStop: '15s',
    },
    publishers: {
      executor: 'constant-arrival-rate',
      exec: 'publisher',
      startTime: WARMUP,
      rate: PUBLISH_RATE,
      timeUnit: '1s',
      duration: DURATION,
      preAllocatedVUs: 2,
      maxVUs: Math.max(10, PUBLISH_RATE),
    },
  },
  thresholds: {
    wsfleet_gaps: ['count==0'],
    wsfleet_retention_gaps: ['count==0'],
    wsfleet_ping_rtt: [`p(99)<${envInt('PING_P99_MS', 100)}`],
    wsfleet_direct_latency: [`p(99)<${envInt('DIRECT_P99_MS', 500)}`],
    wsfleet_fanout_latency: [`p(99)<${envInt('FANOUT_P99_MS', 1000)}`],
    wsfleet_connect_success: ['rate>0.99'],
    wsfleet_unexpected_close: ['rate<0.01'],
    wsfleet_subscribe_ok: ['rate>0.999'],
    wsfleet_api_errors: ['rate<0.001'],
  },
};

export function setup() {
  return { runId: makeRunId() };
}

// Per client VU, across its connections.
let lastOffset = '';
let channelOffsets = {};
const tracker = new SeqTracker();
let seq = 0;
let conn = 0;

export function client(data) {
  primeCounters(gaps, retentionGaps);
  const vu = exec.vu.idInTest;
  const session = sessionId(data.runId, 'soak', vu);
  const channel = channelName(data.runId, vu % CHANNELS);
  const thisConn = ++conn;
  const SUB_ID = 1;
  const pings = {};
  let pingId = 100; // ids below 100 are left for other requests (SUB_ID)
  let subscribedAt = Infinity;

  const state = runConnection({
    session,
    last: lastOffset,
    channelOffsets,
    tags: { scenario_kind: 'soak' },
    holdMs: HOLD_S * 1000,
    onWelcome(socket, welcome) {
      if (welcome.gap) retentionGaps.add(1);
      const sub = { type: 'subscribe', channel, id: SUB_ID };
      if (channelOffsets[channel]) sub.since = channelOffsets[channel];
      socket.send(JSON.stringify(sub));

      socket.setInterval(function () {
        const id = pingId++;
        pings[id] = Date.now();
        socket.send(JSON.stringify({ type: 'ping', id, data: null }));
      }, PING_S * 1000);

      socket.setInterval(function () {
        const n = seq++;
        const offset = postToSession(session, { seq: n, ts: Date.now(), conn: thisConn }, `${session}:${n}`);
        if (offset !== null) tracker.accepted(n, offset);
      }, DIRECT_EVERY_S * 1000);
    },
    onFrame(socket, f) {
      if (f.type === 'pong' && pings[f.id] !== undefined) {
        pingRtt.add(Date.now() - pings[f.id]);
        delete pings[f.id];
      } else if (f.id === SUB_ID && f.type === 'ack') {
        subscribeOk.add(true);
        subscribedAt = Date.now();
      } else if (f.id === SUB_ID && f.type === 'error') {
        subscribeOk.add(false);
      }
    },
    onMessage(socket, f) {
      const d = f.data;
      if (!d || typeof d.ts !== 'number') return;
      if (f.channel) {
        if (f.channel !== channel) return;
        received.add(1);
        if (d.ts >= subscribedAt) fanoutLatency.add(Date.now() - d.ts);
        return;
      }
      if (typeof d.seq !== 'number') return;
      const before = tracker.gaps;
      const kind = tracker.received(d.seq, f.offset);
      if (tracker.gaps > before) gaps.add(tracker.gaps - before);
      if (kind !== 'duplicate' && kind !== 'late' && d.conn === thisConn) {
        directLatency.add(Date.now() - d.ts);
      }
    },
  });
  lastOffset = state.lastOffset;
  channelOffsets = state.channelOffsets;
  pauseBeforeReconnect(state);
}

export function publisher(data) {
  const n = exec.scenario.iterationInTest;
  const channel = channelName(data.runId, n % CHANNELS);
  if (postToChannel(channel, { n, ts: Date.now() }) !== null) published.add(1);
}
