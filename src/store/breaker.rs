//! A circuit breaker in front of a store. After `failures` consecutive `Unavailable` answers
//! it opens: calls fail at once for `cooldown`, so a dead or stalled Redis costs buyers no
//! per-request timeout (the envoyproxy/ratelimit lesson). Then it lets one probe through
//! (half-open): success closes it, failure opens it again.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus_client::metrics::gauge::Gauge;
use tracing::{info, warn};

use super::{
    LimitCheck, LimitVerdict, ReleaseOutcome, ReservationId, ReservationPage, ReservationQuery,
    ReserveOutcome, ReserveRequest, Resolution, ResolveOutcome, SaleStatus, Settlement, Sku,
    SkuList, StockSet, Store, StoreError, StoreImpl,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

struct Inner {
    state: BreakerState,
    consecutive_failures: u32,
    opened_at: Instant,
    probe_in_flight: bool,
}

pub struct Breaker<S> {
    store: S,
    failures: u32,
    cooldown: Duration,
    // A std Mutex: held for a few instructions, never across an await.
    inner: Mutex<Inner>,
    /// `flashgate_breaker_open`: 1 while open or half-open.
    open_gauge: Option<Gauge>,
}

impl<S: Store> Breaker<S> {
    pub fn new(store: S, failures: u32, cooldown: Duration) -> Self {
        Breaker {
            store,
            failures: failures.max(1),
            cooldown,
            inner: Mutex::new(Inner {
                state: BreakerState::Closed,
                consecutive_failures: 0,
                opened_at: Instant::now(),
                probe_in_flight: false,
            }),
            open_gauge: None,
        }
    }

    /// Reports the breaker's state to `gauge` (1 open or probing, 0 closed).
    pub fn reporting_to(mut self, gauge: Gauge) -> Self {
        self.open_gauge = Some(gauge);
        self
    }

    fn report(&self, state: BreakerState) {
        if let Some(g) = &self.open_gauge {
            g.set(i64::from(state != BreakerState::Closed));
        }
    }

    pub fn state(&self) -> BreakerState {
        self.lock().state
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A poisoned lock only means a panic elsewhere mid-update; the counters stay usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// May this call go to the store?
    fn admit(&self) -> Result<(), StoreError> {
        let mut g = self.lock();
        match g.state {
            BreakerState::Closed => Ok(()),
            BreakerState::Open if g.opened_at.elapsed() >= self.cooldown => {
                g.state = BreakerState::HalfOpen;
                g.probe_in_flight = true;
                self.report(g.state);
                info!(breaker = "half_open", "store circuit breaker: probing");
                Ok(())
            }
            BreakerState::HalfOpen if !g.probe_in_flight => {
                g.probe_in_flight = true;
                Ok(())
            }
            _ => Err(StoreError::Unavailable("circuit breaker open".into())),
        }
    }

    fn record<T>(&self, result: &Result<T, StoreError>) {
        let mut g = self.lock();
        g.probe_in_flight = false;
        match result {
            Err(StoreError::Unavailable(e)) => {
                g.consecutive_failures = g.consecutive_failures.saturating_add(1);
                let trip = g.state == BreakerState::HalfOpen
                    || (g.state == BreakerState::Closed && g.consecutive_failures >= self.failures);
                if trip {
                    g.state = BreakerState::Open;
                    g.opened_at = Instant::now();
                    self.report(g.state);
                    warn!(breaker = "open", failures = g.consecutive_failures, cooldown = ?self.cooldown, error = %e, "store circuit breaker opened: failing fast");
                }
            }
            // An answer, even a "no", means the store is there.
            _ => {
                if g.state != BreakerState::Closed {
                    info!(
                        breaker = "closed",
                        "store circuit breaker closed: store is back"
                    );
                }
                g.state = BreakerState::Closed;
                g.consecutive_failures = 0;
                self.report(g.state);
            }
        }
    }

    async fn guarded<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        self.admit()?;
        // If the caller gives up mid-call (a dropped future), free the probe slot anyway,
        // or a half-open breaker would wait for a probe that never reports.
        let mut pending = Pending {
            breaker: self,
            done: false,
        };
        let result = call.await;
        self.record(&result);
        pending.done = true;
        result
    }
}

struct Pending<'a, S: Store> {
    breaker: &'a Breaker<S>,
    done: bool,
}

