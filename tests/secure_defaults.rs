//! Secure by default: the backend API is closed to the network without an
//! API key (tested from a real second host: a network namespace behind a
//! veth pair), and no secret shows in `--help` or in any log line.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::Server;
use common::redis::{RedisServer, free_port};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_wsfleet");

/// Runs a command to completion without blocking the runtime (the gateway
/// under test runs on it); `Err` carries what it printed.
async fn run(program: &str, args: &[&str]) -> Result<String, String> {
    let out = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`{program} {}` failed ({}): {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// A second host for this test: a network namespace joined to this one by
/// a veth pair on a /24 of its own. Dropping it removes both (also when the
/// test fails half-way).
struct TestHost {
    netns: String,
    host_link: String,
    /// The address on our side, where the gateway listens.
    host_ip: String,
}

impl TestHost {
    async fn create() -> Result<TestHost, String> {
        let id = format!("{:05x}", rand::random::<u32>() & 0xfffff);
        let addrs = run("ip", &["-o", "addr"]).await?;
        let subnet = (0..64)
            .map(|_| 20 + rand::random::<u8>() % 200)
            .map(|n| format!("10.213.{n}"))
            .find(|prefix| !addrs.contains(&format!("{prefix}.")))
            .ok_or("no free 10.213.x.0/24 for the test host")?;
        let host = TestHost {
            netns: format!("wsf-{id}"),
            host_link: format!("wsfh{id}"),
            host_ip: format!("{subnet}.1"),
        };
        let ns_link = format!("wsfn{id}");
        let ns_ip = format!("{subnet}.2/24");
        let host_cidr = format!("{}/24", host.host_ip);
        let ns = host.netns.as_str();
        run("ip", &["netns", "add", ns]).await?;
        // From here on `host` is dropped on every error path: cleanup runs.
        run(
            "ip",
            &[
                "link",
                "add",
                &host.host_link,
                "type",
                "veth",
                "peer",
                "name",
                &ns_link,
            ],
        )
        .await?;
        run("ip", &["link", "set", &ns_link, "netns", ns]).await?;
        run("ip", &["addr", "add", &host_cidr, "dev", &host.host_link]).await?;
        run("ip", &["link", "set", &host.host_link, "up"]).await?;
        run("ip", &["-n", ns, "addr", "add", &ns_ip, "dev", &ns_link]).await?;
        run("ip", &["-n", ns, "link", "set", &ns_link, "up"]).await?;
        run("ip", &["-n", ns, "link", "set", "lo", "up"]).await?;
        Ok(host)
    }

    /// One HTTP request made from inside the namespace (python3's urllib,
    /// proxies off); returns (status, JSON body).
    async fn request(&self, method: &str, url: &str, headers: &[(&str, &str)]) -> (u16, Value) {
        const CLIENT: &str = r#"
import json, sys, urllib.request, urllib.error
method, url, headers = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
body = b'{"data":"from another host"}' if method == "POST" else None
req = urllib.request.Request(url, data=body, method=method, headers=headers)
req.add_header("content-type", "application/json")
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
try:
    r = opener.open(req, timeout=10)
    status, text = r.status, r.read().decode()
except urllib.error.HTTPError as e:
    status, text = e.code, e.read().decode()
print(status)
print(text)
"#;
        let headers: serde_json::Map<String, Value> = headers
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect();
        let headers = Value::Object(headers).to_string();
        let out = run(
            "ip",
            &[
                "netns",
                "exec",
                &self.netns,
                "python3",
                "-c",
                CLIENT,
                method,
                url,
                &headers,
            ],
        )
        .await
        .unwrap_or_else(|e| panic!("request from the test host failed: {e}"));
        let (status, body) = out.split_once('\n').unwrap_or((&out, ""));
        let status = status.trim().parse().unwrap_or_else(|_| panic!("{out}"));
        (
            status,
            serde_json::from_str(body.trim()).unwrap_or(Value::Null),
        )
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        // Deleting the namespace destroys its end of the pair, and with it
        // ours; deleting our end too covers a namespace that is already gone.
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.host_link])
            .stderr(Stdio::null())
            .status();
    }
}

