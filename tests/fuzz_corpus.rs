//! Replays every committed fuzz corpus file (`fuzz/corpus/<target>/`)
//! through the same checks the libFuzzer targets run, on the stable
//! toolchain, so the test command guards the parsers without nightly.
//! Longer runs: `cargo +nightly fuzz run <target>` (see README).

#[path = "../fuzz/checks.rs"]
mod checks;

use std::path::Path;

fn replay(target: &str, check: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("corpus entry").path();
        let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let outcome = std::panic::catch_unwind(|| check(&data));
        assert!(
            outcome.is_ok(),
            "{} fails the {target} checks",
            path.display()
        );
        files += 1;
    }
    assert!(files >= 10, "only {files} corpus files for {target}");
}

#[test]
fn client_frame_corpus_parses_without_panics_and_with_bounded_replies() {
    replay("client_frame", checks::client_frame);
}

#[test]
fn ws_frames_corpus_decodes_without_panics_and_with_bounded_buffers() {
    replay("ws_frames", checks::ws_frames);
}

#[test]
fn api_body_corpus_parses_without_panics_and_with_bounded_errors() {
    replay("api_body", checks::api_body);
}

/// The checks themselves can fail: an input past the limit is skipped
/// (the server never parses it), one within it is checked.
#[test]
fn the_checks_accept_the_contract_and_skip_what_the_server_refuses_earlier() {
    checks::client_frame(br#"{"type":"ping","id":1,"data":"x"}"#);
    checks::api_body(b"key\n{\"data\":1}");
    let huge = vec![b'['; checks::MAX_INPUT + 1];
    checks::client_frame(&huge);
    checks::api_body(&huge);
    checks::ws_frames(&huge);
    // A masked "hi" text frame and a close: decoded, nothing left held.
    checks::ws_frames(&[
        0x81,
        0x82,
        1,
        2,
        3,
        4,
        b'h' ^ 1,
        b'i' ^ 2,
        0x88,
        0x80,
        0,
        0,
        0,
        0,
    ]);
}
