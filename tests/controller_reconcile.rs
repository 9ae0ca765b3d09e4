//! One reconciliation at a time against a real Redis (the pods' reports
//! written as the pods write them) and a fake API server: who may write,
//! and what missing data stops.

mod common;

use std::time::Duration;

use common::kube_api::FakeApi;
use common::redis::RedisServer;
use wsfleet::config::ScaleMode;
use wsfleet::controller::decide::RebalancePolicy;
use wsfleet::controller::metrics::ControllerMetrics;
use wsfleet::controller::reconcile::{Reconciler, Settings};

use common::kube_api::report;

async fn orders(redis: &RedisServer) -> String {
    redis.cli(&["HGETALL", "wsf:ctl"]).await
}

/// Immediate scaling and a rebalance policy that acts at once.
fn settings(mode: ScaleMode) -> Settings {
    Settings {
        mode,
        scale: common::kube_api::immediate_scaling(100),
        rebalance: Some(RebalancePolicy {
            tolerance: 0.1,
            per_pod_per_s: 100,
            fleet_fraction_per_min: 1.0,
            interval_ms: 1_000,
        }),
        drain_timeout_ms: 10_000,
        order_latency_ms: 1_000,
    }
}

async fn controller(
    redis_url: &str,
    mode: ScaleMode,
    pods: Vec<&'static str>,
    replicas: i32,
) -> (Reconciler, FakeApi, ControllerMetrics) {
    let settings = settings(mode);
    let pods = pods.into_iter().map(String::from).collect();
    common::kube_api::reconciler(redis_url, pods, settings, replicas).await
}

#[tokio::test]
async fn a_follower_reads_but_never_writes() {
    let redis = RedisServer::start().await;
    report(&redis, "a", 900).await;
    report(&redis, "b", 0).await;
    let (mut ctl, api, metrics) =
        controller(&redis.url(), ScaleMode::Scale, vec!["a", "b"], 2).await;
    api.lease_held_by("ctl-1");
    ctl.tick().await.expect("a follower's tick is fine");
    assert!(api.writes().is_empty(), "{:?}", api.writes());
    assert_eq!(orders(&redis).await.trim(), "", "no shedding order");
    let text = metrics.render();
    assert_eq!(common::metric(&text, "wsfleet_controller_leader"), 0.0);
    assert_eq!(
        common::metric(&text, "wsfleet_controller_fleet_connections"),
        900.0
    );
}

#[tokio::test]
async fn the_leader_sheds_the_full_pod_and_scales_up() {
    let redis = RedisServer::start().await;
    report(&redis, "a", 900).await;
    report(&redis, "b", 0).await;
    let (mut ctl, api, _) = controller(&redis.url(), ScaleMode::Scale, vec!["a", "b"], 2).await;
    ctl.tick().await.expect("tick");
    // 900 connections at 100 per pod: 9 replicas.
    assert_eq!(api.replicas(), 9);
    let order = redis.cli(&["HGET", "wsf:ctl", "a"]).await;
    let order: serde_json::Value = serde_json::from_str(order.trim()).expect("order JSON");
    assert_eq!(order["action"], "shed");
    assert_eq!(order["count"], 100, "per pod per interval");
    assert_eq!(redis.cli(&["HEXISTS", "wsf:ctl", "b"]).await.trim(), "0");
    let reasons: Vec<String> = api
        .writes()
        .iter()
        .filter_map(|c| c.body["reason"].as_str().map(String::from))
        .collect();
    assert!(reasons.contains(&"ScaledUp".to_string()), "{reasons:?}");
    assert!(reasons.contains(&"Rebalancing".to_string()), "{reasons:?}");
    // The order is in flight: the next tick does not order `a` again.
    let first = order["id"].clone();
    ctl.tick().await.expect("tick");
    let again = redis.cli(&["HGET", "wsf:ctl", "a"]).await;
    let again: serde_json::Value = serde_json::from_str(again.trim()).expect("order JSON");
    assert_eq!(again["id"], first);
}

