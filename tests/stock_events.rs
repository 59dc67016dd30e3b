//! The stock stream for shoppers (`sale.stock_events`): a page opens
//! `GET /api/flash/{sku}/events` and watches the sale as server-sent events, answered by
//! flashgate itself. The operator's story: shoppers watch, buyers buy it out, the operator adds
//! stock, closes and reopens, changes Redis by hand, shuts down — and every watcher sees it.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use support::shop::{
    StoreFixture, add_stock, admin, assert_rejected, bounded, fire, memory, redis, set_stock, shop,
    start_with_sale, tally,
};
use support::sse::{Item, Sse, StockEvent};
use support::{Backend, Flashgate, h2c_client, sku};
use tokio::sync::Semaphore;

/// The usual flash route, with its stock stream.
const STREAM_SALE: &str = "{ sku: { path_param: sku }, release_on: [connect_error, 503], \
                           stock_events: \"/api/flash/{sku}/events\" }";
/// Bound on waiting for one event that should come.
const WAIT: Duration = Duration::from_secs(10);
/// Shoppers watching in the big case.
const WATCHERS: usize = 1000;

fn events_path(sku: &str) -> String {
    format!("/api/flash/{sku}/events")
}

async fn start_streaming(backend: &Backend, store: &StoreFixture) -> Flashgate {
    start_with_sale(&backend.url(), store, STREAM_SALE).await
}

/// A shopper's stream of `sku`, checked to be open (200) and to start with `first`.
async fn watch(fg: &Flashgate, sku: &str, first: (u64, &str)) -> Sse {
    let mut sse = Sse::open(fg.addr, &events_path(sku), "HTTP/1.1")
        .await
        .unwrap_or_else(|e| panic!("open the stream: {e}"));
    assert_eq!(sse.status, 200);
    let e = sse.next_event(WAIT).await.expect("the first event");
    assert_eq!(event(&e), first, "the first event is the stock now: {e:?}");
    assert_eq!(e.sku, sku);
    sse
}

fn event(e: &StockEvent) -> (u64, &str) {
    (e.remaining, e.state.as_str())
}

/// Events until `want`, panicking (with what came) if it does not within [`WAIT`].
async fn until(sse: &mut Sse, want: (u64, &str)) -> Vec<StockEvent> {
    sse.events_until(WAIT, |e| event(e) == want)
        .await
        .unwrap_or_else(|(why, seen)| panic!("never saw {want:?} ({why}); saw {seen:?}"))
}

/// Remaining never rises and no event repeats the one before it.
fn assert_falls(events: &[StockEvent]) {
    for pair in events.windows(2) {
        assert!(
            pair[1].remaining <= pair[0].remaining,
            "remaining rose: {events:?}"
        );
        assert_ne!(pair[0], pair[1], "an event repeated: {events:?}");
    }
}

