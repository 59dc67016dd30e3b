//! Stock stores: where a flash sale's units, buyers and reservations live.
//!
//! The proxy talks to one [`Store`] trait object. Two implementations share
//! one behaviour (and one conformance suite, `tests/store_conformance.rs`):
//!
//! - [`RedisStore`]: the real thing. Each decision is made inside ONE Lua script
//!   run atomically on the server (`lua/reserve.lua`, `lua/release.lua`,
//!   `lua/settle.lua`, `lua/set_stock.lua`, `lua/add_stock.lua`; `lua/gcra.lua` for the
//!   global rate limits, see [`limits`]; `lua/room.lua` for waiting rooms, see [`room`]), so
//!   any number of flashgate instances can share
//!   it. The
//!   buyers who arrive together on one thread share a script call (on a Redis
//!   Cluster, those of one SKU), which decides them one after the other.
//! - [`MemoryStore`]: the embedded default when no Redis is configured; same
//!   semantics in-process, for a single instance.
//!
//! # Data model (Redis)
//!
//! Every key is built by [`key`] and carries the hash tag `{sku}`, so all keys
//! one script touches hash to the same Redis Cluster slot. The store takes the
//! SKU, user and reservation id as [`Sku`], [`UserId`] and [`ReservationId`]
//! (`crate::ids`), parsed once at the edge: it does not check them again.
//!
//! | key | type | meaning |
//! |---|---|---|
//! | `fg:{sku}:stock` | string int | units left; **missing = not configured, never unlimited** |
//! | `fg:{sku}:buyers` | hash user → units | units each user holds (held + sold + uncertain): the per-user limit |
//! | `fg:{sku}:res` | hash id → `state\|qty\|unix_ms\|user` | every reservation; `unix_ms` is the reservation time from the Redis clock |
//! | `fg:{sku}:stats` | hash | `res:<state>` / `units:<state>` counters, kept by the scripts; `added` (units ever added, net); `closed` (`1` while the operator has closed the sale) |
//! | `fg:skus` | set | every SKU ever stocked (set or add), for audits and `sale list`; written by a separate `SADD` before the stock script (it is no sale's key, so no script may touch it) |
//!
//! Reservation states: `held` → `sold` | `uncertain` (settle), or `held` →
//! `released` (release, which returns the units and the user's slot). The operator
//! reconciles: `uncertain` (or a `held` one left behind long ago) → `sold` | `released`
//! ([`Store::resolve`], see [`reconcile`]). A `cancelled` record is a tombstone for a reserve
//! whose reply was lost (see [`RedisStore`]): it holds nothing and is never counted.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use serde::Serialize;

pub use crate::ids::{MAX_SKU_LEN, ReservationId, Sku, UserId};

pub mod breaker;
pub mod events;
pub mod limits;
pub mod memory;
pub mod observed;
pub mod reconcile;
pub mod redis;
mod retry;
pub mod room;

pub use self::events::StoreEvent;
pub use self::limits::{LimitBucket, LimitCheck, LimitVerdict};
pub use self::memory::MemoryStore;
pub use self::reconcile::{
    OpenState, ReservationInfo, ReservationPage, ReservationQuery, Resolution, ResolveOutcome,
    SkuList,
};
pub use self::redis::{RedisConfig, RedisStore, RedisTarget};
pub(crate) use self::retry::retry_while_unavailable;
pub use self::retry::{RECORD_RETRY_FOR, Record, record_retrying};
pub use self::room::{RoomCall, RoomMode, RoomReply, RoomRules, RoomStatus};

/// A boxed, `Send` future: lets [`Store`] be used as `Arc<dyn Store>`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One buyer asking for `quantity` units of `sku`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReserveRequest {
    pub sku: Sku,
    pub user: UserId,
    /// Units wanted; must be in `1..=per_user_limit` (otherwise [`StoreError::Invalid`]).
    pub quantity: u32,
    /// Most units this user may hold of this SKU at once (held + sold + uncertain).
    pub per_user_limit: u32,
}

/// What a reservation attempt decided. Only `Won` changes anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReserveOutcome {
    /// The units are now held under `reservation`; forward the request.
    Won {
        reservation: ReservationId,
        remaining: u64,
    },
    /// Stock is below the quantity asked for (nothing changed).
    SoldOut { remaining: u64 },
    /// The user's units + quantity would exceed the per-user limit (nothing changed).
    AlreadyPurchased { held: u32 },
    /// The stock key does not exist: the sale is not set up. Never treated as unlimited.
    NotConfigured,
    /// The operator closed the sale (checked before the per-user limit; nothing changed).
    Closed,
}

