//! The pod's inbox reader: one task, its own Redis connection (a blocking
//! XREADGROUP would hold up every command queued behind it on a shared
//! multiplexed connection, trap 8), handing each entry to local mailboxes.
//!
//! Entries are acknowledged once handed over. An entry left pending by a
//! pod that died is never reclaimed by another pod, on purpose: its
//! sessions reconnect elsewhere and replay their logs, which hold every
//! accepted message (trap 1).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{RedisBus, keys, parse_offset};
use crate::bus::Delivery;
use crate::protocol::close::CloseReason;
use crate::protocol::{ChannelName, Offset, SessionId};

/// How long one XREADGROUP blocks waiting for entries.
const BLOCK: Duration = Duration::from_millis(1000);
/// Entries read per call.
const BATCH: usize = 512;

type Entry = (String, Vec<String>);
type StreamReply = Vec<(String, Vec<Entry>)>;

pub async fn read(bus: Arc<RedisBus>, shutdown: CancellationToken) {
    let mut backoff = Duration::from_millis(50);
    let mut reader = None;
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
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(keys::INBOX_GROUP)
            .arg(&bus.inst)
            .arg("COUNT")
            .arg(BATCH)
            .arg("BLOCK")
            .arg(BLOCK.as_millis() as u64)
            .arg("STREAMS")
            .arg(&bus.inbox)
            .arg(">");
        let reply = tokio::select! {
            _ = shutdown.cancelled() => return,
            reply = cmd.query_async::<Option<StreamReply>>(conn) => reply,
        };
        match reply {
            Ok(streams) => {
                backoff = Duration::from_millis(50);
                let entries: Vec<Entry> =
                    streams.into_iter().flatten().flat_map(|(_, e)| e).collect();
                if !entries.is_empty() {
                    dispatch(&bus, &entries);
                    ack(&bus, &entries);
                }
            }
            Err(e) if e.to_string().contains("NOGROUP") => {
                // First start, or Redis restarted without our inbox: create
                // it, then catch every local connection up from the logs,
                // since entries routed meanwhile were dropped.
                bus.bus_metrics.reconnects.inc();
                let created = create_group(&bus).await;
                if created {
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
                sleep_or_stop(&shutdown, &mut backoff).await;
            }
        }
    }
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

fn resync_everyone(bus: &RedisBus) {
    for owner in bus.sessions.iter() {
        owner.mailbox.offer(&Arc::new(Delivery::resync(None)));
    }
    let channels: Vec<ChannelName> = bus.channels.iter().map(|e| e.key().clone()).collect();
    for channel in channels {
        bus.deliver_local_channel(&channel, &Arc::new(Delivery::resync(Some(channel.clone()))));
    }
}

/// Acknowledges and deletes handed-over entries in one round trip, off the
/// reader's path: the next XREADGROUP need not wait for it.
fn ack(bus: &Arc<RedisBus>, entries: &[Entry]) {
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
    let bus = bus.clone();
    tokio::spawn(async move {
        let mut conn = bus.conn.clone();
        if let Err(e) = bus
            .call::<(i64, i64)>("xack_xdel", pipe.query_async(&mut conn))
            .await
        {
            tracing::warn!(error = %e, "acknowledging inbox entries failed");
        }
    });
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
                    if let Some(d) = bus.delivery(
                        None,
                        offset,
                        prev,
                        field(fields, "d"),
                        field(fields, "f"),
                        accepted,
                    ) {
                        bus.deliver_local_session(&session, &d);
                    }
                } else {
                    let Ok(channel) = ChannelName::parse(name) else {
                        continue;
                    };
                    if let Some(d) = bus.delivery(
                        Some(&channel),
                        offset,
                        prev,
                        field(fields, "d"),
                        "",
                        accepted,
                    ) {
                        bus.deliver_local_channel(&channel, &d);
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
