//! `flashgate check --config FILE`, run as the real binary, the way an operator runs it minutes
//! before a sale: a bad file exits 1 with one line saying `file:line:col: key: what is wrong`;
//! a good file exits 0 and prints the compiled routes.
//!
//! `tests/fixtures/bad_*.yaml` holds one file per validation rule; every file there must have
//! an expectation below.

use std::collections::BTreeSet;
use std::process::{Command, Output};

/// Runs the binary from the crate root, so paths print as `tests/fixtures/...`.
fn flashgate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flashgate"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("RUST_LOG")
        .output()
        .expect("run flashgate")
}

fn check(path: &str) -> Output {
    flashgate(&["check", "--config", path])
}

/// `check` on a good file: asserts exit 0; stdout and stderr.
fn check_ok(path: &str) -> (String, String) {
    let out = check(path);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    (stdout, stderr)
}

/// A refused run: asserts exit 1 and a stderr starting with `prefix`; the stderr.
fn assert_refused(out: &Output, prefix: &str) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr.starts_with(prefix), "{stderr}");
    stderr
}

/// (fixture name, line the error is reported at, fragments the message must contain).
/// Line 0 means the error carries no location and prints as `file: key: message`.
const BAD: &[(&str, u64, &[&str])] = &[
    (
        "room_zero_active",
        6,
        &[
            "routes[0].waiting_room.total_active: ",
            "must be at least 1",
        ],
    ),
    (
        "room_key_unset",
        8,
        &[
            "routes[0].waiting_room.key_env: ",
            "environment variable FLASHGATE_TEST_UNSET_ROOM_KEY is not set",
        ],
    ),
    (
        "room_prequeue_without_start",
        8,
        &["routes[0].waiting_room.prequeue_from: ", "needs the start"],
    ),
    (
        "room_prequeue_after_start",
        8,
        &[
            "routes[0].waiting_room.prequeue_from: ",
            "must be before the start",
        ],
    ),
    (
        "room_queueing",
        8,
        &[
            "routes[0].waiting_room.queueing: ",
            "unknown variant `lottery`",
        ],
    ),
    (
        "room_session",
        8,
        &[
            "routes[0].waiting_room.session_duration: ",
            "between 1s and 7 days",
        ],
    ),
    (
        "room_status",
        8,
        &["routes[0].waiting_room.json_status: ", "not 204 or 304"],
    ),
    (
        "room_opens_at_alone",
        8,
        &[
            "routes[0].waiting_room.opens_at: ",
            "set `prequeue_from` too",
        ],
    ),
    (
        "room_cookie_name",
        8,
        &["routes[0].waiting_room.cookie: ", "a cookie name"],
    ),
    (
        "room_page_template",
        8,
        &["routes[0].waiting_room.page_template: ", "cannot read"],
    ),
    ("yaml_syntax", 5, &["routes[0].match: ", "unclosed bracket"]),
    (
        "unknown_top_key",
        3,
        &["upstreams: ", "unknown field `upstreams`"],
    ),
    (
        "unknown_nested_key",
        4,
        &["server.header_timeout: ", "unknown field `header_timeout`"],
    ),
    ("duplicate_key", 3, &["duplicate mapping key: listen"]),
    (
        "quantity_past_2_53",
        8,
        &["routes[0].sale.quantity: ", "9007199254740992 is too large"],
    ),
    (
        "per_user_limit_past_2_53",
        8,
        &[
            "routes[0].sale.per_user_limit: ",
            "from 1 to 4294967295, got 9007199254740992",
        ],
    ),
    (
        "duration",
        3,
        &["upstream.request_timeout: ", "invalid duration `soon`"],
    ),
    (
        "zero_rate",
        6,
        &["routes[0].limits.route.per_second: ", "nonzero"],
    ),
    (
        "rate_both",
        6,
        &[
            "routes[0].limits.route: ",
            "set exactly one of `per_second` or `per_minute`",
        ],
    ),
    (
        "rate_neither",
        6,
        &[
            "routes[0].limits.per_ip: ",
            "set exactly one of `per_second` or `per_minute`",
        ],
    ),
    (
        "zero_burst",
        6,
        &["routes[0].limits.route.burst: ", "nonzero"],
    ),
    (
        "path_template",
        4,
        &[
            "routes[0].match.path: ",
            "invalid path template `/api/{sku`",
        ],
    ),
    (
        "method",
        4,
        &["routes[0].match.method[1]: ", "invalid HTTP method `PO ST`"],
    ),
    (
        "upstream_scheme",
        2,
        &["upstream.url: ", "only http:// is supported"],
    ),
    (
        "redis_tls",
        3,
        &["store.tls: ", "needs a `rediss://` URL in `store.redis`"],
    ),
    (
        "cluster_and_redis",
        3,
        &[
            "store.cluster: ",
            "either `redis` (one server) or `cluster`",
        ],
    ),
    (
        "cluster_seed",
        3,
        &["store.cluster[1]: ", "mixes redis:// and rediss://"],
    ),
    (
        "key_prefix_brace",
        3,
        &["store.key_prefix: ", "must not contain `{` or `}`"],
    ),
    // Reported at the last key of the top-level mapping (line 2), where the parser noticed
    // the field was missing; the message is what matters here.
    ("missing_upstream", 2, &["missing field `upstream`"]),
    (
        "duplicate_route",
        5,
        &["routes[1].name: ", "duplicate route name `api`"],
    ),
    (
        "empty_route_name",
        3,
        &["routes[0].name: ", "must not be empty"],
    ),
    (
        "per_user_without_identity",
        6,
        &["routes[0].limits.per_user: ", "needs an `identity`"],
    ),
    (
        "identity_both",
        5,
        &[
            "routes[0].identity: ",
            "set exactly one of `header`, `cookie` or `jwt`",
        ],
    ),
    (
        "identity_none",
        5,
        &[
            "routes[0].identity: ",
            "set exactly one of `header`, `cookie` or `jwt`",
        ],
    ),
    (
        "jwt_and_header",
        6,
        &[
            "routes[0].identity: ",
            "set exactly one of `header`, `cookie` or `jwt`",
        ],
    ),
    // JWT identity: each rule of `identity.jwt`, at its own key.
    (
        "jwt_alg_none",
        8,
        &[
            "routes[0].identity.jwt.algorithms[1]: ",
            "`none` is never accepted",
        ],
    ),
    (
        "jwt_mixed_algorithms",
        8,
        &[
            "routes[0].identity.jwt.algorithms: ",
            "do not mix HMAC (HS*) with public-key algorithms",
        ],
    ),
    (
        "jwt_no_algorithms",
        8,
        &[
            "routes[0].identity.jwt.algorithms: ",
            "list at least one algorithm",
        ],
    ),
    (
        "jwt_two_key_sources",
        7,
        &[
            "routes[0].identity.jwt: ",
            "set exactly one of `jwks_file`, `jwks_url` or `secret_env`",
        ],
    ),
    // A relative `jwks_file` is read beside the config file.
    (
        "jwt_jwks_file_missing",
        7,
        &[
            "routes[0].identity.jwt.jwks_file: ",
            "cannot read tests/fixtures/no_such_jwks.json",
        ],
    ),
    (
        "jwt_jwks_no_usable_key",
        7,
        &[
            "routes[0].identity.jwt.jwks_file: ",
            "tests/fixtures/jwks_ec_only.json: no usable key for algorithms [RS256]",
        ],
    ),
    (
        "jwt_https_url",
        7,
        &[
            "routes[0].identity.jwt.jwks_url: ",
            "only http:// is supported",
        ],
    ),
    // A key set (file or URL) holds public keys: HS* is refused with either.
    (
        "jwt_hmac_key_file",
        8,
        &[
            "routes[0].identity.jwt.algorithms: ",
            "a key set holds public keys",
        ],
    ),
    (
        "jwt_hmac_key_url",
        8,
        &[
            "routes[0].identity.jwt.algorithms: ",
            "a key set holds public keys",
        ],
    ),
    (
        "jwt_secret_for_rs256",
        8,
        &[
            "routes[0].identity.jwt.algorithms: ",
            "a secret verifies HS256, HS384 or HS512 only",
        ],
    ),
    (
        "jwt_secret_unset",
        7,
        &[
            "routes[0].identity.jwt.secret_env: ",
            "environment variable FLASHGATE_TEST_UNSET_SECRET is not set",
        ],
    ),
    (
        "jwt_min_refresh",
        9,
        &[
            "routes[0].identity.jwt.min_refresh: ",
            "must be at least 1s",
        ],
    ),
    (
        "jwt_refresh_without_url",
        9,
        &[
            "routes[0].identity.jwt.refresh: ",
            "applies to `jwks_url` only",
        ],
    ),
    (
        "jwt_leeway",
        9,
        &["routes[0].identity.jwt.leeway: ", "at most 300s"],
    ),
    (
        "header_name",
        5,
        &[
            "routes[0].identity.header: ",
            "invalid header name `X User`",
        ],
    ),
    (
        "trusted_proxy",
        4,
        &[
            "trusted_proxies[1]: ",
            "invalid address or CIDR `300.1.2.3`",
        ],
    ),
    (
        "size",
        3,
        &["server.max_uri_bytes: ", "unknown size unit `parsecs`"],
    ),
    (
        "max_header_bytes",
        3,
        &["server.max_header_bytes: ", "must be at least 8192 bytes"],
    ),
    ("health_path", 2, &["health_path: ", "must start with `/`"]),
    ("listen", 1, &["listen: ", "invalid socket address"]),
    ("unmatched", 2, &["unmatched: ", "unknown variant `reject`"]),
    (
        "scope",
        6,
        &[
            "routes[0].limits.route.scope: ",
            "unknown variant `everywhere`, expected one of local, global",
        ],
    ),
    (
        "on_store_error",
        8,
        &[
            "routes[0].limits.per_user.on_store_error: ",
            "unknown variant `fail`, expected one of closed, open",
        ],
    ),
    (
        "on_store_error_local",
        7,
        &[
            "routes[0].limits.per_ip.on_store_error: ",
            "applies to `scope: global` only",
        ],
    ),
    (
        "zero_in_flight",
        5,
        &["routes[0].limits.in_flight: ", "nonzero"],
    ),
    // A route above a sale route that takes some of its buys (first match wins): reported at
    // the earlier route, naming both routes, both lines and an example request.
    (
        "shadowed_sale_route",
        4,
        &[
            "routes[0]: route \"everything-else\" (line 4) is listed before sale route \"flash-buy\" (line 6)",
            "(e.g. POST /api/flash/x/buy)",
            "every such buy would reach the backend unguarded; move the sale route up",
        ],
    ),
    // No `method` means every method; the GET-only route before it is fine.
    (
        "shadowed_by_method",
        7,
        &[
            "routes[1]: route \"vip-legacy\" (line 7) is listed before sale route \"flash-buy\" (line 9)",
            "(e.g. POST /api/flash/vip-x/buy)",
        ],
    ),
    (
        "shadowed_by_sale_route",
        3,
        &[
            "routes[0]: sale route \"any-action\" (line 3) is listed before sale route \"flash-buy\" (line 7)",
            "(e.g. POST /api/flash/x/buy)",
            "admitted by the rules of \"any-action\"",
        ],
    ),
    (
        "stock_events_no_sku",
        9,
        &["routes[0].sale.stock_events: ", "has no `{sku}`"],
    ),
    // A stream path another route matches: reported at the sale route, naming both.
    (
        "stock_events_shared",
        3,
        &[
            "routes[0].sale.stock_events: stock stream `/api/flash/{sku}/events` (line 3) and route \"item-pages\" (line 8)",
            "e.g. /api/flash/x/events",
            "only a catch-all route",
        ],
    ),
];

