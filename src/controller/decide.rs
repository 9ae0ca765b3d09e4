//! Every decision the controller makes, as pure functions of what it has
//! seen: how many replicas, which pods go, which pods shed how many
//! connections, when a scale-down may finish. No I/O, no clock: `now_ms`
//! is an argument, so the table tests below can replay any history.
//!
//! The rule that shapes all of them (trap 18): missing data is unknown, not
//! zero. A pod the API server lists but that has no fresh report holds an
//! unknown number of connections, so nothing that could hurt its clients
//! (scale-down, shedding) happens until it reports again.

use std::collections::VecDeque;

/// Deletion cost written on the pods chosen to go: the ReplicaSet removes
/// pods with the lowest cost first, and unannotated pods count as 0.
pub const VICTIM_DELETION_COST: i32 = -1000;

/// One gateway pod as the controller sees it: what the API server says
/// and, when fresh, what the pod itself last reported through Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetPod {
    pub name: String,
    /// Running and not being deleted, as far as Kubernetes knows.
    pub alive: bool,
    /// The pod's own figures, `None` when it never reported or its report
    /// is older than the staleness bound.
    pub report: Option<Report>,
}

/// What a pod says about itself (its entry in the fleet registry).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub connections: usize,
    pub capacity: usize,
    pub draining: bool,
    pub shedding: bool,
}

impl FleetPod {
    /// A pod that takes new connections: alive, reporting, not draining.
    fn serving(&self) -> Option<&Report> {
        self.report.as_ref().filter(|r| self.alive && !r.draining)
    }
}

/// Fleet-wide figures, for the autoscaler and the `metrics` mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Totals {
    /// Connections on pods that reported.
    pub connections: usize,
    /// Alive pods.
    pub pods: usize,
    /// Alive pods without a fresh report.
    pub unknown: usize,
}

pub fn totals(pods: &[FleetPod]) -> Totals {
    let alive = pods.iter().filter(|p| p.alive);
    let mut t = Totals::default();
    for pod in alive {
        t.pods += 1;
        match &pod.report {
            Some(r) => t.connections += r.connections,
            None => t.unknown += 1,
        }
    }
    t
}

/// How the fleet is sized.
#[derive(Debug, Clone, PartialEq)]
pub struct ScalePolicy {
    pub target_per_pod: usize,
    /// Spare room kept above the load (0.2 = 20 %).
    pub headroom: f64,
    pub min_replicas: u32,
    pub max_replicas: u32,
    /// Load must want more pods for this long before scaling up.
    pub scale_up_after_ms: u64,
    /// Scale down only to the highest replica count recommended over this
    /// window (so one quiet minute does not remove pods).
    pub scale_down_window_ms: u64,
    /// At most this many pods removed per step ...
    pub scale_down_step: u32,
    /// ... and at most one step per this interval.
    pub scale_down_every_ms: u64,
    /// Hysteresis: a scale-down needs the load to fit even if it were this
    /// much higher (0.1 = 10 %), so a load near a boundary does not flap.
    pub tolerance: f64,
}

impl ScalePolicy {
    /// Pods the load needs, with headroom plus `extra`, before the bounds.
    fn needed(&self, connections: usize, extra: f64) -> u32 {
        let target = self.target_per_pod.max(1) as f64;
        let want = (connections as f64 * (1.0 + self.headroom + extra) / target).ceil();
        // Saturate: the bounds below keep it sane anyway.
        want.min(u32::MAX as f64) as u32
    }

    fn clamp(&self, n: u32) -> u32 {
        n.clamp(self.min_replicas, self.max_replicas.max(self.min_replicas))
    }

    /// The replica count the load asks for right now (what `metrics` mode
    /// exports as `desired_replicas`).
    pub fn desired(&self, totals: Totals) -> u32 {
        self.clamp(self.needed(totals.connections, 0.0))
    }
}

