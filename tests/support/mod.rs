//! Real parts for integration tests: a flashgate instance, a recording HTTP backend, and a
//! plain HTTP client — all on real sockets bound to 127.0.0.1:0.
#![allow(dead_code)]

pub mod audit;
pub mod browser;
pub mod faulty;
pub mod raw;
pub mod redis;
pub mod redis_cluster;
pub mod room;
pub mod shop;
pub mod sse;
pub mod storm;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use flashgate::body::{self, Body};
use flashgate::state::App;
use flashgate::store::Sku;
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const ADMIN_TOKEN: &str = "test-admin-token";
/// The admin API's read-only token in tests.
pub const ADMIN_READ_TOKEN: &str = "test-admin-read-token";

/// A running flashgate, stopped (gracefully) on drop or by `stop()`.
pub struct Flashgate {
    pub addr: SocketAddr,
    /// The admin API (token [`ADMIN_TOKEN`]), when the config has an `admin` section.
    pub admin: Option<SocketAddr>,
    pub app: Arc<App>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl Flashgate {
    /// Starts flashgate on 127.0.0.1:0 with `yaml` (its `listen` is ignored), served on the
    /// test's runtime.
    pub async fn start(yaml: &str) -> Flashgate {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (app, admin) = Self::build(yaml).await;
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(flashgate::server::run(listener, app.clone(), async {
            let _ = rx.await;
        }));
        Flashgate {
            addr,
            admin,
            app,
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// Starts flashgate the way `flashgate serve` runs: `threads` single-threaded runtimes,
    /// each with its own listener and upstream pool ([`flashgate::server::run_per_core`]), on a
    /// free port of 127.0.0.1.
    pub async fn start_per_core(yaml: &str, threads: usize) -> Flashgate {
        let (app, admin) = Self::build(yaml).await;
        // The port is found free, then bound again by `run_per_core`: should another test take
        // it in between, that bind fails (the task ends) and a new port is tried.
        for _ in 0..5 {
            let addr = SocketAddr::from(([127, 0, 0, 1], refused_port()));
            let (tx, rx) = oneshot::channel::<()>();
            let task = tokio::spawn(flashgate::server::run_per_core(
                addr,
                threads,
                app.clone(),
                async {
                    let _ = rx.await;
                },
            ));
            let listening = eventually(Duration::from_secs(5), || {
                task.is_finished() || std::net::TcpStream::connect(addr).is_ok()
            })
            .await;
            if listening && !task.is_finished() {
                return Flashgate {
                    addr,
                    admin,
                    app,
                    stop: Some(tx),
                    task: Some(task),
                };
            }
        }
        panic!("flashgate could not listen on a free port");
    }

    /// The app for `yaml`, and the admin API's address when the config has an `admin` section.
    async fn build(yaml: &str) -> (Arc<App>, Option<SocketAddr>) {
        let cfg = flashgate::config::parse(yaml, "test.yaml").unwrap_or_else(|e| panic!("{e}"));
        let has_admin = cfg.admin.is_some();
        let app = App::build(cfg).await.expect("store setup");
        let admin = if has_admin {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let a = l.local_addr().unwrap();
            let tokens = flashgate::admin::auth::Tokens::new(
                ADMIN_TOKEN.to_owned(),
                Some(ADMIN_READ_TOKEN.to_owned()),
            );
            tokio::spawn(flashgate::admin::run(
                l,
                app.clone(),
                tokens,
                std::future::pending(),
            ));
            Some(a)
        } else {
            None
        };
        (app, admin)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn admin_url(&self) -> String {
        format!(
            "http://{}",
            self.admin.expect("config has no admin section")
        )
    }

    /// Signals shutdown and waits for the drain to finish.
    pub async fn stop(mut self) -> std::io::Result<()> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        match self.task.take() {
            Some(t) => t.await.unwrap(),
            None => Ok(()),
        }
    }
}

impl Drop for Flashgate {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// What the backend saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    pub headers: HeaderMap,
    pub peer: SocketAddr,
}

type Handler = Arc<
    dyn Fn(Request<Incoming>) -> Pin<Box<dyn Future<Output = Response<Body>> + Send>> + Send + Sync,
>;

/// A real HTTP/1.1 + h2c backend that records every request head it receives.
pub struct Backend {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    /// TCP connections accepted so far (keep-alive reuse shows as a small number).
    pub connections: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Backend {
    /// A backend that answers 200 with a small JSON echo of the request line.
    pub async fn start_echo() -> Backend {
        Backend::start(|req| async move {
            let line = format!("{} {}", req.method(), req.uri());
            let body_len = req
                .into_body()
                .collect()
                .await
                .map(|c| c.to_bytes().len())
                .unwrap_or(0);
            json_response(
                StatusCode::OK,
                &serde_json::json!({ "request": line, "body_bytes": body_len }).to_string(),
            )
        })
        .await
    }

    pub async fn start<F, Fut>(handler: F) -> Backend
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<Body>> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Backend::serve(listener, handler)
    }

    /// Serves on an already bound listener (to restart a backend on the same port).
    pub fn serve<F, Fut>(listener: TcpListener, handler: F) -> Backend
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<Body>> + Send + 'static,
    {
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let handler: Handler = Arc::new(move |req| Box::pin(handler(req)));
        let (seen2, conns2) = (seen.clone(), connections.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, peer)) = listener.accept().await else {
                    return;
                };
                conns2.fetch_add(1, Ordering::SeqCst);
                let handler = handler.clone();
                let seen = seen2.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        seen.lock().unwrap().push(Seen {
                            method: req.method().clone(),
                            uri: req.uri().clone(),
                            version: req.version(),
                            headers: req.headers().clone(),
                            peer,
                        });
                        let fut = handler(req);
                        async move { Ok::<_, Infallible>(fut.await) }
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Backend {
            addr,
            seen,
            connections,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub fn json_response(status: StatusCode, json: &str) -> Response<Body> {
    let mut r = Response::new(body::full(json.to_owned()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        "content-type",
        http::HeaderValue::from_static("application/json"),
    );
    r
}

/// The usual flash route as a `routes:` entry: `POST /api/flash/{sku}/buy`, the buyer from
/// `X-User-Id`, the SKU from the path, nothing else set.
pub const FLASH_BUY_ROUTE: &str = "  - name: flash-buy\n\
    \x20   match: { method: POST, path: \"/api/flash/{sku}/buy\" }\n\
    \x20   identity: { header: X-User-Id }\n\
    \x20   sale: { sku: { path_param: sku } }\n";

/// A minimal YAML config pointing at `backend`, with `routes` appended verbatim.
pub fn config(backend: &Backend, extra: &str) -> String {
    format!(
        "upstream: {{ url: \"{}\", connect_timeout: 500ms, request_timeout: 2s }}\n{extra}",
        backend.url()
    )
}

/// The tests' HTTP client: [`client`] or [`h2c_client`].
pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// A plain HTTP/1.1 client with a connection pool.
pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

/// A client speaking h2c with prior knowledge.
pub fn h2c_client() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build(HttpConnector::new())
}

/// A collected response.
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
}

/// Sends a request and collects the answer; headers as (name, value) pairs.
pub async fn send(
    client: &HttpClient,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Answer {
    let mut b = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let req = b.body(Full::new(body.into())).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .expect("request timed out")
        .expect("request failed");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body failed").to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

pub async fn get(url: &str) -> Answer {
    send(&client(), "GET", url, &[], Bytes::new()).await
}

/// A port nothing listens on (free, as far as anyone can tell): bind, note the port, drop the
/// listener.
pub fn refused_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Polls `cond` every 10 ms until it holds or `within` passes: a wait on a condition, not a
/// fixed sleep.
pub async fn eventually(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if cond() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A SKU for a test's store calls (the store takes only parsed SKUs).
pub fn sku(s: &str) -> Sku {
    Sku::parse(s).unwrap_or_else(|e| panic!("test SKU {s:?}: {e}"))
}

/// Runs the `flashgate` binary with `args` (no admin token in the environment); exit code,
/// stdout, stderr. Bounded: a CLI that hangs fails the test after 30 s.
pub async fn run_cli(args: &[&str]) -> (i32, String, String) {
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_flashgate"))
            .args(args)
            .env_remove("FLASHGATE_ADMIN_TOKEN")
            .env("RUST_LOG", "warn")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("flashgate CLI did not finish")
    .expect("run flashgate");
    (
        out.status.code().expect("exited, not killed"),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}
