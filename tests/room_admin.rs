//! Operating a waiting room: `flashgate room status|pause|resume|drain` (the real binary,
//! through the admin API), the sliding session (an active visitor past half its session gets
//! a fresh cookie, once; none while draining), and the room's metrics. On both stores, and a
//! room on a Redis Cluster; every loop bounded in count and time.
mod support;

use std::time::{Duration, Instant};

use support::room::{Visit, Visitor, room_config};
use support::shop::StoreFixture;
use support::*;

async fn cli(fg: &Flashgate, args: &[&str]) -> (i32, String, String) {
    let admin = fg.admin_url();
    let mut all = args.to_vec();
    all.extend(["--admin", &admin, "--token", ADMIN_TOKEN]);
    run_cli(&all).await
}

async fn admin(c: &HttpClient, fg: &Flashgate, method: &str, path: &str, token: &str) -> Answer {
    let auth = format!("Bearer {token}");
    send(
        c,
        method,
        &format!("{}{path}", fg.admin_url()),
        &[("authorization", &auth)],
        "",
    )
    .await
}

/// Pause holds the queue though a session ended; resume lets it go on; the CLI prints the
/// counts; the read-only token cannot pause; the metrics count the room.
async fn pause_resume_and_status(store: StoreFixture) {
    let backend = Backend::start_echo().await;
    let room = "      total_active: 1\n      new_per_minute: 60000\n      session_duration: 1s\n";
    let fg = Flashgate::start(&room_config(&backend, &store.yaml, room)).await;
    let c = client();
    assert_eq!(Visitor::default().visit(&c, &fg).await, Visit::Passed);
    let mut waiting = Visitor::default();
    assert_eq!(waiting.visit(&c, &fg).await, Visit::Queued(1));

    let (code, out, err) = cli(&fg, &["room", "pause", "pages"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("room pages: paused"), "{out}");
    let refused = admin(&c, &fg, "POST", "/v1/rooms/pages/resume", ADMIN_READ_TOKEN).await;
    assert_eq!(refused.status, 403);
    let unknown = admin(&c, &fg, "GET", "/v1/rooms/nope", ADMIN_TOKEN).await;
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.json()["error"], "unknown_room");

    // The session ends after 1 s; paused, the queue does not move for 1.5 s of polling.
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        assert_eq!(waiting.visit(&c, &fg).await, Visit::Queued(1));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (code, out, err) = cli(&fg, &["room", "status", "pages"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("room pages: paused"), "{out}");
    assert!(out.contains("queued               1"), "{out}");
    assert!(out.contains("active               0 of 1"), "{out}");
    let (code, out, _) = cli(&fg, &["room", "status", "pages", "--json"]).await;
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        (v["queued"].as_u64(), v["admitted_total"].as_u64()),
        (Some(1), Some(1))
    );
    assert!(v["estimated_wait_s"].as_u64().unwrap() >= 1);

    let (code, out, err) = cli(&fg, &["room", "resume", "pages"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("room pages: open"), "{out}");
    assert_eq!(waiting.visit(&c, &fg).await, Visit::Passed);
    let list = admin(&c, &fg, "GET", "/v1/rooms", ADMIN_READ_TOKEN)
        .await
        .json();
    assert_eq!(list["rooms"][0]["room"], "pages");
    assert_eq!(list["rooms"][0]["admitted_total"], 2);

    let metrics = admin(&c, &fg, "GET", "/metrics", ADMIN_TOKEN).await.text();
    for line in [
        "flashgate_room_admitted_total{room=\"pages\"} 2",
        "flashgate_room_queued{room=\"pages\"} 0",
        "flashgate_room_active{room=\"pages\"} ",
    ] {
        assert!(metrics.contains(line), "{line} missing in\n{metrics}");
    }
    let (code, _, err) = cli(&fg, &["room", "status", "nope"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("unknown_room"), "{err}");
}

/// An active visitor past half its session gets a fresh cookie with a later end (one store
/// call), and then none until half of the new session has passed; while draining, none: the
/// session ends, and the visitor queues again.
async fn sessions_slide_but_not_while_draining(store: StoreFixture) {
    let backend = Backend::start_echo().await;
    let room = "      total_active: 1\n      new_per_minute: 60000\n      session_duration: 2s\n";
    let fg = Flashgate::start(&room_config(&backend, &store.yaml, room)).await;
    let c = client();
    let mut v = Visitor::default();
    assert_eq!(v.visit(&c, &fg).await, Visit::Passed);
    let first = v.cookie.clone().unwrap();
    // Within the first half: no new cookie.
    let a = v.ask(&c, &fg, "text/html").await;
    assert_eq!(a.status, 200);
    assert!(!a.headers.contains_key("set-cookie"));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let a = v.ask(&c, &fg, "text/html").await;
    assert_eq!(a.status, 200);
    let second = v.cookie.clone().unwrap();
    assert_ne!(first, second, "a fresh cookie past half the session");
    let end = |c: &str| c.split('.').nth(2).unwrap().parse::<u64>().unwrap();
    assert!(end(&second) >= end(&first) + 1000, "{first} -> {second}");
    assert!(
        !v.ask(&c, &fg, "text/html")
            .await
            .headers
            .contains_key("set-cookie")
    );

    let (code, out, err) = cli(&fg, &["room", "drain", "pages"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("draining"), "{out}");
    // Past half the session again: no fresh cookie now; once it ends, the visitor queues.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        assert!(Instant::now() < deadline, "the session never ended");
        let a = v.ask(&c, &fg, "application/json").await;
        if a.status == 429 {
            assert_eq!(a.json()["state"], "queued");
            break;
        }
        assert_eq!(a.status, 200);
        assert_eq!(v.cookie.as_deref(), Some(second.as_str()), "not extended");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

on_each_store!(
    pause_resume_and_status,
    sessions_slide_but_not_while_draining,
    a_room_in_front_of_a_sale_route,
);

/// A Redis Cluster: the room's four keys share one slot (`{room:pages}`), so `room.lua` runs
/// there; two instances on a 3-master cluster give one queue (3 in, 17 at positions 1..17,
/// the same on either instance).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_on_a_redis_cluster() {
    support::shop::bounded(async {
        let cluster = support::redis_cluster::RedisCluster::start(3, 0);
        let store = format!(
            "store: {{ cluster: {}, connect_timeout: 5s, response_timeout: 10s }}\n",
            cluster.yaml_seeds()
        );
        let backend = Backend::start_echo().await;
        let room =
            "      total_active: 3\n      new_per_minute: 60000\n      session_duration: 30s\n";
        let cfg = room_config(&backend, &store, room);
        let (a, b) = (Flashgate::start(&cfg).await, Flashgate::start(&cfg).await);
        let c = client();
        let mut positions = Vec::new();
        let mut queued = Vec::new();
        for i in 0..20 {
            let mut v = Visitor::default();
            match v.visit(&c, if i % 2 == 0 { &a } else { &b }).await {
                Visit::Passed => positions.push(0),
                Visit::Queued(p) => {
                    positions.push(p);
                    queued.push((p, v));
                }
            }
        }
        let mut expected = vec![0, 0, 0];
        expected.extend(1..=17);
        assert_eq!(positions, expected);
        for (p, v) in &mut queued {
            assert_eq!(v.visit(&c, &a).await, Visit::Queued(*p));
            assert_eq!(v.visit(&c, &b).await, Visit::Queued(*p));
        }
        let master = cluster.master_for("fg:{room:pages}:queue");
        for part in ["seen", "active", "state"] {
            assert_eq!(
                cluster.master_for(&format!("fg:{{room:pages}}:{part}")),
                master
            );
        }
        let queue_len: i64 = cluster.cli(master, &["ZCARD", "fg:{room:pages}:queue"]);
        assert_eq!(queue_len, 17);
    })
    .await;
}

/// A room on the sale route itself: a buyer let in still meets the reservation (one unit
/// each), a queued buyer reaches no reservation and counts as no admission.
async fn a_room_in_front_of_a_sale_route(store: StoreFixture) {
    let backend = Backend::start_echo().await;
    // Only this test binary reads this variable, and it is set before flashgate starts.
    unsafe {
        std::env::set_var(
            support::room::KEY_VAR,
            "room-key-for-tests-0123456789abcdef",
        )
    };
    let yaml = support::shop::sale_config(
        &backend.url(),
        &store.yaml,
        "5s",
        support::shop::BUY_PATH,
        &format!(
            "{{ sku: {{ path_param: sku }} }}\n    waiting_room: {{ total_active: 2, new_per_minute: 60000, session_duration: 30s, key_env: {} }}",
            support::room::KEY_VAR
        ),
    );
    let fg = Flashgate::start(&yaml).await;
    support::shop::set_stock(&fg, "tee", 10).await;
    let c = client();
    let buy = |user: &'static str, cookie: Option<String>| {
        let (c, fg) = (&c, &fg);
        async move {
            let mut headers = vec![("x-user-id", user), ("accept", "application/json")];
            let cookie = cookie.unwrap_or_default();
            if !cookie.is_empty() {
                headers.push(("cookie", &cookie));
            }
            send(c, "POST", &fg.url("/api/flash/tee/buy"), &headers, "").await
        }
    };
    let a = buy("ann", None).await;
    assert_eq!(a.status, 200, "{}", a.text());
    let cookie = a.headers["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    // Let in, ann still holds one unit at most: her second buy is refused by the sale.
    let again = buy("ann", Some(cookie)).await;
    assert_eq!(again.status, 409, "{}", again.text());
    assert_eq!(buy("bob", None).await.status, 200);
    let queued = buy("cy", None).await;
    assert_eq!(queued.status, 429);
    assert_eq!(queued.json()["state"], "queued");
    let metrics = fg.app.metrics.encode_text();
    for line in [
        "flashgate_admissions_total{route=\"flash-buy\",outcome=\"won\"} 2",
        "flashgate_admissions_total{route=\"flash-buy\",outcome=\"already_purchased\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} missing in\n{metrics}");
    }
    assert_eq!(backend.count(), 2);
}
