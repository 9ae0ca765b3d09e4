//! Events for backends: a client connected, disconnected, or sent an
//! `upstream` frame. They go to the bus's stream (cluster mode) and/or are
//! POSTed to a webhook (any mode).
//!
//! The webhook is fed through a bounded queue so a slow backend can never
//! stall a connection's task: when the queue is full the event is refused
//! (the client gets `unavailable`) rather than buffered without limit.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use serde_json::value::RawValue;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::bus::Bus;
use crate::config::Secret;
use crate::protocol::SessionId;
use crate::telemetry::Metrics;

/// Events waiting for the webhook.
const WEBHOOK_QUEUE: usize = 10_000;
/// Webhook requests in flight at once.
const WEBHOOK_CONCURRENCY: usize = 32;
const WEBHOOK_ATTEMPTS: u32 = 3;
const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Connect,
    Disconnect,
    Upstream,
}

impl EventKind {
    fn as_str(self) -> &'static str {
        match self {
            EventKind::Connect => "connect",
            EventKind::Disconnect => "disconnect",
            EventKind::Upstream => "upstream",
        }
    }
}

#[derive(Serialize)]
struct Event<'a> {
    event: &'static str,
    session: &'a str,
    pod: &'a str,
    ts: String,
    data: Option<&'a RawValue>,
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("no upstream is configured (set --webhook-url or run in cluster mode)")]
    NotConfigured,
    #[error("upstream is overloaded, try again")]
    Overloaded,
    #[error("upstream stream unavailable: {0}")]
    Bus(String),
}

/// Sends upstream events to wherever they are configured to go.
#[derive(Clone)]
pub struct Upstream {
    pod: Arc<str>,
    bus: Arc<dyn Bus>,
    /// Whether the bus has a stream for events (cluster mode).
    bus_stream: bool,
    webhook: Option<Webhook>,
    metrics: Arc<Metrics>,
}

/// The webhook's queue and the handles that end its worker.
#[derive(Clone)]
struct Webhook {
    queue: mpsc::Sender<String>,
    /// Cancelled by [`Upstream::finish`]: deliver what is queued, then stop.
    finish: CancellationToken,
    /// Cancelled when the flush runs out of time: in-flight POSTs are aborted.
    abandon: CancellationToken,
    /// Cancelled by the worker when it has returned.
    finished: CancellationToken,
}

impl Upstream {
    /// Starts the webhook worker (if `webhook_url` is set), tracked by
    /// `tracker`; [`Upstream::finish`] flushes it at shutdown.
    pub fn new(
        pod: &str,
        bus: Arc<dyn Bus>,
        bus_stream: bool,
        webhook_url: Option<Secret>,
        metrics: Arc<Metrics>,
        tracker: &TaskTracker,
    ) -> Self {
        let webhook = webhook_url.map(|Secret(url)| {
            let (queue, rx) = mpsc::channel(WEBHOOK_QUEUE);
            let webhook = Webhook {
                queue,
                finish: CancellationToken::new(),
                abandon: CancellationToken::new(),
                finished: CancellationToken::new(),
            };
            tracker.spawn(run_webhook(
                Arc::from(url),
                rx,
                metrics.clone(),
                webhook.clone(),
            ));
            webhook
        });
        Self {
            pod: Arc::from(pod),
            bus,
            bus_stream,
            webhook,
            metrics,
        }
    }

    /// At shutdown, once no connection is left to emit more: delivers every
    /// queued webhook event (with retries) within `within`, then abandons
    /// what is left (counted as `abandoned`). True when nothing was abandoned.
    pub async fn finish(&self, within: Duration) -> bool {
        let Some(webhook) = &self.webhook else {
            return true;
        };
        webhook.finish.cancel();
        if tokio::time::timeout(within, webhook.finished.cancelled())
            .await
            .is_ok()
        {
            return true;
        }
        webhook.abandon.cancel();
        webhook.finished.cancelled().await;
        false
    }

    pub fn is_configured(&self) -> bool {
        self.bus_stream || self.webhook.is_some()
    }

