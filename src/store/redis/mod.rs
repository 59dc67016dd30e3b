//! The Redis store: every decision is one Lua script, run atomically on the
//! server, so many flashgate instances can share one Redis without overselling.
//!
//! This file is the readable top: [`RedisConfig`], [`RedisStore`] and its [`Store`] impl, and
//! the one-call operations (release, stock, status). The machinery underneath has a file each:
//!
//! - `link.rs`: one connection, to a single server or to a Redis Cluster (commands sent to
//!   the node owning the sale's slot, redirects followed, never a command run twice).
//! - `pool.rs`: the per-thread connections, (re)connected lazily in the background, so a Redis
//!   outage is a fast 503 and never a per-request hang, and [`RedisStore::connect`] never fails
//!   because Redis is down. Every call is bounded by `response_timeout` as a whole.
//! - `scripts.rs`: `lua/*.lua`, embedded at build time and run as `EVALSHA`, reloaded on
//!   `NOSCRIPT`.
//! - `reserve.rs`: reserves arriving on one thread in the same scheduler turn go to Redis as
//!   one `reserve.lua` call (any SKUs on one server, one SKU's on a cluster); a unit won for a buyer who is gone, or whose reply was
//!   lost, is cancelled in the background.
//! - `settle.rs`: settles batched the same way (any SKUs on one server), one `settle.lua` call
//!   per batch.
//! - `limits.rs`: global rate limits, batched per route the same way, one `gcra.lua` call
//!   per batch.
//! - `room.rs`: waiting rooms, one `room.lua` call per decision.
//! - `batch.rs`: the per-thread, per-SKU queue both kinds of batch wait in.
//! - `reply.rs`: turning script replies into outcomes and errors.
//! - `events.rs`: the subscription that hears the other instances' stock changes.
//! - `audit.rs`: the registry of SKUs, bounded listings of a sale's open reservations, the
//!   operator's resolve.

mod audit;
mod batch;
mod events;
mod limits;
mod link;
mod pool;
mod reply;
mod reserve;
mod room;
mod scripts;
mod settle;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use redis::cluster::ClusterClient;
use redis::{AsyncConnectionConfig, Client, Value};
use thread_local::ThreadLocal;

use self::batch::Batches;
use self::limits::LimitWaiter;
use self::link::Connector;
use self::pool::Pool;
pub use self::pool::RECONNECT_BACKOFF;
use self::reply::{
    added_overflow, convert, int, non_negative, split_reply, stock_value, text, unexpected,
};
use self::reserve::ReserveWaiter;
use self::scripts::LuaScript;
pub use self::scripts::Replication;
use self::settle::SettleQueues;
use super::{
    LimitCheck, LimitVerdict, MAX_UNITS, ReleaseOutcome, ReservationId, ReservationPage,
    ReservationQuery, ReserveOutcome, ReserveRequest, Resolution, ResolveOutcome, SaleKeys,
    SaleStatus, Settlement, Sku, SkuList, StateCounts, StockSet, StoreError, StoreImpl,
    validate_delta, validate_units,
};
pub use crate::config::RedisTarget;

/// How to reach Redis and how long to wait for it.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// One server or a cluster's seed nodes.
    pub target: RedisTarget,
    /// Multiplexed connections used round-robin (at least 1).
    pub connections: usize,
    /// Bound on one connect attempt (TCP/unix connect + handshake).
    pub connect_timeout: Duration,
    /// Bound on one store call, end to end.
    pub response_timeout: Duration,
    /// First part of every key (`fg` → `fg:{sku}:stock`). Must not contain `{` or `}`.
    pub key_prefix: String,
    /// With `rediss://`: a CA to trust instead of the system's, a client certificate.
    pub tls: Option<crate::config::RedisTls>,
    /// Replicas that must hold a reservation before its buyer is forwarded (`WAIT`).
    pub wait_replicas: Option<Replication>,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            target: RedisTarget::Node("redis://127.0.0.1:6379".into()),
            connections: 4,
            connect_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_millis(250),
            key_prefix: "fg".into(),
            tls: None,
            wait_replicas: None,
        }
    }
}

