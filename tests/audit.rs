//! Audit and reconciliation, as the operator lives them: after a sale (sold out, with
//! releases, with orders left `uncertain` by a backend that timed out) `flashgate audit` passes;
//! the uncertain orders are listed and resolved once each (`flashgate reservations`); a stock
//! key changed behind flashgate's back, or a reservation left `held`, fails the audit naming
//! the SKU. Real flashgate, real backends, the embedded store and a real `redis-server`; the
//! CLI is the built binary.
mod support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::StatusCode;
use serde_json::{Value, json};
use support::audit::assert_audit_clean;
use support::redis::RedisServer;
use support::shop::*;
use support::*;

// ---------------------------------------------------------------------------
// Helpers

/// Runs `flashgate args… --admin URL --token T` (no token in the environment); exit code,
/// stdout, stderr.
async fn cli(url: &str, args: &[&str]) -> (i32, String, String) {
    cli_as(url, ADMIN_TOKEN, args).await
}

async fn cli_as(url: &str, token: &str, args: &[&str]) -> (i32, String, String) {
    run_cli(&[args, &["--admin", url, "--token", token]].concat()).await
}

fn json_of(stdout: &str) -> Value {
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout:?}"))
}

/// `GET path` on the admin API with the read-only token.
async fn read_only(fg: &Flashgate, method: &str, path: &str, body: Option<Value>) -> Answer {
    let auth = format!("Bearer {ADMIN_READ_TOKEN}");
    send(
        &client(),
        method,
        &format!("{}{path}", fg.admin_url()),
        &[("authorization", auth.as_str())],
        body.map(|b| b.to_string()).unwrap_or_default(),
    )
    .await
}

/// `GET /v1/audit{query}`: the report.
async fn audit(fg: &Flashgate, query: &str) -> Value {
    let a = admin(fg, "GET", &format!("/v1/audit{query}"), None).await;
    assert_eq!(a.status, 200, "{}", a.text());
    a.json()
}

/// The audit of one SKU in a report.
fn sale_in<'v>(report: &'v Value, sku: &str) -> &'v Value {
    report["sales"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["sku"] == sku))
        .unwrap_or_else(|| panic!("{sku} not in the audit: {report}"))
}

async fn list(fg: &Flashgate, sku: &str, query: &str) -> Value {
    let a = admin(
        fg,
        "GET",
        &format!("/v1/sales/{sku}/reservations{query}"),
        None,
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text());
    a.json()
}

fn ids(page: &Value) -> Vec<String> {
    page["reservations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect()
}

async fn resolve(fg: &Flashgate, sku: &str, id: &str, to: &str) -> Answer {
    admin(
        fg,
        "POST",
        &format!("/v1/sales/{sku}/reservations/{id}/resolve"),
        Some(json!({ "to": to })),
    )
    .await
}

/// A shop that holds every order until `open` is sent `true` (then answers 200): a buyer
/// waiting on it times out at flashgate's `request_timeout` (504, the unit `uncertain`) or, with
/// a long timeout, stays in flight (the unit `held`).
async fn gated_shop() -> (Backend, tokio::sync::watch::Sender<bool>) {
    let (open, rx) = tokio::sync::watch::channel(false);
    let backend = Backend::start(move |_req| {
        let mut rx = rx.clone();
        async move {
            // Bounded: the test ends long before.
            let _ = tokio::time::timeout(Duration::from_secs(30), rx.wait_for(|open| *open)).await;
            json_response(StatusCode::OK, r#"{"order":"accepted"}"#)
        }
    })
    .await;
    (backend, open)
}

/// The row of a CLI table (`audit`, `sale list`) that starts with `sku`; empty when none does.
fn row_of<'o>(out: &'o str, sku: &str) -> &'o str {
    out.lines().find(|l| l.starts_with(sku)).unwrap_or_default()
}

