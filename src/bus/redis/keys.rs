//! Redis key layout.
//!
//! Every key of one session shares the hash tag `{s:<id>}` and every key of
//! one channel `{c:<name>}`, so that the scripts that append, trim, check
//! idempotency and read the owner touch one Redis Cluster slot (trap 4).
//! Session ids and channel names cannot contain `{` or `}`, so a tag can
//! never be split.

use crate::protocol::{ChannelName, SessionId};

/// The keys of one session.
pub struct SessionKeys {
    /// Stream: the session's durable log.
    pub log: String,
    /// String: offset of the newest entry ever appended (outlives trimming).
    pub head: String,
    /// Hash: pod, instance, connection, epoch and time of the live owner.
    /// Lives as long as its instance: released with the connection, or
    /// swept once the instance's lease in [`INSTANCES`] lapses.
    pub owner: String,
    /// String: the newest claim, `"<epoch> <instance> <conn> <pod>"`, or
    /// `"<epoch>"` once that claim was released. Outlives the owner record
    /// (release, sweep), so a holder whose record vanished can still tell
    /// "nobody claimed since" from "the session moved" (the fence).
    pub claim: String,
}

impl SessionKeys {
    pub fn new(session: &SessionId) -> Self {
        let tag = format!("wsf:{{s:{session}}}");
        Self {
            log: format!("{tag}:log"),
            head: format!("{tag}:head"),
            owner: format!("{tag}:owner"),
            claim: format!("{tag}:claim"),
        }
    }

    /// String: the offset an `Idempotency-Key` was given.
    pub fn idempotency(session: &SessionId, key: &str) -> String {
        format!("wsf:{{s:{session}}}:idem:{key}")
    }
}

/// The keys of one channel.
pub struct ChannelKeys {
    pub log: String,
    pub head: String,
    /// Sorted set: pods with subscribers, scored by when their membership expires.
    pub pods: String,
}

impl ChannelKeys {
    pub fn new(channel: &ChannelName) -> Self {
        let tag = format!("wsf:{{c:{channel}}}");
        Self {
            log: format!("{tag}:log"),
            head: format!("{tag}:head"),
            pods: format!("{tag}:pods"),
        }
    }

    pub fn idempotency(channel: &ChannelName, key: &str) -> String {
        format!("wsf:{{c:{channel}}}:idem:{key}")
    }
}

/// Stream: deliveries and control notices routed to one pod.
pub fn inbox(pod: &str) -> String {
    format!("wsf:inbox:{{{pod}}}")
}

/// Set: repair hints for one pod (logs whose routing to it failed), in
/// the inbox's slot.
pub fn repair(pod: &str) -> String {
    format!("wsf:repair:{{{pod}}}")
}

/// Set: logs routed to the pod's inbox since its last head check (`s:` +
/// session, `c:` + channel). Same slot as its inbox.
pub fn routed(pod: &str) -> String {
    format!("wsf:routed:{{{pod}}}")
}

/// String written just before each WAIT on the replica connection: WAIT
/// covers the writes of its own connection, so this write (made after the
/// appends it vouches for were acknowledged) carries their replication
/// offset to it.
pub fn replica_barrier(pod: &str) -> String {
    format!("wsf:replicas:{{{pod}}}")
}

/// String a pod writes to learn whether Redis accepts writes again after
/// an `-OOM`.
pub fn memory_probe(pod: &str) -> String {
    format!("wsf:memprobe:{{{pod}}}")
}

/// Sorted set: every live process instance (`inst` field), scored by when
/// its lease expires (Redis server clock). The one lease a pod renews: the
/// liveness of all its sessions (trap 17).
pub const INSTANCES: &str = "wsf:insts";

/// Set: the sessions an instance has claimed and not released, so the
/// owner records of a dead instance can be swept without a scan.
pub fn instance_sessions(inst: &str) -> String {
    format!("wsf:inst:{{{inst}}}:sessions")
}

/// String: held by the pod sweeping a dead instance (its own `inst`), in
/// the slot of that instance's session set. While it exists, the instance
/// (if it was only late, not dead) waits before it verifies its sessions.
pub fn sweep_lock(inst: &str) -> String {
    format!("wsf:inst:{{{inst}}}:sweep")
}

/// Hash: pod name -> JSON status with its expiry, for `GET /v1/fleet`.
pub const FLEET: &str = "wsf:fleet";

/// Hash: pod name -> the controller's newest order for it (JSON
/// [`crate::pod::Order`]). Pods read their field every upkeep tick.
pub const CONTROL: &str = "wsf:ctl";

/// Consumer group every pod uses on its own inbox.
pub const INBOX_GROUP: &str = "pod";

#[cfg(test)]
mod tests {
    use super::*;

    /// The part of a key Redis Cluster hashes.
    fn hash_tag(key: &str) -> &str {
        let open = key.find('{').expect("tag open");
        let close = key[open..].find('}').expect("tag close") + open;
        &key[open + 1..close]
    }

    #[test]
    fn every_key_of_a_session_or_channel_shares_one_slot() {
        let s = SessionId::parse("user:42").unwrap();
        let k = SessionKeys::new(&s);
        let idem = SessionKeys::idempotency(&s, "k{1}");
        for key in [&k.log, &k.head, &k.owner, &k.claim, &idem] {
            assert_eq!(hash_tag(key), "s:user:42", "{key}");
        }
        let c = ChannelName::parse("chat.room").unwrap();
        let k = ChannelKeys::new(&c);
        for key in [&k.log, &k.head, &k.pods, &ChannelKeys::idempotency(&c, "x")] {
            assert_eq!(hash_tag(key), "c:chat.room", "{key}");
        }
    }

    #[test]
    fn sessions_and_channels_of_the_same_name_do_not_collide() {
        let s = SessionKeys::new(&SessionId::parse("x").unwrap());
        let c = ChannelKeys::new(&ChannelName::parse("x").unwrap());
        assert_ne!(s.log, c.log);
        assert_ne!(s.head, c.head);
    }
}
