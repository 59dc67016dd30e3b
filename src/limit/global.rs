//! A route's global buckets (`scope: global`): the same rates as its local buckets, counted
//! across every instance sharing the store (`store::limits`, `lua/gcra.lua`).
//!
//! `gate.rs` asks here only once every local bucket of the route has admitted the request, so
//! a flood is cut in-process before it costs a store call, and all of the request's global
//! buckets go in one call, decided together (a refusal takes no token from the others). A
//! refusal is the same [`Denied::RateLimited`] a local bucket gives (same 429, `Retry-After`
//! and `RateLimit-Policy`). When the store cannot answer (down, timed out, breaker open), the
//! bucket's `on_store_error` decides: `closed` refuses with 503 `unavailable`, `open` admits;
//! if the request's buckets disagree, closed wins.
//!
//! Every check is counted in `flashgate_global_limits_total{route,scope,outcome}`: each of
//! the request's global buckets counts `allowed` when the request passed, the bucket that
//! refused counts `limited` (the others of that request count nothing: they gave no token),
//! and on a store error each counts `store_error_open` or `store_error_closed`.

use std::net::IpAddr;

use prometheus_client::metrics::counter::Counter;
use tracing::{debug, warn};

use super::{Denied, Scope};
use crate::config::{Limits, OnStoreError, Rate};
use crate::ids::UserId;
use crate::metrics::Metrics;
use crate::store::limits::route_tag;
use crate::store::{LimitBucket, LimitCheck, LimitVerdict, Store};

/// What a global bucket's check can come to (the metric's `outcome` label).
pub const OUTCOMES: [&str; 4] = [
    "allowed",
    "limited",
    "store_error_open",
    "store_error_closed",
];

/// The global buckets of one route.
pub struct GlobalLimits {
    /// The route's part of every key (its name, or a hash of it).
    route: String,
    /// In the order the local buckets run: per-IP, per-user, route.
    buckets: Vec<Global>,
}

struct Global {
    scope: Scope,
    rate: Rate,
    on_store_error: OnStoreError,
    /// One counter per [`OUTCOMES`] entry, made with the route.
    counted: [Counter; OUTCOMES.len()],
}

impl Global {
    fn count(&self, outcome: &str) {
        if let Some(i) = OUTCOMES.iter().position(|o| *o == outcome) {
            self.counted[i].inc();
        }
    }
}

impl GlobalLimits {
    /// The global buckets of route `name`; `None` when it has none (nothing to ask).
    pub fn new(name: &str, limits: &Limits, metrics: &Metrics) -> Option<GlobalLimits> {
        let buckets: Vec<Global> = [
            (Scope::PerIp, limits.per_ip),
            (Scope::PerUser, limits.per_user),
            (Scope::Route, limits.route),
        ]
        .into_iter()
        .filter_map(|(scope, rate)| {
            let rate = rate?;
            Some(Global {
                scope,
                rate,
                on_store_error: rate.global?,
                counted: OUTCOMES
                    .map(|outcome| metrics.global_limit(name, scope.policy_name(), outcome)),
            })
        })
        .collect();
        (!buckets.is_empty()).then(|| GlobalLimits {
            route: route_tag(name),
            buckets,
        })
    }

    /// Asks the store for every global bucket of the request in one call (a per-user bucket
    /// only when the request has a user).
    pub async fn check(
        &self,
        store: &dyn Store,
        ip: IpAddr,
        user: Option<&UserId>,
    ) -> Result<(), Denied> {
        // What is asked, and of which bucket: the store's answer names an index into both.
        let (asked, buckets): (Vec<&Global>, Vec<LimitBucket>) = self
            .buckets
            .iter()
            .filter_map(|g| {
                let (period, burst) = (g.rate.period, g.rate.burst);
                let bucket = match g.scope {
                    Scope::PerIp => LimitBucket::per_ip(ip, period, burst),
                    Scope::PerUser => LimitBucket::per_user(user?, period, burst),
                    Scope::Route => LimitBucket::route(period, burst),
                };
                Some((g, bucket))
            })
            .unzip();
        if asked.is_empty() {
            return Ok(());
        }
        let check = LimitCheck {
            route: self.route.clone(),
            buckets,
        };
        match store.check_limits(&check).await {
            Ok(LimitVerdict::Allowed) => {
                asked.iter().for_each(|g| g.count("allowed"));
                Ok(())
            }
            Ok(LimitVerdict::Limited {
                bucket,
                retry_after,
            }) => {
                // The store names an index into what it was asked; anything else is refused
                // with the first bucket's policy rather than admitted.
                let Some(g) = asked.get(bucket).or(asked.first()) else {
                    return Ok(());
                };
                g.count("limited");
                Err(Denied::RateLimited {
                    scope: g.scope,
                    rate: g.rate,
                    retry_after,
                })
            }
            Err(e) => {
                let closed = asked
                    .iter()
                    .any(|g| g.on_store_error == OnStoreError::Closed);
                let outcome = if closed {
                    "store_error_closed"
                } else {
                    "store_error_open"
                };
                asked.iter().for_each(|g| g.count(outcome));
                if closed {
                    warn!(route = %self.route, error = %e, "global limit: store unavailable, failing closed");
                    Err(Denied::StoreUnavailable)
                } else {
                    debug!(route = %self.route, error = %e, "global limit: store unavailable, failing open");
                    Ok(())
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;
    use std::num::NonZeroU32;
    use std::time::Duration;

    fn rate(per_second: u32, burst: u32, global: Option<OnStoreError>) -> Option<Rate> {
        Some(Rate {
            period: Duration::from_secs(1) / per_second,
            burst: NonZeroU32::new(burst).unwrap(),
            max_keys: 100,
            global,
        })
    }

    #[test]
    fn only_global_buckets_are_asked() {
        let m = Metrics::new();
        let local = Limits {
            route: rate(1, 1, None),
            per_user: rate(1, 1, None),
            ..Limits::default()
        };
        assert!(GlobalLimits::new("r", &local, &m).is_none());
        let mixed = Limits {
            route: rate(1, 1, Some(OnStoreError::Open)),
            per_user: rate(1, 1, None),
            ..Limits::default()
        };
        let g = GlobalLimits::new("r", &mixed, &m).unwrap();
        assert_eq!(g.buckets.len(), 1);
        assert_eq!(g.buckets[0].scope, Scope::Route);
    }

    #[tokio::test]
    async fn a_global_refusal_is_a_rate_limit_and_is_counted() {
        let m = Metrics::new();
        let limits = Limits {
            per_user: rate(1, 1, Some(OnStoreError::Closed)),
            ..Limits::default()
        };
        let g = GlobalLimits::new("buy", &limits, &m).unwrap();
        let store = MemoryStore::new();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let alice = UserId::parse("alice").unwrap();
        assert!(g.check(&store, ip, Some(&alice)).await.is_ok());
        let Err(Denied::RateLimited {
            scope, retry_after, ..
        }) = g.check(&store, ip, Some(&alice)).await
        else {
            panic!("alice's second request within the second");
        };
        assert_eq!(scope, Scope::PerUser);
        assert!(retry_after > Duration::from_millis(900));
        assert!(
            g.check(&store, ip, None).await.is_ok(),
            "no user: nothing to ask"
        );
        let text = m.encode_text();
        for (outcome, n) in [("allowed", 1), ("limited", 1), ("store_error_open", 0)] {
            let line = format!(
                "flashgate_global_limits_total{{route=\"buy\",scope=\"per_user\",outcome=\"{outcome}\"}} {n}"
            );
            assert!(text.contains(&line), "missing {line} in\n{text}");
        }
    }
}
