//! Every object the chart renders, for its defaults and for each value set
//! it offers, and every object of the plain manifests in k8s/, validated
//! strictly (unknown fields are errors) against the Kubernetes 1.33 OpenAPI
//! schemas with PyPI `kubernetes-validate` (installed into target/test-venv
//! by scripts/test.sh; run by scripts/k8s-validate.py).
//!
//! The chart also passes `helm lint --strict` for each value set.
//!
//! Custom resources (ServiceMonitor, PrometheusRule, KEDA's ScaledObject,
//! Gateway API's HTTPRoute) have no schema in that package; they are
//! listed, must be one of those kinds, and are checked by the render tests
//! in tests/helm_chart.rs instead.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::{Value, json};

const KUBERNETES: &str = "1.33";

/// Kinds without a published schema in kubernetes-validate.
const CUSTOM: &[&str] = &[
    "monitoring.coreos.com/v1/ServiceMonitor",
    "monitoring.coreos.com/v1/PodMonitor",
    "monitoring.coreos.com/v1/PrometheusRule",
    "keda.sh/v1alpha1/ScaledObject",
    "gateway.networking.k8s.io/v1/HTTPRoute",
];

fn validate(objects: &[Value]) -> Value {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/k8s-validate.py");
    let mut child = Command::new(common::helm::python())
        .arg(script)
        .arg(KUBERNETES)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run k8s-validate.py");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(Value::from(objects.to_vec()).to_string().as_bytes())
        .expect("write objects");
    let out = child.wait_with_output().expect("k8s-validate.py output");
    assert!(
        out.status.success(),
        "k8s-validate.py failed (is kubernetes-validate installed? run ./scripts/test.sh): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON report")
}

fn rendered(values: Value) -> Vec<Value> {
    common::helm::chart_objects(&values)
}

fn assert_valid(what: &str, objects: &[Value]) {
    assert!(!objects.is_empty(), "{what}: nothing to validate");
    let report = validate(objects);
    assert_eq!(
        report["invalid"],
        json!([]),
        "{what}: objects that break the Kubernetes {KUBERNETES} schemas"
    );
    for kind in report["no_schema"].as_array().expect("no_schema") {
        let kind = kind.as_str().expect("kind");
        assert!(
            CUSTOM.contains(&kind),
            "{what}: {kind} has no schema and is not a known custom resource"
        );
    }
    let checked = report["valid"].as_u64().expect("valid");
    let custom = report["no_schema"].as_array().map_or(0, Vec::len) as u64;
    assert_eq!(checked + custom, objects.len() as u64, "{what}: {report}");
}

/// The value sets the chart offers, each with a name.
fn value_sets() -> Vec<(&'static str, Value)> {
    vec![
        ("defaults", json!({})),
        (
            "HPA on CPU and connections",
            json!({"autoscaling": {"enabled": true, "connections": {"enabled": true}}}),
        ),
        (
            "controller, KEDA",
            json!({"controller": {"enabled": true, "scaler": "keda"}, "autoscaling": {"enabled": false}}),
        ),
        (
            "controller, HPA on its metric",
            json!({"controller": {"enabled": true, "scaler": "hpa"}, "autoscaling": {"enabled": false}}),
        ),
        (
            "controller scales itself",
            json!({"controller": {"enabled": true, "mode": "scale"}, "autoscaling": {"enabled": false}}),
        ),
        (
            "external Redis",
            json!({"redis": {"enabled": false, "url": "redis://redis.data:6379"}}),
        ),
        (
            "Ingress, HTTPRoute, NetworkPolicy",
            json!({
                "ingress": {"enabled": true, "className": "nginx", "hosts": ["ws.example.com"],
                            "tls": [{"hosts": ["ws.example.com"], "secretName": "ws-tls"}]},
                "httpRoute": {"enabled": true, "parentRefs": [{"name": "public"}]},
                "networkPolicy": {"enabled": true},
            }),
        ),
        (
            "ServiceMonitor, PrometheusRule, dashboards",
            json!({
                "metrics": {"serviceMonitor": {"enabled": true}, "podAnnotations": false},
                "prometheusRule": {"enabled": true},
                "grafanaDashboard": {"enabled": true},
            }),
        ),
        (
            "traces",
            json!({"tracing": {"otlpEndpoint": "http://otel-collector:4318"}, "controller": {"enabled": true, "scaler": "none"}}),
        ),
    ]
}

#[test]
fn every_chart_value_set_renders_objects_the_kubernetes_schemas_accept() {
    for (what, values) in value_sets() {
        assert_valid(what, &rendered(values));
    }
}

/// `helm lint --strict` (warnings are errors) for every value set: no
/// warning, no error (an info such as "icon is recommended" is allowed).
#[test]
fn the_chart_lints_clean_in_strict_mode_for_every_value_set() {
    let chart = concat!(env!("CARGO_MANIFEST_DIR"), "/helm/wsfleet");
    for (what, values) in value_sets() {
        let (ok, report) = common::helm::render_script(&["lint", chart, &values.to_string()]);
        assert!(ok, "{what}: lint failed to run: {report}");
        assert_eq!(report["errors"], json!([]), "{what}: {report}");
        let serious: Vec<&Value> = report["messages"]
            .as_array()
            .expect("messages")
            .iter()
            .filter(|m| m["severity"].as_u64().unwrap_or(3) >= 2)
            .collect();
        assert!(serious.is_empty(), "{what}: {serious:?}");
    }
    // And lint does fail a broken value set.
    let (_, report) = common::helm::render_script(&["lint", chart, r#"{"logFormat": "xml"}"#]);
    assert_ne!(report["errors"], json!([]), "{report}");
}

#[test]
fn the_plain_manifests_are_valid_kubernetes_objects() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/k8s");
    let mut files: Vec<String> = Vec::new();
    for sub in ["", "/autoscaling"] {
        for entry in std::fs::read_dir(format!("{dir}{sub}")).expect("k8s/") {
            let path = entry.expect("entry").path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            // kustomization.yaml is kustomize's, not an API object; the
            // prometheus-adapter rules are that chart's values.
            if name.ends_with(".yaml")
                && name != "kustomization.yaml"
                && name != "prometheus-adapter-rules.yaml"
            {
                files.push(path.display().to_string());
            }
        }
    }
    let mut args = vec!["yaml"];
    args.extend(files.iter().map(String::as_str));
    let (ok, out) = common::helm::render_script(&args);
    assert!(ok, "{out}");
    let objects: Vec<Value> = files
        .iter()
        .flat_map(|f| out[f].as_array().cloned().unwrap_or_default())
        .collect();
    assert!(objects.len() >= 10, "{} objects in k8s/", objects.len());
    assert_valid("k8s/", &objects);
}

/// The validator itself refuses what it should: a field that does not
/// exist and a value of the wrong type.
#[test]
fn the_schema_check_catches_a_wrong_field_and_a_wrong_type() {
    let mut deployment = rendered(json!({}))
        .into_iter()
        .find(|o| o["kind"] == "Deployment")
        .expect("a Deployment");
    deployment["spec"]["replicaz"] = json!(3);
    let report = validate(&[deployment.clone()]);
    assert_eq!(
        report["invalid"].as_array().map_or(0, Vec::len),
        1,
        "{report}"
    );
    deployment["spec"]
        .as_object_mut()
        .expect("spec")
        .remove("replicaz");
    deployment["spec"]["replicas"] = json!("three");
    let report = validate(&[deployment]);
    assert_eq!(
        report["invalid"].as_array().map_or(0, Vec::len),
        1,
        "{report}"
    );
}
