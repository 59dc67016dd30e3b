//! One behaviour, three stores: every case in `cases` runs against the
//! in-process `MemoryStore`, against `RedisStore` on a real, private
//! `redis-server`, and against `RedisStore` on a real 3-master Redis Cluster. A `redis_only` module adds what only Redis can do wrong:
//! script cache loss, a dead or frozen server, several instances sharing it,
//! and the literal key layout.

#[path = "support/redis_cluster.rs"]
mod cluster_support;
#[path = "support/redis.rs"]
mod redis_support;

use std::collections::HashSet;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use flashgate::store::limits::route_tag;
use flashgate::store::{
    LimitBucket, LimitCheck, LimitVerdict, MAX_UNITS, MemoryStore, OpenState, RedisConfig,
    RedisStore, RedisTarget, ReleaseOutcome, ReservationId, ReservationQuery, ReserveOutcome,
    ReserveRequest, Resolution, ResolveOutcome, Settlement, Sku, StateCounts, Store, StoreError,
    UserId,
};
use redis_support::RedisServer;

/// A store under test, plus whatever must live as long as it.
struct Fixture {
    store: Arc<dyn Store>,
    _server: Option<RedisServer>,
}

async fn memory_fixture() -> Fixture {
    Fixture {
        store: Arc::new(MemoryStore::new()),
        _server: None,
    }
}

/// A store on a 3-master cluster (the cluster lives as long as the store's fixture).
struct ClusterFixture {
    store: Arc<dyn Store>,
    _cluster: cluster_support::RedisCluster,
}

async fn cluster_fixture() -> ClusterFixture {
    let cluster = cluster_support::RedisCluster::start(3, 0);
    let store = RedisStore::connect(&RedisConfig {
        target: RedisTarget::Cluster(cluster.seeds()),
        connections: 2,
        // A cluster connect is a slot-map fetch plus a connection per node: on a loaded
        // 2-core machine that has taken over 500 ms.
        connect_timeout: Duration::from_secs(2),
        response_timeout: Duration::from_secs(2),
        key_prefix: "fg".into(),
        tls: None,
        wait_replicas: None,
    })
    .await
    .unwrap();
    ClusterFixture {
        store: Arc::new(store),
        _cluster: cluster,
    }
}

async fn redis_fixture() -> Fixture {
    let server = RedisServer::start();
    let store = RedisStore::connect(&config(&server)).await.unwrap();
    Fixture {
        store: Arc::new(store),
        _server: Some(server),
    }
}

fn config(server: &RedisServer) -> RedisConfig {
    RedisConfig {
        target: RedisTarget::Node(server.url()),
        connections: 4,
        connect_timeout: Duration::from_millis(500),
        response_timeout: Duration::from_secs(2),
        key_prefix: "fg".into(),
        tls: None,
        wait_replicas: None,
    }
}

/// A SKU for the store calls (the store takes only parsed SKUs; see `bad_skus_are_invalid`).
fn sku(s: &str) -> Sku {
    Sku::parse(s).unwrap_or_else(|e| panic!("test SKU {s:?}: {e}"))
}

/// A well-formed reservation id no store ever handed out.
fn unknown_id() -> ReservationId {
    ReservationId::parse(&"0".repeat(32)).unwrap()
}

fn req(sku: &str, user: &str, quantity: u32, per_user_limit: u32) -> ReserveRequest {
    ReserveRequest {
        sku: self::sku(sku),
        user: UserId::parse(user).unwrap(),
        quantity,
        per_user_limit,
    }
}

/// Reserve and insist on a win; returns the reservation id.
async fn win(store: &dyn Store, r: &ReserveRequest, remaining: u64) -> ReservationId {
    match store.reserve(r).await.unwrap() {
        ReserveOutcome::Won {
            reservation,
            remaining: left,
        } => {
            assert_eq!(left, remaining, "remaining after {r:?}");
            reservation
        }
        other => panic!("{r:?}: expected Won, got {other:?}"),
    }
}

/// `n` distinct users (`user-0`…) each asking for one unit of `sku` at once, one task each.
fn buyers_at_once(
    store: &Arc<dyn Store>,
    sku: &'static str,
    n: usize,
) -> Vec<tokio::task::JoinHandle<ReserveOutcome>> {
    (0..n)
        .map(|i| {
            let store = Arc::clone(store);
            tokio::spawn(async move {
                store
                    .reserve(&req(sku, &format!("user-{i}"), 1, 1))
                    .await
                    .unwrap()
            })
        })
        .collect()
}

fn counts(held: u64, sold: u64, released: u64, uncertain: u64) -> StateCounts {
    StateCounts {
        held,
        sold,
        released,
        uncertain,
    }
}

/// The shared cases. Each takes the store and owns its SKUs.
mod cases {
    use super::*;