#[tokio::test]
async fn a_pod_without_a_report_stops_shedding_and_scale_down() {
    let redis = RedisServer::start().await;
    // Load for one pod on three, and out of balance.
    report(&redis, "a", 90).await;
    report(&redis, "b", 0).await;
    // `c` is listed by Kubernetes but never reported: unknown, not empty.
    let (mut ctl, api, metrics) =
        controller(&redis.url(), ScaleMode::Scale, vec!["a", "b", "c"], 3).await;
    ctl.tick().await.expect("tick");
    assert_eq!(api.replicas(), 3, "no scale-down with an unknown pod");
    assert_eq!(orders(&redis).await.trim(), "");
    let text = metrics.render();
    assert_eq!(
        common::metric(&text, "wsfleet_controller_pods{state=\"unknown\"}"),
        1.0
    );
    assert!(
        common::metric(
            &text,
            "wsfleet_controller_rebalance_skips_total{reason=\"unknown_pods\"}"
        ) >= 1.0
    );
    assert!(
        !api.writes()
            .iter()
            .any(|c| c.path.contains("/pods/") || c.path.ends_with("/scale")),
        "{:?}",
        api.writes()
    );
}

#[tokio::test]
async fn without_redis_nothing_is_decided() {
    let mut redis = RedisServer::start().await;
    report(&redis, "a", 10).await;
    let url = redis.url();
    let (mut ctl, api, metrics) = controller(&url, ScaleMode::Scale, vec!["a"], 5).await;
    redis.stop().await;
    assert!(ctl.tick().await.is_err());
    assert_eq!(api.replicas(), 5);
    assert!(
        api.writes().iter().all(|c| c.path.contains("/leases")),
        "{:?}",
        api.writes()
    );
    let text = metrics.render();
    assert_eq!(
        common::metric(
            &text,
            "wsfleet_controller_reconcile_errors_total{stage=\"redis\"}"
        ),
        1.0
    );
}

#[tokio::test]
async fn a_failed_scale_patch_is_counted_and_retried_next_tick() {
    let redis = RedisServer::start().await;
    report(&redis, "a", 500).await;
    report(&redis, "b", 500).await;
    let (mut ctl, api, metrics) =
        controller(&redis.url(), ScaleMode::Scale, vec!["a", "b"], 2).await;
    api.fail_next("PATCH", "/scale", 409);
    assert!(ctl.tick().await.is_err());
    assert_eq!(api.replicas(), 2);
    let text = metrics.render();
    assert_eq!(
        common::metric(
            &text,
            "wsfleet_controller_reconcile_errors_total{stage=\"kube\"}"
        ),
        1.0
    );
    api.fail_next("PATCH", "/scale", 500);
    assert!(ctl.tick().await.is_err());
    ctl.tick().await.expect("third tick");
    assert_eq!(api.replicas(), 10);
}

#[tokio::test]
async fn a_leader_whose_lease_ran_out_mid_tick_stops_before_writing() {
    let redis = RedisServer::start().await;
    report(&redis, "a", 900).await;
    report(&redis, "b", 0).await;
    let settings = settings(ScaleMode::Scale);
    // A 300 ms lease: this replica may act for 200 ms after winning it.
    let (mut ctl, api, metrics) = common::kube_api::reconciler_with_lease(
        &redis.url(),
        vec!["a".into(), "b".into()],
        settings,
        2,
        300,
    )
    .await;
    // The tick wins the Lease, then the API server stalls past the safe
    // part of it before the first write would happen.
    api.delay_next("GET", "/scale", Duration::from_millis(400));
    let err = ctl
        .tick()
        .await
        .expect_err("no write after the lease ran out");
    assert_eq!(err.stage(), "leadership", "{err}");
    assert_eq!(api.replicas(), 2, "the scale-up was not written");
    assert!(
        api.writes().iter().all(|c| c.path.contains("/leases")),
        "{:?}",
        api.writes()
    );
    assert_eq!(orders(&redis).await.trim(), "", "no shedding order");
    let text = metrics.render();
    assert_eq!(
        common::metric(
            &text,
            "wsfleet_controller_reconcile_errors_total{stage=\"leadership\"}"
        ),
        1.0
    );
}
