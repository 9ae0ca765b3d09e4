//! One task per WebSocket connection, owning it from the welcome frame to
//! the close frame (the Erlang process-per-connection model).
//!
//! The task selects over four things: close requests from outside (takeover,
//! slow consumer, delete, drain), frames from the client, deliveries from the
//! bus, and one timer for heartbeats and the drain deadline. A panic anywhere
//! in it is caught at the task's edge: that connection gets 1011 and its
//! resources are released; no other connection notices.
//!
//! Delivery order follows trap 2 of `shared/design/traps.md`: claim the
//! session, replay its log after `last`, then go live, dropping any live
//! delivery at or below the offset already sent (the cursor). A live delivery
//! whose `prev` is beyond the cursor means something is missing or late, and
//! the log fills the hole.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes};
use futures_util::{FutureExt, Sink, SinkExt, Stream, StreamExt};
use rand::Rng;
use serde_json::json;
use serde_json::value::RawValue;
use tokio::time::Instant;
use tokio_util::task::task_tracker::TaskTrackerToken;
use tracing::Instrument;

use super::AppState;
use super::order::{Arrival, LogId, Order, Step};
use super::rate::{RateGuard, Verdict, elapsed_ms};
use crate::auth::Grant;
use crate::bus::{ConnId, Delivery, Event, Inbox, Mailbox, Outgoing, mailbox};
use crate::pod::ConnectionSlot;
use crate::protocol::close::{self, CloseReason};
use crate::protocol::{
    ChannelName, ClientFrame, ErrorCode, Offset, Request, SessionId, frame, parse_client_frame,
};
use crate::telemetry::otel;
use crate::upstream::EventKind;

/// What the connection task reads from and writes to: axum's `WebSocket`
/// in production, a pair of channels in unit tests (the axum
/// `testing-websockets` shape), so heartbeats, rate limits, fairness and
/// hole filling are tested with a paused clock.
pub trait Socket:
    Sink<Message, Error = axum::Error> + Stream<Item = Result<Message, axum::Error>> + Unpin + Send
{
}

impl<T> Socket for T where
    T: Sink<Message, Error = axum::Error>
        + Stream<Item = Result<Message, axum::Error>>
        + Unpin
        + Send
{
}

/// Everything one connection knows about itself. Sized with care: there is
/// one of these per connection.
pub struct Connection {
    state: Arc<AppState>,
    id: ConnId,
    session: SessionId,
    /// The offset the client said it has (`?last=`).
    last: Option<Offset>,
    grant: Grant,
    /// Holds one of the pod's connection slots until the task ends.
    _slot: ConnectionSlot,
    /// When the upgrade request arrived; also the rate limiter's epoch.
    started: Instant,
    /// The same moment on the wall clock, which token expiries are in.
    started_ms: u64,
    /// The claim and what has been written of each log (pure, see `order`).
    order: Order,
    rate: RateGuard,
    /// When the token expires (auth mode `jwt`): the connection closes with
    /// 1008 then, unless a `refresh` moves it.
    expires: Option<Instant>,
    /// Logs whose fill from the log failed and is retried after
    /// `--delivery-repair-ms` (`None`: the session's log). Boxed: rare, and
    /// 8 bytes on every connection instead of a `Vec`'s 24.
    #[allow(clippy::box_collection)]
    fill_retries: Option<Box<Vec<Option<ChannelName>>>>,
}

/// How a connection ends.
enum End {
    /// We close: send `notice` (if any), then a close frame with `code`.
    Close {
        code: u16,
        reason: &'static str,
        notice: Option<String>,
    },
    /// The client closed (with this code) or vanished; nothing left to send.
    Gone { code: Option<u16> },
}

impl End {
    fn close(code: u16, reason: &'static str) -> Self {
        End::Close {
            code,
            reason,
            notice: None,
        }
    }

    fn from_reason(reason: CloseReason) -> Self {
        let notice = match reason {
            CloseReason::Drain { after_ms } | CloseReason::Rebalance { after_ms } => {
                Some(frame::reconnect(after_ms))
            }
            _ => None,
        };
        End::Close {
            code: reason.code(),
            reason: reason.text(),
            notice,
        }
    }
}

/// A socket write failed or timed out: the client is gone.
struct Gone;

impl Connection {
    pub fn new(
        state: Arc<AppState>,
        id: ConnId,
        session: SessionId,
        last: Option<Offset>,
        grant: Grant,
        slot: ConnectionSlot,
        started: std::time::Instant,
    ) -> Self {
        let rate = RateGuard::new(state.config.rate_limit_per_sec);
        let started = Instant::from_std(started);
        let started_ms = crate::bus::now_ms();
        let expires = grant
            .expires_at
            .map(|exp| deadline_of(exp, started, started_ms));
        Self {
            state,
            id,
            session,
            last,
            grant,
            _slot: slot,
            started,
            started_ms,
            order: Order::new(last),
            rate,
            expires,
            fill_retries: None,
        }
    }
}

/// The monotonic moment of a token's `exp` (Unix seconds), measured from
/// the connection's start on both clocks, so a wall-clock jump after the
/// connect neither shortens nor stretches the token's life.
fn deadline_of(exp_s: u64, started: Instant, started_ms: u64) -> Instant {
    started + Duration::from_millis(exp_s.saturating_mul(1000).saturating_sub(started_ms))
}

/// The connection task: runs the connection, contains any panic, cleans up.
/// `_tracked` keeps the pod's task tracker waiting for this connection.
pub async fn serve<S: Socket>(mut socket: S, mut conn: Connection, _tracked: TaskTrackerToken) {
    let state = conn.state.clone();
    state.metrics.connections_opened.inc();
    let (mailbox, mut inbox) = mailbox(conn.id, state.config.outbound_queue);
    // A debug-level span: an enabled span is stored by the subscriber for
    // the connection's whole life, which costs memory on every connection.
    // Warnings below name the session themselves.
    let span = tracing::debug_span!("connection", session = %conn.session, conn = conn.id);
    // One expression, no `let run`: a named future moved into catch_unwind
    // would be stored twice in this task's state.
    let outcome = AssertUnwindSafe(
        conn.run(&mut socket, &mailbox, &mut inbox)
            .instrument(span.clone()),
    )
    .catch_unwind()
    .await;
    let end = match outcome {
        Ok(end) => end,
        Err(panic) => {
            state.metrics.task_failures.inc();
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            tracing::error!(session = %conn.session, panic = %what, "connection task panicked; closing this connection only");
            End::close(close::INTERNAL, "internal error in this connection")
        }
    };
    drop(inbox);
    Box::pin(conn.finish(&mut socket, end))
        .instrument(span)
        .await;
}

