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
use std::time::{Duration, Instant};

use super::socket::ServerSocket as WebSocket;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes};
use futures_util::FutureExt;
use rand::Rng;
use serde_json::json;
use serde_json::value::RawValue;
use tokio_util::task::task_tracker::TaskTrackerToken;
use tracing::Instrument;

use super::AppState;
use super::rate::{TokenBucket, elapsed_ms};
use crate::auth::Grant;
use crate::bus::{Claim, ConnId, Delivery, Event, Inbox, Mailbox, Outgoing, mailbox};
use crate::pod::ConnectionSlot;
use crate::protocol::close::{self, CloseReason};
use crate::protocol::{
    ChannelName, ClientFrame, ErrorCode, Offset, Request, SessionId, frame, parse_client_frame,
};
use crate::upstream::EventKind;

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
    /// Set once the session is claimed; released when the task ends.
    claim: Option<Claim>,
    /// Offset of the newest direct message written to the socket.
    session_cursor: Option<Offset>,
    subscriptions: Vec<Subscription>,
    bucket: TokenBucket,
}

struct Subscription {
    channel: ChannelName,
    /// Offset of the newest message of this channel written to the socket.
    cursor: Option<Offset>,
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
            CloseReason::Drain { after_ms } => Some(frame::reconnect(after_ms)),
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
        started: Instant,
    ) -> Self {
        let bucket = TokenBucket::new(state.config.rate_limit_per_sec);
        Self {
            state,
            id,
            session,
            last,
            grant,
            _slot: slot,
            started,
            claim: None,
            session_cursor: None,
            subscriptions: Vec::new(),
            bucket,
        }
    }
}

