//! `connect`: open N idle connections, hold them, and measure handshakes and
//! memory per connection (client and server).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::fleet::{Conn, Fleet, Phase, Ready};
use super::{Common, Plan, Share, handshake_rate};
use crate::Result;
use crate::multiproc::Coordinator;
use crate::report::Report;
use crate::stats::{Measurements, Stats};

/// How long connections get to close politely at the end.
pub(crate) const CLOSE_GRACE: Duration = Duration::from_secs(10);

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Params {
    pub common: Common,
    /// Idle connections to open (all processes together).
    pub connections: usize,
}

impl Params {
    pub(crate) fn validate(&self) -> Result<()> {
        super::check_count("connections", self.connections)
    }
}

/// Runs the scenario in this process.
pub async fn run(params: Params) -> Result<Report> {
    Plan::Connect(params).run_local().await
}

pub async fn execute(p: &Params, share: Share, coord: &Coordinator) -> Result<Measurements> {
    execute_with(p, share, coord, Arc::new(Stats::new())).await
}

/// [`execute`] recording into `stats` (soak watches them live).
pub async fn execute_with(
    p: &Params,
    share: Share,
    coord: &Coordinator,
    stats: Arc<Stats>,
) -> Result<Measurements> {
    let mut fleet = Fleet::new(&p.common, stats.clone())?;
    let ramp = fleet
        .open(&p.common, share, p.connections, idle_connection)
        .await;
    coord.ready(ramp.ready).await;
    fleet.set_phase(Phase::Run);
    let started = Instant::now();
    tokio::time::sleep(p.common.duration()).await;
    stats.set_phase("run", started.elapsed());
    fleet.close(CLOSE_GRACE).await;
    Ok(stats.snapshot())
}

/// An idle connection: reads (so pings are answered) until `Stop`.
async fn idle_connection(mut conn: Conn, ready: Ready) {
    ready.fire(true);
    if conn.hold_until(Phase::Stop).await {
        conn.stats.incr("held_to_end");
        // Boxed: `close` takes the connection by value and holds a timer; an
        // inline future would store a second `Conn` in every resting task.
        Box::pin(conn.close()).await;
    }
}

pub(crate) fn finish(m: &mut Measurements, prefix: &str) -> BTreeMap<String, f64> {
    let mut rates = BTreeMap::new();
    handshake_rate(m, prefix, &mut rates);
    rates
}

#[cfg(test)]
mod tests {
    use super::*;

    fn future_size<A, B, F: std::future::Future>(_: impl Fn(A, B) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// The resting future of an idle connection is most of what the bench
    /// spends per connection besides its read buffer. It was 1984 bytes
    /// while `close` and `resume` were inline; boxing them brought it to
    /// about 1080 (with a 432-byte `Conn`). This keeps it from creeping back.
    #[test]
    fn idle_connection_future_stays_small() {
        let size = future_size(idle_connection);
        assert!(size <= 1280, "idle connection future is {size} bytes");
    }
}