/// What a compare-and-set of the stock did ([`Store::set_stock_if`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StockSet {
    /// The stock is now `stock`.
    Set { stock: u64 },
    /// The stock was not the expected value: nothing changed. `current` is what it is
    /// (`None`: the sale is not configured).
    Changed { current: Option<u64> },
}

/// Where a held reservation goes once the backend answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Settlement {
    /// The backend took the order.
    Sold,
    /// We cannot know (timeout after sending, reset mid-response): keep the
    /// unit and leave the reservation for reconciliation.
    Uncertain,
}

impl Settlement {
    /// The state name stored in the reservation record.
    pub fn as_str(self) -> &'static str {
        match self {
            Settlement::Sold => "sold",
            Settlement::Uncertain => "uncertain",
        }
    }
}

/// What a release did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReleaseOutcome {
    /// The units went back to stock (`remaining` is the stock afterwards) and
    /// the user's slot was freed.
    Released { remaining: u64 },
    /// No-op. `state` is the reservation's current state (`"released"` on a
    /// second release, `"sold"`, `"uncertain"`), or `None` for an unknown id.
    NotHeld { state: Option<String> },
}

/// Counts per reservation state (either reservations or units).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct StateCounts {
    pub held: u64,
    pub sold: u64,
    pub released: u64,
    pub uncertain: u64,
}

/// A snapshot of one sale, for the admin API and audits
/// (`added == stock + units.held + units.sold + units.uncertain`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SaleStatus {
    pub sku: Sku,
    /// Units left; `None` when the sale is not configured.
    pub stock: Option<u64>,
    /// Units ever added, net: every stock set adds its difference from the previous stock,
    /// every add its delta. `None` when nothing has recorded it yet (the sale is not
    /// configured, or was last changed by a flashgate that did not record it).
    pub added: Option<u64>,
    /// The operator closed the sale: buyers get 410 `closed`; stock is untouched.
    pub closed: bool,
    /// Users currently holding at least one unit (held, sold or uncertain).
    pub buyers: u64,
    pub reservations: StateCounts,
    pub units: StateCounts,
}

/// Why a store call failed. The proxy maps these to responses in one place. `Clone`: a
/// batch's one failure is every waiter's answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// Connect / IO / timeout / transient server state: answer 503 `unavailable`.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The caller passed something the store refuses (stock below zero, a quantity past the
    /// per-user limit, ...).
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// The store answered something we do not understand (a bug or tampered data).
    #[error("unexpected store reply: {0}")]
    Protocol(String),
}

/// The stock store behind flash-sale admission, as the proxy holds it (`Arc<dyn Store>`).
///
/// Every method is one atomic step on the store; callers never combine two
/// calls into a check-then-set. A store implements [`StoreImpl`] (plain futures); this
/// object-safe face, with its boxed futures, comes from the one blanket impl below.
pub trait Store: Send + Sync + 'static {
    /// `"memory"` or `"redis"`, for logs and metrics.
    fn kind(&self) -> &'static str;
    fn reserve<'a>(
        &'a self,
        req: &'a ReserveRequest,
    ) -> BoxFuture<'a, Result<ReserveOutcome, StoreError>>;
    fn release<'a>(
        &'a self,
        sku: &'a Sku,
        reservation: &'a ReservationId,
    ) -> BoxFuture<'a, Result<ReleaseOutcome, StoreError>>;
    fn settle<'a>(
        &'a self,
        sku: &'a Sku,
        reservation: &'a ReservationId,
        to: Settlement,
    ) -> BoxFuture<'a, Result<bool, StoreError>>;
    fn set_stock_if<'a>(
        &'a self,
        sku: &'a Sku,
        units: u64,
        expect: Option<u64>,
    ) -> BoxFuture<'a, Result<StockSet, StoreError>>;
    fn add_stock<'a>(&'a self, sku: &'a Sku, delta: i64) -> BoxFuture<'a, Result<u64, StoreError>>;
    fn set_closed<'a>(
        &'a self,
        sku: &'a Sku,
        closed: bool,
    ) -> BoxFuture<'a, Result<(), StoreError>>;
    fn get_stock<'a>(&'a self, sku: &'a Sku) -> BoxFuture<'a, Result<Option<u64>, StoreError>>;
    fn status<'a>(&'a self, sku: &'a Sku) -> BoxFuture<'a, Result<SaleStatus, StoreError>>;
    fn list_skus(&self, limit: usize) -> BoxFuture<'_, Result<SkuList, StoreError>>;
    fn reservations<'a>(
        &'a self,
        sku: &'a Sku,
        query: &'a ReservationQuery,
    ) -> BoxFuture<'a, Result<ReservationPage, StoreError>>;
    fn resolve<'a>(
        &'a self,
        sku: &'a Sku,
        reservation: &'a ReservationId,
        to: Resolution,
        held_min_age: Duration,
    ) -> BoxFuture<'a, Result<ResolveOutcome, StoreError>>;

    fn check_limits<'a>(
        &'a self,
        check: &'a LimitCheck,
    ) -> BoxFuture<'a, Result<LimitVerdict, StoreError>>;

    fn room<'a>(
        &'a self,
        rules: &'a RoomRules,
        call: &'a RoomCall,
    ) -> BoxFuture<'a, Result<RoomReply, StoreError>>;

    /// Set the units left, whatever they were. Returns the new stock.
    fn set_stock<'a>(&'a self, sku: &'a Sku, units: u64) -> BoxFuture<'a, Result<u64, StoreError>> {
        Box::pin(async move {
            match self.set_stock_if(sku, units, None).await? {
                StockSet::Set { stock } => Ok(stock),
                StockSet::Changed { current } => Err(StoreError::Protocol(format!(
                    "an unconditional stock set was refused (stock {current:?})"
                ))),
            }
        })
    }
}