impl Connection {
    async fn run<S: Socket>(
        &mut self,
        socket: &mut S,
        mailbox: &Mailbox,
        inbox: &mut Inbox,
    ) -> End {
        // The opening is boxed: its locals (the replay) need not live in the
        // connection's future for the rest of its life.
        let span = tracing::info_span!(target: otel::TARGET, "ws.connect", session = %self.session, resume = self.last.is_some());
        if let Err(end) = Box::pin(self.open(socket, mailbox).instrument(span)).await {
            return end;
        }
        self.live(socket, mailbox, inbox).await
    }

    /// Claims the session, sends the welcome and replays the log after `last`.
    async fn open<S: Socket>(&mut self, socket: &mut S, mailbox: &Mailbox) -> Result<(), End> {
        let bus = self.state.bus.clone();
        // Claim first, so that everything accepted from now on is routed here...
        match bus.claim(&self.session, mailbox).await {
            Ok(claim) => self.order.set_claim(claim),
            Err(e) => {
                tracing::warn!(session = %self.session, error = %e, "cannot claim session");
                return Err(End::close(close::TRY_LATER, "bus unavailable, try later"));
            }
        }
        // ...then replay what the log holds after `last`...
        let replay = match bus.session_log(&self.session, self.last).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(session = %self.session, error = %e, "cannot read session log");
                return Err(End::close(close::TRY_LATER, "bus unavailable, try later"));
            }
        };
        let cfg = &self.state.config;
        let welcome = frame::welcome(
            &self.session,
            &self.state.pod.name,
            self.last.is_some(),
            replay.gap,
            cfg.heartbeat_s,
        );
        let gone = |_| End::Gone { code: None };
        self.write(socket, "welcome", welcome.into())
            .await
            .map_err(gone)?;
        self.state
            .metrics
            .handshake_duration
            .observe(self.started.elapsed().as_secs_f64());
        if self.last.is_some() {
            self.state.metrics.resumes.inc();
        }
        if replay.gap {
            self.state
                .metrics
                .replay_gaps
                .with_label_values(&["session"])
                .inc();
        }
        tracing::debug!(
            resumed = self.last.is_some(),
            gap = replay.gap,
            replayed = replay.entries.len(),
            "connected"
        );
        self.emit(EventKind::Connect, None).await;
        let span = tracing::info_span!(target: otel::TARGET, "replay", session = %self.session, entries = replay.entries.len(), gap = replay.gap);
        async {
            for delivery in &replay.entries {
                self.deliver(socket, mailbox, delivery, false)
                    .await
                    .map_err(gone)?;
            }
            Ok(())
        }
        .instrument(span)
        .await?;
        // ...then go live.
        Ok(())
    }

    /// The earliest moment the timer must wake: heartbeat, drain or expiry.
    fn next_wake(&self, heartbeat: Instant, drain_at: Option<Instant>) -> Instant {
        [Some(heartbeat), drain_at, self.expires]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(heartbeat)
    }

    /// The live loop. Not `biased`: every ready branch gets its turn, so a
    /// flood of deliveries cannot starve the client's frames, heartbeats,
    /// the token's expiry or the drain deadline (and vice versa).
    async fn live<S: Socket>(
        &mut self,
        socket: &mut S,
        mailbox: &Mailbox,
        inbox: &mut Inbox,
    ) -> End {
        let heartbeat = Duration::from_secs(self.state.config.heartbeat_s);
        let mut next_heartbeat = Instant::now() + heartbeat;
        let mut drain_at: Option<Instant> = None;
        let mut awaiting_pong = false;
        let timer = tokio::time::sleep_until(self.next_wake(next_heartbeat, drain_at));
        tokio::pin!(timer);
        let drain = self.state.pod.drain_token();
        let drained = drain.cancelled();
        tokio::pin!(drained);

        loop {
            tokio::select! {
                event = inbox.next() => match event {
                    Event::Close(reason) => return End::from_reason(reason),
                    Event::Deliver(delivery) => {
                        // Sampled per delivery taken, under the queue's own
                        // uncontended lock: no per-connection state.
                        self.state.metrics.queue_depth.observe(inbox.queued() as f64);
                        // Boxed, like every branch's work below, so the
                        // connection's resting future stays small (trap 12).
                        if Box::pin(self.deliver(socket, mailbox, &delivery, true)).await.is_err() {
                            return End::Gone { code: None };
                        }
                    }
                },
                incoming = socket.next() => {
                    awaiting_pong = false;
                    let message = match incoming {
                        None => return End::Gone { code: None },
                        Some(Ok(m)) => m,
                        Some(Err(e)) => return read_error(e),
                    };
                    self.state.metrics.received_bytes.inc_by(payload_len(&message));
                    let expires = self.expires;
                    if let Err(end) = Box::pin(self.on_message(socket, mailbox, message)).await {
                        return end;
                    }
                    if self.expires != expires {
                        timer.as_mut().reset(self.next_wake(next_heartbeat, drain_at));
                    }
                }
                _ = &mut drained, if drain_at.is_none() => {
                    // Each connection picks its own moment in the window, so
                    // a draining pod sheds its connections evenly.
                    let window = Duration::from_secs(self.state.config.drain_s);
                    let delay = window.mul_f64(rand::rng().random::<f64>());
                    drain_at = Some(Instant::now() + delay);
                    timer.as_mut().reset(self.next_wake(next_heartbeat, drain_at));
                }
                _ = &mut timer => {
                    let now = Instant::now();
                    if self.expires.is_some_and(|at| at <= now) {
                        self.state.metrics.token_expiries.inc();
                        tracing::debug!("token expired without refresh");
                        return End::close(close::POLICY, "token expired");
                    }
                    if drain_at.is_some_and(|at| at <= now) {
                        let jitter = self.state.config.reconnect_jitter_ms;
                        let after_ms = rand::rng().random_range(0..=jitter);
                        return End::from_reason(CloseReason::Drain { after_ms });
                    }
                    if now >= next_heartbeat {
                        if awaiting_pong {
                            tracing::debug!("heartbeat timeout");
                            return End::Gone { code: None };
                        }
                        awaiting_pong = true;
                        next_heartbeat = now + heartbeat;
                        let ping = Message::Ping(Default::default());
                        if Box::pin(self.write_message(socket, "ping", ping)).await.is_err() {
                            return End::Gone { code: None };
                        }
                    }
                    timer.as_mut().reset(self.next_wake(next_heartbeat, drain_at));
                }
            }
        }
    }

    /// One frame from the client. Every frame takes a rate-limit token first,
    /// whatever it is, so no kind of frame is a free way to load the pod.
    async fn on_message<S: Socket>(
        &mut self,
        socket: &mut S,
        mailbox: &Mailbox,
        message: Message,
    ) -> Result<(), End> {
        if let Message::Close(frame) = message {
            return Err(End::Gone {
                code: Some(frame.map_or(close::NORMAL, |f| f.code)),
            });
        }
        let metrics = &self.state.metrics;
        let gone = |_| End::Gone { code: None };
        match self.rate.check(elapsed_ms(self.started)) {
            Verdict::Allow => {}
            Verdict::Drop => {
                metrics.frames_rate_limited.inc();
                return Ok(());
            }
            Verdict::Refuse => {
                metrics.frames_rate_limited.inc();
                let message = format!(
                    "over {} frames per second; frames dropped (at most one such error per second)",
                    self.state.config.rate_limit_per_sec
                );
                let reply = frame::error(None, ErrorCode::RateLimited, &message);
                return self
                    .write(socket, "error", reply.into())
                    .await
                    .map_err(gone);
            }
            Verdict::Close => {
                metrics.frames_rate_limited.inc();
                tracing::debug!("closing a connection that keeps exceeding its rate limit");
                return Err(End::close(
                    close::POLICY,
                    "rate limit exceeded for too long",
                ));
            }
        }
        match message {
            Message::Text(text) => match parse_client_frame(text.as_str()) {
                Err(rejection) => {
                    metrics.frames_in.with_label_values(&["invalid"]).inc();
                    let reply =
                        frame::error(rejection.id.as_deref(), rejection.code, &rejection.message);
                    self.write(socket, "error", reply.into())
                        .await
                        .map_err(gone)
                }
                Ok(request) => {
                    metrics
                        .frames_in
                        .with_label_values(&[request.frame.kind()])
                        .inc();
                    self.handle(socket, mailbox, request).await
                }
            },
            Message::Binary(_) => {
                metrics.frames_in.with_label_values(&["binary"]).inc();
                let reply = frame::error(
                    None,
                    ErrorCode::BadRequest,
                    "binary frames are not supported; send JSON text frames",
                );
                self.write(socket, "error", reply.into())
                    .await
                    .map_err(gone)
            }
            Message::Ping(_) | Message::Pong(_) | Message::Close(_) => Ok(()),
        }
    }

    async fn handle<S: Socket>(
        &mut self,
        socket: &mut S,
        mailbox: &Mailbox,
        request: Request,
    ) -> Result<(), End> {
        let Request {
            id,
            frame: client_frame,
        } = request;
        let id = id.as_deref();
        let gone = |_| End::Gone { code: None };
        let bus = self.state.bus.clone();
        let outcome: Result<Option<Offset>, (ErrorCode, String)> = match client_frame {
            ClientFrame::Ping { data } => {
                let reply = frame::pong(id, data.as_deref());
                return self.write(socket, "pong", reply.into()).await.map_err(gone);
            }
            ClientFrame::Subscribe { channel, since } => {
                let span = tracing::info_span!(target: otel::TARGET, "ws.subscribe", session = %self.session, channel = %channel, since = since.is_some());
                return self
                    .subscribe(socket, mailbox, id, channel, since)
                    .instrument(span)
                    .await;
            }
            ClientFrame::Unsubscribe { channel } => {
                if self.order.unsubscribe(&channel) {
                    bus.unsubscribe(&channel, self.id).await;
                }
                Ok(None)
            }
            ClientFrame::Publish { channel, data } => {
                let span = tracing::info_span!(target: otel::TARGET, "ws.publish", session = %self.session, channel = %channel);
                if !self.grant.may_use(&channel) {
                    Err((
                        ErrorCode::Forbidden,
                        format!("not allowed to publish to {channel}"),
                    ))
                } else {
                    let msg = Outgoing {
                        data: &data,
                        from: None,
                        idempotency_key: None,
                    };
                    bus.publish(&channel, msg)
                        .instrument(span)
                        .await
                        .map(Some)
                        .map_err(|e| (e.code(), e.to_string()))
                }
            }
            ClientFrame::Send { session, data } => {
                let span = tracing::info_span!(target: otel::TARGET, "ws.send", from = %self.session, session = %session);
                let msg = Outgoing {
                    data: &data,
                    from: Some(&self.session),
                    idempotency_key: None,
                };
                bus.send_to_session(&session, msg)
                    .instrument(span)
                    .await
                    .map(Some)
                    .map_err(|e| (e.code(), e.to_string()))
            }
            ClientFrame::Upstream { data } => match self
                .state
                .upstream
                .emit(EventKind::Upstream, &self.session, Some(&data))
                .await
            {
                Ok(()) => Ok(None),
                Err(e) => Err((ErrorCode::Unavailable, e.to_string())),
            },
            ClientFrame::Refresh { token } => {
                return Box::pin(self.refresh(socket, id, &token)).await;
            }
            ClientFrame::Panic => {
                if self.state.config.fault_injection {
                    panic!("fault injection: the client asked this connection's task to panic");
                }
                Err((
                    ErrorCode::Forbidden,
                    "fault injection is disabled on this pod".to_string(),
                ))
            }
        };
        match outcome {
            Ok(offset) => match id {
                Some(id) => self
                    .write(socket, "ack", frame::ack(id, offset).into())
                    .await
                    .map_err(gone),
                None => Ok(()),
            },
            Err((code, message)) => {
                let reply = frame::error(id, code, &message);
                self.write(socket, "error", reply.into())
                    .await
                    .map_err(gone)
            }
        }
    }

    /// `refresh`: a new token for the same session moves the expiry and
    /// replaces the channel grant; subscriptions it no longer allows are
    /// dropped, each with an `error` frame naming its channel.
    async fn refresh<S: Socket>(
        &mut self,
        socket: &mut S,
        id: Option<&RawValue>,
        token: &str,
    ) -> Result<(), End> {
        let gone = |_| End::Gone { code: None };
        let metrics = self.state.metrics.clone();
        let refused = |code, message: String, result: &str| {
            metrics.token_refreshes.with_label_values(&[result]).inc();
            frame::error(id, code, &message)
        };
        if !self.state.auth.requires_token() {
            let reply = refused(
                ErrorCode::BadRequest,
                "this pod runs with --auth none: there is no token to refresh".into(),
                "bad_request",
            );
            return self
                .write(socket, "error", reply.into())
                .await
                .map_err(gone);
        }
        let grant = match self.state.auth.authenticate(Some(token)) {
            Ok(grant) => grant,
            Err(e) => {
                // The old token still holds until its own expiry.
                let reply = refused(ErrorCode::Unauthorized, e.to_string(), "unauthorized");
                return self
                    .write(socket, "error", reply.into())
                    .await
                    .map_err(gone);
            }
        };
        if grant.session.as_ref() != Some(&self.session) {
            let reply = refused(
                ErrorCode::Forbidden,
                format!(
                    "the new token is for another session; this connection is session {}",
                    self.session
                ),
                "forbidden",
            );
            return self
                .write(socket, "error", reply.into())
                .await
                .map_err(gone);
        }
        metrics.token_refreshes.with_label_values(&["ok"]).inc();
        self.expires = grant
            .expires_at
            .map(|exp| deadline_of(exp, self.started, self.started_ms));
        self.grant = grant;
        let disallowed: Vec<ChannelName> = self
            .order
            .channels()
            .filter(|c| !self.grant.may_use(c))
            .cloned()
            .collect();
        if let Some(id) = id {
            self.write(socket, "ack", frame::ack(id, None).into())
                .await
                .map_err(gone)?;
        }
        let bus = self.state.bus.clone();
        for channel in disallowed {
            self.order.unsubscribe(&channel);
            bus.unsubscribe(&channel, self.id).await;
            let reply = frame::channel_error(
                &channel,
                ErrorCode::Forbidden,
                &format!(
                    "subscription to {channel} dropped: the refreshed token does not allow it"
                ),
            );
            self.write(socket, "error", reply.into())
                .await
                .map_err(gone)?;
        }
        tracing::debug!("token refreshed");
        Ok(())
    }

    /// Claim, then replay, then live, for one channel.
    async fn subscribe<S: Socket>(
        &mut self,
        socket: &mut S,
        mailbox: &Mailbox,
        id: Option<&RawValue>,
        channel: ChannelName,
        since: Option<Offset>,
    ) -> Result<(), End> {
        let gone = |_| End::Gone { code: None };
        let refuse = |code, message: String| frame::error(id, code, &message);
        if !self.grant.may_use(&channel) {
            let reply = refuse(
                ErrorCode::Forbidden,
                format!("not allowed to subscribe to {channel}"),
            );
            return self
                .write(socket, "error", reply.into())
                .await
                .map_err(gone);
        }
        let already = self.order.is_subscribed(&channel);
        if !already && self.order.subscription_count() >= self.state.config.max_subscriptions {
            let limit = self.state.config.max_subscriptions;
            let reply = refuse(
                ErrorCode::TooLarge,
                format!("subscription limit of {limit} per connection reached"),
            );
            return self
                .write(socket, "error", reply.into())
                .await
                .map_err(gone);
        }
        let bus = self.state.bus.clone();
        let head = match bus.subscribe(&channel, mailbox).await {
            Ok(head) => head,
            Err(e) => {
                let reply = refuse(e.code(), e.to_string());
                return self
                    .write(socket, "error", reply.into())
                    .await
                    .map_err(gone);
            }
        };
        self.order.subscribe(&channel, since, head);
        // With `since`, read the replay before the ack: the ack says whether
        // it is complete (`gap`), then the replay follows it.
        let replay = match since {
            None => None,
            Some(_) => match bus.channel_log(&channel, since).await {
                Ok(r) => Some(r),
                Err(e) => {
                    let reply = refuse(e.code(), e.to_string());
                    return self
                        .write(socket, "error", reply.into())
                        .await
                        .map_err(gone);
                }
            },
        };
        if let Some(id) = id {
            let gap = replay.as_ref().map(|r| r.gap);
            self.write(socket, "ack", frame::subscribe_ack(id, gap).into())
                .await
                .map_err(gone)?;
        }
        if let Some(replay) = replay {
            if replay.gap {
                self.state
                    .metrics
                    .replay_gaps
                    .with_label_values(&["channel"])
                    .inc();
            }
            let log = LogId::Channel(&channel);
            for delivery in &replay.entries {
                if self.order.wants(log, delivery.offset) {
                    self.write_delivery(socket, delivery, false)
                        .await
                        .map_err(gone)?;
                    self.order.advance(log, delivery.offset);
                }
            }
        }
        Ok(())
    }

    /// Writes a delivery unless it was already written; fills holes from the log.
    async fn deliver<S: Socket>(
        &mut self,
        socket: &mut S,
        mailbox: &Mailbox,
        delivery: &Arc<Delivery>,
        live: bool,
    ) -> Result<(), Gone> {
        if delivery.resync {
            self.forget_fill_retry(&delivery.channel);
        }
        let log = match &delivery.channel {
            None => LogId::Session,
            Some(channel) => LogId::Channel(channel),
        };
        let step = self.order.step(Arrival {
            log,
            offset: delivery.offset,
            prev: delivery.prev,
            live,
            resync: delivery.resync,
        });
        let after = match step {
            Step::NotSubscribed | Step::Duplicate => return Ok(()),
            Step::Write => {
                self.write_delivery(socket, delivery, live).await?;
                self.order.advance(log, delivery.offset);
                return Ok(());
            }
            Step::Fill { after } => after,
        };
        // Something between the cursor and this delivery has not reached us
        // (late or lost on the way): the log has all of it, in order.
        self.state.metrics.holes_filled.inc();
        let bus = self.state.bus.clone();
        let replay = match &delivery.channel {
            Some(channel) => bus.channel_log(channel, after).await,
            None => bus.session_log(&self.session, after).await,
        };
        let entries = match replay {
            // Only for a live hole: a resync notice also follows Redis
            // losing the log, which the ownership path answers (1012, and
            // the resume reports the gap).
            Ok(r) if r.gap && !delivery.resync => {
                // Retention dropped part of the hole before it could be
                // read: writing past it would hide the loss. Closed 1013
                // instead; the client resumes with `last` and its welcome
                // reports the gap.
                self.count_gap(&delivery.channel);
                tracing::warn!(session = %self.session, "entries of a hole were trimmed before they could be read; closing so the client resumes and learns of the gap");
                mailbox.close(CloseReason::SlowConsumer);
                return Ok(());
            }
            Ok(r) => r.entries,
            Err(e) => {
                // Writing what arrived would skip the hole for good (the
                // cursor moves past it): nothing is written, and the log is
                // read again after the repair period, hole and all.
                tracing::warn!(error = %e, "cannot fill a hole from the log; retrying after the repair period");
                self.schedule_fill_retry(mailbox, &delivery.channel);
                return Ok(());
            }
        };
        for entry in &entries {
            if self.order.wants(log, entry.offset) {
                self.write_delivery(socket, entry, live).await?;
                self.order.advance(log, entry.offset);
            }
        }
        Ok(())
    }

    /// A gap found while filling a hole, by log kind.
    fn count_gap(&self, channel: &Option<ChannelName>) {
        let kind = if channel.is_some() {
            "channel"
        } else {
            "session"
        };
        self.state
            .metrics
            .replay_gaps
            .with_label_values(&[kind])
            .inc();
    }

    /// Posts a resync notice for the log to this connection's own mailbox
    /// after `--delivery-repair-ms`, once per log until it is read.
    fn schedule_fill_retry(&mut self, mailbox: &Mailbox, channel: &Option<ChannelName>) {
        let pending = self.fill_retries.get_or_insert_with(Default::default);
        if pending.contains(channel) {
            return;
        }
        pending.push(channel.clone());
        self.state.metrics.fill_retries.inc();
        let (mailbox, channel) = (mailbox.clone(), channel.clone());
        let after = Duration::from_millis(self.state.config.delivery_repair_ms);
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            // A full mailbox closes the connection 1013: the client resumes.
            mailbox.offer(&Arc::new(Delivery::resync(channel)));
        });
    }

    fn forget_fill_retry(&mut self, channel: &Option<ChannelName>) {
        if let Some(pending) = &mut self.fill_retries {
            pending.retain(|c| c != channel);
            if pending.is_empty() {
                self.fill_retries = None;
            }
        }
    }

    async fn write_delivery<S: Socket>(
        &mut self,
        socket: &mut S,
        delivery: &Delivery,
        live: bool,
    ) -> Result<(), Gone> {
        // Only a message that carries its sender's trace gets a span: with
        // traces off none does, and channel messages link at the fan-out.
        let span = match delivery.trace.as_deref() {
            Some(trace) => {
                let span = tracing::info_span!(target: otel::TARGET, "deliver", session = %self.session, offset = %delivery.offset, live);
                otel::follow(&span, Some(trace));
                span
            }
            None => tracing::Span::none(),
        };
        self.write(socket, "message", delivery.frame.clone())
            .instrument(span)
            .await?;
        let metrics = &self.state.metrics;
        let kind = if delivery.channel.is_some() {
            "channel"
        } else {
            "session"
        };
        metrics.messages_delivered.with_label_values(&[kind]).inc();
        if !live {
            metrics.messages_replayed.with_label_values(&[kind]).inc();
        }
        if live {
            let latency_ms = crate::bus::now_ms().saturating_sub(delivery.accepted_ms);
            metrics
                .delivery_latency
                .with_label_values(&[kind])
                .observe(latency_ms as f64 / 1000.0);
        }
        Ok(())
    }

    async fn write<S: Socket>(
        &self,
        socket: &mut S,
        kind: &'static str,
        text: Utf8Bytes,
    ) -> Result<(), Gone> {
        self.write_message(socket, kind, Message::Text(text)).await
    }

    /// Writes one frame, giving up on a client that does not read for a
    /// whole heartbeat period (its socket buffer stays full).
    async fn write_message<S: Socket>(
        &self,
        socket: &mut S,
        kind: &'static str,
        message: Message,
    ) -> Result<(), Gone> {
        let limit = Duration::from_secs(self.state.config.heartbeat_s.max(1));
        let bytes = payload_len(&message);
        match tokio::time::timeout(limit, socket.send(message)).await {
            Ok(Ok(())) => {
                let metrics = &self.state.metrics;
                metrics.frames_out.with_label_values(&[kind]).inc();
                metrics.sent_bytes.inc_by(bytes);
                Ok(())
            }
            Ok(Err(_)) | Err(_) => Err(Gone),
        }
    }

    async fn emit(&self, kind: EventKind, data: Option<&RawValue>) {
        if !self.state.upstream.is_configured() {
            return;
        }
        if let Err(e) = self.state.upstream.emit(kind, &self.session, data).await {
            tracing::warn!(error = %e, "upstream event not delivered");
        }
    }

    /// Sends the close (if it is ours to send), releases the session and
    /// subscriptions, and records how the connection ended.
    async fn finish<S: Socket>(&mut self, socket: &mut S, end: End) {
        let code = match end {
            End::Close {
                code,
                reason,
                notice,
            } => {
                if let Some(notice) = notice {
                    let _ = self.write(socket, "reconnect", notice.into()).await;
                }
                let close = Message::Close(Some(CloseFrame {
                    code,
                    reason: reason.into(),
                }));
                let bytes = payload_len(&close);
                let sent = tokio::time::timeout(Duration::from_secs(1), socket.send(close)).await;
                if matches!(sent, Ok(Ok(()))) {
                    self.state.metrics.sent_bytes.inc_by(bytes);
                }
                Some(code)
            }
            End::Gone { code } => code,
        };
        let label = close_label(code);
        let metrics = &self.state.metrics;
        metrics
            .connections_closed
            .with_label_values(&[&label])
            .inc();
        metrics
            .connection_duration
            .observe(self.started.elapsed().as_secs_f64());
        let bus = self.state.bus.clone();
        for channel in self.order.drain_channels() {
            bus.unsubscribe(&channel, self.id).await;
        }
        if let Some(claim) = self.order.take_claim() {
            bus.release(&self.session, claim).await;
        }
        if self.state.upstream.is_configured() {
            let data = serde_json::value::to_raw_value(&json!({ "code": code })).ok();
            self.emit(EventKind::Disconnect, data.as_deref()).await;
        }
        tracing::debug!(code = ?code, "connection closed");
    }
}

