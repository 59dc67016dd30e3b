//! The waiting room (`waiting_room` on a route), told as the visitor's story on real sockets:
//! a burst of distinct visitors meets a room of 5 sessions; 5 pass, the rest get positions
//! 1..45; as sessions end, queued visitors polling with their cookies are let in, in FIFO
//! order; a forged cookie goes to the back; an admitted visitor passes without a store call.
//! On Redis too: two instances show the same positions, the room survives a flashgate restart,
//! and when Redis is gone new visitors get 503 while active cookies still pass.
//!
//! Every story runs on the embedded store and on a private `redis-server`; every loop is
//! bounded in count and time. The orders: `queueing: random` lets everyone in once, not in
//! arrival order; a pre-queue holds everyone until the start and is shuffled once then.
mod support;

use std::time::{Duration, Instant};

use support::room::{Visit, Visitor, prequeue, room_config};
use support::shop::{StoreFixture, bounded};
use support::*;

/// Sessions of 2 s (a place polled less often than that would be dropped: on a loaded machine
/// a polling round of 45 visitors may take a second), a pace that never binds.
const FIVE: &str =
    "      total_active: 5\n      new_per_minute: 60000\n      session_duration: 2s\n";

/// The acceptance test: 50 distinct visitors at once; 5 pass, 45 get positions 1..45
/// (no duplicates); then, polling with their cookies, they are let in as sessions end, in
/// FIFO order, never more than 5 at once.
async fn a_burst_then_fifo_admission(store: StoreFixture) {
    let backend = Backend::start_echo().await;
    let fg = Flashgate::start(&room_config(&backend, &store.yaml, FIVE)).await;
    let c = client();
    let mut visitors = vec![Visitor::default(); 50];
    let answers = futures_util::future::join_all(visitors.iter_mut().map(|v| {
        let (c, fg) = (&c, &fg);
        async move { v.visit(c, fg).await }
    }))
    .await;
    let passed = answers.iter().filter(|a| **a == Visit::Passed).count();
    let mut positions: Vec<u64> = answers
        .iter()
        .filter_map(|a| match a {
            Visit::Queued(p) => Some(*p),
            Visit::Passed => None,
        })
        .collect();
    positions.sort_unstable();
    assert_eq!(passed, 5, "{answers:?}");
    assert_eq!(positions, (1..=45).collect::<Vec<u64>>());
    assert_eq!(backend.count(), 5);

    // The queue, by position; each polls in that order until let in.
    let mut queue: Vec<(u64, Visitor)> = answers
        .iter()
        .zip(&visitors)
        .filter_map(|(a, v)| match a {
            Visit::Queued(p) => Some((*p, v.clone())),
            Visit::Passed => None,
        })
        .collect();
    queue.sort_by_key(|(p, _)| *p);
    let mut admitted: Vec<u64> = Vec::new();
    let started = Instant::now();
    let rules = room_rules(&fg);
    while !queue.is_empty() && started.elapsed() < Duration::from_secs(40) {
        let mut still = Vec::new();
        for (p, mut v) in queue {
            match v.visit(&c, &fg).await {
                Visit::Passed => admitted.push(p),
                Visit::Queued(now_at) => {
                    assert!(now_at <= p, "{p} moved back to {now_at}");
                    still.push((p, v));
                }
            }
        }
        queue = still;
        let status = fg
            .app
            .store
            .room(&rules, &flashgate::store::RoomCall::Status)
            .await
            .unwrap();
        let flashgate::store::RoomReply::Status(s) = status else {
            panic!("{status:?}")
        };
        assert!(s.active <= 5, "{s:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // FIFO: a place is let in only when every place ahead of it has a free session too, so
    // the (i+1)-th visitor let in had at most 4 (total_active - 1) places ahead of it still
    // queued: position <= i + 5. Among the places the free sessions cover, whoever asks first
    // goes first (here, sessions ending in the middle of a polling round). Everyone, once.
    for (i, p) in admitted.iter().enumerate() {
        assert!(
            *p <= i as u64 + 5,
            "position {p} let in {i}th: {admitted:?}"
        );
    }
    let mut sorted = admitted.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (1..=45).collect::<Vec<u64>>(), "{admitted:?}");
    assert_eq!(backend.count(), 50);
}

/// A forged or tampered cookie starts at the back; a queued cookie used once its place was
/// let in starts at the back too (a place admits once); an active cookie passes with no store
/// call.
async fn forged_cookies_go_to_the_back(store: StoreFixture) {
    let backend = Backend::start_echo().await;
    let room = "      total_active: 1\n      new_per_minute: 60000\n      session_duration: 2s\n";
    let fg = Flashgate::start(&room_config(&backend, &store.yaml, room)).await;
    let c = client();
    let mut first = Visitor::default();
    assert_eq!(first.visit(&c, &fg).await, Visit::Passed);
    let mut queued: Vec<Visitor> = Vec::new();
    for i in 1..=3 {
        let mut v = Visitor::default();
        assert_eq!(v.visit(&c, &fg).await, Visit::Queued(i));
        queued.push(v);
    }
    let real = queued[0].cookie.clone().unwrap();
    // `fg_room=q.<id>.<entered_ms>.<mac>`: an earlier entry time, another id, a made-up MAC,
    // the kind changed to active: each verifies as nothing, so a new place at the back.
    let parts: Vec<&str> = real.split('.').collect();
    let with = |i: usize, to: &str| {
        let mut p = parts.clone();
        p[i] = to;
        p.join(".")
    };
    let forged = [
        with(2, "1000"),
        with(1, &"0".repeat(32)),
        with(3, &"ab".repeat(32)),
        with(0, "fg_room=a"),
        "fg_room=garbage".to_owned(),
    ];
    for (i, cookie) in forged.iter().enumerate() {
        let mut v = Visitor {
            cookie: Some(cookie.clone()),
        };
        let at = v.visit(&c, &fg).await;
        assert_eq!(at, Visit::Queued(4 + i as u64), "{cookie}");
        assert_ne!(v.cookie.as_deref(), Some(cookie.as_str()), "a new place");
    }
    // The real cookie still holds position 1.
    assert_eq!(queued[0].visit(&c, &fg).await, Visit::Queued(1));

    // An active visitor passes with no store call.
    let calls = || room_store_calls(&fg);
    let before = calls();
    for _ in 0..10 {
        assert_eq!(first.visit(&c, &fg).await, Visit::Passed);
    }
    assert_eq!(calls(), before, "no store call for an active visitor");

    // Once the first session ends, position 1 is let in; its queued cookie replayed (by
    // anyone) then starts at the back.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut copy = queued[0].clone();
    loop {
        assert!(Instant::now() < deadline, "never let in");
        for v in &mut queued[1..] {
            assert!(matches!(v.visit(&c, &fg).await, Visit::Queued(_)));
        }
        if queued[0].visit(&c, &fg).await == Visit::Passed {
            break;
        }
        copy = queued[0].clone();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let Visit::Queued(back) = copy.visit(&c, &fg).await else {
        panic!("a used place admitted twice");
    };
    // A new place (a new id in the cookie), behind the two still queued. (Whether the forged
    // ones are still there depends on how long they have been idle: not asserted.)
    let id = |v: &Visitor| {
        v.cookie
            .as_deref()
            .unwrap()
            .split('.')
            .nth(1)
            .unwrap()
            .to_owned()
    };
    assert_ne!(id(&copy), id(&queued[0]), "a new place");
    for v in &mut queued[1..] {
        let Visit::Queued(p) = v.visit(&c, &fg).await else {
            panic!("the room is full");
        };
        assert!(p < back, "{p} is behind the replayed place at {back}");
    }
}

/// The HTML page (default) and the JSON answer, with the configured statuses.
async fn page_and_json_answers(store: StoreFixture) {
    let backend = Backend::start_echo().await;
    let room = "      total_active: 1\n      new_per_minute: 60000\n      json_for: [application/json, application/vnd.shop+json]\n      json_status: 503\n";
    let fg = Flashgate::start(&room_config(&backend, &store.yaml, room)).await;
    let c = client();
    assert_eq!(
        Visitor::default().ask(&c, &fg, "text/html").await.status,
        200
    );
    let mut v = Visitor::default();
    let page = v.ask(&c, &fg, "text/html,application/xhtml+xml").await;
    assert_eq!(page.status, 200);
    assert_eq!(page.headers["content-type"], "text/html; charset=utf-8");
    assert_eq!(page.headers["cache-control"], "no-store");
    let html = page.text();
    assert!(html.contains("id=\"fg-position\">1<"), "{html}");
    assert!(html.contains("<script>") && !html.contains("{{"), "{html}");
    let j = v.ask(&c, &fg, "application/vnd.shop+json; q=0.9").await;
    assert_eq!(j.status, 503);
    let j = j.json();
    assert_eq!(j["state"], "queued");
    assert_eq!(j["position"], 1);
    assert!(j["estimated_wait_s"].as_u64().is_some() && j["retry_after_s"].as_u64().unwrap() >= 1);
    // Other routes are not in the room.
    assert_eq!(get(&fg.url("/other")).await.status, 200);
}

/// Polls every visitor of `queue` (index, visitor) in turn until all are let in (or
/// `within` passes): the indices in the order they were let in.
async fn admit_all(
    c: &HttpClient,
    fg: &Flashgate,
    mut queue: Vec<(usize, Visitor)>,
    within: Duration,
) -> Vec<usize> {
    let started = Instant::now();
    let mut admitted = Vec::new();
    while !queue.is_empty() && started.elapsed() < within {
        let mut still = Vec::new();
        for (i, mut v) in queue {
            match v.visit(c, fg).await {
                Visit::Passed => admitted.push(i),
                Visit::Queued(_) => still.push((i, v)),
            }
        }
        queue = still;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    admitted
}

/// `queueing: random`: of 40 queued behind 5 sessions, everyone is let in once, in an order
/// that is not their arrival order.
async fn random_order_is_shuffled_but_complete(store: StoreFixture) {
    let backend = Backend::start_echo().await;
    let room = "      total_active: 5\n      new_per_minute: 60000\n      session_duration: 2s\n      queueing: random\n";
    let fg = Flashgate::start(&room_config(&backend, &store.yaml, room)).await;
    let c = client();
    for _ in 0..5 {
        assert_eq!(Visitor::default().visit(&c, &fg).await, Visit::Passed);
    }
    let mut queue = Vec::new();
    for i in 0..40 {
        let mut v = Visitor::default();
        assert!(matches!(v.visit(&c, &fg).await, Visit::Queued(_)));
        queue.push((i, v));
    }
    let admitted = admit_all(&c, &fg, queue, Duration::from_secs(40)).await;
    let mut sorted = admitted.clone();
    sorted.sort_unstable();
    assert_eq!(
        sorted,
        (0..40).collect::<Vec<_>>(),
        "everyone, once: {admitted:?}"
    );
    // The chance that a random order of 40 is the arrival order (or has its first 5 right)
    // is below 1 in 78 million.
    assert_ne!(admitted[..5], [0, 1, 2, 3, 4], "{admitted:?}");
}

/// A pre-queue: before the start nobody is let in, though sessions are free; at the start
/// the queue is shuffled once; a visitor who arrives after the start queues behind them all.
async fn the_prequeue_is_shuffled_at_the_start(store: StoreFixture) {
    let backend = Backend::start_echo().await;
    // Sessions long enough that no place is dropped as abandoned on a loaded machine.
    let (window, opens) = prequeue(Duration::from_secs(3));
    let room = format!(
        "      total_active: 40\n      new_per_minute: 60000\n      session_duration: 20s\n{window}"
    );
    let fg = Flashgate::start(&room_config(&backend, &store.yaml, &room)).await;
    let c = client();
    let mut queue = Vec::new();
    for i in 0..30 {
        let mut v = Visitor::default();
        assert_eq!(v.visit(&c, &fg).await, Visit::Queued(i as u64 + 1));
        queue.push((i, v));
    }
    assert_eq!(
        backend.count(),
        0,
        "nobody in before the start, though 40 sessions are free"
    );
    assert!(
        Instant::now() < opens,
        "the arrivals took the whole pre-queue"
    );
    // Paused over the start, so the shuffled order shows in the positions (open, all 30
    // would be let in at their next request, in the order they ask).
    let rules = room_rules(&fg);
    let pause = flashgate::store::RoomCall::SetMode(flashgate::store::RoomMode::Paused);
    fg.app.store.room(&rules, &pause).await.unwrap();
    tokio::time::sleep_until((opens + Duration::from_millis(50)).into()).await;
    // After the start, a late arrival (the first to ask: its visit runs the shuffle) is
    // behind all 30.
    let mut late = Visitor::default();
    assert_eq!(late.visit(&c, &fg).await, Visit::Queued(31));
    let mut positions = Vec::new();
    for (_, v) in &mut queue {
        match v.visit(&c, &fg).await {
            Visit::Queued(p) => positions.push(p),
            Visit::Passed => panic!("let in while paused"),
        }
    }
    let mut sorted = positions.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (1..=30).collect::<Vec<u64>>(), "{positions:?}");
    // The chance that a shuffle of 30 keeps the arrival order is 1 in 30! (about 10^-32).
    assert_ne!(
        positions,
        (1..=30).collect::<Vec<u64>>(),
        "shuffled at the start"
    );
    let resume = flashgate::store::RoomCall::SetMode(flashgate::store::RoomMode::Open);
    fg.app.store.room(&rules, &resume).await.unwrap();
    queue.push((30, late));
    let admitted = admit_all(&c, &fg, queue, Duration::from_secs(30)).await;
    assert_eq!(
        admitted.len(),
        31,
        "everyone let in once resumed: {admitted:?}"
    );
    assert_eq!(backend.count(), 31);
}

on_each_store!(
    random_order_is_shuffled_but_complete,
    the_prequeue_is_shuffled_at_the_start,
    a_burst_then_fifo_admission,
    forged_cookies_go_to_the_back,
    page_and_json_answers,
);

/// Two instances on one Redis show the same positions; the room outlives a flashgate restart;
/// with Redis gone, new visitors get 503 `unavailable` and active cookies still pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_the_room_and_it_survives_a_restart() {
    bounded(async {
        let mut store = support::shop::redis();
        let backend = Backend::start_echo().await;
        let room =
            "      total_active: 2\n      new_per_minute: 60000\n      session_duration: 30s\n";
        let cfg = room_config(&backend, &store.yaml, room);
        let (a, b) = (Flashgate::start(&cfg).await, Flashgate::start(&cfg).await);
        let c = client();
        let mut active = Visitor::default();
        assert_eq!(active.visit(&c, &a).await, Visit::Passed);
        assert_eq!(Visitor::default().visit(&c, &b).await, Visit::Passed);
        // Ten visitors alternating between the instances: one queue, positions 1..10.
        let mut queued = Vec::new();
        for i in 0..10u64 {
            let mut v = Visitor::default();
            let fg = if i % 2 == 0 { &a } else { &b };
            assert_eq!(v.visit(&c, fg).await, Visit::Queued(i + 1));
            queued.push(v);
        }
        for (i, v) in queued.iter_mut().enumerate() {
            let want = Visit::Queued(i as u64 + 1);
            assert_eq!(v.visit(&c, &a).await, want);
            assert_eq!(v.visit(&c, &b).await, want);
        }
        // A restart of one instance: a new process (same config, same Redis) sees the same.
        a.stop().await.unwrap();
        let a = Flashgate::start(&cfg).await;
        for (i, v) in queued.iter_mut().enumerate() {
            assert_eq!(v.visit(&c, &a).await, Visit::Queued(i as u64 + 1));
        }
        assert_eq!(active.visit(&c, &a).await, Visit::Passed);
        // Redis gone: fail closed for the queue, the active cookie needs no store.
        store.redis.as_mut().unwrap().kill();
        let refused = queued[0].ask(&c, &b, "application/json").await;
        assert_eq!(refused.status, 503, "{}", refused.text());
        assert_eq!(refused.json()["error"], "unavailable");
        let fresh = Visitor::default().ask(&c, &a, "text/html").await;
        assert_eq!(fresh.status, 503);
        assert_eq!(active.visit(&c, &b).await, Visit::Passed);
    })
    .await;
}

/// The pace: `new_per_minute: 60` lets a sixth of a minute's worth (10) in at once, then one
/// a second, though 100 sessions are free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_per_minute_paces_admissions() {
    bounded(async {
        let backend = Backend::start_echo().await;
        let room = "      total_active: 100\n      new_per_minute: 60\n";
        let fg = Flashgate::start(&room_config(&backend, "", room)).await;
        let c = client();
        let mut answers = Vec::new();
        for _ in 0..15 {
            answers.push(Visitor::default().visit(&c, &fg).await);
        }
        let passed = answers.iter().filter(|a| **a == Visit::Passed).count();
        assert_eq!(passed, 10, "{answers:?}");
        assert_eq!(
            answers[10..],
            (1..=5).map(Visit::Queued).collect::<Vec<_>>()
        );
    })
    .await;
}

