//! The Redis store: every decision is one Lua script, run atomically on the
//! server, so many flashgate instances can share one Redis without overselling.
//!
//! # Connections
//!
//! The store holds `connections` multiplexed connections and picks one per
//! call, round-robin. Each connection lives in a [`Slot`] that (re)connects
//! lazily, in a background task:
//!
//! - [`RedisStore::connect`] never fails because Redis is down: the proxy must
//!   start anyway, answer 503 on flash routes, and recover by itself.
//! - A connection that returned an I/O error or timed out is dropped; the next
//!   call starts a new connect attempt. A failed attempt blocks new attempts for
//!   [`RECONNECT_BACKOFF`], and calls in that window fail at once instead of
//!   each waiting for a timeout (a store outage must not become a per-request
//!   hang).
//! - The connect attempt runs in its own task, bounded by `connect_timeout`, so
//!   a caller giving up at `response_timeout` does not cancel it.
//!
//! We do not use redis-rs' `ConnectionManager`: it caches a failed connect
//! attempt forever unless the error is an I/O error (e.g. `LOADING` or an auth
//! error during the handshake would never heal), and its retry loop is not
//! bounded by our response timeout.
//!
//! Every call is bounded by `response_timeout` as a whole (waiting for a
//! connection included) and maps any connection trouble to
//! [`StoreError::Unavailable`].
//!
//! # Scripts
//!
//! `lua/*.lua` are embedded at build time and run through [`redis::Script`],
//! which sends `EVALSHA` and, on `NOSCRIPT` (Redis restarted or `SCRIPT FLUSH`),
//! loads the script and retries once.
//!
//! # Reserve batches
//!
//! Reserves of one SKU arriving on one thread within the same scheduler turn go to Redis as
//! one `reserve.lua` call that decides each buyer in turn (see [`Shared::reserve_inner`]):
//! every decision is still atomic and sees the ones before it, and a busy sale costs one
//! round trip per batch rather than one per buyer. The call runs in its own task, so a buyer
//! who disconnects mid-call cannot strand a unit: a unit won for a buyer who is gone is
//! cancelled at once.
//!
//! A timeout on `reserve` is ambiguous: the script may have run, or may still
//! run later (a stalled server executes what is queued in its sockets when it
//! thaws). We report `Unavailable` (the buyer gets 503, never a forward), and
//! cancel the batch's reservations in the background, retrying until Redis answers:
//! `release.lua` in `cancel` mode returns a held unit, or leaves a tombstone
//! that makes a late-running reserve with that id fail. Otherwise the unit
//! would stay `held` with nobody behind it, and the buyer, told to retry,
//! would be told `already_purchased`.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{
    AsyncConnectionConfig, Client, ErrorKind, FromRedisValue, RedisError, Script, ServerErrorKind,
    Value,
};
use thread_local::ThreadLocal;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::{
    BoxFuture, MAX_UNITS, ReleaseOutcome, ReserveOutcome, ReserveRequest, SaleKeys, SaleStatus,
    Settlement, StateCounts, StockSet, Store, StoreError, new_reservation_id,
    retry_while_unavailable, validate_delta, validate_reserve, validate_sku, validate_units,
};

/// After a failed connect attempt, a slot waits this long before the next one.
/// Calls in between fail fast with `Unavailable`.
pub const RECONNECT_BACKOFF: Duration = Duration::from_millis(100);

/// Script runs that may meet NOSCRIPT (each loads the script again) before a call fails. A
/// NOSCRIPT means the script did not run, so trying again is always safe; the whole call is
/// bounded by `response_timeout` anyway. 3 was not enough on a loaded machine with SCRIPT FLUSH
/// repeated mid-sale (a buyer got 503 in CI); a flush storm that outlasts 20 loads is a
/// store that is not really there.
const NOSCRIPT_TRIES: u32 = 20;

/// Most buyers decided in one `reserve.lua` call. Bounds how long one script holds Redis
/// (each decision is a handful of hash operations, ~10 µs for the lot at this size); a
/// bigger queue is split over several calls.
const RESERVE_BATCH_MAX: usize = 64;

/// How to reach Redis and how long to wait for it.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// `redis://host:port/db`, `rediss://…`, `unix:///path` or `redis+unix:///path`.
    pub url: String,
    /// Multiplexed connections used round-robin (at least 1).
    pub connections: usize,
    /// Bound on one connect attempt (TCP/unix connect + handshake).
    pub connect_timeout: Duration,
    /// Bound on one store call, end to end.
    pub response_timeout: Duration,
    /// First part of every key (`fg` → `fg:{sku}:stock`). Must not contain `{` or `}`.
    pub key_prefix: String,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: "redis://127.0.0.1:6379".into(),
            connections: 4,
            connect_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_millis(250),
            key_prefix: "fg".into(),
        }
    }
}