#[test]
fn every_bad_fixture_fails_with_its_location_and_reason() {
    let mut failures = Vec::new();
    for (name, line, fragments) in BAD {
        let path = format!("tests/fixtures/bad_{name}.yaml");
        let out = check(&path);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let prefix = if *line == 0 {
            format!("{path}: ")
        } else {
            format!("{path}:{line}:")
        };
        let ok = out.status.code() == Some(1)
            && out.stdout.is_empty()
            && stderr.starts_with(&prefix)
            && stderr.lines().count() == 1
            && fragments.iter().all(|f| stderr.contains(f));
        if !ok {
            failures.push(format!(
                "{path}: exit {:?}, expected `{prefix}` + {fragments:?}, got: {stderr}",
                out.status.code()
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn every_fixture_has_an_expectation() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
    let on_disk: BTreeSet<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("bad_"))
        .collect();
    let expected: BTreeSet<String> = BAD
        .iter()
        .map(|(name, _, _)| format!("bad_{name}.yaml"))
        .collect();
    assert_eq!(on_disk, expected);
}

#[test]
fn example_config_checks_ok_and_lists_routes() {
    let (stdout, stderr) = check_ok("config/flashgate.yaml");
    assert!(stderr.is_empty(), "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], "config/flashgate.yaml: ok");
    assert!(lines[1].starts_with("listen 127.0.0.1:8080 -> upstream http://127.0.0.1:3000"));
    assert_eq!(
        lines[2..],
        [
            "store: embedded memory (one instance only)",
            "admin: on, listen 127.0.0.1:9090, token from $FLASHGATE_ADMIN_TOKEN (off while it is unset)",
            "trusted_proxies: 127.0.0.1/32",
            "routes (first match wins):",
            "  1. flash-buy POST /api/flash/{sku}/buy identity=header:x-user-id \
             route=5000/s burst 1000 per_ip=50/s burst 100 per_user=2/s burst 2 in_flight=2000",
            "       sale: sku from path_param `sku`",
            "       quantity: 1",
            "       per_user_limit: 1",
            "       window: start (none), end (none)",
            "       release_on: connect_error (always), 503",
            "       sold_out_recheck: 1s",
            "       stock_events: GET /api/flash/{sku}/events (server-sent events)",
            "       max_body: 16384 bytes (body not read)",
            "  2. everything-else * /{*rest}",
            "unmatched: proxy",
        ]
    );
}

/// A config whose sale route comes after a route with other methods on its path and before the
/// catch-all is fine: nothing above it can take a buy.
#[test]
fn routes_that_cannot_take_a_buy_may_precede_the_sale_route() {
    let (stdout, _) = check_ok("tests/fixtures/ok_sale_route_order.yaml");
    assert!(
        stdout.contains("  3. flash-buy POST /api/flash/{sku}/buy"),
        "{stdout}"
    );
}

/// `check` shows what will run with secrets hidden: a Redis store with its password masked,
/// admin off, and a sale route's every setting (SKU and quantity sources, window, release).
#[test]
fn check_prints_store_admin_and_sale_settings() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sale.yaml");
    std::fs::write(
        &path,
        "upstream: { url: \"http://127.0.0.1:3000\" }\n\
         store: { redis: \"redis://:hunter2@10.0.0.5:6379/0\", key_prefix: shop }\n\
         trusted_proxies: [10.0.0.0/8, 192.168.1.1]\n\
         unmatched: not_found\n\
         routes:\n\
         \x20 - name: order\n\
         \x20   match: { method: POST, path: /api/order }\n\
         \x20   identity: { cookie: uid }\n\
         \x20   limits: { per_user: { per_minute: 6, burst: 2 }, in_flight: 50 }\n\
         \x20   sale:\n\
         \x20     sku: { json: sku }\n\
         \x20     quantity: { header: x-qty }\n\
         \x20     per_user_limit: 2\n\
         \x20     start: 2026-11-27T09:00:00Z\n\
         \x20     end: 2026-11-27T10:00:00Z\n\
         \x20     release_on: [502, 503]\n\
         \x20     sold_out_recheck: 500ms\n\
         \x20     max_body: 4KiB\n",
    )
    .unwrap();
    let (stdout, _) = check_ok(path.to_str().unwrap());
    assert!(!stdout.contains("hunter2"), "the password leaked: {stdout}");
    let lines: Vec<&str> = stdout.lines().skip(2).collect();
    assert_eq!(
        lines,
        [
            "store: redis redis://:****@10.0.0.5:6379/0 (connections 4, response_timeout 250ms, key_prefix shop)",
            "admin: off",
            "trusted_proxies: 10.0.0.0/8, 192.168.1.1/32",
            "routes (first match wins):",
            "  1. order POST /api/order identity=cookie:uid per_user=6/min burst 2 in_flight=50",
            "       sale: sku from json field `sku`",
            "       quantity: from header `x-qty`",
            "       per_user_limit: 2",
            "       window: start 2026-11-27T09:00:00Z, end 2026-11-27T10:00:00Z",
            "       release_on: connect_error (always), 502, 503",
            "       sold_out_recheck: 500ms",
            "       max_body: 4096 bytes (read for the JSON field)",
            "unmatched: not_found",
        ]
    );
}

/// `check` describes a JWT identity: where the token is read, the keys (a file's key ids and
/// families, a URL's fetch policy), the checks and the limits.
#[test]
fn check_describes_jwt_identities() {
    let out = check("tests/fixtures/ok_jwt.yaml");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        "  1. flash-buy POST /api/flash/{sku}/buy identity=jwt",
        "       jwt: token from header `Authorization: Bearer`, user from claim `sub`",
        "       jwt keys: file tests/fixtures/jwks.json (2 key(s): fixture-rsa Rsa RS256, fixture-ec Ec; re-read on reload)",
        "       jwt checks: alg in [RS256, ES256], exp required, nbf, iss https://auth.example.com, aud shop, leeway 10s",
        "       jwt limits: token at most 8192 bytes, cache 10000 tokens",
        "  2. account * /account/{*rest} identity=jwt",
        "       jwt: token from cookie `session`, user from claim `uid`",
        "       jwt keys: fetched from http://127.0.0.1:9/.well-known/jwks.json (refresh 10m, at most one fetch per 1m; 503 until the first succeeds)",
        "       jwt checks: alg in [ES256], exp required, nbf, iss (not checked), aud (not checked), leeway 30s",
        "       jwt limits: token at most 8192 bytes, cache off",
    ] {
        assert!(
            stdout.lines().any(|l| l == line),
            "missing `{line}` in\n{stdout}"
        );
    }
}

#[test]
fn missing_file_exits_1_with_a_clear_message() {
    let stderr = assert_refused(
        &check("tests/fixtures/no_such_file.yaml"),
        "tests/fixtures/no_such_file.yaml: cannot read config: ",
    );
    assert!(stderr.contains("No such file or directory"), "{stderr}");
}

#[test]
fn serve_refuses_a_bad_config_with_the_same_message() {
    for (fixture, prefix) in [
        ("bad_rate_both", "tests/fixtures/bad_rate_both.yaml:6:"),
        (
            "bad_shadowed_sale_route",
            "tests/fixtures/bad_shadowed_sale_route.yaml:4:5: routes[0]: ",
        ),
    ] {
        let path = format!("tests/fixtures/{fixture}.yaml");
        assert_refused(&flashgate(&["serve", "--config", &path]), prefix);
    }
}

/// `serve` refuses a port something already listens on, instead of sharing it through
/// SO_REUSEPORT (which would silently split the traffic between two servers).
#[test]
fn serve_refuses_a_port_already_in_use() {
    // Listening with SO_REUSEPORT, as another flashgate would: a reuseport bind alone would
    // succeed and share the port.
    let taken = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    taken.set_reuse_port(true).unwrap();
    taken
        .bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    taken.listen(16).unwrap();
    let addr = taken.local_addr().unwrap().as_socket().unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_flashgate"))
        .args([
            "serve",
            "--config",
            "config/flashgate.yaml",
            "--listen",
            &addr.to_string(),
        ])
        .env("RUST_LOG", "error")
        .env_remove("FLASHGATE_ADMIN_TOKEN")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("flashgate started on a port another server listens on");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(1));
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(stderr.contains("is another server running?"), "{stderr}");
    drop(taken);
}

/// A waiting room is described by `check`; its key (from the environment) is never printed.
#[test]
fn a_waiting_room_is_described_and_its_key_never_printed() {
    let key = "a-room-key-that-must-never-be-printed-0123";
    let out = Command::new(env!("CARGO_BIN_EXE_flashgate"))
        .args(["check", "--config", "tests/fixtures/ok_room.yaml"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("RUST_LOG")
        .env("FLASHGATE_TEST_OK_ROOM_KEY", key)
        .output()
        .expect("run flashgate");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stdout.contains("waiting_room: 500 at once, 300 per minute, sessions of 5m, fifo"),
        "{stdout}"
    );
    assert!(
        stdout.contains("pre-queue: 2026-12-24T09:45:00Z to 2026-12-24T10:00:00Z"),
        "{stdout}"
    );
    assert!(!stdout.contains(key) && !stderr.contains(key));
    // Too short a key is refused, naming the variable.
    let out = Command::new(env!("CARGO_BIN_EXE_flashgate"))
        .args(["check", "--config", "tests/fixtures/ok_room.yaml"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("FLASHGATE_TEST_OK_ROOM_KEY", "short")
        .output()
        .expect("run flashgate");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr.contains("routes[0].waiting_room.key_env: environment variable FLASHGATE_TEST_OK_ROOM_KEY holds 5 bytes"), "{stderr}");
}