impl RedisConfig {
    /// Defaults with one server's URL.
    pub fn new(url: impl Into<String>) -> Self {
        RedisConfig {
            target: RedisTarget::Node(url.into()),
            ..RedisConfig::default()
        }
    }
}

/// [`Store`] backed by Redis; see the module docs.
pub struct RedisStore {
    shared: Arc<Shared>,
}

/// The store itself, shared with the tasks that outlive a call (reserve batches, cancels).
struct Shared {
    pool: Pool,
    next: AtomicUsize,
    prefix: String,
    response_timeout: Duration,
    reserve: LuaScript,
    release: LuaScript,
    settle: LuaScript,
    add_stock: LuaScript,
    set_stock: LuaScript,
    set_closed: LuaScript,
    gcra: LuaScript,
    room: LuaScript,
    /// Reserves waiting to be sent together (see [`Shared::reserve_inner`]).
    reserves: ThreadLocal<Arc<Batches<ReserveWaiter>>>,
    /// Settles waiting to be sent together (see [`Shared::settle_inner`]).
    settles: ThreadLocal<SettleQueues>,
    /// Global limit checks waiting to be sent together, by route (see `limits.rs`).
    limits: ThreadLocal<Arc<Batches<LimitWaiter>>>,
    /// Where stock changes are published (`<prefix>:events`), and the clients that may
    /// subscribe to it (see `events.rs`).
    events_channel: String,
    event_clients: Vec<Client>,
    connect_timeout: Duration,
    /// `store.wait_replicas` (see `reserve.rs`).
    replication: Option<Replication>,
    /// One server: a reserve batch may hold buyers of several SKUs (on a cluster, one SKU:
    /// a script runs on one slot).
    mixed_batches: bool,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("connections", &self.shared.pool.size())
            .field("prefix", &self.shared.prefix)
            .field("response_timeout", &self.shared.response_timeout)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Build the store. Fails only on a bad configuration (URL, prefix,
    /// `connections == 0`), never because Redis is down: the first connect
    /// attempts start here (waiting at most `connect_timeout`), and later
    /// calls keep retrying.
    pub async fn connect(cfg: &RedisConfig) -> Result<RedisStore, StoreError> {
        if cfg.connections == 0 {
            return Err(StoreError::Invalid(
                "redis connections must be at least 1".into(),
            ));
        }
        if cfg.key_prefix.contains(['{', '}']) {
            // A brace in the prefix would become the hash tag instead of {sku}.
            return Err(StoreError::Invalid(format!(
                "redis key prefix {:?} must not contain '{{' or '}}'",
                cfg.key_prefix
            )));
        }
        let (connector, event_clients) = connector(cfg)?;
        let pool = Pool::new(connector, cfg.connect_timeout, cfg.connections);
        // Connect this thread's slots now, so the first buyers do not pay for it.
        pool.warm_up().await;
        Ok(RedisStore {
            shared: Arc::new(Shared::new(pool, event_clients, cfg)),
        })
    }

    /// `PING` through one connection: a readiness check for the admin API.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.shared.ping().await
    }
}