/// The connection task: runs the connection, contains any panic, cleans up.
/// `_tracked` keeps the pod's task tracker waiting for this connection.
pub async fn serve(mut socket: WebSocket, mut conn: Connection, _tracked: TaskTrackerToken) {
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
    async fn run(&mut self, socket: &mut WebSocket, mailbox: &Mailbox, inbox: &mut Inbox) -> End {
        // The opening is boxed: its locals (the replay) need not live in the
        // connection's future for the rest of its life.
        if let Err(end) = Box::pin(self.open(socket, mailbox)).await {
            return end;
        }
        self.live(socket, mailbox, inbox).await
    }

    /// Claims the session, sends the welcome and replays the log after `last`.
    async fn open(&mut self, socket: &mut WebSocket, mailbox: &Mailbox) -> Result<(), End> {
        let bus = self.state.bus.clone();
        // Claim first, so that everything accepted from now on is routed here...
        match bus.claim(&self.session, mailbox).await {
            Ok(claim) => self.claim = Some(claim),
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
        self.session_cursor = self.last;
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
        tracing::debug!(
            resumed = self.last.is_some(),
            gap = replay.gap,
            replayed = replay.entries.len(),
            "connected"
        );
        self.emit(EventKind::Connect, None).await;
        for delivery in &replay.entries {
            self.deliver(socket, delivery, false).await.map_err(gone)?;
        }
        // ...then go live.
        Ok(())
    }

    async fn live(&mut self, socket: &mut WebSocket, mailbox: &Mailbox, inbox: &mut Inbox) -> End {
        let heartbeat = Duration::from_secs(self.state.config.heartbeat_s);
        let mut next_heartbeat = Instant::now() + heartbeat;
        let mut drain_at: Option<Instant> = None;
        let mut awaiting_pong = false;
        let timer = tokio::time::sleep_until(next_heartbeat.into());
        tokio::pin!(timer);
        let drain = self.state.drain.clone();
        let drained = drain.cancelled();
        tokio::pin!(drained);

        loop {
            tokio::select! {
                biased;
                event = inbox.next() => match event {
                    Event::Close(reason) => return End::from_reason(reason),
                    Event::Deliver(delivery) => {
                        // Boxed, like every branch's work below, so the
                        // connection's resting future stays small (trap 12).
                        if Box::pin(self.deliver(socket, &delivery, true)).await.is_err() {
                            return End::Gone { code: None };
                        }
                    }
                },
                incoming = socket.recv() => {
                    awaiting_pong = false;
                    let message = match incoming {
                        None => return End::Gone { code: None },
                        Some(Ok(m)) => m,
                        Some(Err(e)) => return read_error(e),
                    };
                    if let Err(end) = Box::pin(self.on_message(socket, mailbox, message)).await {
                        return end;
                    }
                }
                _ = &mut drained, if drain_at.is_none() => {
                    // Each connection picks its own moment in the window, so
                    // a draining pod sheds its connections evenly.
                    let window = Duration::from_secs(self.state.config.drain_s);
                    let delay = window.mul_f64(rand::rng().random::<f64>());
                    let at = Instant::now() + delay;
                    drain_at = Some(at);
                    timer.as_mut().reset(at.min(next_heartbeat).into());
                }
                _ = &mut timer => {
                    let now = Instant::now();
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
                    let next = drain_at.map_or(next_heartbeat, |at| at.min(next_heartbeat));
                    timer.as_mut().reset(next.into());
                }
            }
        }
    }

    /// Handles one frame from the client. `Err` ends the connection.
    async fn on_message(
        &mut self,
        socket: &mut WebSocket,
        mailbox: &Mailbox,
        message: Message,
    ) -> Result<(), End> {
        let metrics = &self.state.metrics;
        let gone = |_| End::Gone { code: None };
        match message {
            Message::Text(text) => match parse_client_frame(&text) {
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
                    if !self.bucket.take(elapsed_ms(self.started)) {
                        let message = format!(
                            "over {} frames per second; frame dropped",
                            self.state.config.rate_limit_per_sec
                        );
                        let reply =
                            frame::error(request.id.as_deref(), ErrorCode::RateLimited, &message);
                        return self
                            .write(socket, "error", reply.into())
                            .await
                            .map_err(gone);
                    }
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
            Message::Ping(_) | Message::Pong(_) => Ok(()),
            Message::Close(frame) => Err(End::Gone {
                code: Some(frame.map_or(close::NORMAL, |f| f.code)),
            }),
        }
    }

    async fn handle(
        &mut self,
        socket: &mut WebSocket,
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
                return self.subscribe(socket, mailbox, id, channel, since).await;
            }
            ClientFrame::Unsubscribe { channel } => {
                if let Some(i) = self.subscriptions.iter().position(|s| s.channel == channel) {
                    self.subscriptions.swap_remove(i);
                    bus.unsubscribe(&channel, self.id).await;
                }
                Ok(None)
            }
            ClientFrame::Publish { channel, data } => {
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
                        .await
                        .map(Some)
                        .map_err(|e| (e.code(), e.to_string()))
                }
            }
            ClientFrame::Send { session, data } => {
                let msg = Outgoing {
                    data: &data,
                    from: Some(&self.session),
                    idempotency_key: None,
                };
                bus.send_to_session(&session, msg)
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

    /// Claim, then replay, then live, for one channel.
    async fn subscribe(
        &mut self,
        socket: &mut WebSocket,
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
        let already = self.subscriptions.iter().position(|s| s.channel == channel);
        if already.is_none() && self.subscriptions.len() >= self.state.config.max_subscriptions {
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
        let index = match already {
            Some(i) => {
                // A repeated subscribe with `since` asks for the replay again.
                if since.is_some() {
                    self.subscriptions[i].cursor = since;
                }
                i
            }
            None => {
                self.subscriptions.push(Subscription {
                    channel: channel.clone(),
                    cursor: since.or(head),
                });
                self.subscriptions.len() - 1
            }
        };
        if let Some(id) = id {
            self.write(socket, "ack", frame::ack(id, None).into())
                .await
                .map_err(gone)?;
        }
        if since.is_some() {
            let replay = match bus.channel_log(&channel, since).await {
                Ok(r) => r,
                Err(e) => {
                    let reply = refuse(e.code(), e.to_string());
                    return self
                        .write(socket, "error", reply.into())
                        .await
                        .map_err(gone);
                }
            };
            for delivery in &replay.entries {
                self.write_delivery(socket, delivery, false)
                    .await
                    .map_err(gone)?;
                self.subscriptions[index].cursor = Some(delivery.offset);
            }
        }
        Ok(())
    }

    /// Writes a delivery unless it was already written; fills holes from the log.
    async fn deliver(
        &mut self,
        socket: &mut WebSocket,
        delivery: &Arc<Delivery>,
        live: bool,
    ) -> Result<(), Gone> {
        let index = match &delivery.channel {
            None => None,
            Some(channel) => match self
                .subscriptions
                .iter()
                .position(|s| s.channel == *channel)
            {
                Some(i) => Some(i),
                // Unsubscribed since it was routed.
                None => return Ok(()),
            },
        };
        let cursor = match index {
            None => self.session_cursor,
            Some(i) => self.subscriptions[i].cursor,
        };
        if !delivery.resync && cursor.is_some_and(|c| delivery.offset <= c) {
            return Ok(()); // already written (replay and live overlap)
        }
        let missing_before = delivery.resync
            || (live && delivery.prev.is_some_and(|p| cursor.is_none_or(|c| p > c)));
        if !missing_before {
            self.write_delivery(socket, delivery, live).await?;
            self.advance(index, delivery.offset);
            return Ok(());
        }
        // Something between the cursor and this delivery has not reached us
        // (late or lost on the way): the log has all of it, in order.
        let bus = self.state.bus.clone();
        let replay = match (&delivery.channel, index) {
            (Some(channel), Some(_)) => bus.channel_log(channel, cursor).await,
            _ => bus.session_log(&self.session, cursor).await,
        };
        let entries = match replay {
            Ok(r) => r.entries,
            Err(e) if delivery.resync => {
                tracing::warn!(error = %e, "cannot catch up from the log now");
                return Ok(());
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot fill a hole from the log; delivering what arrived");
                vec![delivery.clone()]
            }
        };
        for entry in entries
            .iter()
            .filter(|e| cursor.is_none_or(|c| e.offset > c))
        {
            self.write_delivery(socket, entry, live).await?;
            self.advance(index, entry.offset);
        }
        Ok(())
    }

    fn advance(&mut self, index: Option<usize>, offset: Offset) {
        match index {
            None => self.session_cursor = Some(offset),
            Some(i) => self.subscriptions[i].cursor = Some(offset),
        }
    }

    async fn write_delivery(
        &mut self,
        socket: &mut WebSocket,
        delivery: &Delivery,
        live: bool,
    ) -> Result<(), Gone> {
        self.write(socket, "message", delivery.frame.clone())
            .await?;
        let metrics = &self.state.metrics;
        let kind = if delivery.channel.is_some() {
            "channel"
        } else {
            "session"
        };
        metrics.messages_delivered.with_label_values(&[kind]).inc();
        if live {
            let latency_ms = crate::bus::now_ms().saturating_sub(delivery.accepted_ms);
            metrics
                .delivery_latency
                .with_label_values(&[kind])
                .observe(latency_ms as f64 / 1000.0);
        }
        Ok(())
    }

    async fn write(
        &self,
        socket: &mut WebSocket,
        kind: &'static str,
        text: Utf8Bytes,
    ) -> Result<(), Gone> {
        self.write_message(socket, kind, Message::Text(text)).await
    }

    /// Writes one frame, giving up on a client that does not read for a
    /// whole heartbeat period (its socket buffer stays full).
    async fn write_message(
        &self,
        socket: &mut WebSocket,
        kind: &'static str,
        message: Message,
    ) -> Result<(), Gone> {
        let limit = Duration::from_secs(self.state.config.heartbeat_s.max(1));
        match tokio::time::timeout(limit, socket.send(message)).await {
            Ok(Ok(())) => {
                self.state
                    .metrics
                    .frames_out
                    .with_label_values(&[kind])
                    .inc();
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
    async fn finish(&mut self, socket: &mut WebSocket, end: End) {
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
                let _ = tokio::time::timeout(Duration::from_secs(1), socket.send(close)).await;
                Some(code)
            }
            End::Gone { code } => code,
        };
        let label = code.map_or_else(|| "none".to_string(), |c| c.to_string());
        self.state
            .metrics
            .connections_closed
            .with_label_values(&[&label])
            .inc();
        let bus = self.state.bus.clone();
        for sub in self.subscriptions.drain(..) {
            bus.unsubscribe(&sub.channel, self.id).await;
        }
        if let Some(claim) = self.claim.take() {
            bus.release(&self.session, claim).await;
        }
        if self.state.upstream.is_configured() {
            let data = serde_json::value::to_raw_value(&json!({ "code": code })).ok();
            self.emit(EventKind::Disconnect, data.as_deref()).await;
        }
        tracing::debug!(code = ?code, "connection closed");
    }
}

/// A read error: an oversize frame gets 1009, anything else means the
/// client is gone.
fn read_error(error: axum::Error) -> End {
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