/// What the autoscaler wants done this tick.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScaleDecision {
    Hold(HoldReason),
    Up { from: u32, to: u32 },
    Down { from: u32, to: u32 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldReason {
    /// Replicas already match the load.
    Steady,
    /// Load wants more pods, not yet for `scale_up_after`.
    WaitingToScaleUp,
    /// Load wants fewer pods; the window or the step interval holds it.
    Stabilizing,
    /// Some pods do not report: their load is unknown, so no scale-down.
    UnknownPods,
    /// No pod reports at all: nothing is known.
    NoData,
}

impl HoldReason {
    pub fn as_str(self) -> &'static str {
        match self {
            HoldReason::Steady => "steady",
            HoldReason::WaitingToScaleUp => "waiting_to_scale_up",
            HoldReason::Stabilizing => "stabilizing",
            HoldReason::UnknownPods => "unknown_pods",
            HoldReason::NoData => "no_data",
        }
    }
}

/// What the autoscaler remembers between ticks. Deterministic: the same
/// sequence of inputs gives the same decisions.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ScaleMemory {
    /// (time, replicas recommended for a scale-down) over the window.
    recommendations: VecDeque<(u64, u32)>,
    /// Since when the load has wanted more pods than there are.
    wants_more_since: Option<u64>,
    /// Since when the load has not wanted more pods (the window's start).
    content_since: Option<u64>,
    last_scale_down_ms: Option<u64>,
}

impl ScaleMemory {
    /// One autoscaling tick: `current` is the Deployment's replica count.
    pub fn decide(
        &mut self,
        policy: &ScalePolicy,
        totals: Totals,
        current: u32,
        now_ms: u64,
    ) -> ScaleDecision {
        if totals.pods > 0 && totals.unknown == totals.pods {
            self.wants_more_since = None;
            return ScaleDecision::Hold(HoldReason::NoData);
        }
        let up_to = policy.clamp(policy.needed(totals.connections, 0.0));
        let down_to = policy.clamp(policy.needed(totals.connections, policy.tolerance));

        // Out of bounds (someone edited replicas, or the bounds changed):
        // correct at once, that is not a load decision.
        if current < policy.min_replicas {
            return ScaleDecision::Up {
                from: current,
                to: policy.min_replicas.max(up_to),
            };
        }

        if up_to > current {
            self.recommendations.clear();
            self.content_since = None;
            let since = *self.wants_more_since.get_or_insert(now_ms);
            if now_ms.saturating_sub(since) >= policy.scale_up_after_ms {
                self.wants_more_since = None;
                return ScaleDecision::Up {
                    from: current,
                    to: up_to,
                };
            }
            return ScaleDecision::Hold(HoldReason::WaitingToScaleUp);
        }
        self.wants_more_since = None;

        // Scale-down: remember what each tick would allow, act on the
        // highest over the window.
        self.recommendations.push_back((now_ms, down_to));
        let content_since = *self.content_since.get_or_insert(now_ms);
        while let Some(&(at, _)) = self.recommendations.front() {
            if now_ms.saturating_sub(at) > policy.scale_down_window_ms {
                self.recommendations.pop_front();
            } else {
                break;
            }
        }
        let over_max = current > policy.max_replicas;
        if totals.unknown > 0 && !over_max {
            return ScaleDecision::Hold(HoldReason::UnknownPods);
        }
        let window_full = now_ms.saturating_sub(content_since) >= policy.scale_down_window_ms;
        let recommended = self
            .recommendations
            .iter()
            .map(|&(_, n)| n)
            .max()
            .unwrap_or(current);
        if over_max {
            return ScaleDecision::Down {
                from: current,
                to: policy.max_replicas.max(policy.min_replicas),
            };
        }
        if recommended >= current {
            return ScaleDecision::Hold(HoldReason::Steady);
        }
        let step_due = self
            .last_scale_down_ms
            .is_none_or(|at| now_ms.saturating_sub(at) >= policy.scale_down_every_ms);
        if !window_full || !step_due {
            return ScaleDecision::Hold(HoldReason::Stabilizing);
        }
        let to = recommended.max(current.saturating_sub(policy.scale_down_step.max(1)));
        ScaleDecision::Down { from: current, to }
    }

    /// The controller carried out a scale-down (its last step finished).
    pub fn scaled_down(&mut self, now_ms: u64) {
        self.last_scale_down_ms = Some(now_ms);
    }
}

