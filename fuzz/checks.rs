//! What every fuzz input must satisfy. Shared, by `#[path]`, between the
//! libFuzzer targets (`fuzz/fuzz_targets/`, nightly) and the corpus replay
//! test (`tests/fuzz_corpus.rs`, stable), so both check the same things.
//!
//! Inputs larger than the default limit are skipped: the server never
//! parses them (a WebSocket message over `--max-frame-bytes` closes the
//! connection with 1009 inside tungstenite; an HTTP body over it is refused
//! with 413 by the router's body limit), so the parsers' bound is the limit.

use wsfleet::gateway::socket::{SocketConfig, decode_client_bytes};
use wsfleet::gateway::{parse_idempotency_key, parse_message_body};
use wsfleet::protocol::{frame, parse_client_frame};

/// `--max-frame-bytes`' default: the largest input the parsers ever see.
pub const MAX_INPUT: usize = 64 * 1024;

/// What an answer may add to its input: the error frame's fixed text and
/// JSON escaping of the parts of the input it quotes (at most 6 bytes, as
/// `\u0000`, for each input byte).
fn bound(input_len: usize) -> usize {
    6 * input_len + 1024
}

/// One client text frame: parses without panicking, and whatever is sent
/// back (an `error` frame, the echoed `id`) stays proportional to the input.
pub fn client_frame(data: &[u8]) {
    // tungstenite hands the connection only valid UTF-8 text frames.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if text.len() > MAX_INPUT {
        return;
    }
    match parse_client_frame(text) {
        Ok(request) => {
            let kind = request.frame.kind();
            assert!(!kind.is_empty());
            if let Some(id) = &request.id {
                assert!(id.get().len() <= text.len(), "id longer than the frame");
            }
        }
        Err(rejection) => {
            let reply = frame::error(rejection.id.as_deref(), rejection.code, &rejection.message);
            assert!(
                reply.len() <= bound(text.len()),
                "error frame of {} bytes for a {}-byte frame",
                reply.len(),
                text.len()
            );
            assert!(serde_json::from_str::<serde_json::Value>(&reply).is_ok());
        }
    }
}

/// One `/v1/*` message POST: the first line is the `Idempotency-Key`
/// header value (absent when there is no newline), the rest the body.
pub fn api_body(data: &[u8]) {
    let (key, body) = match data.iter().position(|&b| b == b'\n') {
        Some(at) => (Some(&data[..at]), &data[at + 1..]),
        None => (None, data),
    };
    if let Some(key) = key {
        match parse_idempotency_key(key) {
            Ok(k) => {
                assert_eq!(k.len(), key.len());
                assert!((1..=256).contains(&k.len()));
            }
            Err(e) => assert!(e.message.len() <= 1024),
        }
    }
    if body.len() > MAX_INPUT {
        return;
    }
    match parse_message_body(body) {
        Ok(parsed) => {
            let raw = parsed.data.get();
            assert!(raw.len() <= body.len(), "data longer than the body");
            assert!(serde_json::from_str::<&serde_json::value::RawValue>(raw).is_ok());
        }
        Err(e) => assert!(
            e.message.len() <= bound(body.len()),
            "error message of {} bytes for a {}-byte body",
            e.message.len(),
            body.len()
        ),
    }
}

/// The frame limits the checks run the socket with: small, so the corpus
/// reaches them.
const FRAMES: SocketConfig = SocketConfig {
    read_buffer_bytes: 64,
    max_frame_bytes: 4096,
    max_message_bytes: 8192,
};

/// A client's raw bytes after the upgrade (`gateway::socket`): decoding
/// never panics and ends in messages, a clean end or a violation with a
/// close code the server may send; nothing it yields or writes back is
/// larger than the input, and between messages the socket holds only its
/// read buffer.
pub fn ws_frames(data: &[u8]) {
    if data.len() > MAX_INPUT {
        return;
    }
    let decoded = decode_client_bytes(data, FRAMES);
    assert_eq!(decoded.other_error, None);
    if let Some(v) = decoded.violation {
        assert!(
            matches!(v.code, 1002 | 1007 | 1009),
            "close code {}",
            v.code
        );
    }
    let yielded = decoded.yielded_bytes();
    assert!(
        yielded <= data.len(),
        "{yielded} bytes yielded from {}",
        data.len()
    );
    assert!(
        decoded.written.len() <= data.len(),
        "{} bytes written back for {}",
        decoded.written.len(),
        data.len()
    );
    assert!(decoded.peak_resting_capacity <= FRAMES.read_buffer_bytes);
}
