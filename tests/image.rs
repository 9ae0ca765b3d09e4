//! The container image, without a Docker engine: what the Dockerfile sets
//! (user, binary path, entrypoint, command, stop signal, OCI labels) is
//! read from it, and the binary is run the way a pod runs the image: from
//! the ENTRYPOINT path, as the USER's uid and gid with no capabilities, on a
//! read-only root filesystem with only a small /tmp writable (the chart's
//! `readOnlyRootFilesystem` and its /tmp emptyDir). A private mount
//! namespace (`unshare -m`, root needed) keeps the host untouched.

mod common;

use std::time::Duration;

use serde_json::json;

const DOCKERFILE: &str = include_str!("../Dockerfile");
const BIN: &str = env!("CARGO_BIN_EXE_wsfleet");

/// The value of the last `instruction` line of the runtime stage.
fn instruction(name: &str) -> String {
    let runtime = DOCKERFILE
        .rsplit_once("\nFROM ")
        .map(|(_, stage)| stage)
        .expect("a runtime stage");
    runtime
        .lines()
        .filter_map(|l| l.strip_prefix(&format!("{name} ")))
        .next_back()
        .unwrap_or_else(|| panic!("no {name} in the runtime stage"))
        .trim()
        .to_string()
}

fn json_array(text: &str) -> Vec<String> {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{text} is not a JSON array: {e}"))
}

#[test]
fn the_dockerfile_runs_one_binary_as_a_fixed_non_root_user() {
    let user = instruction("USER");
    let (uid, gid) = user.split_once(':').expect("USER uid:gid");
    assert!(uid.parse::<u32>().expect("numeric uid") > 0, "{user}");
    assert!(gid.parse::<u32>().expect("numeric gid") > 0, "{user}");
    let entrypoint = json_array(&instruction("ENTRYPOINT"));
    assert_eq!(entrypoint.len(), 1, "{entrypoint:?}");
    let copy = instruction("COPY");
    assert!(
        copy.ends_with(&format!(" {}", entrypoint[0])),
        "{copy} / {entrypoint:?}"
    );
    assert_eq!(json_array(&instruction("CMD")), ["serve"]);
    assert_eq!(instruction("STOPSIGNAL"), "SIGTERM");
    // OCI labels, the version being the crate's.
    for label in ["title", "description", "version"] {
        assert!(
            DOCKERFILE.contains(&format!("org.opencontainers.image.{label}=")),
            "no org.opencontainers.image.{label} label"
        );
    }
    assert!(DOCKERFILE.contains(&format!(
        "org.opencontainers.image.version=\"{}\"",
        env!("CARGO_PKG_VERSION")
    )));
}

#[tokio::test]
async fn the_binary_serves_as_the_image_user_on_a_read_only_root_filesystem() {
    let user = instruction("USER");
    let (uid, gid) = user.split_once(':').expect("USER uid:gid");
    let entrypoint = json_array(&instruction("ENTRYPOINT")).remove(0);
    let dir = std::path::Path::new(&entrypoint)
        .parent()
        .expect("a directory")
        .display()
        .to_string();
    let port = common::redis::free_port();
    let listen = format!("127.0.0.1:{port}");
    // In a private mount namespace: the binary appears at the ENTRYPOINT
    // path, then / turns read-only and /tmp becomes a small tmpfs.
    let script = format!(
        "set -e; mount --make-rprivate /; \
         mount -t tmpfs -o size=1m tmpfs {dir}; touch {entrypoint}; mount --bind {BIN} {entrypoint}; \
         mount -o remount,bind,ro /; mount -t tmpfs -o size=16m tmpfs /tmp; \
         if touch /wsfleet-write-check 2>/dev/null; then echo 'root filesystem is writable'; exit 3; fi; \
         cd /; exec setpriv --reuid={uid} --regid={gid} --clear-groups --inh-caps=-all --bounding-set=-all \
         {entrypoint} serve --listen {listen} --drain-s 1"
    );
    let mut child = tokio::process::Command::new("unshare")
        .args(["-m", "--", "sh", "-c", &script])
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("HOME", "/nonexistent")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("unshare (util-linux)");
    let health = format!("http://{listen}/healthz");
    let mut up = false;
    for _ in 0..100 {
        if let Ok(Some(status)) = child.try_wait() {
            let out = child.wait_with_output().await.expect("output");
            panic!(
                "the image-like run exited {status}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        if common::http().get(&health).send().await.is_ok() {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(up, "no /healthz on {listen}");
    let pid = child.id().expect("pid");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let ids = |field: &str| {
        status
            .lines()
            .find(|l| l.starts_with(field))
            .map(|l| l.split_whitespace().nth(1).unwrap_or("").to_string())
            .unwrap_or_default()
    };
    assert_eq!(ids("Uid:"), uid, "{status}");
    assert_eq!(ids("Gid:"), gid, "{status}");
    assert_eq!(ids("CapEff:"), "0000000000000000", "no capabilities");

    // It works: a session, a message from the API, delivered.
    let mut client = common::Client::connect(&format!("ws://{listen}/ws?session=img-1")).await;
    assert_eq!(client.recv_json().await["type"], "welcome");
    let (code, body) =
        common::post_to_session(&format!("http://{listen}"), "img-1", json!("hello")).await;
    assert_eq!(code, 202, "{body}");
    assert_eq!(client.recv_json().await["data"], "hello");

    // SIGTERM drains and exits 0.
    assert!(common::redis::signal(pid, "-TERM"), "SIGTERM");
    let exit = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("exit within the drain")
        .expect("exit status");
    assert!(exit.success(), "{exit}");
}
