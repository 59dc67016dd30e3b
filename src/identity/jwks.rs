//! Keys fetched from a route's `jwks_url`, kept fresh by one background task per route.
//!
//! When the task fetches:
//! - at start (a request that arrives first waits for that fetch, bounded);
//! - every `refresh` (after a failed fetch, again after `min_refresh`);
//! - when a token names a `kid` the set does not hold (the issuer rotated its keys), but
//!   never sooner than `min_refresh` after the previous fetch began. Requests that arrive
//!   while a fetch runs wait for that same fetch; those that arrive within the floor are
//!   answered from the keys at hand. So a flood of made-up `kid`s costs the key server at most
//!   one request per `min_refresh`.
//!
//! A fetch is bounded in time ([`FETCH_TIMEOUT`], connect included) and size
//! ([`MAX_JWKS_BYTES`]), plain HTTP only, no redirects. A failed fetch keeps the keys already
//! held; until a first fetch succeeds the route answers `503 unavailable` (see
//! `Reject::KeysUnavailable`), never admitting anything unverified.
//!
//! The request path only reads an `ArcSwapOption` (no lock, no I/O) unless it has to wait for
//! a fetch. The task holds a `Weak` reference and ends when the route's keys are dropped (a
//! reload that removes or changes the route).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http::header::{ACCEPT, CONTENT_LENGTH};
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use jsonwebtoken::Algorithm;
use tokio::sync::{Notify, watch};
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{error, info, warn};

use super::keys::KeySet;

/// The most one fetch may take, connecting included.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(3);
/// The largest key set accepted (real ones are a few KiB).
pub const MAX_JWKS_BYTES: usize = 256 * 1024;

/// A key set and the generation it belongs to (the token cache keys its entries by it).
pub struct Loaded {
    pub set: Arc<KeySet>,
    pub generation: u64,
}

pub struct RemoteKeys {
    url: Uri,
    min_refresh: Duration,
    current: ArcSwapOption<Loaded>,
    generations: AtomicU64,
    fetch: Mutex<FetchState>,
    /// Counts finished fetches; a request waiting for a fetch watches it.
    done: watch::Sender<u64>,
    wake: Arc<Notify>,
    /// Ends the background task when these keys are dropped.
    _stop: DropGuard,
}

#[derive(Default)]
struct FetchState {
    in_flight: bool,
    last_start: Option<Instant>,
}

impl RemoteKeys {
    /// Starts fetching `url` in a background task on the current tokio runtime.
    pub fn start(
        url: Uri,
        algorithms: Vec<Algorithm>,
        refresh: Duration,
        min_refresh: Duration,
    ) -> Arc<RemoteKeys> {
        let stop = CancellationToken::new();
        let runtime = tokio::runtime::Handle::try_current();
        let keys = Arc::new(RemoteKeys {
            url,
            min_refresh,
            current: ArcSwapOption::empty(),
            generations: AtomicU64::new(0),
            // The first fetch starts at once: requests that come before it ends wait for it.
            fetch: Mutex::new(FetchState {
                in_flight: runtime.is_ok(),
                last_start: Some(Instant::now()),
            }),
            done: watch::Sender::new(0),
            wake: Arc::new(Notify::new()),
            _stop: stop.clone().drop_guard(),
        });
        match runtime {
            Ok(rt) => {
                rt.spawn(refresher(
                    Arc::downgrade(&keys),
                    keys.wake.clone(),
                    stop,
                    algorithms,
                    refresh,
                ));
            }
            Err(_) => {
                error!(url = %keys.url, "no runtime to fetch JWT keys on: the route answers 503")
            }
        }
        keys
    }

    /// The keys held now, if any fetch has succeeded yet.
    pub fn current(&self) -> Option<Arc<Loaded>> {
        self.current.load_full()
    }