fn users(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

fn now_ms() -> u64 {
    u64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

// ---------------------------------------------------------------------------
// The books balance after a sale

/// 25 units (a set, then an add), 60 buyers: 25 win; the audit passes through the API (named
/// SKU and every SKU) and the CLI (exit 0, a table naming the SKU).
async fn audit_passes_after_a_sell_out(store: StoreFixture) {
    let backend = shop().await;
    let fg = start(&backend.url(), &store).await;
    set_stock(&fg, "tee-1", 20).await;
    assert_eq!(add_stock(&fg, "tee-1", 5).await, 25);
    let outcomes = fire(&[&fg], "tee-1", users("buyer", 60)).await;
    let t = tally(&outcomes);
    assert_eq!(t.get(&(200, String::new())), Some(&25), "{t:?}");
    status_until(&fg, "tee-1", |s| s["units"]["sold"] == 25).await;

    let report = audit(&fg, "?sku=tee-1").await;
    assert_eq!(report["ok"], true, "{report}");
    let sale = sale_in(&report, "tee-1");
    assert_eq!(
        (
            &sale["verdict"],
            &sale["added"],
            &sale["stock"],
            &sale["accounted"]
        ),
        (&json!("ok"), &json!(25), &json!(0), &json!(25)),
        "{sale}"
    );
    assert_eq!(sale["units"], counts(0, 25, 0, 0));
    // The read-only token may audit.
    let r = read_only(&fg, "GET", "/v1/audit?sku=tee-1", None).await;
    assert_eq!(
        (r.status, &r.json()["ok"]),
        (StatusCode::OK, &json!(true)),
        "{}",
        r.text()
    );
    // Every SKU ever stocked, when none is named.
    let report = audit(&fg, "").await;
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["sales"].as_array().unwrap().len(), 1, "{report}");

    let (code, out, err) = cli(&fg.admin_url(), &["audit"]).await;
    assert_eq!(code, 0, "{out}{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with("SKU") && lines[0].contains("STALE HELD"),
        "{out}"
    );
    assert!(
        lines[1].starts_with("tee-1") && lines[1].contains(" ok "),
        "{out}"
    );
    assert!(
        out.contains("audit ok (1 sale): added = stock + held"),
        "{out}"
    );
    let (code, out, _) = cli(&fg.admin_url(), &["audit", "tee-1", "--json"]).await;
    assert_eq!((code, &json_of(&out)["ok"]), (0, &json!(true)));
    assert_audit_clean(&fg, "tee-1").await;
}

/// Half the orders are refused by the shop (503, in `release_on`): their units come back and
/// are sold again; the operator sets and adds stock mid-sale. The books still balance.
async fn audit_passes_after_releases_and_stock_changes(store: StoreFixture) {
    let backend = Backend::start(|req| async move {
        let user = req.headers()["x-flashgate-user"]
            .to_str()
            .unwrap()
            .to_owned();
        if user.ends_with(['1', '3', '5', '7', '9']) {
            json_response(StatusCode::SERVICE_UNAVAILABLE, r#"{"busy":true}"#)
        } else {
            json_response(StatusCode::OK, r#"{"order":"accepted"}"#)
        }
    })
    .await;
    let fg = start(&backend.url(), &store).await;
    set_stock(&fg, "rel-1", 12).await;
    fire(&[&fg], "rel-1", users("a", 12)).await;
    let s = status_until(&fg, "rel-1", |s| s["units"]["released"] == 6).await;
    assert_eq!(
        (&s["stock"], &s["units"]["sold"]),
        (&json!(6), &json!(6)),
        "{s}"
    );
    set_stock(&fg, "rel-1", 3).await;
    add_stock(&fg, "rel-1", 4).await;
    fire(&[&fg], "rel-1", users("b", 30)).await;
    let s = status_until(&fg, "rel-1", |s| s["units"]["held"] == 0).await;
    assert!(s["units"]["released"].as_u64().unwrap() > 6, "{s}");
    let report = audit(&fg, "?sku=rel-1").await;
    assert_eq!(report["ok"], true, "{report}");
    // 12, then 3 instead of 6, then 4 more: 13 units ever added.
    let sale = sale_in(&report, "rel-1");
    assert_eq!(sale["added"], 13, "{sale}");
    assert_audit_clean(&fg, "rel-1").await;
}

/// A `cancelled|0|…` tombstone counts zero: written the way flashgate writes one, it changes
/// neither the audit nor any listing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_tombstone_counts_zero() {
    bounded(async {
        let store = redis();
        let backend = shop().await;
        let fg = start(&backend.url(), &store).await;
        set_stock(&fg, "tomb-1", 3).await;
        assert_eq!(buy(&client(), &fg, "tomb-1", "alice").await.status, 200);
        status_until(&fg, "tomb-1", |s| s["units"]["sold"] == 1).await;
        let redis = store.redis.as_ref().unwrap();
        let id = "0123456789abcdef0123456789abcdef";
        redis.cli(&[
            "HSET",
            "fg:{tomb-1}:res",
            id,
            &format!("cancelled|0|{}|", now_ms()),
        ]);
        assert_eq!(audit(&fg, "?sku=tomb-1").await["ok"], true);
        for state in ["uncertain", "held"] {
            let page = list(&fg, "tomb-1", &format!("?state={state}")).await;
            assert_eq!(page["reservations"], json!([]), "{page}");
        }
        let r = resolve(&fg, "tomb-1", id, "released").await;
        assert_eq!(r.status, 409, "{}", r.text());
        assert_eq!(r.json()["state"], "cancelled");
        assert_audit_clean(&fg, "tomb-1").await;
    })
    .await;
}

// ---------------------------------------------------------------------------
// Reconciling uncertain orders

/// The shop holds three orders past `request_timeout` (300ms): each buyer gets 504 and the
/// unit stays `uncertain`. The audit passes (uncertain units are counted) and says they wait;
/// the listing shows them (bounded by `limit`); the operator resolves one `released` (the unit
/// is back, the buyer may buy again) and one `sold`; a second resolve of either is 409 with
/// its state and changes nothing.
async fn uncertain_orders_are_listed_and_resolved_once(store: StoreFixture) {
    let (backend, open) = gated_shop().await;
    let fg = start_with_timeout(&backend.url(), &store, "300ms").await;
    let url = fg.admin_url();
    set_stock(&fg, "unc-1", 5).await;
    let c = client();
    for user in ["alice", "bob", "carol"] {
        assert_rejected(&buy(&c, &fg, "unc-1", user).await, 504, "upstream_timeout");
    }
    status_until(&fg, "unc-1", |s| s["units"]["uncertain"] == 3).await;

    // The audit passes: the uncertain units are on the books; the CLI says they wait.
    let report = audit(&fg, "").await;
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(sale_in(&report, "unc-1")["units"]["uncertain"], 3);
    let (code, out, err) = cli(&url, &["audit"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("3 units still uncertain"), "{out}");

    // The listing: every uncertain order, with its user, quantity and time; bounded.
    let before = now_ms();
    let page = list(&fg, "unc-1", "").await;
    assert_eq!(
        (&page["state"], &page["truncated"]),
        (&json!("uncertain"), &json!(false))
    );
    let rows = page["reservations"].as_array().unwrap();
    let mut listed: Vec<&str> = rows.iter().map(|r| r["user"].as_str().unwrap()).collect();
    listed.sort_unstable();
    assert_eq!(listed, ["alice", "bob", "carol"], "{page}");
    for r in rows {
        assert!(is_reservation_id(r["id"].as_str().unwrap()), "{r}");
        assert_eq!(
            (&r["quantity"], &r["state"]),
            (&json!(1), &json!("uncertain"))
        );
        let at = r["reserved_at_ms"].as_u64().unwrap();
        assert!(at <= before && at + 60_000 > before, "{r}");
    }
    let first_two = list(&fg, "unc-1", "?limit=2").await;
    assert_eq!(ids(&first_two).len(), 2);
    assert_eq!(first_two["truncated"], true, "{first_two}");
    assert_eq!(
        list(&fg, "unc-1", "?state=held").await["reservations"],
        json!([])
    );
    // The same with the read-only token; resolving needs the write token.
    let r = read_only(&fg, "GET", "/v1/sales/unc-1/reservations", None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let id_of = |user: &str| {
        rows.iter().find(|r| r["user"] == user).unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let (alice, bob, carol) = (id_of("alice"), id_of("bob"), id_of("carol"));
    let path = format!("/v1/sales/unc-1/reservations/{alice}/resolve");
    let r = read_only(&fg, "POST", &path, Some(json!({"to": "released"}))).await;
    assert_rejected(&r, 403, "forbidden");

    // The CLI lists them for people, and as JSON.
    let (code, out, err) = cli(&url, &["reservations", "unc-1"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with("sale unc-1: 3 uncertain reservations"),
        "{out}"
    );
    for id in [&alice, &bob, &carol] {
        assert!(out.contains(id.as_str()), "{out}");
    }
    assert!(
        out.contains("flashgate reservations resolve unc-1 ID sold|released"),
        "{out}"
    );
    let (code, out, _) = cli(&url, &["reservations", "list", "unc-1", "--json"]).await;
    assert_eq!(code, 0);
    assert_eq!(json_of(&out)["reservations"].as_array().unwrap().len(), 3);

    // From now on the shop answers.
    open.send_replace(true);

    // alice: the shop has no such order → released: the unit is back, alice may buy again.
    let (code, out, err) = cli(
        &url,
        &["reservations", "resolve", "unc-1", &alice, "released"],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.trim(),
        format!(
            "unc-1: reservation {alice} resolved uncertain → released: 1 unit back in stock \
             (now 3); the buyer may buy again"
        )
    );
    let s = sale_status(&fg, "unc-1").await;
    assert_eq!((&s["stock"], &s["buyers"]), (&json!(3), &json!(2)), "{s}");
    assert_eq!(s["units"], counts(0, 0, 1, 2));
    assert_eq!(buy(&c, &fg, "unc-1", "alice").await.status, 200);
    status_until(&fg, "unc-1", |s| s["units"]["sold"] == 1).await;

    // bob: the shop has the order → sold; the stock does not move.
    let r = resolve(&fg, "unc-1", &bob, "sold").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json(),
        json!({"sku": "unc-1", "id": bob, "from": "uncertain", "to": "sold",
               "quantity": 1, "stock": null})
    );
    let s = sale_status(&fg, "unc-1").await;
    assert_eq!(s["stock"], 2, "{s}");
    assert_eq!(s["units"], counts(0, 2, 1, 1));

    // Twice is once: 409 with the current state, nothing changes (never a second release).
    for (id, to, state) in [
        (&alice, "released", "released"),
        (&alice, "sold", "released"),
        (&bob, "released", "sold"),
    ] {
        let r = resolve(&fg, "unc-1", id, to).await;
        assert_rejected(&r, 409, "not_resolvable");
        assert_eq!(r.json()["state"], state, "{}", r.text());
    }
    let (code, out, err) = cli(
        &url,
        &["reservations", "resolve", "unc-1", &alice, "released"],
    )
    .await;
    assert_eq!(code, 1, "{out}");
    assert!(
        err.contains(&format!("reservation {alice} not resolved"))
            && err.contains("already released")
            && err.contains("409"),
        "{err}"
    );
    assert_eq!(
        sale_status(&fg, "unc-1").await,
        s,
        "a refused resolve changed nothing"
    );
    let unknown = "fedcba9876543210fedcba9876543210";
    assert_rejected(
        &resolve(&fg, "unc-1", unknown, "sold").await,
        404,
        "unknown_reservation",
    );
    let r = admin(
        &fg,
        "POST",
        &format!("/v1/sales/unc-1/reservations/{carol}/resolve"),
        Some(json!({"to": "maybe"})),
    )
    .await;
    assert_rejected(&r, 400, "bad_request");
    assert_eq!(r.json()["field"], "to");

    // carol is still to reconcile; the books balance throughout.
    assert_eq!(ids(&list(&fg, "unc-1", "").await), [carol]);
    assert_audit_clean(&fg, "unc-1").await;
}

/// 40 uncertain orders, listed 15 at a time: resolving what was listed and listing again walks
/// through them all, each resolved once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_list_is_worked_through_page_by_page() {
    bounded(async {
        let store = redis();
        let (backend, _open) = gated_shop().await;
        let fg = start_with_timeout(&backend.url(), &store, "300ms").await;
        set_stock(&fg, "many-1", 100).await;
        let t = tally(&fire(&[&fg], "many-1", users("u", 40)).await);
        assert_eq!(t.get(&(504, "upstream_timeout".into())), Some(&40), "{t:?}");
        status_until(&fg, "many-1", |s| s["units"]["uncertain"] == 40).await;
        let mut resolved = Vec::new();
        for round in 0.. {
            assert!(round < 5, "still listing after {round} pages");
            let page = list(&fg, "many-1", "?limit=15").await;
            let page_ids = ids(&page);
            if page_ids.is_empty() {
                break;
            }
            assert_eq!(
                page["truncated"],
                resolved.len() + page_ids.len() < 40,
                "{page}"
            );
            for id in page_ids {
                assert_eq!(resolve(&fg, "many-1", &id, "released").await.status, 200);
                resolved.push(id);
            }
        }
        resolved.sort();
        resolved.dedup();
        assert_eq!(resolved.len(), 40);
        let s = sale_status(&fg, "many-1").await;
        assert_eq!((&s["stock"], &s["buyers"]), (&json!(100), &json!(0)), "{s}");
        assert_eq!(s["units"], counts(0, 0, 40, 0));
        assert_audit_clean(&fg, "many-1").await;
    })
    .await;
}

/// A sale with 20,000 reservations on its books: listing the few uncertain ones reads the hash
/// in bounded pages, and after a sale with nothing uncertain it reads nothing at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_a_big_sale_is_bounded() {
    bounded(async {
        let store = redis();
        let backend = shop().await;
        let fg = start(&backend.url(), &store).await;
        set_stock(&fg, "big-1", 1).await;
        let redis = store.redis.as_ref().unwrap();
        let at = now_ms().to_string();
        let res = "fg:{big-1}:res";
        for chunk in 0..20 {
            let mut args = vec!["HSET".to_owned(), res.to_owned()];
            for i in 0..1000u128 {
                args.push(format!("{:032x}", chunk * 1000 + i));
                args.push(format!("sold|1|{at}|user-{chunk}-{i}"));
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            redis.cli(&args);
        }
        let hscans = || redis.command_calls(&["cmdstat_hscan"]);
        assert_eq!(list(&fg, "big-1", "").await["reservations"], json!([]));
        assert_eq!(hscans(), 0, "nothing uncertain on the books: nothing read");
        let uncertain = ["aa", "bb", "cc"].map(|p| format!("{p}{}", "0".repeat(30)));
        for id in &uncertain {
            redis.cli(&["HSET", res, id, &format!("uncertain|1|{at}|late")]);
        }
        redis.cli(&["HINCRBY", "fg:{big-1}:stats", "res:uncertain", "3"]);
        let page = list(&fg, "big-1", "").await;
        let mut found = ids(&page);
        found.sort();
        assert_eq!(found, uncertain, "{page}");
        let pages = hscans();
        assert!(pages <= 25, "{pages} HSCAN calls for 20,003 entries");
    })
    .await;
}

// ---------------------------------------------------------------------------
// The audit fails

/// Someone changes `fg:{sku}:stock` with a Redis client, behind flashgate's back: the audit
/// fails naming that SKU (and only it), the CLI exits 1; deleting the key fails it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_fails_naming_the_sku_whose_stock_was_changed_behind_its_back() {
    bounded(async {
        let store = redis();
        let backend = shop().await;
        let fg = start(&backend.url(), &store).await;
        let url = fg.admin_url();
        for sku in ["fine-1", "tampered-1"] {
            set_stock(&fg, sku, 10).await;
            fire(&[&fg], sku, users(sku, 3)).await;
            status_until(&fg, sku, |s| s["units"]["sold"] == 3).await;
        }
        assert_eq!(audit(&fg, "").await["ok"], true);
        let redis = store.redis.as_ref().unwrap();
        redis.cli(&["SET", "fg:{tampered-1}:stock", "99"]);

        let report = audit(&fg, "").await;
        assert_eq!(report["ok"], false, "{report}");
        assert_eq!(sale_in(&report, "fine-1")["verdict"], "ok");
        let bad = sale_in(&report, "tampered-1");
        assert_eq!(bad["verdict"], "mismatch", "{bad}");
        let problem = bad["problems"][0].as_str().unwrap();
        assert!(
            problem
                .starts_with("added 10 != stock 99 + held 0 + sold 3 + uncertain 0 (= 102, +92)"),
            "{problem}"
        );

        let (code, out, err) = cli(&url, &["audit"]).await;
        assert_eq!(code, 1, "{out}{err}");
        let row = row_of(&out, "tampered-1");
        assert!(row.contains("MISMATCH"), "{out}");
        assert!(out.contains("tampered-1: added 10 != stock 99"), "{out}");
        assert!(out.contains("audit FAILED: 1 of 2 sales"), "{out}");
        let (code, out, _) = cli(&url, &["audit", "--json"]).await;
        assert_eq!((code, &json_of(&out)["ok"]), (1, &json!(false)));
        let (code, out, err) = cli(&url, &["audit", "fine-1"]).await;
        assert_eq!(code, 0, "{out}{err}");
        let (code, out, _) = cli(&url, &["sale", "list"]).await;
        assert_eq!(code, 0);
        let row = row_of(&out, "tampered-1");
        assert!(row.ends_with("MISMATCH"), "{out}");

        // The key deleted by hand: the sale has units on its books and no stock.
        redis.cli(&["DEL", "fg:{tampered-1}:stock"]);
        let bad = audit(&fg, "?sku=tampered-1").await;
        assert_eq!(sale_in(&bad, "tampered-1")["verdict"], "mismatch", "{bad}");
        assert!(bad.to_string().contains("stock key is missing"), "{bad}");
        // A SKU never stocked fails an audit that names it.
        let (code, out, _) = cli(&url, &["audit", "never-stocked"]).await;
        assert_eq!(code, 1);
        assert!(out.contains("no stock was ever set"), "{out}");
    })
    .await;
}

/// An order in flight (the shop holds it; `request_timeout` is long): its reservation is
/// `held`. With a threshold below its age the audit fails naming the SKU; with the default
/// threshold it passes; it cannot be resolved while young. The shop answers; all is clean.
async fn audit_flags_a_held_reservation_older_than_the_threshold(store: StoreFixture) {
    let (backend, open) = gated_shop().await;
    let fg = start_with_timeout(&backend.url(), &store, "20s").await;
    let url = fg.admin_url();
    set_stock(&fg, "slow-1", 2).await;
    let buyer = {
        let fg_url = fg.url("/api/flash/slow-1/buy");
        tokio::spawn(
            async move { send(&client(), "POST", &fg_url, &[("x-user-id", "dora")], "").await },
        )
    };
    status_until(&fg, "slow-1", |s| s["units"]["held"] == 1).await;
    tokio::time::sleep(Duration::from_millis(120)).await;

    let report = audit(&fg, "?held_older_than=100ms").await;
    assert_eq!(report["ok"], false, "{report}");
    let sale = sale_in(&report, "slow-1");
    assert_eq!(
        (&sale["verdict"], &sale["stale_held"]),
        (&json!("stale_held"), &json!(1))
    );
    let (code, out, err) = cli(&url, &["audit", "--held-older-than", "100ms"]).await;
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains("slow-1: 1 reservation held for more than 100ms"),
        "{out}"
    );
    // The default threshold (2 × request_timeout): it is in flight, nothing left behind.
    assert_eq!(audit(&fg, "").await["ok"], true);
    let held = list(&fg, "slow-1", "?state=held").await;
    let id = ids(&held).pop().expect("the held reservation is listed");
    assert_eq!(held["reservations"][0]["user"], "dora");
    let r = resolve(&fg, "slow-1", &id, "released").await;
    assert_rejected(&r, 409, "not_resolvable");
    assert_eq!(r.json()["state"], "held");

    open.send_replace(true);
    assert_eq!(buyer.await.unwrap().status, 200);
    status_until(&fg, "slow-1", |s| s["units"]["sold"] == 1).await;
    assert_audit_clean(&fg, "slow-1").await;
}

/// A flashgate died mid-order ten minutes ago, leaving a `held` reservation nobody will
/// settle (written into Redis the way `reserve.lua` writes it). The audit fails with the
/// default threshold; the operator lists it and releases it (it is old enough); all is clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reservation_left_held_by_a_dead_instance_is_flagged_then_resolved() {
    bounded(async {
        let store = redis();
        let backend = shop().await;
        let fg = start(&backend.url(), &store).await;
        let url = fg.admin_url();
        set_stock(&fg, "ghost-1", 5).await;
        let redis: &RedisServer = store.redis.as_ref().unwrap();
        let id = "00000000000000000000000000000abc";
        let long_ago = (now_ms() - 600_000).to_string();
        redis.cli(&["DECRBY", "fg:{ghost-1}:stock", "1"]);
        redis.cli(&["HINCRBY", "fg:{ghost-1}:buyers", "ghost", "1"]);
        redis.cli(&[
            "HSET",
            "fg:{ghost-1}:res",
            id,
            &format!("held|1|{long_ago}|ghost"),
        ]);
        redis.cli(&["HINCRBY", "fg:{ghost-1}:stats", "res:held", "1"]);
        redis.cli(&["HINCRBY", "fg:{ghost-1}:stats", "units:held", "1"]);

        let (code, out, err) = cli(&url, &["audit"]).await;
        assert_eq!(code, 1, "{out}{err}");
        let row = row_of(&out, "ghost-1");
        assert!(row.contains("STALE_HELD"), "{out}");
        let (code, out, err) = cli(&url, &["reservations", "ghost-1", "--state", "held"]).await;
        assert_eq!(code, 0, "{err}");
        assert!(
            out.contains(id) && out.contains("ghost") && out.contains("10m"),
            "{out}"
        );
        let (code, out, err) = cli(
            &url,
            &["reservations", "resolve", "ghost-1", id, "released"],
        )
        .await;
        assert_eq!(code, 0, "{err}");
        assert!(out.contains("resolved held → released"), "{out}");
        let s = sale_status(&fg, "ghost-1").await;
        assert_eq!((&s["stock"], &s["buyers"]), (&json!(5), &json!(0)), "{s}");
        assert_audit_clean(&fg, "ghost-1").await;
        assert_eq!(cli(&url, &["audit"]).await.0, 0);
    })
    .await;
}

// ---------------------------------------------------------------------------
// Listing sales, watching one, bad input

/// `sale list` shows every SKU ever stocked (sorted; one only closed is no sale yet), with
/// units by state; `sale status --watch` refreshes (bounded here by --count).
async fn sales_are_listed_and_a_status_watched(store: StoreFixture) {
    let backend = shop().await;
    let fg = start(&backend.url(), &store).await;
    let url = fg.admin_url();
    set_stock(&fg, "b-2", 4).await;
    add_stock(&fg, "a-1", 2).await;
    let r = admin(&fg, "POST", "/v1/sales/c-3/close", None).await;
    assert_eq!(r.status, 200);
    assert_eq!(buy(&client(), &fg, "b-2", "eve").await.status, 200);
    status_until(&fg, "b-2", |s| s["units"]["sold"] == 1).await;

    let r = read_only(&fg, "GET", "/v1/sales", None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let skus: Vec<&str> = v["sales"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["sku"].as_str().unwrap())
        .collect();
    assert_eq!(skus, ["a-1", "b-2"], "{v}");
    assert_eq!(v["sales"][1]["units"], counts(0, 1, 0, 0));
    assert_eq!(v["truncated"], false);
    let r = admin(&fg, "GET", "/v1/sales?limit=1", None).await;
    assert_eq!(r.json()["truncated"], true);

    let (code, out, err) = cli(&url, &["sale", "list"]).await;
    assert_eq!(code, 0, "{err}");
    let lines: Vec<Vec<&str>> = out
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        lines,
        [
            vec![
                "SKU",
                "SALE",
                "STOCK",
                "ADDED",
                "BUYERS",
                "HELD",
                "SOLD",
                "RELEASED",
                "UNCERTAIN",
                "BOOKS"
            ],
            vec!["a-1", "open", "2", "2", "0", "0", "0", "0", "0", "ok"],
            vec!["b-2", "open", "3", "4", "1", "0", "1", "0", "0", "ok"],
        ],
        "{out}"
    );
    let (code, out, _) = cli(&url, &["sale", "list", "--json"]).await;
    assert_eq!(
        (code, json_of(&out)["sales"].as_array().unwrap().len()),
        (0, 2)
    );

    let watch = [
        "sale",
        "status",
        "b-2",
        "--watch",
        "--interval",
        "100ms",
        "--count",
        "2",
    ];
    let (code, out, err) = cli(&url, &watch).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.matches("sale b-2: open").count(), 2, "{out}");
    assert_eq!(out.matches("(Ctrl-C to stop)").count(), 2, "{out}");
    let (code, out, _) = cli(&url, &[&watch[..], &["--json"]].concat()).await;
    assert_eq!(code, 0);
    let refreshes: Vec<Value> = out.lines().map(json_of).collect();
    assert_eq!(refreshes.len(), 2, "{out}");
    assert!(refreshes.iter().all(|v| v["stock"] == 3), "{out}");
}

