//! The flash-sale operator's kit for integration tests: which store flashgate runs on
//! (embedded or a private `redis-server`), a sale config with one flash route, shop backends
//! (taking every order, slowly, or refusing some), buyers (one, or many at once), and the admin
//! API calls an operator makes (set stock, read the sale status until settle has landed).

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use flashgate::body::Body;
use http::{Response, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use super::redis::RedisServer;
use super::{
    ADMIN_TOKEN, Answer, Backend, Flashgate, HttpClient, Seen, client, json_response, send,
};

/// Bound on one whole test.
pub const TEST_DEADLINE: Duration = Duration::from_secs(60);
/// Bound on waiting for bookkeeping that runs off the response path (settle).
pub const SETTLE_DEADLINE: Duration = Duration::from_secs(5);
/// Buyers in flight at once in the concurrent cases.
pub const CONCURRENCY: usize = 128;
/// The flash route of the default config.
pub const BUY_PATH: &str = "/api/flash/{sku}/buy";

/// Fails the test if `fut` takes longer than [`TEST_DEADLINE`].
pub async fn bounded(fut: impl Future<Output = ()>) {
    tokio::time::timeout(TEST_DEADLINE, fut)
        .await
        .expect("test did not finish within its deadline");
}

/// Every story named as two `#[tokio::test]`s, `memory_store::{story}` on the embedded store
/// and `redis_store::{story}` on a private `redis-server`, each bounded by [`TEST_DEADLINE`]. A
/// story is an `async fn(StoreFixture)` at the root of the test file, or in its module `cases`
/// when the list starts `cases:`.
#[macro_export]
macro_rules! on_each_store {
    ($module:ident: $($story:ident),+ $(,)?) => {
        $crate::on_each_store!(@store memory_store memory [super::$module::] $($story)+);
        $crate::on_each_store!(@store redis_store redis [super::$module::] $($story)+);
    };
    ($($story:ident),+ $(,)?) => {
        $crate::on_each_store!(@store memory_store memory [super::] $($story)+);
        $crate::on_each_store!(@store redis_store redis [super::] $($story)+);
    };
    (@store $store:ident $fixture:ident $from:tt $($story:ident)+) => {
        mod $store {
            $($crate::on_each_store!(@test $fixture $from $story);)+
        }
    };
    (@test $fixture:ident [$($from:tt)*] $story:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $story() {
            let store = $crate::support::shop::$fixture();
            $crate::support::shop::bounded($($from)*$story(store)).await;
        }
    };
}

// ---------------------------------------------------------------------------
// The store under test

/// Which store flashgate uses, as a YAML snippet, plus the Redis server behind it (kept
/// alive as long as the fixture).
pub struct StoreFixture {
    pub yaml: String,
    pub redis: Option<RedisServer>,
}

pub fn memory() -> StoreFixture {
    StoreFixture {
        yaml: String::new(),
        redis: None,
    }
}

pub fn redis() -> StoreFixture {
    let server = RedisServer::start();
    StoreFixture {
        yaml: redis_yaml(&server),
        redis: Some(server),
    }
}

/// A generous response timeout: under 2,000 concurrent buyers on a loaded debug build a 250ms
/// default could time out, and a timed-out reserve is (correctly) a 503, not what these cases
/// are about.
pub fn redis_yaml(server: &RedisServer) -> String {
    format!(
        "store: {{ redis: \"{}\", connect_timeout: 2s, response_timeout: 5s }}\n",
        server.url()
    )
}

// ---------------------------------------------------------------------------
// Config

/// A config with the admin API, one flash route `POST {path}` (identity `X-User-Id`, no rate
/// limits) with `sale` as a YAML flow mapping, then a catch-all ordinary route. `top_level` is
/// added at the top level: the store (a [`StoreFixture`]'s `yaml`), `server:` limits, or both.
/// (`\x20` keeps the YAML indentation that a `\` line continuation would swallow.)
pub fn sale_config(
    upstream: &str,
    top_level: &str,
    request_timeout: &str,
    path: &str,
    sale: &str,
) -> String {
    format!(
        "upstream: {{ url: \"{upstream}\", connect_timeout: 500ms, request_timeout: {request_timeout} }}\n\
         admin: {{ listen: \"127.0.0.1:0\" }}\n\
         {top_level}\
         routes:\n\
         \x20 - name: flash-buy\n\
         \x20   match: {{ method: POST, path: \"{path}\" }}\n\
         \x20   identity: {{ header: X-User-Id }}\n\
         \x20   sale: {sale}\n\
         \x20 - name: everything-else\n\
         \x20   match: {{ path: \"/{{*rest}}\" }}\n"
    )
}

/// The usual flash route: SKU from the path, one unit per user.
pub const PATH_SALE: &str = "{ sku: { path_param: sku }, release_on: [connect_error, 503] }";

/// flashgate on `store` with the usual flash route ([`PATH_SALE`] on [`BUY_PATH`]) in front of
/// `backend_url`, request timeout 5 s.
pub async fn start(backend_url: &str, store: &StoreFixture) -> Flashgate {
    start_with_timeout(backend_url, store, "5s").await
}

/// [`start`] with another upstream `request_timeout`.
pub async fn start_with_timeout(
    backend_url: &str,
    store: &StoreFixture,
    request_timeout: &str,
) -> Flashgate {
    start_sale(backend_url, store, request_timeout, PATH_SALE).await
}

/// [`start`] with other `sale` settings on the flash route (a YAML flow mapping).
pub async fn start_with_sale(backend_url: &str, store: &StoreFixture, sale: &str) -> Flashgate {
    start_sale(backend_url, store, "5s", sale).await
}

async fn start_sale(
    backend_url: &str,
    store: &StoreFixture,
    request_timeout: &str,
    sale: &str,
) -> Flashgate {
    Flashgate::start(&sale_config(
        backend_url,
        &store.yaml,
        request_timeout,
        BUY_PATH,
        sale,
    ))
    .await
}

// ---------------------------------------------------------------------------
// Backends

/// What a shop answers an order it takes (with 200).
pub const ACCEPTED: &str = r#"{"order":"accepted"}"#;

fn accepted() -> Response<Body> {
    json_response(StatusCode::OK, ACCEPTED)
}

/// A backend that takes every order: 200 with [`ACCEPTED`].
pub async fn shop() -> Backend {
    Backend::start(|_req| async { accepted() }).await
}

/// [`shop`] on an already bound listener (a backend that comes up where flashgate points).
pub fn shop_on(listener: TcpListener) -> Backend {
    Backend::serve(listener, |_req| async { accepted() })
}

/// A shop that takes every order after `delay`.
pub async fn slow_shop(delay: Duration) -> Backend {
    Backend::start(move |_req| async move {
        tokio::time::sleep(delay).await;
        accepted()
    })
    .await
}

/// A shop that answers the `n`th request it gets (from 0), for `path`, with
/// `refuse(n, path)` — a status and a JSON body — or, when that is `None`, takes the order.
pub async fn shop_refusing(
    refuse: impl Fn(usize, &str) -> Option<(StatusCode, &'static str)> + Send + Sync + 'static,
) -> Backend {
    let calls = AtomicUsize::new(0);
    Backend::start(move |req| {
        let n = calls.fetch_add(1, Ordering::SeqCst);
        let answer = refuse(n, req.uri().path()).map(|(status, body)| json_response(status, body));
        async move { answer.unwrap_or_else(accepted) }
    })
    .await
}

/// A backend that also keeps every request body it receives, in order.
pub async fn recording_shop() -> (Backend, Arc<Mutex<Vec<Bytes>>>) {
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let keep = bodies.clone();
    let backend = Backend::start(move |req| {
        let keep = keep.clone();
        async move {
            let body = req.into_body().collect().await.unwrap().to_bytes();
            keep.lock().unwrap().push(body);
            accepted()
        }
    })
    .await;
    (backend, bodies)
}

/// The flash requests a backend received for `sku` (by the path flashgate forwarded).
pub fn flash_seen(backend: &Backend, sku: &str) -> Vec<Seen> {
    let path = BUY_PATH.replace("{sku}", sku);
    backend
        .seen()
        .into_iter()
        .filter(|s| s.uri.path() == path)
        .collect()
}

/// The single value of header `name`; panics if it is missing or repeated.
pub fn one_header<'a>(seen: &'a Seen, name: &str) -> &'a str {
    let values: Vec<_> = seen.headers.get_all(name).iter().collect();
    assert_eq!(
        values.len(),
        1,
        "{name} on {} {}: {values:?}",
        seen.method,
        seen.uri
    );
    values[0].to_str().unwrap()
}

