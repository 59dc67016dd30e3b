//! Global rate limits as a store sees them: the buckets of one request ([`LimitCheck`]), what
//! the store decided ([`LimitVerdict`]), the keys ([`limit_key`]) and the GCRA both stores
//! run ([`gcra`]; `lua/gcra.lua` is the same arithmetic on the Redis server).
//!
//! GCRA ("generic cell rate algorithm", what governor runs in-process) keeps one number per
//! bucket: the theoretical arrival time `tat`. A bucket of one token every `period` with
//! `burst` saved up admits a request at `now` when `max(tat, now) + period - burst × period
//! <= now`, and then moves `tat` to `max(tat, now) + period`. A request that is refused
//! changes nothing and learns how long to wait. Time is in microseconds: from the Redis
//! server's clock (`TIME`) on Redis, so instances whose clocks drift still share one bucket.
//!
//! One request may have up to three global buckets (per-IP, per-user, route). They are
//! decided together, all or nothing: a request refused by one bucket takes no token from the
//! others (the envoyproxy/ratelimit #427 lesson), and it costs one store call.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::{StoreError, UserId};

/// Most buckets one request asks about (per-IP, per-user, route).
pub const MAX_BUCKETS: usize = 3;

/// Longest wait a bucket can hold, in microseconds (about 35 years): keeps `period × burst`
/// well inside the 2^53 a Lua number counts exactly.
const MAX_TOLERANCE_US: u64 = 1 << 50;

/// The global buckets one request must pass, all of one route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitCheck {
    /// The route's part of every key, from [`route_tag`]: all of a route's buckets share it,
    /// so on a Redis Cluster they live in one slot and one script call may touch them all.
    pub route: String,
    pub buckets: Vec<LimitBucket>,
}

/// One bucket: which one ([`LimitBucket::route`], [`LimitBucket::per_ip`],
/// [`LimitBucket::per_user`]) and its rate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitBucket {
    /// The key below the route's tag: `route`, `per_ip:<ip>`, `per_user:<hash>`.
    pub key: String,
    /// One token every `period`…
    pub period: Duration,
    /// …at most `burst` saved up.
    pub burst: NonZeroU32,
}

impl LimitBucket {
    /// The route's one shared bucket.
    pub fn route(period: Duration, burst: NonZeroU32) -> Self {
        LimitBucket {
            key: "route".into(),
            period,
            burst,
        }
    }

    /// A client address's bucket (the address as text: bounded and checked by its type).
    pub fn per_ip(ip: IpAddr, period: Duration, burst: NonZeroU32) -> Self {
        LimitBucket {
            key: format!("per_ip:{ip}"),
            period,
            burst,
        }
    }

    /// A user's bucket. The id is hashed (SHA-256, 128 bits kept): the key has a fixed
    /// length whatever the id, and Redis never holds user ids in the clear for this.
    pub fn per_user(user: &UserId, period: Duration, burst: NonZeroU32) -> Self {
        LimitBucket {
            key: format!("per_user:{}", short_hash(user.as_str())),
            period,
            burst,
        }
    }

    /// `period` in whole microseconds, at least 1 (a rate past a million a second counts as
    /// a million).
    pub fn period_us(&self) -> u64 {
        u64::try_from(self.period.as_micros())
            .unwrap_or(u64::MAX)
            .clamp(1, MAX_TOLERANCE_US)
    }

    /// `period × burst` in microseconds: how far `tat` may run ahead of now.
    pub fn tolerance_us(&self) -> u64 {
        self.period_us()
            .saturating_mul(u64::from(self.burst.get()))
            .min(MAX_TOLERANCE_US)
    }
}

/// What the store decided for a [`LimitCheck`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitVerdict {
    /// Every bucket had a token; each gave one.
    Allowed,
    /// `bucket` (an index into [`LimitCheck::buckets`], the one with the longest wait) has no
    /// token for `retry_after`; no bucket gave one.
    Limited {
        bucket: usize,
        retry_after: Duration,
    },
}

/// The route's part of a key: its name when that is plain (`[A-Za-z0-9._-]`, at most 64
/// bytes), else `#` and a hash of it (a name with `{`, `}` or spaces would break the hash tag
/// or the key; `#` never starts a plain name, so the two forms never meet).
pub fn route_tag(name: &str) -> String {
    let plain = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if plain {
        name.to_owned()
    } else {
        format!("#{}", short_hash(name))
    }
}