/// 1,000 shoppers watch one SKU with 20 units while 40 buyers buy it out: every watcher
/// sees `remaining` fall, never rise, to 0 with `state: sold_out`.
async fn a_thousand_watchers_see_the_sell_out(store: StoreFixture) {
    let backend = shop().await;
    let fg = start_streaming(&backend, &store).await;
    set_stock(&fg, "tee", 20).await;
    let calls_before = store
        .redis
        .as_ref()
        .map(|r| r.command_calls(&["cmdstat_hlen"]));
    let opened = Instant::now();

    let connecting = Arc::new(Semaphore::new(200));
    let fg_addr = fg.addr;
    let watchers: Vec<_> = (0..WATCHERS)
        .map(|_| {
            let connecting = connecting.clone();
            tokio::spawn(async move {
                let permit = connecting.acquire_owned().await.unwrap();
                let mut sse = Sse::open(fg_addr, &events_path("tee"), "HTTP/1.1")
                    .await
                    .unwrap_or_else(|e| panic!("open: {e}"));
                assert_eq!(sse.status, 200);
                let first = sse.next_event(WAIT).await.expect("the first event");
                drop(permit);
                (sse, first)
            })
        })
        .collect();
    let mut streams = Vec::with_capacity(WATCHERS);
    for w in watchers {
        let (sse, first) = w.await.expect("watcher task");
        assert_eq!(event(&first), (20, "open"));
        streams.push(sse);
    }
    let tee = sku("tee");
    assert_eq!(fg.app.stock_events.sources(), 1);
    assert_eq!(fg.app.stock_events.subscribers(&tee), WATCHERS);
    if let (Some(redis), Some(before)) = (&store.redis, calls_before) {
        // One source read the store for all of them: its first read, then one per second.
        let reads = redis.command_calls(&["cmdstat_hlen"]) - before;
        let allowed = 2 + opened.elapsed().as_secs();
        assert!(
            reads <= allowed,
            "{reads} store reads for {WATCHERS} watchers"
        );
    }

    let readers: Vec<_> = streams
        .into_iter()
        .map(|mut sse| tokio::spawn(async move { until(&mut sse, (0, "sold_out")).await }))
        .collect();
    let buyers = (0..40).map(|i| format!("buyer-{i}")).collect();
    let outcomes = fire(&[&fg], "tee", buyers).await;
    let t = tally(&outcomes);
    assert_eq!(t.get(&(200, String::new())), Some(&20), "{t:?}");
    assert_eq!(t.get(&(410, "sold_out".into())), Some(&20), "{t:?}");

    for r in readers {
        let mut events = vec![StockEvent {
            sku: "tee".into(),
            remaining: 20,
            state: "open".into(),
        }];
        events.extend(r.await.expect("reader task"));
        assert_falls(&events);
        assert_eq!(event(events.last().unwrap()), (0, "sold_out"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_watchers_see_the_sell_out_memory() {
    bounded(a_thousand_watchers_see_the_sell_out(memory())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_watchers_see_the_sell_out_redis() {
    bounded(a_thousand_watchers_see_the_sell_out(redis())).await;
}

/// The stream's head, its first event, a buy moving it, and the backend never asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_opens_with_the_stock_now() {
    bounded(async {
        let backend = shop().await;
        let fg = start_streaming(&backend, &memory()).await;
        set_stock(&fg, "cap", 5).await;
        let mut sse = watch(&fg, "cap", (5, "open")).await;
        assert_eq!(sse.header("content-type"), Some("text/event-stream"));
        assert_eq!(sse.header("cache-control"), Some("no-cache"));
        assert_eq!(sse.header("x-accel-buffering"), Some("no"));
        assert_eq!(sse.header("transfer-encoding"), Some("chunked"));

        let outcomes = fire(&[&fg], "cap", vec!["ann".into()]).await;
        assert_eq!(outcomes[0].status, 200);
        until(&mut sse, (4, "open")).await;
        // A trailing slash is the same path, canonical like any other.
        let mut slash = Sse::open(fg.addr, "/api/flash/cap/events/", "HTTP/1.1")
            .await
            .unwrap();
        assert_eq!(slash.status, 200);
        assert_eq!(event(&slash.next_event(WAIT).await.unwrap()), (4, "open"));
        let streamed = backend
            .seen()
            .into_iter()
            .filter(|s| s.uri.path().ends_with("/events"))
            .count();
        assert_eq!(streamed, 0, "a stream request reached the backend");
    })
    .await;
}

/// Sold out, then the operator adds stock: `open` with the new remaining; then closes the
/// sale (`closed`, stock untouched) and reopens it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_adds_stock_closes_and_reopens() {
    bounded(async {
        let backend = shop().await;
        let fg = start_streaming(&backend, &memory()).await;
        set_stock(&fg, "mug", 1).await;
        let mut sse = watch(&fg, "mug", (1, "open")).await;
        fire(&[&fg], "mug", vec!["ann".into()]).await;
        until(&mut sse, (0, "sold_out")).await;

        assert_eq!(add_stock(&fg, "mug", 5).await, 5);
        until(&mut sse, (5, "open")).await;

        let a = admin(&fg, "POST", "/v1/sales/mug/close", None).await;
        assert_eq!(a.status, 200, "{}", a.text());
        until(&mut sse, (5, "closed")).await;
        // Buyers get 410 `closed`; the stream says so already and stays put.
        let outcomes = fire(&[&fg], "mug", vec!["bob".into()]).await;
        assert_eq!(outcomes[0].error, "closed");

        let a = admin(&fg, "POST", "/v1/sales/mug/open", None).await;
        assert_eq!(a.status, 200, "{}", a.text());
        until(&mut sse, (5, "open")).await;
    })
    .await;
}

/// 100 stock changes in a burst reach a watcher as a few events (at most one per 100 ms), the
/// last of them the final stock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_changes_is_coalesced() {
    bounded(async {
        let backend = shop().await;
        let fg = start_streaming(&backend, &memory()).await;
        set_stock(&fg, "pin", 1000).await;
        let mut sse = watch(&fg, "pin", (1000, "open")).await;
        let started = Instant::now();
        for _ in 0..100 {
            add_stock(&fg, "pin", 1).await;
        }
        let burst = started.elapsed();
        let events = until(&mut sse, (1100, "open")).await;
        // One event at the start of the burst, then at most one per 100 ms.
        let allowed = 2 + (burst.as_millis() / 100) as usize;
        eprintln!(
            "a burst of 100 changes in {burst:?}: {} events",
            events.len()
        );
        assert!(
            events.len() <= allowed,
            "{} events for a burst of {burst:?}: {events:?}",
            events.len()
        );
        for pair in events.windows(2) {
            assert!(pair[1].remaining > pair[0].remaining, "{events:?}");
        }
        // Nothing more follows the final value.
        assert!(
            sse.next_event(Duration::from_millis(300)).await.is_err(),
            "an event after the final value"
        );
    })
    .await;
}

/// Only GET, only a valid SKU, only a configured one: every other request is refused with
/// JSON by flashgate, and none reaches the backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_is_not_a_subscription_is_refused() {
    bounded(async {
        let backend = shop().await;
        let fg = start_streaming(&backend, &memory()).await;
        set_stock(&fg, "tee", 3).await;
        let c = support::client();
        for method in ["POST", "PUT", "DELETE", "HEAD"] {
            let a = support::send(&c, method, &fg.url(&events_path("tee")), &[], "").await;
            assert_eq!(a.status, 405, "{method}");
            assert_eq!(a.headers.get("allow").unwrap(), "GET");
            if method != "HEAD" {
                assert_rejected(&a, 405, "method_not_allowed");
            }
        }
        let a = support::get(&fg.url("/api/flash/nothing-here/events")).await;
        assert_rejected(&a, 404, "not_configured");
        let a = support::get(&fg.url("/api/flash/a%20b/events")).await;
        assert_rejected(&a, 400, "bad_request");
        let a = support::get(&fg.url("/api/flash/a%7Bb/events")).await;
        assert_rejected(&a, 400, "bad_request");
        assert_eq!(backend.count(), 0, "{:?}", backend.seen());
        // The unconfigured SKU's source is gone with its one read.
        assert!(support::eventually(WAIT, || fg.app.stock_events.sources() == 0).await);
    })
    .await;
}

/// The source leaves the registry with its last watcher.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_source_goes_with_its_last_watcher() {
    bounded(async {
        let backend = shop().await;
        let fg = start_streaming(&backend, &memory()).await;
        set_stock(&fg, "tee", 3).await;
        let watchers = [
            watch(&fg, "tee", (3, "open")).await,
            watch(&fg, "tee", (3, "open")).await,
        ];
        assert_eq!(fg.app.stock_events.subscribers(&sku("tee")), 2);
        drop(watchers);
        assert!(support::eventually(WAIT, || fg.app.stock_events.sources() == 0).await);
        // A new watcher starts a new source.
        watch(&fg, "tee", (3, "open")).await;
    })
    .await;
}

/// On Redis, a change made behind flashgate's back is followed within the re-read interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_made_in_redis_is_followed() {
    bounded(async {
        let backend = shop().await;
        let store = redis();
        let fg = start_streaming(&backend, &store).await;
        set_stock(&fg, "tee", 10).await;
        let mut sse = watch(&fg, "tee", (10, "open")).await;
        let r = store.redis.as_ref().unwrap();
        let changed = Instant::now();
        r.cli(&["SET", "fg:{tee}:stock", "25"]);
        until(&mut sse, (25, "open")).await;
        r.cli(&["SET", "fg:{tee}:stock", "0"]);
        until(&mut sse, (0, "sold_out")).await;
        r.cli(&["HSET", "fg:{tee}:stats", "closed", "1"]);
        until(&mut sse, (0, "closed")).await;
        // Three re-reads (one a second), with room for a busy machine.
        assert!(
            changed.elapsed() < Duration::from_secs(8),
            "{:?}",
            changed.elapsed()
        );
    })
    .await;
}

