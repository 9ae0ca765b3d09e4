//! The Grafana dashboards (helm/wsfleet/dashboards/*.json, the one source),
//! proven on a real Prometheus (the `prometheus` server binary of the Debian
//! package `prometheus`, installed by scripts/test.sh): a running fleet in
//! embedded mode (one gateway) and in cluster mode (two `wsfleet serve`
//! pods on a real Redis) with the controller's real `/metrics`, under a
//! little traffic, scraped every second; then every target of every panel,
//! with the template variables filled in as Grafana would, must parse and
//! return data. Also: the JSON's structure, and that k8s/ carries what the
//! chart ships.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

use common::redis::{Pod, RedisServer, TempDir, free_port, log_tail};
use wsfleet::config::ScaleMode;
use wsfleet::controller::decide::RebalancePolicy;
use wsfleet::controller::http::{HttpState, router};
use wsfleet::controller::reconcile::{FleetView, Settings};

const DASHBOARDS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/helm/wsfleet/dashboards");
const METRICS_DOC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/metrics.md");

/// Namespaces and pods the scrape config puts on the targets.
const EMBEDDED_NS: &str = "ws-embedded";
const EMBEDDED_POD: &str = "embedded-0";
const CLUSTER_NS: &str = "ws-cluster";
const CLUSTER_PODS: [&str; 2] = ["gw-0", "gw-1"];
const CONTROLLER_POD: &str = "wsfleet-controller-0";

/// Every dashboard file: (file name, JSON).
fn dashboards() -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(DASHBOARDS).expect("dashboards dir") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "json") {
            let text = std::fs::read_to_string(&path).expect("read dashboard");
            let json: Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{}: not JSON: {e}", path.display()));
            let name: String = path.file_name().expect("name").to_string_lossy().into();
            out.push((name, json));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(out.len() >= 2, "fleet overview and pod detail: {out:?}");
    out
}

/// Every panel, rows' nested panels included.
fn panels(dashboard: &Value) -> Vec<&Value> {
    fn walk<'a>(list: &'a Value, out: &mut Vec<&'a Value>) {
        for p in list.as_array().into_iter().flatten() {
            out.push(p);
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// One query of one panel.
struct Target {
    dashboard: String,
    panel: String,
    ref_id: String,
    expr: String,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: panel \"{}\" target {}",
            self.dashboard, self.panel, self.ref_id
        )
    }
}

fn targets() -> Vec<Target> {
    let mut out = Vec::new();
    for (file, d) in dashboards() {
        for p in panels(&d) {
            for t in p["targets"].as_array().into_iter().flatten() {
                out.push(Target {
                    dashboard: file.clone(),
                    panel: p["title"].as_str().unwrap_or("?").to_string(),
                    ref_id: t["refId"].as_str().unwrap_or("?").to_string(),
                    expr: t["expr"].as_str().unwrap_or_default().to_string(),
                });
            }
        }
    }
    out
}

/// Metric names a PromQL expression selects (an identifier right before `{`).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let bytes = expr.as_bytes();
    let mut names = BTreeSet::new();
    for (i, &b) in bytes.iter().enumerate() {
        if b != b'{' {
            continue;
        }
        let start = bytes[..i]
            .iter()
            .rposition(|c| !(c.is_ascii_alphanumeric() || *c == b'_' || *c == b':'))
            .map_or(0, |p| p + 1);
        if start < i {
            names.insert(expr[start..i].to_string());
        }
    }
    names
}

/// The metric names docs/metrics.md documents, by its `## ` section.
fn documented() -> BTreeMap<String, String> {
    let doc = std::fs::read_to_string(METRICS_DOC).expect("docs/metrics.md");
    let mut section = String::new();
    let mut out = BTreeMap::new();
    for line in doc.lines() {
        if let Some(h) = line.strip_prefix("## ") {
            section = h.trim().to_string();
        } else if let Some(rest) = line.strip_prefix("| `")
            && let Some(end) = rest.find('`')
        {
            out.insert(rest[..end].to_string(), section.clone());
        }
    }
    out
}

/// A histogram's series (`_bucket`, `_count`, `_sum`) document as the histogram.
fn family(name: &str) -> &str {
    ["_bucket", "_count", "_sum"]
        .iter()
        .find_map(|s| name.strip_suffix(s))
        .unwrap_or(name)
}