/// The one function that builds a global limit's key: `<prefix>:{limit:<route>}:<bucket>`,
/// e.g. `fg:{limit:flash-buy}:per_user:3f…`. The braces are a Redis Cluster hash tag: every
/// bucket of a route hashes to one slot. A prefix holds no brace (checked at start).
pub fn limit_key(prefix: &str, route: &str, bucket: &str) -> String {
    format!("{prefix}:{{limit:{route}}}:{bucket}")
}

/// 128 bits of SHA-256, as 32 lowercase hex digits.
fn short_hash(s: &str) -> String {
    let digest = Sha256::digest(s.as_bytes());
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
}

/// Refuses a check no script should be sent: no bucket, or more than [`MAX_BUCKETS`].
pub(crate) fn validate_check(check: &LimitCheck) -> Result<(), StoreError> {
    if check.buckets.is_empty() || check.buckets.len() > MAX_BUCKETS {
        return Err(StoreError::Invalid(format!(
            "a limit check has 1 to {MAX_BUCKETS} buckets, got {}",
            check.buckets.len()
        )));
    }
    Ok(())
}

/// One bucket's GCRA step at `now_us`, with `tat_us` its stored state (0: none): the new
/// state if the bucket has a token, else how many microseconds until it has one.
pub fn gcra(tat_us: u64, now_us: u64, period_us: u64, tolerance_us: u64) -> Result<u64, u64> {
    let next = tat_us.max(now_us).saturating_add(period_us);
    let allow_at = next.saturating_sub(tolerance_us);
    if allow_at > now_us {
        Err(allow_at - now_us)
    } else {
        Ok(next)
    }
}

/// Decides `check` at `now_us`, all or nothing, with `tat(i)` the stored state of bucket `i`:
/// each bucket's new state (in order), or the bucket with the longest wait and that wait.
/// The embedded store runs this; `gcra.lua` does the same on the Redis server.
fn decide(
    check: &LimitCheck,
    now_us: u64,
    mut tat: impl FnMut(usize) -> u64,
) -> Result<[u64; MAX_BUCKETS], (usize, u64)> {
    let mut next = [0u64; MAX_BUCKETS];
    let mut worst: Option<(usize, u64)> = None;
    for (i, b) in check.buckets.iter().enumerate().take(MAX_BUCKETS) {
        match gcra(tat(i), now_us, b.period_us(), b.tolerance_us()) {
            Ok(t) => next[i] = t,
            Err(wait) if worst.is_none_or(|(_, w)| wait > w) => worst = Some((i, wait)),
            Err(_) => {}
        }
    }
    worst.map_or(Ok(next), Err)
}

/// The embedded store's global limits: one process, so "global" is this process's GCRA (the
/// same decisions `gcra.lua` makes for a fleet). Keys vanish once their bucket is full again,
/// as the Redis keys expire: a sweep runs whenever the table has doubled since the last one.
#[derive(Debug)]
pub(crate) struct LocalLimits {
    // A std mutex: a few map operations per call, never held across an `.await`.
    table: Mutex<Table>,
    epoch: Instant,
}

#[derive(Debug, Default)]
struct Table {
    /// key → tat, microseconds since `epoch` (once passed, the bucket is full again).
    buckets: HashMap<String, u64>,
    sweep_at: usize,
}

/// Below this many keys the table is never swept.
const SWEEP_FLOOR: usize = 1024;

impl Default for LocalLimits {
    fn default() -> Self {
        LocalLimits {
            table: Mutex::new(Table::default()),
            epoch: Instant::now(),
        }
    }
}

impl LocalLimits {
    fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Decides `check` now.
    pub(crate) fn check(&self, check: &LimitCheck) -> Result<LimitVerdict, StoreError> {
        validate_check(check)?;
        // Microseconds since the epoch, from 1 so a stored 0 always means "no state".
        let now = u64::try_from(self.epoch.elapsed().as_micros())
            .unwrap_or(u64::MAX)
            .saturating_add(1);
        let keys: Vec<String> = check
            .buckets
            .iter()
            .map(|b| limit_key("", &check.route, &b.key))
            .collect();
        let mut table = self.table();
        let verdict = match decide(check, now, |i| {
            table.buckets.get(&keys[i]).copied().unwrap_or(0)
        }) {
            Err((bucket, wait)) => LimitVerdict::Limited {
                bucket,
                retry_after: Duration::from_micros(wait),
            },
            Ok(next) => {
                // Once `now` passes `tat` the bucket is full again: the entry then says no
                // more than a missing one would, and the sweep may drop it.
                for (key, tat) in keys.into_iter().zip(next) {
                    table.buckets.insert(key, tat);
                }
                LimitVerdict::Allowed
            }
        };
        if table.buckets.len() >= table.sweep_at.max(SWEEP_FLOOR) {
            table.buckets.retain(|_, tat| *tat > now);
            table.sweep_at = table.buckets.len().saturating_mul(2);
        }
        Ok(verdict)
    }