    /// Emits one event to every configured sink.
    #[tracing::instrument(level = "debug", skip(self, data), fields(kind = kind.as_str()))]
    pub async fn emit(
        &self,
        kind: EventKind,
        session: &SessionId,
        data: Option<&RawValue>,
    ) -> Result<(), UpstreamError> {
        if !self.is_configured() {
            return Err(UpstreamError::NotConfigured);
        }
        let ts = OffsetDateTime::now_utc()
            .format(&Rfc3339)
            .unwrap_or_default();
        let json = serde_json::to_string(&Event {
            event: kind.as_str(),
            session,
            pod: &self.pod,
            ts,
            data,
        })
        .map_err(|e| UpstreamError::Bus(e.to_string()))?;
        if self.bus_stream {
            match self.bus.append_upstream(&json).await {
                Ok(_) => self.count("stream", "accepted"),
                Err(e) => {
                    self.count("stream", "error");
                    return Err(UpstreamError::Bus(e.to_string()));
                }
            }
        }
        if let Some(webhook) = &self.webhook {
            if webhook.queue.try_send(json).is_err() {
                self.count("webhook", "dropped");
                return Err(UpstreamError::Overloaded);
            }
            self.count("webhook", "queued");
        }
        Ok(())
    }

    fn count(&self, sink: &str, outcome: &str) {
        self.metrics
            .upstream_events
            .with_label_values(&[sink, outcome])
            .inc();
    }
}

/// Feeds queued events to the webhook, at most [`WEBHOOK_CONCURRENCY`]
/// POSTs at once. Every POST is a task of this worker's `JoinSet`, never
/// detached, so shutdown can wait for them (or abort them) instead of
/// exiting under them.
async fn run_webhook(
    url: Arc<str>,
    mut rx: mpsc::Receiver<String>,
    metrics: Arc<Metrics>,
    webhook: Webhook,
) {
    let _finished = webhook.finished.clone().drop_guard();
    let client = match reqwest::Client::builder().timeout(WEBHOOK_TIMEOUT).build() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the webhook client; upstream webhook disabled");
            return;
        }
    };
    let record = |outcome: &str| {
        metrics
            .upstream_events
            .with_label_values(&["webhook", outcome])
            .inc();
    };
    let mut posts: JoinSet<&'static str> = JoinSet::new();
    let mut queue_open = true;
    let mut finishing = false;
    while queue_open || !posts.is_empty() {
        tokio::select! {
            biased;
            _ = webhook.abandon.cancelled() => {
                let left = posts.len() + rx.len();
                posts.abort_all();
                for _ in 0..left {
                    record("abandoned");
                }
                tracing::warn!(left, "shutdown: webhook events abandoned after the flush window");
                return;
            }
            Some(done) = posts.join_next(), if !posts.is_empty() => {
                record(done.unwrap_or("failed"));
            }
            _ = webhook.finish.cancelled(), if !finishing => {
                // Refuse new events; what is queued is still received.
                finishing = true;
                rx.close();
                tracing::info!(queued = rx.len(), in_flight = posts.len(), "shutdown: flushing webhook events");
            }
            body = rx.recv(), if queue_open && posts.len() < WEBHOOK_CONCURRENCY => match body {
                Some(body) => {
                    posts.spawn(post_with_retries(client.clone(), url.clone(), Bytes::from(body)));
                }
                None => queue_open = false,
            },
        }
    }
    if finishing {
        tracing::info!("shutdown: every webhook event delivered or answered");
    }
}

async fn post_with_retries(client: reqwest::Client, url: Arc<str>, body: Bytes) -> &'static str {
    for attempt in 1..=WEBHOOK_ATTEMPTS {
        let result = client
            .post(&*url)
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await;
        match result {
            Ok(resp) if resp.status().is_success() => return "delivered",
            Ok(resp) if resp.status().is_client_error() => {
                tracing::warn!(status = %resp.status(), "webhook refused an upstream event; not retrying");
                return "refused";
            }
            Ok(resp) => tracing::warn!(status = %resp.status(), attempt, "webhook failed"),
            // Without the URL: it may carry credentials.
            Err(e) => tracing::warn!(error = %e.without_url(), attempt, "webhook unreachable"),
        }
        if attempt < WEBHOOK_ATTEMPTS {
            tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
        }
    }
    "failed"
}
