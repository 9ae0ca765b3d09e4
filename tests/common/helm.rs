//! The real Helm engine for tests: scripts/helm-render.py run by the
//! virtualenv's python (helm-python-sdk and pyyaml, created by
//! scripts/test.sh). Missing tools fail the test, naming the fix.

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

/// The virtualenv's python (`WSFLEET_TEST_PYTHON`, else target/test-venv).
pub fn python() -> PathBuf {
    let path = std::env::var_os("WSFLEET_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-venv/bin/python")
        });
    assert!(
        path.exists(),
        "{} missing: ./scripts/test.sh creates it (python venv with helm-python-sdk and pyyaml)",
        path.display()
    );
    path
}

/// scripts/helm-render.py with `args` (`chart <dir> <values> [release]
/// [ns]` or `yaml <file>...`): whether it succeeded, and its JSON.
pub fn render_script(args: &[&str]) -> (bool, Value) {
    let out = Command::new(python())
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/scripts/helm-render.py"
        ))
        .args(args)
        .output()
        .expect("run helm-render.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let value: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "helm-render.py printed no JSON ({e}): {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.success(), value)
}

/// scripts/helm-render.py's JSON; a failed render fails the test.
pub fn render(args: &[&str]) -> Value {
    let (ok, out) = render_script(args);
    assert!(ok, "helm-render.py failed: {out}");
    out
}

/// Every object the chart (helm/wsfleet) renders with `values`, in one list.
pub fn chart_objects(values: &Value) -> Vec<Value> {
    let chart = concat!(env!("CARGO_MANIFEST_DIR"), "/helm/wsfleet");
    render(&["chart", chart, &values.to_string()])
        .as_object()
        .expect("map")
        .values()
        .flat_map(|docs| docs.as_array().cloned().unwrap_or_default())
        .collect()
}

/// Asserts that `template` of a chart rendering produced no document.
pub fn assert_renders_nothing(rendered: &Value, template: &str) {
    assert!(
        rendered
            .get(template)
            .and_then(Value::as_array)
            .is_none_or(|docs| docs.is_empty()),
        "{template} rendered documents: {rendered}"
    );
}
