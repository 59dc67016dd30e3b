//! The embedded store: the same semantics as the Redis scripts, in-process.
//!
//! Used when no Redis is configured (one flashgate instance, state lost on
//! restart). It exists so a demo or a single-box sale needs no Redis, and so
//! the conformance suite can prove both stores behave the same.
//!
//! All sales live in one `HashMap` behind a `std::sync::Mutex`. A std mutex
//! (not tokio's) is right here: every operation is a few map lookups, the
//! lock is never held across an `.await`, and an uncontended std mutex is far
//! cheaper than an async one. The lock is also what makes each operation
//! atomic, like a Lua script on the Redis server.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::limits::LocalLimits;
use super::{
    LimitCheck, LimitVerdict, MAX_UNITS, OpenState, ReleaseOutcome, ReservationId, ReservationInfo,
    ReservationPage, ReservationQuery, ReserveOutcome, ReserveRequest, Resolution, ResolveOutcome,
    SaleStatus, Settlement, Sku, SkuList, StateCounts, StockSet, StoreError, StoreImpl, UserId,
    new_reservation_id, validate_delta, validate_reserve, validate_units,
};

/// In-process [`Store`]; see the module docs.
#[derive(Debug, Default)]
pub struct MemoryStore {
    sales: Mutex<HashMap<Sku, Sale>>,
    /// Global rate limits (`scope: global`): this process's GCRA, in its own lock.
    limits: LocalLimits,
    /// Waiting rooms (`store::room`), in their own lock.
    rooms: super::room::LocalRooms,
}

/// One SKU's state: the in-memory twin of the four Redis keys.
#[derive(Debug, Default)]
struct Sale {
    /// `None` = not configured (the Redis stock key is missing).
    stock: Option<u64>,
    /// user → units held (held + sold + uncertain); zero entries are removed.
    buyers: HashMap<UserId, u64>,
    reservations: HashMap<ReservationId, Reservation>,
    /// The reservations still `held` or `uncertain`: what a listing reads, so listing the few
    /// that need attention never walks a million sold ones under the lock.
    open: HashSet<ReservationId>,
    res_counts: StateCounts,
    unit_counts: StateCounts,
    /// Units ever added, net (see [`SaleStatus::added`]); `None` until stock is first set.
    added: Option<u64>,
    /// Closed by the operator: every reserve answers `Closed`.
    closed: bool,
}

#[derive(Debug)]
struct Reservation {
    state: State,
    quantity: u64,
    user: UserId,
    /// When it was reserved, Unix milliseconds (this process's clock: one instance only).
    at_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Held,
    Sold,
    Released,
    Uncertain,
}

impl State {
    fn as_str(self) -> &'static str {
        match self {
            State::Held => "held",
            State::Sold => "sold",
            State::Released => "released",
            State::Uncertain => "uncertain",
        }
    }
}

impl From<OpenState> for State {
    fn from(s: OpenState) -> Self {
        match s {
            OpenState::Held => State::Held,
            OpenState::Uncertain => State::Uncertain,
        }
    }
}

impl From<Resolution> for State {
    fn from(r: Resolution) -> Self {
        match r {
            Resolution::Sold => State::Sold,
            Resolution::Released => State::Released,
        }
    }
}

impl State {
    fn open(self) -> Option<OpenState> {
        match self {
            State::Held => Some(OpenState::Held),
            State::Uncertain => Some(OpenState::Uncertain),
            State::Sold | State::Released => None,
        }
    }
}

/// Now, in Unix milliseconds.
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl From<Settlement> for State {
    fn from(s: Settlement) -> Self {
        match s {
            Settlement::Sold => State::Sold,
            Settlement::Uncertain => State::Uncertain,
        }
    }
}

fn counter(counts: &mut StateCounts, state: State) -> &mut u64 {
    match state {
        State::Held => &mut counts.held,
        State::Sold => &mut counts.sold,
        State::Released => &mut counts.released,
        State::Uncertain => &mut counts.uncertain,
    }
}

impl Sale {
    /// `added` after a change of `delta` units. The first change of a sale that has no
    /// `added` yet starts from what the audit says it must be (stock + held + sold +
    /// uncertain), like the Redis scripts. Refused past [`MAX_UNITS`]: then no held unit
    /// coming back could push the stock beyond it either.
    fn next_added(&self, delta: i128) -> Result<u64, StoreError> {
        let base = match self.added {
            Some(a) => i128::from(a),
            None => {
                let u = &self.unit_counts;
                i128::from(self.stock.unwrap_or(0))
                    + i128::from(u.held)
                    + i128::from(u.sold)
                    + i128::from(u.uncertain)
            }
        };
        let next = (base + delta).max(0);
        u64::try_from(next)
            .ok()
            .filter(|n| *n <= MAX_UNITS)
            .ok_or_else(|| {
                StoreError::Invalid(format!(
                    "units ever added would exceed {MAX_UNITS} (2^53 - 1): {base} + {delta}"
                ))
            })
    }

