//! The `flashgate` binary as an operator's tool, driven against a running admin API: stock
//! and sale commands, human output by default and JSON on request, and the refusals that
//! keep the CLI from ever silently doing nothing (values past the caps, bad SKUs, the wrong
//! port, nothing listening).
mod support;

use http::StatusCode;
use serde_json::{Value, json};
use support::shop::*;
use support::*;
use tokio::net::TcpListener;

/// Runs `flashgate args…` with no token in the environment; exit code, stdout, stderr.
async fn flashgate(args: &[&str]) -> (i32, String, String) {
    run_cli(args).await
}

/// `flashgate cmd… --admin URL --token T [more…]`.
async fn cli(url: &str, cmd: &[&str]) -> (i32, String, String) {
    let mut args: Vec<&str> = cmd.to_vec();
    args.extend(["--admin", url, "--token", ADMIN_TOKEN]);
    flashgate(&args).await
}

/// `flashgate cmd… --admin URL --token T --json`: the raw JSON answer.
async fn cli_json(url: &str, cmd: &[&str]) -> (i32, String, String) {
    let mut args: Vec<&str> = cmd.to_vec();
    args.extend(["--admin", url, "--token", ADMIN_TOKEN, "--json"]);
    flashgate(&args).await
}

/// The one JSON answer a `--json` command printed.
fn json_line(stdout: &str) -> Value {
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_and_sale_commands() {
    bounded(async {
        let backend = shop().await;
        let fg = start(&backend.url(), &memory()).await;
        let url = fg.admin_url();
        // The raw JSON answers (`--json`); without it the CLI prints for people
        // (`human_output_by_default_json_on_request` below).
        let (code, out, err) = cli_json(&url, &["stock", "set", "cli-1", "5"]).await;
        assert_eq!(
            (code, json_line(&out)),
            (0, json!({"sku": "cli-1", "stock": 5})),
            "{err}"
        );
        let (code, out, err) = cli_json(&url, &["stock", "get", "cli-1"]).await;
        assert_eq!(
            (code, json_line(&out)),
            (0, json!({"sku": "cli-1", "stock": 5})),
            "{err}"
        );
        let (code, out, err) = cli_json(&url, &["stock", "add", "cli-1", "-2"]).await;
        assert_eq!(
            (code, json_line(&out)),
            (0, json!({"sku": "cli-1", "stock": 3})),
            "{err}"
        );
        assert_eq!(
            stock(&fg, "cli-1").await,
            3,
            "the CLI changed the running instance"
        );

        // A sale happens; `sale status` reports it.
        let a = buy(&client(), &fg, "cli-1", "alice").await;
        assert_eq!(a.status, 200, "{}", a.text());
        status_until(&fg, "cli-1", |s| s["units"]["sold"] == 1).await;
        let (code, out, err) = cli_json(&url, &["sale", "status", "cli-1"]).await;
        assert_eq!(code, 0, "{err}");
        assert_eq!(
            json_line(&out),
            json!({
                "sku": "cli-1", "stock": 2, "added": 3, "closed": false, "buyers": 1,
                "reservations": counts(0, 1, 0, 0), "units": counts(0, 1, 0, 0),
            })
        );

        // Failures exit 1 with the reason on stderr, and change nothing.
        let (code, out, err) = cli(&url, &["stock", "get", "never-set"]).await;
        assert_eq!(code, 1);
        assert!(
            out.is_empty() && err.contains("404") && err.contains("not_configured"),
            "{err}"
        );
        let (code, _, err) = cli(&url, &["stock", "add", "cli-1", "-10"]).await;
        assert_eq!(code, 1);
        assert!(err.contains("400") && err.contains("negative"), "{err}");
        let (code, out, err) = flashgate(&[
            "stock",
            "set",
            "cli-1",
            "100",
            "--admin",
            &url,
            "--token",
            "wrong-token",
        ])
        .await;
        assert_eq!(code, 1);
        assert!(
            out.is_empty() && err.contains("401") && err.contains("unauthenticated"),
            "{err}"
        );
        let (code, _, err) = flashgate(&["stock", "get", "cli-1", "--admin", &url]).await;
        assert_eq!(code, 1);
        assert!(err.contains("no admin token"), "{err}");
        assert_eq!(stock(&fg, "cli-1").await, 2);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn human_output_by_default_json_on_request() {
    bounded(async {
        let backend = shop().await;
        let fg = start(&backend.url(), &memory()).await;
        let url = fg.admin_url();

        let (code, out, err) = cli(&url, &["stock", "set", "tee-42", "5"]).await;
        assert_eq!((code, out.trim()), (0, "tee-42: stock set to 5"), "{err}");
        let (code, out, err) = cli(&url, &["stock", "add", "tee-42", "-2"]).await;
        assert_eq!((code, out.trim()), (0, "tee-42: stock 3 (-2)"), "{err}");
        let (code, out, err) = cli(&url, &["stock", "get", "tee-42"]).await;
        assert_eq!((code, out.trim()), (0, "tee-42: 3 units left"), "{err}");
        let (code, out, err) = cli(&url, &["stock", "set", "tee-42", "4", "--expect", "3"]).await;
        assert_eq!(
            (code, out.trim()),
            (0, "tee-42: stock set to 4 (was 3)"),
            "{err}"
        );

        // Compare-and-set lost: the current value is printed, nothing changes, exit 1.
        let (code, out, err) = cli(&url, &["stock", "set", "tee-42", "9", "--expect", "3"]).await;
        assert_eq!(code, 1);
        assert!(out.is_empty(), "{out}");
        assert!(
            err.contains("stock changed: it is 4, not 3; nothing was set"),
            "{err}"
        );
        let (code, out, _) = cli(
            &url,
            &["stock", "set", "tee-42", "9", "--expect", "3", "--json"],
        )
        .await;
        assert_eq!(code, 1);
        let v: Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(
            (&v["error"], &v["stock"]),
            (&json!("stock_changed"), &json!(4))
        );

        let (code, out, err) = cli(&url, &["sale", "close", "tee-42"]).await;
        assert_eq!(code, 0, "{err}");
        assert!(out.starts_with("tee-42: sale closed"), "{out}");
        let a = buy(&client(), &fg, "tee-42", "alice").await;
        assert_eq!(a.status.as_u16(), 410, "{}", a.text());
        assert_eq!(a.json()["error"], "closed", "{}", a.text());
        let (code, out, err) = cli(&url, &["sale", "status", "tee-42"]).await;
        assert_eq!(code, 0, "{err}");
        let lines: Vec<&str> = out.lines().map(str::trim).collect();
        assert_eq!(
            lines,
            [
                "sale tee-42: closed",
                "stock         4",
                "added         4",
                "buyers        0",
                "units         held 0, sold 0, released 0, uncertain 0",
                "reservations  held 0, sold 0, released 0, uncertain 0",
                "audit         ok: added 4 = stock 4 + held 0 + sold 0 + uncertain 0",
            ],
            "{out}"
        );
        let (code, out, err) = cli(&url, &["sale", "open", "tee-42"]).await;
        assert_eq!((code, out.trim()), (0, "tee-42: sale open"), "{err}");
        assert_eq!(buy(&client(), &fg, "tee-42", "alice").await.status, 200);

        let (code, out, err) = cli(&url, &["sale", "status", "tee-42", "--json"]).await;
        assert_eq!(code, 0, "{err}");
        let v: Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!((&v["added"], &v["closed"]), (&json!(4), &json!(false)));

        // An error, for people: status, reason, message.
        let (code, out, err) = cli(&url, &["stock", "add", "tee-42", "-10"]).await;
        assert_eq!(code, 1);
        assert!(out.is_empty(), "{out}");
        assert!(
            err.contains("400") && err.contains("bad_request") && err.contains("negative"),
            "{err}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_past_the_cap_and_bad_skus_are_refused_before_sending() {
    bounded(async {
        // Nothing listens here: a refusal that is not about the connection was decided
        // before anything was sent.
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            l.local_addr().unwrap().port()
        };
        let url = format!("http://127.0.0.1:{port}");
        for args in [
            &["stock", "set", "sku-1", "9007199254740992"][..],
            &["stock", "set", "sku-1", "-1"],
            &["stock", "set", "sku-1", "5", "--expect", "9007199254740992"],
            &["stock", "add", "sku-1", "9007199254740992"],
            &["stock", "add", "sku-1", "-9007199254740992"],
        ] {
            let (code, _, err) = cli(&url, args).await;
            // clap's usage error (exit 2): `invalid value … not in 0..=9007199254740991`,
            // or `-1` not taken as a value at all.
            assert_eq!(code, 2, "{args:?}: {err}");
            assert!(
                err.contains("9007199254740991") || err.contains("'-1'"),
                "{args:?}: {err}"
            );
        }
        for sku in ["a b", "a/b", "x{y}", ""] {
            let (code, _, err) = cli(&url, &["stock", "get", sku]).await;
            assert_eq!(code, 1, "{sku:?}: {err}");
            assert!(err.contains("invalid SKU"), "{sku:?}: {err}");
            assert!(!err.contains("refused"), "{sku:?}: {err}");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_from_something_else_is_refused() {
    bounded(async {
        // A plain HTTP server that answers 200 to anything: the classic wrong port.
        let other = Backend::start(|_req| async {
            let mut r = json_response(StatusCode::OK, r#"{"ok":true}"#);
            r.headers_mut().insert(
                "server",
                http::HeaderValue::from_static("not-flashgate/1.0"),
            );
            r
        })
        .await;
        let (code, out, err) = cli(&other.url(), &["stock", "set", "tee-42", "5"]).await;
        assert_eq!(code, 1, "{out}");
        assert!(out.is_empty(), "{out}");
        assert!(
            err.contains("not flashgate's admin API")
                && err.contains("200")
                && err.contains("not-flashgate/1.0")
                && err.contains("--admin"),
            "{err}"
        );
        // Even with --json, nothing from it is passed off as an answer.
        let (code, out, _) = cli(&other.url(), &["stock", "get", "tee-42", "--json"]).await;
        assert_eq!((code, out.as_str()), (1, ""));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connection_names_the_address() {
    bounded(async {
        let addr = {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            l.local_addr().unwrap()
        };
        let (code, out, err) = cli(&format!("http://{addr}"), &["sale", "status", "tee-42"]).await;
        assert_eq!(code, 1);
        assert!(out.is_empty(), "{out}");
        assert!(
            err.contains("connection refused")
                && err.contains(&addr.to_string())
                && err.contains("admin.listen")
                && err.contains("--admin"),
            "{err}"
        );
        let (code, _, err) = cli("127.0.0.1:9", &["stock", "get", "tee-42"]).await;
        assert_eq!(code, 1);
        assert!(err.contains("http://host:port"), "{err}");
    })
    .await;
}
