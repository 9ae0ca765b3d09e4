//! wsfleet-bench: load generator and measuring tool for wsfleet.
//!
//! The layout follows the life of a run:
//!
//! - [`target`]: which servers the bench may talk to (loopback only) and from
//!   which source addresses.
//! - [`protocol`]: the few wsfleet frames the bench speaks, and [`protocol::Offset`].
//! - [`client`]: dialing one WebSocket connection with deliberately small buffers.
//! - [`http`]: posting messages through the HTTP API.
//! - [`stats`]: counters and HDR latency histograms that merge across processes.
//! - [`machine`]: RSS and machine facts read from `/proc`.
//! - [`scenario`]: one module per scenario, all built on [`scenario::fleet`].
//! - [`multiproc`]: splitting one run over several processes of this binary.
//! - [`report`]: the human summary and the JSON result.
//! - [`floor`]: a minimal echo server, the floor wsfleet is compared against.
//! - [`compare`]: the same scenario against the floor and wsfleet, in one run.
//! - [`bigframe`]: what one large message leaves behind on every connection.
//!
//! Every scenario can be called in-process, e.g.
//! `wsfleet_bench::scenario::connect::run(params).await`.

pub mod bigframe;
pub mod client;
pub mod compare;
pub mod error;
pub mod floor;
pub mod http;
pub mod machine;
pub mod multiproc;
pub mod protocol;
pub mod report;
pub mod scenario;
pub mod stats;
pub mod target;

pub use error::{Error, Result};
