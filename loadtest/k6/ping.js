// ping: application-level round-trip time through the gateway.
//
// Each VU holds one connection and sends {"type":"ping","id":n,"data":{..}}
// every PING_INTERVAL_MS; the server answers {"type":"pong","id":n,...}. The
// time between the two is the wsfleet_ping_rtt Trend. Unlike a WebSocket
// control ping (answered by the socket layer), this frame goes through the
// connection's task, its rate limiter and its outbound queue, so it shows how
// busy a pod's connection handling is.
//
//   k6 run -e VUS=200 -e DURATION=5m loadtest/k6/ping.js
//
// Env (besides common.js): PING_INTERVAL_MS (default 1000; stay well under
// the server's --rate-limit-per-sec), HOLD_S connection lifetime before a
// normal reconnect (default 60), and thresholds PING_P99_MS (50),
// PING_P95_MS (20).

import exec from 'k6/execution';
import { Rate, Trend } from 'k6/metrics';
import {
  DURATION,
  VUS,
  envInt,
  errorFrames,
  makeRunId,
  pauseBeforeReconnect,
  primeCounters,
  runConnection,
  sessionId,
} from './common.js';

const PING_INTERVAL_MS = envInt('PING_INTERVAL_MS', 1000);
const HOLD_S = envInt('HOLD_S', 60);

// Ping frame sent to pong frame received, in ms.
const pingRtt = new Trend('wsfleet_ping_rtt', true);
// One sample per ping: true when its pong arrived before the connection
// ended. A missing pong means the frame was dropped or the connection died.
const pongReceived = new Rate('wsfleet_pong_received');

export const options = {
  scenarios: {
    ping: {
      executor: 'constant-vus',
      vus: VUS,
      duration: DURATION,
      gracefulStop: '5s',
    },
  },
  thresholds: {
    wsfleet_ping_rtt: [`p(99)<${envInt('PING_P99_MS', 50)}`, `p(95)<${envInt('PING_P95_MS', 20)}`],
    // Every ping answered (the last one of an interrupted connection may not be).
    wsfleet_pong_received: ['rate>0.999'],
    wsfleet_connect_success: ['rate>0.99'],
    wsfleet_unexpected_close: ['rate<0.01'],
    // `error` frames (e.g. rate_limited) mean the test itself is misconfigured.
    wsfleet_error_frames: ['count==0'],
  },
};

export function setup() {
  return { runId: makeRunId() };
}

export default function (data) {
  primeCounters(errorFrames);
  const session = sessionId(data.runId, 'ping', exec.vu.idInTest);
  // id -> send time (ms) of pings still waiting for their pong.
  const inFlight = {};
  let nextId = 1;

  const state = runConnection({
    session,
    tags: { scenario_kind: 'ping' },
    holdMs: HOLD_S * 1000,
    onWelcome(socket) {
      socket.setInterval(function () {
        const id = nextId++;
        const sentAt = Date.now();
        inFlight[id] = sentAt;
        socket.send(JSON.stringify({ type: 'ping', id, data: { t: sentAt } }));
      }, PING_INTERVAL_MS);
    },
    onFrame(socket, f) {
      if (f.type !== 'pong') return;
      const sentAt = inFlight[f.id];
      if (sentAt === undefined) return; // not ours (or already counted)
      delete inFlight[f.id];
      pingRtt.add(Date.now() - sentAt);
      pongReceived.add(true);
    },
  });

  // Pings the connection ended on without an answer. A ping sent in the
  // last moment before our own close is not counted: its pong may simply not
  // have had time to come back.
  const cutoff = Date.now() - 1000;
  for (const id of Object.keys(inFlight)) {
    if (!state.closedByUs || inFlight[id] < cutoff) pongReceived.add(false);
  }
  pauseBeforeReconnect(state);
}
