//! Redis stalls (SIGSTOP: its sockets stay open, nothing answers) in the middle of a sale.
//!
//! A stalled store must cost a buyer at most `store.response_timeout`, never a hang; after
//! `store.breaker_failures` such failures the circuit breaker opens and buyers are answered at
//! once, without waiting on the store; once Redis is thawed the breaker half-opens after
//! `store.breaker_cooldown`, probes, closes, and the sale goes on by itself.
//!
//! This binary installs a global tracing subscriber that keeps flashgate's log lines in memory,
//! to check the breaker's state changes are logged. It holds one test only, so the lines it
//! reads are its own.
mod support;

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use support::redis::RedisServer;
use support::shop::shop;
use support::*;

/// `store.response_timeout` here.
const STORE_TIMEOUT: Duration = Duration::from_millis(1000);
/// A stalled call answers within this: the store timeout plus room for a loaded debug build.
const STALL_BOUND: Duration = Duration::from_millis(2500);
/// With the breaker open, answers come much faster than the store timeout (a fifth of it,
/// leaving room for a loaded debug build; they take about a millisecond).
const FAST: Duration = Duration::from_millis(200);

/// flashgate's log output, as text.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Logs {
    type Writer = Logs;
    fn make_writer(&'a self) -> Logs {
        self.clone()
    }
}

impl Logs {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// Lines containing `needle`.
    fn lines_with(&self, needle: &str) -> Vec<String> {
        self.text()
            .lines()
            .filter(|l| l.contains(needle))
            .map(str::to_owned)
            .collect()
    }
}

/// Installs the capturing subscriber once for this test binary.
fn logs() -> &'static Logs {
    static LOGS: OnceLock<Logs> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Logs::default();
        tracing_subscriber::fmt()
            .with_writer(logs.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .init();
        logs
    })
}

/// One buyer; returns the answer and how long it took.
async fn buy(c: &HttpClient, fg: &Flashgate, user: &str) -> (Answer, Duration) {
    let t = Instant::now();
    let a = send(
        c,
        "POST",
        &fg.url("/api/flash/stall-1/buy"),
        &[("x-user-id", user)],
        Bytes::new(),
    )
    .await;
    (a, t.elapsed())
}

fn assert_unavailable(a: &Answer, user: &str) {
    assert_eq!(a.status, 503, "{user}: {}", a.text());
    assert_eq!(a.json()["error"], "unavailable", "{user}");
    assert_eq!(a.headers["retry-after"], "1", "{user}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_redis_costs_at_most_the_timeout_then_the_breaker_fails_fast_and_heals() {
    let logs = logs();
    tokio::time::timeout(Duration::from_secs(60), async {
        let redis = RedisServer::start();
        let backend = shop().await;
        let fg = Flashgate::start(&format!(
            "upstream: {{ url: \"{}\", request_timeout: 5s }}\n\
             store: {{ redis: \"{}\", connections: 2, connect_timeout: 500ms, \
             response_timeout: {}ms, breaker_failures: 3, breaker_cooldown: 3s }}\n\
             routes:\n{FLASH_BUY_ROUTE}",
            backend.url(),
            redis.url(),
            STORE_TIMEOUT.as_millis()
        ))
        .await;
        fg.app.store.set_stock(&sku("stall-1"), 100).await.unwrap();
        let c = client();
        let (a, _) = buy(&c, &fg, "warm").await;
        assert_eq!(a.status, 200, "{}", a.text());

        // Redis freezes. The first `breaker_failures` buyers each wait out the store timeout
        // (or the connect timeout of a fresh connection), and no longer.
        redis.pause();
        let mut stalled = Vec::new();
        for i in 0..3 {
            let user = format!("stalled-{i}");
            let (a, took) = buy(&c, &fg, &user).await;
            assert_unavailable(&a, &user);
            assert!(took < STALL_BOUND, "{user} waited {took:?}");
            if i == 0 {
                // A serving thread that had no connection yet waits out the connect timeout
                // (500ms) instead of the response timeout: either way, it did wait.
                assert!(
                    took >= Duration::from_millis(450),
                    "the first call waited only {took:?}: was Redis stalled?"
                );
            }
            stalled.push(user);
        }

        // The breaker is open: for most of its cooldown every buyer is answered at once.
        assert!(
            eventually(Duration::from_secs(1), || !logs
                .lines_with("store circuit breaker opened")
                .is_empty())
            .await,
            "no log line for the breaker opening:\n{}",
            logs.text()
        );
        let open_since = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_millis(60));
        for i in 0..25 {
            tick.tick().await;
            let user = format!("fast-{i}");
            let (a, took) = buy(&c, &fg, &user).await;
            assert_unavailable(&a, &user);
            assert!(took < FAST, "{user} waited {took:?} with the breaker open");
            stalled.push(user);
        }
        assert!(open_since.elapsed() >= Duration::from_millis(1400));
        assert_eq!(
            backend.count(),
            1,
            "nothing forwarded while the store stalled"
        );

        // Redis thaws. After the cooldown one probe goes through, succeeds, and the breaker
        // closes: the sale goes on without a flashgate restart.
        redis.resume();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut tries = 0;
        loop {
            tries += 1;
            let user = format!("retry-{tries}");
            let (a, took) = buy(&c, &fg, &user).await;
            assert!(took < STALL_BOUND, "{user} waited {took:?}");
            if a.status == 200 {
                break;
            }
            assert_unavailable(&a, &user);
            assert!(Instant::now() < deadline, "the breaker never closed");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for state in ["half_open", "store circuit breaker closed"] {
            assert!(
                !logs.lines_with(state).is_empty(),
                "no log line with {state:?}:\n{}",
                logs.text()
            );
        }

        // Every buyer turned away during the stall may buy now: none of their reservations
        // was left behind in Redis (a request queued in a frozen server's socket runs when it
        // thaws, after flashgate has already answered 503).
        for user in &stalled {
            let (a, _) = buy(&c, &fg, user).await;
            assert_eq!(
                a.status,
                200,
                "{user} was told 503 during the stall, then: {}",
                a.text()
            );
        }
        let status = fg.app.store.status(&sku("stall-1")).await.unwrap();
        let orders = backend.count() as u64;
        assert_eq!(orders, 1 + 1 + stalled.len() as u64, "{status:?}");
        assert!(
            eventually(Duration::from_secs(5), || {
                redis.hget("fg:{stall-1}:stats", "units:sold").as_deref()
                    == Some(orders.to_string().as_str())
            })
            .await,
            "{status:?}"
        );
        let status = fg.app.store.status(&sku("stall-1")).await.unwrap();
        assert_eq!(status.stock, Some(100 - orders), "{status:?}");
        assert_eq!(status.units.held, 0, "no orphaned unit: {status:?}");
    })
    .await
    .expect("test did not finish within its deadline");
}
