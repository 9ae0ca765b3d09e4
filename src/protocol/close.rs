//! WebSocket close codes of the contract, and why a connection ends.

/// Closed normally (client asked, or `DELETE /v1/sessions/{id}`).
pub const NORMAL: u16 = 1000;
/// The pod is shutting down.
pub const GOING_AWAY: u16 = 1001;
/// The client broke RFC 6455 framing (unmasked, reserved bits, bad opcode,
/// bad close code, ...).
pub const PROTOCOL_ERROR: u16 = 1002;
/// A text frame or close reason that is not UTF-8.
pub const INVALID_PAYLOAD: u16 = 1007;
/// Authorisation or policy failure.
pub const POLICY: u16 = 1008;
/// A frame exceeded the size limit.
pub const TOO_LARGE: u16 = 1009;
/// This connection's task failed (panic or internal error); only this one.
pub const INTERNAL: u16 = 1011;
/// Drain or rebalance: reconnect (with `last`) after the announced delay.
pub const RESTART: u16 = 1012;
/// Overload or slow consumer: resume with `last` later, nothing is lost.
pub const TRY_LATER: u16 = 1013;
/// A newer connection of the same session took over.
pub const TAKEN_OVER: u16 = 4409;

/// Why the server is closing a connection from outside its task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// A newer connection for the same session claimed it.
    TakenOver,
    /// Its outbound queue overflowed.
    SlowConsumer,
    /// A backend deleted the session.
    Kicked,
    /// The pod is draining: tell the client when to come back.
    Drain { after_ms: u64 },
    /// The controller is rebalancing the fleet: reconnect (elsewhere).
    Rebalance { after_ms: u64 },
    /// The process is exiting now.
    Shutdown,
}

impl CloseReason {
    pub fn code(self) -> u16 {
        match self {
            CloseReason::TakenOver => TAKEN_OVER,
            CloseReason::SlowConsumer => TRY_LATER,
            CloseReason::Kicked => NORMAL,
            CloseReason::Drain { .. } | CloseReason::Rebalance { .. } => RESTART,
            CloseReason::Shutdown => GOING_AWAY,
        }
    }

    pub fn text(self) -> &'static str {
        match self {
            CloseReason::TakenOver => "taken over by a newer connection",
            CloseReason::SlowConsumer => {
                "slow consumer: outbound queue overflowed, resume with last"
            }
            CloseReason::Kicked => "session closed by the backend",
            CloseReason::Drain { .. } => "pod draining, reconnect",
            CloseReason::Rebalance { .. } => "rebalancing the fleet, reconnect",
            CloseReason::Shutdown => "pod shutting down",
        }
    }
}
