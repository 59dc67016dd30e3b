//! A cancellation storm: no unit is lost when buyers go away.
//!
//! The story: a sale with a few dozen units and a few hundred buyers, each on its own raw TCP
//! connection, each cut at a random moment — half-way through its request head, right after
//! sending it (racing the reservation), a little later (while the reserve is with the store),
//! while the backend works on the order, or not at all. Once everything is quiet the books
//! must balance: no unit left `held`, `stock + sold + uncertain == initial`, and every order
//! the backend received recorded as `sold` — a client going away does not make flashgate
//! forget how the backend's exchange ended. Twenty repetitions per store, on a fast and on a
//! slow backend, on Redis and on the embedded store.
mod support;

use std::collections::HashSet;
use std::time::Duration;

use flashgate::store::SaleStatus;
use http::StatusCode;
use rand::{Rng, SeedableRng, rngs::StdRng};
use support::redis::RedisServer;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const REPS: u64 = 20;
const BUYERS: usize = 200;
const STOCK: u64 = 40;
/// How long the slow backend takes over an order.
const SLOW: Duration = Duration::from_millis(40);
/// Bound on one whole test.
const TEST_DEADLINE: Duration = Duration::from_secs(240);

/// A backend that takes orders; SKUs starting with `slow` take [`SLOW`] each.
async fn shop() -> Backend {
    Backend::start(|req| async move {
        let slow = req
            .headers()
            .get("x-flashgate-sku")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|sku| sku.starts_with("slow"));
        if slow {
            tokio::time::sleep(SLOW).await;
        }
        json_response(StatusCode::OK, r#"{"order":"accepted"}"#)
    })
    .await
}

fn sale_config(backend: &Backend, store_yaml: &str) -> String {
    format!(
        "upstream: {{ url: \"{}\", connect_timeout: 1s, request_timeout: 5s }}\n\
         {store_yaml}\
         routes:\n\
         \x20 - name: flash-buy\n\
         \x20   match: {{ method: POST, path: \"/api/flash/{{sku}}/buy\" }}\n\
         \x20   identity: {{ header: X-User-Id }}\n\
         \x20   sale: {{ sku: {{ path_param: sku }}, sold_out_recheck: 10ms }}\n",
        backend.url()
    )
}

/// One buyer: sends its order on a fresh connection and goes away at a moment `rng` picks.
async fn buyer(addr: std::net::SocketAddr, sku: String, user: String, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let Ok(mut conn) = TcpStream::connect(addr).await else {
        return;
    };
    let head = format!(
        "POST /api/flash/{sku}/buy HTTP/1.1\r\nhost: shop\r\nx-user-id: {user}\r\n\
         content-length: 0\r\nconnection: close\r\n\r\n"
    );
    let bytes = head.as_bytes();
    match rng.random_range(0..100u32) {
        // Before the reservation: the head is cut half-way.
        0..10 => {
            let _ = conn.write_all(&bytes[..bytes.len() / 2]).await;
        }
        // Racing the reservation: gone as soon as the order is sent.
        10..30 => {
            let _ = conn.write_all(bytes).await;
        }
        // While the reserve is with the store (a batch takes a scheduler turn and a round trip).
        30..55 => {
            let _ = conn.write_all(bytes).await;
            tokio::time::sleep(Duration::from_micros(rng.random_range(0..2_000))).await;
        }
        // While the backend works on the order.
        55..80 => {
            let _ = conn.write_all(bytes).await;
            let ms = rng.random_range(0..SLOW.as_millis() as u64 + 10);
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        // Stays for the answer.
        _ => {
            let _ = conn.write_all(bytes).await;
            let mut answer = Vec::new();
            let _ =
                tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut answer)).await;
        }
    }
    // Dropping the stream closes the connection (FIN; unread data turns it into a reset).
}

/// Polls the store until nothing is `held` (the books are quiet); panics after 15 s.
async fn quiet_status(fg: &Flashgate, sku: &str) -> SaleStatus {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let status = fg
            .app
            .store
            .status(&support::sku(sku))
            .await
            .expect("status");
        if status.units.held == 0 {
            return status;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "units still held 15 s after the storm: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs [`REPS`] storms (alternately on a fast and a slow backend) against one flashgate.
async fn storms(store_yaml: String, name: &str) {
    let backend = shop().await;
    let fg = Flashgate::start(&sale_config(&backend, &store_yaml)).await;
    let mut totals = (0u64, 0u64, 0u64);
    for rep in 0..REPS {
        let sku = format!(
            "{}-{name}-{rep}",
            if rep % 2 == 0 { "fast" } else { "slow" }
        );
        fg.app
            .store
            .set_stock(&support::sku(&sku), STOCK)
            .await
            .expect("set stock");
        let mut buyers = tokio::task::JoinSet::new();
        for n in 0..BUYERS {
            let seed = rep * 1_000_003 + n as u64;
            buyers.spawn(buyer(fg.addr, sku.clone(), format!("u{n}"), seed));
        }
        while let Some(done) = buyers.join_next().await {
            done.expect("a buyer task panicked");
        }

        let status = quiet_status(&fg, &sku).await;
        let units = &status.units;
        let stock = status.stock.unwrap_or(0);
        assert_eq!(
            stock + units.sold + units.uncertain,
            STOCK,
            "{sku}: the books do not balance: {status:?}"
        );
        // Every order the backend received carries a distinct reservation, and each was
        // recorded with its real outcome: the backend answered, so `sold`.
        let orders: Vec<String> = backend
            .seen()
            .iter()
            .filter(|s| s.headers.get("x-flashgate-sku").is_some_and(|v| v == &sku))
            .map(|s| {
                s.headers
                    .get("x-flashgate-reservation")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned()
            })
            .collect();
        let distinct: HashSet<&String> = orders.iter().collect();
        assert_eq!(
            distinct.len(),
            orders.len(),
            "{sku}: a reservation forwarded twice"
        );
        assert!(
            !distinct.contains(&String::new()),
            "{sku}: an order without reservation"
        );
        assert!(
            orders.len() as u64 <= STOCK,
            "{sku}: oversold: {}",
            orders.len()
        );
        assert_eq!(
            (units.sold, units.uncertain),
            (orders.len() as u64, 0),
            "{sku}: each order the backend took must be recorded sold: {status:?}"
        );
        totals.0 += units.sold;
        totals.1 += stock;
        totals.2 += status.reservations.released;
    }
    println!(
        "{name}: {REPS} storms of {BUYERS} buyers for {STOCK} units: {} sold, {} left in stock \
         (units of buyers who left before the backend saw their order: {} released)",
        totals.0, totals.1, totals.2
    );
    // The storms must have cut some orders and let others through, or they proved nothing.
    assert!(totals.0 > 0, "no order went through at all");
    fg.stop().await.expect("graceful stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancellation_storm_loses_no_unit_on_the_embedded_store() {
    tokio::time::timeout(TEST_DEADLINE, storms(String::new(), "memory"))
        .await
        .expect("test did not finish within its deadline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancellation_storm_loses_no_unit_on_redis() {
    let redis = RedisServer::start();
    let yaml = format!(
        "store: {{ redis: \"{}\", connect_timeout: 2s, response_timeout: 5s }}\n",
        redis.url()
    );
    tokio::time::timeout(TEST_DEADLINE, storms(yaml, "redis"))
        .await
        .expect("test did not finish within its deadline");
}
