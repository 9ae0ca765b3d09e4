// direct: backend-to-session messages through the HTTP API.
//
// Each VU holds a connection as its own session and, every
// SEND_INTERVAL_MS, POSTs /v1/sessions/{its session}/messages with
// {"seq":n,"ts":<ms>}. The message comes back on the VU's socket; its
// delivery latency (wsfleet_direct_latency) is "now - ts".
//
// The POST goes through the Service to any pod, while the session lives on
// one pod, so most messages cross pods over the bus: this is the routing
// path the fleet exists for.
//
// What the latency includes: ts is taken just before the POST, and k6 runs
// a socket's callbacks one at a time, so the message is read only after the
// POST has returned. The number is "backend starts the API call" to "client
// has the message", an upper bound on the server's accept-to-deliver time
// (which the fleet's own wsfleet_delivery_latency_seconds histogram shows).
//
// It also checks the delivery guarantee per session: messages arrive in
// the order they were accepted (wsfleet_direct_out_of_order must stay 0);
// duplicates after a resume are counted, not failed (clients dedupe).
//
//   k6 run -e VUS=500 -e DURATION=5m -e SEND_INTERVAL_MS=200 loadtest/k6/direct.js
//
// Env (besides common.js): SEND_INTERVAL_MS (default 1000), PAYLOAD_BYTES
// padding per message (default 0), HOLD_S connection lifetime before a
// normal close + resume with `last` (default 60), and thresholds
// DELIVERY_P99_MS (250), POST_P99_MS (200).

import exec from 'k6/execution';
import { Counter, Trend } from 'k6/metrics';
import {
  DURATION,
  SeqTracker,
  VUS,
  envInt,
  makeRunId,
  padding,
  pauseBeforeReconnect,
  postToSession,
  primeCounters,
  runConnection,
  sessionId,
} from './common.js';

const SEND_INTERVAL_MS = envInt('SEND_INTERVAL_MS', 1000);
const PAYLOAD_BYTES = envInt('PAYLOAD_BYTES', 0);
const HOLD_S = envInt('HOLD_S', 60);

// API call start to message received, in ms.
const latency = new Trend('wsfleet_direct_latency', true);
const delivered = new Counter('wsfleet_direct_delivered');
const duplicates = new Counter('wsfleet_direct_duplicates');
// Delivered on a later connection than the one they were sent on (resume).
const replayed = new Counter('wsfleet_direct_replayed');
// Accepted messages overtaken by a later one (see SeqTracker in common.js).
const outOfOrder = new Counter('wsfleet_direct_out_of_order');
// 202 offset differs from the delivered frame's offset (contract check;
// informational, no threshold).
const offsetMismatch = new Counter('wsfleet_direct_offset_mismatch');

export const options = {
  scenarios: {
    direct: {
      executor: 'constant-vus',
      vus: VUS,
      duration: DURATION,
      gracefulStop: '10s',
    },
  },
  thresholds: {
    wsfleet_direct_latency: [`p(99)<${envInt('DELIVERY_P99_MS', 250)}`],
    // The POST itself (k6 built-in, only the session-message calls).
    'http_req_duration{api:session_message}': [`p(99)<${envInt('POST_P99_MS', 200)}`],
    // Under 0.1% of POSTs may fail (anything but 202).
    wsfleet_api_errors: ['rate<0.001'],
    wsfleet_direct_out_of_order: ['count==0'],
    wsfleet_connect_success: ['rate>0.99'],
    wsfleet_unexpected_close: ['rate<0.01'],
  },
};

export function setup() {
  return { runId: makeRunId() };
}

// Per-VU state that outlives one connection (module scope is per VU in k6):
// the resume point and the ordering tracker.
let lastOffset = '';
const tracker = new SeqTracker();
let seq = 0;
// Connection number, stamped into each message: a message sent on one
// connection and delivered on the next (replayed after the resume) waited
// through the reconnect, so it is counted but kept out of the latency Trend.
let conn = 0;

export default function (data) {
  primeCounters(outOfOrder, duplicates);
  const session = sessionId(data.runId, 'direct', exec.vu.idInTest);
  const pad = padding(PAYLOAD_BYTES);
  const thisConn = ++conn;

  const state = runConnection({
    session,
    last: lastOffset,
    tags: { scenario_kind: 'direct' },
    holdMs: HOLD_S * 1000,
    onWelcome(socket) {
      socket.setInterval(function () {
        const n = seq++;
        const offset = postToSession(session, { seq: n, ts: Date.now(), conn: thisConn, pad }, `${session}:${n}`);
        if (offset !== null) tracker.accepted(n, offset);
      }, SEND_INTERVAL_MS);
    },
    onMessage(socket, f) {
      const d = f.data;
      if (!d || typeof d.seq !== 'number') return;
      const gapsBefore = tracker.gaps;
      const mismatchBefore = tracker.offsetMismatches;
      const kind = tracker.received(d.seq, f.offset);
      if (kind === 'duplicate' || kind === 'late') {
        duplicates.add(1);
        return;
      }
      if (d.conn === thisConn) latency.add(Date.now() - d.ts);
      else replayed.add(1);
      delivered.add(1);
      if (tracker.gaps > gapsBefore) outOfOrder.add(tracker.gaps - gapsBefore);
      if (tracker.offsetMismatches > mismatchBefore) offsetMismatch.add(1);
    },
  });
  lastOffset = state.lastOffset;
  pauseBeforeReconnect(state);
}