/// How the pool's slots will connect (a client for the one server or for the cluster, with
/// the TLS settings and timeouts), and the clients the event subscription tries in turn (the
/// server, or each seed). Fails only on a bad URL.
fn connector(cfg: &RedisConfig) -> Result<(Connector, Vec<Client>), StoreError> {
    let certs = cfg.tls.as_ref().map(|tls| {
        // ring, the one TLS provider built in; an error means one is installed already.
        let _ = rustls::crypto::ring::default_provider().install_default();
        redis::TlsCertificates {
            client_tls: tls
                .client
                .as_ref()
                .map(|(cert, key)| redis::ClientTlsConfig {
                    client_cert: cert.clone(),
                    client_key: key.clone(),
                }),
            root_cert: tls.ca.clone(),
        }
    });
    let bad_url = |url: &str, e: redis::RedisError| {
        StoreError::Invalid(format!(
            "redis url {:?}: {e}",
            crate::config::mask_password(url)
        ))
    };
    let node_client = |url: &str| {
        match certs.clone() {
            None => Client::open(url),
            Some(certs) => Client::build_with_tls(url, certs),
        }
        .map_err(|e| bad_url(url, e))
    };
    match &cfg.target {
        RedisTarget::Node(url) => {
            let client = node_client(url)?;
            let config = AsyncConnectionConfig::new()
                .set_connection_timeout(Some(cfg.connect_timeout))
                .set_response_timeout(Some(cfg.response_timeout));
            Ok((Connector::Node(client.clone(), config), vec![client]))
        }
        RedisTarget::Cluster(seeds) => {
            if seeds.is_empty() {
                return Err(StoreError::Invalid(
                    "a redis cluster needs at least one seed node".into(),
                ));
            }
            let mut builder = ClusterClient::builder(seeds.iter().map(String::as_str))
                .connection_timeout(cfg.connect_timeout)
                .response_timeout(cfg.response_timeout)
                // No resends: `link.rs` retries only what provably did not run.
                .retries(0)
                // RESP3: a node's dropped connection is announced (a push) and repaired at
                // once, so the first buyer after a failover does not discover it with a 503.
                .use_protocol(redis::ProtocolVersion::RESP3);
            if let Some(certs) = certs.clone() {
                builder = builder.certs(certs);
            }
            let client = builder.build().map_err(|e| bad_url(&seeds.join(", "), e))?;
            let seeds = seeds
                .iter()
                .map(|s| node_client(s))
                .collect::<Result<_, _>>()?;
            Ok((Connector::Cluster(client), seeds))
        }
    }
}

impl Shared {
    fn new(pool: Pool, event_clients: Vec<Client>, cfg: &RedisConfig) -> Shared {
        Shared {
            events_channel: format!("{}:events", cfg.key_prefix),
            event_clients,
            connect_timeout: cfg.connect_timeout,
            replication: cfg.wait_replicas,
            mixed_batches: matches!(cfg.target, RedisTarget::Node(_)),
            pool,
            next: AtomicUsize::new(0),
            prefix: cfg.key_prefix.clone(),
            response_timeout: cfg.response_timeout,
            reserve: LuaScript::new(include_str!("../../../lua/reserve.lua")),
            release: LuaScript::new(include_str!("../../../lua/release.lua")),
            settle: LuaScript::new(include_str!("../../../lua/settle.lua")),
            add_stock: LuaScript::new(include_str!("../../../lua/add_stock.lua")),
            set_stock: LuaScript::new(include_str!("../../../lua/set_stock.lua")),
            set_closed: LuaScript::new(include_str!("../../../lua/set_closed.lua")),
            gcra: LuaScript::new(include_str!("../../../lua/gcra.lua")),
            room: LuaScript::new(include_str!("../../../lua/room.lua")),
            reserves: ThreadLocal::new(),
            settles: ThreadLocal::new(),
            limits: ThreadLocal::new(),
        }
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let reply = self
            .with_conn(|mut c| async move { redis::cmd("PING").query_async::<Value>(&mut c).await })
            .await?;
        let reply: String = convert(reply, "PING")?;
        if reply == "PONG" {
            Ok(())
        } else {
            Err(StoreError::Protocol(format!("PING answered {reply:?}")))
        }
    }

    fn keys(&self, sku: &Sku) -> SaleKeys {
        SaleKeys::new(&self.prefix, sku)
    }

    async fn release_inner(
        &self,
        sku: &Sku,
        id: &ReservationId,
        mode: Mode,
    ) -> Result<ReleaseOutcome, StoreError> {
        let keys = self.keys(sku);
        let mode: &[u8] = match mode {
            Mode::Release => b"release",
            Mode::Cancel => b"cancel",
        };
        let reply = self
            .run_script(&self.release, &keys, &[id.as_str().as_bytes(), mode])
            .await?;
        let (status, rest) = split_reply(reply, "release")?;
        match (status.as_str(), rest.as_slice()) {
            ("released", [remaining]) => Ok(ReleaseOutcome::Released {
                remaining: non_negative(remaining, "release remaining")?,
            }),
            ("not_held", []) => Ok(ReleaseOutcome::NotHeld { state: None }),
            ("not_held", [state]) => Ok(ReleaseOutcome::NotHeld {
                state: Some(text(state).ok_or_else(|| unexpected("release", &status, &rest))?),
            }),
            _ => Err(unexpected("release", &status, &rest)),
        }
    }

