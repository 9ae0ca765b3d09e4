//! The pod's inbox reader: one task, its own Redis connection (a blocking
//! XREADGROUP would hold up every command queued behind it on a shared
//! multiplexed connection, trap 8), handing each entry to local mailboxes.
//!
//! Entries are acknowledged once handed over. An entry left pending by a
//! pod that died is never reclaimed by another pod, on purpose: its
//! sessions reconnect elsewhere and replay their logs, which hold every
//! accepted message (trap 1).
//!
//! An entry can be marked delivered by Redis and still never reach us: the
//! reply to XREADGROUP timed out or the connection broke on its way. Such
//! entries sit in this consumer's pending list, and `>` never returns them
//! again; so after every failed read, and at start (for entries of this
//! pod's previous process), the reader reads its pending entries first.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{RedisBus, Stored, keys, parse_offset};
use crate::bus::Delivery;
use crate::protocol::close::CloseReason;
use crate::protocol::{ChannelName, Offset, SessionId};
use crate::telemetry::otel;

/// How long one XREADGROUP blocks waiting for entries.
const BLOCK: Duration = Duration::from_millis(1000);
/// Entries read per call.
const BATCH: usize = 512;

type Entry = (String, Vec<String>);
type StreamReply = Vec<(String, Vec<Entry>)>;

pub async fn read(bus: Arc<RedisBus>, shutdown: CancellationToken) {
    let mut backoff = Duration::from_millis(50);
    let mut reader = None;
    // Start with the pending list: a previous process of this pod may have
    // left entries in it.
    let mut pending = Pending::OtherConsumers;
    loop {
        if shutdown.is_cancelled() {
            return;
        }
        let conn = match &mut reader {
            Some(conn) => conn,
            None => match bus.opts.target.connect(BLOCK + bus.opts.timeout).await {
                Ok(conn) => reader.insert(conn),
                Err(e) => {
                    tracing::warn!(error = %e, "inbox reader cannot connect");
                    bus.bus_metrics.reconnects.inc();
                    sleep_or_stop(&shutdown, &mut backoff).await;
                    continue;
                }
            },
        };
        let reply = tokio::select! {
            _ = shutdown.cancelled() => return,
            reply = next_entries(&bus, conn, pending) => reply,
        };
        match reply {
            Ok(entries) => {
                backoff = Duration::from_millis(50);
                if pending != Pending::None {
                    if entries.is_empty() {
                        pending = pending.next();
                        continue;
                    }
                    bus.repair_metrics
                        .repairs
                        .with_label_values(&["pending"])
                        .inc_by(entries.len() as u64);
                    tracing::info!(
                        entries = entries.len(),
                        "re-read inbox entries whose delivery to this pod was never completed"
                    );
                }
                if !entries.is_empty() {
                    dispatch(&bus, &entries);
                    if pending == Pending::None {
                        ack(&bus, &entries);
                    } else {
                        // Acknowledged before the next pending read, or
                        // it would return the same entries again.
                        acknowledge(&bus, &entries).await;
                    }
                }
            }
            Err(e) if e.to_string().contains("NOGROUP") => {
                // First start, or Redis restarted without our inbox: create
                // it, then catch every local connection up from the logs,
                // since entries routed meanwhile were dropped.
                bus.bus_metrics.reconnects.inc();
                let created = create_group(&bus).await;
                if created {
                    bus.repair_metrics
                        .repairs
                        .with_label_values(&["inbox_lost"])
                        .inc();
                    tracing::info!(
                        "inbox group (re)created; catching every connection up from the logs"
                    );
                    resync_everyone(&bus);
                } else {
                    sleep_or_stop(&shutdown, &mut backoff).await;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "inbox read failed; reconnecting");
                bus.bus_metrics.reconnects.inc();
                bus.bus_metrics
                    .errors
                    .with_label_values(&["xreadgroup"])
                    .inc();
                reader = None;
                // The lost reply may have carried entries Redis now counts
                // as delivered to us.
                pending = Pending::Own;
                sleep_or_stop(&shutdown, &mut backoff).await;
            }
        }
    }
}

