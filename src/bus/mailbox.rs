//! How the bus reaches one connection's task: a bounded queue of deliveries
//! plus an out-of-band close signal.
//!
//! The queue is only ever written with `try_send` (trap 7): a full queue marks
//! that one connection as a slow consumer and the writer moves on. Closing
//! goes through [`Control`], not the queue, so a takeover or a drain still
//! reaches a connection whose queue is full.

use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, mpsc};

use super::Delivery;
use crate::protocol::close::CloseReason;

/// Identifies one connection on this pod (not across pods).
pub type ConnId = u64;

/// The sending side, held by the bus wherever it routes to this connection.
#[derive(Debug, Clone)]
pub struct Mailbox {
    pub id: ConnId,
    queue: mpsc::Sender<Arc<Delivery>>,
    control: Arc<Control>,
}

/// The receiving side, owned by the connection's task.
#[derive(Debug)]
pub struct Inbox {
    pub queue: mpsc::Receiver<Arc<Delivery>>,
    pub control: Arc<Control>,
}

/// What happened to an offered delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    Queued,
    /// The queue was full: the connection is being closed with 1013.
    Overflow,
    /// The connection is gone.
    Closed,
}

/// Out-of-band close request. The first reason wins.
#[derive(Debug, Default)]
pub struct Control {
    reason: Mutex<Option<CloseReason>>,
    notify: Notify,
}

impl Control {
    pub fn close(&self, reason: CloseReason) {
        let mut slot = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(reason);
            drop(slot);
            // notify_one stores a permit, so a task not waiting right now
            // still sees it on its next turn of the loop.
            self.notify.notify_one();
        }
    }

    pub fn reason(&self) -> Option<CloseReason> {
        *self.reason.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Resolves once a close has been requested.
    pub async fn closed(&self) -> CloseReason {
        loop {
            if let Some(reason) = self.reason() {
                return reason;
            }
            self.notify.notified().await;
        }
    }
}

/// A connected pair for one connection, with a queue of `capacity` deliveries.
pub fn mailbox(id: ConnId, capacity: usize) -> (Mailbox, Inbox) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let control = Arc::new(Control::default());
    (
        Mailbox {
            id,
            queue: tx,
            control: control.clone(),
        },
        Inbox { queue: rx, control },
    )
}

impl Mailbox {
    /// Hands a delivery to the connection without waiting.
    pub fn offer(&self, delivery: &Arc<Delivery>) -> Offer {
        match self.queue.try_send(delivery.clone()) {
            Ok(()) => Offer::Queued,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.control.close(CloseReason::SlowConsumer);
                Offer::Overflow
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Offer::Closed,
        }
    }

    pub fn close(&self, reason: CloseReason) {
        self.control.close(reason);
    }

    pub fn is_closed(&self) -> bool {
        self.queue.is_closed()
    }
}
