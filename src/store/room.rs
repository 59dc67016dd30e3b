//! Waiting rooms as a store sees them: one call per decision ([`RoomCall`]), what the store
//! decided ([`RoomReply`]), the keys ([`room_key`]) and the embedded store's rooms
//! ([`LocalRooms`]; `lua/room.lua` makes the same decisions on the Redis server's clock).
//!
//! A room is four keys, all with the hash tag `{room:<route>}` (one Redis Cluster slot):
//!
//! | key | type | meaning |
//! |---|---|---|
//! | `<prefix>:{room:<r>}:queue` | sorted set id → score | the queue, lowest score first: FIFO = arrival number (`seq`, so two arrivals in one millisecond never tie), random = a random draw, pre-queue shuffled = a random draw below zero |
//! | `<prefix>:{room:<r>}:seen` | sorted set id → ms | a queued place's last poll; a place idle for a session is dropped |
//! | `<prefix>:{room:<r>}:active` | sorted set id → expiry ms | admitted sessions; expired ones pruned by every call |
//! | `<prefix>:{room:<r>}:state` | hash | `mode` (`open`/`paused`/`draining`), `seq` (places made), `tat` (the admission pace, GCRA), `shuffled` (the start it was done for), `admitted`, per-minute counters |
//!
//! A visit: prune, shuffle the pre-queue once if its start has passed, find the visitor's
//! place (or make a new one at the back), and admit it when the room is open, the pre-queue
//! is over, the place's rank is below the free sessions (`total_active` minus active) and the
//! pace has a token (one every `60 s / new_per_minute`, at most a sixth of a minute's worth
//! at once). An admitted place leaves the queue and becomes an active session: a queued
//! cookie whose place is gone (admitted, or idle too long) gets a new place at the back, so a
//! copied queued cookie never admits twice.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

use super::StoreError;

/// 2^52: random scores are drawn below it (exact in a double); shuffled ones sit below zero.
pub const RANDOM_SPAN: u64 = 1 << 52;
/// Most idle places one call drops (bounded work per call; the rest go on later calls).
const PRUNE_MAX: usize = 1000;

/// A room's rules, as each call carries them (from the config: no state in the store).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomRules {
    /// The room's part of every key ([`crate::store::limits::route_tag`] of its route).
    pub room: String,
    pub total_active: u32,
    pub new_per_minute: u32,
    pub session_ms: u64,
    /// Random order rather than FIFO.
    pub random: bool,
    /// The pre-queue: from, start (Unix ms).
    pub prequeue: Option<(u64, u64)>,
}

impl RoomRules {
    /// Milliseconds between admissions (the pace).
    pub fn period_ms(&self) -> f64 {
        60_000.0 / f64::from(self.new_per_minute.max(1))
    }
    /// Admissions the pace lets through at once: a sixth of a minute's worth, at least 1.
    pub fn burst(&self) -> u32 {
        (self.new_per_minute / 6).max(1)
    }
}

/// The operator's say over a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RoomMode {
    /// Admitting from the queue.
    Open,
    /// Admitting no one new; sessions go on (and are extended as they are used).
    Paused,
    /// Admitting no one new; sessions are no longer extended, so they all end within a
    /// session; new visitors queue.
    Draining,
}

impl RoomMode {
    pub fn as_str(self) -> &'static str {
        match self {
            RoomMode::Open => "open",
            RoomMode::Paused => "paused",
            RoomMode::Draining => "draining",
        }
    }
    pub fn parse(s: &str) -> Option<RoomMode> {
        match s {
            "" | "open" => Some(RoomMode::Open),
            "paused" => Some(RoomMode::Paused),
            "draining" => Some(RoomMode::Draining),
            _ => None,
        }
    }
}

/// One decision about a room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoomCall {
    /// A visitor without a valid active cookie: `place` is the id of its verified queued
    /// cookie, if any; `new_id` the id a new place gets; `draw` its random score (random
    /// order); `seed` keys the pre-queue shuffle, should this call be the one to run it.
    Visit {
        place: Option<String>,
        new_id: String,
        draw: u64,
        seed: String,
    },
    /// An active visitor past half its session: extend it (unless draining or gone).
    Refresh { id: String },
    /// Counts for the operator.
    Status,
    /// Pause, resume or drain.
    SetMode(RoomMode),
}

