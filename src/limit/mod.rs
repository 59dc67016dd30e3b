//! In-process guards of one route: the in-flight cap and the token buckets (governor GCRA).
//!
//! Order (see `gate.rs`): in-flight slot → per-IP bucket → identity → per-user bucket → route
//! bucket. The in-flight slot is taken first because it is the only reversible check: a later
//! rejection gives it back. The shared route bucket comes last so that a request rejected by a
//! per-client bucket never spends a token that other clients need. A per-user rejection may have
//! spent a token of the same client's per-IP bucket, which only slows that client itself.
//!
//! Keyed buckets keep bounded memory: keys are hashed to `u64` with a per-process random key
//! (no hash flooding, no stored strings), idle keys are evicted on a timer, and a table that
//! is full admits an unseen key without remembering it. That costs no protection: an unseen key
//! would start with a full bucket anyway. The route bucket still caps the total.
//!
//! A bucket with `scope: global` is also counted across every instance sharing the store
//! ([`global`]): its local bucket (same rate) stays in front, and only a request every local
//! bucket admitted is asked of the store, so a flood is cut here before it costs a round trip.

pub mod global;

use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher, RandomState};
use std::net::IpAddr;
use std::num::NonZeroU64;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::{InMemoryState, NotKeyed, StateStore};
use governor::{Quota, RateLimiter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::{Limits, Rate};

/// Which bucket said no; also the policy name in `RateLimit-Policy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Route,
    PerIp,
    PerUser,
}

impl Scope {
    pub fn policy_name(self) -> &'static str {
        match self {
            Scope::Route => "route",
            Scope::PerIp => "per_ip",
            Scope::PerUser => "per_user",
        }
    }
}

/// A guard's "no".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    RateLimited {
        scope: Scope,
        rate: Rate,
        retry_after: Duration,
    },
    /// The route's in-flight cap is reached.
    Overloaded,
    /// A global bucket with `on_store_error: closed` could not ask the store.
    StoreUnavailable,
}

/// All guards of one route. Generic over the clock so tests can drive refills by hand.
pub struct RouteGuards<C: Clock = DefaultClock> {
    limits: Limits,
    in_flight: Option<Arc<Semaphore>>,
    per_ip: Option<KeyedBucket<C>>,
    per_user: Option<KeyedBucket<C>>,
    route: Option<Bucket<C>>,
}

impl RouteGuards<DefaultClock> {
    pub fn new(limits: &Limits) -> Self {
        Self::with_clock(limits, DefaultClock::default())
    }
}

impl<C: Clock + Clone> RouteGuards<C> {
    pub fn with_clock(limits: &Limits, clock: C) -> Self {
        RouteGuards {
            limits: limits.clone(),
            in_flight: limits
                .in_flight
                .map(|n| Arc::new(Semaphore::new(n as usize))),
            per_ip: limits
                .per_ip
                .map(|r| KeyedBucket::new(r, Scope::PerIp, clock.clone())),
            per_user: limits
                .per_user
                .map(|r| KeyedBucket::new(r, Scope::PerUser, clock.clone())),
            route: limits.route.map(|r| Bucket::new(r, clock.clone())),
        }
    }

    /// The limits these guards were built from; a reload keeps the guards when they are equal.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Takes an in-flight slot; hold the permit until the response body is finished.
    pub fn enter(&self) -> Result<Option<OwnedSemaphorePermit>, Denied> {
        match &self.in_flight {
            None => Ok(None),
            Some(sem) => sem
                .clone()
                .try_acquire_owned()
                .map(Some)
                .map_err(|_| Denied::Overloaded),
        }
    }

    /// Requests currently holding an in-flight slot (0 when the route has no cap).
    pub fn in_flight(&self) -> usize {
        match (&self.in_flight, self.limits.in_flight) {
            (Some(sem), Some(max)) => (max as usize).saturating_sub(sem.available_permits()),
            _ => 0,
        }
    }

    pub fn check_ip(&self, ip: IpAddr) -> Result<(), Denied> {
        self.per_ip.as_ref().map_or(Ok(()), |b| b.check(&ip))
    }

    pub fn needs_user(&self) -> bool {
        self.per_user.is_some()
    }

    pub fn check_user(&self, user: &str) -> Result<(), Denied> {
        self.per_user.as_ref().map_or(Ok(()), |b| b.check(user))
    }

    pub fn check_route(&self) -> Result<(), Denied> {
        self.route.as_ref().map_or(Ok(()), |b| b.check())
    }

    /// Forgets keys whose bucket has refilled completely; called on a timer.
    pub fn evict_idle(&self) {
        for b in [&self.per_ip, &self.per_user].into_iter().flatten() {
            b.store().evict_idle();
        }
    }

