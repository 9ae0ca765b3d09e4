// Shared helpers for the wsfleet k6 scripts: configuration from environment
// variables, URLs, auth, frame parsing and the metrics every script reports.
//
// It sits next to the scripts (not in a sub-directory) because the k6-operator
// mounts a ConfigMap as one flat directory and ConfigMap keys cannot contain
// '/': `import ... from './common.js'` then works both locally and in-cluster.
//
// Environment:
//   WSFLEET_URL      ws base URL, e.g. ws://127.0.0.1:8080 (default)
//   WSFLEET_HTTP     http base URL for the backend API (default: WSFLEET_URL
//                    with ws->http, wss->https)
//   WSFLEET_TOKEN    one JWT used for every connection (auth mode jwt). A JWT
//                    names ONE session (claim sid/sub), so this only suits
//                    single-session runs; for many VUs use the next one.
//   WSFLEET_JWT_HS256_SECRET  test secret: mint an HS256 JWT per session
//                    (sid = the session id the script picked, exp = 1h,
//                    channels = WSFLEET_JWT_CHANNELS, default "k6.*").
//   WSFLEET_API_KEY  bearer key for the HTTP API (when the fleet has one)
//   VUS, DURATION    load shape; each script documents how it uses them
//   RUN_ID           prefix for session and channel names. Defaults to one
//                    value per run made in setup(); set it explicitly for a
//                    distributed (k6-operator) run so all runners agree.

import http from 'k6/http';
import ws from 'k6/ws';
import crypto from 'k6/crypto';
import encoding from 'k6/encoding';
import { Counter, Rate, Trend } from 'k6/metrics';
import { check, sleep } from 'k6';

export function envInt(name, dflt) {
  const v = __ENV[name];
  if (v === undefined || v === '') return dflt;
  const n = parseInt(v, 10);
  if (Number.isNaN(n)) throw new Error(`${name} must be an integer, got "${v}"`);
  return n;
}

export function envNum(name, dflt) {
  const v = __ENV[name];
  if (v === undefined || v === '') return dflt;
  const n = Number(v);
  if (Number.isNaN(n)) throw new Error(`${name} must be a number, got "${v}"`);
  return n;
}

export function envStr(name, dflt) {
  const v = __ENV[name];
  return v === undefined || v === '' ? dflt : v;
}

const trimSlash = (s) => s.replace(/\/+$/, '');

export const WS_URL = trimSlash(envStr('WSFLEET_URL', 'ws://127.0.0.1:8080'));
export const HTTP_URL = trimSlash(envStr('WSFLEET_HTTP', WS_URL.replace(/^ws(s?):/, 'http$1:')));
export const TOKEN = envStr('WSFLEET_TOKEN', '');
export const JWT_SECRET = envStr('WSFLEET_JWT_HS256_SECRET', '');
export const JWT_CHANNELS = envStr('WSFLEET_JWT_CHANNELS', 'k6.*').split(',');
export const API_KEY = envStr('WSFLEET_API_KEY', '');
export const VUS = envInt('VUS', 10);
export const DURATION = envStr('DURATION', '1m');

// ---------------------------------------------------------------- metrics
// Shared by all scripts, so thresholds mean the same thing everywhere.

// One sample per connection attempt: true when the upgrade succeeded AND the
// welcome frame arrived. The headline "connection success rate".
export const connectSuccess = new Rate('wsfleet_connect_success');
// Upgrade request to welcome frame, in ms (handshake, auth, ownership claim).
export const welcomeTime = new Trend('wsfleet_welcome_time', true);
// Closes the script did not ask for and that the protocol does not announce:
// anything except a 1012/1001 drain/rebalance (which follows a `reconnect`
// frame) or 1013 backpressure. One sample per close.
export const unexpectedClose = new Rate('wsfleet_unexpected_close');
// Server-initiated closes by code, e.g. {code: "1012"}: context for the above.
export const serverCloses = new Counter('wsfleet_server_closes');
// `error` frames from the server (the connection stays open), by code.
export const errorFrames = new Counter('wsfleet_error_frames');
// HTTP API calls that did not return the expected status.
export const apiErrors = new Rate('wsfleet_api_errors');
// Session POSTs retried once with the same Idempotency-Key.
export const apiRetries = new Counter('wsfleet_api_retries');
// Transport errors reported by the WebSocket (resets, unexpected EOF).
export const wsErrors = new Counter('wsfleet_ws_errors');

// ---------------------------------------------------------------- naming

// Run id made once in setup() and handed to every VU through setup data.
export function makeRunId() {
  return envStr('RUN_ID', `r${Date.now().toString(36)}`);
}

// Session ids: [A-Za-z0-9._:-]{1,128}.
export function sessionId(runId, kind, ...parts) {
  return ['k6', runId, kind].concat(parts).join('.');
}

// Channel names share the "k6." prefix so one JWT channel pattern (k6.*)
// covers every run.
export function channelName(runId, n) {
  return `k6.${runId}.ch${n}`;
}

// ---------------------------------------------------------------- auth

