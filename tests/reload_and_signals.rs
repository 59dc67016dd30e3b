//! Operating a running flashgate: hot reload (the library call, SIGHUP, and an editor-style
//! rename over the config file), and shutdown on SIGTERM while requests are in flight.
//!
//! `in_process` drives `flashgate::reload::reload` on an instance started by the harness, where
//! the limiter state and in-flight requests are easy to see. `binary` runs the real
//! `flashgate serve` as a child process on a free port, sends it real signals, and reads its
//! stderr.
mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::StatusCode;
use support::redis::RedisServer;
use support::shop::bounded;
use support::*;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::watch;

/// A backend whose every answer waits until `open` is sent `true`.
async fn gated_backend() -> (Backend, watch::Sender<bool>) {
    let (open, gate) = watch::channel(false);
    let backend = Backend::start(move |req| {
        let mut gate = gate.clone();
        async move {
            let _ = gate.wait_for(|open| *open).await;
            json_response(
                StatusCode::OK,
                &serde_json::json!({ "path": req.uri().path() }).to_string(),
            )
        }
    })
    .await;
    (backend, open)
}

/// Writes `text` to `path` the way editors save: a new file beside it, renamed over it.
fn save_by_rename(path: &Path, text: &str) {
    let tmp = path.with_file_name(format!(
        ".{}.swp",
        path.file_name().unwrap().to_string_lossy()
    ));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

mod in_process {
    use super::*;
    use flashgate::reload::reload;
    use std::sync::atomic::Ordering;

    /// A route `name` on `/{name}/…` with a route bucket of `burst` that refills one token a
    /// minute.
    fn bucket_route(name: &str, burst: u32) -> String {
        format!(
            "  - name: {name}\n\
             \x20   match: {{ path: \"/{name}/{{*rest}}\" }}\n\
             \x20   limits: {{ route: {{ per_minute: 1, burst: {burst} }} }}\n"
        )
    }

    /// `limited` has a route bucket of 3; `resized` a bucket of 1 (its limits change in v2); no
    /// `extra` route yet, and unmatched requests get 404.
    fn v1(backend: &Backend) -> String {
        let routes = [bucket_route("limited", 3), bucket_route("resized", 1)];
        config(
            backend,
            &format!("unmatched: not_found\nroutes:\n{}", routes.concat()),
        )
    }

    /// `limited` unchanged, `resized` with a bucket of 2, a new `extra` route, and unmatched
    /// requests proxied.
    fn v2(backend: &Backend) -> String {
        let routes = [
            bucket_route("limited", 3),
            bucket_route("resized", 2),
            bucket_route("extra", 1),
        ];
        config(
            backend,
            &format!("unmatched: proxy\nroutes:\n{}", routes.concat()),
        )
    }

    /// The names of the running routes, in order.
    fn route_names(fg: &Flashgate) -> Vec<String> {
        let snapshot = fg.app.snapshot();
        snapshot
            .routes
            .iter()
            .map(|r| r.route.name.clone())
            .collect()
    }

    /// Reloads `path`, which must be refused (`why`) and counted as the first failed reload;
    /// returns the error loading it gives.
    fn refused_reload(fg: &Flashgate, path: &Path, why: &str) -> String {
        assert!(!reload(&fg.app, path), "{why}");
        assert_eq!(fg.app.reload_failures.load(Ordering::Relaxed), 1);
        flashgate::config::load(path).unwrap_err().to_string()
    }

    async fn status_of(c: &HttpClient, fg: &Flashgate, path: &str) -> u16 {
        send(c, "GET", &fg.url(path), &[], "").await.status.as_u16()
    }

    /// A reload adds a route and switches `unmatched`; a route whose name and limits did not
    /// change keeps its exhausted bucket (no refill); a route whose limits changed starts
    /// afresh; an invalid file changes nothing and is counted.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reload_applies_a_new_config_and_keeps_unchanged_buckets() {
        bounded(async {
            let backend = Backend::start_echo().await;
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("flashgate.yaml");
            std::fs::write(&path, v1(&backend)).unwrap();
            let fg = Flashgate::start(&v1(&backend)).await;
            let c = client();

            for _ in 0..3 {
                assert_eq!(status_of(&c, &fg, "/limited/a").await, 200);
            }
            assert_eq!(status_of(&c, &fg, "/limited/a").await, 429);
            assert_eq!(status_of(&c, &fg, "/resized/a").await, 200);
            assert_eq!(status_of(&c, &fg, "/resized/a").await, 429);
            assert_eq!(status_of(&c, &fg, "/extra/a").await, 404);
            assert_eq!(status_of(&c, &fg, "/other").await, 404);
            let forwarded = backend.count();

            save_by_rename(&path, &v2(&backend));
            assert!(reload(&fg.app, &path), "v2 is valid");
            assert_eq!(fg.app.reloads.load(Ordering::Relaxed), 1);
            assert_eq!(route_names(&fg), ["limited", "resized", "extra"]);

            assert_eq!(
                status_of(&c, &fg, "/limited/a").await,
                429,
                "the unchanged route's bucket was refilled by the reload"
            );
            for _ in 0..2 {
                assert_eq!(status_of(&c, &fg, "/resized/a").await, 200);
            }
            assert_eq!(status_of(&c, &fg, "/resized/a").await, 429);
            assert_eq!(status_of(&c, &fg, "/extra/a").await, 200);
            assert_eq!(
                status_of(&c, &fg, "/extra/a").await,
                429,
                "the new route's own bucket"
            );
            assert_eq!(status_of(&c, &fg, "/other").await, 200, "unmatched: proxy");
            assert_eq!(backend.count(), forwarded + 4);

            // An invalid file keeps v2 running.
            save_by_rename(
                &path,
                &v2(&backend).replace("unmatched: proxy", "unmatched: maybe"),
            );
            let err = refused_reload(&fg, &path, "an invalid file is refused");
            assert!(
                err.starts_with(&format!("{}:2:", path.display())),
                "the error names file and line: {err}"
            );
            assert_eq!(status_of(&c, &fg, "/other").await, 200);
            assert_eq!(status_of(&c, &fg, "/limited/a").await, 429);
            assert_eq!(fg.app.snapshot().routes.len(), 3);
        })
        .await;
    }

    /// A reload that would list a catch-all above the sale route (so every buy would reach the
    /// backend unguarded) is refused like any invalid file: the running routes stay, and a buy
    /// is still answered by flashgate, not forwarded.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reload_refuses_a_route_that_would_shadow_the_sale_route() {
        bounded(async {
            let backend = Backend::start_echo().await;
            let sale = FLASH_BUY_ROUTE;
            let catch_all = "  - name: everything-else\n    match: { path: \"/{*rest}\" }\n";
            let fg = Flashgate::start(&config(&backend, &format!("routes:\n{sale}{catch_all}"))).await;
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("flashgate.yaml");
            save_by_rename(&path, &config(&backend, &format!("routes:\n{catch_all}{sale}")));

            let err = refused_reload(&fg, &path, "a shadowed sale route is refused");
            assert!(
                err.contains("route \"everything-else\" (line 3) is listed before sale route \"flash-buy\" (line 5)"),
                "{err}"
            );
            assert_eq!(route_names(&fg), ["flash-buy", "everything-else"]);
            // No stock was set: flashgate answers `not_configured` itself.
            let a = send(
                &client(),
                "POST",
                &fg.url("/api/flash/sku-1/buy"),
                &[("x-user-id", "alice")],
                "",
            )
            .await;
            assert_eq!(a.status, 404, "{}", a.text());
            assert_eq!(a.json()["error"], "not_configured");
            assert_eq!(backend.count(), 0, "the buy reached the backend");
        })
        .await;
    }

    /// Requests in flight when the config is swapped finish on the snapshot they started with:
    /// an ordinary request and a won flash reservation, both waiting on a slow backend while
    /// the reload replaces every route and the upstream client, answer 200, and the unit is
    /// sold.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_in_flight_during_a_reload_complete() {
        bounded(async {
            let (backend, open) = gated_backend().await;
            let route = |name: &str, timeout: &str| {
                format!(
                    "upstream: {{ url: \"{}\", request_timeout: {timeout} }}\n\
                     routes:\n\
                     \x20 - name: {name}\n\
                     \x20   match: {{ method: POST, path: \"/api/flash/{{sku}}/buy\" }}\n\
                     \x20   identity: {{ header: X-User-Id }}\n\
                     \x20   limits: {{ in_flight: 10 }}\n\
                     \x20   sale: {{ sku: {{ path_param: sku }} }}\n",
                    backend.url()
                )
            };
            let fg = Flashgate::start(&route("flash-v1", "20s")).await;
            fg.app.store.set_stock(&sku("reload-1"), 5).await.unwrap();
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("flashgate.yaml");

            let c = client();
            let slow_plain = tokio::spawn({
                let (c, url) = (c.clone(), fg.url("/slow"));
                async move { send(&c, "GET", &url, &[], "").await }
            });
            let slow_buy = tokio::spawn({
                let (c, url) = (c.clone(), fg.url("/api/flash/reload-1/buy"));
                async move { send(&c, "POST", &url, &[("x-user-id", "alice")], "").await }
            });
            assert!(eventually(Duration::from_secs(5), || backend.count() == 2).await);
            let old = fg.app.snapshot();
            assert_eq!(old.routes[0].guards.in_flight(), 1);

            std::fs::write(&path, route("flash-v2", "19s")).unwrap();
            assert!(reload(&fg.app, &path));
            let new = fg.app.snapshot();
            assert_eq!(new.routes[0].route.name, "flash-v2");
            assert!(
                !Arc::ptr_eq(&old.upstream, &new.upstream),
                "a new upstream client"
            );

            open.send(true).unwrap();
            let (plain, buy) = (slow_plain.await.unwrap(), slow_buy.await.unwrap());
            assert_eq!(plain.status, 200, "{}", plain.text());
            assert_eq!(plain.json()["path"], "/slow");
            assert_eq!(buy.status, 200, "{}", buy.text());
            assert!(
                eventually(Duration::from_secs(5), || old.routes[0].guards.in_flight()
                    == 0)
                .await
            );
            let sold = async {
                loop {
                    let s = fg.app.store.status(&sku("reload-1")).await.unwrap();
                    if s.units.sold == 1 {
                        return s;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            };
            let s = tokio::time::timeout(Duration::from_secs(5), sold)
                .await
                .expect("the in-flight order was never settled");
            assert_eq!(s.stock, Some(4));
        })
        .await;
    }
}