/// The pods to remove for a scale-down from `from` to `to`: the emptiest
/// serving pods (ties by name, so the choice is stable across ticks).
/// Pods already draining leave anyway and count towards the removal.
/// Returns fewer than asked when not enough pods are known.
pub fn victims(pods: &[FleetPod], from: u32, to: u32) -> Vec<String> {
    let wanted = from.saturating_sub(to) as usize;
    let mut already: Vec<&FleetPod> = pods
        .iter()
        .filter(|p| p.alive && p.report.as_ref().is_some_and(|r| r.draining))
        .collect();
    already.sort_by(|a, b| a.name.cmp(&b.name));
    let mut chosen: Vec<String> = already
        .into_iter()
        .take(wanted)
        .map(|p| p.name.clone())
        .collect();
    let mut candidates: Vec<(&str, usize)> = pods
        .iter()
        .filter_map(|p| p.serving().map(|r| (p.name.as_str(), r.connections)))
        .collect();
    candidates.sort_by(|a, b| a.1.cmp(&b.1).then(a.0.cmp(b.0)));
    // Never drain the last serving pod.
    let spare = candidates.len().saturating_sub(1);
    let more = wanted.saturating_sub(chosen.len()).min(spare);
    chosen.extend(
        candidates
            .into_iter()
            .take(more)
            .map(|(n, _)| n.to_string()),
    );
    chosen
}

/// Where a scale-down stands, judged each tick from the victims' reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainProgress {
    /// Victims still hold connections inside the drain window.
    Waiting { connections: usize },
    /// Every victim is empty or gone (or the window is over): lower replicas.
    Done { timed_out: bool },
}

pub fn drain_progress(
    pods: &[FleetPod],
    victims: &[String],
    started_ms: u64,
    timeout_ms: u64,
    now_ms: u64,
) -> DrainProgress {
    let mut left = 0;
    let mut unknown = false;
    for name in victims {
        match pods.iter().find(|p| &p.name == name) {
            None => {}
            Some(p) if !p.alive => {}
            Some(p) => match &p.report {
                Some(r) => left += r.connections,
                None => unknown = true,
            },
        }
    }
    if left == 0 && !unknown {
        return DrainProgress::Done { timed_out: false };
    }
    if now_ms.saturating_sub(started_ms) >= timeout_ms {
        return DrainProgress::Done { timed_out: true };
    }
    DrainProgress::Waiting { connections: left }
}

/// How rebalancing is bounded.
#[derive(Debug, Clone, PartialEq)]
pub struct RebalancePolicy {
    /// A pod more than this fraction above the fleet average sheds
    /// (0.1 = 10 %).
    pub tolerance: f64,
    /// Connections one pod sheds per second at most.
    pub per_pod_per_s: u32,
    /// Fraction of the fleet's connections shed per minute at most, all
    /// pods together (0.05 = 5 %).
    pub fleet_fraction_per_min: f64,
    /// How long one shedding order runs (the controller's interval).
    pub interval_ms: u64,
}

/// One order to a pod: shed `count` connections at `per_s` per second.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShedOrder {
    pub pod: String,
    pub count: usize,
    pub per_s: u32,
}

/// Why no pod sheds this tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balanced {
    /// Every pod is within tolerance.
    Yes,
    /// Some pod's load is unknown: its reconnects could land anywhere.
    UnknownPods,
    /// A pod is still shedding or draining from an earlier order.
    Busy,
    /// The fleet's per-minute shedding budget is spent.
    BudgetSpent,
    /// Below-average pods have no room to take connections.
    NoRoom,
    /// Fewer than two serving pods.
    TooFew,
}

/// Connections shed fleet-wide over the last minute.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShedHistory {
    orders: VecDeque<(u64, usize)>,
}

const MINUTE_MS: u64 = 60_000;

impl ShedHistory {
    pub fn record(&mut self, now_ms: u64, count: usize) {
        self.orders.push_back((now_ms, count));
    }

    pub fn last_minute(&mut self, now_ms: u64) -> usize {
        while let Some(&(at, _)) = self.orders.front() {
            if now_ms.saturating_sub(at) >= MINUTE_MS {
                self.orders.pop_front();
            } else {
                break;
            }
        }
        self.orders.iter().map(|&(_, n)| n).sum()
    }
}