impl RedisConfig {
    /// Defaults with another URL.
    pub fn new(url: impl Into<String>) -> Self {
        RedisConfig {
            url: url.into(),
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
    /// Reserves waiting to be sent together (see [`RedisStore::reserve_inner`]).
    reserves: ThreadLocal<Arc<Batches<ReserveWaiter>>>,
    /// Settles waiting to be sent together (see [`RedisStore::settle_inner`]).
    settles: ThreadLocal<SettleQueues>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("connections", &self.shared.pool.size)
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
        let client = Client::open(cfg.url.as_str())
            .map_err(|e| StoreError::Invalid(format!("redis url {:?}: {e}", cfg.url)))?;
        let conn_config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(cfg.connect_timeout))
            .set_response_timeout(Some(cfg.response_timeout));

        let pool = Pool {
            client,
            conn_config,
            connect_timeout: cfg.connect_timeout,
            size: cfg.connections,
            per_thread: ThreadLocal::new(),
            epoch: Arc::new(AtomicU64::new(0)),
        };

        // Warm up: connect this thread's slots now, in parallel, so the first buyers do not
        // pay for it. Failures are fine (Redis may come later); each attempt is bounded by
        // `connect_timeout`. Serving threads connect their own slots on first use.
        let mut warmups = tokio::task::JoinSet::new();
        for slot in pool.slots() {
            warmups.spawn(Arc::clone(slot).connection());
        }
        while warmups.join_next().await.is_some() {}

        Ok(RedisStore {
            shared: Arc::new(Shared {
                pool,
                next: AtomicUsize::new(0),
                prefix: cfg.key_prefix.clone(),
                response_timeout: cfg.response_timeout,
                reserve: LuaScript::new(include_str!("../../../lua/reserve.lua")),
                release: LuaScript::new(include_str!("../../../lua/release.lua")),
                settle: LuaScript::new(include_str!("../../../lua/settle.lua")),
                add_stock: LuaScript::new(include_str!("../../../lua/add_stock.lua")),
                set_stock: LuaScript::new(include_str!("../../../lua/set_stock.lua")),
                reserves: ThreadLocal::new(),
                settles: ThreadLocal::new(),
            }),
        })
    }

    /// `PING` through one connection: a readiness check for the admin API.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.shared.ping().await
    }
}

impl Shared {
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

    fn keys(&self, sku: &str) -> Result<SaleKeys, StoreError> {
        SaleKeys::new(&self.prefix, sku)
    }

