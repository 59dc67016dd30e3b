//! Global rate limits (`scope: global`), told as the operator's story: two flashgate instances
//! share one Redis, and a bucket with `scope: global` counts what reaches either of them, while
//! a local bucket still counts per instance. When Redis is gone, each global bucket fails
//! closed (503 `unavailable`) or open (admitted) as its `on_store_error` says. The embedded
//! store runs the same check in-process.
//!
//! Real `redis-server`, real sockets, no mocks; every loop is bounded in count and time.
mod support;

use std::time::{Duration, Instant};

use support::redis::RedisServer;
use support::shop::bounded;
use support::*;

/// One catch-all route `api` on `/api/{*rest}` with the user from `X-User-Id` and `limits`
/// (YAML lines under `limits:`), on `store` (a `store:` line, or empty for the embedded one).
fn api_config(backend: &Backend, store: &str, limits: &str) -> String {
    config(
        backend,
        &format!(
            "{store}routes:\n\
             \x20 - name: api\n\
             \x20   match: {{ path: \"/api/{{*rest}}\" }}\n\
             \x20   identity: {{ header: X-User-Id }}\n\
             \x20   limits:\n{limits}"
        ),
    )
}

/// A Redis store whose outage is noticed quickly (short timeouts, a short breaker cooldown).
fn redis_store(server: &RedisServer) -> String {
    format!(
        "store: {{ redis: \"{}\", connect_timeout: 200ms, response_timeout: 500ms, breaker_cooldown: 200ms }}\n",
        server.url()
    )
}

async fn as_user(c: &HttpClient, fg: &Flashgate, path: &str, user: &str) -> Answer {
    send(c, "GET", &fg.url(path), &[("x-user-id", user)], "").await
}

/// `flashgate_global_limits_total{route="api",scope,outcome}` on one instance.
fn global_count(fg: &Flashgate, scope: &str, outcome: &str) -> u64 {
    let text = fg.app.metrics.encode_text();
    let series = format!(
        "flashgate_global_limits_total{{route=\"api\",scope=\"{scope}\",outcome=\"{outcome}\"}} "
    );
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .map_or(0, |v| v.trim().parse().unwrap_or(0))
}