pub fn is_reservation_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

// ---------------------------------------------------------------------------
// Buyers

/// `user` buys `sku` on the flash route of the default config ([`BUY_PATH`]).
pub async fn buy(client: &HttpClient, fg: &Flashgate, sku: &str, user: &str) -> Answer {
    order(client, &fg.url(&BUY_PATH.replace("{sku}", sku)), user).await
}

/// `user` POSTs an order with no body to `url`.
pub async fn order(client: &HttpClient, url: &str, user: &str) -> Answer {
    send(client, "POST", url, &[("x-user-id", user)], Bytes::new()).await
}

/// What one buyer got back.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub user: String,
    pub status: StatusCode,
    /// The `error` field of a JSON answer from flashgate, `""` for a backend answer.
    pub error: String,
}

/// Runs `attempts` (user ids, in order) as separate tasks on the multi-thread runtime, at
/// most [`CONCURRENCY`] in flight, all buying `sku` through `fgs` round-robin.
pub async fn fire(fgs: &[&Flashgate], sku: &str, attempts: Vec<String>) -> Vec<Outcome> {
    let client = client();
    let gate = Arc::new(Semaphore::new(CONCURRENCY));
    let urls: Vec<String> = fgs
        .iter()
        .map(|fg| fg.url(&BUY_PATH.replace("{sku}", sku)))
        .collect();
    let tasks: Vec<_> = attempts
        .into_iter()
        .enumerate()
        .map(|(i, user)| {
            let (client, gate, url) = (client.clone(), gate.clone(), urls[i % urls.len()].clone());
            tokio::spawn(async move {
                let _permit = gate.acquire_owned().await.unwrap();
                let a = send(&client, "POST", &url, &[("x-user-id", &user)], Bytes::new()).await;
                let error = serde_json::from_slice::<Value>(&a.body)
                    .ok()
                    .and_then(|v| v["error"].as_str().map(str::to_owned))
                    .unwrap_or_default();
                Outcome {
                    user,
                    status: a.status,
                    error,
                }
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("buyer task panicked"));
    }
    out
}

/// How many outcomes had each (status, error) pair.
pub fn tally(outcomes: &[Outcome]) -> HashMap<(u16, String), usize> {
    let mut t = HashMap::new();
    for o in outcomes {
        *t.entry((o.status.as_u16(), o.error.clone())).or_insert(0) += 1;
    }
    t
}

// ---------------------------------------------------------------------------
// Admin API (over HTTP, with the bearer token)

/// The admin API of one flashgate, called with the full token. [`AdminApi::marked`] also
/// asserts that every answer says it comes from the admin API (`x-flashgate-admin: 1`): the
/// cases about the admin API itself (`tests/stock_ops.rs`) check that on every call. The free
/// functions below ([`admin`], [`set_stock`], …) are [`AdminApi::of`].
#[derive(Clone, Copy)]
pub struct AdminApi<'a> {
    fg: &'a Flashgate,
    check_marked: bool,
}

impl<'a> AdminApi<'a> {
    pub fn of(fg: &'a Flashgate) -> AdminApi<'a> {
        AdminApi {
            fg,
            check_marked: false,
        }
    }

    pub fn marked(fg: &'a Flashgate) -> AdminApi<'a> {
        AdminApi {
            fg,
            check_marked: true,
        }
    }

    /// One call with `headers` besides the token and the JSON content type, `body` as sent.
    pub async fn call_with(
        self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Answer {
        let auth = format!("Bearer {ADMIN_TOKEN}");
        let mut all = vec![
            ("authorization", auth.as_str()),
            ("content-type", "application/json"),
        ];
        all.extend_from_slice(headers);
        let url = format!("{}{path}", self.fg.admin_url());
        let a = send(&client(), method, &url, &all, body.to_owned()).await;
        if self.check_marked {
            assert_eq!(
                a.headers.get("x-flashgate-admin").map(|v| v.as_bytes()),
                Some(&b"1"[..]),
                "every admin answer says it is one: {method} {path} → {} {}",
                a.status,
                a.text()
            );
        }
        a
    }

    /// One call with `body` (if any) as JSON.
    pub async fn call(self, method: &str, path: &str, body: Option<Value>) -> Answer {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        self.call_with(method, path, &[], &body).await
    }

    /// `PUT /v1/stock/{sku}`; asserts 200.
    pub async fn put_stock(self, sku: &str, units: u64) -> Answer {
        let a = self
            .call(
                "PUT",
                &format!("/v1/stock/{sku}"),
                Some(json!({ "stock": units })),
            )
            .await;
        assert_eq!(a.status, 200, "{}", a.text());
        a
    }

    /// `GET /v1/sales/{sku}`; asserts 200.
    pub async fn sale_status(self, sku: &str) -> Value {
        let a = self.call("GET", &format!("/v1/sales/{sku}"), None).await;
        assert_eq!(a.status, 200, "{}", a.text());
        a.json()
    }

    /// Polls the sale status until `pred` holds (settle runs off the response path); panics
    /// with the last status after [`SETTLE_DEADLINE`].
    pub async fn status_until(self, sku: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + SETTLE_DEADLINE;
        loop {
            let s = self.sale_status(sku).await;
            if pred(&s) {
                return s;
            }
            assert!(Instant::now() < deadline, "sale status never settled: {s}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

pub async fn admin(fg: &Flashgate, method: &str, path: &str, body: Option<Value>) -> Answer {
    AdminApi::of(fg).call(method, path, body).await
}

/// Sets the stock; asserts 200 and the answer's echo of it.
pub async fn set_stock(fg: &Flashgate, sku: &str, units: u64) {
    let a = AdminApi::of(fg).put_stock(sku, units).await;
    assert_eq!(a.json(), json!({ "sku": sku, "stock": units }));
}

pub async fn add_stock(fg: &Flashgate, sku: &str, delta: i64) -> u64 {
    let a = admin(
        fg,
        "POST",
        &format!("/v1/stock/{sku}/add"),
        Some(json!({ "delta": delta })),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text());
    a.json()["stock"].as_u64().unwrap()
}

/// Units left according to `GET /v1/stock/{sku}`.
pub async fn stock(fg: &Flashgate, sku: &str) -> u64 {
    let a = admin(fg, "GET", &format!("/v1/stock/{sku}"), None).await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.json()["sku"], sku);
    a.json()["stock"].as_u64().unwrap()
}

pub async fn sale_status(fg: &Flashgate, sku: &str) -> Value {
    AdminApi::of(fg).sale_status(sku).await
}

/// [`AdminApi::status_until`].
pub async fn status_until(fg: &Flashgate, sku: &str, pred: impl Fn(&Value) -> bool) -> Value {
    AdminApi::of(fg).status_until(sku, pred).await
}

pub fn counts(held: u64, sold: u64, released: u64, uncertain: u64) -> Value {
    json!({ "held": held, "sold": sold, "released": released, "uncertain": uncertain })
}

/// flashgate answered `status` itself: a JSON answer with `error`.
pub fn assert_rejected(a: &Answer, status: u16, error: &str) {
    assert_error(a, status, error);
    assert_eq!(
        a.headers.get("content-type").map(|v| v.to_str().unwrap()),
        Some("application/json")
    );
}

/// `status`, and `error` in the JSON body (the content type unchecked).
pub fn assert_error(a: &Answer, status: u16, error: &str) {
    assert_eq!(a.status, status, "{}", a.text());
    assert_eq!(a.json()["error"], error, "{}", a.text());
}

pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}