    /// Keys remembered by the per-IP and per-user buckets.
    pub fn key_counts(&self) -> (usize, usize) {
        let n = |b: &Option<KeyedBucket<C>>| b.as_ref().map_or(0, |b| b.store().len());
        (n(&self.per_ip), n(&self.per_user))
    }
}

fn quota(rate: &Rate) -> Quota {
    // `period` is never zero: rates are non-zero and at most u32::MAX per second.
    Quota::with_period(rate.period.max(Duration::from_nanos(1)))
        .unwrap_or_else(|| Quota::per_second(std::num::NonZeroU32::MIN))
        .allow_burst(rate.burst)
}

struct Bucket<C: Clock> {
    rate: Rate,
    limiter: RateLimiter<NotKeyed, InMemoryState, C, NoOpMiddleware<C::Instant>>,
}

impl<C: Clock> Bucket<C> {
    fn new(rate: Rate, clock: C) -> Self {
        Bucket {
            rate,
            limiter: RateLimiter::direct_with_clock(quota(&rate), clock),
        }
    }

    fn check(&self) -> Result<(), Denied> {
        self.limiter
            .check()
            .map_err(|not_until| Denied::RateLimited {
                scope: Scope::Route,
                rate: self.rate,
                retry_after: not_until.wait_time_from(self.limiter.clock().now()),
            })
    }
}

struct KeyedBucket<C: Clock> {
    rate: Rate,
    scope: Scope,
    hasher: RandomState,
    /// The same table the limiter writes to, kept for eviction and counting.
    store: CappedStore,
    limiter: RateLimiter<u64, CappedStore, C, NoOpMiddleware<C::Instant>>,
}

impl<C: Clock> KeyedBucket<C> {
    fn new(rate: Rate, scope: Scope, clock: C) -> Self {
        // A key untouched for a full refill holds a full bucket: the same as no entry at all.
        let idle_after = rate.period.saturating_mul(rate.burst.get());
        let store = CappedStore::new(rate.max_keys, idle_after);
        KeyedBucket {
            rate,
            scope,
            hasher: RandomState::new(),
            limiter: RateLimiter::new(quota(&rate), store.clone(), clock),
            store,
        }
    }

    fn check<K: Hash + ?Sized>(&self, key: &K) -> Result<(), Denied> {
        let key = self.hasher.hash_one(key);
        self.limiter
            .check_key(&key)
            .map_err(|not_until| Denied::RateLimited {
                scope: self.scope,
                rate: self.rate,
                retry_after: not_until.wait_time_from(self.limiter.clock().now()),
            })
    }

    fn store(&self) -> &CappedStore {
        &self.store
    }
}

/// Keys are already random-keyed hashes: hashing them again would only cost time.
#[derive(Default)]
struct PassThroughHasher(u64);

impl Hasher for PassThroughHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// One key's GCRA state (the "theoretical arrival time", as governor keeps it) plus when the key
/// was last touched, for eviction.
struct Slot {
    tat: AtomicU64,
    last_seen_ms: AtomicU64,
}

/// A governor state store with a cap on keys and idle eviction.
#[derive(Clone)]
struct CappedStore(Arc<CappedInner>);

struct CappedInner {
    map: DashMap<u64, Slot, BuildHasherDefault<PassThroughHasher>>,
    cap: usize,
    idle_after: Duration,
    epoch: Instant,
}

impl CappedStore {
    fn new(cap: usize, idle_after: Duration) -> Self {
        CappedStore(Arc::new(CappedInner {
            map: DashMap::default(),
            cap,
            idle_after,
            epoch: Instant::now(),
        }))
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.0.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn len(&self) -> usize {
        self.0.map.len()
    }

    fn evict_idle(&self) {
        let now = self.now_ms();
        let idle_ms = u64::try_from(self.0.idle_after.as_millis()).unwrap_or(u64::MAX);
        let before = self.0.map.len();
        self.0.map.retain(|_, slot| {
            now.saturating_sub(slot.last_seen_ms.load(Ordering::Relaxed)) <= idle_ms
        });
        // Give memory back after a burst of keys (a hostile-cardinality flood) has gone.
        if self.0.map.len() < before / 2 {
            self.0.map.shrink_to_fit();
        }
    }
}

impl Slot {
    /// governor's compare-and-swap loop (as in its `InMemoryState`): retry while another thread
    /// changed the state between our read and our write.
    fn measure_and_replace<T, F, E>(&self, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let mut prev = self.tat.load(Ordering::Acquire);
        loop {
            let (result, next) = f(NonZeroU64::new(prev).map(|n| Nanos::new(n.get())))?;
            match self.tat.compare_exchange_weak(
                prev,
                next.as_u64(),
                Ordering::Release,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(result),
                Err(actual) => prev = actual,
            }
        }
    }
}

impl StateStore for CappedStore {
    type Key = u64;