/// Two instances share one Redis: a shopper watching through one sees buys made through the
/// other (by its store re-reads), falling to `sold_out`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buys_through_another_instance_are_followed() {
    bounded(async {
        let backend = shop().await;
        let store = redis();
        let watched = start_streaming(&backend, &store).await;
        let other = start_streaming(&backend, &store).await;
        set_stock(&other, "tee", 6).await;
        let mut sse = watch(&watched, "tee", (6, "open")).await;
        let buyers = (0..10).map(|i| format!("buyer-{i}")).collect();
        let outcomes = fire(&[&other], "tee", buyers).await;
        assert_eq!(tally(&outcomes).get(&(200, String::new())), Some(&6));
        let mut events = vec![StockEvent {
            sku: "tee".into(),
            remaining: 6,
            state: "open".into(),
        }];
        events.extend(until(&mut sse, (0, "sold_out")).await);
        assert_falls(&events);
        // Stock added through the other instance's admin API reopens it here too.
        add_stock(&other, "tee", 3).await;
        until(&mut sse, (3, "open")).await;
    })
    .await;
}

/// A shutdown ends every stream with the last chunk, without waiting out `drain_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_ends_the_streams() {
    bounded(async {
        let backend = shop().await;
        let yaml = support::shop::sale_config(
            &backend.url(),
            "server: { drain_timeout: 30s }\n",
            "5s",
            support::shop::BUY_PATH,
            STREAM_SALE,
        );
        let fg = Flashgate::start(&yaml).await;
        set_stock(&fg, "tee", 3).await;
        let mut streams = Vec::new();
        for _ in 0..10 {
            streams.push(watch(&fg, "tee", (3, "open")).await);
        }
        let started = Instant::now();
        tokio::time::timeout(Duration::from_secs(10), fg.stop())
            .await
            .expect("the drain waited for the streams")
            .unwrap();
        assert!(started.elapsed() < Duration::from_secs(10));
        for mut sse in streams {
            assert_eq!(sse.next(WAIT).await, Ok(Item::End));
        }
    })
    .await;
}

