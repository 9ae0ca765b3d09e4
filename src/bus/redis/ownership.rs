//! Session ownership in cluster mode: claim, release, and the lease renewal
//! that fences stale holders (traps 3 and 15).
//!
//! Redis keeps two records per session (`keys.rs`): the leased owner record,
//! which routing reads, and the claim record, which outlives it and names
//! the newest claim. Both name the holder (process instance plus connection
//! id), which never repeats; the epoch only orders claims, because a
//! counter restarts when Redis loses it. CLAIM, VERIFY and RELEASE match
//! the holder, never the epoch. Liveness (one lease per instance, the sweep
//! of dead instances, and the check that fences a late one) is in
//! `liveness.rs`.
//!
//! This pod also keeps its own view: which local connection holds each
//! session. Two connections of one session claiming here at once may see
//! their CLAIM replies in either order, so [`incoming_is_newer`] decides
//! from what Redis answered, never from which await finished first.

use dashmap::mapref::entry::Entry;

use super::keys::SessionKeys;
use super::{RedisBus, scripts};
use crate::bus::{Claim, ConnId, Holder, Mailbox, Result};
use crate::protocol::close::CloseReason;
use crate::protocol::{Offset, SessionId};

/// How long a claim record outlives its release or its instance's death
/// (ms): the epoch keeps growing across reconnects within it. A pod cut off
/// from Redis for longer than this can no longer prove that nobody claimed
/// since (VERIFY answers -2 and the connection is asked to reconnect).
pub(super) const CLAIM_MEMORY_MS: u64 = 7 * 24 * 3600 * 1000;

/// The instance as Redis stores it (`inst` fields, the claim record).
pub(super) fn instance_field(instance: u64) -> String {
    format!("{instance:016x}")
}

/// A holder from the fields Redis stores; `None` if absent or malformed.
pub(super) fn parse_holder(instance: &str, conn: &str) -> Option<Holder> {
    Some(Holder {
        instance: u64::from_str_radix(instance, 16).ok()?,
        conn: conn.parse().ok()?,
    })
}

/// A claim as this pod knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct LocalClaim {
    pub claim: Claim,
    /// The holder this claim replaced in Redis, when Redis still knew one.
    pub displaced: Option<Holder>,
}

/// A session whose connection lives on this pod.
pub(super) struct LocalOwner {
    pub local: LocalClaim,
    pub mailbox: Mailbox,
    pub connected_at_ms: u64,
    /// The newest offset routed to the connection by the bus (not its
    /// replays): the head check compares it with the log's head.
    pub offered: Option<Offset>,
}

/// Whether `incoming` was claimed in Redis after `current` (two claims of
/// one session, both made by this pod), whichever reply arrived first.
///
/// Redis runs CLAIMs one at a time, and each returns the holder it
/// displaced: that chain is the proof of order. Without it (a claim made
/// while a third one sat in between), the epochs order them. Equal epochs
/// of different holders mean Redis lost both records between the two
/// claims; the connection accepted later is the one its client opened
/// last.
pub(super) fn incoming_is_newer(current: &LocalClaim, incoming: &LocalClaim) -> bool {
    if incoming.displaced == Some(current.claim.holder) {
        return true;
    }
    if current.displaced == Some(incoming.claim.holder) {
        return false;
    }
    if incoming.claim.epoch != current.claim.epoch {
        return incoming.claim.epoch > current.claim.epoch;
    }
    let order = |h: Holder| (h.instance, h.conn);
    order(incoming.claim.holder) > order(current.claim.holder)
}

/// What VERIFY found (see `scripts::VERIFY`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Renewal {
    /// Still the owner.
    Renewed,
    /// The owner record was swept and nobody claimed since: restored.
    Restored,
    /// Another connection claimed the session since.
    Taken,
    /// Redis has no trace of any claim: it lost its data.
    Lost,
}

impl Renewal {
    pub(super) fn from_reply(reply: i64) -> Option<Self> {
        match reply {
            1 => Some(Renewal::Renewed),
            2 => Some(Renewal::Restored),
            -1 => Some(Renewal::Taken),
            -2 => Some(Renewal::Lost),
            _ => None,
        }
    }

    pub(super) fn label(self) -> &'static str {
        match self {
            Renewal::Renewed => "renewed",
            Renewal::Restored => "renew_restored",
            Renewal::Taken => "renew_taken",
            Renewal::Lost => "renew_lost",
        }
    }
}

/// What the pod does with a live connection after its renewal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Fence {
    Keep,
    /// Routing skipped it for a while: catch up from the log.
    CatchUp,
    /// Close with this reason.
    Close(CloseReason),
}

