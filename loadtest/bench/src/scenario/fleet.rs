//! A fleet of client connections: one task each, driven through the phases
//! of a run by one watch channel.
//!
//! Per connection the bench keeps one task whose future holds the socket,
//! its small tungstenite buffers, a phase receiver and the scenario's loop
//! state (design/traps.md, item 12). The handshake, which needs much more
//! state than the idle loop, runs in a boxed future that is freed once the
//! connection is up, so it does not enlarge every idle task.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::Either;
use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::{Instant, timeout_at};
use tokio_tungstenite::tungstenite::Message;

use super::{Common, Share};
use crate::Result;
use crate::client::{Dialer, Ws, read_welcome};
use crate::protocol::{Offset, ServerFrame};
use crate::stats::Stats;

/// Where a run is. Connections read and answer pings in every phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// Connections are being opened.
    Setup,
    /// The scenario's work is under way.
    Run,
    /// No new work; in-flight work may still complete.
    Drain,
    /// Close and finish.
    Stop,
}

/// What a connection's loop sees next.
#[derive(Debug)]
pub enum Event {
    Frame(ServerFrame),
    Phase(Phase),
    /// The connection was lost (or the server asked us to move) and has been
    /// re-established with `last`; subscriptions must be renewed.
    Reconnected,
    /// The connection is gone for good.
    Ended,
}

/// Whether a delivered offset is news for this connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Observed {
    New(Offset),
    /// At or below the last offset processed: the client dedupes it.
    Duplicate,
    Unparsable,
}

/// Reports once whether a connection became ready (connected, subscribed);
/// dropped unfired, it reports failure, so the ramp never waits for it.
pub struct Ready(Option<mpsc::UnboundedSender<bool>>);

impl Ready {
    pub fn fire(mut self, ok: bool) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(ok);
        }
    }
}

impl Drop for Ready {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(false);
        }
    }
}

/// One live connection as a scenario's loop sees it.
pub struct Conn {
    /// Connection number over the whole run (all processes).
    pub global: usize,
    /// Connection number within this process.
    pub local: usize,
    pub session: String,
    pub ws: Ws,
    /// Last direct-message offset processed, presented as `last` on resume.
    pub last: Option<Offset>,
    pub stats: Arc<Stats>,
    dialer: Arc<Dialer>,
    phase: watch::Receiver<Phase>,
    /// Delay the server asked for in its `reconnect` frame.
    reconnect_after: Option<Duration>,
    /// The socket has failed and the next `next_event` reconnects.
    broken: bool,
}

/// Reconnect attempts before a connection gives up.
const RECONNECT_ATTEMPTS: u32 = 5;

