//! The Helm chart, rendered by the real Helm engine (PyPI helm-python-sdk,
//! installed into target/test-venv by scripts/test.sh): the controller's
//! RBAC is exactly what its code calls, autoscaling has one writer, the
//! KEDA/HPA manifests read figures the controller exports, and the API
//! key Secret is generated when none is given. k8s/ must agree.

mod common;

use std::collections::BTreeSet;

use serde_json::{Value, json};
use wsfleet::controller::k8s::RBAC_RULES;
use wsfleet::controller::metrics::ControllerMetrics;

fn run(args: &[&str]) -> (bool, Value) {
    common::helm::render_script(args)
}

/// Every object the chart renders with `values`.
fn render(values: Value) -> Vec<Value> {
    common::helm::chart_objects(&values)
}

fn render_error(values: Value) -> String {
    let chart = concat!(env!("CARGO_MANIFEST_DIR"), "/helm/wsfleet");
    let (ok, out) = run(&["chart", chart, &values.to_string()]);
    assert!(!ok, "rendering {values} should fail");
    out["error"].as_str().unwrap_or_default().to_string()
}

fn find<'a>(objects: &'a [Value], kind: &str, suffix: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| {
            o["kind"] == kind
                && o["metadata"]["name"]
                    .as_str()
                    .unwrap_or("")
                    .ends_with(suffix)
        })
        .unwrap_or_else(|| panic!("no {kind} named *{suffix}"))
}

/// (group, resource, verb) triples a Role grants.
fn grants(role: &Value) -> BTreeSet<(String, String, String)> {
    let mut out = BTreeSet::new();
    for rule in role["rules"].as_array().expect("rules") {
        for group in rule["apiGroups"].as_array().expect("groups") {
            for resource in rule["resources"].as_array().expect("resources") {
                for verb in rule["verbs"].as_array().expect("verbs") {
                    out.insert((
                        group.as_str().expect("group").to_string(),
                        resource.as_str().expect("resource").to_string(),
                        verb.as_str().expect("verb").to_string(),
                    ));
                }
            }
        }
    }
    out
}

fn needed() -> BTreeSet<(String, String, String)> {
    RBAC_RULES
        .iter()
        .flat_map(|(g, r, verbs)| {
            verbs
                .iter()
                .map(move |v| (g.to_string(), r.to_string(), v.to_string()))
        })
        .collect()
}

fn controller_values() -> Value {
    json!({"controller": {"enabled": true}, "autoscaling": {"enabled": false}})
}

#[test]
fn the_controller_role_grants_exactly_the_calls_the_code_makes() {
    let objects = render(controller_values());
    let role = find(&objects, "Role", "-controller");
    assert_eq!(grants(role), needed());
    let binding = find(&objects, "RoleBinding", "-controller");
    let account = find(&objects, "ServiceAccount", "-controller");
    assert_eq!(binding["subjects"][0]["name"], account["metadata"]["name"]);
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
}

#[test]
fn the_plain_manifests_carry_the_same_role() {
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/k8s/controller.yaml");
    let (ok, out) = run(&["yaml", file]);
    assert!(ok, "{out}");
    let objects: Vec<Value> = out[file].as_array().expect("docs").clone();
    let role = find(&objects, "Role", "-controller");
    assert_eq!(grants(role), needed());
}

#[test]
fn one_writer_of_replicas() {
    let both =
        json!({"controller": {"enabled": true, "mode": "scale"}, "autoscaling": {"enabled": true}});
    // Refused by values.schema.json before any template runs.
    let error = render_error(both);
    assert!(
        error.contains("at '/autoscaling/enabled': value must be false"),
        "{error}"
    );
    let keda_and_hpa = json!({"controller": {"enabled": true, "scaler": "keda"}, "autoscaling": {"enabled": true}});
    assert!(render_error(keda_and_hpa).contains("one autoscaler"));
    let bad = json!({"controller": {"enabled": true, "mode": "sometimes"}, "autoscaling": {"enabled": false}});
    let error = render_error(bad);
    assert!(
        error.contains("at '/controller/mode': value must be one of 'metrics', 'scale'"),
        "{error}"
    );
    // Scale mode alone: no HPA, no ScaledObject, the controller is told.
    let objects = render(
        json!({"controller": {"enabled": true, "mode": "scale"}, "autoscaling": {"enabled": false}}),
    );
    assert!(
        !objects
            .iter()
            .any(|o| o["kind"] == "HorizontalPodAutoscaler" || o["kind"] == "ScaledObject")
    );
    let deployment = find(&objects, "Deployment", "-controller");
    let env = &deployment["spec"]["template"]["spec"]["containers"][0]["env"];
    let mode = env
        .as_array()
        .expect("env")
        .iter()
        .find(|e| e["name"] == "WSFLEET_SCALE_MODE")
        .expect("mode");
    assert_eq!(mode["value"], "scale");
}