/// Bad input is refused with what is wrong: the CLI before sending anything (exit 2), the API
/// with 400 naming the parameter (or 405 for the wrong method).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_clearly() {
    bounded(async {
        // Nothing listens here: a refusal that is not about the connection was decided
        // before anything was sent.
        let port = refused_port();
        let nowhere = format!("http://127.0.0.1:{port}");
        let id = "0123456789abcdef0123456789abcdef";
        for (args, says) in [
            (&["audit", "a b"][..], "invalid SKU"),
            (&["audit", "--held-older-than", "soon"], "60s"),
            (&["reservations", "x{y}"], "invalid SKU"),
            (
                &["reservations", "tee", "--state", "sold"],
                "uncertain, held",
            ),
            (&["reservations", "tee", "--limit", "0"], "--limit"),
            (
                &["reservations", "resolve", "tee", "not-an-id", "sold"],
                "reservation id",
            ),
            (
                &["reservations", "resolve", "tee", &id.to_uppercase(), "sold"],
                "reservation id",
            ),
            (
                &["reservations", "resolve", "tee", id, "maybe"],
                "sold, released",
            ),
            (&["reservations"], "<SKU>"),
            (&["sale", "status", "tee", "--interval", "1s"], "--watch"),
            (
                &["sale", "status", "tee", "--watch", "--interval", "1ms"],
                "100ms",
            ),
            (&["sale", "list", "--limit", "10001"], "--limit"),
        ] {
            let (code, out, err) = cli(&nowhere, args).await;
            assert_eq!(code, 2, "{args:?}: {out}{err}");
            assert!(err.contains(says), "{args:?}: {err}");
            assert!(
                !err.contains("refused") && !err.contains("panicked"),
                "{args:?}: {err}"
            );
        }

        let backend = shop().await;
        let fg = start(&backend.url(), &memory()).await;
        for (method, path, field) in [
            ("GET", "/v1/audit?skus=a".to_owned(), "skus"),
            ("GET", "/v1/audit?sku=a%20b".to_owned(), "sku"),
            (
                "GET",
                "/v1/audit?held_older_than=soon".to_owned(),
                "held_older_than",
            ),
            (
                "GET",
                "/v1/audit?held_older_than=1s&held_older_than=2s".to_owned(),
                "held_older_than",
            ),
            ("GET", "/v1/sales?limit=0".to_owned(), "limit"),
            ("GET", "/v1/sales?limit=x".to_owned(), "limit"),
            (
                "GET",
                "/v1/sales/tee/reservations?state=sold".to_owned(),
                "state",
            ),
            (
                "GET",
                "/v1/sales/tee/reservations?limit=1001".to_owned(),
                "limit",
            ),
            (
                "GET",
                "/v1/sales/tee/reservations?older_than=-1s".to_owned(),
                "older_than",
            ),
        ] {
            let a = admin(&fg, method, &path, None).await;
            assert_rejected(&a, 400, "bad_request");
            assert_eq!(a.json()["field"], field, "{path}: {}", a.text());
        }
        let resolve_path = format!("/v1/sales/tee/reservations/{id}/resolve");
        for (method, path, status) in [
            ("POST", "/v1/audit".to_owned(), 405),
            ("GET", resolve_path.clone(), 405),
            (
                "POST",
                "/v1/sales/a%20b/reservations/x/resolve".to_owned(),
                400,
            ),
            (
                "POST",
                "/v1/sales/tee/reservations/x/resolve".to_owned(),
                400,
            ),
        ] {
            let a = admin(&fg, method, &path, None).await;
            assert_eq!(a.status, status, "{method} {path}: {}", a.text());
        }
        for body in [
            json!({}),
            json!({"to": "sold", "why": 1}),
            json!({"to": 1}),
            json!([]),
        ] {
            let a = admin(&fg, "POST", &resolve_path, Some(body.clone())).await;
            assert_rejected(&a, 400, "bad_request");
        }
    })
    .await;
}

// ---------------------------------------------------------------------------
// The stories above that take a store, each run on both

on_each_store!(
    audit_passes_after_a_sell_out,
    audit_passes_after_releases_and_stock_changes,
    uncertain_orders_are_listed_and_resolved_once,
    audit_flags_a_held_reservation_older_than_the_threshold,
    sales_are_listed_and_a_status_watched,
);