    /// Move one reservation's counters from `from` to `to` (the stats hash in Redis).
    fn count_transition(&mut self, from: Option<State>, to: State, quantity: u64) {
        if let Some(from) = from {
            let r = counter(&mut self.res_counts, from);
            *r = r.saturating_sub(1);
            let u = counter(&mut self.unit_counts, from);
            *u = u.saturating_sub(quantity);
        }
        let r = counter(&mut self.res_counts, to);
        *r = r.saturating_add(1);
        let u = counter(&mut self.unit_counts, to);
        *u = u.saturating_add(quantity);
    }

    /// Moves reservation `id` from `from` to `to` (the caller checked it is in `from`). A move
    /// to `released` returns the units to stock and the user's slot, like release.lua; the
    /// answer is the stock afterwards.
    fn transition(&mut self, id: &ReservationId, from: State, to: State) -> u64 {
        let Some(res) = self.reservations.get_mut(id) else {
            return self.stock.unwrap_or(0);
        };
        res.state = to;
        let (quantity, user) = (res.quantity, res.user.clone());
        if to.open().is_none() {
            self.open.remove(id);
        }
        if to == State::Released {
            // Like release.lua: a deleted (unconfigured) stock is not recreated.
            if let Some(stock) = self.stock.as_mut() {
                *stock = stock.saturating_add(quantity);
            }
            if let Some(units) = self.buyers.get_mut(&user) {
                *units = units.saturating_sub(quantity);
                if *units == 0 {
                    self.buyers.remove(&user);
                }
            }
        }
        self.count_transition(Some(from), to, quantity);
        self.stock.unwrap_or(0)
    }
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Take the lock. A poisoned lock is recovered rather than propagated:
    /// no code below panics between two writes, so the state is consistent.
    fn sales(&self) -> MutexGuard<'_, HashMap<Sku, Sale>> {
        self.sales.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn reserve_now(&self, req: &ReserveRequest) -> Result<ReserveOutcome, StoreError> {
        validate_reserve(req)?;
        let quantity = u64::from(req.quantity);
        let mut sales = self.sales();
        // An unknown SKU is simply not configured. Looking it up (instead of
        // `entry().or_default()`) keeps a flood of made-up SKUs from growing the map.
        let Some(sale) = sales.get_mut(&req.sku) else {
            return Ok(ReserveOutcome::NotConfigured);
        };

        // Same order as reserve.lua: closed, dedupe, then configured, then stock.
        if sale.closed {
            return Ok(ReserveOutcome::Closed);
        }
        let held = sale.buyers.get(&req.user).copied().unwrap_or(0);
        if held.saturating_add(quantity) > u64::from(req.per_user_limit) {
            return Ok(ReserveOutcome::AlreadyPurchased {
                held: u32::try_from(held).unwrap_or(u32::MAX),
            });
        }
        let Some(stock) = sale.stock else {
            return Ok(ReserveOutcome::NotConfigured);
        };
        if stock < quantity {
            return Ok(ReserveOutcome::SoldOut { remaining: stock });
        }

        let remaining = stock - quantity;
        let reservation = new_reservation_id();
        sale.stock = Some(remaining);
        *sale.buyers.entry(req.user.clone()).or_insert(0) += quantity;
        sale.reservations.insert(
            reservation.clone(),
            Reservation {
                state: State::Held,
                quantity,
                user: req.user.clone(),
                at_ms: now_ms(),
            },
        );
        sale.open.insert(reservation.clone());
        sale.count_transition(None, State::Held, quantity);
        Ok(ReserveOutcome::Won {
            reservation,
            remaining,
        })
    }

    fn release_now(&self, sku: &Sku, id: &ReservationId) -> Result<ReleaseOutcome, StoreError> {
        let mut sales = self.sales();
        let Some(sale) = sales.get_mut(sku) else {
            return Ok(ReleaseOutcome::NotHeld { state: None });
        };
        let Some(res) = sale.reservations.get(id) else {
            return Ok(ReleaseOutcome::NotHeld { state: None });
        };
        if res.state != State::Held {
            return Ok(ReleaseOutcome::NotHeld {
                state: Some(res.state.as_str().to_owned()),
            });
        }
        let remaining = sale.transition(id, State::Held, State::Released);
        Ok(ReleaseOutcome::Released { remaining })
    }