    async fn set_stock_inner(
        &self,
        sku: &Sku,
        units: u64,
        expect: Option<u64>,
    ) -> Result<StockSet, StoreError> {
        let keys = self.keys(sku);
        validate_units("stock", units)?;
        let units_arg = units.to_string();
        let expect_arg = match expect {
            Some(e) => validate_units("expect", e)?.to_string(),
            None => String::new(),
        };
        self.register(sku).await?;
        let reply = self
            .run_script(
                &self.set_stock,
                &keys,
                &[units_arg.as_bytes(), expect_arg.as_bytes()],
            )
            .await?;
        let (status, rest) = split_reply(reply, "set_stock")?;
        match (status.as_str(), rest.as_slice()) {
            ("ok", [stock]) => Ok(StockSet::Set {
                stock: non_negative(stock, "set_stock result")?,
            }),
            ("changed", []) => Ok(StockSet::Changed { current: None }),
            ("changed", [current]) => Ok(StockSet::Changed {
                current: Some(non_negative(current, "set_stock current")?),
            }),
            ("added_overflow", [added]) => Err(added_overflow(added)),
            _ => Err(unexpected("set_stock", &status, &rest)),
        }
    }

    async fn add_stock_inner(&self, sku: &Sku, delta: i64) -> Result<u64, StoreError> {
        let keys = self.keys(sku);
        validate_delta(delta)?;
        let delta_arg = delta.to_string();
        self.register(sku).await?;
        let reply = self
            .run_script(&self.add_stock, &keys, &[delta_arg.as_bytes()])
            .await?;
        let (status, rest) = split_reply(reply, "add_stock")?;
        match (status.as_str(), rest.as_slice()) {
            ("ok", [stock]) => non_negative(stock, "add_stock result"),
            ("negative", [current]) => Err(StoreError::Invalid(format!(
                "stock would become negative ({} + {delta})",
                int(current).unwrap_or(0)
            ))),
            ("overflow", [current]) => Err(StoreError::Invalid(format!(
                "stock would exceed {MAX_UNITS} (2^53 - 1): {} + {delta}",
                int(current).unwrap_or(0)
            ))),
            ("added_overflow", [added]) => Err(added_overflow(added)),
            ("out_of_range", [raw]) => Err(StoreError::Invalid(format!(
                "the stock key holds {}, beyond {MAX_UNITS} (2^53 - 1): set the stock to fix it",
                text(raw).unwrap_or_default()
            ))),
            _ => Err(unexpected("add_stock", &status, &rest)),
        }
    }

    /// `set_closed.lua`: the flag, and the event every instance hears.
    async fn set_closed_inner(&self, sku: &Sku, closed: bool) -> Result<(), StoreError> {
        let keys = self.keys(sku);
        let flag: &[u8] = if closed { b"1" } else { b"0" };
        let reply = self.run_script(&self.set_closed, &keys, &[flag]).await?;
        match reply {
            Value::Okay | Value::SimpleString(_) | Value::BulkString(_) => Ok(()),
            other => Err(StoreError::Protocol(format!(
                "set_closed answered {other:?}"
            ))),
        }
    }

    async fn get_stock_inner(&self, sku: &Sku) -> Result<Option<u64>, StoreError> {
        let keys = self.keys(sku);
        let stock = keys.stock;
        let reply = self
            .with_conn(|mut c| async move {
                redis::cmd("GET")
                    .arg(&stock)
                    .query_async::<Value>(&mut c)
                    .await
            })
            .await?;
        let raw: Option<i64> = convert(reply, "GET stock")?;
        raw.map(stock_value).transpose()
    }

