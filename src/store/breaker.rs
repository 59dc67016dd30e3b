//! A circuit breaker in front of a store. After `failures` consecutive `Unavailable` answers
//! it opens: calls fail at once for `cooldown`, so a dead or stalled Redis costs buyers no
//! per-request timeout (the envoyproxy/ratelimit lesson). Then it lets one probe through
//! (half-open): success closes it, failure opens it again.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::{
    BoxFuture, ReleaseOutcome, ReservationId, ReserveOutcome, ReserveRequest, SaleStatus,
    Settlement, Sku, StockSet, Store, StoreError,
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

impl<S: Store> Store for Breaker<S> {
    fn kind(&self) -> &'static str {
        self.store.kind()
    }

    fn reserve<'a>(
        &'a self,
        req: &'a ReserveRequest,
    ) -> BoxFuture<'a, Result<ReserveOutcome, StoreError>> {
        Box::pin(self.guarded(self.store.reserve(req)))
    }

    fn release<'a>(
        &'a self,
        sku: &'a Sku,
        reservation: &'a ReservationId,
    ) -> BoxFuture<'a, Result<ReleaseOutcome, StoreError>> {
        Box::pin(self.guarded(self.store.release(sku, reservation)))
    }

    fn settle<'a>(
        &'a self,
        sku: &'a Sku,
        reservation: &'a ReservationId,
        to: Settlement,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(self.guarded(self.store.settle(sku, reservation, to)))
    }

    fn set_stock_if<'a>(
        &'a self,
        sku: &'a Sku,
        units: u64,
        expect: Option<u64>,
    ) -> BoxFuture<'a, Result<StockSet, StoreError>> {
        Box::pin(self.guarded(self.store.set_stock_if(sku, units, expect)))
    }

    fn set_closed<'a>(
        &'a self,
        sku: &'a Sku,
        closed: bool,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.guarded(self.store.set_closed(sku, closed)))
    }

    fn add_stock<'a>(&'a self, sku: &'a Sku, delta: i64) -> BoxFuture<'a, Result<u64, StoreError>> {
        Box::pin(self.guarded(self.store.add_stock(sku, delta)))
    }

    fn get_stock<'a>(&'a self, sku: &'a Sku) -> BoxFuture<'a, Result<Option<u64>, StoreError>> {
        Box::pin(self.guarded(self.store.get_stock(sku)))
    }

    fn status<'a>(&'a self, sku: &'a Sku) -> BoxFuture<'a, Result<SaleStatus, StoreError>> {
        Box::pin(self.guarded(self.store.status(sku)))
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

    impl Store for Flaky {
        fn kind(&self) -> &'static str {
            "flaky"
        }
        fn reserve<'a>(
            &'a self,
            _: &'a ReserveRequest,
        ) -> BoxFuture<'a, Result<ReserveOutcome, StoreError>> {
            Box::pin(async { Err(StoreError::Invalid("unused".into())) })
        }
        fn release<'a>(
            &'a self,
            _: &'a Sku,
            _: &'a ReservationId,
        ) -> BoxFuture<'a, Result<ReleaseOutcome, StoreError>> {
            Box::pin(async { Err(StoreError::Invalid("unused".into())) })
        }
        fn settle<'a>(
            &'a self,
            _: &'a Sku,
            _: &'a ReservationId,
            _: Settlement,
        ) -> BoxFuture<'a, Result<bool, StoreError>> {
            Box::pin(async { Err(StoreError::Invalid("unused".into())) })
        }
        fn set_stock_if<'a>(
            &'a self,
            _: &'a Sku,
            _: u64,
            _: Option<u64>,
        ) -> BoxFuture<'a, Result<StockSet, StoreError>> {
            Box::pin(async { Err(StoreError::Invalid("unused".into())) })
        }
        fn set_closed<'a>(&'a self, _: &'a Sku, _: bool) -> BoxFuture<'a, Result<(), StoreError>> {
            Box::pin(async { Err(StoreError::Invalid("unused".into())) })
        }
        fn add_stock<'a>(&'a self, _: &'a Sku, _: i64) -> BoxFuture<'a, Result<u64, StoreError>> {
            Box::pin(async { Err(StoreError::Invalid("unused".into())) })
        }
        fn get_stock<'a>(&'a self, _: &'a Sku) -> BoxFuture<'a, Result<Option<u64>, StoreError>> {
            Box::pin(async {
                self.calls.fetch_add(1, Ordering::SeqCst);
                if self.down.load(Ordering::SeqCst) {
                    Err(StoreError::Unavailable("down".into()))
                } else {
                    Ok(Some(1))
                }
            })
        }
        fn status<'a>(&'a self, _: &'a Sku) -> BoxFuture<'a, Result<SaleStatus, StoreError>> {
            Box::pin(async { Err(StoreError::Invalid("unused".into())) })
        }
    }

    #[tokio::test]
    async fn opens_after_consecutive_failures_then_probes_and_closes() {
        let a = Sku::parse("a").unwrap();
        let b = Breaker::new(Flaky::default(), 3, Duration::from_millis(50));
        b.store.down.store(true, Ordering::SeqCst);
        for _ in 0..3 {
            assert!(b.get_stock(&a).await.is_err());
        }
        assert_eq!(b.state(), BreakerState::Open);
        // Open: fails fast without touching the store.
        for _ in 0..10 {
            assert!(b.get_stock(&a).await.is_err());
        }
        assert_eq!(b.store.calls.load(Ordering::SeqCst), 3);
        // After the cooldown one probe goes through; it fails → open again.
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(b.get_stock(&a).await.is_err());
        assert_eq!(b.store.calls.load(Ordering::SeqCst), 4);
        assert_eq!(b.state(), BreakerState::Open);
        // The store comes back: the next probe closes the breaker.
        b.store.down.store(false, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(b.get_stock(&a).await.unwrap(), Some(1));
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[tokio::test]
    async fn a_success_resets_the_count() {
        let a = Sku::parse("a").unwrap();
        let b = Breaker::new(Flaky::default(), 3, Duration::from_secs(60));
        for _ in 0..5 {
            b.store.down.store(true, Ordering::SeqCst);
            assert!(b.get_stock(&a).await.is_err());
            assert!(b.get_stock(&a).await.is_err());
            b.store.down.store(false, Ordering::SeqCst);
            assert!(b.get_stock(&a).await.is_ok());
        }
        assert_eq!(b.state(), BreakerState::Closed);
    }
}