/// h2c and HTTP/1.0 watchers get the same events (streamed by hyper, not detached).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_and_http10_watchers() {
    bounded(async {
        let backend = shop().await;
        let fg = start_streaming(&backend, &memory()).await;
        set_stock(&fg, "tee", 3).await;

        let client = h2c_client();
        let req = http::Request::get(fg.url(&events_path("tee")))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = tokio::time::timeout(WAIT, client.request(req))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.version(), http::Version::HTTP_2);
        let mut body = resp.into_body();
        let mut h2_text = String::new();
        let mut next_frame = async || {
            let frame = tokio::time::timeout(WAIT, body.frame())
                .await
                .expect("an h2 frame in time")
                .expect("the h2 stream ended")
                .expect("h2 body error");
            String::from_utf8(frame.into_data().unwrap().to_vec()).unwrap()
        };
        h2_text.push_str(&next_frame().await);
        assert!(
            h2_text.contains(r#""remaining":3,"state":"open""#),
            "{h2_text}"
        );

        let mut old = Sse::open(fg.addr, &events_path("tee"), "HTTP/1.0")
            .await
            .unwrap();
        assert_eq!(old.status, 200);
        assert_eq!(old.header("transfer-encoding"), None);
        assert_eq!(event(&old.next_event(WAIT).await.unwrap()), (3, "open"));

        fire(&[&fg], "tee", vec!["ann".into()]).await;
        until(&mut old, (2, "open")).await;
        h2_text.push_str(&next_frame().await);
        assert!(
            h2_text.contains(r#""remaining":2,"state":"open""#),
            "{h2_text}"
        );
    })
    .await;
}