#[test]
fn every_dashboard_has_unique_ids_the_datasource_variable_and_namespace_and_pod() {
    let mut uids = BTreeSet::new();
    for (file, d) in dashboards() {
        assert!(
            uids.insert(d["uid"].as_str().expect("uid").to_string()),
            "{file}: uid"
        );
        assert!(d["title"].is_string(), "{file}: title");
        let vars = d["templating"]["list"].as_array().expect("templating.list");
        let var = |name: &str| {
            vars.iter()
                .find(|v| v["name"] == name)
                .unwrap_or_else(|| panic!("{file}: no variable {name}"))
        };
        let ds = var("datasource");
        assert_eq!(ds["type"], "datasource", "{file}");
        assert_eq!(ds["query"], "prometheus", "{file}");
        for (name, query) in [
            ("namespace", "label_values(wsfleet_connections, namespace)"),
            (
                "pod",
                r#"label_values(wsfleet_connections{namespace=~"$namespace"}, pod)"#,
            ),
        ] {
            let v = var(name);
            assert_eq!(v["type"], "query", "{file} {name}");
            assert_eq!(v["datasource"]["uid"], "${datasource}", "{file} {name}");
            assert_eq!(v["query"]["query"], query, "{file} {name}");
            assert_eq!(v["definition"], query, "{file} {name}");
        }
        let mut ids = BTreeSet::new();
        for p in panels(&d) {
            let title = p["title"].as_str().unwrap_or("?");
            let id = p["id"]
                .as_u64()
                .unwrap_or_else(|| panic!("{file}: {title}: id"));
            assert!(ids.insert(id), "{file}: panel id {id} ({title}) used twice");
            assert!(p["gridPos"]["w"].is_u64(), "{file}: {title}: gridPos");
            if p["type"] == "row" {
                continue;
            }
            assert_eq!(
                p["datasource"]["uid"], "${datasource}",
                "{file}: panel \"{title}\" must use the datasource variable"
            );
            let targets = p["targets"].as_array().expect("targets");
            assert!(
                !targets.is_empty(),
                "{file}: panel \"{title}\" has no query"
            );
            let mut refs = BTreeSet::new();
            for t in targets {
                assert_eq!(
                    t["datasource"]["uid"], "${datasource}",
                    "{file}: panel \"{title}\": target datasource"
                );
                assert!(
                    refs.insert(t["refId"].to_string()),
                    "{file}: {title}: refId"
                );
                assert!(t["expr"].is_string(), "{file}: {title}: expr");
            }
        }
    }
}

/// A cheap first line before the Prometheus test: every metric a panel
/// selects is one docs/metrics.md documents (so a typo names itself).
#[test]
fn every_metric_a_panel_reads_is_documented() {
    let documented = documented();
    for t in targets() {
        let names = metric_names(&t.expr);
        assert!(!names.is_empty(), "{t}: selects no metric: {}", t.expr);
        for name in names {
            assert!(
                documented.contains_key(family(&name)),
                "{t}: {name} is not in docs/metrics.md (does it exist?)"
            );
        }
    }
}

use common::helm::render as helm_render;

const K8S_DASHBOARDS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/k8s/grafana-dashboards.yaml");

