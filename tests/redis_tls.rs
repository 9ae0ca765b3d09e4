//! Cluster mode over TLS with ACL credentials in the URL
//! (`rediss://user:pass@host:port`), trusting a private CA (`--redis-ca-file`).

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::Server;
use common::redis::{TempDir, free_port};
use serde_json::json;

fn openssl(args: &[&str]) {
    let status = std::process::Command::new("openssl")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("openssl must be installed to make the test certificates");
    assert!(status.success(), "openssl {args:?} failed");
}

/// A TLS-only redis-server that requires user `app` with password `apppass`.
struct TlsRedis {
    child: tokio::process::Child,
    port: u16,
    dir: TempDir,
}

impl TlsRedis {
    async fn start() -> TlsRedis {
        let dir = TempDir::new("redis-tls");
        let file = |name: &str| dir.path().join(name).display().to_string();
        let (ca_key, ca, key, csr, cert, ext) = (
            file("ca.key"),
            file("ca.pem"),
            file("key.pem"),
            file("server.csr"),
            file("cert.pem"),
            file("ext.cnf"),
        );
        std::fs::write(&ext, "subjectAltName=DNS:localhost,IP:127.0.0.1\n").expect("write ext.cnf");
        // A private CA, and a server certificate it signs (rustls refuses a
        // self-signed certificate used as both).
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=wsfleet test CA",
            "-keyout",
            &ca_key,
            "-out",
            &ca,
        ]);
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            &key,
            "-out",
            &csr,
        ]);
        openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            &ext,
            "-out",
            &cert,
        ]);
        let port = free_port();
        let child = tokio::process::Command::new("redis-server")
            .args([
                "--port",
                "0",
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(["--tls-port", &port.to_string(), "--tls-auth-clients", "no"])
            .arg("--tls-cert-file")
            .arg(&cert)
            .arg("--tls-key-file")
            .arg(&key)
            .arg("--tls-ca-cert-file")
            .arg(&ca)
            .args([
                "--user", "default", "off", "--user", "app", "on", ">apppass", "~*", "&*", "+@all",
            ])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server must be installed (scripts/test.sh installs it)");
        let redis = TlsRedis { child, port, dir };
        common::eventually("the TLS Redis answers", || async {
            let out = tokio::process::Command::new("redis-cli")
                .args(["--tls", "--cacert"])
                .arg(redis.dir.path().join("ca.pem"))
                .args([
                    "-p",
                    &redis.port.to_string(),
                    "--user",
                    "app",
                    "--pass",
                    "apppass",
                    "--no-auth-warning",
                    "ping",
                ])
                .output()
                .await;
            out.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("PONG"))
        })
        .await;
        redis
    }

    fn ca(&self) -> String {
        self.dir.path().join("ca.pem").display().to_string()
    }
}

#[tokio::test]
async fn rediss_url_with_credentials_and_a_private_ca() {
    let mut redis = TlsRedis::start().await;
    let url = format!("rediss://app:apppass@127.0.0.1:{}", redis.port);
    let ca = redis.ca();
    let server = Server::start(&["--redis-url", &url, "--redis-ca-file", &ca]).await;
    common::eventually("readyz is 200 over TLS", || async {
        common::get_json(&server.http("/readyz")).await.0 == 200
    })
    .await;
    let (mut client, _) = server.session("tls").await;
    let (status, body) = server.post_session("tls", json!("over tls")).await;
    assert_eq!(status, 202, "{body}");
    let msg = client.recv_json().await;
    assert_eq!(msg["data"], "over tls");
    assert_eq!(msg["offset"], body["offset"]);

    // A wrong password is refused by Redis: the pod stays up but not ready,
    // and backends get 503 rather than a false 202.
    let wrong = format!("rediss://app:nope@127.0.0.1:{}", redis.port);
    let bad = Server::start(&[
        "--redis-url",
        &wrong,
        "--redis-ca-file",
        &ca,
        "--redis-timeout-ms",
        "500",
    ])
    .await;
    let (status, _) = common::get_json(&bad.http("/readyz")).await;
    assert_eq!(status, 503);
    let (status, body) = bad.post_session("tls", json!(1)).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "unavailable");
    tokio::time::timeout(Duration::from_secs(5), redis.child.kill())
        .await
        .ok();
}