/// The fence, as a rule: a connection whose session moved is closed 4409;
/// one whose ownership cannot be proven either way (Redis lost its data) is
/// asked to reconnect (`reconnect` + 1012 after a jittered delay), so that
/// it claims again, and its resume reports `gap` if history was lost. It
/// is never silently re-owned: that could take the session back from a
/// newer connection whose records were lost with it.
pub(super) fn after_renewal(renewal: Renewal, jitter_ms: u64) -> Fence {
    match renewal {
        Renewal::Renewed => Fence::Keep,
        Renewal::Restored => Fence::CatchUp,
        Renewal::Taken => Fence::Close(CloseReason::TakenOver),
        // The drain's close: same frames, same client behaviour (come back
        // after `after_ms`, with `last`).
        Renewal::Lost => Fence::Close(CloseReason::Drain {
            after_ms: jitter_ms,
        }),
    }
}

impl RedisBus {
    fn holder(&self, conn: ConnId) -> Holder {
        Holder {
            instance: self.instance,
            conn,
        }
    }

    pub(super) async fn claim_session(
        &self,
        session: &SessionId,
        mailbox: &Mailbox,
    ) -> Result<Claim> {
        let keys = SessionKeys::new(session);
        self.add_member(session).await?;
        let mut conn = self.conn.clone();
        let now = crate::bus::now_ms();
        let mut invocation = scripts::CLAIM.prepare_invoke();
        invocation
            .key(&keys.owner)
            .key(&keys.claim)
            .arg(&self.pod.name)
            .arg(&self.inst)
            .arg(mailbox.id)
            .arg(now);
        let claimed: Result<(u64, i64, String, String, String)> =
            self.call("claim", invocation.invoke_async(&mut conn)).await;
        let (epoch, live, prev_pod, prev_inst, prev_conn) = match claimed {
            Ok(reply) => reply,
            Err(e) => {
                // A timeout may have claimed after all: then the record
                // stays in Redis while the set forgets it (swept never,
                // replaced by the next claim of the session).
                self.remove_member(session).await;
                return Err(e);
            }
        };
        let claim = Claim {
            epoch,
            holder: self.holder(mailbox.id),
        };
        let local = LocalClaim {
            claim,
            displaced: parse_holder(&prev_inst, &prev_conn),
        };
        self.settle_locally(session, local, mailbox, now);
        self.bus_metrics
            .ownership
            .with_label_values(&["claimed"])
            .inc();
        // A displaced holder of another process may still be connected: with
        // an owner record (`live`) surely, with only an unreleased claim
        // record if its pod lost touch with Redis for longer than the lease.
        if !prev_pod.is_empty() && prev_inst != self.inst {
            tracing::debug!(%session, pod = prev_pod, live = live == 1, "taking the session over");
            self.notify_owner(&prev_pod, "x", session, &prev_inst, &prev_conn)
                .await;
        }
        Ok(claim)
    }

    /// Records a claim in this pod's view; the older of two local claims of
    /// the session is closed 4409, whichever finished its CLAIM first.
    fn settle_locally(
        &self,
        session: &SessionId,
        local: LocalClaim,
        mailbox: &Mailbox,
        connected_at_ms: u64,
    ) {
        let owner = LocalOwner {
            local,
            mailbox: mailbox.clone(),
            connected_at_ms,
            offered: None,
        };
        let loser = match self.sessions.entry(session.clone()) {
            Entry::Vacant(slot) => {
                slot.insert(owner);
                None
            }
            Entry::Occupied(mut slot) => {
                let current = slot.get().local;
                if current.claim.holder == local.claim.holder {
                    slot.insert(owner);
                    None
                } else if incoming_is_newer(&current, &local) {
                    Some(slot.insert(owner).mailbox)
                } else {
                    Some(mailbox.clone())
                }
            }
        };
        if let Some(loser) = loser {
            tracing::debug!(%session, conn = loser.id, "older local claim closed 4409");
            self.bus_metrics
                .ownership
                .with_label_values(&["superseded_locally"])
                .inc();
            loser.close(CloseReason::TakenOver);
        }
    }

    pub(super) async fn release_session(&self, session: &SessionId, claim: Claim) {
        self.sessions
            .remove_if(session, |_, o| o.local.claim.holder == claim.holder);
        // Always asked, even when this pod already let a newer local claim
        // replace this one: RELEASE only touches records naming this holder.
        let keys = SessionKeys::new(session);
        let mut conn = self.conn.clone();
        let mut invocation = scripts::RELEASE.prepare_invoke();
        invocation
            .key(&keys.owner)
            .key(&keys.claim)
            .arg(instance_field(claim.holder.instance))
            .arg(claim.holder.conn)
            .arg(CLAIM_MEMORY_MS);
        // On failure the record stays until the session's next claim, or
        // until this instance dies and is swept.
        let _ = self
            .call::<i64>("release", invocation.invoke_async(&mut conn))
            .await;
        self.remove_member(session).await;
    }

