//! `contrib/grafana/flashgate.json`: it parses as a Grafana dashboard, and every metric name
//! in it is one a real flashgate exports, read from real scrapes after a small sale.
mod support;

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use support::shop::*;
use support::*;

const SKU: &str = "board-tee";

/// Every metric name in `contrib/grafana/flashgate.json` is one a real flashgate exports:
/// in queries, the series names of a scrape (`_total` counters, `_bucket`/`_sum`/`_count`
/// histograms); elsewhere (descriptions) a series or a family name.
#[tokio::test]
async fn the_grafana_board_names_only_metrics_flashgate_exports() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/grafana/flashgate.json");
    let text = std::fs::read_to_string(&path).expect("the board");
    let board: Value = serde_json::from_str(&text).expect("the board is JSON");
    assert_eq!(board["schemaVersion"], 39);
    assert_eq!(board["__inputs"][0]["name"], "DS_PROMETHEUS");
    let panels = board["panels"].as_array().expect("panels");
    let mut ids = HashSet::new();
    let mut exprs = Vec::new();
    for p in panels {
        assert!(
            ids.insert(p["id"].as_u64().expect("a panel id")),
            "duplicate id"
        );
        assert!(p["gridPos"]["w"].as_u64().is_some(), "{}", p["title"]);
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "${DS_PROMETHEUS}", "{}", p["title"]);
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{}", p["title"]);
        for t in targets {
            exprs.push(t["expr"].as_str().expect("an expr").to_owned());
        }
    }
    for v in board["templating"]["list"].as_array().expect("variables") {
        exprs.push(v["definition"].as_str().unwrap_or_default().to_owned());
    }

    let (series, families) = exported_names().await;
    let in_exprs: HashSet<String> = exprs.iter().flat_map(|e| metric_names(e)).collect();
    let everywhere = metric_names(&text);
    assert!(
        in_exprs.len() >= 13,
        "the board queries too little: {in_exprs:?}"
    );
    for name in &in_exprs {
        assert!(
            series.contains(name),
            "query uses {name}, not a series of /metrics"
        );
    }
    for name in &everywhere {
        assert!(
            series.contains(name) || families.contains(name),
            "the board names {name}, which /metrics does not export"
        );
    }
    // And the other way round: the board shows every family flashgate exports.
    for family in &families {
        assert!(
            everywhere.iter().any(|n| n.starts_with(family.as_str())),
            "the board does not show {family}"
        );
    }
}

/// Every `flashgate_…` name in `text`.
fn metric_names(text: &str) -> HashSet<String> {
    let mut names = HashSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("flashgate_") {
        let tail = &rest[at..];
        let len = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..len].trim_end_matches('_').to_owned());
        rest = &tail[len..];
    }
    names
}

/// The series names and family names of a real scrape after a small sale on Redis, a page
/// the backend is too slow for, and Redis gone (families without a sample are not exported,
/// so the errors must happen). Prometheus text format: counters' families end in `_total`.
async fn exported_names() -> (HashSet<String>, HashSet<String>) {
    let mut store = redis();
    let backend = Backend::start(|req| async move {
        if req.uri().path() == "/slow" {
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
        json_response(http::StatusCode::OK, ACCEPTED)
    })
    .await;
    let fg = start_with_timeout(&backend.url(), &store, "300ms").await;
    set_stock(&fg, SKU, 2).await;
    let c = client();
    for (user, status) in [("a", 200), ("b", 200), ("c", 410)] {
        assert_eq!(buy(&c, &fg, SKU, user).await.status, status);
    }
    assert_eq!(get(&fg.url("/catalog")).await.status, 200);
    assert_eq!(
        get(&fg.url("/slow")).await.status,
        504,
        "an upstream timeout"
    );
    // Scraped while Redis is up (the SKU gauges), then once it is gone (the store errors).
    let mut text = scrape_text(&fg).await;
    if let Some(redis) = store.redis.as_mut() {
        redis.kill();
    }
    let down = buy(&c, &fg, "another-sku", "d").await;
    assert_rejected(&down, 503, "unavailable");
    text.push_str(&scrape_text(&fg).await);
    // A waiting room's families: one visitor let in, one queued.
    let room = support::room::room_config(
        &backend,
        "",
        "      total_active: 1\n      new_per_minute: 60000\n      session_duration: 30s\n",
    );
    let fg_room = Flashgate::start(&room).await;
    let mut first = support::room::Visitor::default();
    assert_eq!(
        first.visit(&c, &fg_room).await,
        support::room::Visit::Passed
    );
    let mut second = support::room::Visitor::default();
    assert_eq!(
        second.visit(&c, &fg_room).await,
        support::room::Visit::Queued(1)
    );
    text.push_str(&scrape_text(&fg_room).await);
    let (mut series, mut families) = (HashSet::new(), HashSet::new());
    for line in text.lines() {
        if let Some(typed) = line.strip_prefix("# TYPE ") {
            let mut parts = typed.split(' ');
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                continue;
            };
            families.insert(name.to_owned());
            match kind {
                "histogram" => {
                    for suffix in ["_bucket", "_sum", "_count"] {
                        series.insert(format!("{name}{suffix}"));
                    }
                }
                _ => {
                    series.insert(name.to_owned());
                }
            }
        }
    }
    assert_eq!(families.len(), 19, "{text}");
    (series, families)
}

async fn scrape_text(fg: &Flashgate) -> String {
    let auth = format!("Bearer {ADMIN_READ_TOKEN}");
    let url = format!("{}/metrics", fg.admin_url());
    let scrape = send(&client(), "GET", &url, &[("authorization", &auth)], "").await;
    assert_eq!(scrape.status, 200);
    scrape.text()
}