impl<S: Store> Drop for Pending<'_, S> {
    fn drop(&mut self) {
        if !self.done {
            self.breaker.lock().probe_in_flight = false;
        }
    }
}

impl<S: Store> StoreImpl for Breaker<S> {
    fn kind(&self) -> &'static str {
        self.store.kind()
    }

    async fn reserve(&self, req: &ReserveRequest) -> Result<ReserveOutcome, StoreError> {
        self.guarded(self.store.reserve(req)).await
    }

    async fn release(
        &self,
        sku: &Sku,
        reservation: &ReservationId,
    ) -> Result<ReleaseOutcome, StoreError> {
        self.guarded(self.store.release(sku, reservation)).await
    }

    async fn settle(
        &self,
        sku: &Sku,
        reservation: &ReservationId,
        to: Settlement,
    ) -> Result<bool, StoreError> {
        self.guarded(self.store.settle(sku, reservation, to)).await
    }

    async fn set_stock_if(
        &self,
        sku: &Sku,
        units: u64,
        expect: Option<u64>,
    ) -> Result<StockSet, StoreError> {
        self.guarded(self.store.set_stock_if(sku, units, expect))
            .await
    }

    async fn set_closed(&self, sku: &Sku, closed: bool) -> Result<(), StoreError> {
        self.guarded(self.store.set_closed(sku, closed)).await
    }

    async fn add_stock(&self, sku: &Sku, delta: i64) -> Result<u64, StoreError> {
        self.guarded(self.store.add_stock(sku, delta)).await
    }

    async fn get_stock(&self, sku: &Sku) -> Result<Option<u64>, StoreError> {
        self.guarded(self.store.get_stock(sku)).await
    }

    async fn status(&self, sku: &Sku) -> Result<SaleStatus, StoreError> {
        self.guarded(self.store.status(sku)).await
    }

    async fn list_skus(&self, limit: usize) -> Result<SkuList, StoreError> {
        self.guarded(self.store.list_skus(limit)).await
    }

    async fn reservations(
        &self,
        sku: &Sku,
        query: &ReservationQuery,
    ) -> Result<ReservationPage, StoreError> {
        self.guarded(self.store.reservations(sku, query)).await
    }

    async fn resolve(
        &self,
        sku: &Sku,
        reservation: &ReservationId,
        to: Resolution,
        held_min_age: Duration,
    ) -> Result<ResolveOutcome, StoreError> {
        self.guarded(self.store.resolve(sku, reservation, to, held_min_age))
            .await
    }

    async fn check_limits(&self, check: &LimitCheck) -> Result<LimitVerdict, StoreError> {
        self.guarded(self.store.check_limits(check)).await
    }

    async fn room(
        &self,
        rules: &super::RoomRules,
        call: &super::RoomCall,
    ) -> Result<super::RoomReply, StoreError> {
        self.guarded(self.store.room(rules, call)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

    /// A store that is up or down on command and counts the calls that reach it.
    #[derive(Default)]
    struct Flaky {
        down: AtomicBool,
        calls: AtomicU32,
    }

    impl StoreImpl for Flaky {
        fn kind(&self) -> &'static str {
            "flaky"
        }
        async fn reserve(&self, _: &ReserveRequest) -> Result<ReserveOutcome, StoreError> {
            Err(StoreError::Invalid("unused".into()))
        }
        async fn release(&self, _: &Sku, _: &ReservationId) -> Result<ReleaseOutcome, StoreError> {
            Err(StoreError::Invalid("unused".into()))
        }
        async fn settle(
            &self,
            _: &Sku,
            _: &ReservationId,
            _: Settlement,
        ) -> Result<bool, StoreError> {
            Err(StoreError::Invalid("unused".into()))
        }
        async fn set_stock_if(
            &self,
            _: &Sku,
            _: u64,
            _: Option<u64>,
        ) -> Result<StockSet, StoreError> {
            Err(StoreError::Invalid("unused".into()))
        }
        async fn set_closed(&self, _: &Sku, _: bool) -> Result<(), StoreError> {
            Err(StoreError::Invalid("unused".into()))
        }
        async fn add_stock(&self, _: &Sku, _: i64) -> Result<u64, StoreError> {
            Err(StoreError::Invalid("unused".into()))
        }
        async fn get_stock(&self, _: &Sku) -> Result<Option<u64>, StoreError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if self.down.load(Ordering::SeqCst) {
                Err(StoreError::Unavailable("down".into()))
            } else {
                Ok(Some(1))
            }
        }
        async fn status(&self, _: &Sku) -> Result<SaleStatus, StoreError> {
            Err(StoreError::Invalid("unused".into()))
        }
        async fn list_skus(&self, _: usize) -> Result<SkuList, StoreError> {
            Err(StoreError::Invalid("unused".into()))
        }
        async fn reservations(
            &self,
            _: &Sku,
            _: &ReservationQuery,
        ) -> Result<ReservationPage, StoreError> {
            Err(StoreError::Invalid("unused".into()))
        }
        async fn resolve(
            &self,
            _: &Sku,
            _: &ReservationId,
            _: Resolution,
            _: Duration,
        ) -> Result<ResolveOutcome, StoreError> {
            Err(StoreError::Invalid("unused".into()))
        }
        async fn check_limits(&self, _: &LimitCheck) -> Result<LimitVerdict, StoreError> {
            Err(StoreError::Invalid("unused".into()))
        }
        async fn room(
            &self,
            _: &crate::store::RoomRules,
            _: &crate::store::RoomCall,
        ) -> Result<crate::store::RoomReply, StoreError> {
            Err(StoreError::Invalid("unused".into()))
        }
    }

    #[tokio::test]
    async fn opens_after_consecutive_failures_then_probes_and_closes() {
        let a = Sku::parse("a").unwrap();
        let b = Breaker::new(Flaky::default(), 3, Duration::from_millis(50));
        b.store.down.store(true, Ordering::SeqCst);
        for _ in 0..3 {
            assert!(Store::get_stock(&b, &a).await.is_err());
        }
        assert_eq!(b.state(), BreakerState::Open);
        // Open: fails fast without touching the store.
        for _ in 0..10 {
            assert!(Store::get_stock(&b, &a).await.is_err());
        }
        assert_eq!(b.store.calls.load(Ordering::SeqCst), 3);
        // After the cooldown one probe goes through; it fails → open again.
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(Store::get_stock(&b, &a).await.is_err());
        assert_eq!(b.store.calls.load(Ordering::SeqCst), 4);
        assert_eq!(b.state(), BreakerState::Open);
        // The store comes back: the next probe closes the breaker.
        b.store.down.store(false, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(Store::get_stock(&b, &a).await.unwrap(), Some(1));
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[tokio::test]
    async fn a_success_resets_the_count() {
        let a = Sku::parse("a").unwrap();
        let b = Breaker::new(Flaky::default(), 3, Duration::from_secs(60));
        for _ in 0..5 {
            b.store.down.store(true, Ordering::SeqCst);
            assert!(Store::get_stock(&b, &a).await.is_err());
            assert!(Store::get_stock(&b, &a).await.is_err());
            b.store.down.store(false, Ordering::SeqCst);
            assert!(Store::get_stock(&b, &a).await.is_ok());
        }
        assert_eq!(b.state(), BreakerState::Closed);
    }
}
