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

#[cfg(test)]
mod tests {
    use super::super::mock_api::{self, expect};
    use super::*;

    #[tokio::test]
    async fn replicas_are_read_and_written_through_the_scale_subresource() {
        let (client, mut api) = mock_api::client();
        let cluster = Cluster::new(client, "fleet", "wsfleet", "ctl-0");
        let reader = tokio::spawn({
            let c = cluster.clone();
            async move { c.replicas().await }
        });
        let seen = expect(&mut api, 200, mock_api::scale(4)).await;
        assert_eq!(seen.method, "GET");
        assert_eq!(
            seen.uri,
            "/apis/apps/v1/namespaces/fleet/deployments/wsfleet/scale"
        );
        assert_eq!(reader.await.expect("task").expect("replicas"), 4);

        let writer = tokio::spawn({
            let c = cluster.clone();
            async move { c.set_replicas(6).await }
        });
        let seen = expect(&mut api, 200, mock_api::scale(6)).await;
        assert_eq!(seen.method, "PATCH");
        assert!(
            seen.uri
                .starts_with("/apis/apps/v1/namespaces/fleet/deployments/wsfleet/scale?"),
            "{}",
            seen.uri
        );
        assert!(
            seen.uri.contains("fieldManager=wsfleet-controller"),
            "{}",
            seen.uri
        );
        assert_eq!(
            seen.content_type.as_deref(),
            Some("application/merge-patch+json")
        );
        assert_eq!(seen.body, json!({"spec": {"replicas": 6}}));
        writer.await.expect("task").expect("patched");
    }

    #[tokio::test]
    async fn deletion_costs_are_set_and_removed_on_the_pod_alone() {
        let (client, mut api) = mock_api::client();
        let cluster = Cluster::new(client, "fleet", "wsfleet", "ctl-0");
        let c = cluster.clone();
        let set = tokio::spawn(async move { c.set_deletion_cost("wsfleet-a", Some(-1000)).await });
        let seen = expect(&mut api, 200, mock_api::pod("wsfleet-a")).await;
        assert_eq!(seen.method, "PATCH");
        assert!(
            seen.uri
                .starts_with("/api/v1/namespaces/fleet/pods/wsfleet-a?")
        );
        assert_eq!(
            seen.body,
            json!({"metadata": {"annotations": {DELETION_COST: "-1000"}}})
        );
        set.await.expect("task").expect("set");

        let c = cluster.clone();
        let clear = tokio::spawn(async move { c.set_deletion_cost("wsfleet-a", None).await });
        let seen = expect(&mut api, 200, mock_api::pod("wsfleet-a")).await;
        // null removes the key in a merge patch
        assert_eq!(
            seen.body,
            json!({"metadata": {"annotations": {DELETION_COST: null}}})
        );
        clear.await.expect("task").expect("cleared");
    }

    #[tokio::test]
    async fn api_errors_come_back_typed_with_the_call_named() {
        let (client, mut api) = mock_api::client();
        let cluster = Cluster::new(client, "fleet", "wsfleet", "ctl-0");
        let c = cluster.clone();
        let write = tokio::spawn(async move { c.set_replicas(3).await });
        expect(&mut api, 500, mock_api::status(500, "InternalError")).await;
        let err = write.await.expect("task").expect_err("a 500 fails");
        assert_eq!(err.stage(), "kube");
        assert!(err.to_string().contains("patch scale"), "{err}");
        let c = cluster.clone();
        let write = tokio::spawn(async move { c.set_deletion_cost("p", Some(1)).await });
        expect(&mut api, 403, mock_api::status(403, "Forbidden")).await;
        assert!(write.await.expect("task").is_err());
    }

    #[tokio::test]
    async fn events_name_the_deployment_and_the_decision() {
        let (client, mut api) = mock_api::client();
        let cluster = Cluster::new(client, "fleet", "wsfleet", "ctl-0");
        let c = cluster.clone();
        let publish = tokio::spawn(async move {
            c.event(false, "ScaledUp", "Scale", "replicas 2 -> 3".into())
                .await
        });
        let seen = expect(&mut api, 201, mock_api::event()).await;
        assert_eq!(seen.method, "POST");
        assert_eq!(seen.uri, "/apis/events.k8s.io/v1/namespaces/fleet/events?");
        assert_eq!(seen.body["reason"], "ScaledUp");
        assert_eq!(seen.body["action"], "Scale");
        assert_eq!(seen.body["note"], "replicas 2 -> 3");
        assert_eq!(seen.body["type"], "Normal");
        assert_eq!(seen.body["regarding"]["kind"], "Deployment");
        assert_eq!(seen.body["regarding"]["name"], "wsfleet");
        assert_eq!(seen.body["reportingController"], "wsfleet-controller");
        publish.await.expect("task");
        // A refused Event is not fatal.
        let c = cluster.clone();
        let publish =
            tokio::spawn(async move { c.event(true, "ScaledDown", "Scale", "x".into()).await });
        expect(&mut api, 403, mock_api::status(403, "Forbidden")).await;
        publish.await.expect("an Event failure does not panic");
    }

    #[test]
    fn only_running_pods_not_being_deleted_are_alive() {
        let pod = |phase: &str, deleting: bool| -> Pod {
            serde_json::from_value(json!({
                "metadata": {
                    "name": "p",
                    "deletionTimestamp": if deleting { Some("2026-01-01T00:00:00Z") } else { None },
                    "annotations": {DELETION_COST: "-1000"}
                },
                "status": {"phase": phase}
            }))
            .expect("pod")
        };
        let view = PodView::from_pod(&pod("Running", false)).expect("named");
        assert!(view.alive);
        assert_eq!(view.deletion_cost.as_deref(), Some("-1000"));
        assert!(
            !PodView::from_pod(&pod("Running", true))
                .expect("named")
                .alive
        );
        assert!(
            !PodView::from_pod(&pod("Pending", false))
                .expect("named")
                .alive
        );
        assert!(
            !PodView::from_pod(&pod("Failed", false))
                .expect("named")
                .alive
        );
    }
}