    /// Run `op` on the next connection (round-robin), the whole thing bounded
    /// by `response_timeout`. A connection that failed or timed out is
    /// dropped so the next call reconnects.
    async fn with_conn<T, F, Fut>(&self, op: F) -> Result<T, StoreError>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let slots = self.pool.slots();
        let n = self.next.fetch_add(1, Ordering::Relaxed) % slots.len();
        let mut slot = &slots[n];
        let mut used: Option<u64> = None;
        let outcome = tokio::time::timeout(self.response_timeout, async {
            let conn = match Arc::clone(slot).connection().await {
                Ok(conn) => conn,
                // This slot is in its reconnect backoff, but Redis may already
                // be back: borrow a sibling's live connection if there is one.
                Err(e) => {
                    let (other, conn) = self.live_sibling(n).ok_or(e)?;
                    slot = other;
                    conn
                }
            };
            used = Some(conn.id);
            op(conn.inner).await.map_err(|e| {
                if drops_connection(&e) {
                    slot.forget(conn.id);
                }
                map_redis_error(e)
            })
        })
        .await;
        match outcome {
            Ok(result) => result,
            Err(_elapsed) => {
                // No answer in time: the server may be stopped or the link
                // half-open. Start over on a fresh connection next time.
                if let Some(id) = used {
                    slot.forget(id);
                }
                Err(StoreError::Unavailable(format!(
                    "redis did not answer within {:?}",
                    self.response_timeout
                )))
            }
        }
    }

    /// Any other slot's current connection, without waiting.
    fn live_sibling(&self, skip: usize) -> Option<(&Arc<Slot>, Conn)> {
        let slots = self.pool.slots();
        let n = slots.len();
        (1..n)
            .map(|k| &slots[(skip + k) % n])
            .find_map(|slot| slot.current().map(|conn| (slot, conn)))
    }

    /// Run one of our scripts with the sale's four keys and `args`.
    async fn run_script(
        &self,
        script: &LuaScript,
        keys: &SaleKeys,
        args: &[&[u8]],
    ) -> Result<Value, StoreError> {
        let mut cmd = script_cmd(script, keys, args.len(), args.iter().map(|a| a.len()).sum());
        cmd.arg(args);
        self.run_script_tracked(script, cmd, &AtomicBool::new(false))
            .await
    }

    /// Run `cmd` (from [`script_cmd`], arguments added), setting `sent` once the script may
    /// have reached Redis (a connection was found and the call started): from then on a
    /// failure is ambiguous.
    async fn run_script_tracked(
        &self,
        script: &LuaScript,
        cmd: redis::Cmd,
        sent: &AtomicBool,
    ) -> Result<Value, StoreError> {
        self.with_conn(|mut c| async move {
            sent.store(true, Ordering::Relaxed);
            // NOSCRIPT (Redis restarted, `SCRIPT FLUSH`, a failover): load the script and run
            // it again. Another NOSCRIPT means the cache was flushed again in between: the
            // store is there, so try again rather than fail the buyer.
            let mut tries = 1;
            loop {
                match cmd.query_async::<Value>(&mut c).await {
                    Err(e)
                        if tries < NOSCRIPT_TRIES
                            && e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) =>
                    {
                        tries += 1;
                        redis::cmd("SCRIPT")
                            .arg("LOAD")
                            .arg(script.code)
                            .query_async::<Value>(&mut c)
                            .await?;
                    }
                    reply => return reply,
                }
            }
        })
        .await
    }

    /// Reserves are batched per SKU and thread: the first buyer of a batch spawns a task
    /// that waits one scheduler turn (every request that is ready runs first and joins),
    /// then sends the whole batch as one `reserve.lua` call, which decides each buyer in
    /// turn. At one call per batch instead of per buyer, Redis and this process spend their
    /// time on decisions rather than on round trips.
    ///
    /// The batch runs in its own task, so a buyer who goes away mid-call (hyper drops the
    /// request future) cannot lose a reply: a unit won for nobody is released at once.
    async fn reserve_inner(
        self: &Arc<Self>,
        req: &ReserveRequest,
    ) -> Result<ReserveOutcome, StoreError> {
        validate_reserve(req)?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let waiter = ReserveWaiter {
            user: req.user.clone(),
            quantity: req.quantity,
            per_user_limit: req.per_user_limit,
            reservation: new_reservation_id(),
            tx,
        };
        let (shared, sku) = (Arc::clone(self), req.sku.clone());
        let mut reply = Reply::new(rx, move |id| {
            shared.cancel_later(&sku, &id, "buyer left as the reservation was answered");
        });
        let queue = Arc::clone(self.reserves.get_or_default());
        if queue.push(&req.sku, waiter) {
            spawn_reserve_batch(Arc::clone(self), queue, req.sku.clone());
        }
        reply.recv().await
    }

    /// One `reserve.lua` call for up to [`RESERVE_BATCH_MAX`] buyers.
    async fn reserve_call(self: &Arc<Self>, sku: &str, mut waiters: Vec<ReserveWaiter>) {
        // A buyer who left before the batch went out is not reserved for at all.
        waiters.retain(|w| !w.tx.is_closed());
        if waiters.is_empty() {
            return;
        }
        let keys = match self.keys(sku) {
            Ok(keys) => keys,
            Err(e) => return self.fail_batch(sku, waiters, &e, false),
        };
        // One buffer for the whole command; integers are written in place.
        let bytes = waiters.iter().map(|w| w.user.len() + 48).sum();
        let mut cmd = script_cmd(&self.reserve, &keys, waiters.len() * 4, bytes);
        for w in &waiters {
            cmd.arg(w.user.as_bytes())
                .arg(w.quantity)
                .arg(w.per_user_limit)
                .arg(w.reservation.as_bytes());
        }
        let sent = AtomicBool::new(false);
        let reply = self.run_script_tracked(&self.reserve, cmd, &sent).await;
        let replies = match reply {
            Ok(Value::Array(items)) if items.len() == waiters.len() => items,
            Ok(other) => {
                // Nothing we understand: the buyers get 503; if any unit was taken, the
                // cancel below returns it.
                let e = StoreError::Protocol(format!("reserve answered {other:?}"));
                self.fail_batch(sku, waiters, &e, true);
                return;
            }
            Err(e) => {
                // Without a reply the script may have run (or may still run, queued in a
                // stalled server): cancel every reservation of the batch.
                let ambiguous =
                    matches!(e, StoreError::Unavailable(_)) && sent.load(Ordering::Relaxed);
                self.fail_batch(sku, waiters, &e, ambiguous);
                return;
            }
        };
        for (w, reply) in waiters.into_iter().zip(replies) {
            let outcome = reserve_outcome(reply, w.reservation);
            if let Err(Ok(ReserveOutcome::Won { reservation, .. })) = w.tx.send(outcome) {
                // The buyer left while the script ran: nobody will forward this unit.
                self.cancel_later(
                    sku,
                    &reservation,
                    "buyer left before the reservation was answered",
                );
            }
        }
    }

    fn fail_batch(
        self: &Arc<Self>,
        sku: &str,
        waiters: Vec<ReserveWaiter>,
        e: &StoreError,
        cancel: bool,
    ) {
        for w in waiters {
            if cancel {
                self.cancel_later(sku, &w.reservation, "reserve got no usable reply");
            }
            let _ = w.tx.send(Err(same_error(e)));
        }
    }

    /// A reserve sent with reservation `id` failed without a reply: the buyer is told 503
    /// and never forwarded, so whatever that reserve did (or will do, if it is still queued
    /// in a stalled server) must be undone. Retries in the background until Redis answers.
    fn cancel_later(self: &Arc<Self>, sku: &str, id: &str, why: &'static str) {
        let store = Arc::clone(self);
        let (sku, id) = (sku.to_owned(), id.to_owned());
        tracing::warn!(%sku, reservation = %id, why, "cancelling a reservation in the background");
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(%sku, reservation = %id, "no runtime left to cancel the reservation: it stays held");
            return;
        };
        runtime.spawn(async move {
            let cancelled =
                retry_while_unavailable(|| store.release_inner(&sku, &id, Mode::Cancel)).await;
            match cancelled {
                Ok(ReleaseOutcome::Released { .. }) => {
                    tracing::info!(%sku, reservation = %id, "cancelled reservation had run: unit released");
                }
                Ok(ReleaseOutcome::NotHeld { .. }) => {}
                Err(e) => {
                    tracing::warn!(%sku, reservation = %id, error = %e, "cancelling a reservation failed");
                }
            }
        });
    }

    async fn release_inner(
        &self,
        sku: &str,
        id: &str,
        mode: Mode,
    ) -> Result<ReleaseOutcome, StoreError> {
        let keys = self.keys(sku)?;
        let mode: &[u8] = match mode {
            Mode::Release => b"release",
            Mode::Cancel => b"cancel",
        };
        let reply = self
            .run_script(&self.release, &keys, &[id.as_bytes(), mode])
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

    /// Settles are batched: the first settle of a SKU on this thread waits one scheduler turn
    /// (every task that is ready runs first), takes whatever other settles of that SKU joined
    /// meanwhile, and sends them all in one script call. Settles run after the buyer has been
    /// answered, so the wait costs nobody latency, and a busy sale costs Redis about one
    /// settle call per batch instead of one per order.
    async fn settle_inner(&self, sku: &str, id: &str, to: Settlement) -> Result<bool, StoreError> {
        validate_sku(sku)?;
        let queue = self.settles.get_or_default().to(to);
        let (tx, rx) = tokio::sync::oneshot::channel();
        if queue.push(sku, (id.to_owned(), tx)) {
            let mut batch = Batch {
                queue,
                sku: Some(sku),
            };
            tokio::task::yield_now().await;
            let waiters = batch.take();
            let keys = self.keys(sku)?;
            let mut args: Vec<&[u8]> = Vec::with_capacity(waiters.len() + 1);
            args.push(to.as_str().as_bytes());
            args.extend(waiters.iter().map(|(id, _)| id.as_bytes()));
            let reply = self.run_script(&self.settle, &keys, &args).await;
            deliver(reply, waiters);
        }
        rx.await.unwrap_or_else(|_| {
            Err(StoreError::Unavailable(
                "settle batch abandoned before it was sent".into(),
            ))
        })
    }

    async fn set_stock_inner(
        &self,
        sku: &str,
        units: u64,
        expect: Option<u64>,
    ) -> Result<StockSet, StoreError> {
        let keys = self.keys(sku)?;
        validate_units("stock", units)?;
        let units_arg = units.to_string();
        let expect_arg = match expect {
            Some(e) => validate_units("expect", e)?.to_string(),
            None => String::new(),
        };
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

    async fn add_stock_inner(&self, sku: &str, delta: i64) -> Result<u64, StoreError> {
        let keys = self.keys(sku)?;
        validate_delta(delta)?;
        let delta_arg = delta.to_string();
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

    /// The flag is a field of the stats hash, which `reserve.lua` already reads: closing
    /// costs a buyer no extra key and no extra round trip.
    async fn set_closed_inner(&self, sku: &str, closed: bool) -> Result<(), StoreError> {
        let keys = self.keys(sku)?;
        let stats = keys.stats;
        self.with_conn(|mut c| async move {
            let cmd = if closed {
                let mut cmd = redis::cmd("HSET");
                cmd.arg(&stats).arg("closed").arg("1");
                cmd
            } else {
                let mut cmd = redis::cmd("HDEL");
                cmd.arg(&stats).arg("closed");
                cmd
            };
            cmd.query_async::<Value>(&mut c).await.map(drop)
        })
        .await
    }

    async fn get_stock_inner(&self, sku: &str) -> Result<Option<u64>, StoreError> {
        let keys = self.keys(sku)?;
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

    async fn status_inner(&self, sku: &str) -> Result<SaleStatus, StoreError> {
        let keys = self.keys(sku)?;
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
            sku: sku.to_owned(),
            stock: stock.map(stock_value).transpose()?,
            added: stats.get("added").and_then(|v| u64::try_from(*v).ok()),
            closed: stats.get("closed") == Some(&1),
            buyers,
            reservations: counts("res"),
            units: counts("units"),
        })
    }
}

impl Store for RedisStore {
    fn kind(&self) -> &'static str {
        "redis"
    }

    fn reserve<'a>(
        &'a self,
        req: &'a ReserveRequest,
    ) -> BoxFuture<'a, Result<ReserveOutcome, StoreError>> {
        Box::pin(self.shared.reserve_inner(req))
    }

    fn release<'a>(
        &'a self,
        sku: &'a str,
        reservation: &'a str,
    ) -> BoxFuture<'a, Result<ReleaseOutcome, StoreError>> {
        Box::pin(self.shared.release_inner(sku, reservation, Mode::Release))
    }

    fn settle<'a>(
        &'a self,
        sku: &'a str,
        reservation: &'a str,
        to: Settlement,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(self.shared.settle_inner(sku, reservation, to))
    }

    fn set_stock_if<'a>(
        &'a self,
        sku: &'a str,
        units: u64,
        expect: Option<u64>,
    ) -> BoxFuture<'a, Result<StockSet, StoreError>> {
        Box::pin(self.shared.set_stock_inner(sku, units, expect))
    }

    fn set_closed<'a>(
        &'a self,
        sku: &'a str,
        closed: bool,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.shared.set_closed_inner(sku, closed))
    }

    fn add_stock<'a>(&'a self, sku: &'a str, delta: i64) -> BoxFuture<'a, Result<u64, StoreError>> {
        Box::pin(self.shared.add_stock_inner(sku, delta))
    }

    fn get_stock<'a>(&'a self, sku: &'a str) -> BoxFuture<'a, Result<Option<u64>, StoreError>> {
        Box::pin(self.shared.get_stock_inner(sku))
    }

    fn status<'a>(&'a self, sku: &'a str) -> BoxFuture<'a, Result<SaleStatus, StoreError>> {
        Box::pin(self.shared.status_inner(sku))
    }
}