/// What a stock store implements: one method per atomic step, each returning a `Send`
/// future (write them as `async` blocks or return an inner future). [`Store`] follows.
pub trait StoreImpl: Send + Sync + 'static {
    /// `"memory"` or `"redis"`, for logs and metrics.
    fn kind(&self) -> &'static str;

    /// Atomically: per-user limit check, stock check, decrement, record.
    fn reserve(
        &self,
        req: &ReserveRequest,
    ) -> impl Future<Output = Result<ReserveOutcome, StoreError>> + Send;

    /// Return a `held` reservation's units and the user's slot, at most once.
    fn release(
        &self,
        sku: &Sku,
        reservation: &ReservationId,
    ) -> impl Future<Output = Result<ReleaseOutcome, StoreError>> + Send;

    /// held → sold or held → uncertain; returns false (no-op) if the reservation is not `held`.
    fn settle(
        &self,
        sku: &Sku,
        reservation: &ReservationId,
        to: Settlement,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Set the units left (creates the sale) if the stock is still `expect` (`None`: whatever
    /// it is), recording the difference in `added`. `units` above [`MAX_UNITS`], or an
    /// `added` that would pass it, is [`StoreError::Invalid`] and changes nothing.
    fn set_stock_if(
        &self,
        sku: &Sku,
        units: u64,
        expect: Option<u64>,
    ) -> impl Future<Output = Result<StockSet, StoreError>> + Send;

    /// Add `delta` units (negative removes), recording it in `added`. A missing key counts
    /// as 0; a result below zero or above [`MAX_UNITS`] (stock or `added`), or a `delta`
    /// beyond ±[`MAX_UNITS`], is [`StoreError::Invalid`] and changes nothing.
    fn add_stock(
        &self,
        sku: &Sku,
        delta: i64,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Close (`true`) or reopen (`false`) a sale: a closed sale answers every buyer
    /// [`ReserveOutcome::Closed`]. Stock, holds and releases are untouched (a release after
    /// a close puts the unit back in stock; the sale stays closed). Works on a SKU with no
    /// stock yet, so a sale can be closed before it is stocked.
    fn set_closed(
        &self,
        sku: &Sku,
        closed: bool,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Units left, or `None` when the sale is not configured.
    fn get_stock(&self, sku: &Sku) -> impl Future<Output = Result<Option<u64>, StoreError>> + Send;

    /// Stock, buyers and per-state counters of one sale.
    fn status(&self, sku: &Sku) -> impl Future<Output = Result<SaleStatus, StoreError>> + Send;

    /// The SKUs ever stocked (set or add) through this store, sorted; at most `limit`.
    fn list_skus(&self, limit: usize) -> impl Future<Output = Result<SkuList, StoreError>> + Send;

    /// Reservations of one sale in `query.state`, oldest first, at most `query.limit`. Bounded
    /// work: a sale with a million reservations is read in pages, and only as far as needed.
    fn reservations(
        &self,
        sku: &Sku,
        query: &ReservationQuery,
    ) -> impl Future<Output = Result<ReservationPage, StoreError>> + Send;

    /// The operator's reconciliation, atomically and at most once: an `uncertain`
    /// reservation, or a `held` one reserved at least `held_min_age` ago, becomes `to`. A
    /// release returns the units to stock and frees the user's slot, exactly like a release
    /// after a refused order. Anything else changes nothing.
    fn resolve(
        &self,
        sku: &Sku,
        reservation: &ReservationId,
        to: Resolution,
        held_min_age: Duration,
    ) -> impl Future<Output = Result<ResolveOutcome, StoreError>> + Send;

    /// A request's global rate-limit buckets (`scope: global`), decided together in one
    /// atomic step by GCRA ([`limits`]): `Allowed` takes a token from each, `Limited` takes
    /// none. Shared by every instance of a Redis store; one process's for the memory store.
    fn check_limits(
        &self,
        check: &LimitCheck,
    ) -> impl Future<Output = Result<LimitVerdict, StoreError>> + Send;

    /// One waiting-room decision (`store::room`), atomic: a visit, a session's refresh, the
    /// counts, or the operator's mode. Shared by every instance of a Redis store.
    fn room(
        &self,
        rules: &RoomRules,
        call: &RoomCall,
    ) -> impl Future<Output = Result<RoomReply, StoreError>> + Send;
}

impl<T: StoreImpl> Store for T {
    fn kind(&self) -> &'static str {
        StoreImpl::kind(self)
    }
    fn reserve<'a>(
        &'a self,
        req: &'a ReserveRequest,
    ) -> BoxFuture<'a, Result<ReserveOutcome, StoreError>> {
        Box::pin(StoreImpl::reserve(self, req))
    }
    fn release<'a>(
        &'a self,
        sku: &'a Sku,
        reservation: &'a ReservationId,
    ) -> BoxFuture<'a, Result<ReleaseOutcome, StoreError>> {
        Box::pin(StoreImpl::release(self, sku, reservation))
    }
    fn settle<'a>(
        &'a self,
        sku: &'a Sku,
        reservation: &'a ReservationId,
        to: Settlement,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(StoreImpl::settle(self, sku, reservation, to))
    }
    fn set_stock_if<'a>(
        &'a self,
        sku: &'a Sku,
        units: u64,
        expect: Option<u64>,
    ) -> BoxFuture<'a, Result<StockSet, StoreError>> {
        Box::pin(StoreImpl::set_stock_if(self, sku, units, expect))
    }
    fn add_stock<'a>(&'a self, sku: &'a Sku, delta: i64) -> BoxFuture<'a, Result<u64, StoreError>> {
        Box::pin(StoreImpl::add_stock(self, sku, delta))
    }
    fn set_closed<'a>(
        &'a self,
        sku: &'a Sku,
        closed: bool,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(StoreImpl::set_closed(self, sku, closed))
    }
    fn get_stock<'a>(&'a self, sku: &'a Sku) -> BoxFuture<'a, Result<Option<u64>, StoreError>> {
        Box::pin(StoreImpl::get_stock(self, sku))
    }
    fn status<'a>(&'a self, sku: &'a Sku) -> BoxFuture<'a, Result<SaleStatus, StoreError>> {
        Box::pin(StoreImpl::status(self, sku))
    }
    fn list_skus(&self, limit: usize) -> BoxFuture<'_, Result<SkuList, StoreError>> {
        Box::pin(StoreImpl::list_skus(self, limit))
    }
    fn reservations<'a>(
        &'a self,
        sku: &'a Sku,
        query: &'a ReservationQuery,
    ) -> BoxFuture<'a, Result<ReservationPage, StoreError>> {
        Box::pin(StoreImpl::reservations(self, sku, query))
    }
    fn resolve<'a>(
        &'a self,
        sku: &'a Sku,
        reservation: &'a ReservationId,
        to: Resolution,
        held_min_age: Duration,
    ) -> BoxFuture<'a, Result<ResolveOutcome, StoreError>> {
        Box::pin(StoreImpl::resolve(self, sku, reservation, to, held_min_age))
    }
    fn check_limits<'a>(
        &'a self,
        check: &'a LimitCheck,
    ) -> BoxFuture<'a, Result<LimitVerdict, StoreError>> {
        Box::pin(StoreImpl::check_limits(self, check))
    }
    fn room<'a>(
        &'a self,
        rules: &'a RoomRules,
        call: &'a RoomCall,
    ) -> BoxFuture<'a, Result<RoomReply, StoreError>> {
        Box::pin(StoreImpl::room(self, rules, call))
    }
}