    pub async fn won(store: Arc<dyn Store>) {
        assert_eq!(store.set_stock(&sku("won-1"), 3).await.unwrap(), 3);
        let id = win(&*store, &req("won-1", "alice", 1, 1), 2).await;
        assert_eq!(id.as_str().len(), 32, "128-bit hex id: {id}");
        assert!(id.as_str().chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(store.get_stock(&sku("won-1")).await.unwrap(), Some(2));
        let other = win(&*store, &req("won-1", "bob", 1, 1), 1).await;
        assert_ne!(id, other);
    }

    pub async fn sold_out_reports_remaining(store: Arc<dyn Store>) {
        store.set_stock(&sku("so-1"), 1).await.unwrap();
        win(&*store, &req("so-1", "alice", 1, 1), 0).await;
        assert_eq!(
            store.reserve(&req("so-1", "bob", 1, 1)).await.unwrap(),
            ReserveOutcome::SoldOut { remaining: 0 }
        );

        // Not enough for the quantity asked: nothing changes.
        store.set_stock(&sku("so-2"), 2).await.unwrap();
        assert_eq!(
            store.reserve(&req("so-2", "carol", 3, 3)).await.unwrap(),
            ReserveOutcome::SoldOut { remaining: 2 }
        );
        assert_eq!(store.get_stock(&sku("so-2")).await.unwrap(), Some(2));
        let status = store.status(&sku("so-2")).await.unwrap();
        assert_eq!(status.buyers, 0);
        assert_eq!(status.reservations, StateCounts::default());
    }

    pub async fn per_user_limit_one(store: Arc<dyn Store>) {
        store.set_stock(&sku("lim-1"), 5).await.unwrap();
        win(&*store, &req("lim-1", "alice", 1, 1), 4).await;
        assert_eq!(
            store.reserve(&req("lim-1", "alice", 1, 1)).await.unwrap(),
            ReserveOutcome::AlreadyPurchased { held: 1 }
        );
        assert_eq!(store.get_stock(&sku("lim-1")).await.unwrap(), Some(4));
        // Other users are not affected.
        win(&*store, &req("lim-1", "bob", 1, 1), 3).await;
    }

    pub async fn per_user_limit_three(store: Arc<dyn Store>) {
        store.set_stock(&sku("lim-3"), 10).await.unwrap();
        win(&*store, &req("lim-3", "alice", 2, 3), 8).await;
        win(&*store, &req("lim-3", "alice", 1, 3), 7).await;
        assert_eq!(
            store.reserve(&req("lim-3", "alice", 1, 3)).await.unwrap(),
            ReserveOutcome::AlreadyPurchased { held: 3 }
        );
        assert_eq!(store.get_stock(&sku("lim-3")).await.unwrap(), Some(7));
        let status = store.status(&sku("lim-3")).await.unwrap();
        assert_eq!(status.buyers, 1);
        assert_eq!(status.units, counts(3, 0, 0, 0));
        assert_eq!(status.reservations, counts(2, 0, 0, 0));
    }

    pub async fn repeat_buyer_is_told_even_when_sold_out(store: Arc<dyn Store>) {
        store.set_stock(&sku("dedupe-first"), 1).await.unwrap();
        win(&*store, &req("dedupe-first", "alice", 1, 1), 0).await;
        assert_eq!(
            store
                .reserve(&req("dedupe-first", "alice", 1, 1))
                .await
                .unwrap(),
            ReserveOutcome::AlreadyPurchased { held: 1 }
        );
    }

    pub async fn not_configured_never_wins(store: Arc<dyn Store>) {
        for user in ["alice", "bob", "carol"] {
            assert_eq!(
                store.reserve(&req("nc-1", user, 1, 1)).await.unwrap(),
                ReserveOutcome::NotConfigured
            );
        }
        assert_eq!(store.get_stock(&sku("nc-1")).await.unwrap(), None);
        let status = store.status(&sku("nc-1")).await.unwrap();
        assert_eq!(status.stock, None);
        assert_eq!(status.buyers, 0);
        assert_eq!(status.reservations, StateCounts::default());

        // Zero stock is configured and sold out, not "not configured".
        store.set_stock(&sku("nc-1"), 0).await.unwrap();
        assert_eq!(
            store.reserve(&req("nc-1", "alice", 1, 1)).await.unwrap(),
            ReserveOutcome::SoldOut { remaining: 0 }
        );
    }

    pub async fn release_once(store: Arc<dyn Store>) {
        store.set_stock(&sku("rel-1"), 1).await.unwrap();
        let id = win(&*store, &req("rel-1", "alice", 1, 1), 0).await;
        assert_eq!(
            store.release(&sku("rel-1"), &id).await.unwrap(),
            ReleaseOutcome::Released { remaining: 1 }
        );
        assert_eq!(
            store.release(&sku("rel-1"), &id).await.unwrap(),
            ReleaseOutcome::NotHeld {
                state: Some("released".into())
            }
        );
        assert_eq!(store.get_stock(&sku("rel-1")).await.unwrap(), Some(1));
        assert_eq!(
            store.release(&sku("rel-1"), &unknown_id()).await.unwrap(),
            ReleaseOutcome::NotHeld { state: None }
        );
        assert_eq!(
            store.release(&sku("rel-unknown-sku"), &id).await.unwrap(),
            ReleaseOutcome::NotHeld { state: None }
        );
        let status = store.status(&sku("rel-1")).await.unwrap();
        assert_eq!(status.buyers, 0, "release frees the user's slot");
        assert_eq!(status.reservations, counts(0, 0, 1, 0));
        assert_eq!(status.units, counts(0, 0, 1, 0));
    }

    pub async fn released_unit_can_be_won_again(store: Arc<dyn Store>) {
        store.set_stock(&sku("again-1"), 1).await.unwrap();
        let first = win(&*store, &req("again-1", "alice", 1, 1), 0).await;
        assert_eq!(
            store.reserve(&req("again-1", "bob", 1, 1)).await.unwrap(),
            ReserveOutcome::SoldOut { remaining: 0 }
        );
        store.release(&sku("again-1"), &first).await.unwrap();
        // The same user may win the returned unit...
        let second = win(&*store, &req("again-1", "alice", 1, 1), 0).await;
        assert_ne!(first, second);
        assert_eq!(
            store.reserve(&req("again-1", "bob", 1, 1)).await.unwrap(),
            ReserveOutcome::SoldOut { remaining: 0 }
        );
        // ...and so may someone else.
        store.release(&sku("again-1"), &second).await.unwrap();
        win(&*store, &req("again-1", "bob", 1, 1), 0).await;
        // Releasing the first reservation again must not add a unit.
        assert_eq!(
            store.release(&sku("again-1"), &first).await.unwrap(),
            ReleaseOutcome::NotHeld {
                state: Some("released".into())
            }
        );
        assert_eq!(store.get_stock(&sku("again-1")).await.unwrap(), Some(0));
    }

    pub async fn quantity_above_one(store: Arc<dyn Store>) {
        store.set_stock(&sku("qty-1"), 5).await.unwrap();
        let a = win(&*store, &req("qty-1", "alice", 3, 3), 2).await;
        assert_eq!(
            store.reserve(&req("qty-1", "bob", 3, 3)).await.unwrap(),
            ReserveOutcome::SoldOut { remaining: 2 }
        );
        win(&*store, &req("qty-1", "bob", 2, 3), 0).await;
        assert_eq!(
            store.release(&sku("qty-1"), &a).await.unwrap(),
            ReleaseOutcome::Released { remaining: 3 }
        );
        let status = store.status(&sku("qty-1")).await.unwrap();
        assert_eq!(status.stock, Some(3));
        assert_eq!(status.buyers, 1);
        assert_eq!(status.units, counts(2, 0, 3, 0));
        assert_eq!(status.reservations, counts(1, 0, 1, 0));

        // Quantities outside 1..=limit are a caller bug, refused outright.
        for bad in [req("qty-1", "carol", 0, 1), req("qty-1", "carol", 2, 1)] {
            assert!(
                matches!(store.reserve(&bad).await, Err(StoreError::Invalid(_))),
                "{bad:?}"
            );
        }
        assert_eq!(store.get_stock(&sku("qty-1")).await.unwrap(), Some(3));
    }

    pub async fn settle_and_status(store: Arc<dyn Store>) {
        store.set_stock(&sku("st-1"), 10).await.unwrap();
        let u1 = win(&*store, &req("st-1", "u1", 1, 2), 9).await;
        let u2 = win(&*store, &req("st-1", "u2", 2, 2), 7).await;
        let u3 = win(&*store, &req("st-1", "u3", 1, 2), 6).await;
        let _u4 = win(&*store, &req("st-1", "u4", 1, 2), 5).await;

        assert!(
            store
                .settle(&sku("st-1"), &u1, Settlement::Sold)
                .await
                .unwrap()
        );
        assert!(
            !store
                .settle(&sku("st-1"), &u1, Settlement::Sold)
                .await
                .unwrap()
        );
        assert!(
            !store
                .settle(&sku("st-1"), &u1, Settlement::Uncertain)
                .await
                .unwrap()
        );
        assert!(
            store
                .settle(&sku("st-1"), &u2, Settlement::Uncertain)
                .await
                .unwrap()
        );
        // Sold and uncertain units are kept: release is a no-op.
        assert_eq!(
            store.release(&sku("st-1"), &u1).await.unwrap(),
            ReleaseOutcome::NotHeld {
                state: Some("sold".into())
            }
        );
        assert_eq!(
            store.release(&sku("st-1"), &u2).await.unwrap(),
            ReleaseOutcome::NotHeld {
                state: Some("uncertain".into())
            }
        );
        assert_eq!(
            store.release(&sku("st-1"), &u3).await.unwrap(),
            ReleaseOutcome::Released { remaining: 6 }
        );
        assert!(
            !store
                .settle(&sku("st-1"), &u3, Settlement::Sold)
                .await
                .unwrap()
        );
        assert!(
            !store
                .settle(&sku("st-1"), &unknown_id(), Settlement::Sold)
                .await
                .unwrap()
        );
        assert!(
            !store
                .settle(&sku("st-other"), &u1, Settlement::Sold)
                .await
                .unwrap()
        );

        // A buyer whose units were sold still counts against the limit.
        assert_eq!(
            store.reserve(&req("st-1", "u2", 1, 2)).await.unwrap(),
            ReserveOutcome::AlreadyPurchased { held: 2 }
        );

        let status = store.status(&sku("st-1")).await.unwrap();
        assert_eq!(status.sku, "st-1");
        assert_eq!(status.stock, Some(6));
        assert_eq!(status.buyers, 3, "u1 (sold), u2 (uncertain), u4 (held)");
        assert_eq!(status.reservations, counts(1, 1, 1, 1));
        assert_eq!(status.units, counts(1, 1, 1, 2));
        // The audit: stock + held + sold + uncertain = everything ever stocked.
        let u = &status.units;
        assert_eq!(status.stock.unwrap() + u.held + u.sold + u.uncertain, 10);

        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(json["units"]["uncertain"], 2);
    }

    pub async fn stock_admin(store: Arc<dyn Store>) {
        // A missing key counts as 0 for add_stock.
        assert_eq!(store.add_stock(&sku("adm-1"), 5).await.unwrap(), 5);
        assert_eq!(store.add_stock(&sku("adm-1"), -2).await.unwrap(), 3);
        assert!(matches!(
            store.add_stock(&sku("adm-1"), -4).await,
            Err(StoreError::Invalid(_))
        ));
        assert_eq!(store.get_stock(&sku("adm-1")).await.unwrap(), Some(3));
        assert!(matches!(
            store.add_stock(&sku("adm-missing"), -1).await,
            Err(StoreError::Invalid(_))
        ));
        assert_eq!(store.get_stock(&sku("adm-missing")).await.unwrap(), None);
        assert_eq!(store.add_stock(&sku("adm-1"), -3).await.unwrap(), 0);

        assert_eq!(store.set_stock(&sku("adm-1"), 7).await.unwrap(), 7);
        assert_eq!(store.get_stock(&sku("adm-1")).await.unwrap(), Some(7));
        // Stock stays within 2^53 - 1 (Lua numbers are doubles), in both stores.
        for too_big in [MAX_UNITS + 1, i64::MAX as u64, u64::MAX] {
            assert!(matches!(
                store.set_stock(&sku("adm-1"), too_big).await,
                Err(StoreError::Invalid(_))
            ));
        }
        assert_eq!(store.get_stock(&sku("adm-1")).await.unwrap(), Some(7));
        store.set_stock(&sku("adm-1"), MAX_UNITS).await.unwrap();
        assert!(matches!(
            store.add_stock(&sku("adm-1"), 1).await,
            Err(StoreError::Invalid(_))
        ));
        assert_eq!(
            store.get_stock(&sku("adm-1")).await.unwrap(),
            Some(MAX_UNITS)
        );
    }

    /// The store can no longer be handed a SKU that would break the key layout (`{`/`}` in
    /// the hash tag), an empty one or one with control characters, nor an empty user id or a
    /// made-up reservation id: the types refuse them before any store call exists. What the
    /// store still refuses itself is checked in the other cases.
    pub async fn bad_skus_are_invalid(_store: Arc<dyn Store>) {
        for bad in ["a{b}", "x}", "{x", "", "a\nb", "tab\there", "sku-1 blue/XL"] {
            assert!(Sku::parse(bad).is_err(), "{bad:?}");
        }
        assert!(UserId::parse("").is_err());
        assert!(UserId::parse("a\u{7f}").is_err());
        for bad in ["", "id", "x", &"0".repeat(31), &"A".repeat(32)] {
            assert!(ReservationId::parse(bad).is_err(), "{bad:?}");
        }
    }

    pub async fn users_may_contain_separators(store: Arc<dyn Store>) {
        store.set_stock(&sku("sep-1"), 2).await.unwrap();
        let id = win(&*store, &req("sep-1", "a|b|c", 1, 1), 1).await;
        assert_eq!(
            store.reserve(&req("sep-1", "a|b|c", 1, 1)).await.unwrap(),
            ReserveOutcome::AlreadyPurchased { held: 1 }
        );
        assert_eq!(
            store.release(&sku("sep-1"), &id).await.unwrap(),
            ReleaseOutcome::Released { remaining: 2 }
        );
        assert_eq!(store.status(&sku("sep-1")).await.unwrap().buyers, 0);
        win(&*store, &req("sep-1", "a|b|c", 1, 1), 1).await;
    }

    /// 500 buyers race for 50 units: exactly 50 win.
    pub async fn concurrent_buyers_never_oversell(store: Arc<dyn Store>) {
        store.set_stock(&sku("race-1"), 50).await.unwrap();
        let tasks = buyers_at_once(&store, "race-1", 500);
        let mut ids = HashSet::new();
        let mut sold_out = 0;
        for task in tasks {
            match task.await.unwrap() {
                ReserveOutcome::Won { reservation, .. } => assert!(ids.insert(reservation)),
                ReserveOutcome::SoldOut { remaining: 0 } => sold_out += 1,
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(ids.len(), 50);
        assert_eq!(sold_out, 450);
        assert_eq!(store.get_stock(&sku("race-1")).await.unwrap(), Some(0));
        let status = store.status(&sku("race-1")).await.unwrap();
        assert_eq!(status.units.held, 50);
        assert_eq!(status.reservations.held, 50);
        assert_eq!(status.buyers, 50);
    }

    /// 400 requests at once from 100 users (each asks four times, for 1 or 2 units, limit
    /// 2) on 150 units: the Redis store decides them in batches, and every decision must
    /// still see the ones before it — no user above the limit, no unit sold twice.
    pub async fn buyers_arriving_together_are_decided_in_turn(store: Arc<dyn Store>) {
        store.set_stock(&sku("together-1"), 150).await.unwrap();
        let tasks: Vec<_> = (0..400u32)
            .map(|i| {
                let store = Arc::clone(&store);
                let user = format!("user-{}", i % 100);
                let quantity = 1 + i % 2;
                tokio::spawn(async move {
                    let outcome = store
                        .reserve(&req("together-1", &user, quantity, 2))
                        .await
                        .unwrap();
                    (user, quantity, outcome)
                })
            })
            .collect();
        let mut units_won = 0u64;
        let mut per_user: std::collections::HashMap<String, u32> = Default::default();
        let mut ids = HashSet::new();
        for task in tasks {
            let (user, quantity, outcome) = task.await.unwrap();
            match outcome {
                ReserveOutcome::Won { reservation, .. } => {
                    assert!(ids.insert(reservation), "reservation id given twice");
                    units_won += u64::from(quantity);
                    *per_user.entry(user).or_default() += quantity;
                }
                ReserveOutcome::SoldOut { .. } | ReserveOutcome::AlreadyPurchased { .. } => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(per_user.values().all(|&units| units <= 2), "{per_user:?}");
        let status = store.status(&sku("together-1")).await.unwrap();
        assert_eq!(status.stock.unwrap() + units_won, 150);
        assert_eq!(status.units.held, units_won);
        assert_eq!(status.reservations.held, ids.len() as u64);
        assert_eq!(status.buyers, per_user.len() as u64);
        // 100 users x 2 units could take 200: the stock, not the limit, ran out.
        assert_eq!(status.stock, Some(0));
    }

    /// Buyers of 8 SKUs at once, the same 40 users in every SKU (one server's Redis store
    /// decides them in shared calls, several SKUs per call): each SKU sells exactly its own
    /// stock, a user's purchase of one SKU does not count against another, a closed SKU and
    /// an unconfigured one answer as they would alone, and each SKU's books balance.
    pub async fn buyers_of_many_skus_arriving_together(store: Arc<dyn Store>) {
        const SKUS: usize = 8;
        let name = |k: usize| format!("multi-{k}");
        for k in 0..SKUS - 2 {
            store.set_stock(&sku(&name(k)), 5 + k as u64).await.unwrap();
        }
        store.set_stock(&sku(&name(SKUS - 2)), 10).await.unwrap();
        store.set_closed(&sku(&name(SKUS - 2)), true).await.unwrap();
        // SKU 7 is never configured.
        let tasks: Vec<_> = (0..40 * SKUS)
            .map(|i| {
                let store = Arc::clone(&store);
                let (k, user) = (i % SKUS, format!("user-{}", i / SKUS));
                tokio::spawn(async move {
                    let outcome = store.reserve(&req(&name(k), &user, 1, 1)).await.unwrap();
                    (k, outcome)
                })
            })
            .collect();
        let mut won = [0u64; SKUS];
        let mut winners = Vec::new();
        for task in tasks {
            let (k, outcome) = task.await.unwrap();
            match (k, outcome) {
                (_, ReserveOutcome::Won { reservation, .. }) => {
                    won[k] += 1;
                    winners.push((k, reservation));
                }
                (k, ReserveOutcome::SoldOut { remaining: 0 }) if k < SKUS - 2 => {}
                (k, ReserveOutcome::Closed) if k == SKUS - 2 => {}
                (k, ReserveOutcome::NotConfigured) if k == SKUS - 1 => {}
                (k, other) => panic!("SKU {k}: unexpected {other:?}"),
            }
        }
        // Every winner settled at once (all SKUs together): even-numbered SKUs sold, odd
        // ones uncertain; each reservation moves once.
        let settles: Vec<_> = winners
            .iter()
            .map(|(k, id)| {
                let (store, sku, id) = (Arc::clone(&store), sku(&name(*k)), id.clone());
                let to = if k % 2 == 0 {
                    Settlement::Sold
                } else {
                    Settlement::Uncertain
                };
                tokio::spawn(async move { store.settle(&sku, &id, to).await.unwrap() })
            })
            .collect();
        for settle in settles {
            assert!(settle.await.unwrap(), "each reservation moves once");
        }
        for (k, &won) in won.iter().enumerate().take(SKUS - 2) {
            assert_eq!(won, 5 + k as u64, "SKU {k} sells exactly its stock");
            let status = store.status(&sku(&name(k))).await.unwrap();
            assert_eq!(status.stock, Some(0));
            let expected = if k % 2 == 0 {
                counts(0, won, 0, 0)
            } else {
                counts(0, 0, 0, won)
            };
            assert_eq!(status.reservations, expected, "SKU {k}");
            assert_eq!(status.buyers, won);
        }
        assert_eq!(won[SKUS - 2], 0, "a closed sale sells nothing");
        assert_eq!(won[SKUS - 1], 0, "an unconfigured sale sells nothing");
        assert_eq!(
            store.get_stock(&sku(&name(SKUS - 2))).await.unwrap(),
            Some(10)
        );
    }

    /// 60 settles racing on one SKU (the Redis store batches them): each reservation moves
    /// exactly once, to the state its own caller asked for, and the counters add up.
    pub async fn concurrent_settles_move_each_reservation_once(store: Arc<dyn Store>) {
        store.set_stock(&sku("settle-race"), 120).await.unwrap();
        let mut ids = Vec::new();
        for i in 0..60u64 {
            let r = req("settle-race", &format!("s-{i}"), 2, 2);
            ids.push(win(&*store, &r, 120 - 2 * (i + 1)).await);
        }
        let settle_all = |ids: Vec<ReservationId>| {
            let tasks: Vec<_> = ids
                .into_iter()
                .enumerate()
                .map(|(i, id)| {
                    let store = Arc::clone(&store);
                    let to = if i % 3 == 0 {
                        Settlement::Uncertain
                    } else {
                        Settlement::Sold
                    };
                    tokio::spawn(async move {
                        store.settle(&sku("settle-race"), &id, to).await.unwrap()
                    })
                })
                .collect();
            async move {
                let mut moved = 0;
                for t in tasks {
                    moved += u32::from(t.await.unwrap());
                }
                moved
            }
        };
        assert_eq!(settle_all(ids.clone()).await, 60);
        assert_eq!(settle_all(ids).await, 0, "a second settle is a no-op");
        let status = store.status(&sku("settle-race")).await.unwrap();
        assert_eq!(status.reservations.held, 0);
        assert_eq!(status.reservations.uncertain, 20);
        assert_eq!(status.reservations.sold, 40);
        assert_eq!(status.units.uncertain, 40);
        assert_eq!(status.units.sold, 80);
    }

    /// The operator's resolve: uncertain → released (units and the user's slot back) or sold,
    /// once; a held reservation only past the minimum age; the books balance throughout.
    pub async fn resolve_once(store: Arc<dyn Store>) {
        let s = sku("resolve-1");
        let hour = Duration::from_secs(3600);
        store.set_stock(&s, 10).await.unwrap();
        let alice = win(&*store, &req("resolve-1", "alice", 1, 1), 9).await;
        let bob = win(&*store, &req("resolve-1", "bob", 2, 2), 7).await;
        let carol = win(&*store, &req("resolve-1", "carol", 1, 1), 6).await;
        for id in [&alice, &bob] {
            assert!(store.settle(&s, id, Settlement::Uncertain).await.unwrap());
        }
        let balanced = |status| {
            let audit = flashgate::audit::check(&status, 0, false, hour);
            assert!(audit.ok, "{:?}", audit.problems);
        };
        balanced(store.status(&s).await.unwrap());

        let resolve = |id: &ReservationId, to, min_age| {
            let (store, s, id) = (Arc::clone(&store), s.clone(), id.clone());
            async move { store.resolve(&s, &id, to, min_age).await.unwrap() }
        };
        assert_eq!(
            resolve(&alice, Resolution::Released, hour).await,
            ResolveOutcome::Resolved {
                from: OpenState::Uncertain,
                quantity: 1,
                remaining: Some(7)
            }
        );
        win(&*store, &req("resolve-1", "alice", 1, 1), 6).await;
        assert_eq!(
            resolve(&bob, Resolution::Sold, hour).await,
            ResolveOutcome::Resolved {
                from: OpenState::Uncertain,
                quantity: 2,
                remaining: None
            }
        );
        // Twice is once, whatever the second asks for.
        for (id, to, state) in [
            (&alice, Resolution::Released, "released"),
            (&alice, Resolution::Sold, "released"),
            (&bob, Resolution::Released, "sold"),
        ] {
            match resolve(id, to, hour).await {
                ResolveOutcome::NotResolvable { state: got, .. } => assert_eq!(got, state),
                other => panic!("{id} → {to:?}: {other:?}"),
            }
        }
        // Held: only past the minimum age.
        match resolve(&carol, Resolution::Released, hour).await {
            ResolveOutcome::NotResolvable { state, age_ms } => {
                assert_eq!(state, "held");
                assert!(age_ms < 60_000, "{age_ms}");
            }
            other => panic!("a young held reservation: {other:?}"),
        }
        assert_eq!(
            resolve(&carol, Resolution::Released, Duration::ZERO).await,
            ResolveOutcome::Resolved {
                from: OpenState::Held,
                quantity: 1,
                remaining: Some(7)
            }
        );
        assert!(
            !store.settle(&s, &carol, Settlement::Sold).await.unwrap(),
            "the instance that held it can no longer settle it"
        );
        assert_eq!(
            resolve(&unknown_id(), Resolution::Sold, hour).await,
            ResolveOutcome::Unknown
        );
        let other = store
            .resolve(&sku("never-1"), &alice, Resolution::Sold, hour)
            .await
            .unwrap();
        assert_eq!(other, ResolveOutcome::Unknown);

        let status = store.status(&s).await.unwrap();
        assert_eq!(status.stock, Some(7));
        assert_eq!(
            status.buyers, 2,
            "alice (again) and bob; carol's slot is free"
        );
        assert_eq!(status.units, counts(1, 2, 2, 0));
        balanced(status);
    }

    /// Listings: only the state asked for, oldest first, bounded, filtered by age.
    pub async fn reservations_are_listed_bounded(store: Arc<dyn Store>) {
        let s = sku("list-1");
        store.set_stock(&s, 10).await.unwrap();
        let mut ids = Vec::new();
        for (i, user) in ["u0", "u1", "u2", "u3", "u4", "u5"].iter().enumerate() {
            ids.push(win(&*store, &req("list-1", user, 1, 1), 9 - i as u64).await);
        }
        for id in &ids[..3] {
            store.settle(&s, id, Settlement::Uncertain).await.unwrap();
        }
        store.settle(&s, &ids[3], Settlement::Sold).await.unwrap();
        let query = |state, limit, older_than| ReservationQuery {
            state,
            older_than,
            limit,
        };
        let page = store
            .reservations(&s, &query(OpenState::Uncertain, 10, Duration::ZERO))
            .await
            .unwrap();
        assert!(!page.truncated);
        let mut users: Vec<&str> = page.reservations.iter().map(|r| r.user.as_str()).collect();
        users.sort_unstable();
        assert_eq!(users, ["u0", "u1", "u2"]);
        assert!(
            page.reservations
                .windows(2)
                .all(|w| w[0].reserved_at_ms <= w[1].reserved_at_ms),
            "oldest first: {page:?}"
        );
        for r in &page.reservations {
            assert_eq!((r.state, r.quantity), (OpenState::Uncertain, 1));
            assert!(ids.contains(&r.id));
        }
        let two = store
            .reservations(&s, &query(OpenState::Uncertain, 2, Duration::ZERO))
            .await
            .unwrap();
        assert_eq!((two.reservations.len(), two.truncated), (2, true));
        let held = store
            .reservations(&s, &query(OpenState::Held, 10, Duration::ZERO))
            .await
            .unwrap();
        let held_ids: HashSet<_> = held.reservations.iter().map(|r| r.id.clone()).collect();
        assert_eq!(held_ids, ids[4..].iter().cloned().collect());
        let old = store
            .reservations(&s, &query(OpenState::Held, 10, Duration::from_secs(3600)))
            .await
            .unwrap();
        assert!(old.reservations.is_empty() && !old.truncated, "{old:?}");
        let none = store
            .reservations(
                &sku("never-2"),
                &query(OpenState::Uncertain, 10, Duration::ZERO),
            )
            .await
            .unwrap();
        assert!(none.reservations.is_empty());
    }

    /// The SKUs ever stocked (set or add), sorted; a sale only closed is not one yet.
    pub async fn stocked_skus_are_listed(store: Arc<dyn Store>) {
        store.set_stock(&sku("sku-b"), 1).await.unwrap();
        store.add_stock(&sku("sku-a"), 0).await.unwrap();
        store.set_stock(&sku("sku-b"), 2).await.unwrap();
        store.set_closed(&sku("sku-c"), true).await.unwrap();
        let all = store.list_skus(10).await.unwrap();
        assert_eq!(all.skus, [sku("sku-a"), sku("sku-b")]);
        assert!(!all.truncated);
        let one = store.list_skus(1).await.unwrap();
        assert_eq!((one.skus, one.truncated), (vec![sku("sku-a")], true));
    }

    /// A route bucket of `per_second`, burst `burst`.
    fn route_bucket(per_second: u32, burst: u32) -> LimitBucket {
        LimitBucket::route(
            Duration::from_secs(1) / per_second,
            NonZeroU32::new(burst).unwrap(),
        )
    }

    fn check(route: &str, buckets: Vec<LimitBucket>) -> LimitCheck {
        LimitCheck {
            route: route_tag(route),
            buckets,
        }
    }

    pub async fn global_limit_admits_the_burst_then_refuses(store: Arc<dyn Store>) {
        let c = check("gl-burst", vec![route_bucket(1, 2)]);
        assert_eq!(store.check_limits(&c).await.unwrap(), LimitVerdict::Allowed);
        assert_eq!(store.check_limits(&c).await.unwrap(), LimitVerdict::Allowed);
        match store.check_limits(&c).await.unwrap() {
            LimitVerdict::Limited {
                bucket: 0,
                retry_after,
            } => assert!(
                retry_after > Duration::ZERO && retry_after <= Duration::from_secs(1),
                "{retry_after:?}"
            ),
            other => panic!("the third within the burst: {other:?}"),
        }
        // Another route's bucket of the same name is its own.
        let other = check("gl-burst-2", vec![route_bucket(1, 1)]);
        assert_eq!(
            store.check_limits(&other).await.unwrap(),
            LimitVerdict::Allowed
        );
    }

    pub async fn global_limit_refills_after_the_wait_it_named(store: Arc<dyn Store>) {
        // 20 a second, burst 1: one token every 50 ms.
        let c = check("gl-refill", vec![route_bucket(20, 1)]);
        assert_eq!(store.check_limits(&c).await.unwrap(), LimitVerdict::Allowed);
        let LimitVerdict::Limited { retry_after, .. } = store.check_limits(&c).await.unwrap()
        else {
            panic!("no token left");
        };
        assert!(retry_after <= Duration::from_millis(50), "{retry_after:?}");
        tokio::time::sleep(retry_after + Duration::from_millis(5)).await;
        assert_eq!(store.check_limits(&c).await.unwrap(), LimitVerdict::Allowed);
    }

    pub async fn global_limit_buckets_are_all_or_nothing(store: Arc<dyn Store>) {
        let ip: std::net::IpAddr = "192.0.2.7".parse().unwrap();
        let user = UserId::parse("alice").unwrap();
        let slow = Duration::from_secs(60);
        let per_ip = LimitBucket::per_ip(ip, slow, NonZeroU32::new(5).unwrap());
        let per_user = LimitBucket::per_user(&user, slow, NonZeroU32::new(3).unwrap());
        let all = check(
            "gl-all",
            vec![per_ip.clone(), per_user.clone(), route_bucket(1, 1)],
        );
        assert_eq!(
            store.check_limits(&all).await.unwrap(),
            LimitVerdict::Allowed
        );
        // The route bucket is empty: refused, and neither the IP's nor the user's bucket pays.
        for _ in 0..5 {
            assert!(matches!(
                store.check_limits(&all).await.unwrap(),
                LimitVerdict::Limited { bucket: 2, .. }
            ));
        }
        let mine = check("gl-all", vec![per_ip, per_user]);
        assert_eq!(
            store.check_limits(&mine).await.unwrap(),
            LimitVerdict::Allowed
        );
        assert_eq!(
            store.check_limits(&mine).await.unwrap(),
            LimitVerdict::Allowed
        );
        // The user's bucket (3) runs out before the IP's (5): it is the one named, with the
        // longer wait.
        match store.check_limits(&mine).await.unwrap() {
            LimitVerdict::Limited {
                bucket: 1,
                retry_after,
            } => assert!(retry_after > Duration::from_secs(50), "{retry_after:?}"),
            other => panic!("the user's bucket is empty: {other:?}"),
        }
        let empty = check("gl-all", vec![]);
        assert!(matches!(
            store.check_limits(&empty).await,
            Err(StoreError::Invalid(_))
        ));
    }

    pub async fn concurrent_global_checks_admit_exactly_the_burst(store: Arc<dyn Store>) {
        // One token a minute, burst 10; 100 checks at once (on Redis, batched): exactly 10.
        let c = Arc::new(check(
            "gl-storm",
            vec![LimitBucket::route(
                Duration::from_secs(60),
                NonZeroU32::new(10).unwrap(),
            )],
        ));
        let tasks: Vec<_> = (0..100)
            .map(|_| {
                let (store, c) = (Arc::clone(&store), Arc::clone(&c));
                tokio::spawn(async move { store.check_limits(&c).await.unwrap() })
            })
            .collect();
        let mut allowed = 0;
        for t in tasks {
            if t.await.unwrap() == LimitVerdict::Allowed {
                allowed += 1;
            }
        }
        assert_eq!(allowed, 10);
    }
}

/// One `#[tokio::test]` per case, for the store `$fixture` builds.
macro_rules! conformance {
    ($fixture:ident: $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let f = super::$fixture().await;
                super::cases::$case(Arc::clone(&f.store)).await;
            }
        )*
    };
}

macro_rules! all_cases {
    ($fixture:ident) => {
        conformance!($fixture:
            won,
            sold_out_reports_remaining,
            per_user_limit_one,
            per_user_limit_three,
            repeat_buyer_is_told_even_when_sold_out,
            not_configured_never_wins,
            release_once,
            released_unit_can_be_won_again,
            quantity_above_one,
            settle_and_status,
            stock_admin,
            bad_skus_are_invalid,
            users_may_contain_separators,
            concurrent_buyers_never_oversell,
            buyers_arriving_together_are_decided_in_turn,
            buyers_of_many_skus_arriving_together,
            concurrent_settles_move_each_reservation_once,
            resolve_once,
            reservations_are_listed_bounded,
            stocked_skus_are_listed,
            global_limit_admits_the_burst_then_refuses,
            global_limit_refills_after_the_wait_it_named,
            global_limit_buckets_are_all_or_nothing,
            concurrent_global_checks_admit_exactly_the_burst,
        );
    };
}

mod memory {
    use super::*;
    all_cases!(memory_fixture);

    #[test]
    fn kind() {
        assert_eq!(MemoryStore::new().kind(), "memory");
    }
}

mod redis {
    use super::*;
    all_cases!(redis_fixture);
}

mod cluster {
    use super::*;
    all_cases!(cluster_fixture);
}

/// What only the Redis store can get wrong.
mod redis_only {
    use super::*;
    use std::time::Instant;

    fn short_timeouts(server: &RedisServer) -> RedisConfig {
        RedisConfig {
            connect_timeout: Duration::from_millis(200),
            response_timeout: Duration::from_millis(200),
            ..config(server)
        }
    }

    /// Poll `f` until it returns true; panic after `within`.
    async fn eventually<F, Fut>(within: Duration, what: &str, mut f: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = Instant::now() + within;
        while !f().await {
            assert!(Instant::now() < deadline, "timed out waiting for: {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Run `call`, expect `Unavailable`, and return how long it took.
    async fn unavailable<T: std::fmt::Debug>(
        call: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Duration {
        let started = Instant::now();
        let result = call.await;
        let elapsed = started.elapsed();
        assert!(
            matches!(result, Err(StoreError::Unavailable(_))),
            "expected Unavailable, got {result:?}"
        );
        elapsed
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn kind_and_keys_follow_the_data_model() {
        let server = RedisServer::start();
        let store = RedisStore::connect(&config(&server)).await.unwrap();
        assert_eq!(store.kind(), "redis");
        store.ping().await.unwrap();

        store.set_stock(&sku("abc-1"), 3).await.unwrap();
        assert_eq!(server.get("fg:{abc-1}:stock").as_deref(), Some("3"));
        let id = win(&store, &req("abc-1", "al|ice", 2, 2), 1).await;

        assert_eq!(server.get("fg:{abc-1}:stock").as_deref(), Some("1"));
        assert_eq!(
            server.hget("fg:{abc-1}:buyers", "al|ice").as_deref(),
            Some("2")
        );
        let record = server.hget("fg:{abc-1}:res", id.as_str()).unwrap();
        let parts: Vec<&str> = record.splitn(4, '|').collect();
        assert_eq!(parts[0], "held");
        assert_eq!(parts[1], "2");
        assert_eq!(parts[3], "al|ice");
        let ms: u128 = parts[2].parse().unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis();
        assert!(now.abs_diff(ms) < 60_000, "record time {ms} vs now {now}");
        assert_eq!(
            server.hget("fg:{abc-1}:stats", "res:held").as_deref(),
            Some("1")
        );
        assert_eq!(
            server.hget("fg:{abc-1}:stats", "units:held").as_deref(),
            Some("2")
        );

        store
            .settle(&sku("abc-1"), &id, Settlement::Uncertain)
            .await
            .unwrap();
        let record = server.hget("fg:{abc-1}:res", id.as_str()).unwrap();
        assert!(record.starts_with("uncertain|2|"), "{record}");

        // A custom prefix moves every key; braces in it are refused.
        let other = RedisStore::connect(&RedisConfig {
            key_prefix: "shop7".into(),
            ..config(&server)
        })
        .await
        .unwrap();
        other.set_stock(&sku("abc-1"), 9).await.unwrap();
        assert_eq!(server.get("shop7:{abc-1}:stock").as_deref(), Some("9"));
        assert_eq!(store.get_stock(&sku("abc-1")).await.unwrap(), Some(1));
        let bad = RedisStore::connect(&RedisConfig {
            key_prefix: "f{g}".into(),
            ..config(&server)
        })
        .await;
        assert!(matches!(bad, Err(StoreError::Invalid(_))));
        let zero = RedisStore::connect(&RedisConfig {
            connections: 0,
            ..config(&server)
        })
        .await;
        assert!(matches!(zero, Err(StoreError::Invalid(_))));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn script_flush_between_calls_is_handled() {
        let server = RedisServer::start();
        let store = RedisStore::connect(&config(&server)).await.unwrap();
        store.set_stock(&sku("flush-1"), 3).await.unwrap();
        let a = win(&store, &req("flush-1", "alice", 1, 1), 2).await;
        server.script_flush();
        let b = win(&store, &req("flush-1", "bob", 1, 1), 1).await;
        server.script_flush();
        assert_eq!(
            store.release(&sku("flush-1"), &a).await.unwrap(),
            ReleaseOutcome::Released { remaining: 2 }
        );
        server.script_flush();
        assert!(
            store
                .settle(&sku("flush-1"), &b, Settlement::Sold)
                .await
                .unwrap()
        );
        server.script_flush();
        assert_eq!(store.add_stock(&sku("flush-1"), 1).await.unwrap(), 3);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn killed_server_is_unavailable_then_recovers_after_restart() {
        let mut server = RedisServer::start();
        let store = RedisStore::connect(&short_timeouts(&server)).await.unwrap();
        store.set_stock(&sku("kill-1"), 10).await.unwrap();
        win(&store, &req("kill-1", "alice", 1, 1), 9).await;

        server.kill();
        let bound = Duration::from_secs(2);
        // Several rounds so every pooled connection notices the loss.
        for i in 0..8 {
            let user = format!("user-{i}");
            assert!(unavailable(store.reserve(&req("kill-1", &user, 1, 1))).await < bound);
            assert!(unavailable(store.release(&sku("kill-1"), &unknown_id())).await < bound);
            assert!(
                unavailable(store.settle(&sku("kill-1"), &unknown_id(), Settlement::Sold)).await
                    < bound
            );
            assert!(unavailable(store.get_stock(&sku("kill-1"))).await < bound);
            assert!(unavailable(store.set_stock(&sku("kill-1"), 1)).await < bound);
            assert!(unavailable(store.add_stock(&sku("kill-1"), 1)).await < bound);
            assert!(unavailable(store.status(&sku("kill-1"))).await < bound);
        }

        // A fresh, empty server on the same socket: no data, no scripts.
        server.restart();
        eventually(Duration::from_secs(5), "store reconnects", || async {
            store.set_stock(&sku("kill-1"), 2).await.is_ok()
        })
        .await;
        // Every connection in the pool works again, scripts reload on NOSCRIPT.
        for _ in 0..8 {
            store.get_stock(&sku("kill-1")).await.unwrap();
        }
        win(&store, &req("kill-1", "alice", 1, 1), 1).await;
        win(&store, &req("kill-1", "bob", 1, 1), 0).await;
        assert_eq!(
            store.reserve(&req("kill-1", "carol", 1, 1)).await.unwrap(),
            ReserveOutcome::SoldOut { remaining: 0 }
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn store_starts_while_redis_is_down() {
        let mut server = RedisServer::start();
        server.kill();
        let started = Instant::now();
        let store = RedisStore::connect(&short_timeouts(&server)).await.unwrap();
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(
            unavailable(store.reserve(&req("down-1", "alice", 1, 1))).await
                < Duration::from_secs(2)
        );
        assert!(unavailable(store.ping()).await < Duration::from_secs(2));

        server.restart();
        eventually(Duration::from_secs(5), "store connects", || async {
            store.set_stock(&sku("down-1"), 1).await.is_ok()
        })
        .await;
        win(&store, &req("down-1", "alice", 1, 1), 0).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn frozen_server_times_out_then_recovers() {
        let server = RedisServer::start();
        let store = RedisStore::connect(&short_timeouts(&server)).await.unwrap();
        store.set_stock(&sku("frozen-1"), 5).await.unwrap();

        server.pause();
        for i in 0..6 {
            let user = format!("user-{i}");
            let elapsed = unavailable(store.reserve(&req("frozen-1", &user, 1, 1))).await;
            assert!(elapsed < Duration::from_secs(2), "took {elapsed:?}");
        }
        server.resume();

        eventually(Duration::from_secs(5), "store answers again", || async {
            store.get_stock(&sku("frozen-1")).await.is_ok()
        })
        .await;
        // Reservations whose answer was lost may have gone through (fail
        // closed: a unit held by nobody, never an oversell). The books balance.
        let status = store.status(&sku("frozen-1")).await.unwrap();
        assert_eq!(status.stock.unwrap() + status.units.held, 5);
        let left = status.stock.unwrap();
        if left > 0 {
            win(&store, &req("frozen-1", "late-buyer", 1, 1), left - 1).await;
        }
    }

    /// A global limit's keys: `<prefix>:{limit:<route>}:<bucket>`, one Cluster slot per
    /// route, the store's prefix first, the user id hashed, and a PEXPIRE so an idle key goes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn global_limit_keys_follow_the_data_model_and_expire() {
        let server = RedisServer::start();
        let store = RedisStore::connect(&RedisConfig {
            key_prefix: "shop7".into(),
            ..config(&server)
        })
        .await
        .unwrap();
        let user = UserId::parse("alice").unwrap();
        let per_user =
            LimitBucket::per_user(&user, Duration::from_secs(2), NonZeroU32::new(1).unwrap());
        let check = LimitCheck {
            route: route_tag("flash-buy"),
            buckets: vec![
                per_user.clone(),
                LimitBucket::route(Duration::from_millis(10), NonZeroU32::new(1).unwrap()),
            ],
        };
        assert_eq!(
            store.check_limits(&check).await.unwrap(),
            LimitVerdict::Allowed
        );
        let user_key = format!("shop7:{{limit:flash-buy}}:{}", per_user.key);
        assert!(per_user.key.starts_with("per_user:") && !per_user.key.contains("alice"));
        let ttl = |key: &str| match server.cli(&["PTTL", key]) {
            ::redis::Value::Int(ms) => ms,
            other => panic!("PTTL {key}: {other:?}"),
        };
        let user_ttl = ttl(&user_key);
        assert!(
            (1000..=2001).contains(&user_ttl),
            "per_user PTTL {user_ttl}"
        );
        assert!(server.get(&user_key).is_some());
        // The route bucket (a token every 10 ms) is full again, and gone, within ~11 ms.
        let route_key = "shop7:{limit:flash-buy}:route";
        eventually(
            Duration::from_secs(2),
            "the idle route key expires",
            || async { server.get(route_key).is_none() },
        )
        .await;
        // A route name that would break the tag is hashed.
        let odd = LimitCheck {
            route: route_tag("flash {buy}"),
            buckets: vec![LimitBucket::route(Duration::from_secs(1), NonZeroU32::MIN)],
        };
        assert_eq!(
            store.check_limits(&odd).await.unwrap(),
            LimitVerdict::Allowed
        );
        let key = format!("shop7:{{limit:{}}}:route", route_tag("flash {buy}"));
        assert!(server.get(&key).is_some(), "{key}");
    }

    /// `gcra.lua` survives a script cache flush (EVALSHA → NOSCRIPT → EVAL), and a frozen
    /// server costs a global check no more than the response timeout.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn global_limits_survive_script_flush_and_time_out_on_a_frozen_server() {
        let server = RedisServer::start();
        let store = RedisStore::connect(&short_timeouts(&server)).await.unwrap();
        let check = LimitCheck {
            route: route_tag("flushy"),
            buckets: vec![LimitBucket::route(
                Duration::from_secs(60),
                NonZeroU32::new(2).unwrap(),
            )],
        };
        assert_eq!(
            store.check_limits(&check).await.unwrap(),
            LimitVerdict::Allowed
        );
        server.script_flush();
        assert_eq!(
            store.check_limits(&check).await.unwrap(),
            LimitVerdict::Allowed
        );
        server.script_flush();
        assert!(matches!(
            store.check_limits(&check).await.unwrap(),
            LimitVerdict::Limited { bucket: 0, .. }
        ));
        server.pause();
        let elapsed = unavailable(store.check_limits(&check)).await;
        server.resume();
        assert!(elapsed < Duration::from_secs(1), "took {elapsed:?}");
    }

    /// Global checks of one route arriving together on one thread share script calls.
    #[tokio::test(flavor = "current_thread")]
    async fn global_checks_arriving_together_share_script_calls() {
        let server = RedisServer::start();
        let store: Arc<dyn Store> = Arc::new(RedisStore::connect(&config(&server)).await.unwrap());
        let check = Arc::new(LimitCheck {
            route: route_tag("together"),
            buckets: vec![LimitBucket::route(
                Duration::from_secs(60),
                NonZeroU32::new(50).unwrap(),
            )],
        });
        let before = server.script_calls();
        let tasks: Vec<_> = (0..300)
            .map(|_| {
                let (store, check) = (Arc::clone(&store), Arc::clone(&check));
                tokio::spawn(async move { store.check_limits(&check).await.unwrap() })
            })
            .collect();
        let mut allowed = 0;
        for t in tasks {
            if t.await.unwrap() == LimitVerdict::Allowed {
                allowed += 1;
            }
        }
        let calls = server.script_calls() - before;
        assert_eq!(allowed, 50);
        assert!(
            calls <= 10,
            "{calls} script calls for 300 checks arriving together"
        );
    }

    /// Reserves that arrive on one thread together go to Redis together: 300 buyers on a
    /// current-thread runtime cost a handful of script calls, not 300, and still exactly
    /// the stock is won.
    #[tokio::test(flavor = "current_thread")]
    async fn reserves_arriving_together_share_script_calls() {
        let server = RedisServer::start();
        let store: Arc<dyn Store> = Arc::new(RedisStore::connect(&config(&server)).await.unwrap());
        store.set_stock(&sku("batch-1"), 100).await.unwrap();
        let before = server.script_calls();
        let tasks = buyers_at_once(&store, "batch-1", 300);
        let mut won = 0;
        for task in tasks {
            if let ReserveOutcome::Won { .. } = task.await.unwrap() {
                won += 1;
            }
        }
        let calls = server.script_calls() - before;
        assert_eq!(won, 100);
        assert_eq!(store.get_stock(&sku("batch-1")).await.unwrap(), Some(0));
        // 300 buyers in batches of at most 64: 5 calls, plus a reload if the cache missed.
        assert!(
            calls <= 10,
            "{calls} script calls for 300 buyers arriving together"
        );
    }

    /// Buyers of 20 SKUs arriving together on one Redis server share script calls across
    /// SKUs (a sale of many SKUs costs Redis no more calls than a sale of one).
    #[tokio::test(flavor = "current_thread")]
    async fn reserves_of_many_skus_arriving_together_share_script_calls() {
        let server = RedisServer::start();
        let store: Arc<dyn Store> = Arc::new(RedisStore::connect(&config(&server)).await.unwrap());
        for k in 0..20 {
            store.set_stock(&sku(&format!("mix-{k}")), 3).await.unwrap();
        }
        let before = server.script_calls();
        let tasks: Vec<_> = (0..200)
            .map(|i| {
                let store = Arc::clone(&store);
                let sku = sku(&format!("mix-{}", i % 20));
                tokio::spawn(async move {
                    let r = req(sku.as_str(), &format!("user-{i}"), 1, 1);
                    (sku, store.reserve(&r).await.unwrap())
                })
            })
            .collect();
        let mut won = 0;
        let mut winners = Vec::new();
        for task in tasks {
            if let (sku, ReserveOutcome::Won { reservation, .. }) = task.await.unwrap() {
                won += 1;
                winners.push((sku, reservation));
            }
        }
        let calls = server.script_calls() - before;
        assert_eq!(won, 60, "3 units of each of 20 SKUs");
        // 200 buyers in batches of at most 64: 4 calls, plus a reload if the cache missed
        // (one call per SKU would be 20 or more).
        assert!(calls <= 8, "{calls} script calls for 200 buyers of 20 SKUs");

        // Their 60 settles, all at once: one batch for every SKU.
        let settles: Vec<_> = winners
            .into_iter()
            .map(|(sku, id)| {
                let store = Arc::clone(&store);
                tokio::spawn(
                    async move { store.settle(&sku, &id, Settlement::Sold).await.unwrap() },
                )
            })
            .collect();
        let before = server.script_calls();
        let mut moved = 0;
        for settle in settles {
            moved += u32::from(settle.await.unwrap());
        }
        let calls = server.script_calls() - before;
        assert_eq!(moved, 60);
        assert!(calls <= 3, "{calls} script calls for 60 settles of 20 SKUs");
    }

    /// A buyer who disconnects while its reserve is with Redis (hyper drops the request
    /// future) must not leave a unit held for nobody: the reply still arrives, finds no one
    /// waiting, and the unit goes back.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn buyer_gone_mid_reserve_leaves_no_unit_held() {
        let server = RedisServer::start();
        let store = RedisStore::connect(&config(&server)).await.unwrap();
        store.set_stock(&sku("left-1"), 3).await.unwrap();

        server.pause();
        let gave_up = tokio::time::timeout(
            Duration::from_millis(300),
            store.reserve(&req("left-1", "impatient", 1, 1)),
        )
        .await;
        assert!(gave_up.is_err(), "a frozen Redis answered: {gave_up:?}");
        server.resume();

        // The reserve ran once Redis thawed (a unit held for nobody), then was released.
        eventually(
            Duration::from_secs(5),
            "the stranded unit is back",
            || async {
                let status = store.status(&sku("left-1")).await.unwrap();
                status.reservations.released == 1
                    && status.stock == Some(3)
                    && status.units.held == 0
                    && status.buyers == 0
            },
        )
        .await;
        // The buyer may come back and win.
        win(&store, &req("left-1", "impatient", 1, 1), 2).await;
    }

    /// Several flashgate instances (stores) share one Redis: still exactly
    /// the stock is won.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn instances_sharing_redis_never_oversell() {
        let server = RedisServer::start();
        let mut stores: Vec<Arc<dyn Store>> = Vec::new();
        for _ in 0..3 {
            stores.push(Arc::new(
                RedisStore::connect(&config(&server)).await.unwrap(),
            ));
        }
        stores[0].set_stock(&sku("multi-1"), 50).await.unwrap();
        let tasks: Vec<_> = (0..600)
            .map(|i| {
                let store = Arc::clone(&stores[i % stores.len()]);
                tokio::spawn(async move {
                    store
                        .reserve(&req("multi-1", &format!("user-{}", i % 300), 1, 1))
                        .await
                        .unwrap()
                })
            })
            .collect();
        let mut won = 0;
        for task in tasks {
            if let ReserveOutcome::Won { .. } = task.await.unwrap() {
                won += 1;
            }
        }
        assert_eq!(won, 50);
        let status = stores[1].status(&sku("multi-1")).await.unwrap();
        assert_eq!(status.stock, Some(0));
        assert_eq!(status.buyers, 50, "each winner is a distinct user");
    }

    /// A released reservation's unit goes back, but a late release after the
    /// operator deleted the stock key does not reopen the sale.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn release_does_not_recreate_deleted_stock() {
        let server = RedisServer::start();
        let store = RedisStore::connect(&config(&server)).await.unwrap();
        store.set_stock(&sku("gone-1"), 1).await.unwrap();
        let id = win(&store, &req("gone-1", "alice", 1, 1), 0).await;
        server.cli(&["DEL", "fg:{gone-1}:stock"]);
        assert_eq!(
            store.release(&sku("gone-1"), &id).await.unwrap(),
            ReleaseOutcome::Released { remaining: 0 }
        );
        assert_eq!(store.get_stock(&sku("gone-1")).await.unwrap(), None);
        assert_eq!(
            store.reserve(&req("gone-1", "bob", 1, 1)).await.unwrap(),
            ReserveOutcome::NotConfigured
        );
    }
}