/// How `release.lua` treats its reservation id.
#[derive(Debug, Clone, Copy)]
enum Mode {
    /// The backend did not take the order: return a held unit.
    Release,
    /// A reserve's reply was lost: return the unit if it ran, else leave a tombstone so it
    /// cannot run later.
    Cancel,
}

// ---------------------------------------------------------------------------
// Connection slots

/// The connections, one set per thread. A multiplexed connection's driver task lives on the
/// runtime that opened it; shared across the per-core runtimes, every reservation would hop to
/// another thread and back. Each serving thread opens its own `size` connections on first use.
struct Pool {
    client: Client,
    conn_config: AsyncConnectionConfig,
    connect_timeout: Duration,
    size: usize,
    per_thread: ThreadLocal<Vec<Arc<Slot>>>,
    /// Bumped whenever any connection is found dead. Every thread's connections older than
    /// the current epoch are then dropped before use: after a Redis restart, a thread that
    /// has been quiet must not spend a buyer's request discovering its connection is gone.
    epoch: Arc<AtomicU64>,
}

impl Pool {
    fn slots(&self) -> &[Arc<Slot>] {
        self.per_thread.get_or(|| {
            (0..self.size)
                .map(|index| {
                    Arc::new(Slot {
                        index,
                        client: self.client.clone(),
                        conn_config: self.conn_config.clone(),
                        connect_timeout: self.connect_timeout,
                        state: Mutex::new(SlotState::default()),
                        changed: Notify::new(),
                        epoch: self.epoch.clone(),
                    })
                })
                .collect()
        })
    }
}