/// One user asking every 50 ms for `run`, alternating between `fgs`: when each admission
/// happened (since the first request). Bounded: at most `run / 50 ms + 10` requests.
async fn alternate(fgs: &[&Flashgate], user: &str, run: Duration) -> Vec<Duration> {
    let c = client();
    let started = Instant::now();
    let mut admitted = Vec::new();
    let most = run.as_millis() / 50 + 10;
    for i in 0..most {
        if started.elapsed() >= run {
            break;
        }
        let fg = fgs[i as usize % fgs.len()];
        let a = as_user(&c, fg, "/api/x", user).await;
        match a.status.as_u16() {
            200 => admitted.push(started.elapsed()),
            429 => assert_eq!(a.json()["error"], "rate_limited"),
            other => panic!("unexpected {other}: {}", a.text()),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    admitted
}

/// The acceptance test: two instances, `per_user` global at 1/s (burst 1) → a user
/// alternating between them gets 1 per second in total; another user is unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_user_global_limit_is_one_per_second_across_two_instances() {
    bounded(async {
        let server = RedisServer::start();
        let backend = Backend::start_echo().await;
        let limits = "      per_user: { per_second: 1, burst: 1, scope: global }\n";
        let cfg = api_config(&backend, &redis_store(&server), limits);
        let (a, b) = (Flashgate::start(&cfg).await, Flashgate::start(&cfg).await);

        let run = Duration::from_millis(3200);
        let both = [&a, &b];
        let (admitted, bob) = tokio::join!(alternate(&both, "alice", run), async {
            // Mid-run, bob has his own bucket: his first request passes, his second (on the
            // other instance, at once) is refused by the shared bucket.
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let c = client();
            (
                as_user(&c, &a, "/api/y", "bob").await.status,
                as_user(&c, &b, "/api/y", "bob").await,
            )
        });
        assert_eq!(bob.0, 200, "another user is unaffected");
        assert_eq!(bob.1.status, 429, "{}", bob.1.text());
        assert_eq!(bob.1.headers["ratelimit-policy"], "\"per_user\";q=1;w=1");

        // 1 per second in total: the burst at once, then one a second (at ~0, 1, 2, 3 s).
        assert!(
            (3..=4).contains(&admitted.len()),
            "alice admitted at {admitted:?} over {run:?}"
        );
        // Admissions are a second apart on the Redis clock; seen from here, a slow answer may
        // bring two closer, but never to the ~50 ms apart two instances' own buckets allow.
        for pair in admitted.windows(2) {
            assert!(
                pair[1] - pair[0] >= Duration::from_millis(500),
                "two admissions within a second: {admitted:?}"
            );
        }
        // The instances' own (local) buckets alone would have admitted about twice as many:
        // the shared bucket refused some of what they let through.
        let limited =
            global_count(&a, "per_user", "limited") + global_count(&b, "per_user", "limited");
        assert!(limited >= 2, "the global bucket refused {limited}");
        let allowed =
            global_count(&a, "per_user", "allowed") + global_count(&b, "per_user", "allowed");
        assert_eq!(
            allowed as usize,
            admitted.len() + 1,
            "alice's and bob's admissions"
        );
    })
    .await;
}

/// Local limits are unchanged: without `scope: global`, each instance counts only its own
/// traffic, so the same user alternating between two instances gets about twice the rate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_limits_still_count_per_instance() {
    bounded(async {
        let server = RedisServer::start();
        let backend = Backend::start_echo().await;
        let limits = "      per_user: { per_second: 1, burst: 1 }\n";
        let cfg = api_config(&backend, &redis_store(&server), limits);
        let (a, b) = (Flashgate::start(&cfg).await, Flashgate::start(&cfg).await);

        let run = Duration::from_millis(2200);
        let admitted = alternate(&[&a, &b], "alice", run).await;
        // Each instance: ~0, 1, 2 s → about 6 in all.
        assert!(admitted.len() >= 5, "admitted at {admitted:?}");
        assert_eq!(global_count(&a, "per_user", "allowed"), 0, "no store call");
        assert!(server.cli(&["KEYS", "fg:{limit:*"]) == ::redis::Value::Array(vec![]));
    })
    .await;
}

/// A global route bucket caps the route's total over both instances, and its 429 is a local
/// 429's twin (`Retry-After`, `RateLimit-Policy`, the JSON body).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_global_limit_is_shared_by_the_instances() {
    bounded(async {
        let server = RedisServer::start();
        let backend = Backend::start_echo().await;
        let limits = "      route: { per_minute: 60, burst: 3, scope: global }\n";
        let cfg = api_config(&backend, &redis_store(&server), limits);
        let (a, b) = (Flashgate::start(&cfg).await, Flashgate::start(&cfg).await);
        let c = client();

        let started = Instant::now();
        let mut admitted = 0;
        let mut refused = None;
        for i in 0..12 {
            let fg = if i % 2 == 0 { &a } else { &b };
            let answer = as_user(&c, fg, "/api/x", &format!("user-{i}")).await;
            match answer.status.as_u16() {
                200 => admitted += 1,
                429 => refused = Some(answer),
                other => panic!("unexpected {other}: {}", answer.text()),
            }
        }
        let elapsed = started.elapsed();
        // Each instance's local bucket alone would admit 3 (6 in all).
        let most = 3 + elapsed.as_secs() as usize;
        assert!(
            (3..=most).contains(&admitted),
            "{admitted} admitted in {elapsed:?}"
        );
        assert_eq!(backend.count(), admitted);
        let refused = refused.expect("a refusal");
        assert_eq!(refused.headers["content-type"], "application/json");
        assert_eq!(refused.headers["ratelimit-policy"], "\"route\";q=3;w=3");
        let secs: u64 = refused.headers["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(secs, 1, "a token a second");
        let body = refused.json();
        assert_eq!(body["error"], "rate_limited");
        assert_eq!(body["message"], "too many requests (route limit)");
        assert_eq!(body["retry_after"], secs);
        assert!(global_count(&a, "route", "limited") + global_count(&b, "route", "limited") >= 1);
    })
    .await;
}

