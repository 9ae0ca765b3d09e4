//! This pod: its name, its capacity and how loaded it is right now.
//!
//! Shared by the gateway (which counts connections), the bus (which reports
//! the pod to the fleet) and the readiness probe.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use serde::Serialize;

/// A pod as the fleet sees it (`GET /v1/fleet`).
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct PodStatus {
    pub pod: String,
    pub connections: usize,
    pub capacity: usize,
    pub draining: bool,
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
    /// Set once on SIGTERM; never cleared.
    draining: AtomicBool,
}

impl LocalPod {
    pub fn new(name: String, capacity: usize) -> Self {
        Self {
            name,
            capacity,
            connections: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
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
}