/// The `code` label of `wsfleet_connections_closed_total`. A client may
/// close with any code: the ones outside the protocol's own range (and the
/// server's 4409) are counted together, so a client cannot grow the label set.
fn close_label(code: Option<u16>) -> String {
    match code {
        None => "none".to_string(),
        Some(c @ (1000..=1015 | close::TAKEN_OVER)) => c.to_string(),
        Some(_) => "other".to_string(),
    }
}

/// The WebSocket payload of a message (what `wsfleet_websocket_*_bytes_total`
/// count): framing headers excluded, a close frame's code included.
fn payload_len(message: &Message) -> u64 {
    let len = match message {
        Message::Text(t) => t.len(),
        Message::Binary(b) | Message::Ping(b) | Message::Pong(b) => b.len(),
        Message::Close(frame) => frame.as_ref().map_or(0, |f| 2 + f.reason.len()),
    };
    len as u64
}

/// A read error: a protocol violation is closed with its code (1002, 1007,
/// 1009; see `socket`), anything else means the client is gone.
fn read_error(error: axum::Error) -> End {
    if let Some(v) = super::socket::violation(&error) {
        tracing::debug!(
            code = v.code,
            reason = v.reason,
            "client broke the protocol"
        );
        return End::close(v.code, v.reason);
    }
    let too_large = error
        .into_inner()
        .downcast_ref::<tokio_tungstenite::tungstenite::Error>()
        .is_some_and(|e| matches!(e, tokio_tungstenite::tungstenite::Error::Capacity(_)));
    if too_large {
        End::close(close::TOO_LARGE, "frame too large")
    } else {
        End::Gone { code: None }
    }
}