/// Redis stopped: a global bucket with `on_store_error: closed` answers 503 `unavailable`
/// (the JSON every store outage gets), one with `open` (the default off sale routes) admits.
/// Redis back: both are limited by the store again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_errors_fail_closed_or_open_as_configured() {
    bounded(async {
        let mut server = RedisServer::start();
        let backend = Backend::start_echo().await;
        let cfg = config(
            &backend,
            &format!(
                "{}routes:\n\
                 \x20 - name: api\n\
                 \x20   match: {{ path: \"/api/{{*rest}}\" }}\n\
                 \x20   identity: {{ header: X-User-Id }}\n\
                 \x20   limits:\n\
                 \x20     per_user: {{ per_minute: 600, scope: global, on_store_error: closed }}\n\
                 \x20 - name: pages\n\
                 \x20   match: {{ path: \"/pages/{{*rest}}\" }}\n\
                 \x20   limits:\n\
                 \x20     route: {{ per_minute: 600, scope: global }}\n",
                redis_store(&server)
            ),
        );
        let fg = Flashgate::start(&cfg).await;
        let c = client();
        assert_eq!(as_user(&c, &fg, "/api/x", "alice").await.status, 200);
        assert_eq!(as_user(&c, &fg, "/pages/x", "alice").await.status, 200);

        server.kill();
        for i in 0..5 {
            let user = format!("user-{i}");
            let closed = as_user(&c, &fg, "/api/x", &user).await;
            assert_eq!(closed.status, 503, "{}", closed.text());
            assert_eq!(closed.headers["content-type"], "application/json");
            assert_eq!(closed.headers["retry-after"], "1");
            assert_eq!(closed.json()["error"], "unavailable");
            let open = as_user(&c, &fg, "/pages/x", &user).await;
            assert_eq!(open.status, 200, "{}", open.text());
        }
        assert_eq!(global_count(&fg, "per_user", "store_error_closed"), 5);
        let text = fg.app.metrics.encode_text();
        assert!(
            text.contains(
                "flashgate_global_limits_total{route=\"pages\",scope=\"route\",outcome=\"store_error_open\"} 5"
            ),
            "{text}"
        );

        server.restart();
        let c2 = c.clone();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let a = as_user(&c2, &fg, "/api/x", "after").await;
            if a.status == 200 {
                break;
            }
            assert!(Instant::now() < deadline, "still {} after Redis is back", a.status);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(server.cli(&["KEYS", "fg:{limit:api}:per_user:*"]) != ::redis::Value::Array(vec![]));
    })
    .await;
}

/// The embedded store: one process, so the global bucket is this process's GCRA. It limits
/// like the local bucket in front of it, and it is the store's: a reload that rebuilds the
/// route's local buckets (here, a changed `max_keys`) refills nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_store_keeps_global_buckets_in_process() {
    bounded(async {
        let backend = Backend::start_echo().await;
        let rate = |max_keys| {
            format!(
                "      per_user: {{ per_minute: 1, burst: 1, max_keys: {max_keys}, scope: global }}\n"
            )
        };
        let fg = Flashgate::start(&api_config(&backend, "", &rate(100))).await;
        let c = client();
        assert_eq!(as_user(&c, &fg, "/api/x", "alice").await.status, 200);
        assert_eq!(as_user(&c, &fg, "/api/x", "alice").await.status, 429);
        assert_eq!(as_user(&c, &fg, "/api/x", "bob").await.status, 200);
        assert_eq!(global_count(&fg, "per_user", "allowed"), 2);
        assert_eq!(
            global_count(&fg, "per_user", "limited"),
            0,
            "the local bucket in front refused alice's second request"
        );

        let reloaded =
            flashgate::config::parse(&api_config(&backend, "", &rate(200)), "test.yaml").unwrap();
        fg.app.reload(reloaded);
        let a = as_user(&c, &fg, "/api/x", "alice").await;
        assert_eq!(a.status, 429, "{}", a.text());
        assert_eq!(a.headers["ratelimit-policy"], "\"per_user\";q=1;w=60");
        assert_eq!(global_count(&fg, "per_user", "limited"), 1, "refused by the store");
        assert_eq!(backend.count(), 2);
    })
    .await;
}
