//! Liveness that costs O(pods), not O(sessions) (trap 17).
//!
//! A pod renews one lease, its instance's score in [`keys::INSTANCES`],
//! every upkeep tick: that is the liveness of every session it holds. The
//! owner records carry no lease of their own, so an idle connection costs
//! Redis nothing at rest. What a per-session lease used to do is done here
//! at the two moments it matters:
//!
//! * **An instance dies.** Some live pod sees its lapsed score in the
//!   heartbeat's reply, takes the instance's sweep lock, and removes the
//!   owner records that still name it (listed in the instance's session
//!   set, so no scan), then forgets the instance. Senders stop routing to
//!   it; its sessions' logs keep everything for the reconnect.
//! * **An instance was only late** (cut off from Redis, paused, starved for
//!   longer than the lease): its own heartbeat says its lease had lapsed.
//!   Its records may have been swept and its sessions claimed elsewhere, so
//!   it checks every local session once with VERIFY, the fence: moved
//!   sessions close 4409, swept-but-unclaimed ones are restored and catch
//!   up from the log, forgotten ones (Redis lost its data) are asked to
//!   reconnect. It waits for a running sweep of itself to finish first, so
//!   that a restored record is not swept again behind it.
//!
//! A takeover while both pods are live is told directly (the takeover
//! notice through the old owner's inbox, repaired by time if its routing
//! fails, `repair.rs`), as before.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures_util::future::join_all;
use rand::Rng;
use tokio::sync::Mutex;

use super::ownership::{Fence, Renewal, after_renewal};
use super::{RedisBus, keys, scripts};
use crate::bus::{Delivery, Holder, Result};
use crate::protocol::SessionId;

/// Shards of the session-set bookkeeping: SADD/SREM of one session are
/// serialised by its shard, different sessions proceed in parallel.
const MEMBER_SHARDS: usize = 64;
/// Sessions checked or swept per pipelined round.
const CHUNK: usize = 512;
/// Lapsed instances handled per heartbeat.
const DEAD_PER_HEARTBEAT: usize = 8;

/// This instance's session set in Redis, kept equal to the sessions it has
/// claimed and not released.
///
/// Two connections of one session may claim and release here in any order;
/// a per-session count decides when the session enters (first claim) and
/// leaves (last release) the set, and the shard's lock keeps the SADD or
/// SREM in the order of the counts, so the set never loses a session that
/// still has a claim here.
pub(super) struct InstanceMembers {
    hasher: RandomState,
    shards: [Mutex<HashMap<SessionId, u32>>; MEMBER_SHARDS],
}

impl Default for InstanceMembers {
    fn default() -> Self {
        Self {
            hasher: RandomState::new(),
            shards: std::array::from_fn(|_| Mutex::new(HashMap::new())),
        }
    }
}

impl InstanceMembers {
    fn shard(&self, session: &SessionId) -> &Mutex<HashMap<SessionId, u32>> {
        let i = self.hasher.hash_one(session) as usize % MEMBER_SHARDS;
        &self.shards[i]
    }
}

impl RedisBus {
    /// Puts the session in this instance's session set before its CLAIM, so
    /// a crash after the claim still leaves the record sweepable.
    pub(super) async fn add_member(&self, session: &SessionId) -> Result<()> {
        let mut shard = self.members.shard(session).lock().await;
        let count = shard.get(session).copied().unwrap_or(0);
        if count == 0 {
            let mut conn = self.conn.clone();
            self.call::<i64>(
                "sadd",
                redis::cmd("SADD")
                    .arg(keys::instance_sessions(&self.inst))
                    .arg(session.as_str())
                    .query_async(&mut conn),
            )
            .await?;
        }
        shard.insert(session.clone(), count + 1);
        Ok(())
    }

    /// Takes the session out of the set after its last local release. On
    /// failure the set keeps a session whose record is gone: a sweep skips
    /// it, and the set goes with the instance.
    pub(super) async fn remove_member(&self, session: &SessionId) {
        let mut shard = self.members.shard(session).lock().await;
        let Some(count) = shard.get_mut(session) else {
            return;
        };
        *count -= 1;
        if *count > 0 {
            return;
        }
        shard.remove(session);
        let mut conn = self.conn.clone();
        let _ = self
            .call::<i64>(
                "srem",
                redis::cmd("SREM")
                    .arg(keys::instance_sessions(&self.inst))
                    .arg(session.as_str())
                    .query_async(&mut conn),
            )
            .await;
    }

