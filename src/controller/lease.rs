//! Leader election over a `coordination.k8s.io/v1` Lease.
//!
//! Each tick reads the Lease and does what [`decide::lease_action`] says:
//! create it, renew it, take over an expired one, or follow. Every write
//! carries the `resourceVersion` it read, so two replicas racing for one
//! Lease cannot both win: the loser gets 409 and follows. A leader acts
//! only while [`decide::still_leader`] holds for its last successful
//! renewal, which ends a safety margin before anyone else may take over.

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};

use super::Error;
use super::decide::{self, LeaseAction, LeaseView};

pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration_ms: u64,
    /// When our last create/renew/acquire succeeded.
    renewed_ms: Option<u64>,
}

/// What a tick found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Leadership {
    Leader,
    Follower { holder: Option<String> },
}

impl Elector {
    pub fn new(api: Api<Lease>, name: &str, identity: &str, duration_ms: u64) -> Self {
        Self {
            api,
            name: name.into(),
            identity: identity.into(),
            duration_ms,
            renewed_ms: None,
        }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Whether this replica may write now: it renewed recently enough that
    /// nobody else can have taken over (a third of the duration is kept as
    /// a margin for clock skew and slow requests).
    pub fn may_act(&self, now_ms: u64) -> bool {
        decide::still_leader(
            self.renewed_ms,
            self.duration_ms,
            self.duration_ms / 3,
            now_ms,
        )
    }

    /// One election round. API errors leave us a follower until the next
    /// round (a leader that cannot renew stops acting once `may_act` ends).
    pub async fn tick(&mut self, now_ms: u64) -> Result<Leadership, Error> {
        let current = self
            .api
            .get_opt(&self.name)
            .await
            .map_err(Error::kube("get lease"))?;
        let view = current.as_ref().map(view_of);
        match decide::lease_action(view.as_ref(), &self.identity, now_ms) {
            LeaseAction::Follow { holder } => {
                self.renewed_ms = None;
                Ok(Leadership::Follower {
                    holder: Some(holder),
                })
            }
            LeaseAction::Create => {
                let lease = self.lease(None, now_ms, now_ms, 0);
                self.write(
                    self.api.create(&PostParams::default(), &lease).await,
                    now_ms,
                )
            }
            action @ (LeaseAction::Renew | LeaseAction::Acquire) => {
                let Some(existing) = current else {
                    return Err(Error::Lease("lease vanished while read".into()));
                };
                let spec = existing.spec.clone().unwrap_or_default();
                let (acquired, transitions) = match action {
                    LeaseAction::Renew => (
                        spec.acquire_time
                            .map(|t| t.0.as_millisecond().max(0) as u64),
                        spec.lease_transitions.unwrap_or(0),
                    ),
                    _ => (None, spec.lease_transitions.unwrap_or(0) + 1),
                };
                let lease = self.lease(
                    existing.metadata.resource_version.clone(),
                    acquired.unwrap_or(now_ms),
                    now_ms,
                    transitions,
                );
                self.write(
                    self.api
                        .replace(&self.name, &PostParams::default(), &lease)
                        .await,
                    now_ms,
                )
            }
        }
    }

    fn write(
        &mut self,
        result: Result<Lease, kube::Error>,
        now_ms: u64,
    ) -> Result<Leadership, Error> {
        match result {
            Ok(_) => {
                self.renewed_ms = Some(now_ms);
                Ok(Leadership::Leader)
            }
            // Someone else wrote first (create or update): they lead.
            Err(kube::Error::Api(status)) if status.code == 409 => {
                self.renewed_ms = None;
                Ok(Leadership::Follower { holder: None })
            }
            Err(e) => {
                // Unknown outcome: keep the old renewal time, so `may_act`
                // runs out on its own if this goes on.
                Err(Error::kube("write lease")(e))
            }
        }
    }

    fn lease(
        &self,
        resource_version: Option<String>,
        acquired_ms: u64,
        now_ms: u64,
        transitions: i32,
    ) -> Lease {
        Lease {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                resource_version,
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(self.identity.clone()),
                lease_duration_seconds: Some((self.duration_ms / 1000).max(1) as i32),
                acquire_time: Some(micro_time(acquired_ms)),
                renew_time: Some(micro_time(now_ms)),
                lease_transitions: Some(transitions),
                ..Default::default()
            }),
        }
    }
}

fn micro_time(ms: u64) -> MicroTime {
    MicroTime(Timestamp::from_millisecond(ms as i64).unwrap_or(Timestamp::UNIX_EPOCH))
}

fn view_of(lease: &Lease) -> LeaseView {
    let spec = lease.spec.clone().unwrap_or_default();
    LeaseView {
        holder: spec.holder_identity.filter(|h| !h.is_empty()),
        renewed_ms: spec
            .renew_time
            .or(spec.acquire_time)
            .map(|t| t.0.as_millisecond().max(0) as u64)
            .unwrap_or(0),
        duration_ms: spec.lease_duration_seconds.unwrap_or(15).max(1) as u64 * 1000,
    }
}

#[cfg(test)]
mod tests {
    use super::super::mock_api::{self, expect};
    use super::*;

    const PATH: &str = "/apis/coordination.k8s.io/v1/namespaces/fleet/leases";