impl Conn {
    pub fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    /// True while the socket is down; timers that would send should wait.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Waits for the next frame or phase change, reconnecting (with `last`)
    /// when the server closes or the socket fails before `Stop`.
    pub async fn next_event(&mut self) -> Event {
        loop {
            if self.broken {
                // Boxed: resuming needs a timer and a whole handshake, and
                // inline it would enlarge every idle connection's future
                // (see the module docs).
                return Box::pin(self.resume(false)).await;
            }
            tokio::select! {
                changed = self.phase.changed() => {
                    return match changed {
                        Ok(()) => Event::Phase(*self.phase.borrow_and_update()),
                        Err(_) => Event::Phase(Phase::Stop),
                    };
                }
                msg = self.ws.next() => match msg {
                    Some(Ok(Message::Text(text))) => match ServerFrame::parse(&text) {
                        Ok(frame) => {
                            match &frame {
                                ServerFrame::Reconnect { after_ms } => {
                                    self.stats.incr("server_reconnect_frames");
                                    self.reconnect_after =
                                        Some(Duration::from_millis((*after_ms).min(60_000)));
                                }
                                ServerFrame::Error { code, .. } => {
                                    self.stats.incr(&format!("server_error.{code}"));
                                }
                                _ => {}
                            }
                            return Event::Frame(frame);
                        }
                        Err(e) => self.stats.error("bad_frame", &e),
                    },
                    Some(Ok(Message::Close(frame))) => {
                        let code = frame.map(|f| u16::from(f.code)).unwrap_or(1005);
                        self.stats.incr(&format!("closed_by_server.{code}"));
                        self.broken = true;
                    }
                    // tungstenite answers WebSocket pings by itself while we read.
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        self.stats.error("connection_lost", &e.into());
                        self.broken = true;
                    }
                    None => {
                        self.stats.incr("connection_lost.eof");
                        self.broken = true;
                    }
                },
            }
        }
    }

    /// Records `offset` as processed unless it is not newer than `last`.
    pub fn observe(&mut self, offset: &str) -> Observed {
        match offset.parse::<Offset>() {
            Err(e) => {
                self.stats.error("bad_offset", &e);
                Observed::Unparsable
            }
            Ok(o) if self.last.is_some_and(|l| o <= l) => Observed::Duplicate,
            Ok(o) => {
                self.last = Some(o);
                Observed::New(o)
            }
        }
    }

    /// Reads (answering pings, following reconnects) until `phase` is
    /// reached; false if the connection ended first.
    pub async fn hold_until(&mut self, phase: Phase) -> bool {
        while self.phase() < phase {
            match self.next_event().await {
                Event::Ended => return false,
                Event::Frame(ServerFrame::Message {
                    offset,
                    channel: None,
                    ..
                }) => {
                    self.observe(&offset);
                }
                _ => {}
            }
        }
        true
    }

    /// Sends a text frame; false (and counted) if the socket failed.
    pub async fn send_text(&mut self, text: String) -> bool {
        match self.ws.send(Message::text(text)).await {
            Ok(()) => true,
            Err(e) => {
                self.stats.error("send_failed", &e.into());
                self.broken = true;
                false
            }
        }
    }

    /// Drops the connection on purpose (with a close frame if `graceful`,
    /// else a bare TCP shutdown) and resumes at once with `last`.
    pub async fn drop_and_resume(&mut self, graceful: bool) -> Event {
        let bound = Duration::from_secs(1);
        if graceful {
            let _ = tokio::time::timeout(bound, self.ws.close(None)).await;
        } else {
            let _ = tokio::time::timeout(bound, self.ws.get_mut().shutdown()).await;
        }
        self.reconnect_after = None;
        self.resume(true).await
    }

    /// Re-establishes the connection with `last`, after the delay the server
    /// asked for (jittered), with a bounded number of attempts.
    async fn resume(&mut self, immediately: bool) -> Event {
        if self.phase() >= Phase::Stop {
            return Event::Ended;
        }
        let mut delay = match (immediately, self.reconnect_after.take()) {
            (true, _) => Duration::ZERO,
            (false, Some(after)) => after + jitter(Duration::from_millis(100)),
            (false, None) => Duration::from_millis(50) + jitter(Duration::from_millis(100)),
        };
        for _ in 0..RECONNECT_ATTEMPTS {
            tokio::time::sleep(delay).await;
            if self.phase() >= Phase::Stop {
                return Event::Ended;
            }
            let limit = self.dialer.tuning().handshake_timeout();
            let attempt = async {
                let mut ws = self
                    .dialer
                    .connect(self.global, &self.session, self.last)
                    .await?;
                let welcome = read_welcome(&mut ws, limit).await?;
                Result::Ok((ws, welcome))
            };
            match Box::pin(attempt).await {
                Ok((ws, welcome)) => {
                    self.ws = ws;
                    self.broken = false;
                    self.stats.incr("reconnected");
                    if welcome.gap {
                        self.stats.incr("welcome_gap");
                    }
                    return Event::Reconnected;
                }
                Err(e) => self.stats.error("reconnect_failed", &e),
            }
            delay = (delay * 2).max(Duration::from_millis(200));
        }
        self.stats.incr("gave_up");
        Event::Ended
    }

    /// Closes politely, within a bound.
    pub async fn close(mut self) {
        if !self.broken {
            let _ = tokio::time::timeout(Duration::from_secs(2), self.ws.close(None)).await;
        }
    }
}

/// A random duration in `[0, max)`.
pub fn jitter(max: Duration) -> Duration {
    max.mul_f64(rand::random::<f64>())
}

