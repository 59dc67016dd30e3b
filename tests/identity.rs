//! One buyer, however the id is spelled: with `identity.normalize`, `Alice` and `alice` (or a
//! composed and a decomposed `é`) share one per-user limit; without it they count apart, as
//! documented; an id with whitespace around it is refused. On both stores.
mod support;

use bytes::Bytes;
use http::StatusCode;
use support::redis::RedisServer;
use support::*;

fn sale_config(backend: &Backend, store_yaml: &str, normalize: &str) -> String {
    config(
        backend,
        &format!(
            "{store_yaml}routes:\n\
             \x20 - name: flash-buy\n\
             \x20   match: {{ method: POST, path: \"/api/flash/{{sku}}/buy\" }}\n\
             \x20   identity: {{ header: X-User-Id{normalize} }}\n\
             \x20   sale: {{ sku: {{ path_param: sku }} }}\n"
        ),
    )
}

async fn buy(fg: &Flashgate, sku: &str, user: &str) -> Answer {
    let url = fg.url(&format!("/api/flash/{sku}/buy"));
    send(
        &client(),
        "POST",
        &url,
        &[("x-user-id", user)],
        Bytes::new(),
    )
    .await
}

async fn one_buyer_however_spelled(store_yaml: &str) {
    let backend = Backend::start_echo().await;
    // Without normalization: each spelling is its own buyer (the default, documented).
    let fg = Flashgate::start(&sale_config(&backend, store_yaml, "")).await;
    fg.app.store.set_stock(&sku("plain"), 10).await.unwrap();
    assert_eq!(buy(&fg, "plain", "Alice").await.status, StatusCode::OK);
    assert_eq!(buy(&fg, "plain", "alice").await.status, StatusCode::OK);
    for spaced in ["alice\u{a0}", "\u{3000}alice"] {
        let a = buy(&fg, "plain", spaced).await;
        assert_eq!(
            a.status,
            StatusCode::BAD_REQUEST,
            "{spaced:?}: {}",
            a.text()
        );
    }
    drop(fg);

    let fg = Flashgate::start(&sale_config(&backend, store_yaml, ", normalize: lowercase")).await;
    fg.app.store.set_stock(&sku("folded"), 10).await.unwrap();
    let a = buy(&fg, "folded", "Jose\u{301}").await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    for again in ["jos\u{e9}", "JOSE\u{301}", "Jos\u{e9}"] {
        let a = buy(&fg, "folded", again).await;
        assert_eq!(a.status, StatusCode::CONFLICT, "{again:?}: {}", a.text());
        assert_eq!(a.json()["error"], "already_purchased");
    }
    let seen = backend.seen();
    let winner = seen.last().unwrap();
    assert_eq!(
        winner.headers["x-flashgate-user"], "jos\u{e9}",
        "the id as counted"
    );
    let status = fg.app.store.status(&sku("folded")).await.unwrap();
    assert_eq!((status.buyers, status.stock), (1, Some(9)));
}

#[tokio::test]
async fn one_buyer_however_spelled_on_the_embedded_store() {
    one_buyer_however_spelled("").await;
}

#[tokio::test]
async fn one_buyer_however_spelled_on_redis() {
    let redis = RedisServer::start();
    let yaml = format!("store: {{ redis: \"{}\" }}\n", redis.url());
    one_buyer_however_spelled(&yaml).await;
}