/// One lazily (re)connected multiplexed connection.
struct Slot {
    index: usize,
    client: Client,
    conn_config: AsyncConnectionConfig,
    connect_timeout: Duration,
    /// A std mutex: held only for a few field updates, never across `.await`.
    state: Mutex<SlotState>,
    /// Wakes callers waiting for a connect attempt to finish.
    changed: Notify,
    /// The pool's epoch (see [`Pool::epoch`]).
    epoch: Arc<AtomicU64>,
}

#[derive(Default)]
struct SlotState {
    conn: Option<Conn>,
    /// A connect task is running.
    connecting: bool,
    /// No new connect attempt before this instant (set after a failure).
    retry_at: Option<Instant>,
    last_error: Option<String>,
    /// Ids tell a stale connection apart from its replacement in `forget`.
    next_id: u64,
}

#[derive(Clone)]
struct Conn {
    id: u64,
    /// The pool epoch the connection was opened in.
    epoch: u64,
    inner: MultiplexedConnection,
}

impl Slot {
    fn state(&self) -> MutexGuard<'_, SlotState> {
        // Nothing panics while the lock is held; a poisoned lock is still consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The current connection, if any (and not from an older epoch).
    fn current(&self) -> Option<Conn> {
        let mut st = self.state();
        self.drop_stale(&mut st);
        st.conn.clone()
    }

    fn drop_stale(&self, st: &mut SlotState) {
        let epoch = self.epoch.load(Ordering::Acquire);
        if st.conn.as_ref().is_some_and(|c| c.epoch < epoch) {
            st.conn = None;
        }
    }

    /// The current connection, or wait for a connect attempt (starting one if
    /// none is running and the backoff has passed). Callers bound the wait.
    async fn connection(self: Arc<Self>) -> Result<Conn, StoreError> {
        loop {
            let notified = self.changed.notified();
            {
                let mut st = self.state();
                self.drop_stale(&mut st);
                if let Some(conn) = &st.conn {
                    return Ok(conn.clone());
                }
                if !st.connecting {
                    if let Some(at) = st.retry_at
                        && Instant::now() < at
                    {
                        return Err(StoreError::Unavailable(format!(
                            "redis unreachable: {}",
                            st.last_error.as_deref().unwrap_or("connect failed")
                        )));
                    }
                    st.connecting = true;
                    tokio::spawn(Arc::clone(&self).connect_task());
                }
                // `notified` was created under the lock, before the connect
                // task can publish its result, so no wake-up is missed.
            }
            notified.await;
            // Re-check: either a connection now exists, or the attempt
            // failed and `retry_at` makes the next pass return the error.
        }
    }