    fn elector(client: kube::Client, me: &str) -> Elector {
        Elector::new(
            Api::namespaced(client, "fleet"),
            "wsfleet-controller",
            me,
            15_000,
        )
    }

    fn rfc3339(ms: u64) -> String {
        Timestamp::from_millisecond(ms as i64)
            .expect("ts")
            .to_string()
    }

    #[tokio::test]
    async fn no_lease_yet_is_created_naming_us() {
        let (client, mut api) = mock_api::client();
        let now = crate::bus::now_ms();
        let mut me = elector(client, "ctl-a");
        let round = tokio::spawn(async move { (me.tick(now).await, me) });
        let get = expect(&mut api, 404, mock_api::status(404, "NotFound")).await;
        assert_eq!(
            (get.method.as_str(), get.uri.as_str()),
            ("GET", &*format!("{PATH}/wsfleet-controller"))
        );
        let create = expect(&mut api, 201, mock_api::lease("ctl-a", &rfc3339(now), "1")).await;
        assert_eq!(create.method, "POST");
        assert_eq!(create.uri, format!("{PATH}?"));
        assert_eq!(create.body["spec"]["holderIdentity"], "ctl-a");
        assert_eq!(create.body["spec"]["leaseDurationSeconds"], 15);
        let (result, me) = round.await.expect("task");
        assert_eq!(result.expect("round"), Leadership::Leader);
        assert!(me.may_act(now + 1_000));
        assert!(
            !me.may_act(now + 10_001),
            "stops a third of the lease early"
        );
    }

    #[tokio::test]
    async fn a_live_lease_of_another_is_followed_without_writing() {
        let (client, mut api) = mock_api::client();
        let now = crate::bus::now_ms();
        let mut me = elector(client, "ctl-b");
        let round = tokio::spawn(async move { (me.tick(now).await, me) });
        expect(
            &mut api,
            200,
            mock_api::lease("ctl-a", &rfc3339(now - 2_000), "7"),
        )
        .await;
        let (result, me) = round.await.expect("task");
        assert_eq!(
            result.expect("round"),
            Leadership::Follower {
                holder: Some("ctl-a".into())
            }
        );
        assert!(!me.may_act(now));
        // Nothing else was sent.
        let mut api = api;
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(100), api.next_request())
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn an_expired_lease_is_taken_over_with_its_resource_version() {
        let (client, mut api) = mock_api::client();
        let now = crate::bus::now_ms();
        let mut me = elector(client, "ctl-b");
        let round = tokio::spawn(async move { (me.tick(now).await, me) });
        expect(
            &mut api,
            200,
            mock_api::lease("ctl-a", &rfc3339(now - 16_000), "7"),
        )
        .await;
        let put = expect(&mut api, 200, mock_api::lease("ctl-b", &rfc3339(now), "8")).await;
        assert_eq!(put.method, "PUT");
        assert_eq!(put.uri, format!("{PATH}/wsfleet-controller?"));
        assert_eq!(put.body["metadata"]["resourceVersion"], "7");
        assert_eq!(put.body["spec"]["holderIdentity"], "ctl-b");
        assert_eq!(put.body["spec"]["leaseTransitions"], 1);
        let (result, _) = round.await.expect("task");
        assert_eq!(result.expect("round"), Leadership::Leader);
    }

    #[tokio::test]
    async fn losing_the_takeover_race_409_makes_us_follow() {
        let (client, mut api) = mock_api::client();
        let now = crate::bus::now_ms();
        let mut me = elector(client, "ctl-b");
        let round = tokio::spawn(async move { (me.tick(now).await, me) });
        expect(
            &mut api,
            200,
            mock_api::lease("ctl-a", &rfc3339(now - 16_000), "7"),
        )
        .await;
        expect(&mut api, 409, mock_api::status(409, "Conflict")).await;
        let (result, me) = round.await.expect("task");
        assert_eq!(
            result.expect("round"),
            Leadership::Follower { holder: None }
        );
        assert!(!me.may_act(now));
    }

    #[tokio::test]
    async fn a_leader_that_cannot_renew_stops_acting_before_the_lease_ends() {
        let (client, mut api) = mock_api::client();
        let t0 = crate::bus::now_ms();
        let mut me = elector(client, "ctl-a");
        let round = tokio::spawn(async move { (me.tick(t0).await, me) });
        expect(
            &mut api,
            200,
            mock_api::lease("ctl-a", &rfc3339(t0 - 5_000), "3"),
        )
        .await;
        let renew = expect(&mut api, 200, mock_api::lease("ctl-a", &rfc3339(t0), "4")).await;
        assert_eq!(renew.body["metadata"]["resourceVersion"], "3");
        let (result, mut me) = round.await.expect("task");
        assert_eq!(result.expect("renewed"), Leadership::Leader);
        // The API server fails from now on.
        let t1 = t0 + 5_000;
        let round = tokio::spawn(async move { (me.tick(t1).await, me) });
        expect(&mut api, 503, mock_api::status(503, "ServiceUnavailable")).await;
        let (result, me) = round.await.expect("task");
        assert!(result.is_err());
        assert!(me.may_act(t1), "still inside the safe part of the lease");
        assert!(
            !me.may_act(t0 + 10_000),
            "stopped before anyone may take over at t0+15s"
        );
    }
}