function jwtFor(session) {
  const header = encoding.b64encode(JSON.stringify({ alg: 'HS256', typ: 'JWT' }), 'rawurl');
  const claims = {
    sid: session,
    sub: session,
    exp: Math.floor(Date.now() / 1000) + 3600,
    channels: JWT_CHANNELS,
  };
  const body = encoding.b64encode(JSON.stringify(claims), 'rawurl');
  const sig = crypto.hmac('sha256', JWT_SECRET, `${header}.${body}`, 'base64rawurl');
  return `${header}.${body}.${sig}`;
}

// URL for GET /ws. `last` is the last offset the client processed (resume).
export function wsUrl(session, last) {
  let url = `${WS_URL}/ws?session=${encodeURIComponent(session)}`;
  if (last) url += `&last=${encodeURIComponent(last)}`;
  return url;
}

// Params for ws.connect: the token goes in a header, not the query string,
// so it does not end up in access logs.
export function wsParams(session, tags) {
  const headers = {};
  const token = JWT_SECRET ? jwtFor(session) : TOKEN;
  if (token) headers.Authorization = `Bearer ${token}`;
  return { headers, tags: tags || {} };
}

export function apiParams(tags, extraHeaders) {
  const headers = Object.assign({ 'Content-Type': 'application/json' }, extraHeaders || {});
  if (API_KEY) headers.Authorization = `Bearer ${API_KEY}`;
  return { headers, tags: tags || {} };
}

// POST /v1/sessions/{session}/messages. Returns the offset, or null.
// With an idempotency key a failed attempt (5xx or no response) is retried
// once with the same key: the server must then return the first offset, not
// store the message twice (a duplicate shows up as a duplicate seq).
export function postToSession(session, data, idempotencyKey) {
  const extra = idempotencyKey ? { 'Idempotency-Key': idempotencyKey } : {};
  const url = `${HTTP_URL}/v1/sessions/${encodeURIComponent(session)}/messages`;
  const body = JSON.stringify({ data });
  const params = apiParams({ api: 'session_message' }, extra);
  let res = http.post(url, body, params);
  if (idempotencyKey && (res.status === 0 || res.status >= 500)) {
    apiRetries.add(1);
    res = http.post(url, body, params);
  }
  const ok = res.status === 202;
  apiErrors.add(!ok, { api: 'session_message' });
  return ok ? res.json('offset') : null;
}

// POST /v1/channels/{channel}/messages. Returns the offset, or null.
export function postToChannel(channel, data) {
  const res = http.post(
    `${HTTP_URL}/v1/channels/${encodeURIComponent(channel)}/messages`,
    JSON.stringify({ data }),
    apiParams({ api: 'channel_message' }),
  );
  const ok = res.status === 202;
  apiErrors.add(!ok, { api: 'channel_message' });
  return ok ? res.json('offset') : null;
}

// ---------------------------------------------------------------- frames

// Parse one server frame; a frame that is not JSON is reported and skipped.
export function parseFrame(raw) {
  try {
    return JSON.parse(raw);
  } catch (e) {
    errorFrames.add(1, { code: 'unparseable' });
    return null;
  }
}

// Close codes the protocol announces or uses for flow control, where the
// client is expected to come back (with `last`) rather than treat it as a
// failure: 1001 pod shutting down, 1012 drain/rebalance, 1013 try later
// (overload or slow consumer).
export const RESUMABLE_CLOSES = [1001, 1012, 1013];

// Record a close the script did not initiate. Returns true when it is one
// the client should simply resume from.
export function recordServerClose(code) {
  serverCloses.add(1, { code: String(code) });
  const resumable = RESUMABLE_CLOSES.indexOf(code) !== -1;
  unexpectedClose.add(!resumable, { code: String(code) });
  return resumable;
}

// Payload padding so message size can be varied (PAYLOAD_BYTES).
export function padding(bytes) {
  return bytes > 0 ? 'x'.repeat(bytes) : undefined;
}

// Adds a zero to each counter, so that on a clean run the metric exists with
// value 0 and its `count==0` threshold is checked against that, not against
// a metric that never received a sample.
export function primeCounters(...counters) {
  for (const c of counters) c.add(0);
}

// ---------------------------------------------------------------- ordering

// Tracks the sequence numbers a script put into direct messages to its own
// session, to check the delivery guarantee: every accepted (202) message
// arrives, in order, at least once. Sequence numbers are the script's own
// (offsets are opaque and may not be compared or counted).
//   accepted(seq, offset)  after a 202
//   received(seq, offset)  for every delivered copy; returns
//     'new'        first delivery, in order
//     'duplicate'  delivered before (replay overlap after a resume); the
//                  application would drop it by offset
//     'gap'        first delivery, but earlier accepted messages were skipped
//                  (each one counted in `gaps`)
//     'late'       arrived after a later message: already counted as a gap
// A gap is an accepted message that a later message overtook: in-order
// delivery means it can no longer arrive in its place, and a client that
// resumes from the later message's offset never sees it.
export class SeqTracker {
  constructor() {
    // seq -> offset returned by the 202, until the message is delivered.
    this.outstanding = {};
    // Highest seq delivered so far.
    this.maxSeen = -1;
    // Seqs counted as gaps, so a late arrival is not taken for a duplicate.
    this.skipped = {};
    this.gaps = 0;
    this.offsetMismatches = 0;
  }

