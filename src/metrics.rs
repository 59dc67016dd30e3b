//! What an operator scrapes: Prometheus metrics for `GET /metrics` on the admin listener,
//! kept with the official `prometheus-client` crate.
//!
//! Every label value comes from the config (route names) or from a fixed set (statuses,
//! outcomes, kinds, ops) — never from raw input — except `sku`, which only SKUs that won or
//! were stocked reach, capped at [`MAX_SKUS`]. The hot path touches only pre-made handles:
//! each compiled route holds its [`RouteMetrics`] (counters per status made once, on first
//! use), so a request costs a few atomic adds and one histogram observation.

use std::collections::HashSet;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::ids::Sku;
use crate::reject::Reject;
use crate::store::{SaleStatus, Settlement, Store};

mod text;
mod totals;
use text::openmetrics_to_text;
pub use totals::Totals;

/// SKUs whose stock and units are exported; past it new SKUs are not added (documented).
pub const MAX_SKUS: usize = 1000;

/// How long a refresh waits for one SKU's status; a SKU that takes longer keeps its last values.
pub const SKU_STATUS_TIMEOUT: Duration = Duration::from_secs(1);

/// The route label of a request no route matched.
pub const UNMATCHED: &str = "(unmatched)";

/// Request and upstream latency buckets, in seconds: 0.5 ms to 10 s.
const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Store call buckets, in seconds: 100 µs to 1 s (a store call past its timeout has failed).
const STORE_BUCKETS: [f64; 11] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.25, 1.0,
];

/// How a sale route's request was decided (`flashgate_admissions_total{outcome}`).
pub const OUTCOMES: [&str; 12] = [
    "won",
    "sold_out",
    "already_purchased",
    "not_configured",
    "closed",
    "rate_limited",
    "overloaded",
    "unauthenticated",
    "bad_request",
    "unavailable",
    "not_started",
    "ended",
];

