//! Posting messages through the wsfleet HTTP API, as a backend would.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use crate::protocol::{Offset, now_micros};
use crate::stats::Stats;
use crate::{Error, Result};

/// The 202 body of both message endpoints.
#[derive(Deserialize)]
struct Accepted {
    offset: String,
}

/// What a POST is addressed to.
#[derive(Clone, Copy, Debug)]
pub enum Destination<'a> {
    Session(&'a str),
    Channel(&'a str),
}

/// A small HTTP client with a bound on requests in flight, so that a slow
/// server slows the bench's send rate instead of growing its memory.
#[derive(Clone)]
pub struct Publisher {
    client: reqwest::Client,
    in_flight: Arc<Semaphore>,
    stats: Arc<Stats>,
}

impl Publisher {
    pub fn new(stats: Arc<Stats>, max_in_flight: usize) -> Result<Self> {
        let client = reqwest::Client::builder()
            // Loopback only: never route through an HTTP proxy from the environment.
            .no_proxy()
            .timeout(Duration::from_secs(10))
            .pool_max_idle_per_host(max_in_flight.max(1))
            .build()?;
        Ok(Publisher {
            client,
            in_flight: Arc::new(Semaphore::new(max_in_flight.max(1))),
            stats,
        })
    }

    /// Waits for room for one more request.
    pub async fn permit(&self) -> Option<OwnedSemaphorePermit> {
        self.in_flight.clone().acquire_owned().await.ok()
    }

    /// POSTs `{"data":{"t":<now>,"n":n}}` to `base` and returns the accepted
    /// offset. Counts `post_ok` / `post_failed.*`, records `http_post` latency.
    pub async fn post(&self, base: &str, to: Destination<'_>, n: u64) -> Result<Offset> {
        let url = match to {
            Destination::Session(s) => format!("{base}/v1/sessions/{s}/messages"),
            Destination::Channel(c) => format!("{base}/v1/channels/{c}/messages"),
        };
        let body = serde_json::json!({ "data": { "t": now_micros(), "n": n } });
        let started = Instant::now();
        let result = async {
            let resp = self.client.post(&url).json(&body).send().await?;
            let status = resp.status().as_u16();
            if status != 202 && status != 200 {
                return Err(Error::HttpStatus(status));
            }
            let accepted: Accepted = resp.json().await?;
            accepted.offset.parse::<Offset>()
        }
        .await;
        match &result {
            Ok(_) => {
                self.stats.record("http_post", started.elapsed());
                self.stats.incr("post_ok");
            }
            Err(e) => self.stats.error("post_failed", e),
        }
        result
    }
}

/// One result of a `POST /v1/messages` batch.
#[derive(Deserialize)]
struct BatchResult {
    offset: Option<String>,
}

#[derive(Deserialize)]
struct BatchAnswer {
    results: Vec<BatchResult>,
}

impl Publisher {
    /// POSTs one `POST /v1/messages` batch, a message to each of
    /// `sessions`; counts `post_ok` per accepted message, `post_failed.*`
    /// per refused one (or all of them when the request fails), records
    /// `http_batch` latency per request.
    pub async fn post_batch(&self, base: &str, sessions: &[String], first_n: u64) {
        let url = format!("{base}/v1/messages");
        let t = now_micros();
        let messages: Vec<_> = sessions
            .iter()
            .enumerate()
            .map(|(k, s)| serde_json::json!({"session": s, "data": {"t": t, "n": first_n + k as u64}}))
            .collect();
        let body = serde_json::json!({ "messages": messages });
        let started = Instant::now();
        let answer = async {
            let resp = self.client.post(&url).json(&body).send().await?;
            let status = resp.status().as_u16();
            if status != 200 {
                return Err(Error::HttpStatus(status));
            }
            Ok::<BatchAnswer, Error>(resp.json().await?)
        }
        .await;
        match answer {
            Ok(a) => {
                self.stats.record("http_batch", started.elapsed());
                for r in a.results {
                    match r.offset {
                        Some(_) => self.stats.incr("post_ok"),
                        None => self.stats.error("post_failed", &Error::HttpStatus(200)),
                    }
                }
            }
            Err(e) => {
                for _ in sessions {
                    self.stats.error("post_failed", &e);
                }
            }
        }
    }
}

/// Calls `send(n)` `rate` times per second until `until`, spawning each call
/// so that slow requests do not hold up the schedule (only the in-flight
/// bound does). Returns when every spawned call has finished.
pub async fn paced<F, Fut>(
    publisher: &Publisher,
    rate: f64,
    until: tokio::time::Instant,
    mut send: F,
) -> u64
where
    F: FnMut(u64) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut tasks = JoinSet::new();
    let mut n = 0u64;
    if rate > 0.0 {
        // Burst (the default) catches up after a late tick, so rates above
        // the timer's 1 ms resolution still come out right on average.
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = tokio::time::sleep_until(until) => break,
            }
            let Some(permit) = publisher.permit().await else {
                break;
            };
            let fut = send(n);
            tasks.spawn(async move {
                fut.await;
                drop(permit);
            });
            n += 1;
            while tasks.try_join_next().is_some() {}
        }
    }
    while tasks.join_next().await.is_some() {}
    n
}