/// Which pending entries the reader must read before new ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    /// Entries left pending by earlier consumers (previous processes of
    /// this pod), then our own.
    OtherConsumers,
    /// Our own pending entries (after a failed read).
    Own,
    /// None: read new entries.
    None,
}

impl Pending {
    fn next(self) -> Pending {
        match self {
            Pending::OtherConsumers => Pending::Own,
            Pending::Own | Pending::None => Pending::None,
        }
    }
}

/// One read: new entries (blocking), this consumer's pending entries (id 0),
/// or entries claimed from earlier consumers (XAUTOCLAIM).
async fn next_entries(
    bus: &RedisBus,
    conn: &mut super::Conn,
    pending: Pending,
) -> redis::RedisResult<Vec<Entry>> {
    match pending {
        Pending::OtherConsumers => {
            // Idle time 0: a consumer of this inbox other than us is a
            // previous process of this pod, and gone.
            let mut cmd = redis::cmd("XAUTOCLAIM");
            cmd.arg(&bus.inbox)
                .arg(keys::INBOX_GROUP)
                .arg(&bus.inst)
                .arg(0)
                .arg("0-0")
                .arg("COUNT")
                .arg(BATCH);
            let reply: redis::Value = cmd.query_async(conn).await?;
            Ok(autoclaimed(reply))
        }
        Pending::Own | Pending::None => {
            let mut cmd = redis::cmd("XREADGROUP");
            cmd.arg("GROUP")
                .arg(keys::INBOX_GROUP)
                .arg(&bus.inst)
                .arg("COUNT")
                .arg(BATCH);
            if pending == Pending::None {
                cmd.arg("BLOCK").arg(BLOCK.as_millis() as u64);
            }
            cmd.arg("STREAMS")
                .arg(&bus.inbox)
                .arg(if pending == Pending::None { ">" } else { "0" });
            let streams: Option<StreamReply> = cmd.query_async(conn).await?;
            Ok(streams.into_iter().flatten().flat_map(|(_, e)| e).collect())
        }
    }
}

/// The entries of an XAUTOCLAIM reply (`[cursor, entries, deleted ids]`);
/// a claim only moves entries, so anything unreadable is left to the
/// next start.
fn autoclaimed(reply: redis::Value) -> Vec<Entry> {
    let redis::Value::Array(parts) = reply else {
        return Vec::new();
    };
    parts
        .into_iter()
        .nth(1)
        .and_then(|entries| redis::from_redis_value::<Vec<Entry>>(entries).ok())
        .unwrap_or_default()
}

async fn sleep_or_stop(shutdown: &CancellationToken, backoff: &mut Duration) {
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = tokio::time::sleep(*backoff) => {}
    }
    *backoff = (*backoff * 2).min(Duration::from_secs(2));
}

/// Creates this pod's inbox and its group, reading from the start of the
/// stream so nothing routed before the group existed is skipped.
async fn create_group(bus: &RedisBus) -> bool {
    let mut conn = bus.conn.clone();
    let mut cmd = redis::cmd("XGROUP");
    cmd.arg("CREATE")
        .arg(&bus.inbox)
        .arg(keys::INBOX_GROUP)
        .arg("0")
        .arg("MKSTREAM");
    match bus
        .call::<String>("xgroup_create", cmd.query_async(&mut conn))
        .await
    {
        Ok(_) => true,
        Err(e) if e.to_string().contains("BUSYGROUP") => true,
        Err(e) => {
            tracing::warn!(error = %e, "cannot create the inbox group");
            false
        }
    }
}

/// Catches every local connection up from the logs: entries routed here
/// may have been lost. A session reads its own log; a channel is read once
/// for the pod.
pub(super) fn resync_everyone(bus: &RedisBus) {
    for owner in bus.sessions.iter() {
        owner.mailbox.offer(&Arc::new(Delivery::resync(None)));
    }
    let channels: Vec<ChannelName> = bus.channels.iter().map(|e| e.key().clone()).collect();
    for channel in channels {
        bus.catch_up_channel(&channel, "inbox_lost");
    }
}

