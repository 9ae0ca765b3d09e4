// fanout: channel publishes reaching every subscriber on every pod.
//
// Two scenarios run side by side:
//   subscribers  VUS connections; VU i subscribes to channel (i mod CHANNELS),
//                so each channel has about VUS/CHANNELS subscribers spread
//                over the fleet's pods.
//   publishers   PUBLISH_RATE channel messages per second through the HTTP
//                API (POST /v1/channels/{channel}/messages), round-robin over
//                the channels, starting once the subscribers are connected.
// Every subscriber measures "now - ts" for each message it receives
// (wsfleet_fanout_latency). Publisher and subscribers must share a clock:
// true for a local run; in a distributed run the runner pods' clocks must be
// in sync (NTP), or the latency is off by their skew.
//
// Expected deliveries are about wsfleet_fanout_published x VUS/CHANNELS
// (both counters are in the end-of-test summary). Subscribers that are
// reconnecting miss live messages and get them replayed (`since`), so the
// ratio stays near 1 while the fleet keeps its guarantee.
//
//   k6 run -e VUS=2000 -e CHANNELS=20 -e PUBLISH_RATE=50 -e DURATION=5m loadtest/k6/fanout.js
//
// Env (besides common.js): CHANNELS (default 10), PUBLISH_RATE per second
// (default 10), WARMUP start delay of the publishers (default 30s),
// PAYLOAD_BYTES (default 0), HOLD_S subscriber connection lifetime before a
// normal close + resubscribe with `since` (default 120), and thresholds
// FANOUT_P99_MS (500), PUBLISH_P99_MS (200).

import exec from 'k6/execution';
import { Counter, Rate, Trend } from 'k6/metrics';
import {
  DURATION,
  VUS,
  channelName,
  envInt,
  envStr,
  makeRunId,
  padding,
  pauseBeforeReconnect,
  postToChannel,
  runConnection,
  sessionId,
} from './common.js';

const CHANNELS = envInt('CHANNELS', 10);
const PUBLISH_RATE = envInt('PUBLISH_RATE', 10);
const WARMUP = envStr('WARMUP', '30s');
const PAYLOAD_BYTES = envInt('PAYLOAD_BYTES', 0);
const HOLD_S = envInt('HOLD_S', 120);

// Publish (API call start) to message received by a subscriber, in ms.
const latency = new Trend('wsfleet_fanout_latency', true);
const published = new Counter('wsfleet_fanout_published');
const received = new Counter('wsfleet_fanout_received');
// One sample per subscribe request: true when it was acked.
const subscribeOk = new Rate('wsfleet_subscribe_ok');

export const options = {
  scenarios: {
    subscribers: {
      executor: 'constant-vus',
      exec: 'subscriber',
      vus: VUS,
      duration: DURATION,
      gracefulStop: '10s',
    },
    publishers: {
      executor: 'constant-arrival-rate',
      exec: 'publisher',
      startTime: WARMUP,
      rate: PUBLISH_RATE,
      timeUnit: '1s',
      duration: DURATION,
      // Each iteration is one POST; a few VUs cover the rate unless the API
      // slows down, when k6 allocates more (up to maxVUs) to keep the rate.
      preAllocatedVUs: Math.max(2, Math.ceil(PUBLISH_RATE / 20)),
      maxVUs: Math.max(10, PUBLISH_RATE),
    },
  },
  thresholds: {
    wsfleet_fanout_latency: [`p(99)<${envInt('FANOUT_P99_MS', 500)}`],
    'http_req_duration{api:channel_message}': [`p(99)<${envInt('PUBLISH_P99_MS', 200)}`],
    wsfleet_api_errors: ['rate<0.001'],
    wsfleet_subscribe_ok: ['rate>0.999'],
    wsfleet_connect_success: ['rate>0.99'],
    wsfleet_unexpected_close: ['rate<0.01'],
    // The arrival-rate executor could not keep up (too few VUs): the test
    // did not produce the load it claims.
    dropped_iterations: ['count==0'],
  },
};

export function setup() {
  return { runId: makeRunId() };
}

// Per subscriber VU: the channel offset to resubscribe from (`since`).
let channelOffsets = {};

export function subscriber(data) {
  const vu = exec.vu.idInTest;
  const channel = channelName(data.runId, vu % CHANNELS);
  const session = sessionId(data.runId, 'sub', vu);
  const SUB_ID = 1;
  // When the subscription was acked: messages published before it reach us
  // as a replay (after `since`) and waited through our reconnect, so they
  // are counted but kept out of the latency Trend.
  let subscribedAt = Infinity;

  const state = runConnection({
    session,
    channelOffsets,
    tags: { scenario_kind: 'fanout' },
    holdMs: HOLD_S * 1000,
    onWelcome(socket) {
      const sub = { type: 'subscribe', channel, id: SUB_ID };
      // Resume the channel where the last connection left off.
      if (channelOffsets[channel]) sub.since = channelOffsets[channel];
      socket.send(JSON.stringify(sub));
    },
    onFrame(socket, f) {
      if (f.id !== SUB_ID) return;
      if (f.type === 'ack') {
        subscribeOk.add(true);
        subscribedAt = Date.now();
      } else if (f.type === 'error') {
        subscribeOk.add(false);
      }
    },
    onMessage(socket, f) {
      if (f.channel !== channel || !f.data || typeof f.data.ts !== 'number') return;
      if (f.data.ts >= subscribedAt) latency.add(Date.now() - f.data.ts);
      received.add(1);
    },
  });
  channelOffsets = state.channelOffsets;
  pauseBeforeReconnect(state);
}

const pad = padding(PAYLOAD_BYTES);

export function publisher(data) {
  const n = exec.scenario.iterationInTest;
  const channel = channelName(data.runId, n % CHANNELS);
  if (postToChannel(channel, { n, ts: Date.now(), pad }) !== null) published.add(1);
}