    /// Asks for a fetch now and waits (bounded) for it to end; joins a fetch already running.
    /// Returns `false` at once when the floor (`min_refresh` since the last fetch began)
    /// refuses a new one.
    pub async fn refetch(&self) -> bool {
        let mut done = {
            let Ok(mut st) = self.fetch.lock() else {
                return false;
            };
            if !st.in_flight {
                if st
                    .last_start
                    .is_some_and(|t| t.elapsed() < self.min_refresh)
                {
                    return false;
                }
                st.in_flight = true;
                st.last_start = Some(Instant::now());
                self.wake.notify_one();
            }
            // Subscribed under the lock: the fetch cannot finish unseen.
            self.done.subscribe()
        };
        let wait = FETCH_TIMEOUT + Duration::from_millis(500);
        tokio::time::timeout(wait, done.changed()).await.is_ok()
    }

    /// Whether a request has claimed a fetch the task has not finished yet.
    fn claimed(&self) -> bool {
        self.fetch.lock().is_ok_and(|st| st.in_flight)
    }

    fn begin(&self) {
        if let Ok(mut st) = self.fetch.lock() {
            st.in_flight = true;
            st.last_start = Some(Instant::now());
        }
    }

    /// Records a fetch's result; returns whether it succeeded.
    fn finish(&self, result: Result<KeySet, String>) -> bool {
        let ok = match result {
            Ok(set) => {
                let same = self.current().is_some_and(|l| *l.set == set);
                if !same {
                    let generation = self.generations.fetch_add(1, Ordering::Relaxed) + 1;
                    info!(url = %self.url, keys = %set.summary(), generation, "JWT keys loaded");
                    self.current.store(Some(Arc::new(Loaded {
                        set: Arc::new(set),
                        generation,
                    })));
                }
                true
            }
            Err(e) => {
                let held = self.current().map_or(0, |l| l.set.len());
                warn!(url = %self.url, error = %e, keys_held = held, "JWT key fetch failed; keeping the keys held");
                false
            }
        };
        if let Ok(mut st) = self.fetch.lock() {
            st.in_flight = false;
        }
        self.done.send_modify(|n| *n += 1);
        ok
    }
}

async fn refresher(
    keys: Weak<RemoteKeys>,
    wake: Arc<Notify>,
    stop: CancellationToken,
    algorithms: Vec<Algorithm>,
    refresh: Duration,
) {
    let mut http = HttpConnector::new();
    http.set_connect_timeout(Some(FETCH_TIMEOUT));
    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build(http);
    let mut wait = Duration::ZERO;
    loop {
        let mut woken = false;
        if !wait.is_zero() {
            tokio::select! {
                () = stop.cancelled() => return,
                () = wake.notified() => woken = true,
                () = tokio::time::sleep(wait) => {}
            }
        }
        let Some(keys) = keys.upgrade() else { return };
        // A wake-up whose claim a timed fetch already served: no second fetch on its heels.
        if woken && !keys.claimed() {
            continue;
        }
        keys.begin();
        let result = fetch(&client, &keys.url, &algorithms).await;
        wait = if keys.finish(result) {
            refresh
        } else {
            keys.min_refresh
        };
    }
}

/// One bounded GET of the key set.
async fn fetch(
    client: &Client<HttpConnector, Empty<Bytes>>,
    url: &Uri,
    algorithms: &[Algorithm],
) -> Result<KeySet, String> {
    let req = Request::get(url.clone())
        .header(ACCEPT, "application/json")
        .body(Empty::new())
        .map_err(|e| e.to_string())?;
    let exchange = async {
        let resp = client.request(req).await.map_err(|e| e.to_string())?;
        if resp.status() != StatusCode::OK {
            return Err(format!("answered {}", resp.status()));
        }
        let declared = resp
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > MAX_JWKS_BYTES as u64) {
            return Err(format!("key set larger than {MAX_JWKS_BYTES} bytes"));
        }
        let body = Limited::new(resp.into_body(), MAX_JWKS_BYTES)
            .collect()
            .await
            .map_err(|e| format!("reading the key set: {e}"))?
            .to_bytes();
        KeySet::from_jwks(&body, algorithms)
    };
    tokio::time::timeout(FETCH_TIMEOUT, exchange)
        .await
        .map_err(|_| format!("no complete answer within {FETCH_TIMEOUT:?}"))?
}
