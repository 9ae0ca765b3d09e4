// connect-hold: ramp up to VUS WebSocket connections, hold them idle, ramp down.
//
// What it answers: can the fleet accept this many connections at this ramp
// rate, how long does a connection take to get its welcome, and do idle
// connections stay up (server heartbeats answered, no proxy idle cut, no
// unannounced closes) for the whole hold?
//
// Each VU is one connection (one session). A connection lives HOLD_S
// seconds, then closes normally and the VU reconnects as the same session,
// so a long hold also exercises a slow, steady reconnect churn.
//
//   k6 run -e VUS=5000 -e RAMP=2m -e DURATION=10m loadtest/k6/connect-hold.js
//
// Env (besides common.js): RAMP (default 1m), HOLD_S (default 300),
// PING_S client WebSocket ping period, 0 = only answer the server's
// heartbeats (default 0), and threshold knobs CONNECT_P99_MS (1000),
// WELCOME_P99_MS (2000).

import exec from 'k6/execution';
import {
  DURATION,
  VUS,
  envInt,
  envStr,
  makeRunId,
  pauseBeforeReconnect,
  runConnection,
  sessionId,
} from './common.js';

const RAMP = envStr('RAMP', '1m');
const HOLD_S = envInt('HOLD_S', 300);
const PING_S = envInt('PING_S', 0);

export const options = {
  scenarios: {
    hold: {
      executor: 'ramping-vus',
      startVUs: 0,
      stages: [
        { duration: RAMP, target: VUS },
        { duration: DURATION, target: VUS },
        { duration: RAMP, target: 0 },
      ],
      // Ramping down interrupts a VU mid-connection (k6 closes its socket);
      // no need to wait for a hold to run out.
      gracefulRampDown: '0s',
      gracefulStop: '5s',
    },
  },
  thresholds: {
    // At least 99% of connection attempts get upgraded and welcomed.
    wsfleet_connect_success: ['rate>0.99'],
    // TCP + upgrade time (k6 built-in), and upgrade to welcome frame.
    ws_connecting: [`p(99)<${envInt('CONNECT_P99_MS', 1000)}`],
    wsfleet_welcome_time: [`p(99)<${envInt('WELCOME_P99_MS', 2000)}`],
    // Idle connections must not be closed unannounced: under 1% of closes.
    wsfleet_unexpected_close: ['rate<0.01'],
    checks: ['rate>0.99'],
  },
};

export function setup() {
  return { runId: makeRunId() };
}

export default function (data) {
  const session = sessionId(data.runId, 'hold', exec.vu.idInTest);
  const state = runConnection({
    session,
    tags: { scenario_kind: 'hold' },
    holdMs: HOLD_S * 1000,
    onWelcome(socket) {
      // Protocol-level pings from the client are optional: the server sends
      // heartbeats and k6 answers them. Client pings add a round-trip
      // measurement (k6's built-in ws_ping metric).
      if (PING_S > 0) {
        socket.setInterval(function () {
          socket.ping();
        }, PING_S * 1000);
      }
    },
  });
  pauseBeforeReconnect(state);
}