/// The real binary, as a child process.
mod binary {
    use super::*;

    /// A running `flashgate serve`, killed on drop; its stderr collected as it comes.
    struct Proc {
        child: tokio::process::Child,
        addr: SocketAddr,
        stderr: Arc<Mutex<String>>,
    }

    impl Proc {
        /// Starts `flashgate --log-format json serve --config config --listen 127.0.0.1:0`,
        /// learns its port from the `listening` log line (a port picked by the test could be
        /// taken by another test's socket before the child binds it), and waits until
        /// `/healthz` answers.
        async fn start(config: &Path) -> Proc {
            let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_flashgate"))
                .args(["--log-format", "json", "serve", "--listen", "127.0.0.1:0"])
                .arg("--config")
                .arg(config)
                .env("RUST_LOG", "info")
                .env_remove("FLASHGATE_ADMIN_TOKEN")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .expect("spawn flashgate");
            let stderr = Arc::new(Mutex::new(String::new()));
            let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
            let sink = stderr.clone();
            tokio::spawn(async move {
                while let Ok(Some(line)) = lines.next_line().await {
                    let mut s = sink.lock().unwrap();
                    s.push_str(&line);
                    s.push('\n');
                }
            });
            let mut p = Proc {
                child,
                addr: SocketAddr::from(([127, 0, 0, 1], 0)),
                stderr,
            };
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                if p.addr.port() == 0 {
                    p.addr = p.listening_addr().unwrap_or(p.addr);
                } else if let Some(a) = p.try_get("/healthz").await
                    && a.status == 200
                {
                    return p;
                }
                if let Ok(Some(status)) = p.child.try_wait() {
                    panic!("flashgate exited at start ({status}):\n{}", p.stderr());
                }
                assert!(
                    Instant::now() < deadline,
                    "flashgate did not come up:\n{}",
                    p.stderr()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }

        /// The address in the JSON log line `{"fields":{"message":"listening","addr":…}}`.
        fn listening_addr(&self) -> Option<SocketAddr> {
            self.stderr().lines().find_map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).ok()?;
                let fields = &v["fields"];
                (fields["message"] == "listening").then(|| fields["addr"].as_str()?.parse().ok())?
            })
        }

        fn url(&self, path: &str) -> String {
            format!("http://{}{path}", self.addr)
        }

        fn stderr(&self) -> String {
            self.stderr.lock().unwrap().clone()
        }

        /// GET `path` on a fresh connection; `None` if the connection fails.
        async fn try_get(&self, path: &str) -> Option<Answer> {
            let req = http::Request::get(self.url(path))
                .body(http_body_util::Full::new(Bytes::new()))
                .unwrap();
            let resp = tokio::time::timeout(Duration::from_secs(5), client().request(req))
                .await
                .ok()?
                .ok()?;
            let (parts, body) = resp.into_parts();
            let body = http_body_util::BodyExt::collect(body)
                .await
                .ok()?
                .to_bytes();
            Some(Answer {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        }

        async fn status_of(&self, path: &str) -> u16 {
            self.try_get(path)
                .await
                .unwrap_or_else(|| panic!("GET {path} failed:\n{}", self.stderr()))
                .status
                .as_u16()
        }

        /// Polls until GET `path` answers `status`; panics with stderr after 10 s.
        async fn until_status(&self, path: &str, status: u16, why: &str) {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if self.status_of(path).await == status {
                    return;
                }
                assert!(
                    Instant::now() < deadline,
                    "{why}: GET {path} never answered {status}:\n{}",
                    self.stderr()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }

        /// Polls until stderr has a line containing every one of `needles`.
        async fn until_logged(&self, needles: &[&str]) -> String {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let found = self
                    .stderr()
                    .lines()
                    .find(|l| needles.iter().all(|n| l.contains(n)))
                    .map(str::to_owned);
                if let Some(line) = found {
                    return line;
                }
                assert!(
                    Instant::now() < deadline,
                    "no log line with {needles:?}:\n{}",
                    self.stderr()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }

        fn signal(&self, sig: &str) {
            let pid = self.child.id().expect("flashgate already exited");
            let status = std::process::Command::new("kill")
                .arg(format!("-{sig}"))
                .arg(pid.to_string())
                .status()
                .unwrap();
            assert!(status.success(), "kill -{sig} {pid}");
        }

        /// Waits for the process to exit; its exit code (None if killed by a signal).
        async fn exit_within(&mut self, within: Duration) -> Option<i32> {
            match tokio::time::timeout(within, self.child.wait()).await {
                Ok(status) => status.unwrap().code(),
                Err(_) => panic!(
                    "flashgate still running after {within:?}:\n{}",
                    self.stderr()
                ),
            }
        }

        /// Polls until new connections are refused (the listener is closed).
        async fn until_refused(&self) {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                match tokio::net::TcpStream::connect(self.addr).await {
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return,
                    _ => {}
                }
                assert!(
                    Instant::now() < deadline,
                    "still accepting connections:\n{}",
                    self.stderr()
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }

    fn yaml(backend: &Backend, unmatched: &str, extra_route: bool) -> String {
        let mut y = format!(
            "upstream: {{ url: \"{}\", request_timeout: 5s }}\nunmatched: {unmatched}\nroutes:\n",
            backend.url()
        );
        if extra_route {
            y.push_str("  - name: added\n    match: { path: \"/added/{*rest}\" }\n");
        }
        y.push_str("  - name: api\n    match: { path: \"/api/{*rest}\" }\n");
        y
    }

    /// SIGHUP reloads the file; so does a new file renamed over it (as editors save); an
    /// invalid file is refused with its `file:line` on stderr and the running config stays.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sighup_and_file_changes_reload_the_running_binary() {
        bounded(async {
            let backend = Backend::start_echo().await;
            // The config path is a symlink in `watched/` to a file in `elsewhere/`: editing
            // the target makes no event in the watched dir, so only SIGHUP can apply it.
            let watched = tempfile::tempdir().unwrap();
            let elsewhere = tempfile::tempdir().unwrap();
            let target = elsewhere.path().join("live.yaml");
            let path: PathBuf = watched.path().join("flashgate.yaml");
            std::fs::write(&target, yaml(&backend, "not_found", false)).unwrap();
            std::os::unix::fs::symlink(&target, &path).unwrap();
            let fg = Proc::start(&path).await;
            assert_eq!(fg.status_of("/other").await, 404);
            assert_eq!(fg.status_of("/api/x").await, 200);

            // 1. SIGHUP.
            std::fs::write(&target, yaml(&backend, "proxy", false)).unwrap();
            assert_eq!(
                fg.status_of("/other").await,
                404,
                "no reload without a signal"
            );
            fg.signal("HUP");
            fg.until_status("/other", 200, "after SIGHUP").await;
            fg.until_logged(&["SIGHUP"]).await;
            fg.until_logged(&["config reloaded"]).await;

            // 2. An editor saves a new version: written beside, renamed over the symlink.
            save_by_rename(&path, &yaml(&backend, "not_found", true));
            fg.until_status("/other", 404, "after a rename over the file")
                .await;
            assert_eq!(fg.status_of("/added/1").await, 200);

            // 3. An invalid version: refused with file:line, the running config stays.
            let bad = yaml(&backend, "proxy", true).replace("unmatched: proxy", "unmatched: 42x");
            save_by_rename(&path, &bad);
            let line = fg
                .until_logged(&["config reload failed", &format!("{}:2:", path.display())])
                .await;
            assert!(line.contains("unmatched"), "{line}");
            assert_eq!(
                fg.status_of("/other").await,
                404,
                "the old config still runs"
            );
            assert_eq!(fg.status_of("/added/1").await, 200);
            // A broken SIGHUP reload is refused the same way.
            fg.signal("HUP");
            assert!(
                eventually(Duration::from_secs(10), || fg
                    .stderr()
                    .matches("config reload failed")
                    .count()
                    >= 2)
                .await,
                "{}",
                fg.stderr()
            );
            assert_eq!(fg.status_of("/other").await, 404);
        })
        .await;
    }

    /// SIGTERM while a won flash order and an ordinary request wait on a slow backend: the
    /// listener closes at once, both requests complete with 200, the order is recorded `sold`
    /// in Redis, and the process exits 0 well within `server.drain_timeout`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sigterm_drains_in_flight_requests_then_exits_0() {
        bounded(async {
            let redis = RedisServer::start();
            let (backend, open) = gated_backend().await;
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("flashgate.yaml");
            std::fs::write(
                &path,
                format!(
                    "upstream: {{ url: \"{}\", request_timeout: 20s }}\n\
                     store: {{ redis: \"{}\", response_timeout: 2s }}\n\
                     server: {{ drain_timeout: 10s }}\n\
                     routes:\n{FLASH_BUY_ROUTE}",
                    backend.url(),
                    redis.url()
                ),
            )
            .unwrap();
            redis.cli(&["SET", "fg:{term-1}:stock", "5"]);
            let mut fg = Proc::start(&path).await;

            let c = client();
            let buy = tokio::spawn({
                let (c, url) = (c.clone(), fg.url("/api/flash/term-1/buy"));
                async move { send(&c, "POST", &url, &[("x-user-id", "alice")], "").await }
            });
            let plain = tokio::spawn({
                let (c, url) = (c.clone(), fg.url("/slow"));
                async move { send(&c, "GET", &url, &[], "").await }
            });
            assert!(eventually(Duration::from_secs(5), || backend.count() == 2).await);

            let term = Instant::now();
            fg.signal("TERM");
            fg.until_refused().await;
            assert!(
                fg.child.try_wait().unwrap().is_none(),
                "exited before the drain:\n{}",
                fg.stderr()
            );
            open.send(true).unwrap();
            let (buy, plain) = (buy.await.unwrap(), plain.await.unwrap());
            assert_eq!(buy.status, 200, "{}", buy.text());
            assert_eq!(buy.json()["path"], "/api/flash/term-1/buy");
            assert_eq!(plain.status, 200, "{}", plain.text());
            let code = fg.exit_within(Duration::from_secs(10)).await;
            assert_eq!(code, Some(0), "{}", fg.stderr());
            assert!(term.elapsed() < Duration::from_secs(10));
            assert!(fg.stderr().contains("drained"), "{}", fg.stderr());

            // The order went through during the drain: it is on the books as sold.
            let seen = backend.seen();
            let id = seen
                .iter()
                .find_map(|s| s.headers.get("x-flashgate-reservation"))
                .expect("the order carried its reservation")
                .to_str()
                .unwrap()
                .to_owned();
            let rec = redis.hget("fg:{term-1}:res", &id);
            assert!(
                rec.as_deref().is_some_and(|r| r.starts_with("sold|")),
                "reservation of the order answered during the drain: {rec:?}\n{}",
                fg.stderr()
            );
            assert_eq!(redis.get("fg:{term-1}:stock").as_deref(), Some("4"));
        })
        .await;
    }

    /// A second SIGTERM during the drain exits at once (status 130), even with a request still
    /// stuck on the backend; that request's connection is closed, not left hanging.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn second_sigterm_exits_at_once() {
        bounded(async {
            let (backend, _never) = gated_backend().await;
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("flashgate.yaml");
            std::fs::write(
                &path,
                format!(
                    "upstream: {{ url: \"{}\", request_timeout: 60s }}\nserver: {{ drain_timeout: 60s }}\n",
                    backend.url()
                ),
            )
            .unwrap();
            let mut fg = Proc::start(&path).await;
            let mut stuck = tokio::net::TcpStream::connect(fg.addr).await.unwrap();
            stuck
                .write_all(b"GET /stuck HTTP/1.1\r\nhost: shop\r\n\r\n")
                .await
                .unwrap();
            assert!(eventually(Duration::from_secs(5), || backend.count() == 1).await);

            fg.signal("TERM");
            fg.until_refused().await;
            fg.until_logged(&["shutting down"]).await;
            assert!(fg.child.try_wait().unwrap().is_none(), "the drain waits for /stuck");
            let second = Instant::now();
            fg.signal("TERM");
            let code = fg.exit_within(Duration::from_secs(3)).await;
            assert_eq!(code, Some(130), "{}", fg.stderr());
            assert!(second.elapsed() < Duration::from_secs(3));
            let mut rest = Vec::new();
            let read = tokio::time::timeout(
                Duration::from_secs(2),
                tokio::io::AsyncReadExt::read_to_end(&mut stuck, &mut rest),
            )
            .await;
            assert!(read.is_ok(), "the stuck connection was left open");
        })
        .await;
    }
}
