//! Waiting for replicas (`--redis-wait-replicas`) without stalling anything
//! else on the pod.
//!
//! `WAIT` blocks the connection it is sent on, and counts only that
//! connection's own writes. So it gets a connection of its own, and a
//! barrier write sent just before it on that connection carries the
//! replication offset of every append already acknowledged on the shared
//! connection: one round (barrier + WAIT) vouches for every append that
//! finished before the round began. Appends that finish during a round wait
//! for the next one (group commit); claims, renewals and acknowledgements
//! never queue behind a WAIT (trap 8).

use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::conn::{BusMetrics, Conn, Effect};
use crate::bus::{BusError, Result};

/// Appends waiting for a round at once; beyond it an append waits to queue.
const QUEUE: usize = 4096;

/// How long the barrier record lives; only its write matters.
const BARRIER_TTL_MS: u64 = 60_000;

type Answer = std::result::Result<i64, String>;

/// The appending side: asks for a round and waits for its answer.
pub struct ReplicaWait {
    replicas: u32,
    wait_ms: u64,
    requests: mpsc::Sender<oneshot::Sender<Answer>>,
}

/// The side run by its own task, on its own connection.
pub struct ReplicaRounds {
    replicas: u32,
    wait_ms: u64,
    barrier_key: String,
    conn: Conn,
    metrics: BusMetrics,
    requests: mpsc::Receiver<oneshot::Sender<Answer>>,
}

/// WAIT's own timeout: half the call deadline, and never 0 (which would
/// block the connection until enough replicas answer, possibly forever).
pub fn wait_timeout_ms(call_timeout: Duration) -> u64 {
    (call_timeout.as_millis() as u64 / 2).max(1)
}

/// A waiter and its round task, to be spawned with [`ReplicaRounds::run`].
pub fn replica_wait(
    replicas: u32,
    call_timeout: Duration,
    barrier_key: String,
    conn: Conn,
    metrics: BusMetrics,
) -> (ReplicaWait, ReplicaRounds) {
    let (tx, rx) = mpsc::channel(QUEUE);
    let wait_ms = wait_timeout_ms(call_timeout);
    (
        ReplicaWait {
            replicas,
            wait_ms,
            requests: tx,
        },
        ReplicaRounds {
            replicas,
            wait_ms,
            barrier_key,
            conn,
            metrics,
            requests: rx,
        },
    )
}

impl ReplicaWait {
    /// Waits until `replicas` replicas have everything this pod appended
    /// before the call. A shortfall is [`BusError::Timeout`]: the append is
    /// on the primary and may well be delivered, but a failover could lose
    /// it; a retry with the same idempotency key is safe.
    pub async fn wait(&self, what: &str) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        // At worst one round already running, then ours.
        let limit = Duration::from_millis(self.wait_ms * 2 + 1000);
        let answer = tokio::time::timeout(limit, async {
            self.requests
                .send(tx)
                .await
                .map_err(|_| "stopped".to_string())?;
            rx.await.map_err(|_| "stopped".to_string())?
        })
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {limit:?}")));
        match answer {
            Ok(acked) if acked >= i64::from(self.replicas) => Ok(()),
            Ok(acked) => Err(BusError::Timeout(format!(
                "only {acked} of {} replicas acknowledged {what} within {} ms; it is stored on \
                 the primary and may be delivered",
                self.replicas, self.wait_ms
            ))),
            Err(why) => Err(BusError::Timeout(format!(
                "waiting for {} replicas to acknowledge {what} failed ({why}); it is stored on \
                 the primary and may be delivered",
                self.replicas
            ))),
        }
    }
}

impl ReplicaRounds {
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut round: u64 = 0;
        loop {
            let first = tokio::select! {
                _ = shutdown.cancelled() => return,
                next = self.requests.recv() => match next {
                    Some(waiter) => waiter,
                    None => return,
                },
            };
            // Everyone queued now finished their append before this round's
            // barrier is written, so this one WAIT covers them all.
            let mut waiters = vec![first];
            while let Ok(waiter) = self.requests.try_recv() {
                waiters.push(waiter);
            }
            round += 1;
            let answer = self.round(round).await;
            let outcome = match &answer {
                Ok(acked) if *acked >= i64::from(self.replicas) => "acked",
                Ok(_) => "short",
                Err(_) => "failed",
            };
            self.metrics
                .replica_waits
                .with_label_values(&[outcome])
                .inc();
            if outcome != "acked" {
                tracing::warn!(
                    ?answer,
                    replicas = self.replicas,
                    "replicas did not acknowledge in time"
                );
            }
            for waiter in waiters {
                let _ = waiter.send(answer.clone());
            }
        }
    }

    async fn round(&mut self, round: u64) -> Answer {
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(&self.barrier_key)
            .arg(round)
            .arg("PX")
            .arg(BARRIER_TTL_MS)
            .ignore()
            .cmd("WAIT")
            .arg(self.replicas)
            .arg(self.wait_ms);
        let limit = Duration::from_millis(self.wait_ms + 1000);
        let reply: Result<(i64,)> = self
            .metrics
            .call(
                "wait",
                limit,
                Effect::Plain,
                pipe.query_async(&mut self.conn),
            )
            .await;
        reply.map(|(acked,)| acked).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_never_blocks_forever() {
        for (timeout_ms, want) in [(0, 1), (1, 1), (3, 1), (2000, 1000)] {
            assert_eq!(
                wait_timeout_ms(Duration::from_millis(timeout_ms)),
                want,
                "--redis-timeout-ms {timeout_ms}"
            );
        }
    }
}
