// reconnect-storm: everyone drops at once and resumes with `last`; nothing
// may be missed.
//
// Each VU owns one session and runs rounds:
//   1. connect with last=<offset of the last message it processed>
//   2. while connected, POST a message to its own session every
//      SEND_INTERVAL_MS ({"seq":n,...}, with an Idempotency-Key)
//   3. at the next multiple of STORM_PERIOD_S on the wall clock (plus up to
//      STORM_JITTER_MS), drop the connection. All VUs share the clock, so
//      they all drop and reconnect together: a reconnect storm.
//   4. while disconnected, POST OFFLINE_MESSAGES more: these exist only in
//      the session's log and must come back through the resume.
// Every delivered message is checked against the accepted ones
// (SeqTracker in common.js): an accepted message that a later one overtook
// is a gap. wsfleet_gaps must be 0. Duplicates (replay overlap) are fine:
// clients dedupe by offset.
//
// It tolerates, and is worth running during, `kubectl rollout restart` of
// the fleet, a Redis failover, or pod kills: server closes (1012 with
// `reconnect`, 1001, 1013, resets) are resumed the same way.
//
//   k6 run -e VUS=1000 -e DURATION=5m -e STORM_PERIOD_S=30 loadtest/k6/reconnect-storm.js
//
// Env (besides common.js): STORM_PERIOD_S (default 30), STORM_JITTER_MS
// (default 500), SEND_INTERVAL_MS (default 500), OFFLINE_MESSAGES (default
// 3), and thresholds RESUME_P99_MS (3000), DELIVERY_P99_MS (500).
// Keep messages per session within the fleet's retention (defaults: 1000
// messages / 300 s), or resumes report gap:true by design
// (wsfleet_retention_gaps).

import exec from 'k6/execution';
import { Counter, Trend } from 'k6/metrics';
import {
  DURATION,
  SeqTracker,
  VUS,
  envInt,
  makeRunId,
  pauseBeforeReconnect,
  postToSession,
  primeCounters,
  runConnection,
  sessionId,
} from './common.js';

const STORM_PERIOD_S = envInt('STORM_PERIOD_S', 30);
const STORM_JITTER_MS = envInt('STORM_JITTER_MS', 500);
const SEND_INTERVAL_MS = envInt('SEND_INTERVAL_MS', 500);
const OFFLINE_MESSAGES = envInt('OFFLINE_MESSAGES', 3);

// Accepted messages that never arrived in their place (must stay 0).
const gaps = new Counter('wsfleet_gaps');
// Welcome frames with gap:true: the server itself says messages after
// `last` were past retention. A test sized within retention expects 0.
const retentionGaps = new Counter('wsfleet_retention_gaps');
const duplicates = new Counter('wsfleet_resume_duplicates');
const delivered = new Counter('wsfleet_resume_delivered');
// Drop to welcome on the new connection, in ms (includes the pause the
// server asked for with `reconnect`, if any).
const resumeTime = new Trend('wsfleet_resume_time', true);
// Live (sent while connected) message latency, API call start to receipt.
const latency = new Trend('wsfleet_storm_delivery_latency', true);
// Welcomes that did not report resumed:true although `last` was sent.
const notResumed = new Counter('wsfleet_not_resumed');

export const options = {
  scenarios: {
    storm: {
      executor: 'constant-vus',
      vus: VUS,
      duration: DURATION,
      gracefulStop: '10s',
    },
  },
  thresholds: {
    // The point of the test: no accepted message is lost or reordered.
    wsfleet_gaps: ['count==0'],
    wsfleet_retention_gaps: ['count==0'],
    wsfleet_resume_time: [`p(99)<${envInt('RESUME_P99_MS', 3000)}`],
    wsfleet_storm_delivery_latency: [`p(99)<${envInt('DELIVERY_P99_MS', 500)}`],
    // During a storm a few upgrades may be refused (pod at capacity, 503)
    // and retried; 98% must succeed at the first attempt.
    wsfleet_connect_success: ['rate>0.98'],
    wsfleet_api_errors: ['rate<0.001'],
  },
};

export function setup() {
  return { runId: makeRunId() };
}

// Per-VU state across rounds (module scope is per VU).
let lastOffset = '';
const tracker = new SeqTracker();
let seq = 0;
let conn = 0;
let droppedAt = 0;

function send(session, offline) {
  const n = seq++;
  const offset = postToSession(
    session,
    { seq: n, ts: Date.now(), conn: offline ? 0 : conn },
    `${session}:${n}`,
  );
  if (offset !== null) tracker.accepted(n, offset);
}

// Milliseconds until the next shared drop instant.
function untilNextStorm() {
  const period = STORM_PERIOD_S * 1000;
  const wait = period - (Date.now() % period);
  return wait + Math.floor(Math.random() * STORM_JITTER_MS);
}

export default function (data) {
  primeCounters(gaps, retentionGaps);
  const session = sessionId(data.runId, 'storm', exec.vu.idInTest);
  const thisConn = ++conn;
  const resuming = lastOffset !== '';

  const state = runConnection({
    session,
    last: lastOffset,
    tags: { scenario_kind: 'storm' },
    onWelcome(socket, welcome, close) {
      if (droppedAt) resumeTime.add(Date.now() - droppedAt);
      if (welcome.gap) retentionGaps.add(1);
      if (resuming && welcome.resumed === false) notResumed.add(1);
      socket.setInterval(function () {
        send(session, false);
      }, SEND_INTERVAL_MS);
      socket.setTimeout(close, untilNextStorm());
    },
    onMessage(socket, f) {
      const d = f.data;
      if (!d || typeof d.seq !== 'number') return;
      const before = tracker.gaps;
      const kind = tracker.received(d.seq, f.offset);
      if (tracker.gaps > before) gaps.add(tracker.gaps - before);
      if (kind === 'duplicate' || kind === 'late') {
        duplicates.add(1);
        return;
      }
      delivered.add(1);
      if (d.conn === thisConn) latency.add(Date.now() - d.ts);
    },
  });

  // Resume time counts from the moment a working connection went away, so
  // a failed attempt in between adds to it instead of restarting it.
  if (state.welcomed) droppedAt = Date.now();
  lastOffset = state.lastOffset;
  // Messages accepted while this session has no connection: only the log
  // holds them, and the next connect must replay them.
  for (let i = 0; i < OFFLINE_MESSAGES; i++) send(session, true);
  pauseBeforeReconnect(state);
}
