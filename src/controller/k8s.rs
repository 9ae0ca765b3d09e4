//! Every call the controller makes to the Kubernetes API, in one place so
//! the RBAC in the chart can be checked against it (`RBAC_RULES`).
//!
//! Writes are few and deliberate: the Deployment's `scale` subresource
//! (mode `scale` only), the `pod-deletion-cost` annotation on scale-down
//! victims (set around a scale-down, removed afterwards), Events on the
//! Deployment, and the leader Lease (`lease.rs`).

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ObjectReference, Pod};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Resource};
use serde_json::json;

use super::Error;

/// The annotation the ReplicaSet controller reads to pick which pods to
/// remove first (lowest cost first).
pub const DELETION_COST: &str = "controller.kubernetes.io/pod-deletion-cost";

/// Field manager of every patch, so `kubectl get -o yaml --show-managed-fields`
/// names us.
const MANAGER: &str = "wsfleet-controller";

/// (API group, resource, verbs) the controller uses: the chart's Role must
/// grant exactly these (`tests/controller_rbac.rs` renders it and compares).
pub const RBAC_RULES: &[(&str, &str, &[&str])] = &[
    ("", "pods", &["get", "list", "watch", "patch"]),
    ("apps", "deployments", &["get"]),
    ("apps", "deployments/scale", &["get", "patch"]),
    (
        "coordination.k8s.io",
        "leases",
        &["get", "create", "update"],
    ),
    ("events.k8s.io", "events", &["create", "patch"]),
];

/// The gateway Deployment and its pods, in one namespace.
#[derive(Clone)]
pub struct Cluster {
    pods: Api<Pod>,
    deployments: Api<Deployment>,
    deployment: String,
    namespace: String,
    recorder: Recorder,
}

impl Cluster {
    pub fn new(client: Client, namespace: &str, deployment: &str, identity: &str) -> Self {
        let reporter = Reporter {
            controller: MANAGER.into(),
            instance: Some(identity.into()),
        };
        Self {
            pods: Api::namespaced(client.clone(), namespace),
            deployments: Api::namespaced(client.clone(), namespace),
            deployment: deployment.into(),
            namespace: namespace.into(),
            recorder: Recorder::new(client, reporter),
        }
    }

    pub fn pods(&self) -> Api<Pod> {
        self.pods.clone()
    }

    /// The Deployment's replica count, from its `scale` subresource.
    pub async fn replicas(&self) -> Result<u32, Error> {
        let scale = self
            .deployments
            .get_scale(&self.deployment)
            .await
            .map_err(Error::kube("get scale"))?;
        Ok(scale.spec.and_then(|s| s.replicas).unwrap_or(0).max(0) as u32)
    }

    /// Sets replicas through the `scale` subresource (a merge patch touches
    /// nothing else of the Deployment).
    pub async fn set_replicas(&self, replicas: u32) -> Result<(), Error> {
        let patch = json!({"spec": {"replicas": replicas}});
        self.deployments
            .patch_scale(&self.deployment, &patch_params(), &Patch::Merge(&patch))
            .await
            .map_err(Error::kube("patch scale"))?;
        Ok(())
    }

    /// Writes (`Some`) or removes (`None`) a pod's deletion cost.
    pub async fn set_deletion_cost(&self, pod: &str, cost: Option<i32>) -> Result<(), Error> {
        let value = cost.map(|c| c.to_string());
        let patch = json!({"metadata": {"annotations": {DELETION_COST: value}}});
        self.pods
            .patch(pod, &patch_params(), &Patch::Merge(&patch))
            .await
            .map_err(Error::kube("patch pod"))?;
        Ok(())
    }

    /// An Event on the Deployment, for `kubectl describe deployment`.
    /// Best effort: a refused Event is logged, never fatal.
    pub async fn event(&self, warning: bool, reason: &str, action: &str, note: String) {
        let reference = ObjectReference {
            api_version: Some(Deployment::api_version(&()).into_owned()),
            kind: Some(Deployment::kind(&()).into_owned()),
            name: Some(self.deployment.clone()),
            namespace: Some(self.namespace.clone()),
            ..Default::default()
        };
        let event = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.into(),
            note: Some(note),
            action: action.into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &reference).await {
            tracing::warn!(error = %e, reason, "publishing an Event failed");
        }
    }
}

/// A pod as the controller needs it from the API server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodView {
    pub name: String,
    /// Running and not being deleted.
    pub alive: bool,
    /// Its current deletion cost annotation, if any.
    pub deletion_cost: Option<String>,
}

impl PodView {
    pub fn from_pod(pod: &Pod) -> Option<Self> {
        let name = pod.metadata.name.clone()?;
        let running = pod
            .status
            .as_ref()
            .and_then(|s| s.phase.as_deref())
            .is_some_and(|p| p == "Running");
        let deleting = pod.metadata.deletion_timestamp.is_some();
        let deletion_cost = pod
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(DELETION_COST))
            .cloned();
        Some(Self {
            name,
            alive: running && !deleting,
            deletion_cost,
        })
    }
}

fn patch_params() -> PatchParams {
    PatchParams {
        field_manager: Some(MANAGER.into()),
        ..Default::default()
    }
}
