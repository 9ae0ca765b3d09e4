//! The wire protocol: names, offsets, frames and close codes. Pure; no I/O.

pub mod close;
pub mod frame;
mod names;
mod offset;

pub use frame::{ClientFrame, ErrorCode, Rejection, Request, parse_client_frame};
pub use names::{BadName, ChannelName, MAX_NAME_LEN, SessionId};
pub use offset::{BadOffset, Offset};