/// k8s/grafana-dashboards.yaml is what scripts/k8s-grafana-dashboards.sh
/// writes, which is the chart's rendering (release and namespace
/// `wsfleet`) minus Helm's own labels, and kustomization.yaml applies it.
#[test]
fn the_plain_manifests_carry_the_charts_dashboards() {
    let dir = TempDir::new("dashboards");
    let generated = dir.path().join("grafana-dashboards.yaml");
    let out = std::process::Command::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts/k8s-grafana-dashboards.sh"
    ))
    .arg(&generated)
    .output()
    .expect("run scripts/k8s-grafana-dashboards.sh");
    assert!(out.status.success(), "{out:?}");
    assert!(
        std::fs::read(&generated).expect("generated")
            == std::fs::read(K8S_DASHBOARDS).expect("k8s/grafana-dashboards.yaml"),
        "k8s/grafana-dashboards.yaml differs from what the script generates: run scripts/k8s-grafana-dashboards.sh"
    );

    let chart = concat!(env!("CARGO_MANIFEST_DIR"), "/helm/wsfleet");
    let rendered = helm_render(&[
        "chart",
        chart,
        r#"{"grafanaDashboard": {"enabled": true}}"#,
        "wsfleet",
        "wsfleet",
    ]);
    let mut from_chart: Vec<Value> = rendered["wsfleet/templates/dashboard-configmap.yaml"]
        .as_array()
        .expect("dashboard ConfigMaps")
        .clone();
    for cm in &mut from_chart {
        let labels = cm["metadata"]["labels"].as_object_mut().expect("labels");
        labels.remove("helm.sh/chart");
        labels.remove("app.kubernetes.io/managed-by");
    }
    let plain = helm_render(&["yaml", K8S_DASHBOARDS])[K8S_DASHBOARDS]
        .as_array()
        .expect("docs")
        .clone();
    assert!(
        plain == from_chart,
        "k8s/grafana-dashboards.yaml differs from the chart's rendering"
    );
    // Each ConfigMap carries one dashboard file, unchanged.
    let files = dashboards();
    assert_eq!(from_chart.len(), files.len());
    for (file, json) in files {
        let cm = from_chart
            .iter()
            .find(|cm| cm["data"].get(&file).is_some())
            .unwrap_or_else(|| panic!("no ConfigMap carries {file}"));
        let shipped: Value =
            serde_json::from_str(cm["data"][&file].as_str().expect("data")).expect("JSON");
        assert_eq!(shipped, json, "{file}");
        assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
    }

    let kustomization = concat!(env!("CARGO_MANIFEST_DIR"), "/k8s/kustomization.yaml");
    let k = &helm_render(&["yaml", kustomization])[kustomization][0];
    assert!(
        k["resources"]
            .as_array()
            .expect("resources")
            .contains(&json!("grafana-dashboards.yaml")),
        "k8s/kustomization.yaml does not apply grafana-dashboards.yaml"
    );
}

#[test]
fn the_chart_ships_no_dashboards_unless_asked_and_takes_the_sidecars_label() {
    let chart = concat!(env!("CARGO_MANIFEST_DIR"), "/helm/wsfleet");
    let off = helm_render(&["chart", chart, "{}"]);
    common::helm::assert_renders_nothing(&off, "wsfleet/templates/dashboard-configmap.yaml");
    let on = helm_render(&[
        "chart",
        chart,
        r#"{"grafanaDashboard": {"enabled": true, "namespace": "monitoring", "labels": {"grafana_dashboard": null, "my_dashboards": "yes"}, "annotations": {"grafana_folder": "wsfleet"}}}"#,
    ]);
    let cms = on["wsfleet/templates/dashboard-configmap.yaml"]
        .as_array()
        .expect("ConfigMaps");
    assert_eq!(cms.len(), dashboards().len());
    for cm in cms {
        assert_eq!(cm["kind"], "ConfigMap");
        assert_eq!(cm["metadata"]["namespace"], "monitoring");
        assert_eq!(cm["metadata"]["labels"]["my_dashboards"], "yes");
        assert!(cm["metadata"]["labels"].get("grafana_dashboard").is_none());
        assert_eq!(cm["metadata"]["annotations"]["grafana_folder"], "wsfleet");
    }
}

// ---------------------------------------------------------------------------
// A real Prometheus scraping a running fleet.
// ---------------------------------------------------------------------------

/// A `prometheus` server on a free loopback port with its own temp dir,
/// killed on drop.
struct Prometheus {
    base: String,
    log: PathBuf,
    _child: Child,
    _dir: TempDir,
}

/// One scrape target with the labels a ServiceMonitor would add.
struct ScrapeTarget {
    addr: String,
    namespace: &'static str,
    pod: &'static str,
}