/// Who sheds how many this interval, so that every pod ends within
/// tolerance of the average without a reconnect storm: each pod at most
/// `per_pod_per_s` × interval, the fleet at most its per-minute fraction.
/// The most loaded pods shed first. A pod sheds down to the average (not
/// just under the tolerance line), so one round settles it.
pub fn rebalance(
    policy: &RebalancePolicy,
    pods: &[FleetPod],
    history: &mut ShedHistory,
    now_ms: u64,
) -> Result<Vec<ShedOrder>, Balanced> {
    let alive: Vec<&FleetPod> = pods.iter().filter(|p| p.alive).collect();
    if alive.iter().any(|p| p.report.is_none()) {
        return Err(Balanced::UnknownPods);
    }
    if alive
        .iter()
        .any(|p| p.report.as_ref().is_some_and(|r| r.shedding || r.draining))
    {
        return Err(Balanced::Busy);
    }
    let serving: Vec<(&str, &Report)> = alive
        .iter()
        .filter_map(|p| p.serving().map(|r| (p.name.as_str(), r)))
        .collect();
    if serving.len() < 2 {
        return Err(Balanced::TooFew);
    }
    let total: usize = serving.iter().map(|(_, r)| r.connections).sum();
    let average = total as f64 / serving.len() as f64;
    // Out of balance when a pod is outside the tolerance band on either
    // side (a pod far below average is as wrong as one far above: a new
    // pod after a scale-out). Then every pod above the average gives down
    // to it, most loaded first.
    let upper = average * (1.0 + policy.tolerance);
    let lower = average * (1.0 - policy.tolerance);
    let outside = serving
        .iter()
        .any(|(_, r)| r.connections as f64 > upper || (r.connections as f64) < lower);
    if !outside {
        return Err(Balanced::Yes);
    }
    let mut over: Vec<(&str, usize)> = serving
        .iter()
        .filter(|(_, r)| r.connections as f64 > average)
        .map(|(n, r)| {
            (
                *n,
                r.connections - (average.ceil() as usize).min(r.connections),
            )
        })
        .filter(|&(_, excess)| excess > 0)
        .collect();
    if over.is_empty() {
        return Err(Balanced::Yes);
    }
    over.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));

    let fleet_budget = (total as f64 * policy.fleet_fraction_per_min).floor() as usize;
    let mut budget = fleet_budget.saturating_sub(history.last_minute(now_ms));
    if budget == 0 {
        return Err(Balanced::BudgetSpent);
    }
    // Room on the pods that will take the reconnects.
    let mut room: usize = serving
        .iter()
        .filter(|(_, r)| (r.connections as f64) < average)
        .map(|(_, r)| r.capacity.saturating_sub(r.connections))
        .sum();
    if room == 0 {
        return Err(Balanced::NoRoom);
    }
    let per_pod_cap =
        (policy.per_pod_per_s as u64 * policy.interval_ms.max(1000) / 1000).max(1) as usize;
    let mut orders = Vec::new();
    for (pod, excess) in over {
        let count = excess.min(per_pod_cap).min(budget).min(room);
        if count == 0 {
            break;
        }
        budget -= count;
        room -= count;
        orders.push(ShedOrder {
            pod: pod.to_string(),
            count,
            per_s: policy.per_pod_per_s.max(1),
        });
    }
    let shed: usize = orders.iter().map(|o| o.count).sum();
    history.record(now_ms, shed);
    Ok(orders)
}

/// Leader election over a `coordination.k8s.io/v1` Lease, as a decision:
/// what this replica should do given the Lease it just read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseView {
    pub holder: Option<String>,
    /// When the holder last renewed (its `renewTime`), ms since the epoch.
    pub renewed_ms: u64,
    pub duration_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseAction {
    /// No Lease object yet: create it naming us.
    Create,
    /// We hold it: renew.
    Renew,
    /// The holder let it expire (or nobody holds it): take it over.
    Acquire,
    /// Someone else holds a live lease: stand by.
    Follow { holder: String },
}

pub fn lease_action(lease: Option<&LeaseView>, me: &str, now_ms: u64) -> LeaseAction {
    let Some(lease) = lease else {
        return LeaseAction::Create;
    };
    match &lease.holder {
        Some(h) if h == me => LeaseAction::Renew,
        Some(h) if now_ms < lease.renewed_ms.saturating_add(lease.duration_ms) => {
            LeaseAction::Follow { holder: h.clone() }
        }
        _ => LeaseAction::Acquire,
    }
}