#[tokio::test]
async fn backend_api_refuses_other_hosts_without_a_key_and_admits_them_with_it() {
    let host = TestHost::create().await.unwrap_or_else(|e| {
        panic!(
            "this test needs a second host: a network namespace with a veth pair, \
             which needs root and iproute2 (`ip`; scripts/test.sh installs it): {e}"
        )
    });
    let listen = format!("{}:0", host.host_ip);

    // No key: closed to the network, open on loopback.
    let closed = Server::start_on(&listen, &[]).await;
    let url = |server: &Server, path: &str| format!("http://{}{}", server.addr, path);
    let send = url(&closed, "/v1/sessions/s1/messages");
    let (status, body) = host.request("POST", &send, &[]).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"]["code"], "unauthorized", "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("--api-key") && message.contains("--insecure-api"),
        "{message}"
    );
    // A header claiming to be loopback changes nothing: the socket decides.
    let spoofed = [("X-Forwarded-For", "127.0.0.1"), ("X-Real-IP", "127.0.0.1")];
    assert_eq!(host.request("POST", &send, &spoofed).await.0, 401);
    assert_eq!(
        host.request("GET", &url(&closed, "/v1/fleet"), &[]).await.0,
        401
    );
    // Health, readiness and metrics stay open to the network (probes).
    for open in ["/healthz", "/readyz", "/metrics"] {
        let (status, _) = host.request("GET", &url(&closed, open), &[]).await;
        assert_eq!(status, 200, "{open} from another host");
    }
    // /ws is not behind the gate: a plain GET gets the upgrade's own 400.
    let (status, body) = host.request("GET", &url(&closed, "/ws"), &[]).await;
    assert_eq!(status, 400, "{body}");
    // Asked from this host but over the veth address: local, yet not
    // loopback, so refused too.
    let (status, body) = common::post_to_session(&url(&closed, ""), "s1", json!("local")).await;
    assert_eq!(status, 401, "{body}");
    let refused = common::metric(
        &closed.metrics().await,
        "wsfleet_http_requests_total{route=\"auth_not_loopback\",status=\"401\"}",
    );
    assert!(refused >= 3.0, "refusals are counted: {refused}");
    closed.stop().await;

    // With a key: other hosts get in with it, and only with it.
    let keyed = Server::start_on(&listen, &["--api-key", "ns-test-key"]).await;
    let send = url(&keyed, "/v1/sessions/s1/messages");
    let bearer = [("Authorization", "Bearer ns-test-key")];
    let (status, body) = host.request("POST", &send, &bearer).await;
    assert_eq!(status, 202, "{body}");
    assert!(body["offset"].is_string(), "{body}");
    assert_eq!(host.request("POST", &send, &[]).await.0, 401);
    let wrong = [("Authorization", "Bearer ns-test-ke")];
    assert_eq!(host.request("POST", &send, &wrong).await.0, 401);
    keyed.stop().await;

    // Opened on purpose.
    let open = Server::start_on(&listen, &["--insecure-api"]).await;
    let send = url(&open, "/v1/sessions/s1/messages");
    assert_eq!(host.request("POST", &send, &[]).await.0, 202);
    open.stop().await;
}

#[tokio::test]
async fn loopback_peers_may_use_the_api_without_a_key() {
    let server = Server::start(&[]).await;
    let (status, body) = server.post_session("s1", json!("hello")).await;
    assert_eq!(status, 202, "{body}");
    // IPv6 loopback too, where this machine has it.
    if let Ok(listener) = std::net::TcpListener::bind("[::1]:0") {
        drop(listener);
        let v6 = Server::start_on("[::1]:0", &[]).await;
        let (status, body) = v6.post_session("s1", json!("hello")).await;
        assert_eq!(status, 202, "{body}");
        v6.stop().await;
    }
    server.stop().await;
}

/// Marks every secret below; none may show in `--help` or a log line.
const MARKER: &str = "Xyzzy0Secret";

fn secret(what: &str) -> String {
    format!("{what}{MARKER}")
}

#[test]
fn help_never_prints_secrets_from_the_environment() {
    for args in [
        ["serve", "--help"],
        ["serve", "-h"],
        ["controller", "--help"],
    ] {
        let out = std::process::Command::new(BIN)
            .args(args)
            .env(
                "WSFLEET_REDIS_URL",
                format!("redis://user:{}@redis.example:6379", secret("redis")),
            )
            .env("WSFLEET_API_KEY", secret("api"))
            .env("WSFLEET_JWT_HS256_SECRET", secret("jwt"))
            .env(
                "WSFLEET_WEBHOOK_URL",
                format!(
                    "https://hook:{}@hooks.example/in?token={}",
                    secret("hook"),
                    secret("tok")
                ),
            )
            .output()
            .expect("run wsfleet");
        assert!(out.status.success());
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("WSFLEET_REDIS_URL"), "{text}");
        assert!(!text.contains(MARKER), "{args:?} shows a secret:\n{text}");
    }
}

