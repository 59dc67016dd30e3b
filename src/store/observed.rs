//! A store as the metrics see it: each call timed (`flashgate_store_duration_seconds{op}`)
//! and each failure counted by kind (`flashgate_store_errors_total{kind}`). It wraps the
//! whole store (the breaker included), so a call the open breaker refuses counts too.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use super::{
    LimitCheck, LimitVerdict, ReleaseOutcome, ReservationId, ReservationPage, ReservationQuery,
    ReserveOutcome, ReserveRequest, Resolution, ResolveOutcome, SaleStatus, Settlement, Sku,
    SkuList, StockSet, Store, StoreError, StoreImpl,
};
use crate::metrics::Metrics;

pub struct Observed<S> {
    store: S,
    metrics: Arc<Metrics>,
}

impl<S: Store> Observed<S> {
    pub fn new(store: S, metrics: Arc<Metrics>) -> Self {
        Observed { store, metrics }
    }

    async fn timed<T>(
        &self,
        op: &'static str,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let started = Instant::now();
        let result = call.await;
        let kind = result.as_ref().err().map(|e| match e {
            StoreError::Unavailable(_) => "unavailable",
            StoreError::Invalid(_) => "invalid",
            StoreError::Protocol(_) => "protocol",
        });
        self.metrics.store_call(op, started.elapsed(), kind);
        result
    }
}

impl<S: Store> StoreImpl for Observed<S> {
    fn kind(&self) -> &'static str {
        self.store.kind()
    }

    async fn reserve(&self, req: &ReserveRequest) -> Result<ReserveOutcome, StoreError> {
        self.timed("reserve", self.store.reserve(req)).await
    }

    async fn release(
        &self,
        sku: &Sku,
        reservation: &ReservationId,
    ) -> Result<ReleaseOutcome, StoreError> {
        self.timed("release", self.store.release(sku, reservation))
            .await
    }

    async fn settle(
        &self,
        sku: &Sku,
        reservation: &ReservationId,
        to: Settlement,
    ) -> Result<bool, StoreError> {
        self.timed("settle", self.store.settle(sku, reservation, to))
            .await
    }

    async fn set_stock_if(
        &self,
        sku: &Sku,
        units: u64,
        expect: Option<u64>,
    ) -> Result<StockSet, StoreError> {
        self.metrics.saw_sku(sku);
        self.timed("set_stock", self.store.set_stock_if(sku, units, expect))
            .await
    }

    async fn add_stock(&self, sku: &Sku, delta: i64) -> Result<u64, StoreError> {
        self.metrics.saw_sku(sku);
        self.timed("add_stock", self.store.add_stock(sku, delta))
            .await
    }

    async fn set_closed(&self, sku: &Sku, closed: bool) -> Result<(), StoreError> {
        self.timed("set_closed", self.store.set_closed(sku, closed))
            .await
    }

    async fn get_stock(&self, sku: &Sku) -> Result<Option<u64>, StoreError> {
        self.timed("get_stock", self.store.get_stock(sku)).await
    }

    async fn status(&self, sku: &Sku) -> Result<SaleStatus, StoreError> {
        self.timed("status", self.store.status(sku)).await
    }

    async fn list_skus(&self, limit: usize) -> Result<SkuList, StoreError> {
        self.timed("list_skus", self.store.list_skus(limit)).await
    }

    async fn reservations(
        &self,
        sku: &Sku,
        query: &ReservationQuery,
    ) -> Result<ReservationPage, StoreError> {
        self.timed("reservations", self.store.reservations(sku, query))
            .await
    }

    async fn resolve(
        &self,
        sku: &Sku,
        reservation: &ReservationId,
        to: Resolution,
        held_min_age: std::time::Duration,
    ) -> Result<ResolveOutcome, StoreError> {
        self.timed(
            "resolve",
            self.store.resolve(sku, reservation, to, held_min_age),
        )
        .await
    }

    async fn check_limits(&self, check: &LimitCheck) -> Result<LimitVerdict, StoreError> {
        self.timed("check_limits", self.store.check_limits(check))
            .await
    }

    async fn room(
        &self,
        rules: &super::RoomRules,
        call: &super::RoomCall,
    ) -> Result<super::RoomReply, StoreError> {
        self.timed("room", self.store.room(rules, call)).await
    }
}
