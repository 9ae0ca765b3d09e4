//! The fleet registry as the controller reads and writes it: each pod's
//! report (`wsf:fleet`, written by the pods' upkeep) and the controller's
//! newest order per pod (`wsf:ctl`, read by the pods' upkeep). The key
//! layout stays in `keys.rs`; this is the controller's only door to it.

use std::collections::HashMap;
use std::time::Duration;

use redis::AsyncCommands;

use super::conn::{Conn, Target};
use super::keys;
use crate::bus::{BusError, Result, now_ms};
use crate::pod::{Order, PodStatus};

/// One pod's entry, when it has not expired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodReport {
    pub status: PodStatus,
    /// Until when the report counts (the pod renews it every lease/3).
    pub expires_ms: u64,
}

pub struct FleetRegistry {
    conn: Conn,
}

impl FleetRegistry {
    pub async fn connect(target: Target, timeout: Duration) -> Result<Self> {
        let conn = target
            .connect(timeout)
            .await
            .map_err(|e| BusError::Unavailable(e.to_string()))?;
        Ok(Self { conn })
    }

    /// Every pod's live report, by pod name. Expired and unreadable
    /// entries are left out: a pod without a report is unknown, and the
    /// caller must treat it so.
    pub async fn reports(&self) -> Result<HashMap<String, PodReport>> {
        let mut conn = self.conn.clone();
        let all: HashMap<String, String> = conn
            .hgetall(keys::FLEET)
            .await
            .map_err(|e| BusError::Unavailable(e.to_string()))?;
        Ok(parse_reports(all, now_ms()))
    }

    /// Replaces the pod's order (a pod runs each order id once).
    pub async fn send_order(&self, pod: &str, order: &Order) -> Result<()> {
        let json =
            serde_json::to_string(order).map_err(|e| BusError::Unavailable(e.to_string()))?;
        let mut conn = self.conn.clone();
        conn.hset::<_, _, _, i64>(keys::CONTROL, pod, json)
            .await
            .map_err(|e| BusError::Unavailable(e.to_string()))?;
        Ok(())
    }

    /// Removes orders of pods that are gone.
    pub async fn forget_orders(&self, pods: &[String]) -> Result<()> {
        if pods.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn.clone();
        conn.hdel::<_, _, i64>(keys::CONTROL, pods)
            .await
            .map_err(|e| BusError::Unavailable(e.to_string()))?;
        Ok(())
    }

    /// Pods that have an order stored.
    pub async fn ordered_pods(&self) -> Result<Vec<String>> {
        let mut conn = self.conn.clone();
        conn.hkeys(keys::CONTROL)
            .await
            .map_err(|e| BusError::Unavailable(e.to_string()))
    }
}

/// The fleet hash's entries that are readable and not expired at `now_ms`.
pub fn parse_reports(all: HashMap<String, String>, now_ms: u64) -> HashMap<String, PodReport> {
    all.into_iter()
        .filter_map(|(name, json)| {
            let v: serde_json::Value = serde_json::from_str(&json).ok()?;
            let status: PodStatus = serde_json::from_value(v.get("status")?.clone()).ok()?;
            let expires_ms = v.get("expires_ms")?.as_u64()?;
            (expires_ms > now_ms && status.pod == name)
                .then_some((name, PodReport { status, expires_ms }))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expired_unreadable_and_misfiled_reports_are_unknown() {
        let entry = |pod: &str, expires: u64| {
            format!(
                r#"{{"status":{{"pod":"{pod}","connections":3,"capacity":9,"draining":false,"shedding":true}},"expires_ms":{expires}}}"#
            )
        };
        let all = HashMap::from([
            ("fresh".to_string(), entry("fresh", 2_000)),
            ("stale".to_string(), entry("stale", 1_000)),
            ("junk".to_string(), "{not json".to_string()),
            ("other".to_string(), entry("someone-else", 2_000)),
        ]);
        let reports = parse_reports(all, 1_000);
        assert_eq!(reports.len(), 1, "{reports:?}");
        let fresh = &reports["fresh"];
        assert_eq!(fresh.status.connections, 3);
        assert!(fresh.status.shedding);
    }
}
