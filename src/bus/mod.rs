//! The bus: where messages are made durable and routed to the pod and
//! connection that owns their session or subscribes to their channel.
//!
//! One trait, two implementations: [`memory::MemoryBus`] runs the whole fleet
//! inside one process (embedded mode), and the Redis Streams bus spreads it
//! over many pods. Both keep the rules of `shared/design/traps.md`:
//!
//! * the log is the truth: a message is accepted only once it is in its
//!   session's or channel's log, and its offset is its position there;
//!   routing to the live connection is a hint that may be lost;
//! * connections claim first, then replay the log, then go live, and drop
//!   what they already delivered (see `gateway::connection`);
//! * a claim carries an epoch and a holder that never repeats; a newer claim
//!   closes the older connection (4409), and release matches the holder;
//! * handing a message to a connection never waits ([`Mailbox::offer`]).

mod log;
mod mailbox;
pub mod memory;
pub mod redis;

use std::sync::Arc;

use async_trait::async_trait;
use axum::extract::ws::Utf8Bytes;
use serde_json::value::RawValue;
use time::OffsetDateTime;

pub use log::{Log, Retention};
pub use mailbox::{ConnId, Event, Inbox, Mailbox, Offer, mailbox};

use crate::pod::PodStatus;
use crate::protocol::close::CloseReason;
use crate::protocol::{ChannelName, Offset, SessionId};

/// One message as it sits in a log and travels to connections: rendered
/// once, shared by every subscriber and every replay.
#[derive(Debug)]
pub struct Delivery {
    /// Its position in its log.
    pub offset: Offset,
    /// The offset of the entry appended just before it in the same log, so a
    /// connection can tell that something between is missing or late.
    pub prev: Option<Offset>,
    /// `None` for a direct message to a session.
    pub channel: Option<ChannelName>,
    /// The complete `message` frame as sent on the socket.
    pub frame: Utf8Bytes,
    /// When it was accepted, for the delivery latency histogram.
    pub accepted_ms: u64,
    /// The W3C `traceparent` of the span that stored or routed it, when
    /// traces are on, so the socket write on the owning pod joins the
    /// sender's trace. `None` for channel messages: one message written to
    /// thousands of sockets links its fan-out spans instead.
    pub trace: Option<Box<str>>,
    /// Not a message: the bus may have dropped deliveries on their way
    /// (e.g. Redis lost its routing state), so the connection should read
    /// the log after its cursor.
    pub resync: bool,
}

impl Delivery {
    /// A notice that makes the connection catch up from the log.
    pub fn resync(channel: Option<ChannelName>) -> Self {
        Delivery {
            offset: Offset::ZERO,
            prev: None,
            channel,
            frame: Utf8Bytes::from_static(""),
            accepted_ms: 0,
            trace: None,
            resync: true,
        }
    }
}

/// What a log holds after an offset.
#[derive(Debug, Default)]
pub struct Replay {
    pub entries: Vec<Arc<Delivery>>,
    /// Some entries after the requested offset were already trimmed by retention.
    pub gap: bool,
}

/// Proof of ownership of a session, returned by [`Bus::claim`].
///
/// Release and renewal match the whole claim, never the epoch alone: an
/// epoch is a counter that restarts when its record is lost (trap 15), the
/// holder is an identity that never repeats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim {
    /// Incremented by every claim of the session while its record lives;
    /// orders claims, but may repeat after the record is lost.
    pub epoch: u64,
    /// Which connection holds the claim.
    pub holder: Holder,
}

/// A connection's identity across the fleet and across restarts: the
/// process instance (random per process start) plus the connection id
/// (never reused within the process).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Holder {
    pub instance: u64,
    pub conn: ConnId,
}

/// Who holds a session's live connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    pub session: SessionId,
    pub pod: String,
    pub connected_at: OffsetDateTime,
}

/// A message offered to the bus.
#[derive(Debug, Clone, Copy)]
pub struct Outgoing<'a> {
    pub data: &'a RawValue,
    /// The sending session, for `send` frames.
    pub from: Option<&'a SessionId>,
    /// Makes a retried send return the first offset instead of a duplicate.
    pub idempotency_key: Option<&'a str>,
}

/// The bus cannot do what was asked; nothing was half done.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The durable store cannot be reached or refused the write.
    #[error("bus unavailable: {0}")]
    Unavailable(String),
    /// The write was sent but no answer came: it may or may not be stored.
    /// Retrying with the same idempotency key is safe.
    #[error("outcome unknown: {0}; retry with the same Idempotency-Key")]
    Timeout(String),
    /// A configured memory limit refuses new messages; the message names
    /// the limit (flag) that was reached. Nothing was stored.
    #[error("bus full: {0}")]
    Full(String),
}