/// Acknowledges and deletes handed-over entries in one round trip, off the
/// reader's path: the next XREADGROUP need not wait for it.
fn ack(bus: &Arc<RedisBus>, entries: &[Entry]) {
    let pipe = ack_pipeline(bus, entries);
    let bus = bus.clone();
    tokio::spawn(async move { run_ack(&bus, pipe).await });
}

async fn acknowledge(bus: &RedisBus, entries: &[Entry]) {
    run_ack(bus, ack_pipeline(bus, entries)).await;
}

async fn run_ack(bus: &RedisBus, pipe: redis::Pipeline) {
    let mut conn = bus.conn.clone();
    if let Err(e) = bus
        .call::<(i64, i64)>("xack_xdel", pipe.query_async(&mut conn))
        .await
    {
        tracing::warn!(error = %e, "acknowledging inbox entries failed");
    }
}

fn ack_pipeline(bus: &RedisBus, entries: &[Entry]) -> redis::Pipeline {
    let mut pipe = redis::pipe();
    let xack = pipe.cmd("XACK").arg(&bus.inbox).arg(keys::INBOX_GROUP);
    for (id, _) in entries {
        xack.arg(id);
    }
    // Acknowledged entries are never read again; drop them from the stream.
    let xdel = pipe.cmd("XDEL").arg(&bus.inbox);
    for (id, _) in entries {
        xdel.arg(id);
    }
    pipe
}

fn field<'a>(fields: &'a [String], name: &str) -> &'a str {
    fields
        .chunks(2)
        .find(|kv| kv[0] == name)
        .and_then(|kv| kv.get(1))
        .map(String::as_str)
        .unwrap_or("")
}

/// Hands every entry to the local connections it is for.
fn dispatch(bus: &RedisBus, entries: &[Entry]) {
    for (_, fields) in entries {
        if fields.is_empty() {
            // A pending entry whose body was deleted: nothing to hand over.
            continue;
        }
        let kind = field(fields, "k");
        let name = field(fields, "n");
        match kind {
            "s" | "c" => {
                let Ok(offset) = field(fields, "o").parse::<Offset>() else {
                    continue;
                };
                let prev = parse_offset(field(fields, "p"));
                let accepted = field(fields, "t").parse().unwrap_or(0);
                let label = if kind == "s" { "session" } else { "channel" };
                bus.bus_metrics
                    .routed
                    .with_label_values(&[label, "in"])
                    .inc();
                if kind == "s" {
                    let Ok(session) = SessionId::parse(name) else {
                        continue;
                    };
                    let stored = Stored {
                        offset,
                        prev,
                        data: field(fields, "d"),
                        from: field(fields, "f"),
                        accepted_ms: accepted,
                        trace: field(fields, "tp"),
                    };
                    if let Some(d) = bus.delivery(None, stored) {
                        bus.deliver_local_session(&session, &d);
                    }
                } else {
                    let Ok(channel) = ChannelName::parse(name) else {
                        continue;
                    };
                    let stored = Stored {
                        offset,
                        prev,
                        data: field(fields, "d"),
                        from: "",
                        accepted_ms: accepted,
                        trace: "",
                    };
                    if let Some(d) = bus.delivery(Some(&channel), stored) {
                        let span =
                            tracing::info_span!(target: otel::TARGET, "fanout", channel = %channel);
                        if !span.is_disabled() {
                            otel::link(&span, Some(field(fields, "tp")));
                        }
                        span.in_scope(|| bus.deliver_channel(&channel, &d));
                    }
                }
            }
            "x" | "k" => {
                let Ok(session) = SessionId::parse(name) else {
                    continue;
                };
                let reason = if kind == "x" {
                    CloseReason::TakenOver
                } else {
                    CloseReason::Kicked
                };
                bus.close_local(&session, field(fields, "i"), field(fields, "c"), reason);
            }
            other => tracing::warn!(kind = other, "unknown inbox entry kind; skipped"),
        }
    }
}