/// The admission outcome of a sale route's request that did not win.
pub fn outcome_of(reject: &Reject) -> &'static str {
    match reject.reason() {
        r @ ("sold_out" | "already_purchased" | "not_configured" | "closed" | "rate_limited"
        | "overloaded" | "unauthenticated" | "unavailable" | "not_started" | "ended") => r,
        // A malformed order in any other way: a method, size or spelling refused.
        _ => "bad_request",
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteStatus {
    route: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RoomLabel {
    room: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabel {
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteOutcome {
    route: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteScopeOutcome {
    route: String,
    scope: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Op {
    op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Kind {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SkuLabel {
    sku: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SkuState {
    sku: String,
    state: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}
fn store_latency() -> Histogram {
    Histogram::new(STORE_BUCKETS)
}

/// One instance's metrics (tests run several instances in one process: no globals).
pub struct Metrics {
    registry: Registry,
    requests: Family<RouteStatus, Counter>,
    request_duration: HistogramFamily<RouteLabel>,
    admissions: Family<RouteOutcome, Counter>,
    in_flight: Family<RouteLabel, Gauge>,
    global_limits: Family<RouteScopeOutcome, Counter>,
    reservations: Family<Outcome, Counter>,
    store_duration: HistogramFamily<Op>,
    store_errors: Family<Kind, Counter>,
    pub breaker_open: Gauge,
    upstream_duration: Histogram,
    upstream_errors: Family<Kind, Counter>,
    upstream_retries: Counter,
    pub connections: Gauge,
    heap_allocated: Gauge,
    heap_resident: Gauge,
    sku_stock: Family<SkuLabel, Gauge>,
    sku_units: Family<SkuState, Gauge>,
    room_queued: Family<RoomLabel, Gauge>,
    room_active: Family<RoomLabel, Gauge>,
    room_admitted: Family<RoomLabel, Counter>,
    skus: RwLock<HashSet<Sku>>,
    /// Every route name given a [`RouteMetrics`] (from the config, so bounded), with whether
    /// it is a sale route: what [`Metrics::totals`] sums over.
    routes: RwLock<Vec<(String, bool)>>,
    unmatched: OnceLock<Arc<RouteMetrics>>,
    /// One scrape at a time refreshes the SKU gauges.
    refreshing: tokio::sync::Mutex<()>,
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let mut registry = Registry::with_prefix("flashgate");
        let m = Metrics {
            requests: Family::default(),
            request_duration: Family::new_with_constructor(latency),
            admissions: Family::default(),
            in_flight: Family::default(),
            global_limits: Family::default(),
            reservations: Family::default(),
            store_duration: Family::new_with_constructor(store_latency),
            store_errors: Family::default(),
            breaker_open: Gauge::default(),
            upstream_duration: latency(),
            upstream_errors: Family::default(),
            upstream_retries: Counter::default(),
            connections: Gauge::default(),
            heap_allocated: Gauge::default(),
            heap_resident: Gauge::default(),
            sku_stock: Family::default(),
            sku_units: Family::default(),
            room_queued: Family::default(),
            room_active: Family::default(),
            room_admitted: Family::default(),
            skus: RwLock::new(HashSet::new()),
            routes: RwLock::new(Vec::new()),
            unmatched: OnceLock::new(),
            refreshing: tokio::sync::Mutex::new(()),
            registry: Registry::default(),
        };
        registry.register(
            "requests",
            "Requests answered, by route and status",
            m.requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time to the response head, by route",
            m.request_duration.clone(),
        );
        registry.register(
            "admissions",
            "Sale route decisions, by route and outcome",
            m.admissions.clone(),
        );
        registry.register(
            "in_flight",
            "Requests being decided or awaiting the backend's response head, by route",
            m.in_flight.clone(),
        );
        registry.register(
            "global_limits",
            "Global rate-limit checks (scope: global), by route, bucket and outcome",
            m.global_limits.clone(),
        );
        registry.register(
            "reservations",
            "Won units' recorded outcomes: sold, released, uncertain",
            m.reservations.clone(),
        );
        registry.register(
            "store_duration_seconds",
            "Stock store calls, by operation",
            m.store_duration.clone(),
        );
        registry.register(
            "store_errors",
            "Failed stock store calls, by kind",
            m.store_errors.clone(),
        );
        registry.register(
            "breaker_open",
            "1 while the store circuit breaker is open or probing",
            m.breaker_open.clone(),
        );
        registry.register(
            "upstream_duration_seconds",
            "Time to the backend's response head",
            m.upstream_duration.clone(),
        );
        registry.register(
            "upstream_errors",
            "Failed forwards to the backend, by kind",
            m.upstream_errors.clone(),
        );
        registry.register(
            "upstream_retries",
            "Pass-through requests sent to the backend again after it closed the connection \
             before answering (idempotent methods, no body)",
            m.upstream_retries.clone(),
        );
        registry.register(
            "connections",
            "Open client connections",
            m.connections.clone(),
        );
        registry.register(
            "heap_allocated_bytes",
            "Bytes allocated and not freed, as the allocator counts them (read at scrape time)",
            m.heap_allocated.clone(),
        );
        registry.register(
            "heap_resident_bytes",
            "Bytes of the allocator's pages resident in memory: allocated, kept for reuse, and its own metadata (read at scrape time; see `heap.rs`)",
            m.heap_resident.clone(),
        );
        registry.register(
            "sku_stock",
            "Units left, per SKU this instance has seen (at most 1000 SKUs)",
            m.sku_stock.clone(),
        );
        registry.register(
            "sku_units",
            "Units by reservation state, per SKU this instance has seen (at most 1000 SKUs)",
            m.sku_units.clone(),
        );
        registry.register(
            "room_queued",
            "Visitors queued in a waiting room, as the store last told this instance",
            m.room_queued.clone(),
        );
        registry.register(
            "room_active",
            "Active sessions of a waiting room, as the store last told this instance",
            m.room_active.clone(),
        );
        registry.register(
            "room_admitted",
            "Visitors this instance let in from a waiting room",
            m.room_admitted.clone(),
        );
        let m = Metrics { registry, ..m };
        Arc::new(m)
    }

    /// The allocator's figures (`heap::observe`, before a scrape).
    pub fn heap(&self, stats: crate::heap::HeapStats) {
        let gauge = |v: usize| i64::try_from(v).unwrap_or(i64::MAX);
        self.heap_allocated.set(gauge(stats.allocated));
        self.heap_resident.set(gauge(stats.resident));
    }

    /// The handles of route `name` (`sale`: it decides admissions).
    pub fn route(&self, name: &str, sale: bool) -> Arc<RouteMetrics> {
        self.note_route(name, sale);
        let label = RouteLabel {
            route: name.to_owned(),
        };
        let admissions = sale.then(|| {
            OUTCOMES.map(|outcome| {
                self.admissions
                    .get_or_create(&RouteOutcome {
                        route: name.to_owned(),
                        outcome,
                    })
                    .clone()
            })
        });
        Arc::new(RouteMetrics {
            name: name.to_owned(),
            statuses: (0..STATUSES).map(|_| OnceLock::new()).collect(),
            requests: self.requests.clone(),
            duration: self.request_duration.get_or_create(&label).clone(),
            in_flight: self.in_flight.get_or_create(&label).clone(),
            admissions,
        })
    }

    /// The queued and active gauges and the admitted counter of the room of route `name`.
    pub fn room(&self, name: &str) -> (Gauge, Gauge, Counter) {
        let label = RoomLabel {
            room: name.to_owned(),
        };
        (
            self.room_queued.get_or_create(&label).clone(),
            self.room_active.get_or_create(&label).clone(),
            self.room_admitted.get_or_create(&label).clone(),
        )
    }

    /// The handles for requests no route matched.
    pub fn unmatched(&self) -> &Arc<RouteMetrics> {
        self.unmatched.get_or_init(|| self.route(UNMATCHED, false))
    }

    /// The counter of a global bucket's `outcome` (`limit::global::OUTCOMES`) on route
    /// `route` (from the config), for `scope` (`route`, `per_ip`, `per_user`).
    pub fn global_limit(&self, route: &str, scope: &'static str, outcome: &'static str) -> Counter {
        self.global_limits
            .get_or_create(&RouteScopeOutcome {
                route: route.to_owned(),
                scope,
                outcome,
            })
            .clone()
    }

    pub fn reservation(&self, to: Settlement) {
        self.reservations
            .get_or_create(&Outcome {
                outcome: to.as_str(),
            })
            .inc();
    }

    pub fn reservation_released(&self) {
        self.reservations
            .get_or_create(&Outcome {
                outcome: "released",
            })
            .inc();
    }

    pub fn store_call(&self, op: &'static str, took: Duration, error: Option<&'static str>) {
        self.store_duration
            .get_or_create(&Op { op })
            .observe(took.as_secs_f64());
        if let Some(kind) = error {
            self.store_errors.get_or_create(&Kind { kind }).inc();
        }
    }

    pub fn upstream_call(&self, took: Duration, error: Option<&'static str>) {
        self.upstream_duration.observe(took.as_secs_f64());
        if let Some(kind) = error {
            self.upstream_errors.get_or_create(&Kind { kind }).inc();
        }
    }

    pub fn upstream_retried(&self) {
        self.upstream_retries.inc();
    }

    /// Notes a SKU to export (up to [`MAX_SKUS`]).
    pub fn saw_sku(&self, sku: &Sku) {
        let known = self.skus.read().unwrap_or_else(|p| p.into_inner());
        if known.contains(sku) || known.len() >= MAX_SKUS {
            return;
        }
        drop(known);
        let mut known = self.skus.write().unwrap_or_else(|p| p.into_inner());
        if known.len() < MAX_SKUS {
            known.insert(sku.clone());
        }
    }

    /// The SKUs to export.
    pub fn skus(&self) -> Vec<Sku> {
        let known = self.skus.read().unwrap_or_else(|p| p.into_inner());
        known.iter().cloned().collect()
    }

    /// Sets one SKU's gauges from its status in the store.
    pub fn set_sku(&self, sku: &Sku, status: &SaleStatus) {
        let gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.sku_stock
            .get_or_create(&SkuLabel {
                sku: sku.to_string(),
            })
            .set(status.stock.map_or(0, gauge));
        let u = &status.units;
        let by_state = [
            ("held", u.held),
            ("sold", u.sold),
            ("released", u.released),
            ("uncertain", u.uncertain),
        ];
        for (state, units) in by_state {
            self.sku_units
                .get_or_create(&SkuState {
                    sku: sku.to_string(),
                    state,
                })
                .set(gauge(units));
        }
    }

    /// Held while a scrape refreshes the SKU gauges from the store.
    pub async fn refreshing(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.refreshing.lock().await
    }

    /// Refreshes the SKU gauges from `store` (one at a time; each SKU's status all at once, at
    /// most [`SKU_STATUS_TIMEOUT`] each) and returns what was read: every exported SKU with its
    /// status, `None` for one whose read failed or took too long (its gauges keep their last
    /// values). Used by `GET /metrics` and the dashboard's event stream alike.
    pub async fn refresh_skus(&self, store: &dyn Store) -> Vec<(Sku, Option<SaleStatus>)> {
        let _one_at_a_time = self.refreshing().await;
        let skus = self.skus();
        let statuses = skus.into_iter().map(|sku| async move {
            let status = tokio::time::timeout(SKU_STATUS_TIMEOUT, store.status(&sku)).await;
            (sku, status.ok().and_then(Result::ok))
        });
        let read = futures_util::future::join_all(statuses).await;
        for (sku, status) in &read {
            if let Some(status) = status {
                self.set_sku(sku, status);
            }
        }
        read
    }

    /// The exposition in OpenMetrics text.
    pub fn encode_openmetrics(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// The exposition in Prometheus' classic text format (0.0.4), for scrapers that do not ask
    /// for OpenMetrics (`promtool check metrics`, `curl`).
    pub fn encode_text(&self) -> String {
        openmetrics_to_text(&self.encode_openmetrics())
    }
}

/// Statuses 100..=599 have a counter slot each.
const STATUSES: usize = 500;

/// One route's handles, made when the route is compiled.
pub struct RouteMetrics {
    name: String,
    statuses: Box<[OnceLock<Counter>]>,
    requests: Family<RouteStatus, Counter>,
    duration: Histogram,
    in_flight: Gauge,
    /// A sale route's counter per outcome, in [`OUTCOMES`] order.
    admissions: Option<[Counter; OUTCOMES.len()]>,
}

impl RouteMetrics {
    /// A request answered with `status` after `took`.
    pub fn answered(&self, status: u16, took: Duration) {
        self.duration.observe(took.as_secs_f64());
        let Some(slot) = self.statuses.get(usize::from(status).wrapping_sub(100)) else {
            return;
        };
        slot.get_or_init(|| {
            self.requests
                .get_or_create(&RouteStatus {
                    route: self.name.clone(),
                    status,
                })
                .clone()
        })
        .inc();
    }

    /// A sale route decided `outcome` (one of [`OUTCOMES`]).
    pub fn admission(&self, outcome: &str) {
        if let Some(counters) = &self.admissions
            && let Some(i) = OUTCOMES.iter().position(|o| *o == outcome)
        {
            counters[i].inc();
        }
    }

    /// Counts a request in flight until the guard drops.
    pub fn enter(&self) -> InFlight {
        self.in_flight.inc();
        InFlight(self.in_flight.clone())
    }
}

/// One request in flight on a route (see [`RouteMetrics::enter`]).
pub struct InFlight(Gauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_get_their_total_name_in_the_text_format() {
        let om = "# HELP a_requests Requests.\n# TYPE a_requests counter\n\
                  a_requests_total{route=\"x\"} 3\n# HELP a_up Up.\n# TYPE a_up gauge\n\
                  a_up 1\n# EOF\n";
        assert_eq!(
            openmetrics_to_text(om),
            "# HELP a_requests_total Requests.\n# TYPE a_requests_total counter\n\
             a_requests_total{route=\"x\"} 3\n# HELP a_up Up.\n# TYPE a_up gauge\na_up 1\n"
        );
    }

    #[test]
    fn a_sale_route_reports_every_outcome_and_status_slots_stay_in_range() {
        let m = Metrics::new();
        let route = m.route("buy", true);
        route.answered(200, Duration::from_millis(2));
        route.answered(599, Duration::from_millis(2));
        route.answered(99, Duration::from_millis(2));
        route.answered(600, Duration::from_millis(2));
        route.admission("won");
        let text = m.encode_text();
        for outcome in OUTCOMES {
            assert!(
                text.contains(&format!(
                    "flashgate_admissions_total{{route=\"buy\",outcome=\"{outcome}\"}}"
                )),
                "{outcome}: {text}"
            );
        }
        assert!(text.contains("flashgate_requests_total{route=\"buy\",status=\"599\"} 1"));
        assert!(!text.contains("status=\"600\""));
        assert!(text.contains("flashgate_request_duration_seconds_count{route=\"buy\"} 4"));
        // A non-sale route has no admissions.
        m.route("pages", false).answered(200, Duration::ZERO);
        assert!(!m.encode_text().contains("route=\"pages\",outcome"));
    }
}