impl BusError {
    /// The `error` frame code a client sees for this failure.
    pub fn code(&self) -> crate::protocol::ErrorCode {
        use crate::protocol::ErrorCode;
        match self {
            BusError::Unavailable(_) | BusError::Full(_) => ErrorCode::Unavailable,
            BusError::Timeout(_) => ErrorCode::Timeout,
        }
    }
}

pub type Result<T, E = BusError> = std::result::Result<T, E>;

#[async_trait]
pub trait Bus: Send + Sync + 'static {
    /// Makes `mailbox` the owner of `session`, closing any older connection
    /// of the session (on any pod) with 4409. From the moment this returns,
    /// new messages for the session are routed to `mailbox`.
    async fn claim(&self, session: &SessionId, mailbox: &Mailbox) -> Result<Claim>;

    /// Gives up ownership, unless a newer claim already took it.
    async fn release(&self, session: &SessionId, claim: Claim);

    /// Appends a direct message to the session's log, then routes it to the
    /// owning connection if there is one. Returns the message's offset.
    async fn send_to_session(&self, session: &SessionId, msg: Outgoing<'_>) -> Result<Offset>;

    /// Appends a message to the channel's log, then fans it out to every
    /// subscriber on every pod.
    async fn publish(&self, channel: &ChannelName, msg: Outgoing<'_>) -> Result<Offset>;

    /// Retained direct messages of `session` after `after` (all retained ones
    /// when `None`), oldest first.
    async fn session_log(&self, session: &SessionId, after: Option<Offset>) -> Result<Replay>;

    /// Retained messages of `channel` after `after`, oldest first.
    async fn channel_log(&self, channel: &ChannelName, after: Option<Offset>) -> Result<Replay>;

    /// Routes the channel's future messages to `mailbox`. Returns the offset
    /// of the newest message the channel had at that moment, so that a
    /// subscriber without `since` starts exactly after it.
    async fn subscribe(&self, channel: &ChannelName, mailbox: &Mailbox) -> Result<Option<Offset>>;

    /// Stops routing the channel to connection `conn`.
    async fn unsubscribe(&self, channel: &ChannelName, conn: ConnId);

    /// Where the session is connected, if it is.
    async fn session_info(&self, session: &SessionId) -> Result<Option<SessionInfo>>;

    /// Closes the session's connection wherever it is (1000). False if it
    /// is not connected.
    async fn disconnect(&self, session: &SessionId) -> Result<bool>;

    /// Every pod of the fleet.
    async fn fleet(&self) -> Result<Vec<PodStatus>>;

    /// Appends an upstream event for backends, if this bus has a stream for
    /// them. `Ok(false)` when it has none (embedded mode).
    async fn append_upstream(&self, event_json: &str) -> Result<bool>;

    /// Whether the bus can durably accept messages right now (readiness).
    async fn check(&self) -> Result<()>;

    /// Asks every connection that holds a session on this pod to close
    /// with `reason` (shutdown: the drain window is over). Returns how many
    /// were asked. Never waits: it only posts to their mailboxes.
    fn close_local_connections(&self, reason: CloseReason) -> usize;

    /// Asks up to `count` of this pod's connections to leave, the
    /// longest-connected first (rebalancing: they are the least likely to
    /// be mid-handshake with the application, and the choice is stable).
    /// `reason` is asked once per connection (each gets its own jitter).
    /// Returns how many were asked; never waits.
    fn shed_local_connections(
        &self,
        count: usize,
        reason: &mut dyn FnMut() -> CloseReason,
    ) -> usize;
}

/// The `count` oldest of `local` (connection ids grow with connection
/// time on one pod), asked to close. Shared by both buses.
pub(crate) fn shed_oldest(
    mut local: Vec<(ConnId, Mailbox)>,
    count: usize,
    reason: &mut dyn FnMut() -> CloseReason,
) -> usize {
    // One already asked to close (by an earlier batch, a takeover) is
    // leaving anyway: asking it again would shed fewer than ordered.
    local.retain(|(_, mailbox)| !mailbox.is_leaving());
    if count == 0 || local.is_empty() {
        return 0;
    }
    let count = count.min(local.len());
    if count < local.len() {
        local.select_nth_unstable_by_key(count - 1, |(conn, _)| *conn);
    }
    for (_, mailbox) in &local[..count] {
        mailbox.close(reason());
    }
    count
}

/// Milliseconds since the Unix epoch, the clock of offsets and retention.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