    /// One connect attempt, in its own task so a caller's timeout cannot
    /// cancel it halfway.
    async fn connect_task(self: Arc<Self>) {
        // Whatever happens (even a panic in the client), clear `connecting`
        // and wake the waiters, or they would wait for a result that never comes.
        struct Done<'a>(&'a Slot);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                self.0.state().connecting = false;
                self.0.changed.notify_waiters();
            }
        }
        let _done = Done(&self);

        let attempt = tokio::time::timeout(
            self.connect_timeout,
            self.client
                .get_multiplexed_async_connection_with_config(&self.conn_config),
        )
        .await;
        let mut st = self.state();
        match attempt {
            Ok(Ok(inner)) => {
                let id = st.next_id;
                st.next_id += 1;
                let epoch = self.epoch.load(Ordering::Acquire);
                st.conn = Some(Conn { id, epoch, inner });
                st.retry_at = None;
                if st.last_error.take().is_some() {
                    tracing::info!(slot = self.index, "redis connection restored");
                }
            }
            Ok(Err(e)) => self.failed(&mut st, e.to_string()),
            Err(_) => self.failed(
                &mut st,
                format!("connect timed out after {:?}", self.connect_timeout),
            ),
        }
        // Unlock before `_done` runs (it takes the lock again).
        drop(st);
    }

    fn failed(&self, st: &mut SlotState, error: String) {
        if st.last_error.as_deref() != Some(error.as_str()) {
            tracing::warn!(slot = self.index, %error, "redis connect failed");
        }
        st.retry_at = Some(Instant::now() + RECONNECT_BACKOFF);
        st.last_error = Some(error);
    }

    /// Drop connection `id` (if it is still the current one) so the next
    /// call reconnects.
    fn forget(&self, id: u64) {
        let mut st = self.state();
        if st.conn.as_ref().is_some_and(|c| c.id == id) {
            st.conn = None;
            // Whatever killed this connection (a restart, a stall) killed its siblings on
            // the other threads too.
            self.epoch.fetch_add(1, Ordering::AcqRel);
        }
    }
}

/// `EVALSHA <script> 4 <the sale's keys>`, with room for `args` more arguments of `bytes`
/// bytes in all. The command is built in one buffer (redis-rs' `ScriptInvocation` allocates
/// a vector per argument, and a reserve batch has four per buyer).
fn script_cmd(script: &LuaScript, keys: &SaleKeys, args: usize, bytes: usize) -> redis::Cmd {
    let keys = keys.script_keys();
    let mut cmd = redis::Cmd::with_capacity(
        3 + keys.len() + args,
        64 + keys.iter().map(|k| k.len()).sum::<usize>() + bytes,
    );
    cmd.arg("EVALSHA")
        .arg(&script.hash)
        .arg(keys.len())
        .arg(&keys[..]);
    cmd
}

/// One of `lua/*.lua`: its source (for `SCRIPT LOAD`) and its SHA1 (for `EVALSHA`).
struct LuaScript {
    code: &'static str,
    hash: String,
}

impl LuaScript {
    fn new(code: &'static str) -> Self {
        LuaScript {
            code,
            hash: Script::new(code).get_hash().to_owned(),
        }
    }
}

// ---------------------------------------------------------------------------
// Reserve batches

/// The buyer's end of a reserve batch's reply. The batch task's `send` can succeed in the
/// very moment the buyer's future is dropped (the client went away, or a timeout fired): then
/// the reply sits in the channel and nobody reads it. Dropped unread, this guard closes the
/// channel — from then on the batch's `send` fails and the batch cancels the unit itself — and
/// takes out a reply that already arrived, cancelling a unit won for nobody. Either way no
/// `Won` is lost and no unit stays `held`.
struct Reply {
    rx: Option<ReplyReceiver>,
    /// Cancels a reservation won for nobody (by id); runs at most once.
    on_unread: Option<Box<dyn FnOnce(String) + Send>>,
}

type ReplyReceiver = tokio::sync::oneshot::Receiver<Result<ReserveOutcome, StoreError>>;

impl Reply {
    fn new(rx: ReplyReceiver, on_unread: impl FnOnce(String) + Send + 'static) -> Reply {
        Reply {
            rx: Some(rx),
            on_unread: Some(Box::new(on_unread)),
        }
    }

    async fn recv(&mut self) -> Result<ReserveOutcome, StoreError> {
        let Some(rx) = self.rx.as_mut() else {
            return Err(StoreError::Unavailable("reserve reply already read".into()));
        };
        let reply = rx.await;
        // Read: from here the caller owns the outcome.
        self.rx = None;
        reply.unwrap_or_else(|_| {
            Err(StoreError::Unavailable(
                "reserve batch abandoned before it was answered".into(),
            ))
        })
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        let Some(mut rx) = self.rx.take() else {
            return;
        };
        rx.close();
        if let (Ok(Ok(ReserveOutcome::Won { reservation, .. })), Some(cancel)) =
            (rx.try_recv(), self.on_unread.take())
        {
            cancel(reservation);
        }
    }
}

/// One buyer waiting in a reserve batch.
struct ReserveWaiter {
    user: String,
    quantity: u32,
    per_user_limit: u32,
    /// Chosen before the call, so a batch whose reply is lost can be cancelled by id.
    reservation: String,
    tx: tokio::sync::oneshot::Sender<Result<ReserveOutcome, StoreError>>,
}

/// Calls of one thread waiting to be sent together, by SKU (reserves and settles alike).
struct Batches<W> {
    // A std mutex: held for a push or a take, never across `.await`.
    pending: Mutex<HashMap<String, Vec<W>>>,
}

impl<W> Default for Batches<W> {
    fn default() -> Self {
        Batches {
            pending: Mutex::new(HashMap::new()),
        }
    }
}

impl<W> Batches<W> {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Vec<W>>> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues a call; true when it starts a batch (its caller must see the batch sent).
    fn push(&self, sku: &str, waiter: W) -> bool {
        let mut pending = self.lock();
        match pending.get_mut(sku) {
            Some(waiters) => {
                waiters.push(waiter);
                false
            }
            None => {
                pending.insert(sku.to_owned(), vec![waiter]);
                true
            }
        }
    }

