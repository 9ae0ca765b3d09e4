//! Events for backends: a client connected, disconnected, or sent an
//! `upstream` frame. They go to the bus's stream (cluster mode) and/or are
//! POSTed to a webhook (any mode).
//!
//! The webhook is fed through a bounded queue so a slow backend can never
//! stall a connection's task: when the queue is full the event is refused
//! (the client gets `unavailable`) rather than buffered without limit.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde_json::value::RawValue;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::bus::Bus;
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
    webhook: Option<mpsc::Sender<String>>,
    metrics: Arc<Metrics>,
}

impl Upstream {
    /// Starts the webhook sender (if `webhook_url` is set), tracked by
    /// `tracker` so that shutdown waits for queued events briefly.
    pub fn new(
        pod: &str,
        bus: Arc<dyn Bus>,
        bus_stream: bool,
        webhook_url: Option<String>,
        metrics: Arc<Metrics>,
        tracker: &TaskTracker,
        shutdown: CancellationToken,
    ) -> Self {
        let webhook = webhook_url.map(|url| {
            let (tx, rx) = mpsc::channel(WEBHOOK_QUEUE);
            tracker.spawn(run_webhook(url, rx, metrics.clone(), shutdown));
            tx
        });
        Self {
            pod: Arc::from(pod),
            bus,
            bus_stream,
            webhook,
            metrics,
        }
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
            if webhook.try_send(json).is_err() {
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

async fn run_webhook(
    url: String,
    mut rx: mpsc::Receiver<String>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let client = match reqwest::Client::builder().timeout(WEBHOOK_TIMEOUT).build() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the webhook client; upstream webhook disabled");
            return;
        }
    };
    let permits = Arc::new(Semaphore::new(WEBHOOK_CONCURRENCY));
    loop {
        let body = tokio::select! {
            body = rx.recv() => match body { Some(b) => b, None => return },
            _ = shutdown.cancelled() => return,
        };
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let (client, url, metrics) = (client.clone(), url.clone(), metrics.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let outcome = post_with_retries(&client, &url, body).await;
            metrics
                .upstream_events
                .with_label_values(&["webhook", outcome])
                .inc();
        });
    }
}

async fn post_with_retries(client: &reqwest::Client, url: &str, body: String) -> &'static str {
    for attempt in 1..=WEBHOOK_ATTEMPTS {
        let result = client
            .post(url)
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
            Err(e) => tracing::warn!(error = %e, attempt, "webhook unreachable"),
        }
        tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
    }
    "failed"
}