/// The parts of one sale's keyspace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyPart {
    Stock,
    Buyers,
    Reservations,
    Stats,
}

impl KeyPart {
    fn suffix(self) -> &'static str {
        match self {
            KeyPart::Stock => "stock",
            KeyPart::Buyers => "buyers",
            KeyPart::Reservations => "res",
            KeyPart::Stats => "stats",
        }
    }
}

/// The one function that builds Redis keys: `{prefix}:{sku}:{part}`, e.g.
/// `fg:{abc-1}:stock`.
///
/// The braces are a Redis Cluster hash tag: only `sku` is hashed, so every
/// key of a sale lands on the same slot and one script may touch them all.
/// A [`Sku`] cannot hold a brace (or anything else that would break the tag).
pub fn key(prefix: &str, sku: &Sku, part: KeyPart) -> String {
    format!("{prefix}:{{{sku}}}:{}", part.suffix())
}

/// The one key that belongs to no sale: `{prefix}:skus`, the set of SKUs ever stocked. It has
/// no hash tag, so it may live on any Cluster slot: it is written by its own command, never
/// inside a sale's script.
pub fn registry_key(prefix: &str) -> String {
    format!("{prefix}:skus")
}

/// Checks shared by both stores, so they refuse exactly the same requests. (SKU and user are
/// typed: only the quantity is left to check.)
pub(crate) fn validate_reserve(req: &ReserveRequest) -> Result<(), StoreError> {
    if req.quantity == 0 {
        return Err(StoreError::Invalid("quantity must be at least 1".into()));
    }
    if req.quantity > req.per_user_limit {
        return Err(StoreError::Invalid(format!(
            "quantity {} exceeds the per-user limit {}",
            req.quantity, req.per_user_limit
        )));
    }
    Ok(())
}