/// How the `Setup` phase went.
#[derive(Clone, Copy, Debug, Default)]
pub struct Ramp {
    /// Connections this process was to open.
    pub attempted: u64,
    /// Connections that reported ready.
    pub ready: u64,
    /// Connections that failed (handshake, welcome or readiness).
    pub failed: u64,
}

/// The connections of one process in one scenario.
pub struct Fleet {
    stats: Arc<Stats>,
    dialer: Arc<Dialer>,
    phase: watch::Sender<Phase>,
    tasks: JoinSet<()>,
}

impl Fleet {
    pub fn new(common: &Common, stats: Arc<Stats>) -> Result<Self> {
        let dialer = Dialer::new(
            common.targets.clone(),
            common.source_ips.clone(),
            common.tuning,
        )?;
        Ok(Fleet {
            stats,
            dialer: Arc::new(dialer),
            phase: watch::channel(Phase::Setup).0,
            tasks: JoinSet::new(),
        })
    }

    pub fn dialer(&self) -> &Arc<Dialer> {
        &self.dialer
    }

    pub fn set_phase(&self, phase: Phase) {
        self.phase.send_replace(phase);
    }

    /// Opens this share of `total` connections, paced by the connect rate
    /// and bounded by the handshake concurrency, and runs `body` on each.
    /// Returns when every connection reported ready or failed, or when the
    /// ramp timeout passed. Records handshake latency and the `ramp` phase.
    pub async fn open<B, Fut>(
        &mut self,
        common: &Common,
        share: Share,
        total: usize,
        body: B,
    ) -> Ramp
    where
        B: Fn(Conn, Ready) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let started = Instant::now();
        let deadline = started + common.ramp_timeout();
        let range = share.range(total);
        let attempted = range.len() as u64;
        let (tx, mut rx) = mpsc::unbounded_channel::<bool>();
        let handshakes = Arc::new(Semaphore::new(common.connect_concurrency.max(1)));
        let body = Arc::new(body);
        let mut pace = common.connect_rate.map(|rate| {
            let period = Duration::from_secs_f64(1.0 / share.rate(rate).max(0.001));
            tokio::time::interval(period)
        });
        let mut spawned = 0u64;
        for (local, global) in range.enumerate() {
            if let Some(pace) = pace.as_mut()
                && timeout_at(deadline, pace.tick()).await.is_err()
            {
                break;
            }
            let Ok(Ok(permit)) = timeout_at(deadline, handshakes.clone().acquire_owned()).await
            else {
                break;
            };
            let setup = Setup {
                global,
                local,
                retries: common.connect_retries,
                session: common.session(global),
                stats: self.stats.clone(),
                dialer: self.dialer.clone(),
                phase: self.phase.subscribe(),
            };
            let ready = Ready(Some(tx.clone()));
            let body = body.clone();
            // `then` rather than an `async` block: its state is an enum of
            // "setting up" (a boxed future) or "running the body", so the
            // resting task holds the body's future and nothing else. An
            // async block would also keep its upvars and the `Option<Conn>`
            // that the body's `Conn` was moved out of (measured: ~0.5 KiB
            // more per connection).
            let task = Box::pin(setup.open(permit)).then(move |conn| match conn {
                Some(conn) => Either::Left(body(conn, ready)),
                None => {
                    ready.fire(false);
                    Either::Right(std::future::ready(()))
                }
            });
            self.tasks.spawn(task);
            spawned += 1;
            self.reap();
        }
        drop(tx);
        let mut ramp = Ramp {
            attempted,
            ..Ramp::default()
        };
        while ramp.ready + ramp.failed < spawned {
            match timeout_at(deadline, rx.recv()).await {
                Ok(Some(true)) => ramp.ready += 1,
                Ok(Some(false)) => ramp.failed += 1,
                Ok(None) | Err(_) => break,
            }
        }
        let unfinished = attempted - ramp.ready - ramp.failed;
        if unfinished > 0 {
            self.stats.add("ramp_timed_out", unfinished);
        }
        self.stats.add("ready", ramp.ready);
        self.stats.set_phase("ramp", started.elapsed());
        ramp
    }

    /// Collects finished tasks, counting panics.
    fn reap(&mut self) {
        while let Some(done) = self.tasks.try_join_next() {
            if done.is_err() {
                self.stats.incr("task_panicked");
            }
        }
    }

    /// Sets `Drain` and waits (at most `limit`) until `done` holds.
    pub async fn drain(&self, limit: Duration, done: impl Fn(&Stats) -> bool) {
        self.set_phase(Phase::Drain);
        let started = Instant::now();
        let deadline = started + limit;
        while !done(&self.stats) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.stats.set_phase("drain", started.elapsed());
    }

    /// Sets `Drain` and waits until `counter` has not moved for `quiet`
    /// and at least `at_least` has passed (at most `limit`): for deliveries
    /// whose expected total only the merged result knows.
    pub async fn drain_quiet(
        &self,
        counter: &str,
        quiet: Duration,
        at_least: Duration,
        limit: Duration,
    ) {
        self.set_phase(Phase::Drain);
        let started = Instant::now();
        let deadline = started + limit;
        let mut last = self.stats.get(counter);
        let mut still_since = Instant::now();
        while Instant::now() < deadline
            && (still_since.elapsed() < quiet || started.elapsed() < at_least)
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let now = self.stats.get(counter);
            if now != last {
                last = now;
                still_since = Instant::now();
            }
        }
        self.stats.set_phase("drain", started.elapsed());
    }

    /// Sets `Stop` and waits (at most `grace`) for every connection to
    /// finish its loop and close; the rest are aborted.
    pub async fn close(mut self, grace: Duration) {
        self.set_phase(Phase::Stop);
        let stats = self.stats.clone();
        let tasks = &mut self.tasks;
        let joined = tokio::time::timeout(grace, async {
            while let Some(done) = tasks.join_next().await {
                if done.is_err() {
                    stats.incr("task_panicked");
                }
            }
        })
        .await;
        if joined.is_err() {
            stats.add("aborted_at_stop", self.tasks.len() as u64);
            self.tasks.shutdown().await;
        }
    }
}

