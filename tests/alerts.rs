//! The alerting rules, with the real tools: promtool (Debian package
//! `prometheus`, installed by scripts/test.sh) checks
//! helm/wsfleet/files/wsfleet-rules.yaml and runs its unit tests, every alert
//! has a test that sees it fire (an alert that can never fire fails the
//! suite), a runbook section, and k8s/'s copy is what the chart renders.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

const RULES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/helm/wsfleet/files/wsfleet-rules.yaml"
);
const RULE_TESTS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/helm/wsfleet/files/wsfleet-rules.test.yaml"
);

fn promtool(args: &[&str]) -> Output {
    Command::new("promtool")
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run promtool ({e}): ./scripts/test.sh installs it (Debian package `prometheus`)"
            )
        })
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

use common::helm::render as helm_render;

fn yaml_docs(file: &str) -> Vec<Value> {
    helm_render(&["yaml", file])[file]
        .as_array()
        .expect("docs")
        .clone()
}

/// Every alerting rule of the rules file.
fn alerts() -> Vec<Value> {
    let rules = &yaml_docs(RULES)[0];
    rules["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
        .filter(|r| r.get("alert").is_some())
        .collect()
}

#[test]
fn promtool_accepts_the_rules() {
    let out = promtool(&["check", "rules", RULES]);
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn promtool_unit_tests_of_the_rules_pass() {
    let out = promtool(&["test", "rules", RULE_TESTS]);
    assert!(out.status.success(), "{}", text(&out));
}

/// For each alert in turn, the rules file with that alert made unable to
/// fire: the unit tests must fail, so every alert has a test that sees it
/// fire (and the suite is not green by vacuity).
#[test]
fn every_alert_has_a_unit_test_that_sees_it_fire() {
    let dir = std::env::temp_dir().join(format!("wsfleet-alerts-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    std::fs::copy(RULE_TESTS, dir.join("wsfleet-rules.test.yaml")).expect("copy tests");
    let names: Vec<String> = alerts()
        .iter()
        .map(|a| a["alert"].as_str().expect("name").to_string())
        .collect();
    assert!(names.len() >= 10, "{names:?}");
    for name in &names {
        silence(name, &dir.join("wsfleet-rules.yaml"));
        let out = promtool(&["test", "rules", &path(&dir.join("wsfleet-rules.test.yaml"))]);
        assert!(
            !out.status.success(),
            "the unit tests still pass with {name} unable to fire: add a test that sees it fire"
        );
        assert!(text(&out).contains(name), "{}", text(&out));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Writes the rules with `alert`'s expression replaced by one that never
/// returns a sample.
fn silence(alert: &str, to: &Path) {
    let script = r#"
import sys, yaml
rules = yaml.safe_load(open(sys.argv[1]))
for g in rules["groups"]:
    for r in g["rules"]:
        if r.get("alert") == sys.argv[2]:
            r["expr"] = "vector(0) > 1"
yaml.safe_dump(rules, open(sys.argv[3], "w"))
"#;
    let out = Command::new(common::helm::python())
        .args(["-c", script, RULES, alert, &path(to)])
        .output()
        .expect("python");
    assert!(out.status.success(), "{}", text(&out));
}

fn path(p: &Path) -> String {
    p.to_str().expect("utf-8 path").to_string()
}

#[test]
fn every_alert_has_a_severity_a_summary_and_a_runbook_section() {
    let runbook = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/runbook.md"))
        .expect("docs/runbook.md");
    let headings: BTreeSet<String> = runbook
        .lines()
        .filter_map(|l| l.strip_prefix("## "))
        .map(|h| h.trim().to_lowercase())
        .collect();
    for alert in alerts() {
        let name = alert["alert"].as_str().expect("name");
        assert!(alert["labels"]["severity"].is_string(), "{name}: severity");
        assert!(
            alert["annotations"]["summary"].is_string(),
            "{name}: summary"
        );
        let runbook = alert["annotations"]["runbook"].as_str().unwrap_or_default();
        let anchor = name.to_lowercase();
        assert_eq!(runbook, format!("docs/runbook.md#{anchor}"), "{name}");
        assert!(
            headings.contains(&anchor),
            "docs/runbook.md has no `## {name}` heading"
        );
    }
}

/// k8s/prometheusrule.yaml is the chart's PrometheusRule (release and
/// namespace `wsfleet`) minus Helm's own labels; scripts/k8s-prometheusrule.sh
/// writes it.
#[test]
fn the_plain_manifest_carries_the_charts_rules() {
    let chart = concat!(env!("CARGO_MANIFEST_DIR"), "/helm/wsfleet");
    let rendered = helm_render(&[
        "chart",
        chart,
        r#"{"prometheusRule": {"enabled": true}}"#,
        "wsfleet",
        "wsfleet",
    ]);
    let mut from_chart = rendered["wsfleet/templates/prometheusrule.yaml"][0].clone();
    let labels = from_chart["metadata"]["labels"]
        .as_object_mut()
        .expect("labels");
    labels.remove("helm.sh/chart");
    labels.remove("app.kubernetes.io/managed-by");
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/k8s/prometheusrule.yaml");
    let plain = &yaml_docs(file)[0];
    assert!(
        *plain == from_chart,
        "k8s/prometheusrule.yaml differs from the chart's rendering: run scripts/k8s-prometheusrule.sh"
    );
}

#[test]
fn the_chart_renders_no_rules_unless_asked_and_takes_extra_labels() {
    let chart = concat!(env!("CARGO_MANIFEST_DIR"), "/helm/wsfleet");
    let off = helm_render(&["chart", chart, "{}"]);
    common::helm::assert_renders_nothing(&off, "wsfleet/templates/prometheusrule.yaml");
    let on = helm_render(&[
        "chart",
        chart,
        r#"{"prometheusRule": {"enabled": true, "labels": {"release": "kps"}}}"#,
    ]);
    let rule = &on["wsfleet/templates/prometheusrule.yaml"][0];
    assert_eq!(rule["kind"], "PrometheusRule");
    assert_eq!(rule["metadata"]["labels"]["release"], "kps");
    assert_eq!(rule["spec"], yaml_docs(RULES)[0]);
}

/// The controller alerts need the controller scraped: with the
/// ServiceMonitor and the controller on, it gets a ServiceMonitor of its own
/// that selects its Service's labels and port.
#[test]
fn the_controller_is_scraped_when_the_service_monitor_is_on() {
    let chart = concat!(env!("CARGO_MANIFEST_DIR"), "/helm/wsfleet");
    let on = helm_render(&[
        "chart",
        chart,
        r#"{"metrics": {"serviceMonitor": {"enabled": true}}, "controller": {"enabled": true}, "autoscaling": {"enabled": false}}"#,
    ]);
    let objects: Vec<Value> = on
        .as_object()
        .expect("map")
        .values()
        .flat_map(|docs| docs.as_array().cloned().unwrap_or_default())
        .collect();
    let named = |kind: &str, suffix: &str| {
        objects
            .iter()
            .find(|o| {
                o["kind"] == kind
                    && o["metadata"]["name"]
                        .as_str()
                        .is_some_and(|n| n.ends_with(suffix))
            })
            .unwrap_or_else(|| panic!("no {kind} *{suffix}"))
            .clone()
    };
    let monitor = named("ServiceMonitor", "-controller");
    let service = named("Service", "-controller");
    for (key, value) in monitor["spec"]["selector"]["matchLabels"]
        .as_object()
        .expect("matchLabels")
    {
        assert_eq!(&service["metadata"]["labels"][key], value, "{key}");
    }
    assert_eq!(
        monitor["spec"]["endpoints"][0]["port"],
        service["spec"]["ports"][0]["name"]
    );
}