    /// Keys held (tests: the table does not grow without bound).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.table().buckets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket(key: &str, per_second: u32, burst: u32) -> LimitBucket {
        LimitBucket {
            key: key.into(),
            period: Duration::from_secs(1) / per_second,
            burst: NonZeroU32::new(burst).unwrap(),
        }
    }

    #[test]
    fn gcra_admits_the_burst_then_one_per_period() {
        // 2 a second, burst 2: two at once, the third waits 500 ms (as governor does).
        let (p, tol) = (500_000, 1_000_000);
        let t = gcra(0, 10_000_000, p, tol).unwrap();
        let t = gcra(t, 10_000_000, p, tol).unwrap();
        assert_eq!(gcra(t, 10_000_000, p, tol), Err(500_000));
        assert_eq!(gcra(t, 10_499_999, p, tol), Err(1));
        assert!(gcra(t, 10_500_000, p, tol).is_ok());
    }

    #[test]
    fn a_refusal_by_one_bucket_takes_no_token_from_the_others() {
        let limits = LocalLimits::default();
        let user = bucket("per_user:a", 1, 5);
        let route = bucket("route", 1, 1);
        let both = LimitCheck {
            route: "r".into(),
            buckets: vec![user.clone(), route.clone()],
        };
        assert_eq!(limits.check(&both).unwrap(), LimitVerdict::Allowed);
        for _ in 0..3 {
            let Ok(LimitVerdict::Limited {
                bucket,
                retry_after,
            }) = limits.check(&both)
            else {
                panic!("the route bucket is empty");
            };
            assert_eq!(bucket, 1);
            assert!(retry_after > Duration::from_millis(900), "{retry_after:?}");
        }
        // The user's bucket gave one token in all: four are left.
        let user_only = LimitCheck {
            route: "r".into(),
            buckets: vec![user],
        };
        for _ in 0..4 {
            assert_eq!(limits.check(&user_only).unwrap(), LimitVerdict::Allowed);
        }
        assert!(matches!(
            limits.check(&user_only).unwrap(),
            LimitVerdict::Limited { bucket: 0, .. }
        ));
    }

    #[test]
    fn routes_have_their_own_buckets_and_bad_checks_are_refused() {
        let limits = LocalLimits::default();
        let check = |route: &str| LimitCheck {
            route: route.into(),
            buckets: vec![bucket("route", 1, 1)],
        };
        assert_eq!(limits.check(&check("a")).unwrap(), LimitVerdict::Allowed);
        assert_eq!(limits.check(&check("b")).unwrap(), LimitVerdict::Allowed);
        assert!(matches!(
            limits.check(&check("a")).unwrap(),
            LimitVerdict::Limited { .. }
        ));
        let empty = LimitCheck {
            route: "a".into(),
            buckets: vec![],
        };
        assert!(matches!(limits.check(&empty), Err(StoreError::Invalid(_))));
    }

    #[test]
    fn full_buckets_are_swept() {
        let limits = LocalLimits::default();
        // 1,000,000 a second: a bucket is full again a microsecond after its use.
        for i in 0..(SWEEP_FLOOR * 3) {
            let check = LimitCheck {
                route: "r".into(),
                buckets: vec![bucket(&format!("per_ip:{i}"), 1_000_000, 1)],
            };
            assert_eq!(limits.check(&check).unwrap(), LimitVerdict::Allowed);
        }
        assert!(limits.len() <= SWEEP_FLOOR, "{} keys kept", limits.len());
    }

    #[test]
    fn keys_carry_the_routes_hash_tag() {
        assert_eq!(route_tag("flash-buy"), "flash-buy");
        let odd = route_tag("flash buy {x}");
        assert!(odd.starts_with('#') && odd.len() == 33, "{odd}");
        assert_eq!(odd, route_tag("flash buy {x}"), "stable across instances");
        assert_eq!(
            limit_key("fg", "flash-buy", "route"),
            "fg:{limit:flash-buy}:route"
        );
        let user = UserId::parse("alice").unwrap();
        let b = LimitBucket::per_user(&user, Duration::from_secs(1), NonZeroU32::MIN);
        assert!(b.key.starts_with("per_user:") && b.key.len() == 9 + 32);
        let b = LimitBucket::per_ip(
            "::1".parse().unwrap(),
            Duration::from_secs(1),
            NonZeroU32::MIN,
        );
        assert_eq!(b.key, "per_ip:::1");
    }
}