/// What a connection task needs until its connection is up.
struct Setup {
    global: usize,
    local: usize,
    /// Tries left after the first (`--connect-retries`).
    retries: u32,
    session: String,
    stats: Arc<Stats>,
    dialer: Arc<Dialer>,
    phase: watch::Receiver<Phase>,
}

impl Setup {
    /// Connects and reads the welcome; counts and times both.
    async fn open(self, permit: OwnedSemaphorePermit) -> Option<Conn> {
        let started = Instant::now();
        let mut backoff = Duration::from_millis(250);
        let mut tries_left = self.retries;
        let mut ws = loop {
            match self.dialer.connect(self.global, &self.session, None).await {
                Ok(ws) => break ws,
                Err(e) if tries_left > 0 => {
                    // A client that retries at once into a saturated server
                    // makes it worse: back off, with jitter so retries spread.
                    self.stats.error("connect_retried", &e);
                    tries_left -= 1;
                    let jitter = rand::random_range(0..=backoff.as_millis() as u64 / 2);
                    tokio::time::sleep(backoff + Duration::from_millis(jitter)).await;
                    backoff = (backoff * 2).min(Duration::from_secs(8));
                }
                Err(e) => {
                    self.stats.error("connect_failed", &e);
                    return None;
                }
            }
        };
        self.stats.record("handshake", started.elapsed());
        self.stats.incr("connected");
        let welcome = read_welcome(&mut ws, self.dialer.tuning().handshake_timeout()).await;
        drop(permit);
        match welcome {
            Ok(w) => {
                self.stats.record("welcome", started.elapsed());
                if w.gap {
                    self.stats.incr("welcome_gap");
                }
            }
            Err(e) => {
                self.stats.error("welcome_failed", &e);
                return None;
            }
        }
        Some(Conn {
            global: self.global,
            local: self.local,
            session: self.session,
            ws,
            last: None,
            stats: self.stats,
            dialer: self.dialer,
            phase: self.phase,
            reconnect_after: None,
            broken: false,
        })
    }
}
