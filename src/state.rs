//! Shared state. The request path reads one immutable [`Snapshot`] (config, routes with their
//! guards, upstream client); a reload builds a new snapshot and swaps it in atomically, so a
//! request never sees half of one config and half of another.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::Method;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::access_log::AccessLog;
use crate::config::{Config, IdentitySource, Quantity, Route, Source, TokenFrom};
use crate::fence::Fence;
use crate::forward::Upstream;
use crate::hygiene;
use crate::identity::Reader;
use crate::limit::RouteGuards;
use crate::limit::global::GlobalLimits;
use crate::metrics::{Metrics, RouteMetrics};
use crate::sale::SoldOut;
use crate::stock_events::StockEvents;
use crate::store::breaker::Breaker;
use crate::store::observed::Observed;
use crate::store::{MemoryStore, RedisConfig, RedisStore, Store};

/// How often keyed limiters forget keys whose bucket has refilled.
const EVICT_EVERY: Duration = Duration::from_secs(10);

pub struct App {
    snapshot: ArcSwap<Snapshot>,
    /// Where stock lives. Chosen at start; a reload cannot switch stores (it says so).
    pub store: Arc<dyn Store>,
    /// Lives across reloads: a SKU sold out before a reload is still sold out after it.
    pub sold_out: SoldOut,
    pub reloads: AtomicU64,
    pub reload_failures: AtomicU64,
    /// Store writes a request leaves behind off its response path (settle, release). A
    /// graceful shutdown waits for them after the drain, or an order answered during the
    /// drain would stay `held`.
    pub bookkeeping: TaskTracker,
    /// Signs forwarded winners (`signing` in the config); read once at start.
    pub signer: Option<crate::signing::Key>,
    pub metrics: Arc<Metrics>,
    /// The access log, when `access_log.enabled` (opened at start; a reload keeps it).
    pub access_log: Option<AccessLog>,
    /// Shoppers' stock streams: one source per watched SKU (lives across reloads).
    pub stock_events: StockEvents,
    /// Follows the other instances' stock changes through a shared store.
    pub fleet: crate::fleet::Fleet,
}

pub struct Snapshot {
    pub config: Arc<Config>,
    pub routes: Vec<RouteState>,
    /// Sale paths in every spelling a backend might fold onto them (see `fence.rs`).
    pub fence: Fence,
    /// Which headers clients may not send through (see `hygiene.rs`).
    pub hygiene: hygiene::Rules,
    pub upstream: Arc<Upstream>,
    /// Requests no route matched.
    pub unmatched: Arc<RouteMetrics>,
    /// The sale routes' `stock_events` paths, answered before routing.
    pub stock_streams: crate::stock_events::Paths,
}

pub struct RouteState {
    pub route: Route,
    pub guards: Arc<RouteGuards>,
    /// The route's `scope: global` buckets, asked of the store after `guards` admitted.
    pub global: Option<GlobalLimits>,
    pub metrics: Arc<RouteMetrics>,
    /// Reads the route's `identity` (a JWT route's keys and token cache live here).
    pub identity: Option<Arc<Reader>>,
    /// The route's waiting room (stateless here: the store keeps the queue).
    pub room: Option<Arc<crate::room::RoomGate>>,
}

/// A matched route and the path parameters it captured.
pub struct Matched<'s, 'p> {
    pub route: &'s RouteState,
    pub params: matchit::Params<'s, 'p>,
}

impl Snapshot {
    /// Compiles runtime state for `config`. Routes that keep their name and limits keep their
    /// guards (and so their buckets and in-flight count): a reload mid-sale refills nothing.
    /// Likewise a route whose identity is unchanged keeps its reader (a JWT route its keys,
    /// fetched or read, and its token cache); a changed `jwks_file` makes a new one.
    /// Needs a tokio runtime when a route fetches its JWT keys.
    pub fn build(config: Config, previous: Option<&Snapshot>, metrics: &Arc<Metrics>) -> Snapshot {
        let routes = config
            .routes
            .iter()
            .map(|route| {
                let same_name = || {
                    previous
                        .into_iter()
                        .flat_map(|p| p.routes.iter())
                        .filter(|r| r.route.name == route.name)
                };
                let kept = same_name().find(|r| r.guards.limits() == &route.limits);
                let identity = route.identity.as_ref().map(|id| {
                    same_name()
                        .find_map(|r| r.identity.as_ref().filter(|reader| reader.identity() == id))
                        .cloned()
                        .unwrap_or_else(|| Arc::new(Reader::new(id)))
                });
                RouteState {
                    metrics: metrics.route(&route.name, route.sale.is_some()),
                    // Stateless here (the store keeps the buckets): rebuilt on every reload.
                    global: GlobalLimits::new(&route.name, &route.limits, metrics),
                    route: route.clone(),
                    guards: kept.map_or_else(
                        || Arc::new(RouteGuards::new(&route.limits)),
                        |r| r.guards.clone(),
                    ),
                    identity,
                    room: route
                        .waiting_room
                        .as_ref()
                        .map(|r| Arc::new(crate::room::RoomGate::new(r, metrics))),
                }
            })
            .collect();
        let upstream = match previous {
            Some(p) if p.config.upstream == config.upstream => p.upstream.clone(),
            _ => Arc::new(Upstream::new(&config.upstream, metrics.clone())),
        };
        Snapshot {
            unmatched: metrics.unmatched().clone(),
            stock_streams: crate::stock_events::Paths::new(&config.routes),
            fence: Fence::new(&config.routes),
            hygiene: hygiene_rules(&config),
            config: Arc::new(config),
            routes,
            upstream,
        }
    }