    fn measure_and_replace<T, F, E>(&self, key: &u64, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let now = self.now_ms();
        if let Some(slot) = self.0.map.get(key) {
            slot.last_seen_ms.store(now, Ordering::Relaxed);
            return slot.measure_and_replace(f);
        }
        if self.0.map.len() >= self.0.cap {
            // Full: decide as for a fresh key, remember nothing (see the module comment).
            return f(None).map(|(t, _)| t);
        }
        let slot = self.0.map.entry(*key).or_insert_with(|| Slot {
            tat: AtomicU64::new(0),
            last_seen_ms: AtomicU64::new(now),
        });
        slot.measure_and_replace(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;
    use std::num::NonZeroU32;

    fn rate(per_second: u32, burst: u32, max_keys: usize) -> Rate {
        Rate {
            period: Duration::from_secs(1) / per_second,
            burst: NonZeroU32::new(burst).unwrap(),
            max_keys,
            global: None,
        }
    }

    fn guards(limits: Limits) -> (RouteGuards<FakeRelativeClock>, FakeRelativeClock) {
        let clock = FakeRelativeClock::default();
        (RouteGuards::with_clock(&limits, clock.clone()), clock)
    }

    #[test]
    fn route_bucket_refills_with_the_clock() {
        let (g, clock) = guards(Limits {
            route: Some(rate(2, 2, 0)),
            ..Limits::default()
        });
        assert!(g.check_route().is_ok());
        assert!(g.check_route().is_ok());
        let Err(Denied::RateLimited {
            retry_after, scope, ..
        }) = g.check_route()
        else {
            panic!("third request within the burst must be limited");
        };
        assert_eq!(scope, Scope::Route);
        assert_eq!(retry_after, Duration::from_millis(500));
        clock.advance(Duration::from_millis(499));
        assert!(g.check_route().is_err());
        clock.advance(Duration::from_millis(1));
        assert!(g.check_route().is_ok());
        assert!(g.check_route().is_err());
    }

    #[test]
    fn users_and_ips_have_their_own_buckets() {
        let (g, clock) = guards(Limits {
            per_user: Some(rate(1, 1, 100)),
            per_ip: Some(rate(1, 2, 100)),
            ..Limits::default()
        });
        assert!(g.check_user("alice").is_ok());
        assert!(g.check_user("alice").is_err());
        assert!(g.check_user("bob").is_ok());
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        assert!(g.check_ip(a).is_ok());
        assert!(g.check_ip(a).is_ok());
        assert!(g.check_ip(a).is_err());
        assert!(g.check_ip(b).is_ok());
        clock.advance(Duration::from_secs(1));
        assert!(g.check_user("alice").is_ok());
        assert!(g.check_ip(a).is_ok());
        assert_eq!(g.key_counts(), (2, 2));
    }

    #[test]
    fn full_key_table_admits_unseen_keys_without_growing() {
        let (g, _clock) = guards(Limits {
            per_user: Some(rate(1, 1, 3)),
            ..Limits::default()
        });
        for u in ["a", "b", "c"] {
            assert!(g.check_user(u).is_ok());
        }
        // Remembered keys stay limited even when the table is full.
        assert!(g.check_user("a").is_err());
        for i in 0..100 {
            assert!(g.check_user(&format!("new-{i}")).is_ok());
        }
        assert_eq!(g.key_counts().1, 3);
    }

    #[test]
    fn idle_keys_are_evicted() {
        let (g, _clock) = guards(Limits {
            per_ip: Some(Rate {
                period: Duration::from_millis(1),
                burst: NonZeroU32::new(1).unwrap(),
                max_keys: 1000,
                global: None,
            }),
            ..Limits::default()
        });
        for i in 0..50u8 {
            assert!(g.check_ip(IpAddr::from([10, 0, 0, i])).is_ok());
        }
        assert_eq!(g.key_counts().0, 50);
        std::thread::sleep(Duration::from_millis(5));
        g.evict_idle();
        assert_eq!(g.key_counts().0, 0);
    }

    #[test]
    fn in_flight_slots_come_back() {
        let (g, _) = guards(Limits {
            in_flight: Some(2),
            ..Limits::default()
        });
        let a = g.enter().unwrap();
        let _b = g.enter().unwrap();
        assert_eq!(g.enter().unwrap_err(), Denied::Overloaded);
        assert_eq!(g.in_flight(), 2);
        drop(a);
        assert!(g.enter().is_ok());
    }
}