    /// Takes up to `max` waiters of `sku`, oldest first; true if more are left (the queue
    /// then stays non-empty, so new arrivals wait for whoever takes the rest).
    fn take(&self, sku: &str, max: usize) -> (Vec<W>, bool) {
        let mut pending = self.lock();
        let Some(waiters) = pending.get_mut(sku) else {
            return (Vec::new(), false);
        };
        if waiters.len() <= max {
            let all = pending.remove(sku).unwrap_or_default();
            return (all, false);
        }
        (waiters.drain(..max).collect(), true)
    }
}

/// The task that sends one batch: it waits one scheduler turn so the requests that are
/// ready join, then takes the batch (leaving a successor for what does not fit) and sends it.
fn spawn_reserve_batch(store: Arc<Shared>, queue: Arc<Batches<ReserveWaiter>>, sku: String) {
    tokio::spawn(async move {
        tokio::task::yield_now().await;
        let (waiters, more) = queue.take(&sku, RESERVE_BATCH_MAX);
        if more {
            spawn_reserve_batch(Arc::clone(&store), queue, sku.clone());
        }
        store.reserve_call(&sku, waiters).await;
    });
}

/// One buyer's reply from `reserve.lua`. Matched in place: this runs once per buyer.
fn reserve_outcome(reply: Value, reservation: String) -> Result<ReserveOutcome, StoreError> {
    let unexpected = |reply: &Value| StoreError::Protocol(format!("reserve answered {reply:?}"));
    let Value::Array(items) = &reply else {
        return Err(unexpected(&reply));
    };
    let status: &[u8] = match items.first() {
        Some(Value::BulkString(b)) => b,
        Some(Value::SimpleString(s)) => s.as_bytes(),
        _ => return Err(unexpected(&reply)),
    };
    match (status, &items[1..]) {
        (b"won", [remaining]) => Ok(ReserveOutcome::Won {
            reservation,
            remaining: non_negative(remaining, "reserve remaining")?,
        }),
        (b"sold_out", [remaining]) => Ok(ReserveOutcome::SoldOut {
            remaining: non_negative(remaining, "reserve remaining")?,
        }),
        (b"already_purchased", [held]) => {
            let held = non_negative(held, "reserve held")?;
            Ok(ReserveOutcome::AlreadyPurchased {
                held: u32::try_from(held).unwrap_or(u32::MAX),
            })
        }
        (b"not_configured", []) => Ok(ReserveOutcome::NotConfigured),
        (b"closed", []) => Ok(ReserveOutcome::Closed),
        _ => Err(unexpected(&reply)),
    }
}

// ---------------------------------------------------------------------------
// Settle batches

type SettleWaiter = (
    String,
    tokio::sync::oneshot::Sender<Result<bool, StoreError>>,
);

/// Settles of one thread waiting for their batch's leader: one queue per target state.
#[derive(Default)]
struct SettleQueues {
    sold: Batches<SettleWaiter>,
    uncertain: Batches<SettleWaiter>,
}

impl SettleQueues {
    fn to(&self, to: Settlement) -> &Batches<SettleWaiter> {
        match to {
            Settlement::Sold => &self.sold,
            Settlement::Uncertain => &self.uncertain,
        }
    }
}

/// A leader's claim on its batch. Dropped before the batch was taken (the leader was
/// cancelled), it empties the batch so the others get an error and retry, instead of
/// waiting for a leader that is gone.
struct Batch<'q> {
    queue: &'q Batches<SettleWaiter>,
    sku: Option<&'q str>,
}

impl Batch<'_> {
    fn take(&mut self) -> Vec<SettleWaiter> {
        match self.sku.take() {
            Some(sku) => self.queue.take(sku, usize::MAX).0,
            None => Vec::new(),
        }
    }
}

impl Drop for Batch<'_> {
    fn drop(&mut self) {
        drop(self.take());
    }
}

/// Hands each waiter its own result from the batch reply.
fn deliver(reply: Result<Value, StoreError>, waiters: Vec<SettleWaiter>) {
    let results = match reply {
        Ok(Value::Array(items)) if items.len() == waiters.len() => items,
        Ok(other) => {
            let e = format!("settle answered {other:?}");
            for (_, tx) in waiters {
                let _ = tx.send(Err(StoreError::Protocol(e.clone())));
            }
            return;
        }
        Err(e) => {
            for (_, tx) in waiters {
                let _ = tx.send(Err(same_error(&e)));
            }
            return;
        }
    };
    for ((id, tx), item) in waiters.into_iter().zip(results) {
        let result = match item {
            Value::Int(1) => Ok(true),
            Value::Int(0) => Ok(false),
            other => Err(StoreError::Protocol(format!(
                "settle of {id} answered {other:?} (malformed reservation record?)"
            ))),
        };
        let _ = tx.send(result);
    }
}

fn same_error(e: &StoreError) -> StoreError {
    match e {
        StoreError::Unavailable(m) => StoreError::Unavailable(m.clone()),
        StoreError::Invalid(m) => StoreError::Invalid(m.clone()),
        StoreError::Protocol(m) => StoreError::Protocol(m.clone()),
    }
}

// ---------------------------------------------------------------------------
// Errors and replies