/// Every log line of a pod whose config is full of secrets, run through a
/// connect, messages, webhook failures and a drain, with debug logging.
#[tokio::test]
async fn no_log_line_carries_a_password_key_or_token() {
    let redis_password = secret("redis");
    // The harness checks readiness with a password-less PING, so the
    // password is set once the server is up.
    let redis = RedisServer::start().await;
    redis
        .cli(&["CONFIG", "SET", "requirepass", &redis_password])
        .await;
    let redis_url = format!("redis://:{redis_password}@127.0.0.1:{}", redis.port());
    // Nothing listens there: every event fails, and is logged as failing.
    let hook = format!(
        "http://hook:{}@127.0.0.1:{}/in?token={}",
        secret("hook"),
        free_port(),
        secret("tok")
    );
    let jwt_secret = secret("jwt");
    let api_key = secret("api");
    let addr = format!("127.0.0.1:{}", free_port());
    let dir = common::redis::TempDir::new("secrets");
    let log_path = dir.path().join("wsfleet.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = tokio::process::Command::new(BIN)
        .args([
            "serve",
            "--listen",
            &addr,
            "--pod-name",
            "secrets",
            "--auth",
            "jwt",
        ])
        .args(["--drain-s", "1"])
        .env("WSFLEET_REDIS_URL", &redis_url)
        .env("WSFLEET_API_KEY", &api_key)
        .env("WSFLEET_JWT_HS256_SECRET", &jwt_secret)
        .env("WSFLEET_WEBHOOK_URL", &hook)
        .env("RUST_LOG", "debug")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::from(log.try_clone().unwrap()))
        .stderr(Stdio::from(log))
        .kill_on_drop(true)
        .spawn()
        .expect("spawn wsfleet");
    let base = format!("http://{addr}");
    common::eventually("the pod is ready", || async {
        let ready = common::http().get(format!("{base}/readyz")).send().await;
        ready.is_ok_and(|r| r.status().as_u16() == 200)
    })
    .await;

    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let token = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &json!({"sid": "sec", "exp": exp, "channels": ["c"], "note": MARKER}),
        &EncodingKey::from_secret(jwt_secret.as_bytes()),
    )
    .unwrap();
    let mut client = common::Client::connect(&format!("ws://{addr}/ws?token={token}")).await;
    assert_eq!(client.recv_json().await["type"], "welcome");
    let bearer = format!("Bearer {api_key}");
    let auth = [("authorization", bearer.as_str())];
    let (status, body) = common::post_json(
        &format!("{base}/v1/sessions/sec/messages"),
        json!({"data": "hi"}),
        &auth,
    )
    .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(client.recv_json().await["data"], "hi");
    // Refusals: a wrong key, a wrong token.
    let wrong = format!("Bearer {}", secret("wrong"));
    let (status, _) = common::post_json(
        &format!("{base}/v1/sessions/sec/messages"),
        json!({"data": "hi"}),
        &[("authorization", wrong.as_str())],
    )
    .await;
    assert_eq!(status, 401);
    let bad_token = format!("{token}{MARKER}");
    assert!(
        common::Client::try_connect(&format!("ws://{addr}/ws?token={bad_token}"))
            .await
            .is_err()
    );
    client
        .send_json(json!({"type": "upstream", "data": "order"}))
        .await;
    // Let the webhook fail and retry at least once before the drain.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(common::redis::signal(child.id().unwrap(), "-TERM"));
    let (_, _) = client.recv_until_end().await;
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("the pod exits")
        .unwrap();
    assert!(status.success(), "{status}");

    let text = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        text.contains("webhook unreachable"),
        "the webhook failures must be logged for this test to mean anything:\n{text}"
    );
    let leaks: Vec<&str> = text
        .lines()
        .filter(|l| l.contains(MARKER) || l.contains(&token))
        .collect();
    assert!(
        leaks.is_empty(),
        "secrets in the log:\n{}",
        leaks.join("\n")
    );
}