    fn settle_now(
        &self,
        sku: &Sku,
        id: &ReservationId,
        to: Settlement,
    ) -> Result<bool, StoreError> {
        let mut sales = self.sales();
        let Some(sale) = sales.get_mut(sku) else {
            return Ok(false);
        };
        let Some(res) = sale.reservations.get(id) else {
            return Ok(false);
        };
        if res.state != State::Held {
            return Ok(false);
        }
        sale.transition(id, State::Held, to.into());
        Ok(true)
    }

    fn set_stock_now(
        &self,
        sku: &Sku,
        units: u64,
        expect: Option<u64>,
    ) -> Result<StockSet, StoreError> {
        validate_units("stock", units)?;
        if let Some(expect) = expect {
            validate_units("expect", expect)?;
        }
        let mut sales = self.sales();
        let current = sales.get(sku).and_then(|s| s.stock);
        if expect.is_some() && current != expect {
            return Ok(StockSet::Changed { current });
        }
        let sale = sales.entry(sku.clone()).or_default();
        let added = sale.next_added(i128::from(units) - i128::from(current.unwrap_or(0)))?;
        sale.stock = Some(units);
        sale.added = Some(added);
        Ok(StockSet::Set { stock: units })
    }

    fn add_stock_now(&self, sku: &Sku, delta: i64) -> Result<u64, StoreError> {
        validate_delta(delta)?;
        let mut sales = self.sales();
        let current = sales.get(sku).and_then(|s| s.stock).unwrap_or(0);
        let next = i128::from(current) + i128::from(delta);
        if next < 0 {
            return Err(StoreError::Invalid(format!(
                "stock would become negative ({current} + {delta})"
            )));
        }
        let next = u64::try_from(next)
            .ok()
            .filter(|n| *n <= MAX_UNITS)
            .ok_or_else(|| {
                StoreError::Invalid(format!(
                    "stock would exceed {MAX_UNITS} (2^53 - 1): {current} + {delta}"
                ))
            })?;
        let sale = sales.entry(sku.clone()).or_default();
        let added = sale.next_added(i128::from(delta))?;
        sale.stock = Some(next);
        sale.added = Some(added);
        Ok(next)
    }

    fn set_closed_now(&self, sku: &Sku, closed: bool) -> Result<(), StoreError> {
        let mut sales = self.sales();
        match sales.get_mut(sku) {
            Some(sale) => sale.closed = closed,
            // Reopening a sale nobody closed creates nothing.
            None if !closed => {}
            None => {
                sales.entry(sku.clone()).or_default().closed = true;
            }
        }
        Ok(())
    }

    fn get_stock_now(&self, sku: &Sku) -> Result<Option<u64>, StoreError> {
        Ok(self.sales().get(sku).and_then(|s| s.stock))
    }

    fn status_now(&self, sku: &Sku) -> Result<SaleStatus, StoreError> {
        let sales = self.sales();
        let status = match sales.get(sku) {
            Some(sale) => SaleStatus {
                sku: sku.clone(),
                stock: sale.stock,
                added: sale.added,
                closed: sale.closed,
                buyers: sale.buyers.len() as u64,
                reservations: sale.res_counts.clone(),
                units: sale.unit_counts.clone(),
            },
            None => SaleStatus {
                sku: sku.clone(),
                stock: None,
                added: None,
                closed: false,
                buyers: 0,
                reservations: StateCounts::default(),
                units: StateCounts::default(),
            },
        };
        Ok(status)
    }

    fn list_skus_now(&self, limit: usize) -> SkuList {
        let sales = self.sales();
        // A sale is listed once stock was set or added (`added` is recorded then); a sale
        // that was only closed is not one yet, as in Redis's registry.
        let mut skus: Vec<Sku> = sales
            .iter()
            .filter(|(_, sale)| sale.added.is_some())
            .map(|(sku, _)| sku.clone())
            .collect();
        drop(sales);
        skus.sort();
        let truncated = skus.len() > limit;
        skus.truncate(limit);
        SkuList { skus, truncated }
    }