    /// One heartbeat: renews this instance's lease, verifies the local
    /// sessions when it had lapsed, and sweeps instances that died.
    #[tracing::instrument(level = "debug", skip_all)]
    pub(super) async fn heartbeat(&self) {
        let mut conn = self.conn.clone();
        let mut invocation = scripts::HEARTBEAT.prepare_invoke();
        invocation
            .key(keys::INSTANCES)
            .arg(&self.inst)
            .arg(self.lease_ms())
            .arg(DEAD_PER_HEARTBEAT);
        let Ok((lapsed, dead)): Result<(i64, Vec<String>)> = self
            .call("heartbeat", invocation.invoke_async(&mut conn))
            .await
        else {
            return; // Redis away: nothing learned; the next tick tries again
        };
        if lapsed != 0 {
            if lapsed == 1 {
                tracing::warn!(
                    "this pod's instance lease had lapsed (cut off from Redis or paused for longer than --session-lease-s); verifying its sessions"
                );
            }
            self.verify_pending.store(true, Ordering::Relaxed);
        }
        if self.verify_pending.load(Ordering::Relaxed) && self.verify_sessions().await {
            self.verify_pending.store(false, Ordering::Relaxed);
        }
        for inst in dead {
            if inst != self.inst {
                self.sweep_instance(&inst).await;
            }
        }
    }

    /// Checks every local session with VERIFY and applies the fence.
    /// Returns false if it must run again (Redis did not answer every
    /// check, or a sweep of this instance is still running).
    async fn verify_sessions(&self) -> bool {
        let mut conn = self.conn.clone();
        let sweeping: Result<bool> = self
            .call("exists", async {
                redis::cmd("EXISTS")
                    .arg(keys::sweep_lock(&self.inst))
                    .query_async(&mut conn)
                    .await
            })
            .await;
        match sweeping {
            Ok(false) => {}
            // Restoring now could be undone by the sweep still running.
            Ok(true) | Err(_) => return false,
        }
        let owned: Vec<(SessionId, Holder, u64)> = self
            .sessions
            .iter()
            .map(|e| (e.key().clone(), e.local.claim.holder, e.connected_at_ms))
            .collect();
        let mut complete = true;
        for chunk in owned.chunks(CHUNK) {
            let checks = chunk.iter().map(|(session, holder, at)| async move {
                let keys = keys::SessionKeys::new(session);
                let mut conn = self.conn.clone();
                let mut invocation = scripts::VERIFY.prepare_invoke();
                invocation
                    .key(&keys.owner)
                    .key(&keys.claim)
                    .arg(&self.pod.name)
                    .arg(&self.inst)
                    .arg(holder.conn)
                    .arg(*at);
                let reply = self
                    .call::<i64>("verify", invocation.invoke_async(&mut conn))
                    .await;
                (session, *holder, reply)
            });
            let mut kept = Vec::new();
            for (session, holder, reply) in join_all(checks).await {
                let Some(renewal) = reply.ok().and_then(Renewal::from_reply) else {
                    complete = false;
                    continue;
                };
                if matches!(renewal, Renewal::Renewed | Renewal::Restored) {
                    kept.push(session.as_str());
                }
                self.apply_renewal(session, holder, renewal);
            }
            // A sweep of this instance deleted its session set: put back
            // what it still holds, or its next death would leave these
            // records unswept.
            if !kept.is_empty() {
                let mut conn = self.conn.clone();
                let added: Result<i64> = self
                    .call(
                        "sadd",
                        redis::cmd("SADD")
                            .arg(keys::instance_sessions(&self.inst))
                            .arg(&kept)
                            .query_async(&mut conn),
                    )
                    .await;
                complete &= added.is_ok();
            }
        }
        complete
    }

    fn apply_renewal(&self, session: &SessionId, holder: Holder, renewal: Renewal) {
        if renewal != Renewal::Renewed {
            self.bus_metrics
                .ownership
                .with_label_values(&[renewal.label()])
                .inc();
        }
        let jitter = match renewal {
            Renewal::Lost => rand::rng().random_range(0..=self.opts.reconnect_jitter_ms),
            _ => 0,
        };
        match after_renewal(renewal, jitter) {
            Fence::Keep => {}
            Fence::CatchUp => {
                tracing::info!(%session, "owner record was swept and nobody claimed since; restored, catching up from the log");
                if let Some(owner) = self.sessions.get(session)
                    && owner.local.claim.holder == holder
                {
                    owner.mailbox.offer(&Arc::new(Delivery::resync(None)));
                }
            }
            Fence::Close(reason) => {
                if renewal == Renewal::Lost {
                    tracing::warn!(%session, "Redis has no record of this session's claim (data lost); asking the client to reconnect");
                } else {
                    tracing::info!(%session, "lost the session to a newer claim; closing 4409");
                }
                self.close_holder(session, holder, reason);
            }
        }
    }