/// The largest stock, delta, expected stock or `added` total: 2^53 − 1. Lua numbers are
/// doubles, exact only up to here; past it a script would compute wrong stock.
pub const MAX_UNITS: u64 = (1 << 53) - 1;

/// Refuse a stock (or expected stock) the scripts cannot compute with exactly.
pub(crate) fn validate_units(what: &str, units: u64) -> Result<i64, StoreError> {
    if units > MAX_UNITS {
        return Err(StoreError::Invalid(format!(
            "{what} {units} exceeds {MAX_UNITS} (2^53 - 1)"
        )));
    }
    i64::try_from(units).map_err(|_| StoreError::Invalid(format!("{what} {units} is too large")))
}

/// Refuse a delta beyond ±[`MAX_UNITS`].
pub(crate) fn validate_delta(delta: i64) -> Result<(), StoreError> {
    if delta.unsigned_abs() > MAX_UNITS {
        return Err(StoreError::Invalid(format!(
            "delta {delta} is beyond ±{MAX_UNITS} (2^53 - 1)"
        )));
    }
    Ok(())
}

/// All keys of one sale.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaleKeys {
    pub stock: String,
    pub buyers: String,
    pub reservations: String,
    pub stats: String,
}

impl SaleKeys {
    /// Build the keys of `sku` with [`key`].
    pub fn new(prefix: &str, sku: &Sku) -> Self {
        SaleKeys {
            stock: key(prefix, sku, KeyPart::Stock),
            buyers: key(prefix, sku, KeyPart::Buyers),
            reservations: key(prefix, sku, KeyPart::Reservations),
            stats: key(prefix, sku, KeyPart::Stats),
        }
    }

    /// The keys in the order every script expects them as `KEYS[1..4]`.
    pub fn script_keys(&self) -> [&str; 4] {
        [&self.stock, &self.buyers, &self.reservations, &self.stats]
    }
}

/// A fresh reservation id: 128 random bits as 32 hex chars ([`ReservationId::random`]).
/// Generated by the caller (not the script) so Lua stays deterministic apart from `TIME`.
pub fn new_reservation_id() -> ReservationId {
    ReservationId::random()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_carry_the_hash_tag() {
        let sku = |s| Sku::parse(s).unwrap();
        assert_eq!(key("fg", &sku("abc-1"), KeyPart::Stock), "fg:{abc-1}:stock");
        assert_eq!(registry_key("fg"), "fg:skus");
        let k = SaleKeys::new("fg", &sku("abc-1"));
        assert_eq!(
            k.script_keys(),
            [
                "fg:{abc-1}:stock",
                "fg:{abc-1}:buyers",
                "fg:{abc-1}:res",
                "fg:{abc-1}:stats"
            ]
        );
    }

    #[test]
    fn reservation_ids_are_128_bit_hex() {
        let a = new_reservation_id();
        assert_eq!(a.as_str().len(), 32);
        assert!(a.as_str().chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, new_reservation_id());
    }
}