    async fn status_inner(&self, sku: &Sku) -> Result<SaleStatus, StoreError> {
        let keys = self.keys(sku);
        // MULTI/EXEC so stock, buyers and counters come from one instant.
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("GET")
            .arg(&keys.stock)
            .cmd("HLEN")
            .arg(&keys.buyers)
            .cmd("HGETALL")
            .arg(&keys.stats);
        let reply = self
            .with_conn(|mut c| async move { pipe.query_async::<Value>(&mut c).await })
            .await?;
        let (stock, buyers, stats): (Option<i64>, u64, HashMap<String, i64>) =
            convert(reply, "status")?;
        let count = |name: &str| {
            stats
                .get(name)
                .and_then(|v| u64::try_from(*v).ok())
                .unwrap_or(0)
        };
        let counts = |kind: &str| StateCounts {
            held: count(&format!("{kind}:held")),
            sold: count(&format!("{kind}:sold")),
            released: count(&format!("{kind}:released")),
            uncertain: count(&format!("{kind}:uncertain")),
        };
        Ok(SaleStatus {
            sku: sku.clone(),
            stock: stock.map(stock_value).transpose()?,
            added: stats.get("added").and_then(|v| u64::try_from(*v).ok()),
            closed: stats.get("closed") == Some(&1),
            buyers,
            reservations: counts("res"),
            units: counts("units"),
        })
    }
}

impl StoreImpl for RedisStore {
    fn kind(&self) -> &'static str {
        "redis"
    }

    fn reserve(
        &self,
        req: &ReserveRequest,
    ) -> impl Future<Output = Result<ReserveOutcome, StoreError>> + Send {
        self.shared.reserve_inner(req)
    }

    fn release(
        &self,
        sku: &Sku,
        reservation: &ReservationId,
    ) -> impl Future<Output = Result<ReleaseOutcome, StoreError>> + Send {
        self.shared.release_inner(sku, reservation, Mode::Release)
    }

    fn settle(
        &self,
        sku: &Sku,
        reservation: &ReservationId,
        to: Settlement,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        self.shared.settle_inner(sku, reservation, to)
    }

    fn set_stock_if(
        &self,
        sku: &Sku,
        units: u64,
        expect: Option<u64>,
    ) -> impl Future<Output = Result<StockSet, StoreError>> + Send {
        self.shared.set_stock_inner(sku, units, expect)
    }

    fn set_closed(
        &self,
        sku: &Sku,
        closed: bool,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.shared.set_closed_inner(sku, closed)
    }

    fn add_stock(
        &self,
        sku: &Sku,
        delta: i64,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send {
        self.shared.add_stock_inner(sku, delta)
    }

    fn get_stock(&self, sku: &Sku) -> impl Future<Output = Result<Option<u64>, StoreError>> + Send {
        self.shared.get_stock_inner(sku)
    }

    fn status(&self, sku: &Sku) -> impl Future<Output = Result<SaleStatus, StoreError>> + Send {
        self.shared.status_inner(sku)
    }

    fn list_skus(&self, limit: usize) -> impl Future<Output = Result<SkuList, StoreError>> + Send {
        self.shared.list_skus_inner(limit)
    }

    fn reservations(
        &self,
        sku: &Sku,
        query: &ReservationQuery,
    ) -> impl Future<Output = Result<ReservationPage, StoreError>> + Send {
        self.shared.reservations_inner(sku, query)
    }

    fn resolve(
        &self,
        sku: &Sku,
        reservation: &ReservationId,
        to: Resolution,
        held_min_age: Duration,
    ) -> impl Future<Output = Result<ResolveOutcome, StoreError>> + Send {
        self.shared
            .resolve_inner(sku, reservation, to, held_min_age)
    }

    fn check_limits(
        &self,
        check: &LimitCheck,
    ) -> impl Future<Output = Result<LimitVerdict, StoreError>> + Send {
        self.shared.check_limits_inner(check)
    }

    fn room(
        &self,
        rules: &crate::store::RoomRules,
        call: &crate::store::RoomCall,
    ) -> impl Future<Output = Result<crate::store::RoomReply, StoreError>> + Send {
        self.shared.room_inner(rules, call)
    }
}

/// How `release.lua` treats its reservation id. (Its third mode, the operator's `resolve`, is
/// run by `audit.rs`.)
#[derive(Debug, Clone, Copy)]
enum Mode {
    /// The backend did not take the order: return a held unit.
    Release,
    /// A reserve's reply was lost: return the unit if it ran, else leave a tombstone so it
    /// cannot run later.
    Cancel,
}