    /// Removes the owner records of an instance whose lease lapsed, then
    /// forgets the instance. Under its sweep lock (one sweeper at a time,
    /// and the instance, if it comes back, waits for it); the lock is
    /// renewed every chunk, and the lapse is checked again after taking it.
    #[tracing::instrument(level = "info", skip(self))]
    async fn sweep_instance(&self, inst: &str) {
        let lock = keys::sweep_lock(inst);
        let lock_ms = self.lease_ms() * 2;
        let mut conn = self.conn.clone();
        let taken: Result<Option<String>> = self
            .call("set", async {
                redis::cmd("SET")
                    .arg(&lock)
                    .arg(&self.inst)
                    .arg("NX")
                    .arg("PX")
                    .arg(lock_ms)
                    .query_async(&mut conn)
                    .await
            })
            .await;
        if !matches!(taken, Ok(Some(_))) {
            return; // another pod sweeps it, or Redis is away
        }
        let mut still_lapsed = scripts::INSTANCE_LAPSED.prepare_invoke();
        still_lapsed.key(keys::INSTANCES).arg(inst);
        let lapsed: Result<i64> = self
            .call("instance_lapsed", still_lapsed.invoke_async(&mut conn))
            .await;
        if lapsed.as_ref().is_ok_and(|l| *l == 1) && self.sweep_records(inst, &lock).await {
            let mut forget = scripts::FORGET_INSTANCE.prepare_invoke();
            forget.key(keys::INSTANCES).arg(inst);
            let forgotten: Result<i64> = self
                .call("forget_instance", forget.invoke_async(&mut conn))
                .await;
            // An instance that came back meanwhile keeps its set.
            if matches!(forgotten, Ok(1)) {
                let _ = self
                    .call::<i64>(
                        "del",
                        redis::cmd("DEL")
                            .arg(keys::instance_sessions(inst))
                            .query_async(&mut conn),
                    )
                    .await;
            }
            self.bus_metrics
                .ownership
                .with_label_values(&["instance_swept"])
                .inc();
            tracing::info!(instance = inst, "swept a dead instance's sessions");
        }
        let mut unlock = scripts::UNLOCK.prepare_invoke();
        unlock.key(&lock).arg(&self.inst);
        let _ = self
            .call::<i64>("unlock", unlock.invoke_async(&mut conn))
            .await;
    }

    /// The record-removing half of a sweep; true once every session of the
    /// set was handled.
    async fn sweep_records(&self, inst: &str, lock: &str) -> bool {
        let set = keys::instance_sessions(inst);
        let mut conn = self.conn.clone();
        let mut cursor: u64 = 0;
        loop {
            let page: Result<(u64, Vec<String>)> = self
                .call("sscan", async {
                    redis::cmd("SSCAN")
                        .arg(&set)
                        .arg(cursor)
                        .arg("COUNT")
                        .arg(CHUNK)
                        .query_async(&mut conn)
                        .await
                })
                .await;
            let Ok((next, sessions)) = page else {
                return false;
            };
            let sweeps = sessions.iter().filter_map(|s| {
                let session = SessionId::parse(s).ok()?;
                Some(async move {
                    let keys = keys::SessionKeys::new(&session);
                    let mut conn = self.conn.clone();
                    let mut invocation = scripts::SWEEP.prepare_invoke();
                    invocation
                        .key(&keys.owner)
                        .key(&keys.claim)
                        .arg(inst)
                        .arg(super::ownership::CLAIM_MEMORY_MS);
                    self.call::<i64>("sweep", invocation.invoke_async(&mut conn))
                        .await
                })
            });
            let replies = join_all(sweeps).await;
            if replies.iter().any(|r| r.is_err()) {
                return false;
            }
            let removed = replies.iter().filter(|r| matches!(r, Ok(1))).count();
            self.bus_metrics
                .ownership
                .with_label_values(&["swept"])
                .inc_by(removed as u64);
            // Still ours? Refreshing a lock another sweeper took after ours
            // ran out would be harmless (SWEEP is idempotent), but a lock
            // that is gone lets the instance verify under us: stop then.
            let refreshed: Result<Option<String>> = self
                .call("set", async {
                    redis::cmd("SET")
                        .arg(lock)
                        .arg(&self.inst)
                        .arg("XX")
                        .arg("PX")
                        .arg(self.lease_ms() * 2)
                        .query_async(&mut conn)
                        .await
                })
                .await;
            if !matches!(refreshed, Ok(Some(_))) {
                return false;
            }
            if next == 0 {
                return true;
            }
            cursor = next;
        }
    }
}