    /// Closes the local connection of `session` if it is `holder`'s.
    pub(super) fn close_holder(&self, session: &SessionId, holder: Holder, reason: CloseReason) {
        if holder.instance != self.instance {
            return;
        }
        // Only closed here: the connection's own release then removes it
        // and deletes the owner record.
        if let Some(owner) = self.sessions.get(session)
            && owner.local.claim.holder == holder
        {
            owner.mailbox.close(reason);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(conn: ConnId, epoch: u64, displaced: Option<ConnId>) -> LocalClaim {
        let holder = |conn| Holder { instance: 7, conn };
        LocalClaim {
            claim: Claim {
                epoch,
                holder: holder(conn),
            },
            displaced: displaced.map(holder),
        }
    }

    /// Applies claim replies to an empty local view in the given order, as
    /// `settle_locally` does; returns the survivor and who was closed.
    fn settle(order: &[LocalClaim]) -> (ConnId, Vec<ConnId>) {
        let mut current: Option<LocalClaim> = None;
        let mut closed = Vec::new();
        for incoming in order {
            match current {
                None => current = Some(*incoming),
                Some(c) if incoming_is_newer(&c, incoming) => {
                    closed.push(c.claim.holder.conn);
                    current = Some(*incoming);
                }
                Some(_) => closed.push(incoming.claim.holder.conn),
            }
        }
        (current.expect("one claim").claim.holder.conn, closed)
    }

    fn permutations(items: &[LocalClaim]) -> Vec<Vec<LocalClaim>> {
        if items.len() <= 1 {
            return vec![items.to_vec()];
        }
        let mut all = Vec::new();
        for i in 0..items.len() {
            let mut rest = items.to_vec();
            let first = rest.remove(i);
            for mut tail in permutations(&rest) {
                tail.insert(0, first);
                all.push(tail);
            }
        }
        all
    }

    #[test]
    fn the_claim_redis_ran_last_wins_whatever_order_the_replies_arrive_in() {
        // Each case: the claims in the order Redis ran them (the last one
        // is the owner Redis names), with what CLAIM returned for each.
        let cases: &[(&str, Vec<LocalClaim>)] = &[
            ("two claims", vec![claim(1, 5, None), claim(2, 6, Some(1))]),
            (
                "three claims, chain of displacements",
                vec![
                    claim(1, 5, None),
                    claim(2, 6, Some(1)),
                    claim(3, 7, Some(2)),
                ],
            ),
            (
                "epoch record lost in between: the displacement still orders them",
                vec![claim(1, 9, None), claim(2, 1, Some(1))],
            ),
            (
                "a later connection claimed first (conn ids do not order claims)",
                vec![claim(5, 3, None), claim(4, 4, Some(5))],
            ),
            (
                "all records lost between the claims: the later connection wins",
                vec![claim(1, 1, None), claim(2, 1, None)],
            ),
        ];
        for (what, claims) in cases {
            let newest = claims.last().expect("claims").claim.holder.conn;
            for order in permutations(claims) {
                let (survivor, closed) = settle(&order);
                let seen: Vec<ConnId> = order.iter().map(|c| c.claim.holder.conn).collect();
                assert_eq!(survivor, newest, "{what}: replies in order {seen:?}");
                assert_eq!(closed.len(), claims.len() - 1, "{what}: {seen:?}");
                assert!(!closed.contains(&newest), "{what}: {seen:?}");
            }
        }
    }

    #[test]
    fn the_fence_closes_moved_sessions_4409_and_asks_lost_ones_to_reconnect() {
        let cases = [
            (Renewal::Renewed, Fence::Keep),
            (Renewal::Restored, Fence::CatchUp),
            (Renewal::Taken, Fence::Close(CloseReason::TakenOver)),
            (
                Renewal::Lost,
                Fence::Close(CloseReason::Drain { after_ms: 321 }),
            ),
        ];
        for (renewal, want) in cases {
            assert_eq!(after_renewal(renewal, 321), want, "{renewal:?}");
        }
        // "Reconnect", not "taken over": a 4409 client does not come back.
        assert_eq!(CloseReason::Drain { after_ms: 0 }.code(), 1012);
        assert_eq!(Renewal::from_reply(0), None);
    }

    #[test]
    fn holders_round_trip_through_redis_fields() {
        let h = Holder {
            instance: 0x00ab_cdef_0123_4567,
            conn: 42,
        };
        let inst = instance_field(h.instance);
        assert_eq!(inst.len(), 16);
        assert_eq!(parse_holder(&inst, "42"), Some(h));
        assert_eq!(parse_holder("", ""), None);
        assert_eq!(parse_holder("zz", "1"), None);
    }
}