    /// First route whose method and path template match.
    pub fn route_for<'s, 'p>(&'s self, method: &Method, path: &'p str) -> Option<Matched<'s, 'p>> {
        self.routes.iter().find_map(|r| {
            if !r.route.matches_method(method) {
                return None;
            }
            let m = r.route.path.router.at(path).ok()?;
            Some(Matched {
                route: r,
                params: m.params,
            })
        })
    }
}

/// The headers a config reads values from, and the method-override headers it lets pass.
fn hygiene_rules(config: &Config) -> hygiene::Rules {
    let mut value_headers = Vec::new();
    for route in &config.routes {
        match route.identity.as_ref().map(|i| &i.source) {
            Some(IdentitySource::Header(h)) => value_headers.push(h.clone()),
            // `Authorization` has no `_` twin to strip; a token header like `X-Token` has.
            Some(IdentitySource::Jwt(jwt)) => {
                if let TokenFrom::Header(h) = &jwt.from {
                    value_headers.push(h.clone());
                }
            }
            Some(IdentitySource::Cookie(_)) | None => {}
        }
        if let Some(sale) = &route.sale {
            if let Source::Header(h) = &sale.sku {
                value_headers.push(h.clone());
            }
            if let Quantity::From(Source::Header(h)) = &sale.quantity {
                value_headers.push(h.clone());
            }
        }
    }
    value_headers.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    value_headers.dedup();
    hygiene::Rules {
        value_headers,
        pass_method_override: config.pass_method_override.clone(),
    }
}

impl App {
    /// Builds the app: connects the store (Redis, or the embedded one when the config has no
    /// `store`) and starts housekeeping. Needs a tokio runtime. Redis being down is not an
    /// error here: flash routes answer 503 until it is back.
    pub async fn build(config: Config) -> Result<Arc<App>, String> {
        // The key first: a sale must not start unsigned when signing was asked for.
        let signer = match &config.signing {
            Some(s) => Some(crate::signing::Key::from_env(&s.key_id, &s.key_env)?),
            None => None,
        };
        let metrics = Metrics::new();
        let access_log = config
            .access_log
            .as_ref()
            .map(AccessLog::open)
            .transpose()?;
        let mut events = None;
        let store: Arc<dyn Store> = match &config.store {
            None => Arc::new(Observed::new(MemoryStore::new(), metrics.clone())),
            Some(s) => {
                let redis = RedisStore::connect(&RedisConfig {
                    target: s.redis.clone(),
                    connections: s.connections,
                    connect_timeout: s.connect_timeout,
                    response_timeout: s.response_timeout,
                    key_prefix: s.key_prefix.clone(),
                    tls: s.tls.clone(),
                    wait_replicas: s.wait_replicas.map(|(replicas, timeout)| {
                        crate::store::redis::Replication { replicas, timeout }
                    }),
                })
                .await
                .map_err(|e| format!("cannot set up the stock store: {e}"))?;
                events = Some(redis.events());
                let breaker = Breaker::new(redis, s.breaker_failures, s.breaker_cooldown)
                    .reporting_to(metrics.breaker_open.clone());
                Arc::new(Observed::new(breaker, metrics.clone()))
            }
        };
        info!(store = store.kind(), "stock store ready");
        let app = Arc::new(App {
            snapshot: ArcSwap::from_pointee(Snapshot::build(config, None, &metrics)),
            sold_out: SoldOut::default(),
            reloads: AtomicU64::new(0),
            reload_failures: AtomicU64::new(0),
            bookkeeping: TaskTracker::new(),
            signer,
            metrics,
            access_log,
            stock_events: StockEvents::new(store.clone()),
            store,
            fleet: crate::fleet::Fleet::default(),
        });
        if let Some(events) = events {
            app.fleet.follow(&app, events);
        }
        tokio::spawn(evict_idle_keys(Arc::downgrade(&app)));
        Ok(app)
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Swaps in a new config; in-flight requests finish on the snapshot they started with.
    pub fn reload(&self, config: Config) {
        let previous = self.snapshot.load_full();
        if previous.config.store != config.store {
            warn!(
                "the `store` section changed: a restart is needed to switch stores; keeping the current one"
            );
        }
        let next = Snapshot::build(config, Some(&previous), &self.metrics);
        info!(routes = next.routes.len(), file = %next.config.file, "config reloaded");
        self.snapshot.store(Arc::new(next));
        self.reloads.fetch_add(1, Ordering::Relaxed);
    }
}

async fn evict_idle_keys(app: Weak<App>) {
    let mut tick = tokio::time::interval(EVICT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(app) = app.upgrade() else { return };
        for r in &app.snapshot().routes {
            r.guards.evict_idle();
        }
    }
}