/// Whether an error means the connection itself is unusable.
fn drops_connection(e: &RedisError) -> bool {
    e.is_io_error() || e.is_unrecoverable_error()
}

/// Connection trouble and transient server states are `Unavailable` (the
/// proxy answers 503 and retries later); anything else is a protocol error.
fn map_redis_error(e: RedisError) -> StoreError {
    let transient = match e.kind() {
        ErrorKind::Io | ErrorKind::AuthenticationFailed | ErrorKind::ClusterConnectionNotFound => {
            true
        }
        ErrorKind::Server(kind) => matches!(
            kind,
            ServerErrorKind::BusyLoading
                | ServerErrorKind::TryAgain
                | ServerErrorKind::ClusterDown
                | ServerErrorKind::MasterDown
                | ServerErrorKind::ReadOnly
                | ServerErrorKind::NoScript
        ),
        // BUSY: another script is running too long on the server.
        ErrorKind::Extension => e.code() == Some("BUSY"),
        _ => false,
    };
    if transient {
        StoreError::Unavailable(format!("redis: {e}"))
    } else {
        StoreError::Protocol(format!("redis: {e}"))
    }
}

/// Typed conversion of a raw reply. Done outside [`RedisStore::with_conn`]
/// because redis-rs files conversion failures under `Parse`, which would
/// otherwise count as a broken connection: bad data is not a bad link.
fn convert<T: FromRedisValue>(reply: Value, what: &str) -> Result<T, StoreError> {
    redis::from_redis_value(reply)
        .map_err(|e| StoreError::Protocol(format!("{what}: unexpected reply: {e}")))
}

/// Split a script's `{status, ...}` array reply.
fn split_reply(reply: Value, script: &str) -> Result<(String, Vec<Value>), StoreError> {
    let Value::Array(mut items) = reply else {
        return Err(StoreError::Protocol(format!("{script} answered {reply:?}")));
    };
    if items.is_empty() {
        return Err(StoreError::Protocol(format!(
            "{script} answered an empty array"
        )));
    }
    let rest = items.split_off(1);
    let status = text(&items[0])
        .ok_or_else(|| StoreError::Protocol(format!("{script} status {:?}", items[0])))?;
    Ok((status, rest))
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(n) => Some(*n),
        other => text(other).and_then(|s| s.parse().ok()),
    }
}

fn non_negative(v: &Value, what: &str) -> Result<u64, StoreError> {
    int(v)
        .and_then(|n| u64::try_from(n).ok())
        .ok_or_else(|| StoreError::Protocol(format!("{what} is {v:?}, expected an integer >= 0")))
}

/// A stock read back from Redis. Negative only if someone edited the key by
/// hand: say so rather than hide it.
fn stock_value(n: i64) -> Result<u64, StoreError> {
    u64::try_from(n).map_err(|_| StoreError::Protocol(format!("stock key holds {n}")))
}

fn added_overflow(added: &Value) -> StoreError {
    StoreError::Invalid(format!(
        "units ever added would exceed {MAX_UNITS} (2^53 - 1; {} so far)",
        int(added).unwrap_or(0)
    ))
}

fn unexpected(script: &str, status: &str, rest: &[Value]) -> StoreError {
    StoreError::Protocol(format!("{script} answered {status:?} {rest:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn won(id: &str) -> Result<ReserveOutcome, StoreError> {
        Ok(ReserveOutcome::Won {
            reservation: id.to_owned(),
            remaining: 0,
        })
    }

    /// A `Reply` whose cancellations are written down instead of sent to Redis.
    type Sender = tokio::sync::oneshot::Sender<Result<ReserveOutcome, StoreError>>;

    fn reply() -> (Sender, Reply, Arc<Mutex<Vec<String>>>) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let cancelled = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&cancelled);
        let reply = Reply::new(rx, move |id| log.lock().unwrap().push(id));
        (tx, reply, cancelled)
    }

    #[tokio::test]
    async fn a_won_reply_delivered_but_never_read_is_cancelled() {
        let (tx, reply, cancelled) = reply();
        assert!(tx.send(won("r1")).is_ok(), "the batch's send succeeds");
        drop(reply);
        assert_eq!(*cancelled.lock().unwrap(), ["r1"]);
    }

    #[tokio::test]
    async fn after_the_buyer_left_the_batch_send_fails_and_hands_the_unit_back() {
        let (tx, reply, cancelled) = reply();
        drop(reply);
        let back = tx.send(won("r2"));
        assert!(
            matches!(back, Err(Ok(ReserveOutcome::Won { ref reservation, .. })) if reservation == "r2"),
            "the batch gets the unit back to cancel it itself"
        );
        assert!(cancelled.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_read_reply_or_a_loss_cancels_nothing() {
        let (tx, mut reply, cancelled) = reply();
        tx.send(won("r3")).unwrap();
        assert!(matches!(reply.recv().await, Ok(ReserveOutcome::Won { .. })));
        drop(reply);

        let (tx, reply2, cancelled2) = super::tests::reply();
        tx.send(Ok(ReserveOutcome::SoldOut { remaining: 0 }))
            .unwrap();
        drop(reply2);
        assert!(cancelled.lock().unwrap().is_empty());
        assert!(cancelled2.lock().unwrap().is_empty());
    }
}