/// The socket loop driven through channels with a paused clock: what the
/// loop does with time (heartbeats, expiry), with floods (rate limits,
/// fairness) and with lost deliveries (hole filling), without a network.
#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::sync::Mutex;
    use std::sync::atomic::AtomicU64;
    use std::task::{Context, Poll};

    use async_trait::async_trait;
    use serde_json::Value;
    use tokio::sync::mpsc;
    use tokio_util::task::TaskTracker;

    use super::*;
    use crate::auth::Authenticator;
    use crate::bus::memory::{MemoryBus, MemoryLimits};
    use crate::bus::{Bus, Claim, Replay, Retention, SessionInfo};
    use crate::config::ServeConfig;
    use crate::pod::{LocalPod, PodStatus};
    use crate::telemetry::Metrics;
    use crate::upstream::Upstream;

    #[test]
    fn close_code_labels_are_a_bounded_set() {
        assert_eq!(close_label(None), "none");
        assert_eq!(close_label(Some(1000)), "1000");
        assert_eq!(close_label(Some(1013)), "1013");
        assert_eq!(close_label(Some(4409)), "4409");
        // Codes a client picks freely share one label.
        assert_eq!(close_label(Some(4000)), "other");
        assert_eq!(close_label(Some(3999)), "other");
        assert_eq!(close_label(Some(65535)), "other");
    }

    /// The server's end of a WebSocket made of two channels.
    struct ChannelSocket {
        from_client: mpsc::UnboundedReceiver<Message>,
        to_client: mpsc::UnboundedSender<Message>,
    }

    impl Stream for ChannelSocket {
        type Item = Result<Message, axum::Error>;
        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            self.from_client.poll_recv(cx).map(|m| m.map(Ok))
        }
    }

    impl Sink<Message> for ChannelSocket {
        type Error = axum::Error;
        fn poll_ready(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }
        fn start_send(self: Pin<&mut Self>, item: Message) -> Result<(), Self::Error> {
            self.to_client
                .send(item)
                .map_err(|_| axum::Error::new("client end dropped"))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }
        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }
    }

    /// The client's end.
    struct Peer {
        tx: mpsc::UnboundedSender<Message>,
        rx: mpsc::UnboundedReceiver<Message>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Peer {
        fn send(&self, frame: Value) {
            self.tx
                .send(Message::Text(frame.to_string().into()))
                .unwrap();
        }

        /// The next frame the server writes; `None` once the task ended.
        async fn next(&mut self) -> Option<Message> {
            self.rx.recv().await
        }

        /// The next text frame; WebSocket pings in between are not answered.
        async fn json(&mut self) -> Value {
            loop {
                match self.next().await {
                    Some(Message::Text(t)) => return serde_json::from_str(t.as_str()).unwrap(),
                    Some(Message::Ping(_)) => continue,
                    other => panic!("expected a text frame, got {other:?}"),
                }
            }
        }

        /// Reads until the close frame and returns its code.
        async fn close_code(&mut self) -> Option<u16> {
            loop {
                match self.next().await {
                    Some(Message::Close(f)) => return f.map(|f| f.code),
                    Some(_) => continue,
                    None => return None,
                }
            }
        }
    }

    fn state_with(
        flags: &[&str],
        bus: impl FnOnce(Arc<LocalPod>, Arc<Metrics>) -> Arc<dyn Bus>,
    ) -> Arc<AppState> {
        let config = ServeConfig::from_args(flags.iter().copied()).unwrap();
        let metrics = Arc::new(Metrics::new());
        let pod = Arc::new(LocalPod::new("pod-t".into(), 100));
        let bus = bus(pod.clone(), metrics.clone());
        let tracker = TaskTracker::new();
        let upstream = Upstream::new(
            &pod.name,
            bus.clone(),
            false,
            None,
            metrics.clone(),
            &tracker,
        );
        Arc::new(AppState {
            auth: Authenticator::from_config(&config).unwrap(),
            config,
            pod,
            bus,
            metrics,
            upstream,
            tracker,
            next_conn_id: AtomicU64::new(1),
        })
    }

    fn memory_state(flags: &[&str]) -> Arc<AppState> {
        state_with(flags, |pod, metrics| {
            Arc::new(MemoryBus::new(
                pod,
                retention(),
                MemoryLimits::UNLIMITED,
                metrics,
            ))
        })
    }

    fn retention() -> Retention {
        Retention {
            max_messages: 1000,
            max_age_ms: 300_000,
        }
    }

    fn session(s: &str) -> SessionId {
        SessionId::parse(s).unwrap()
    }

    /// Opens a connection for `session` and reads its welcome.
    async fn connect(state: &Arc<AppState>, sid: &str, grant: Grant) -> Peer {
        let (tx, from_client) = mpsc::unbounded_channel();
        let (to_client, rx) = mpsc::unbounded_channel();
        let socket = ChannelSocket {
            from_client,
            to_client,
        };
        let slot = state.pod.reserve().unwrap();
        let conn = Connection::new(
            state.clone(),
            state
                .next_conn_id
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            session(sid),
            None,
            grant,
            slot,
            std::time::Instant::now(),
        );
        let task = tokio::spawn(serve(socket, conn, state.tracker.token()));
        let mut peer = Peer { tx, rx, task };
        let welcome = peer.json().await;
        assert_eq!(welcome["type"], "welcome");
        peer
    }

    async fn send(state: &AppState, sid: &str, n: u64) -> Offset {
        let data = RawValue::from_string(n.to_string()).unwrap();
        let msg = Outgoing {
            data: &data,
            from: None,
            idempotency_key: None,
        };
        state.bus.send_to_session(&session(sid), msg).await.unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_client_is_pinged_then_dropped_after_one_more_heartbeat() {
        let state = memory_state(&["--heartbeat-s", "10"]);
        let mut peer = connect(&state, "s1", Grant::anonymous()).await;
        let started = Instant::now();
        assert!(matches!(peer.next().await, Some(Message::Ping(_))));
        assert!(started.elapsed() >= Duration::from_secs(10));
        // No pong: the connection ends one heartbeat later, without a close
        // frame (the client is presumed gone).
        assert_eq!(peer.next().await, None);
        assert!(started.elapsed() >= Duration::from_secs(20));
        assert!(started.elapsed() < Duration::from_secs(21));
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_answers_pings_stays() {
        let state = memory_state(&["--heartbeat-s", "10"]);
        let mut peer = connect(&state, "s1", Grant::anonymous()).await;
        for _ in 0..10 {
            assert!(matches!(peer.next().await, Some(Message::Ping(_))));
            peer.tx.send(Message::Pong(Default::default())).unwrap();
        }
        peer.send(json!({"type":"ping","id":1}));
        assert_eq!(peer.json().await["type"], "pong");
    }

    #[tokio::test(start_paused = true)]
    async fn every_frame_kind_counts_against_the_rate_and_errors_are_bounded() {
        let state = memory_state(&["--rate-limit-per-sec", "10"]);
        let mut peer = connect(&state, "s1", Grant::anonymous()).await;
        // 40 frames at one instant, of every kind a client can send.
        for i in 0..10 {
            peer.tx.send(Message::Binary(vec![1, 2, 3].into())).unwrap();
            peer.tx.send(Message::Text("not json".into())).unwrap();
            peer.send(json!({"type":"teleport","id":i}));
            peer.send(json!({"type":"ping","id":i}));
        }
        peer.send(json!({"type":"ping","id":"last"}));
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut replies = Vec::new();
        while let Ok(m) = peer.rx.try_recv() {
            if let Message::Text(t) = m {
                replies.push(serde_json::from_str::<Value>(t.as_str()).unwrap());
            }
        }
        let limited = replies
            .iter()
            .filter(|r| r["code"] == "rate_limited")
            .count();
        assert_eq!(
            limited, 1,
            "one rate_limited error for the whole burst: {replies:?}"
        );
        assert_eq!(
            replies.len(),
            11,
            "10 frames within the rate, one error: {replies:?}"
        );
        assert!(
            replies.iter().all(|r| r["id"] != "last"),
            "the frame over the rate was dropped"
        );
        assert_eq!(state.metrics.frames_rate_limited.get(), 31);
        // Within the rate again a second later.
        tokio::time::sleep(Duration::from_secs(1)).await;
        peer.send(json!({"type":"ping","id":2}));
        assert_eq!(peer.json().await["type"], "pong");
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_keeps_flooding_is_closed_1008() {
        let state = memory_state(&["--rate-limit-per-sec", "10"]);
        let mut peer = connect(&state, "s1", Grant::anonymous()).await;
        for _ in 0..(super::super::rate::STRIKES_TO_CLOSE as u32 + 1) {
            for _ in 0..50 {
                peer.tx.send(Message::Binary(vec![0].into())).unwrap();
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        assert_eq!(peer.close_code().await, Some(close::POLICY));
    }

    /// With a `biased` select that polls the mailbox first, a ping sent
    /// behind thousands of queued deliveries is answered only after all of
    /// them; a fair loop answers it almost at once.
    #[tokio::test(start_paused = true)]
    async fn pings_are_answered_during_a_delivery_flood() {
        const QUEUED: u64 = 5000;
        let state = memory_state(&["--outbound-queue", "10000"]);
        let mut peer = connect(&state, "s1", Grant::anonymous()).await;
        // Queue the flood without letting the connection task run.
        for n in 0..QUEUED {
            send(&state, "s1", n).await;
        }
        peer.send(json!({"type":"ping","id":"p"}));
        let mut before_pong = 0;
        loop {
            let frame = peer.json().await;
            if frame["type"] == "pong" {
                break;
            }
            assert_eq!(frame["type"], "message");
            before_pong += 1;
        }
        assert!(
            before_pong < QUEUED / 10,
            "the ping waited behind {before_pong} of {QUEUED} deliveries"
        );
        // And nothing of the flood is lost or reordered.
        let mut expected = before_pong;
        while expected < QUEUED {
            let frame = peer.json().await;
            assert_eq!(frame["data"], json!(expected));
            expected += 1;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_token_expiry_closes_1008_and_a_refresh_moves_it() {
        let secret = "unit-secret";
        let state = memory_state(&[
            "--auth",
            "jwt",
            "--jwt-hs256-secret",
            secret,
            "--heartbeat-s",
            "1000",
        ]);
        let now_s = crate::bus::now_ms() / 1000;
        let token = |sid: &str, exp: u64, channels: &[&str]| {
            jsonwebtoken::encode(
                &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
                &json!({"sid": sid, "exp": exp, "channels": channels}),
                &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
            )
            .unwrap()
        };
        let grant = state
            .auth
            .authenticate(Some(&token("s1", now_s + 60, &["a.*"])))
            .unwrap();
        let mut peer = connect(&state, "s1", grant).await;
        peer.send(json!({"type":"subscribe","id":1,"channel":"a.x"}));
        assert_eq!(peer.json().await["type"], "ack");

        // Another session's token is refused; the connection stays.
        peer.send(json!({"type":"refresh","id":2,"token": token("s2", now_s + 3600, &["a.*"])}));
        let reply = peer.json().await;
        assert_eq!(
            (reply["id"].clone(), reply["code"].clone()),
            (json!(2), json!("forbidden"))
        );
        // A garbage token: unauthorized, connection stays.
        peer.send(json!({"type":"refresh","id":3,"token":"garbage"}));
        assert_eq!(peer.json().await["code"], "unauthorized");

        // Same session, later exp, fewer channels: ack, then the dropped
        // subscription is named.
        tokio::time::sleep(Duration::from_secs(50)).await;
        peer.send(json!({"type":"refresh","id":4,"token": token("s1", now_s + 120, &["b.*"])}));
        let ack = peer.json().await;
        assert_eq!(
            (ack["type"].clone(), ack["id"].clone()),
            (json!("ack"), json!(4))
        );
        let dropped = peer.json().await;
        assert_eq!(dropped["type"], "error");
        assert_eq!(dropped["code"], "forbidden");
        assert_eq!(dropped["channel"], "a.x");

        // Past the first exp, alive; at the second, closed 1008.
        tokio::time::sleep(Duration::from_secs(30)).await;
        peer.send(json!({"type":"ping","id":5}));
        assert_eq!(peer.json().await["type"], "pong");
        let before = Instant::now();
        assert_eq!(peer.close_code().await, Some(close::POLICY));
        let waited = before.elapsed();
        assert!(
            waited >= Duration::from_secs(35) && waited <= Duration::from_secs(42),
            "closed {waited:?} after the check, expected about 40 s"
        );
        assert_eq!(state.metrics.token_expiries.get(), 1);
        peer.task.await.unwrap();
    }

    /// A hop that loses chosen live deliveries on their way to the
    /// connection, around the real in-memory bus: what a failed inbox XADD
    /// does in cluster mode.
    struct LossyHop {
        inner: Arc<MemoryBus>,
        /// Routed deliveries to drop, by their data (the message number).
        lose: Mutex<Vec<String>>,
        /// The connection's real mailbox, to send resync notices to.
        target: Mutex<Option<Mailbox>>,
        /// Log reads to fail from now on (Redis timing out).
        failing_reads: std::sync::atomic::AtomicUsize,
    }

    impl LossyHop {
        fn read_fails(&self) -> bool {
            use std::sync::atomic::Ordering::SeqCst;
            self.failing_reads
                .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
                .is_ok()
        }
    }

    #[async_trait]
    impl Bus for LossyHop {
        async fn claim(&self, s: &SessionId, mailbox: &Mailbox) -> crate::bus::Result<Claim> {
            *self.target.lock().unwrap() = Some(mailbox.clone());
            // The inner bus routes to a relay that forwards all but the lost.
            let (relay, mut relay_inbox) = mailbox_pair(mailbox.id);
            let target = mailbox.clone();
            let lose = self.lose.lock().unwrap().clone();
            tokio::spawn(async move {
                while let Event::Deliver(d) = relay_inbox.next().await {
                    let text = d.frame.as_str();
                    if !lose
                        .iter()
                        .any(|l| text.contains(&format!("\"data\":{l}}}")))
                    {
                        target.offer(&d);
                    }
                }
            });
            let claim = self.inner.claim(s, &relay).await;
            std::mem::forget(relay);
            claim
        }
        async fn release(&self, s: &SessionId, c: Claim) {
            self.inner.release(s, c).await
        }
        async fn send_to_session(
            &self,
            s: &SessionId,
            m: Outgoing<'_>,
        ) -> crate::bus::Result<Offset> {
            self.inner.send_to_session(s, m).await
        }
        async fn publish(&self, c: &ChannelName, m: Outgoing<'_>) -> crate::bus::Result<Offset> {
            self.inner.publish(c, m).await
        }
        async fn session_log(
            &self,
            s: &SessionId,
            a: Option<Offset>,
        ) -> crate::bus::Result<Replay> {
            if self.read_fails() {
                return Err(crate::bus::BusError::Timeout("log read".into()));
            }
            self.inner.session_log(s, a).await
        }
        async fn channel_log(
            &self,
            c: &ChannelName,
            a: Option<Offset>,
        ) -> crate::bus::Result<Replay> {
            self.inner.channel_log(c, a).await
        }
        async fn subscribe(
            &self,
            c: &ChannelName,
            m: &Mailbox,
        ) -> crate::bus::Result<Option<Offset>> {
            self.inner.subscribe(c, m).await
        }
        async fn unsubscribe(&self, c: &ChannelName, id: ConnId) {
            self.inner.unsubscribe(c, id).await
        }
        async fn session_info(&self, s: &SessionId) -> crate::bus::Result<Option<SessionInfo>> {
            self.inner.session_info(s).await
        }
        async fn disconnect(&self, s: &SessionId) -> crate::bus::Result<bool> {
            self.inner.disconnect(s).await
        }
        async fn fleet(&self) -> crate::bus::Result<Vec<PodStatus>> {
            self.inner.fleet().await
        }
        async fn append_upstream(&self, e: &str) -> crate::bus::Result<bool> {
            self.inner.append_upstream(e).await
        }
        async fn check(&self) -> crate::bus::Result<()> {
            self.inner.check().await
        }
        fn close_local_connections(&self, reason: CloseReason) -> usize {
            self.inner.close_local_connections(reason)
        }
        fn shed_local_connections(
            &self,
            count: usize,
            reason: &mut dyn FnMut() -> CloseReason,
        ) -> usize {
            self.inner.shed_local_connections(count, reason)
        }
    }

    fn mailbox_pair(id: ConnId) -> (Mailbox, Inbox) {
        mailbox(id, 10_000)
    }

    fn lossy_state(lose: &[u64]) -> (Arc<AppState>, Arc<LossyHop>) {
        lossy_state_with(lose, retention())
    }

    fn lossy_state_with(lose: &[u64], retention: Retention) -> (Arc<AppState>, Arc<LossyHop>) {
        let hop: Arc<Mutex<Option<Arc<LossyHop>>>> = Default::default();
        let keep = hop.clone();
        let lose: Vec<String> = lose.iter().map(|n| n.to_string()).collect();
        let state = state_with(&[], move |pod, metrics| {
            let bus = Arc::new(LossyHop {
                inner: Arc::new(MemoryBus::new(
                    pod,
                    retention,
                    MemoryLimits::UNLIMITED,
                    metrics,
                )),
                lose: Mutex::new(lose),
                target: Mutex::new(None),
                failing_reads: Default::default(),
            });
            *keep.lock().unwrap() = Some(bus.clone());
            bus
        });
        let hop = hop.lock().unwrap().clone().unwrap();
        (state, hop)
    }

    async fn data_of_next_messages(peer: &mut Peer, n: usize) -> Vec<u64> {
        let mut out = Vec::new();
        for _ in 0..n {
            let frame = peer.json().await;
            assert_eq!(frame["type"], "message", "{frame}");
            out.push(frame["data"].as_u64().unwrap());
        }
        out
    }

    #[tokio::test]
    async fn a_delivery_lost_on_the_hop_is_filled_from_the_log_by_the_next() {
        let (state, _hop) = lossy_state(&[1, 2]);
        let mut peer = connect(&state, "s1", Grant::anonymous()).await;
        for n in 0..4 {
            send(&state, "s1", n).await;
        }
        assert_eq!(data_of_next_messages(&mut peer, 4).await, vec![0, 1, 2, 3]);
        // Nothing more: no duplicates of the filled entries.
        peer.send(json!({"type":"ping","id":1}));
        assert_eq!(peer.json().await["type"], "pong");
        assert!(state.metrics.holes_filled.get() >= 1);
    }

    #[tokio::test]
    async fn a_resync_notice_recovers_a_lost_last_message() {
        let (state, hop) = lossy_state(&[2]);
        let mut peer = connect(&state, "s1", Grant::anonymous()).await;
        for n in 0..3 {
            send(&state, "s1", n).await;
        }
        assert_eq!(data_of_next_messages(&mut peer, 2).await, vec![0, 1]);
        // The last one was lost and nothing follows it; the bus's repair
        // (a resync notice) makes the connection read the log.
        let target = hop.target.lock().unwrap().clone().unwrap();
        target.offer(&Arc::new(Delivery::resync(None)));
        assert_eq!(data_of_next_messages(&mut peer, 1).await, vec![2]);
        // A second notice with nothing new writes nothing.
        target.offer(&Arc::new(Delivery::resync(None)));
        peer.send(json!({"type":"ping","id":1}));
        assert_eq!(peer.json().await["type"], "pong");
    }

    #[tokio::test(start_paused = true)]
    async fn a_hole_that_cannot_be_filled_now_is_filled_after_the_repair_period() {
        let (state, hop) = lossy_state(&[1]);
        let mut peer = connect(&state, "s1", Grant::anonymous()).await;
        send(&state, "s1", 0).await;
        assert_eq!(data_of_next_messages(&mut peer, 1).await, vec![0]);
        // 1 is lost on the hop, and the log read that 2's hole asks for
        // fails: writing 2 now would skip 1 for good.
        hop.failing_reads
            .store(1, std::sync::atomic::Ordering::SeqCst);
        let sent = Instant::now();
        send(&state, "s1", 1).await;
        send(&state, "s1", 2).await;
        assert_eq!(data_of_next_messages(&mut peer, 2).await, vec![1, 2]);
        let waited = sent.elapsed();
        let bound = Duration::from_millis(state.config.delivery_repair_ms);
        assert!(
            waited >= bound && waited < bound * 2,
            "filled {waited:?} after the failed read, bound {bound:?}"
        );
        assert_eq!(state.metrics.fill_retries.get(), 1);
        // Nothing more: no duplicates.
        peer.send(json!({"type":"ping","id":1}));
        assert_eq!(peer.json().await["type"], "pong");
    }

    #[tokio::test(start_paused = true)]
    async fn a_hole_that_retention_trimmed_closes_1013_rather_than_writing_past_it() {
        let two = Retention {
            max_messages: 2,
            max_age_ms: 300_000,
        };
        let (state, _hop) = lossy_state_with(&[1, 2], two);
        let mut peer = connect(&state, "s1", Grant::anonymous()).await;
        send(&state, "s1", 0).await;
        assert_eq!(data_of_next_messages(&mut peer, 1).await, vec![0]);
        // 1 and 2 are lost on the hop and 1 is trimmed (2 retained) before
        // 3 reveals the hole: the client must not get 2, 3 as if complete.
        for n in 1..4 {
            send(&state, "s1", n).await;
        }
        assert_eq!(peer.close_code().await, Some(close::TRY_LATER));
        assert_eq!(
            state
                .metrics
                .replay_gaps
                .with_label_values(&["session"])
                .get(),
            1
        );
    }
}
