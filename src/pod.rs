//! This pod: its name, its capacity and how loaded it is right now.
//!
//! Shared by the gateway (which counts connections), the bus (which reports
//! the pod to the fleet), the readiness probe, and the orders the
//! controller sends it (shed connections, drain).

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// A pod as the fleet sees it (`GET /v1/fleet`).
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct PodStatus {
    pub pod: String,
    pub connections: usize,
    pub capacity: usize,
    pub draining: bool,
    /// Executing a shedding order from the controller (v1.1 "Shedding").
    /// Absent in reports of older pods: they never shed.
    #[serde(default)]
    pub shedding: bool,
}

/// What the controller asks one pod to do (through Redis, `wsf:ctl`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    /// Unique per order: a pod executes each id once, however often it
    /// reads the same order back.
    pub id: String,
    /// When the controller issued it (ms since the epoch). A pod ignores
    /// orders issued before it started: they were meant for an earlier
    /// process of the same name.
    pub issued_ms: u64,
    #[serde(flatten)]
    pub action: OrderAction,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum OrderAction {
    /// Rebalancing: ask `count` connections (the longest-connected first)
    /// to reconnect elsewhere, at most `per_s` per second.
    Shed { count: usize, per_s: u32 },
    /// Scale-down: this pod is going; drain it as on SIGTERM (readiness
    /// off, `reconnect` + 1012 spread over the drain window) but keep
    /// running until Kubernetes stops it.
    Drain,
}

/// Live state of the pod this process runs.
#[derive(Debug)]
pub struct LocalPod {
    /// The pod's name in the fleet (Kubernetes pod name or hostname).
    pub name: String,
    /// Most WebSocket connections this pod accepts at once.
    pub capacity: usize,
    /// WebSocket connections held now, including ones still replaying.
    connections: AtomicUsize,
    /// Set once on SIGTERM or a drain order; never cleared.
    draining: AtomicBool,
    /// Cancelled when draining starts; every connection then picks its own
    /// moment within the drain window to leave.
    drain: CancellationToken,
    /// While a shedding order runs: readiness is off.
    shedding: AtomicBool,
    /// Process start (ms since the epoch): older orders are not for us.
    started_ms: u64,
    /// The newest order accepted, for the task that executes them.
    orders: watch::Sender<Option<Order>>,
    /// Id of the newest order accepted, so each runs once.
    last_order: Mutex<Option<String>>,
}

impl LocalPod {
    pub fn new(name: String, capacity: usize) -> Self {
        Self {
            name,
            capacity,
            connections: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
            drain: CancellationToken::new(),
            shedding: AtomicBool::new(false),
            started_ms: crate::bus::now_ms(),
            orders: watch::Sender::new(None),
            last_order: Mutex::new(None),
        }
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
        self.drain.cancel();
    }

    /// Cancelled once the pod drains (SIGTERM or a drain order).
    pub fn drain_token(&self) -> CancellationToken {
        self.drain.clone()
    }

    pub fn is_shedding(&self) -> bool {
        self.shedding.load(Ordering::Relaxed)
    }

    pub fn set_shedding(&self, on: bool) {
        self.shedding.store(on, Ordering::Relaxed);
    }

    /// Takes an order read from the controller's channel. Returns whether
    /// it is new: not seen before and not issued before this process
    /// started. Reading the same order again every tick does nothing.
    pub fn offer_order(&self, order: Order) -> bool {
        if order.issued_ms < self.started_ms {
            return false;
        }
        let mut last = self.last_order.lock().unwrap_or_else(|e| e.into_inner());
        if last.as_deref() == Some(order.id.as_str()) {
            return false;
        }
        *last = Some(order.id.clone());
        self.orders.send_replace(Some(order));
        true
    }

    /// Orders as they are accepted, for the task that executes them.
    pub fn orders(&self) -> watch::Receiver<Option<Order>> {
        self.orders.subscribe()
    }

    pub fn is_full(&self) -> bool {
        self.connections() >= self.capacity
    }

    /// Takes one connection slot if the pod is below capacity. The slot is
    /// given back when the returned guard drops, however the connection ends.
    pub fn reserve(self: &std::sync::Arc<Self>) -> Option<ConnectionSlot> {
        let taken = self
            .connections
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.capacity).then_some(n + 1)
            });
        taken.ok().map(|_| ConnectionSlot { pod: self.clone() })
    }

    pub fn status(&self) -> PodStatus {
        PodStatus {
            pod: self.name.clone(),
            connections: self.connections(),
            capacity: self.capacity,
            draining: self.is_draining(),
            shedding: self.is_shedding(),
        }
    }
}

/// One reserved connection slot; dropping it frees the slot.
#[derive(Debug)]
pub struct ConnectionSlot {
    pod: std::sync::Arc<LocalPod>,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.pod.connections.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn slots_stop_at_capacity_and_come_back_on_drop() {
        let pod = Arc::new(LocalPod::new("p".into(), 2));
        let a = pod.reserve().expect("first slot");
        let _b = pod.reserve().expect("second slot");
        assert!(pod.reserve().is_none());
        assert!(pod.is_full());
        drop(a);
        assert_eq!(pod.connections(), 1);
        assert!(pod.reserve().is_some());
    }

    fn order(id: &str, issued_ms: u64) -> Order {
        Order {
            id: id.into(),
            issued_ms,
            action: OrderAction::Shed { count: 5, per_s: 2 },
        }
    }

    #[test]
    fn an_order_runs_once_and_never_one_from_before_the_process() {
        let pod = LocalPod::new("p".into(), 2);
        let orders = pod.orders();
        assert!(!pod.offer_order(order("old", pod.started_ms - 1)));
        assert!(orders.borrow().is_none());
        assert!(pod.offer_order(order("a", pod.started_ms)));
        assert!(
            !pod.offer_order(order("a", pod.started_ms)),
            "same id twice"
        );
        assert!(pod.offer_order(order("b", pod.started_ms + 5)));
        assert_eq!(orders.borrow().as_ref().map(|o| o.id.as_str()), Some("b"));
    }

    #[test]
    fn orders_have_one_wire_form() {
        let shed: Order = serde_json::from_str(
            r#"{"id":"x","issued_ms":7,"action":"shed","count":3,"per_s":100}"#,
        )
        .expect("shed order");
        assert_eq!(
            shed.action,
            OrderAction::Shed {
                count: 3,
                per_s: 100
            }
        );
        let drain: Order =
            serde_json::from_str(r#"{"id":"y","issued_ms":7,"action":"drain"}"#).expect("drain");
        assert_eq!(drain.action, OrderAction::Drain);
        let back: Order =
            serde_json::from_str(&serde_json::to_string(&shed).expect("ser")).expect("de");
        assert_eq!(back, shed);
        assert!(
            serde_json::from_str::<Order>(r#"{"id":"z","issued_ms":7,"action":"explode"}"#)
                .is_err()
        );
    }

    #[test]
    fn a_report_without_shedding_reads_as_not_shedding() {
        let s: PodStatus =
            serde_json::from_str(r#"{"pod":"a","connections":1,"capacity":2,"draining":false}"#)
                .expect("old report");
        assert!(!s.shedding);
    }

    #[test]
    fn draining_cancels_the_drain_token() {
        let pod = LocalPod::new("p".into(), 2);
        let token = pod.drain_token();
        assert!(!token.is_cancelled());
        pod.start_draining();
        assert!(token.is_cancelled() && pod.is_draining());
    }
}