#[test]
fn keda_and_the_hpa_read_what_the_controller_exports() {
    let objects = render(controller_values());
    let scaled = find(&objects, "ScaledObject", "wsfleet");
    let service = find(&objects, "Service", "-controller");
    let port = service["spec"]["ports"][0]["port"].as_u64().expect("port");
    let trigger = &scaled["spec"]["triggers"][0];
    assert_eq!(trigger["type"], "metrics-api");
    assert_eq!(trigger["metricType"], "AverageValue");
    let url = trigger["metadata"]["url"].as_str().expect("url");
    assert_eq!(
        url,
        format!("http://wsfleet-controller.fleet.svc:{port}/fleet")
    );
    // The value KEDA reads is a field of GET /fleet's `fleet` object.
    let location = trigger["metadata"]["valueLocation"]
        .as_str()
        .expect("location");
    let field = location.strip_prefix("fleet.").expect("under fleet");
    let view =
        serde_json::to_value(wsfleet::controller::reconcile::FleetView::default()).expect("view");
    assert!(
        view.get(field).is_some(),
        "GET /fleet has no {field}: {view}"
    );
    assert_eq!(scaled["spec"]["scaleTargetRef"]["name"], "wsfleet");

    let objects = render(
        json!({"controller": {"enabled": true, "scaler": "hpa"}, "autoscaling": {"enabled": false}}),
    );
    let hpa = find(&objects, "HorizontalPodAutoscaler", "-fleet");
    let metric = hpa["spec"]["metrics"][0]["external"]["metric"]["name"]
        .as_str()
        .expect("metric");
    assert!(
        ControllerMetrics::new()
            .render()
            .contains(&format!("# TYPE {metric} ")),
        "the controller exports no {metric}"
    );
}

#[test]
fn an_api_key_secret_is_generated_when_none_is_given() {
    let objects = render(json!({}));
    let secret = find(&objects, "Secret", "-secrets");
    let key = secret["data"]["api-key"]
        .as_str()
        .expect("generated api-key");
    assert!(key.len() >= 40, "base64 of a 40-char key: {key}");
    let again = render(json!({}));
    let other = find(&again, "Secret", "-secrets")["data"]["api-key"].clone();
    assert_ne!(other, json!(key), "a fresh install gets a fresh key");
    let given = render(json!({"apiKey": "k-123"}));
    assert_eq!(
        find(&given, "Secret", "-secrets")["data"]["api-key"],
        "ay0xMjM="
    );
    // And the gateway reads it from there.
    let deployment = find(&objects, "Deployment", "wsfleet");
    let env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .expect("env")
        .clone();
    let api_key = env
        .iter()
        .find(|e| e["name"] == "WSFLEET_API_KEY")
        .expect("WSFLEET_API_KEY");
    assert_eq!(
        api_key["valueFrom"]["secretKeyRef"]["name"],
        secret["metadata"]["name"]
    );
    assert_eq!(api_key["valueFrom"]["secretKeyRef"]["key"], "api-key");
}

