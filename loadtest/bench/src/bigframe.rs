//! `bigframe`: does one large message leave memory behind on every
//! connection it crossed? N subscribers of one channel sit idle; the
//! server's RSS per connection is read; one large message is published to
//! the channel; once every subscriber has it (and a settling pause), RSS per
//! connection is read again. The difference is what each connection kept
//! of the large frame (trap 14: socket buffers that keep their high-water
//! capacity).
//!
//! One process holds every connection, so N is bounded by its open-files
//! limit (`ulimit -n`, at most 20,000 here); the server needs as many.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt, stream};
use serde::Serialize;
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Message;

use crate::client::{Dialer, WsTuning, read_welcome};
use crate::machine::{MachineInfo, rss_kib};
use crate::protocol::subscribe_frame;
use crate::target::Target;
use crate::{Error, Result};

#[derive(Clone, Debug)]
pub struct Params {
    pub target: Target,
    /// The server process whose RSS is measured.
    pub server_pid: u32,
    pub connections: usize,
    /// Bytes of the published message's `data` string.
    pub payload_bytes: usize,
    pub connect_concurrency: usize,
    pub tuning: WsTuning,
    /// Pause before each RSS reading, so freed memory is returned.
    pub settle: Duration,
    /// Longest wait for every subscriber to receive the message.
    pub timeout: Duration,
    pub run_id: String,
}

/// The result, printed and written as JSON.
#[derive(Debug, Serialize)]
pub struct Outcome {
    pub machine: MachineInfo,
    pub connections: usize,
    pub payload_bytes: usize,
    pub server_rss_kib_before_connect: u64,
    pub server_rss_kib_idle: u64,
    pub server_rss_kib_after_bigframe: u64,
    /// (idle - before) / connections.
    pub bytes_per_connection_idle: f64,
    /// (after - idle) / connections: what the large frame left behind.
    pub growth_bytes_per_connection: f64,
    pub received: usize,
    pub delivery_s: f64,
}

impl Outcome {
    pub fn human(&self) -> String {
        format!(
            "bigframe: {} connections, one {} B message\n\
             server RSS: {:.1} MiB before connecting, {:.1} MiB idle, {:.1} MiB after the message\n\
             per connection: {:.0} B idle; growth after the large frame {:.0} B\n\
             received by {}/{} in {:.2} s\n",
            self.connections,
            self.payload_bytes,
            self.server_rss_kib_before_connect as f64 / 1024.0,
            self.server_rss_kib_idle as f64 / 1024.0,
            self.server_rss_kib_after_bigframe as f64 / 1024.0,
            self.bytes_per_connection_idle,
            self.growth_bytes_per_connection,
            self.received,
            self.connections,
            self.delivery_s,
        )
    }
}

fn server_rss(pid: u32) -> Result<u64> {
    rss_kib(Some(pid)).ok_or_else(|| Error::InvalidParam(format!("no process {pid} to measure")))
}

pub async fn run(p: Params) -> Result<Outcome> {
    if p.connections == 0 {
        return Err(Error::InvalidParam("--connections must be > 0".into()));
    }
    let channel: Arc<str> = format!("{}-bigframe", p.run_id).into();
    let dialer = Arc::new(Dialer::new(vec![p.target.clone()], Vec::new(), p.tuning)?);
    tokio::time::sleep(p.settle).await;
    let before = server_rss(p.server_pid)?;

    let subscribed = Arc::new(AtomicUsize::new(0));
    let received = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(Notify::new());
    let marker: Arc<str> = format!("{}-payload", p.run_id).into();
    let opened: Vec<_> = stream::iter(0..p.connections)
        .map(|i| {
            let dialer = dialer.clone();
            let session = format!("{}-{i}", p.run_id);
            async move {
                let mut ws = dialer.connect(i, &session, None).await?;
                read_welcome(&mut ws, Duration::from_secs(10)).await?;
                Ok::<_, Error>(ws)
            }
        })
        .buffer_unordered(p.connect_concurrency.max(1))
        .collect()
        .await;
    let mut tasks = Vec::with_capacity(p.connections);
    for ws in opened {
        let mut ws = ws?;
        let (channel, subscribed, received, stop, marker) = (
            channel.clone(),
            subscribed.clone(),
            received.clone(),
            stop.clone(),
            marker.clone(),
        );
        tasks.push(tokio::spawn(async move {
            if ws
                .send(Message::text(subscribe_frame(&channel, 1, None)))
                .await
                .is_err()
            {
                return;
            }
            let stopped = stop.notified();
            tokio::pin!(stopped);
            loop {
                tokio::select! {
                    _ = &mut stopped => break,
                    msg = ws.next() => match msg {
                        Some(Ok(Message::Text(t))) => {
                            if t.contains(r#""type":"ack""#) {
                                subscribed.fetch_add(1, Ordering::Relaxed);
                            } else if t.contains(&*marker) {
                                received.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Some(Ok(_)) => {}
                        Some(Err(_)) | None => return,
                    }
                }
            }
            let _ = ws.close(None).await;
        }));
    }
    let deadline = Instant::now() + p.timeout;
    while subscribed.load(Ordering::Relaxed) < p.connections {
        if Instant::now() > deadline {
            return Err(Error::Timeout("subscribe acks"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(p.settle).await;
    let idle = server_rss(p.server_pid)?;

    let body = serde_json::json!({ "data": format!("{marker}:{}", "x".repeat(p.payload_bytes)) });
    let url = format!("{}/v1/channels/{channel}/messages", p.target.http_base());
    let started = Instant::now();
    let status = reqwest::Client::new()
        .post(&url)
        .json(&body)
        .send()
        .await
        .map_err(|e| Error::Protocol(format!("publish: {e}")))?
        .status();
    if !status.is_success() {
        return Err(Error::HttpStatus(status.as_u16()));
    }
    while received.load(Ordering::Relaxed) < p.connections && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let delivery_s = started.elapsed().as_secs_f64();
    tokio::time::sleep(p.settle).await;
    let after = server_rss(p.server_pid)?;
    stop.notify_waiters();
    for t in tasks {
        let _ = t.await;
    }
    let per = |kib: i64| kib as f64 * 1024.0 / p.connections as f64;
    Ok(Outcome {
        machine: MachineInfo::current(),
        connections: p.connections,
        payload_bytes: p.payload_bytes,
        server_rss_kib_before_connect: before,
        server_rss_kib_idle: idle,
        server_rss_kib_after_bigframe: after,
        bytes_per_connection_idle: per(idle as i64 - before as i64),
        growth_bytes_per_connection: per(after as i64 - idle as i64),
        received: received.load(Ordering::Relaxed),
        delivery_s,
    })
}