/// What the store decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoomReply {
    /// Let in: a session `id` until `expires_ms`.
    Admitted {
        id: String,
        expires_ms: u64,
    },
    /// Holds place `id` at `position` (1-based) of `queued`; `new`: the place was made now.
    Queued {
        id: String,
        new: bool,
        position: u64,
        status: RoomStatus,
    },
    /// The session now ends at `expires_ms`; `None`: not extended (draining, or gone).
    Refreshed {
        expires_ms: Option<u64>,
    },
    Status(RoomStatus),
}

/// A room's counts at one instant of the store's clock.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RoomStatus {
    pub queued: u64,
    pub active: u64,
    pub admitted_total: u64,
    /// Admissions in the last full minute of the store's clock.
    pub admitted_last_minute: u64,
    pub mode: RoomMode,
    /// The store's clock, Unix ms.
    pub now_ms: u64,
}

/// The one function that builds a room's keys: `<prefix>:{room:<room>}:<part>`.
pub fn room_key(prefix: &str, room: &str, part: &str) -> String {
    format!("{prefix}:{{room:{room}}}:{part}")
}

/// A queued place's score after the pre-queue shuffle: a draw keyed by `seed` and the id,
/// below zero so every later arrival (FIFO: a time; random: a draw in `[0, 2^52)`) queues
/// behind. (`room.lua` draws from SHA-1 the same way; the two stores need not agree.)
fn shuffled_score(seed: &str, id: &str) -> i64 {
    let d = Sha256::digest(format!("{seed}{id}").as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    let draw = u64::from_be_bytes(b) >> 12;
    i64::try_from(draw).unwrap_or(0) - i64::try_from(RANDOM_SPAN).unwrap_or(0)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// One room in the embedded store: the twin of the four Redis keys.
#[derive(Debug, Default)]
struct LocalRoom {
    queue: BTreeSet<(i64, String)>,
    score: HashMap<String, i64>,
    seen: BTreeSet<(u64, String)>,
    seen_at: HashMap<String, u64>,
    active: BTreeSet<(u64, String)>,
    expires: HashMap<String, u64>,
    mode: Option<RoomMode>,
    /// Places made so far: a FIFO place's score (arrival order, never a tie).
    seq: u64,
    tat: f64,
    shuffled: Option<u64>,
    admitted: u64,
    minute: u64,
    minute_n: u64,
    last_minute_n: u64,
}

impl LocalRoom {
    fn drop_place(&mut self, id: &str) {
        if let Some(s) = self.score.remove(id) {
            self.queue.remove(&(s, id.to_owned()));
        }
        if let Some(t) = self.seen_at.remove(id) {
            self.seen.remove(&(t, id.to_owned()));
        }
    }

    fn set_active(&mut self, id: &str, until: u64) {
        if let Some(old) = self.expires.insert(id.to_owned(), until) {
            self.active.remove(&(old, id.to_owned()));
        }
        self.active.insert((until, id.to_owned()));
    }

    fn touch(&mut self, id: &str, now: u64) {
        if let Some(old) = self.seen_at.insert(id.to_owned(), now) {
            self.seen.remove(&(old, id.to_owned()));
        }
        self.seen.insert((now, id.to_owned()));
    }

    /// Drops expired sessions and places idle for a session.
    fn prune(&mut self, now: u64, session_ms: u64) {
        while let Some((t, id)) = self.active.first().cloned() {
            if t > now {
                break;
            }
            self.active.remove(&(t, id.clone()));
            self.expires.remove(&id);
        }
        let idle_before = now.saturating_sub(session_ms);
        for _ in 0..PRUNE_MAX {
            match self.seen.first().cloned() {
                Some((t, id)) if t < idle_before => self.drop_place(&id),
                _ => break,
            }
        }
    }

    fn minute_roll(&mut self, now: u64) {
        let m = now / 60_000;
        if m != self.minute {
            self.last_minute_n = if m == self.minute + 1 {
                self.minute_n
            } else {
                0
            };
            self.minute = m;
            self.minute_n = 0;
        }
    }

    fn status(&mut self, now: u64) -> RoomStatus {
        self.minute_roll(now);
        RoomStatus {
            queued: self.queue.len() as u64,
            active: self.active.len() as u64,
            admitted_total: self.admitted,
            admitted_last_minute: self.last_minute_n,
            mode: self.mode.unwrap_or(RoomMode::Open),
            now_ms: now,
        }
    }

    /// The session end for a session starting `now`: never past the pre-queue's opening
    /// (a visitor let in before it holds no session into the sale).
    fn session_end(rules: &RoomRules, now: u64) -> u64 {
        let end = now.saturating_add(rules.session_ms);
        match rules.prequeue {
            Some((from, _)) if now < from => end.min(from),
            _ => end,
        }
    }

    fn decide(&mut self, rules: &RoomRules, call: &RoomCall, now: u64) -> RoomReply {
        self.prune(now, rules.session_ms);
        let mode = self.mode.unwrap_or(RoomMode::Open);
        match call {
            RoomCall::Status => RoomReply::Status(self.status(now)),
            RoomCall::SetMode(m) => {
                self.mode = Some(*m);
                RoomReply::Status(self.status(now))
            }
            RoomCall::Refresh { id } => {
                let live = self.expires.contains_key(id);
                if !live || mode == RoomMode::Draining {
                    return RoomReply::Refreshed { expires_ms: None };
                }
                let until = Self::session_end(rules, now);
                self.set_active(id, until);
                RoomReply::Refreshed {
                    expires_ms: Some(until),
                }
            }
            RoomCall::Visit {
                place,
                new_id,
                draw,
                seed,
            } => {
                let mut prequeue = false;
                if let Some((from, start)) = rules.prequeue {
                    prequeue = now >= from && now < start;
                    if now >= start && self.shuffled != Some(start) {
                        let ids: Vec<String> = self.score.keys().cloned().collect();
                        self.queue.clear();
                        for id in ids {
                            let s = shuffled_score(seed, &id);
                            self.score.insert(id.clone(), s);
                            self.queue.insert((s, id));
                        }
                        self.shuffled = Some(start);
                    }
                }
                let (id, new) = match place {
                    Some(p) if self.score.contains_key(p) => (p.clone(), false),
                    _ => {
                        self.seq += 1;
                        let s = if rules.random {
                            i64::try_from(draw % RANDOM_SPAN).unwrap_or(0)
                        } else {
                            i64::try_from(self.seq).unwrap_or(i64::MAX)
                        };
                        self.score.insert(new_id.clone(), s);
                        self.queue.insert((s, new_id.clone()));
                        (new_id.clone(), true)
                    }
                };
                let score = self.score.get(&id).copied().unwrap_or(0);
                let rank = self.queue.range(..(score, id.clone())).count() as u64;
                let free = u64::from(rules.total_active).saturating_sub(self.active.len() as u64);
                if mode == RoomMode::Open && !prequeue && rank < free {
                    // The pace's tokens now: a place is let in only if there is one for it
                    // and for every place ahead of it (as with the free sessions): no place
                    // takes a session one ahead of it could not also have.
                    let period = rules.period_ms();
                    let tolerance = period * f64::from(rules.burst());
                    let base = self.tat.max(now as f64);
                    let tokens = ((now as f64 + tolerance - base) / period).floor();
                    if (rank as f64) < tokens {
                        let next = base + period;
                        self.tat = next;
                        self.drop_place(&id);
                        let until = Self::session_end(rules, now);
                        self.set_active(&id, until);
                        self.admitted += 1;
                        self.minute_roll(now);
                        self.minute_n += 1;
                        return RoomReply::Admitted {
                            id,
                            expires_ms: until,
                        };
                    }
                }
                self.touch(&id, now);
                RoomReply::Queued {
                    id,
                    new,
                    position: rank + 1,
                    status: self.status(now),
                }
            }
        }
    }
}

/// The embedded store's rooms: one process, so "shared" is this process's (the same
/// decisions `room.lua` makes for a fleet). A std mutex: a few set operations per call,
/// never held across an `.await`.
#[derive(Debug, Default)]
pub(crate) struct LocalRooms {
    rooms: Mutex<HashMap<String, LocalRoom>>,
}

impl LocalRooms {
    fn rooms(&self) -> MutexGuard<'_, HashMap<String, LocalRoom>> {
        self.rooms.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn call(&self, rules: &RoomRules, call: &RoomCall) -> Result<RoomReply, StoreError> {
        validate(rules)?;
        let mut rooms = self.rooms();
        let room = rooms.entry(rules.room.clone()).or_default();
        Ok(room.decide(rules, call, now_ms()))
    }
}

/// Refuses rules no script should be sent.
pub(crate) fn validate(rules: &RoomRules) -> Result<(), StoreError> {
    if rules.total_active == 0 || rules.new_per_minute == 0 || rules.session_ms == 0 {
        return Err(StoreError::Invalid(
            "a room needs total_active, new_per_minute and a session above zero".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(total: u32) -> RoomRules {
        RoomRules {
            room: "r".into(),
            total_active: total,
            new_per_minute: 60_000,
            session_ms: 10_000,
            random: false,
            prequeue: None,
        }
    }

    fn visit(
        room: &mut LocalRoom,
        r: &RoomRules,
        place: Option<&str>,
        id: &str,
        now: u64,
    ) -> RoomReply {
        room.decide(
            r,
            &RoomCall::Visit {
                place: place.map(str::to_owned),
                new_id: id.into(),
                draw: 0,
                seed: "s".into(),
            },
            now,
        )
    }

    #[test]
    fn the_first_are_let_in_the_rest_queue_in_order_and_a_place_admits_once() {
        let r = rules(2);
        let mut room = LocalRoom::default();
        let t = 1_000_000;
        assert!(matches!(
            visit(&mut room, &r, None, "a", t),
            RoomReply::Admitted { .. }
        ));
        assert!(matches!(
            visit(&mut room, &r, None, "b", t),
            RoomReply::Admitted { .. }
        ));
        for (i, id) in ["c", "d", "e"].iter().enumerate() {
            let RoomReply::Queued { position, new, .. } =
                visit(&mut room, &r, None, id, t + i as u64)
            else {
                panic!("queued");
            };
            assert_eq!((position, new), (i as u64 + 1, true));
        }
        // Sessions end: c then d are let in, in their order; e stays second... then first.
        let later = t + 10_000;
        let RoomReply::Queued { position, .. } = visit(&mut room, &r, Some("e"), "x", later) else {
            panic!("e is third");
        };
        assert_eq!(position, 3);
        assert!(matches!(
            visit(&mut room, &r, Some("c"), "x", later),
            RoomReply::Admitted { .. }
        ));
        // c's queued cookie again: its place is gone, so a new one at the back.
        let RoomReply::Queued {
            id, new, position, ..
        } = visit(&mut room, &r, Some("c"), "y", later)
        else {
            panic!("a used place does not admit twice");
        };
        assert_eq!((id.as_str(), new, position), ("y", true, 3));
    }

    #[test]
    fn a_session_started_before_the_prequeue_ends_at_its_start() {
        let mut r = rules(10);
        r.prequeue = Some((5_000, 9_000));
        let mut room = LocalRoom::default();
        let RoomReply::Admitted { expires_ms, .. } = visit(&mut room, &r, None, "a", 1_000) else {
            panic!("let in before the pre-queue");
        };
        assert_eq!(expires_ms, 5_000, "not 1_000 + 10_000");
        // Nor does extending it carry it past the pre-queue's start.
        let RoomReply::Refreshed { expires_ms } =
            room.decide(&r, &RoomCall::Refresh { id: "a".into() }, 4_000)
        else {
            panic!("refreshed");
        };
        assert_eq!(expires_ms, Some(5_000));
        // During the pre-queue nobody is let in, though sessions are free.
        assert!(matches!(
            visit(&mut room, &r, None, "b", 6_000),
            RoomReply::Queued { position: 1, .. }
        ));
    }

    #[test]
    fn the_prequeue_is_shuffled_once_and_later_arrivals_queue_behind() {
        let mut r = rules(10);
        r.prequeue = Some((1_000, 2_000));
        let mut room = LocalRoom::default();
        for i in 0..50 {
            let id = format!("{i:02}");
            assert!(matches!(
                visit(&mut room, &r, None, &id, 1_500 + i),
                RoomReply::Queued { .. }
            ));
        }
        let RoomReply::Queued { .. } = visit(&mut room, &r, None, "late", 1_999) else {
            panic!("still before the start");
        };
        // At the start: the first visit shuffles everyone, and admits per the pace.
        let first = visit(&mut room, &r, None, "after", 2_000);
        assert!(
            matches!(first, RoomReply::Queued { position: 52, .. }),
            "{first:?}"
        );
        let order: Vec<String> = room.queue.iter().map(|(_, id)| id.clone()).collect();
        assert_eq!(order.last().map(String::as_str), Some("after"));
        let before: Vec<String> = (0..50).map(|i| format!("{i:02}")).collect();
        assert_ne!(&order[..50], &before[..], "shuffled");
        assert_eq!(room.shuffled, Some(2_000));
    }
}