/// The container env of the Deployment whose name ends with `suffix`, by name.
fn env_of(objects: &[Value], suffix: &str) -> std::collections::BTreeMap<String, Value> {
    find(objects, "Deployment", suffix)["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .expect("env")
        .iter()
        .map(|e| (e["name"].as_str().expect("name").to_string(), e.clone()))
        .collect()
}

#[test]
fn tracing_is_off_by_default_and_one_value_turns_it_on_for_both_deployments() {
    let off = render(controller_values());
    for suffix in ["wsfleet", "-controller"] {
        let env = env_of(&off, suffix);
        assert!(
            !env.keys().any(|k| k.starts_with("OTEL_")),
            "{suffix}: no OTEL_* by default: {:?}",
            env.keys()
        );
    }
    let mut values = controller_values();
    values["tracing"] = json!({
        "otlpEndpoint": "http://otel-collector.observability:4318",
        "samplerArg": 0.25,
        "resourceAttributes": "deployment.environment=prod",
    });
    let on = render(values);
    for (suffix, service) in [
        ("wsfleet", "wsfleet"),
        ("-controller", "wsfleet-controller"),
    ] {
        let env = env_of(&on, suffix);
        let value = |k: &str| {
            env.get(k)
                .map(|e| e["value"].clone())
                .unwrap_or(Value::Null)
        };
        assert_eq!(
            value("OTEL_EXPORTER_OTLP_ENDPOINT"),
            "http://otel-collector.observability:4318"
        );
        assert_eq!(value("OTEL_SERVICE_NAME"), service);
        assert_eq!(value("OTEL_TRACES_SAMPLER"), "parentbased_traceidratio");
        assert_eq!(value("OTEL_TRACES_SAMPLER_ARG"), "0.25");
        assert_eq!(
            value("OTEL_RESOURCE_ATTRIBUTES"),
            "k8s.pod.name=$(POD_NAME),k8s.namespace.name=$(POD_NAMESPACE),deployment.environment=prod"
        );
        // $(VAR) expands only for variables defined earlier in the list.
        let names: Vec<&String> =
            find(&on, "Deployment", suffix)["spec"]["template"]["spec"]["containers"][0]["env"]
                .as_array()
                .expect("env")
                .iter()
                .map(|e| e["name"].as_str().expect("name"))
                .map(|n| env.keys().find(|k| k.as_str() == n).expect("known"))
                .collect();
        let at = |n: &str| names.iter().position(|k| k.as_str() == n).expect(n);
        assert!(at("POD_NAME") < at("OTEL_RESOURCE_ATTRIBUTES"));
        assert!(at("POD_NAMESPACE") < at("OTEL_RESOURCE_ATTRIBUTES"));
    }
}

#[test]
fn a_prestop_pause_precedes_the_drain_and_the_grace_period_covers_both() {
    let gateway = |objects: &[Value]| {
        find(objects, "Deployment", "wsfleet")["spec"]["template"]["spec"].clone()
    };
    let spec = gateway(&render(json!({})));
    assert_eq!(spec["terminationGracePeriodSeconds"], 50);
    assert_eq!(
        spec["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"],
        5
    );
    let off = gateway(&render(json!({"preStopSeconds": 0})));
    assert!(off["containers"][0]["lifecycle"].is_null(), "{off}");
    let own = gateway(&render(json!({
        "lifecycle": {"preStop": {"exec": {"command": ["/bin/sleep", "3"]}}}
    })));
    assert_eq!(
        own["containers"][0]["lifecycle"]["preStop"]["exec"]["command"][1],
        "3"
    );
    assert!(own["containers"][0]["lifecycle"]["preStop"]["sleep"].is_null());
    // 5 + 30 + 12 = 47: 47 is too short, 48 is enough.
    let error = render_error(json!({"terminationGracePeriodSeconds": 47}));
    assert!(
        error.contains("must be greater than preStopSeconds (5) + drain.windowSeconds (30) + 12"),
        "{error}"
    );
    let spec = gateway(&render(json!({"terminationGracePeriodSeconds": 48})));
    assert_eq!(spec["terminationGracePeriodSeconds"], 48);
    // The plain manifests carry the same pause and grace period.
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/k8s/deployment.yaml");
    let (ok, out) = run(&["yaml", file]);
    assert!(ok, "{out}");
    let objects: Vec<Value> = out[file].as_array().expect("docs").clone();
    let plain = &find(&objects, "Deployment", "wsfleet")["spec"]["template"]["spec"];
    assert_eq!(plain["terminationGracePeriodSeconds"], 50);
    assert_eq!(
        plain["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"],
        5
    );
}

#[test]
fn ingress_httproute_and_networkpolicy_render_when_asked_and_not_by_default() {
    let defaults = render(json!({}));
    for kind in ["Ingress", "HTTPRoute", "NetworkPolicy"] {
        assert!(
            !defaults.iter().any(|o| o["kind"] == kind),
            "no {kind} by default"
        );
    }
    let objects = render(json!({
        "ingress": {"enabled": true, "className": "nginx", "hosts": ["ws.example.com"],
                    "tls": [{"hosts": ["ws.example.com"], "secretName": "ws-tls"}]},
        "httpRoute": {"enabled": true, "parentRefs": [{"name": "public"}], "hostnames": ["ws.example.com"]},
        "networkPolicy": {"enabled": true},
    }));
    let service = find(&objects, "Service", "wsfleet");
    let ingress = find(&objects, "Ingress", "wsfleet");
    assert_eq!(ingress["spec"]["ingressClassName"], "nginx");
    assert_eq!(ingress["spec"]["rules"][0]["host"], "ws.example.com");
    let backend = &ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"];
    assert_eq!(backend["name"], service["metadata"]["name"]);
    assert_eq!(
        ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-read-timeout"],
        "3600",
        "WebSockets outlive the default 60 s read timeout"
    );
    let route = find(&objects, "HTTPRoute", "wsfleet");
    assert_eq!(route["spec"]["parentRefs"][0]["name"], "public");
    assert_eq!(route["spec"]["rules"][0]["timeouts"]["request"], "0s");
    assert_eq!(
        route["spec"]["rules"][0]["backendRefs"][0]["name"],
        service["metadata"]["name"]
    );
    let policy = find(&objects, "NetworkPolicy", "wsfleet");
    let gateway = find(&objects, "Deployment", "wsfleet");
    assert_eq!(
        policy["spec"]["podSelector"]["matchLabels"],
        gateway["spec"]["selector"]["matchLabels"]
    );
    assert_eq!(policy["spec"]["ingress"][0]["ports"][0]["port"], "http");
    let egress = policy["spec"]["egress"].as_array().expect("egress");
    assert_eq!(egress.len(), 2, "DNS and Redis only: {egress:?}");
    let redis = find(&objects, "StatefulSet", "redis");
    assert_eq!(
        egress[1]["to"][0]["podSelector"]["matchLabels"], redis["spec"]["selector"]["matchLabels"],
        "egress goes to the in-chart Redis pods"
    );
    // An external Redis must be named.
    let error = render_error(json!({
        "networkPolicy": {"enabled": true},
        "redis": {"enabled": false, "url": "redis://r:6379"},
    }));
    assert!(error.contains("networkPolicy.redisTo"), "{error}");
    let external = render(json!({
        "networkPolicy": {"enabled": true, "redisTo": [{"ipBlock": {"cidr": "10.0.0.5/32"}}]},
        "redis": {"enabled": false, "url": "redis://r:6379"},
    }));
    let policy = find(&external, "NetworkPolicy", "wsfleet");
    assert_eq!(
        policy["spec"]["egress"][1]["to"][0]["ipBlock"]["cidr"],
        "10.0.0.5/32"
    );
}

#[test]
fn the_values_schema_refuses_wrong_values_with_the_path_that_is_wrong() {
    for (values, expected) in [
        (
            json!({"replicaCuont": 3}),
            "additional properties 'replicaCuont' not allowed",
        ),
        (
            json!({"logFormat": "xml"}),
            "at '/logFormat': value must be one of 'text', 'json'",
        ),
        (
            json!({"port": "8080"}),
            "at '/port': got string, want integer",
        ),
        (
            json!({"auth": {"mode": "basic"}}),
            "at '/auth/mode': value must be one of 'none', 'jwt'",
        ),
        (json!({"preStopSeconds": -1}), "at '/preStopSeconds'"),
        (
            json!({"tracing": {"otlpEndpoint": "collector:4318"}}),
            "at '/tracing/otlpEndpoint'",
        ),
        (
            json!({"service": {"type": "Ingress"}}),
            "at '/service/type'",
        ),
        // One writer of replicas: the controller in scale mode, or an HPA.
        (
            json!({"controller": {"enabled": true, "mode": "scale"}, "autoscaling": {"enabled": true}}),
            "at '/autoscaling/enabled': value must be false",
        ),
    ] {
        let error = render_error(values.clone());
        assert!(error.contains(expected), "{values}: {error}");
    }
    // Every value the chart ships with passes.
    render(json!({}));
}

/// Every `WSFLEET_*` variable `wsfleet serve` reads is set by the chart
/// (from a value, a Secret or the downward API), so every flag is
/// reachable from values.yaml, not only through extraEnv.
#[test]
fn every_serve_flag_is_reachable_from_the_chart() {
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_wsfleet"))
        .args(["serve", "--help"])
        .output()
        .expect("wsfleet serve --help");
    let help = String::from_utf8_lossy(&help.stdout);
    let wanted: BTreeSet<&str> = help
        .split("[env: ")
        .skip(1)
        .filter_map(|rest| rest.split(['=', ']']).next())
        .collect();
    assert!(wanted.len() > 30, "{wanted:?}");
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/helm/wsfleet/templates");
    let templates: String = std::fs::read_dir(dir)
        .expect("templates")
        .map(|e| std::fs::read_to_string(e.expect("entry").path()).expect("template"))
        .collect();
    let missing: Vec<&&str> = wanted
        .iter()
        .filter(|name| !templates.contains(**name))
        .collect();
    assert!(
        missing.is_empty(),
        "not settable from the chart: {missing:?}"
    );
    // The new values render as plain numbers (no float notation).
    let env = env_of(&render(json!({})), "wsfleet");
    assert_eq!(env["WSFLEET_MAX_RETAINED_BYTES"]["value"], "268435456");
    assert_eq!(env["WSFLEET_MAX_BATCH_BYTES"]["value"], "4194304");
    assert_eq!(env["WSFLEET_RECONNECT_JITTER_MS"]["value"], "2000");
}

/// helm/wsfleet/README.md lists every value with its default and comment,
/// generated from values.yaml: it must be what the generator writes now.
#[test]
fn the_chart_readme_lists_every_value_as_values_yaml_has_it() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/chart-readme.py");
    let out = std::process::Command::new(common::helm::python())
        .args([script, "--check"])
        .output()
        .expect("run chart-readme.py");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let readme = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/helm/wsfleet/README.md"
    ))
    .expect("chart README");
    for value in [
        "`tracing.otlpEndpoint`",
        "`networkPolicy.enabled`",
        "`limits.maxBatchBytes`",
        "`preStopSeconds`",
    ] {
        assert!(
            readme.contains(value),
            "{value} missing from the chart README"
        );
    }
}