  accepted(seq, offset) {
    this.outstanding[seq] = offset;
  }

  received(seq, offset) {
    if (this.skipped[seq]) {
      delete this.skipped[seq];
      return 'late';
    }
    if (seq <= this.maxSeen) return 'duplicate';
    let newGaps = 0;
    for (const k of Object.keys(this.outstanding)) {
      const s = Number(k);
      if (s < seq) {
        delete this.outstanding[k];
        this.skipped[s] = true;
        newGaps++;
      }
    }
    const expectOffset = this.outstanding[seq];
    if (expectOffset !== undefined && offset !== undefined && expectOffset !== offset) {
      this.offsetMismatches++;
    }
    delete this.outstanding[seq];
    this.maxSeen = seq;
    this.gaps += newGaps;
    return newGaps > 0 ? 'gap' : 'new';
  }

  pending() {
    return Object.keys(this.outstanding).length;
  }
}

// ---------------------------------------------------------------- one connection

const WELCOME_TIMEOUT_MS = envInt('WELCOME_TIMEOUT_MS', 10000);

// Opens one WebSocket and runs it until it closes. k6/ws is blocking: this
// returns only after the connection is closed. Options:
//   session, last        who to connect as, and where to resume from
//   tags                 extra metric tags
//   holdMs               close (1000) this long after the welcome; 0 = never
//   onWelcome(socket, frame, close)   start timers, subscribe, ...
//   onMessage(socket, frame)          every `message` frame
//   onFrame(socket, frame)            every other frame (pong, ack, ...)
// Returns { welcomed, welcome, closedByUs, code, reconnectAfterMs,
//           lastOffset, channelOffsets, error }.
// lastOffset is the offset of the last direct message handed to onMessage:
// pass it as `last` on the next connect to resume.
export function runConnection(o) {
  const state = {
    welcomed: false,
    welcome: null,
    closedByUs: false,
    code: 0,
    reconnectAfterMs: 0,
    lastOffset: o.last || '',
    channelOffsets: o.channelOffsets || {},
    error: '',
  };
  // One connectSuccess sample per attempt, whichever way it ends.
  let outcomeRecorded = false;
  const outcome = function (ok, reason) {
    if (outcomeRecorded) return;
    outcomeRecorded = true;
    connectSuccess.add(ok, ok ? {} : { reason });
  };
  const t0 = Date.now();
  let res;
  try {
    res = ws.connect(wsUrl(o.session, o.last), wsParams(o.session, o.tags), function (socket) {
      const close = function () {
        state.closedByUs = true;
        socket.close(1000);
      };

      socket.on('message', function (raw) {
        const f = parseFrame(raw);
        if (!f) return;
        if (f.type === 'welcome') {
          state.welcomed = true;
          state.welcome = f;
          welcomeTime.add(Date.now() - t0);
          outcome(true);
          if (o.holdMs > 0) socket.setTimeout(close, o.holdMs);
          if (o.onWelcome) o.onWelcome(socket, f, close);
        } else if (f.type === 'message') {
          if (o.onMessage) o.onMessage(socket, f);
          // Only after the script processed it: that is what `last` means.
          if (f.channel) state.channelOffsets[f.channel] = f.offset;
          else if (f.offset) state.lastOffset = f.offset;
        } else if (f.type === 'reconnect') {
          // Sent just before a 1012: come back after this (jittered) delay.
          state.reconnectAfterMs = f.after_ms || 0;
        } else if (f.type === 'error') {
          errorFrames.add(1, { code: String(f.code || 'unknown') });
          if (o.onFrame) o.onFrame(socket, f);
        } else if (o.onFrame) {
          o.onFrame(socket, f);
        }
      });

      socket.on('error', function (e) {
        wsErrors.add(1);
        state.error = String(e && e.error ? e.error() : e);
      });

      socket.on('close', function (code) {
        state.code = code;
        if (!state.welcomed) outcome(false, 'closed_before_welcome');
        if (state.closedByUs) unexpectedClose.add(false);
        else recordServerClose(code);
      });

      socket.setTimeout(function () {
        if (!state.welcomed) {
          outcome(false, 'no_welcome');
          state.closedByUs = true;
          socket.close(1000);
        }
      }, WELCOME_TIMEOUT_MS);
    });
  } catch (e) {
    // The upgrade was refused (401/403/503...) or the TCP connect failed.
    outcome(false, 'handshake');
    state.error = String(e);
    return state;
  }
  check(res, { 'upgrade answered 101': (r) => r && r.status === 101 });
  return state;
}

// Pause between connections of one VU: the server's `reconnect` delay if it
// sent one, a short jittered back-off after a failure or an unannounced
// close (so a broken fleet is not hammered in a tight loop), none after a
// close the script asked for.
export function pauseBeforeReconnect(state) {
  if (state.reconnectAfterMs > 0) {
    sleep(state.reconnectAfterMs / 1000);
  } else if (!state.welcomed || !state.closedByUs) {
    sleep(0.5 + Math.random() * 1.5);
  }
}