    fn reservations_now(&self, sku: &Sku, query: &ReservationQuery) -> ReservationPage {
        let now = now_ms();
        let older_than = u64::try_from(query.older_than.as_millis()).unwrap_or(u64::MAX);
        let sales = self.sales();
        let mut found: Vec<ReservationInfo> = sales
            .get(sku)
            .into_iter()
            .flat_map(|sale| {
                sale.open
                    .iter()
                    .filter_map(|id| sale.reservations.get(id).map(|r| (id, r)))
            })
            .filter(|(_, r)| r.state.open() == Some(query.state))
            .map(|(id, r)| ReservationInfo {
                id: id.clone(),
                user: r.user.clone(),
                quantity: r.quantity,
                state: query.state,
                reserved_at_ms: r.at_ms,
                age_ms: now.saturating_sub(r.at_ms),
            })
            .filter(|r| r.age_ms >= older_than)
            .collect();
        drop(sales);
        found.sort_by(|a, b| (a.reserved_at_ms, &a.id).cmp(&(b.reserved_at_ms, &b.id)));
        let truncated = found.len() > query.limit;
        found.truncate(query.limit);
        ReservationPage {
            reservations: found,
            truncated,
        }
    }

    fn resolve_now(
        &self,
        sku: &Sku,
        id: &ReservationId,
        to: Resolution,
        held_min_age: Duration,
    ) -> ResolveOutcome {
        let mut sales = self.sales();
        let Some(sale) = sales.get_mut(sku) else {
            return ResolveOutcome::Unknown;
        };
        let Some(res) = sale.reservations.get(id) else {
            return ResolveOutcome::Unknown;
        };
        let age_ms = now_ms().saturating_sub(res.at_ms);
        let min_age = u64::try_from(held_min_age.as_millis()).unwrap_or(u64::MAX);
        let from = match res.state.open() {
            Some(OpenState::Uncertain) => OpenState::Uncertain,
            Some(OpenState::Held) if age_ms >= min_age => OpenState::Held,
            _ => {
                return ResolveOutcome::NotResolvable {
                    state: res.state.as_str().to_owned(),
                    age_ms,
                };
            }
        };
        let quantity = res.quantity;
        let remaining = sale.transition(id, from.into(), to.into());
        ResolveOutcome::Resolved {
            from,
            quantity,
            remaining: (to == Resolution::Released).then_some(remaining),
        }
    }
}

// Each method does its work inside the future (lazily, like the Redis store)
// and never awaits while holding the lock.
impl StoreImpl for MemoryStore {
    fn kind(&self) -> &'static str {
        "memory"
    }

    async fn reserve(&self, req: &ReserveRequest) -> Result<ReserveOutcome, StoreError> {
        self.reserve_now(req)
    }

    async fn release(
        &self,
        sku: &Sku,
        reservation: &ReservationId,
    ) -> Result<ReleaseOutcome, StoreError> {
        self.release_now(sku, reservation)
    }

    async fn settle(
        &self,
        sku: &Sku,
        reservation: &ReservationId,
        to: Settlement,
    ) -> Result<bool, StoreError> {
        self.settle_now(sku, reservation, to)
    }

    async fn set_stock_if(
        &self,
        sku: &Sku,
        units: u64,
        expect: Option<u64>,
    ) -> Result<StockSet, StoreError> {
        self.set_stock_now(sku, units, expect)
    }

    async fn set_closed(&self, sku: &Sku, closed: bool) -> Result<(), StoreError> {
        self.set_closed_now(sku, closed)
    }

    async fn add_stock(&self, sku: &Sku, delta: i64) -> Result<u64, StoreError> {
        self.add_stock_now(sku, delta)
    }

    async fn get_stock(&self, sku: &Sku) -> Result<Option<u64>, StoreError> {
        self.get_stock_now(sku)
    }

    async fn status(&self, sku: &Sku) -> Result<SaleStatus, StoreError> {
        self.status_now(sku)
    }

    async fn list_skus(&self, limit: usize) -> Result<SkuList, StoreError> {
        Ok(self.list_skus_now(limit))
    }

    async fn reservations(
        &self,
        sku: &Sku,
        query: &ReservationQuery,
    ) -> Result<ReservationPage, StoreError> {
        Ok(self.reservations_now(sku, query))
    }

    async fn resolve(
        &self,
        sku: &Sku,
        reservation: &ReservationId,
        to: Resolution,
        held_min_age: Duration,
    ) -> Result<ResolveOutcome, StoreError> {
        Ok(self.resolve_now(sku, reservation, to, held_min_age))
    }

    async fn check_limits(&self, check: &LimitCheck) -> Result<LimitVerdict, StoreError> {
        self.limits.check(check)
    }

    async fn room(
        &self,
        rules: &super::RoomRules,
        call: &super::RoomCall,
    ) -> Result<super::RoomReply, StoreError> {
        self.rooms.call(rules, call)
    }
}