/// `sale.stock_events` is checked when the config is loaded, with file, line and key.
#[test]
fn config_errors() {
    let config = |stream: &str, extra_route: &str| {
        format!(
            "upstream: {{ url: \"http://127.0.0.1:3000\" }}\n\
             routes:\n\
             {extra_route}\
             \x20 - name: flash-buy\n\
             \x20   match: {{ method: POST, path: \"/api/flash/{{sku}}/buy\" }}\n\
             \x20   identity: {{ header: X-User-Id }}\n\
             \x20   sale: {{ sku: {{ path_param: sku }}, stock_events: \"{stream}\" }}\n\
             \x20 - name: rest\n\
             \x20   match: {{ path: \"/{{*rest}}\" }}\n"
        )
    };
    let refused = |text: String, says: &str| {
        let e = flashgate::config::parse(&text, "t.yaml").expect_err(says);
        let shown = e.to_string();
        assert!(shown.starts_with("t.yaml:"), "{shown}");
        assert!(e.line > 0, "{shown}");
        assert!(e.key.contains("sale.stock_events"), "{shown}");
        assert!(shown.contains(says), "{shown} does not say {says:?}");
    };
    // A catch-all route may share the stream's paths.
    let ok = flashgate::config::parse(&config("/api/flash/{sku}/events", ""), "t.yaml").unwrap();
    assert_eq!(
        ok.routes[0].sale.as_ref().unwrap().stock_events.as_deref(),
        Some("/api/flash/{sku}/events")
    );
    refused(config("/api/flash/events", ""), "has no `{sku}`");
    refused(config("api/{sku}/events", ""), "must start with `/`");
    refused(config("/api/{sku}/events/", ""), "trailing `/`");
    refused(config("/api/{shop}/{sku}", ""), "only parameter");
    refused(config("/api/{*sku}", ""), "catch-all");
    // Its own sale path, or any sale route's.
    refused(config("/api/flash/{sku}/buy", ""), "any sale route");
    refused(config("/api/flash/{sku}/{sku}", ""), "only parameter");
    // An ordinary route that is not a catch-all.
    let events_route = "  - name: events\n    match: { path: \"/api/flash/{id}/events\" }\n";
    refused(
        config("/api/flash/{sku}/events", events_route),
        "route \"events\"",
    );
    let exact_route =
        "  - name: tee\n    match: { method: GET, path: \"/api/flash/tee/events\" }\n";
    refused(
        config("/api/flash/{sku}/events", exact_route),
        "e.g. /api/flash/tee/events",
    );
    // The health path.
    refused(config("/{sku}", ""), "health path");
    // Two different stream templates that share a path.
    let second_sale = "  - name: other-buy\n\
                       \x20   match: { method: POST, path: \"/other/{sku}/buy\" }\n\
                       \x20   identity: { header: X-User-Id }\n\
                       \x20   sale: { sku: { path_param: sku }, stock_events: \"/events/{sku}\" }\n";
    refused(config("/events/x{sku}", second_sale), "which SKU");
    // The same template on two sale routes is one stream.
    let second_same = second_sale.replace("/events/{sku}", "/api/flash/{sku}/events");
    flashgate::config::parse(&config("/api/flash/{sku}/events", &second_same), "t.yaml").unwrap();
}