impl Prometheus {
    async fn start(targets: &[ScrapeTarget]) -> Prometheus {
        let dir = TempDir::new("prometheus");
        let mut config = String::from(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: wsfleet\n    static_configs:\n",
        );
        for t in targets {
            config.push_str(&format!(
                "      - targets: [\"{}\"]\n        labels: {{namespace: \"{}\", pod: \"{}\"}}\n",
                t.addr, t.namespace, t.pod
            ));
        }
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).expect("write prometheus.yml");
        let port = free_port();
        let log = dir.path().join("prometheus.log");
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::from(file.try_clone().expect("log")))
            .stderr(Stdio::from(file))
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start prometheus ({e}): ./scripts/test.sh installs it (Debian package `prometheus`)"
                )
            });
        let prometheus = Prometheus {
            base: format!("http://127.0.0.1:{port}"),
            log,
            _child: child,
            _dir: dir,
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = common::http()
                .get(format!("{}/-/ready", prometheus.base))
                .send()
                .await
                && r.status().is_success()
            {
                return prometheus;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "prometheus not ready within 20 s; log:\n{}",
                log_tail(&prometheus.log, 30)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn url(&self, path: &str, params: &[(&str, &str)]) -> reqwest::Url {
        reqwest::Url::parse_with_params(&format!("{}{path}", self.base), params).expect("query URL")
    }

    /// An instant query: Ok(result vector) or Err(why).
    async fn query(&self, expr: &str) -> Result<Vec<Value>, String> {
        let r = common::http()
            .get(self.url("/api/v1/query", &[("query", expr)]))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let body: Value = r.json().await.map_err(|e| e.to_string())?;
        if body["status"] != "success" {
            return Err(format!("{} {}", body["errorType"], body["error"]));
        }
        Ok(body["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    async fn label_values(&self, label: &str, selector: &str) -> Vec<String> {
        let r = common::http()
            .get(self.url(
                &format!("/api/v1/label/{label}/values"),
                &[("match[]", selector)],
            ))
            .send()
            .await
            .expect("label values");
        let body: Value = r.json().await.expect("JSON");
        assert_eq!(body["status"], "success", "{body}");
        body["data"]
            .as_array()
            .expect("data")
            .iter()
            .filter_map(|v| v.as_str().map(String::from))
            .collect()
    }
}

/// The expression with the template variables filled in the way Grafana
/// would for `namespace` and a `pod` regex (a multi-value selection is
/// `a|b`). Any other `$` left is a variable the dashboard does not define.
fn substitute(expr: &str, namespace: &str, pod: &str) -> String {
    let mut e = expr.to_string();
    for (var, value) in [
        ("$__rate_interval", "1m"),
        ("${__rate_interval}", "1m"),
        ("$__interval", "1m"),
        ("${__interval}", "1m"),
        ("$__range", "1m"),
        ("${namespace}", namespace),
        ("$namespace", namespace),
        ("${pod}", pod),
        ("$pod", pod),
    ] {
        e = e.replace(var, value);
    }
    e
}

/// Whether one query's result has a series with a value Grafana draws
/// (not NaN: a quantile of nothing).
fn has_data(result: &[Value]) -> bool {
    result.iter().any(|s| {
        s["value"][1]
            .as_str()
            .and_then(|v| v.parse::<f64>().ok())
            .is_some_and(f64::is_finite)
    })
}

/// One target evaluated for one namespace/pod selection: None when good.
async fn check(
    prometheus: &Prometheus,
    target: &Target,
    namespace: &str,
    pod: &str,
    may_be_empty: bool,
) -> Option<String> {
    let expr = substitute(&target.expr, namespace, pod);
    let at = format!("{target} (namespace={namespace}, pod={pod})");
    if expr.contains('$') {
        return Some(format!("{at}: unknown variable left in `{expr}`"));
    }
    match prometheus.query(&expr).await {
        Err(why) => Some(format!("{at}: query fails: {why}: `{expr}`")),
        Ok(result) if !may_be_empty && !has_data(&result) => Some(format!(
            "{at}: no data ({} series, none with a value): `{expr}`",
            result.len()
        )),
        Ok(_) => None,
    }
}

/// A WebSocket client on a session that reads and drops whatever it gets.
async fn reader(url: String, channel: &str) {
    let mut client = common::Client::connect(&url).await;
    let welcome = client.recv_json().await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    let ack = client
        .request(json!({"type": "subscribe", "channel": channel}), 1)
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    tokio::spawn(async move { while client.ws.next().await.is_some() {} });
}

/// One resume on `base`: two messages to a fresh session, a connection with
/// `last` at the first (the second is replayed), a ping, then a close 1000.
async fn resume(base: &str, ws: &str, session: &str) {
    let (status, first) = common::post_to_session(base, session, json!("one")).await;
    assert_eq!(status, 202, "{first}");
    let (status, _) = common::post_to_session(base, session, json!("two")).await;
    assert_eq!(status, 202);
    let last = first["offset"].as_str().expect("offset");
    let mut client =
        common::Client::connect(&format!("{ws}/ws?session={session}&last={last}")).await;
    let welcome = client.recv_json().await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    client.assert_alive().await;
    client.close().await;
}

/// Live traffic until `stop`: messages to sessions on the other pod and to
/// channels with subscribers on every pod, and a resume on every pod each
/// round, so rates, routing, replays, closes and quantiles all have samples
/// inside the query window.
async fn traffic(embedded: String, cluster: Vec<String>, stop: CancellationToken) {
    let mut round = 0u64;
    while !stop.is_cancelled() {
        let (s, b) = common::post_to_session(&embedded, "e-live", json!(round)).await;
        assert_eq!(s, 202, "{b}");
        let (s, b) = common::post_to_channel(&embedded, "e-news", json!(round)).await;
        assert_eq!(s, 202, "{b}");
        resume(
            &embedded,
            &embedded.replace("http", "ws"),
            &format!("e-r{round}"),
        )
        .await;
        for (i, base) in cluster.iter().enumerate() {
            let other = (i + 1) % cluster.len();
            let (s, b) =
                common::post_to_session(base, &format!("c-live-{other}"), json!(round)).await;
            assert_eq!(s, 202, "{b}");
            let (s, b) = common::post_to_channel(base, "c-news", json!(round)).await;
            assert_eq!(s, 202, "{b}");
            resume(
                base,
                &base.replace("http", "ws"),
                &format!("c-r{i}-{round}"),
            )
            .await;
        }
        round += 1;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_panel_returns_data_from_a_real_prometheus_scraping_a_running_fleet() {
    // Embedded mode: one gateway in this process.
    let embedded = common::Server::start(&[]).await;
    // Cluster mode: two pods on a real Redis; a 3 s lease makes them report
    // to the controller every second.
    let redis = RedisServer::start().await;
    let url = redis.url();
    let flags = ["--session-lease-s", "3", "--heartbeat-s", "600"];
    let mut pods = Vec::new();
    for name in CLUSTER_PODS {
        pods.push(Pod::start(name, &url, &flags).await);
    }
    // The controller's reconciler over the fake Kubernetes API and the
    // fleet's Redis, ticking, with its real /metrics endpoint.
    let settings = Settings {
        mode: ScaleMode::Metrics,
        scale: common::kube_api::immediate_scaling(100),
        rebalance: Some(RebalancePolicy {
            tolerance: 0.1,
            per_pod_per_s: 2,
            fleet_fraction_per_min: 0.05,
            interval_ms: 1_000,
        }),
        drain_timeout_ms: 20_000,
        order_latency_ms: 2_500,
    };
    let names = CLUSTER_PODS.iter().map(|s| s.to_string()).collect();
    let (mut reconciler, _api, metrics) =
        common::kube_api::reconciler(&url, names, settings, 2).await;
    let stop = CancellationToken::new();
    let ticking = stop.clone();
    tokio::spawn(async move {
        while !ticking.is_cancelled() {
            let _ = reconciler.tick().await;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let controller_addr = listener.local_addr().expect("addr").to_string();
    let state = HttpState {
        metrics,
        view: Arc::new(RwLock::new(FleetView::default())),
        fresh_for_ms: 45_000,
    };
    tokio::spawn(async move { axum::serve(listener, router(state)).await });

    // Connections that stay: a session and a channel subscription per pod.
    reader(embedded.ws_url("session=e-live"), "e-news").await;
    for (i, pod) in pods.iter().enumerate() {
        reader(pod.ws_url(&format!("session=c-live-{i}")), "c-news").await;
    }
    let cluster: Vec<String> = pods.iter().map(|p| p.http("")).collect();
    tokio::spawn(traffic(embedded.http(""), cluster, stop.clone()));

    let mut scrape = vec![
        ScrapeTarget {
            addr: embedded.addr.to_string(),
            namespace: EMBEDDED_NS,
            pod: EMBEDDED_POD,
        },
        ScrapeTarget {
            addr: controller_addr,
            namespace: CLUSTER_NS,
            pod: CONTROLLER_POD,
        },
    ];
    for (pod, name) in pods.iter().zip(CLUSTER_PODS) {
        scrape.push(ScrapeTarget {
            addr: pod.addr.clone(),
            namespace: CLUSTER_NS,
            pod: name,
        });
    }
    let prometheus = Prometheus::start(&scrape).await;

    // A couple of scrapes of every target.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let up = prometheus
            .query("count_over_time(up[1m]) >= 3 and up == 1")
            .await
            .unwrap_or_default();
        if up.len() == scrape.len() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "targets not scraped: {up:?}\n{}",
            log_tail(&prometheus.log, 20)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // The template variables resolve to the fleet's namespaces and pods.
    let namespaces = prometheus
        .label_values("namespace", "wsfleet_connections")
        .await;
    assert_eq!(namespaces, [CLUSTER_NS, EMBEDDED_NS], "namespace variable");
    let cluster_pods = prometheus
        .label_values(
            "pod",
            &format!(r#"wsfleet_connections{{namespace=~"{CLUSTER_NS}"}}"#),
        )
        .await;
    assert_eq!(cluster_pods, CLUSTER_PODS, "pod variable");

    // Embedded mode has no Redis bus and no controller: the targets that
    // read only those metrics must parse there but may be empty.
    let documented = documented();
    let cluster_only = |t: &Target| {
        metric_names(&t.expr).iter().all(|m| {
            documented.get(family(m)).is_some_and(|section| {
                section == "Gateway: bus, Redis mode" || section == "Controller"
            })
        })
    };
    let all_cluster_pods = CLUSTER_PODS.join("|");
    let targets = targets();
    let mut cases: Vec<(&Target, &str, String, bool)> = Vec::new();
    for t in &targets {
        let per_pod = t.dashboard == "pod-detail.json";
        cases.push((t, EMBEDDED_NS, EMBEDDED_POD.to_string(), cluster_only(t)));
        if per_pod {
            for pod in CLUSTER_PODS {
                cases.push((t, CLUSTER_NS, pod.to_string(), false));
            }
        } else {
            cases.push((t, CLUSTER_NS, all_cluster_pods.clone(), false));
        }
    }
    // Counters need two scrapes after their first event before a rate has
    // a value: poll until every case has data, then name what never did.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let failures = loop {
        let mut failures = Vec::new();
        for (t, namespace, pod, may_be_empty) in &cases {
            if let Some(f) = check(&prometheus, t, namespace, pod, *may_be_empty).await {
                failures.push(f);
            }
        }
        if failures.is_empty() || tokio::time::Instant::now() >= deadline {
            break failures;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    stop.cancel();
    assert!(
        failures.is_empty(),
        "{} of {} panel queries failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    assert!(cases.len() > 100, "{} cases", cases.len());
    drop(redis);
}

/// The failure reporting itself: a target that reads a metric nobody
/// exports, or a variable no dashboard defines, is named, not passed.
#[test]
fn substitution_leaves_unknown_variables_and_names_metrics() {
    let e = substitute(
        r#"sum(rate(wsfleet_x_total{namespace=~"$namespace", pod=~"$pod"}[$__rate_interval])) / $other"#,
        "ns",
        "a|b",
    );
    assert_eq!(
        e,
        r#"sum(rate(wsfleet_x_total{namespace=~"ns", pod=~"a|b"}[1m])) / $other"#
    );
    assert_eq!(
        metric_names(r#"histogram_quantile(0.9, sum by (le) (rate(a_bucket{x="1"}[1m]))) / b{}"#),
        BTreeSet::from(["a_bucket".to_string(), "b".to_string()])
    );
    assert!(!has_data(&[json!({"metric": {}, "value": [1, "NaN"]})]));
    assert!(has_data(&[json!({"metric": {}, "value": [1, "0"]})]));
}