/// Whether a replica whose last successful renewal was at `renewed_ms` may
/// still act. It stops `margin_ms` before the lease could have expired, so
/// a leader cut off from the API server stops writing before anyone else
/// can take over.
pub fn still_leader(
    renewed_ms: Option<u64>,
    duration_ms: u64,
    margin_ms: u64,
    now_ms: u64,
) -> bool {
    renewed_ms.is_some_and(|at| now_ms < at.saturating_add(duration_ms.saturating_sub(margin_ms)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, connections: usize) -> FleetPod {
        FleetPod {
            name: name.into(),
            alive: true,
            report: Some(Report {
                connections,
                capacity: 10_000,
                draining: false,
                shedding: false,
            }),
        }
    }

    fn silent(name: &str) -> FleetPod {
        FleetPod {
            name: name.into(),
            alive: true,
            report: None,
        }
    }

    fn draining(name: &str, connections: usize) -> FleetPod {
        let mut p = pod(name, connections);
        if let Some(r) = p.report.as_mut() {
            r.draining = true;
        }
        p
    }

    fn policy() -> ScalePolicy {
        ScalePolicy {
            target_per_pod: 1000,
            headroom: 0.0,
            min_replicas: 1,
            max_replicas: 10,
            scale_up_after_ms: 30_000,
            scale_down_window_ms: 600_000,
            scale_down_step: 1,
            scale_down_every_ms: 120_000,
            tolerance: 0.1,
        }
    }

    fn t(connections: usize, pods: usize, unknown: usize) -> Totals {
        Totals {
            connections,
            pods,
            unknown,
        }
    }

    #[test]
    fn desired_replicas_table() {
        let p = policy();
        let with_headroom = ScalePolicy {
            headroom: 0.2,
            ..policy()
        };
        let cases = [
            (&p, 0, 1),                // empty fleet: the minimum
            (&p, 1, 1),                // one connection: one pod
            (&p, 1000, 1),             // exactly full
            (&p, 1001, 2),             // one over
            (&p, 9_500, 10),           // near the max
            (&p, 1_000_000, 10),       // capped at max
            (&with_headroom, 1000, 2), // 20 % headroom needs a second pod
            (&with_headroom, 5000, 6),
        ];
        for (policy, connections, want) in cases {
            assert_eq!(
                policy.desired(t(connections, 1, 0)),
                want,
                "{connections} connections"
            );
        }
    }

    #[test]
    fn scale_up_waits_then_jumps_to_the_need() {
        let p = policy();
        let mut m = ScaleMemory::default();
        assert_eq!(
            m.decide(&p, t(4500, 2, 0), 2, 0),
            ScaleDecision::Hold(HoldReason::WaitingToScaleUp)
        );
        assert_eq!(
            m.decide(&p, t(4500, 2, 0), 2, 29_999),
            ScaleDecision::Hold(HoldReason::WaitingToScaleUp)
        );
        assert_eq!(
            m.decide(&p, t(4500, 2, 0), 2, 30_000),
            ScaleDecision::Up { from: 2, to: 5 }
        );
    }

    #[test]
    fn a_spike_shorter_than_the_wait_does_not_scale_up() {
        let p = policy();
        let mut m = ScaleMemory::default();
        m.decide(&p, t(4500, 2, 0), 2, 0);
        assert_eq!(
            m.decide(&p, t(1500, 2, 0), 2, 10_000),
            ScaleDecision::Hold(HoldReason::Steady)
        );
        // The clock restarts: a new spike waits its full 30 s again.
        assert_eq!(
            m.decide(&p, t(4500, 2, 0), 2, 20_000),
            ScaleDecision::Hold(HoldReason::WaitingToScaleUp)
        );
        assert_eq!(
            m.decide(&p, t(4500, 2, 0), 2, 49_999),
            ScaleDecision::Hold(HoldReason::WaitingToScaleUp)
        );
        assert!(matches!(
            m.decide(&p, t(4500, 2, 0), 2, 50_000),
            ScaleDecision::Up { .. }
        ));
    }

    #[test]
    fn scale_down_waits_for_the_window_and_steps_one_pod_per_interval() {
        let p = policy();
        let mut m = ScaleMemory::default();
        let mut now = 0;
        // Load for 2 pods, 5 running: nothing until the window is full.
        while now < 600_000 {
            assert_eq!(
                m.decide(&p, t(1500, 5, 0), 5, now),
                ScaleDecision::Hold(HoldReason::Stabilizing),
                "at {now}"
            );
            now += 15_000;
        }
        assert_eq!(
            m.decide(&p, t(1500, 5, 0), 5, now),
            ScaleDecision::Down { from: 5, to: 4 }
        );
        m.scaled_down(now);
        // The next step waits 120 s.
        assert_eq!(
            m.decide(&p, t(1500, 4, 0), 4, now + 60_000),
            ScaleDecision::Hold(HoldReason::Stabilizing)
        );
        assert_eq!(
            m.decide(&p, t(1500, 4, 0), 4, now + 120_000),
            ScaleDecision::Down { from: 4, to: 3 }
        );
    }

    #[test]
    fn a_peak_inside_the_window_holds_the_replicas() {
        let p = policy();
        let mut m = ScaleMemory::default();
        m.decide(&p, t(4000, 5, 0), 5, 0); // needs 5 (with tolerance)
        for now in (15_000..=600_000).step_by(15_000) {
            m.decide(&p, t(500, 5, 0), 5, now);
        }
        // The peak at 0 fell out of the window only after 600 s.
        assert!(matches!(
            m.decide(&p, t(500, 5, 0), 5, 615_000),
            ScaleDecision::Down { from: 5, to: 4 }
        ));
    }

    #[test]
    fn a_load_near_a_boundary_does_not_flap() {
        // 2,000 connections on 2 pods of 1,000: exactly full. The load
        // wobbles around the boundary; with 10 % tolerance it never wants
        // to drop to 2 pods again once at 3, nor flip back and forth.
        let p = policy();
        let mut m = ScaleMemory::default();
        let mut decisions = Vec::new();
        for (i, load) in [2050, 1950, 2050, 1950, 2050, 1950]
            .iter()
            .cycle()
            .take(200)
            .enumerate()
        {
            let now = i as u64 * 15_000;
            decisions.push(m.decide(&p, t(*load, 3, 0), 3, now));
        }
        assert!(
            decisions
                .iter()
                .all(|d| *d == ScaleDecision::Hold(HoldReason::Steady)),
            "{decisions:?}"
        );
    }

    #[test]
    fn unknown_pods_block_scale_down_but_not_scale_up() {
        let p = policy();
        let mut m = ScaleMemory::default();
        for now in (0..=700_000).step_by(10_000) {
            assert_eq!(
                m.decide(&p, t(100, 5, 1), 5, now),
                ScaleDecision::Hold(HoldReason::UnknownPods)
            );
        }
        let mut m = ScaleMemory::default();
        m.decide(&p, t(9000, 5, 1), 5, 0);
        assert_eq!(
            m.decide(&p, t(9000, 5, 1), 5, 30_000),
            ScaleDecision::Up { from: 5, to: 9 }
        );
    }

    #[test]
    fn no_report_at_all_holds_everything() {
        let p = policy();
        let mut m = ScaleMemory::default();
        for now in (0..=700_000).step_by(10_000) {
            assert_eq!(
                m.decide(&p, t(0, 4, 4), 4, now),
                ScaleDecision::Hold(HoldReason::NoData)
            );
        }
    }

    #[test]
    fn out_of_bounds_replicas_are_corrected_at_once() {
        let p = ScalePolicy {
            min_replicas: 2,
            max_replicas: 4,
            ..policy()
        };
        let mut m = ScaleMemory::default();
        assert_eq!(
            m.decide(&p, t(0, 1, 0), 1, 0),
            ScaleDecision::Up { from: 1, to: 2 }
        );
        assert_eq!(
            m.decide(&p, t(0, 6, 0), 6, 0),
            ScaleDecision::Down { from: 6, to: 4 }
        );
        // At max with more load: hold, never above max.
        assert_eq!(
            m.decide(&p, t(100_000, 4, 0), 4, 100_000),
            ScaleDecision::Hold(HoldReason::Steady)
        );
    }

    #[test]
    fn victims_are_the_emptiest_serving_pods_and_never_the_last() {
        let pods = vec![pod("a", 900), pod("b", 10), pod("c", 10), pod("d", 500)];
        assert_eq!(victims(&pods, 4, 3), vec!["b"]);
        assert_eq!(victims(&pods, 4, 2), vec!["b", "c"]);
        assert_eq!(victims(&pods, 4, 0), vec!["b", "c", "d"]);
        // A draining pod leaves anyway: it is chosen first.
        let pods = vec![pod("a", 900), draining("b", 300), pod("c", 10)];
        assert_eq!(victims(&pods, 3, 2), vec!["b"]);
        assert_eq!(victims(&pods, 3, 1), vec!["b", "c"]);
        // Silent and dead pods are never chosen (their load is unknown).
        let mut dead = pod("z", 0);
        dead.alive = false;
        let pods = vec![pod("a", 900), silent("b"), dead, pod("c", 800)];
        assert_eq!(victims(&pods, 4, 3), vec!["c"]);
        assert!(victims(&[], 3, 1).is_empty());
    }

    #[test]
    fn drain_progress_waits_for_victims_or_the_window() {
        let victims = vec!["b".to_string(), "c".to_string()];
        let pods = vec![pod("a", 900), draining("b", 3), draining("c", 0)];
        assert_eq!(
            drain_progress(&pods, &victims, 0, 60_000, 1000),
            DrainProgress::Waiting { connections: 3 }
        );
        assert_eq!(
            drain_progress(&pods, &victims, 0, 60_000, 60_000),
            DrainProgress::Done { timed_out: true }
        );
        let pods = vec![pod("a", 903), draining("c", 0)]; // b is gone
        assert_eq!(
            drain_progress(&pods, &victims, 0, 60_000, 1000),
            DrainProgress::Done { timed_out: false }
        );
        // A victim that stopped reporting is not empty: wait.
        let pods = vec![pod("a", 903), silent("b"), draining("c", 0)];
        assert_eq!(
            drain_progress(&pods, &victims, 0, 60_000, 1000),
            DrainProgress::Waiting { connections: 0 }
        );
    }

    fn rpolicy() -> RebalancePolicy {
        RebalancePolicy {
            tolerance: 0.1,
            per_pod_per_s: 100,
            fleet_fraction_per_min: 0.5,
            interval_ms: 10_000,
        }
    }

    #[test]
    fn rebalance_table() {
        let p = rpolicy();
        type Case = (
            &'static str,
            Vec<FleetPod>,
            Result<Vec<(&'static str, usize)>, Balanced>,
        );
        let cases: Vec<Case> = vec![
            ("no pods", vec![], Err(Balanced::TooFew)),
            ("one pod", vec![pod("a", 100)], Err(Balanced::TooFew)),
            (
                "balanced",
                vec![pod("a", 100), pod("b", 105)],
                Err(Balanced::Yes),
            ),
            (
                "after scale-out: three full, one empty",
                vec![pod("a", 900), pod("b", 900), pod("c", 900), pod("d", 0)],
                // average 675: each full pod sheds 225 (within 1,000/interval)
                Ok(vec![("a", 225), ("b", 225), ("c", 225)]),
            ),
            (
                "none far above, one far below: the above-average pods give",
                vec![pod("a", 16), pod("b", 16), pod("c", 16), pod("d", 12)],
                Ok(vec![("a", 1), ("b", 1), ("c", 1)]),
            ),
            (
                "inside the band on both sides",
                vec![pod("a", 16), pod("b", 14), pod("c", 15)],
                Err(Balanced::Yes),
            ),
            (
                "one huge pod, per-pod rate caps it",
                vec![pod("a", 5000), pod("b", 0)],
                Ok(vec![("a", 1000)]),
            ),
            (
                "many tiny pods, one slightly over",
                (0..20)
                    .map(|i| pod(&format!("p{i:02}"), if i == 0 { 3 } else { 1 }))
                    .collect(),
                Ok(vec![("p00", 1)]),
            ),
            (
                "a silent pod: unknown, no shedding",
                vec![pod("a", 900), silent("b"), pod("c", 0)],
                Err(Balanced::UnknownPods),
            ),
            (
                "a pod still shedding",
                vec![
                    pod("a", 900),
                    FleetPod {
                        report: Some(Report {
                            connections: 0,
                            capacity: 10,
                            draining: false,
                            shedding: true,
                        }),
                        ..pod("b", 0)
                    },
                ],
                Err(Balanced::Busy),
            ),
            (
                "all draining",
                vec![draining("a", 500), draining("b", 10)],
                Err(Balanced::Busy),
            ),
            (
                "receivers full",
                vec![
                    pod("a", 900),
                    FleetPod {
                        report: Some(Report {
                            connections: 100,
                            capacity: 100,
                            draining: false,
                            shedding: false,
                        }),
                        ..pod("b", 0)
                    },
                ],
                Err(Balanced::NoRoom),
            ),
        ];
        for (name, pods, want) in cases {
            let mut history = ShedHistory::default();
            let got = rebalance(&p, &pods, &mut history, 0).map(|orders| {
                orders
                    .iter()
                    .map(|o| (o.pod.clone(), o.count))
                    .collect::<Vec<_>>()
            });
            let want = want.map(|w| {
                w.iter()
                    .map(|(n, c)| (n.to_string(), *c))
                    .collect::<Vec<_>>()
            });
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn the_fleet_budget_holds_across_intervals() {
        // 10 % of 4,000 connections per minute: 400, whatever the pods want.
        let p = RebalancePolicy {
            fleet_fraction_per_min: 0.1,
            ..rpolicy()
        };
        let pods = vec![pod("a", 2000), pod("b", 2000), pod("c", 0), pod("d", 0)];
        let mut history = ShedHistory::default();
        let mut shed_per_minute = std::collections::BTreeMap::new();
        for tick in 0..18u64 {
            let now = tick * 10_000;
            if let Ok(orders) = rebalance(&p, &pods, &mut history, now) {
                *shed_per_minute.entry(now / 60_000).or_insert(0) +=
                    orders.iter().map(|o| o.count).sum::<usize>();
            }
            // Any 60 s window stays within the budget.
            assert!(history.last_minute(now) <= 400, "at {now}");
        }
        assert_eq!(
            shed_per_minute.values().copied().collect::<Vec<_>>(),
            vec![400, 400, 400]
        );
    }

    #[test]
    fn orders_carry_the_per_pod_rate() {
        let pods = vec![pod("a", 300), pod("b", 0)];
        let orders =
            rebalance(&rpolicy(), &pods, &mut ShedHistory::default(), 0).unwrap_or_default();
        assert_eq!(
            orders,
            vec![ShedOrder {
                pod: "a".into(),
                count: 150,
                per_s: 100
            }]
        );
    }

    #[test]
    fn totals_count_unknown_pods_apart() {
        let mut dead = pod("x", 50);
        dead.alive = false;
        let pods = vec![pod("a", 10), silent("b"), pod("c", 5), dead];
        assert_eq!(totals(&pods), t(15, 3, 1));
    }

    #[test]
    fn lease_actions() {
        let lease = |holder: Option<&str>, renewed_ms| LeaseView {
            holder: holder.map(str::to_string),
            renewed_ms,
            duration_ms: 15_000,
        };
        assert_eq!(lease_action(None, "me", 0), LeaseAction::Create);
        assert_eq!(
            lease_action(Some(&lease(Some("me"), 0)), "me", 100_000),
            LeaseAction::Renew
        );
        assert_eq!(
            lease_action(Some(&lease(Some("other"), 10_000)), "me", 24_999),
            LeaseAction::Follow {
                holder: "other".into()
            }
        );
        assert_eq!(
            lease_action(Some(&lease(Some("other"), 10_000)), "me", 25_000),
            LeaseAction::Acquire
        );
        assert_eq!(
            lease_action(Some(&lease(None, 10_000)), "me", 0),
            LeaseAction::Acquire
        );
    }

    #[test]
    fn a_leader_stops_before_its_lease_can_expire() {
        assert!(!still_leader(None, 15_000, 2_000, 0));
        assert!(still_leader(Some(0), 15_000, 2_000, 12_999));
        assert!(!still_leader(Some(0), 15_000, 2_000, 13_000));
    }
}