/// Every visitor without an active cookie costs the room one store call, so the route's per-IP
/// bucket runs first: a flood from one address is answered 429 `rate_limited` by flashgate
/// alone once its burst is spent, and the store sees only the burst.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_from_one_address_is_cut_before_the_store() {
    bounded(async {
        let backend = Backend::start_echo().await;
        let room = "      total_active: 1\n      new_per_minute: 60000\n      session_duration: 30s\n    limits:\n      per_ip: { per_minute: 1, burst: 3 }\n";
        let fg = Flashgate::start(&room_config(
            &backend,
            &support::shop::memory().yaml,
            room,
        ))
        .await;
        let c = client();
        let calls = || room_store_calls(&fg);
        let (mut passed, mut queued, mut limited) = (0, 0, 0);
        for _ in 0..20 {
            // A fresh visitor each time: no cookie, as a flood sends.
            let a = Visitor::default().ask(&c, &fg, "application/json").await;
            match (a.status.as_u16(), a.json()["state"].as_str()) {
                (200, _) => passed += 1,
                (429, Some("queued")) => queued += 1,
                (429, None) => {
                    assert_eq!(a.json()["error"], "rate_limited", "{}", a.text());
                    limited += 1;
                }
                (s, _) => panic!("unexpected {s}: {}", a.text()),
            }
        }
        assert_eq!((passed, queued, limited), (1, 2, 17));
        assert_eq!(calls(), 3, "only the burst reached the store");
    })
    .await;
}

/// The room's store calls so far (`flashgate_store_duration_seconds_count{op="room"}`).
fn room_store_calls(fg: &Flashgate) -> u64 {
    fg.app
        .metrics
        .encode_text()
        .lines()
        .find_map(|l| l.strip_prefix("flashgate_store_duration_seconds_count{op=\"room\"} "))
        .map_or(0, |v| v.trim().parse::<u64>().unwrap())
}

/// The rules of the room on `fg`'s first route, to ask its store directly.
fn room_rules(fg: &Flashgate) -> flashgate::store::RoomRules {
    fg.app.snapshot().routes[0]
        .room
        .as_ref()
        .expect("the first route has a room")
        .rules()
        .clone()
}
