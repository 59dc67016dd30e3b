//! The bypass matrix (issue 9): every spelling of a buy request we know of, sent as raw bytes
//! through flashgate in front of REAL routers of several frameworks, and straight to each
//! router too, so the table shows what each framework would have bought on its own.
//!
//! flashgate's config has four sale routes, one per SKU source, and a proxied catch-all:
//!
//! | route | SKU / quantity from | backend handler |
//! |---|---|---|
//! | `POST /api/flash/{sku}/buy` | path parameter / fixed 1 | path param |
//! | `POST /api/flash-q/buy` | `?sku=` / `?quantity=` | the framework's query parser |
//! | `POST /api/flash-h/buy` | `X-Sku` / `X-Qty` | the framework's header lookup |
//! | `POST /api/flash-j/buy` | JSON `sku` / `quantity` | the framework's JSON binding |
//!
//! Two kinds of variant:
//! - **bypass** variants name SKU `tee`, whose stock is 0: every honest request gets 410, so
//!   any of them reaching a buy handler got past admission. Must be zero per framework.
//! - **differential** variants name SKU `gold` (in stock): when one is admitted, the SKU and
//!   quantity the framework parses itself must equal the `X-Flashgate-Sku` /
//!   `X-Flashgate-Quantity` flashgate set, and the reservation must be flashgate's (never a
//!   client's spoofed `X-Flashgate-Reservation`). Must be zero too.
//!
//! Each backend is a few lines under `tests/bypass/`, started here on 127.0.0.1:0; it records
//! every buy-handler hit and hands the records over on `GET /__seen`. The Go backends always
//! run (the test fails without `go`); the others are skipped with a printed reason when
//! their runtime is missing (`.ci/run` installs them).
mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::raw::{self, RawResponse};
use support::{ADMIN_TOKEN, Flashgate, client, send};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Stock 0: no request for it may ever reach a buy handler.
const BYPASS_SKU: &str = "tee";
/// In stock: admitted requests for it reach the backend, which must read what flashgate read.
const GOLD_SKU: &str = "gold";
/// Bound on one raw exchange.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on a backend's build and start (javac and a cold `go build` of Gin take seconds).
const START_TIMEOUT: Duration = Duration::from_secs(120);
/// A backend's build (`go build`, `javac`): a first build on a cold cache, on a loaded
/// 2-core machine, has taken over two minutes.
const BUILD_TIMEOUT: Duration = Duration::from_secs(600);

fn bypass_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/bypass")
}

// ---------------------------------------------------------------------------
// Variants

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Bypass,
    Differential,
}

/// The backend route a variant is aimed at (the one flashgate would admit it for).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RouteKind {
    Path,
    Query,
    Header,
    Json,
}

impl RouteKind {
    fn name(self) -> &'static str {
        match self {
            RouteKind::Path => "path",
            RouteKind::Query => "query",
            RouteKind::Header => "header",
            RouteKind::Json => "json",
        }
    }

    /// The path's segments for `sku`.
    fn segments(self, sku: &str) -> Vec<String> {
        let segs: &[&str] = match self {
            RouteKind::Path => &["api", "flash", sku, "buy"],
            RouteKind::Query => &["api", "flash-q", "buy"],
            RouteKind::Header => &["api", "flash-h", "buy"],
            RouteKind::Json => &["api", "flash-j", "buy"],
        };
        segs.iter().map(|s| (*s).to_owned()).collect()
    }
}

/// One request, kept as parts and rendered to bytes per target (the `Host` header and an
/// absolute-form target name the address it is sent to: `{AUTH}` in `target`).
#[derive(Debug, Clone)]
struct Variant {
    name: String,
    kind: Kind,
    route: RouteKind,
    method: String,
    target: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// The body is already framed (a `Transfer-Encoding` header is among `headers`).
    framed: bool,
}

impl Variant {
    /// A request for `route` as an honest client sends it, with `sku` in the route's source.
    fn honest(kind: Kind, route: RouteKind, sku: &str) -> Variant {
        let path = format!("/{}", route.segments(sku).join("/"));
        let mut v = Variant {
            name: String::new(),
            kind,
            route,
            method: "POST".into(),
            target: path,
            headers: Vec::new(),
            body: Vec::new(),
            framed: false,
        };
        v.add_source(sku, "1");
        v
    }

    /// The SKU and quantity in the route's non-path source.
    fn add_source(&mut self, sku: &str, qty: &str) {
        match self.route {
            RouteKind::Path => {}
            RouteKind::Query => self.target.push_str(&format!("?sku={sku}&quantity={qty}")),
            RouteKind::Header => {
                self.headers.push(("X-Sku".into(), sku.into()));
                self.headers.push(("X-Qty".into(), qty.into()));
            }
            RouteKind::Json => {
                self.headers
                    .push(("Content-Type".into(), "application/json".into()));
                self.body = format!(r#"{{"sku":"{sku}","quantity":{qty}}}"#).into_bytes();
            }
        }
    }

    fn named(mut self, name: impl Into<String>) -> Variant {
        self.name = format!("{} {}", self.route.name(), name.into());
        self
    }

    fn method(mut self, m: &str) -> Variant {
        self.method = m.into();
        self
    }

    fn target(mut self, t: impl Into<String>) -> Variant {
        self.target = t.into();
        self
    }

    fn header(mut self, k: &str, v: &str) -> Variant {
        self.headers.push((k.into(), v.into()));
        self
    }

    fn body(mut self, content_type: &str, body: impl Into<Vec<u8>>) -> Variant {
        self.headers
            .retain(|(k, _)| !k.eq_ignore_ascii_case("content-type"));
        self.headers
            .push(("Content-Type".into(), content_type.into()));
        self.body = body.into();
        self
    }

    fn render(&self, addr: SocketAddr, user: &str) -> Vec<u8> {
        let auth = addr.to_string();
        let mut out = format!(
            "{} {} HTTP/1.1\r\nHost: {auth}\r\nX-User-Id: {user}\r\n",
            self.method,
            self.target.replace("{AUTH}", &auth)
        );
        for (k, v) in &self.headers {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
        if !self.framed {
            out.push_str(&format!("Content-Length: {}\r\n", self.body.len()));
        }
        out.push_str("Connection: close\r\n\r\n");
        let mut bytes = out.into_bytes();
        bytes.extend_from_slice(&self.body);
        bytes
    }

    /// The request bytes as a readable string (for failure messages).
    fn show(&self, addr: SocketAddr) -> String {
        format!(
            "{:?}",
            String::from_utf8_lossy(&self.render(addr, "u-shown"))
        )
    }
}

/// Spellings of the path `/{segs}`: per segment, between segments, before, after.
fn path_spellings(segs: &[String]) -> Vec<(String, String)> {
    let join = |s: &[String]| format!("/{}", s.join("/"));
    let mut out = vec![("exact".to_owned(), join(segs))];
    let capitalize = |s: &str| {
        let mut c = s.chars();
        c.next()
            .map(|f| f.to_uppercase().chain(c).collect())
            .unwrap_or_default()
    };
    for (i, seg) in segs.iter().enumerate() {
        let first = seg.as_bytes()[0];
        let forms: Vec<(&str, String)> = vec![
            (";x=1", format!("{seg};x=1")),
            (";", format!("{seg};")),
            (";jsessionid", format!("{seg};jsessionid=x")),
            ("upper", seg.to_uppercase()),
            ("capitalized", capitalize(seg)),
            ("trailing .", format!("{seg}.")),
            ("trailing %2e", format!("{seg}%2e")),
            ("trailing %20", format!("{seg}%20")),
            ("leading %20", format!("%20{seg}")),
            ("trailing %00", format!("{seg}%00")),
            ("trailing %09", format!("{seg}%09")),
            ("trailing %0a", format!("{seg}%0a")),
            ("first letter %XX", format!("%{first:02X}{}", &seg[1..])),
            ("first letter %xx", format!("%{first:02x}{}", &seg[1..])),
        ];
        for (label, form) in forms {
            let mut s = segs.to_vec();
            s[i] = form;
            out.push((format!("seg{i} {label}"), join(&s)));
        }
    }
    let seps = [
        "%2F",
        "%2f",
        "%5C",
        "%5c",
        "\\",
        "//",
        "/./",
        "/%2e/",
        "/zz/../",
        "/zz/..;/",
        "/x/%2e%2e/",
        "/x/.%2E/",
        "/;/",
        "%252F",
    ];
    for i in 1..segs.len() {
        for sep in seps {
            let path = format!("/{}{sep}{}", segs[..i].join("/"), segs[i..].join("/"));
            out.push((format!("before seg{i} {sep}"), path));
        }
    }
    for prefix in [
        "//", "/./", "/zz/../", "/zz/..;/", "\\", "/;x=1/", "/%2e/", "%2F", "/%2F",
    ] {
        let rest = segs.join("/");
        let path = format!("{prefix}{rest}");
        let path = if path.starts_with('/') {
            path
        } else {
            format!("/{path}")
        };
        out.push((format!("prefix {prefix}"), path));
    }
    let whole = join(segs);
    for suffix in [
        "/", "//", "/.", "/%2e", "%2F", "%5C", ";", "..", "...", ".json", "%23", "%3F", "~", "%7e",
        "%C0%AF", "%0d%0a", "%20%20", "/..;/", "/x/..", "/x/..;",
    ] {
        out.push((format!("suffix {suffix}"), format!("{whole}{suffix}")));
    }
    out.push(("all upper".into(), whole.to_uppercase()));
    out.push((
        "all capitalized".into(),
        join(&segs.iter().map(|s| capitalize(s)).collect::<Vec<_>>()),
    ));
    out
}

/// Every variant, in a stable order.
fn variants() -> Vec<Variant> {
    use Kind::{Bypass, Differential};
    use RouteKind::*;
    let routes = [Path, Query, Header, Json];
    let mut out: Vec<Variant> = Vec::new();

    // Path spellings, on every route (query string after the spelled path).
    for route in routes {
        let honest = Variant::honest(Bypass, route, BYPASS_SKU);
        let query = honest
            .target
            .split_once('?')
            .map(|(_, q)| format!("?{q}"))
            .unwrap_or_default();
        for (label, path) in path_spellings(&route.segments(BYPASS_SKU)) {
            out.push(
                honest
                    .clone()
                    .target(format!("{path}{query}"))
                    .named(format!("path {label}")),
            );
        }
    }

    // Methods on the exact path, every route.
    let methods = [
        "GET", "HEAD", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "post", "Post", "pOST",
        "PoSt", "put", "FOO", "PROPFIND", "MERGE",
    ];
    for route in routes {
        for m in methods {
            out.push(
                Variant::honest(Bypass, route, BYPASS_SKU)
                    .method(m)
                    .named(format!("method {m}")),
            );
        }
    }
    // Methods combined with a folded path.
    for m in ["post", "Post", "PUT", "GET", "DELETE"] {
        for (label, path) in [
            ("trailing /", "/api/flash/tee/buy/"),
            ("BUY", "/api/flash/tee/BUY"),
            (";x=1", "/api/flash/tee/buy;x=1"),
            ("%62uy", "/api/flash/tee/%62uy"),
            ("//", "//api/flash/tee/buy"),
            ("%2F", "/api/flash/tee%2Fbuy"),
        ] {
            out.push(
                Variant::honest(Bypass, Path, BYPASS_SKU)
                    .method(m)
                    .target(path)
                    .named(format!("method {m} + path {label}")),
            );
        }
    }

    // Method overrides: headers, `_method` in the query, in urlencoded and multipart bodies.
    for route in [Path, Query, Header] {
        let honest = Variant::honest(Bypass, route, BYPASS_SKU);
        for h in [
            "X-HTTP-Method-Override",
            "X-HTTP-Method",
            "X-Method-Override",
            "x-http-method-override",
            "X_HTTP_Method_Override",
        ] {
            for val in ["PUT", "DELETE", "GET", "post"] {
                out.push(
                    honest
                        .clone()
                        .header(h, val)
                        .named(format!("override {h}: {val}")),
                );
            }
            for m in ["GET", "PUT", "post"] {
                out.push(
                    honest
                        .clone()
                        .method(m)
                        .header(h, "POST")
                        .named(format!("method {m} + override {h}: POST")),
                );
            }
        }
        let sep = if honest.target.contains('?') {
            '&'
        } else {
            '?'
        };
        for q in [
            "_method=PUT",
            "_METHOD=PUT",
            "_Method=PATCH",
            "%5Fmethod=PUT",
            "%5fmethod=PUT",
            "_m%65thod=PUT",
            "_method=put",
            "_method=DELETE",
            "_method[]=PUT",
            "_method=PUT;x",
            "x=1;_method=PUT",
        ] {
            out.push(
                honest
                    .clone()
                    .target(format!("{}{sep}{q}", honest.target))
                    .named(format!("override ?{q}")),
            );
            out.push(
                honest
                    .clone()
                    .method("GET")
                    .target(format!(
                        "{}{sep}{}",
                        honest.target,
                        q.replace("PUT", "POST")
                    ))
                    .named(format!(
                        "method GET + override ?{}",
                        q.replace("PUT", "POST")
                    )),
            );
        }
        for (label, body) in [
            ("_method=PUT", "_method=PUT"),
            ("%5Fmethod=PUT", "%5Fmethod=PUT"),
            ("_METHOD=PUT", "_METHOD=PUT"),
            ("_method=put", "_method=put"),
            ("x=1&_method=DELETE", "x=1&_method=DELETE"),
            ("_m%65thod=PATCH", "_m%65thod=PATCH"),
        ] {
            out.push(
                honest
                    .clone()
                    .body("application/x-www-form-urlencoded", body)
                    .named(format!("override form {label}")),
            );
            out.push(
                honest
                    .clone()
                    .body("application/x-www-form-urlencoded; charset=UTF-8", body)
                    .named(format!("override form (charset) {label}")),
            );
        }
        out.push(
            honest
                .clone()
                .method("GET")
                .body("application/x-www-form-urlencoded", "_method=POST")
                .named("method GET + override form _method=POST"),
        );
        for disposition in [
            r#"form-data; name="_method""#,
            "form-data; name=_method",
            r#"form-data; NAME="_method""#,
            r#"form-data; name = "_method""#,
            r#"form-data; name="_method"; filename="""#,
            r#"form-data; name*=UTF-8''_method"#,
        ] {
            let body =
                format!("--XyZ\r\nContent-Disposition: {disposition}\r\n\r\nPUT\r\n--XyZ--\r\n");
            out.push(
                honest
                    .clone()
                    .body("multipart/form-data; boundary=XyZ", body)
                    .named(format!("override multipart {disposition}")),
            );
        }
    }

    // Absolute-form request targets and fragments.
    for (m, t) in [
        ("POST", "http://{AUTH}/api/flash/tee/buy"),
        ("POST", "http://{AUTH}/API/flash/tee/buy"),
        ("POST", "http://{AUTH}/api/flash/tee/buy;x=1"),
        ("POST", "http://{AUTH}/api/flash/tee%2Fbuy"),
        ("POST", "http://{AUTH}//api/flash/tee/buy"),
        ("POST", "http://{AUTH}/zz/../api/flash/tee/buy"),
        ("POST", "http://{AUTH}/zz/..;/api/flash/tee/buy"),
        ("POST", "http://example.invalid/api/flash/tee/buy"),
        ("POST", "HTTP://{AUTH}/api/flash/tee/buy"),
        ("POST", "https://{AUTH}/api/flash/tee/buy"),
        ("POST", "http://user@{AUTH}/api/flash/tee/buy"),
        ("POST", "http://{AUTH}/api/flash/tee/buy?x=1#y"),
        ("GET", "http://{AUTH}/api/flash/tee/buy"),
        ("post", "http://{AUTH}/api/flash/tee/buy"),
        ("POST", "/api/flash/tee/buy#frag"),
        ("POST", "/zz#/../api/flash/tee/buy"),
        ("POST", "/zz?/../api/flash/tee/buy"),
        ("POST", "/api/flash/tee/buy?"),
        ("POST", "/api/flash/tee/buy?#"),
        ("POST", "*"),
        ("POST", "api/flash/tee/buy"),
    ] {
        out.push(
            Variant::honest(Bypass, Path, BYPASS_SKU)
                .method(m)
                .target(t)
                .named(format!("target {m} {t}")),
        );
    }
    for t in [
        "http://{AUTH}/api/flash-q/buy?sku=tee&quantity=1",
        "http://{AUTH}/API/flash-q/buy?sku=tee&quantity=1",
        "/api/flash-q/buy?sku=tee&quantity=1#x",
        "/api/flash-q/buy#?sku=tee&quantity=1",
    ] {
        out.push(
            Variant::honest(Bypass, Query, BYPASS_SKU)
                .target(t)
                .named(format!("target {t}")),
        );
    }

    // Spoofed flashgate headers on bypass requests (must change nothing).
    for route in routes {
        for h in [
            "X-Flashgate-Reservation",
            "X_Flashgate_Reservation",
            "x-flashgate-reservation",
            "X-FLASHGATE-RESERVATION",
        ] {
            out.push(
                Variant::honest(Bypass, route, BYPASS_SKU)
                    .header(h, "fake-spoofed")
                    .named(format!("spoof {h}")),
            );
        }
    }

    // Two framings (smuggling) on the sale path: refused, never forwarded.
    out.push(Variant {
        framed: true,
        ..Variant::honest(Bypass, Json, BYPASS_SKU)
            .header("Transfer-Encoding", "chunked")
            .header("Content-Length", "4")
            .body(
                "application/json",
                "1a\r\n{\"sku\":\"tee\",\"quantity\":1}\r\n0\r\n\r\n",
            )
            .named("framing CL+TE")
    });

    // --- Differentials: SKU `gold` is in stock, so flashgate admits these (or refuses them
    // for their ambiguity); the backend must read what flashgate read.
    for route in routes {
        out.push(Variant::honest(Differential, route, GOLD_SKU).named("diff honest"));
        for (h, v) in [
            ("X-Flashgate-Reservation", "fake-spoofed"),
            ("X_Flashgate_Reservation", "fake-spoofed"),
            ("X-FLASHGATE-RESERVATION", "fake-spoofed"),
            ("X-Flashgate-Sku", BYPASS_SKU),
            ("X_Flashgate_Sku", BYPASS_SKU),
            ("x-flashgate-sku", BYPASS_SKU),
            ("X-Flashgate-Quantity", "9"),
            ("X_Flashgate_Quantity", "9"),
            ("Connection", "X-Flashgate-Reservation"),
            ("Connection", "x_flashgate_sku, X-Flashgate-Quantity"),
        ] {
            out.push(
                Variant::honest(Differential, route, GOLD_SKU)
                    .header(h, v)
                    .named(format!("diff spoof {h}: {v}")),
            );
        }
        let twice = Variant::honest(Differential, route, GOLD_SKU)
            .header("X-Flashgate-Reservation", "fake-1")
            .header("x-flashgate-reservation", "fake-2");
        out.push(twice.named("diff spoof reservation twice"));
    }
    let gold_path = Variant::honest(Differential, Path, GOLD_SKU);
    for (label, t) in [
        ("%6F", "/api/flash/g%6Fld/buy"),
        ("%67", "/api/flash/%67old/buy"),
        ("all escaped", "/api/flash/%67%6f%6c%64/buy"),
        ("trailing /", "/api/flash/gold/buy/"),
        ("//", "//api/flash/gold/buy"),
        ("./", "/api/flash/./gold/buy"),
        ("zz/../", "/api/flash/zz/../gold/buy"),
        ("tee/../", "/api/flash/tee/../gold/buy"),
        ("absolute", "http://{AUTH}/api/flash/gold/buy"),
        ("?sku=tee", "/api/flash/gold/buy?sku=tee"),
        ("#", "/api/flash/gold/buy#tee"),
        ("gold.", "/api/flash/gold./buy"),
        ("gold%2e", "/api/flash/gold%2e/buy"),
        ("GOLD", "/api/flash/GOLD/buy"),
        ("gold%20", "/api/flash/gold%20/buy"),
        ("gold%2Ftee", "/api/flash/gold%2Ftee/buy"),
        ("gold;tee", "/api/flash/gold;tee/buy"),
        ("tee;/../gold", "/api/flash/tee;/../gold/buy"),
        ("gold%3Btee", "/api/flash/gold%3Btee/buy"),
        ("gold%00", "/api/flash/gold%00/buy"),
    ] {
        out.push(
            gold_path
                .clone()
                .target(t)
                .named(format!("diff path {label}")),
        );
    }
    let q = |query: &str| {
        Variant::honest(Differential, Query, GOLD_SKU)
            .target(format!("/api/flash-q/buy?{query}"))
            .named(format!("diff ?{query}"))
    };
    for query in [
        "sku=gold&sku=tee&quantity=1",
        "sku=tee&sku=gold&quantity=1",
        "sku=gold&%73ku=tee&quantity=1",
        "SKU=tee&sku=gold&quantity=1",
        "sku=gold&Sku=tee&quantity=1",
        "sku[]=tee&sku=gold&quantity=1",
        "sku=gold&sku[]=tee&quantity=1",
        "sku=gold&sku[0]=tee&quantity=1",
        "sku=gold&sku%5B%5D=tee&quantity=1",
        "sku=gold&sku.x=tee&quantity=1",
        "sku=gold;sku=tee&quantity=1",
        "sku=gold;x=1&quantity=1",
        "x=1;sku=gold&quantity=1",
        "sku=gold&quantity=1;sku=tee",
        "sku=g%6Fld&quantity=1",
        "sku=gold&quantity=01",
        "sku=gold&quantity=%31",
        "sku=gold&quantity=2",
        "sku=gold&quantity=+1",
        "sku=gold&quantity=%2B1",
        "sku=gold&quantity=1.0",
        "sku=gold&quantity=1e0",
        "sku=gold&quantity=-1",
        "sku=gold&quantity=1&quantity=2",
        "sku=gold&quantity=1&Quantity=2",
        "sku=gold&quantity=1&QUANTITY=2",
        "sku=gold&quantity[]=1",
        "sku=gold&quantity=1abc",
        "sku=gold&quantity=1%00",
        "sku=gold&quantity=1&sku",
        "sku=gold&quantity=1&sku=",
        "&sku=gold&quantity=1",
        "sku=gold&quantity=1&",
        "sku=gold&quantity=1#&sku=tee",
        "sku=gold%00tee&quantity=1",
        "sku=gold%26sku%3Dtee&quantity=1",
        "sku%00=tee&sku=gold&quantity=1",
        "sku+=tee&sku=gold&quantity=1",
        "sku%20=tee&sku=gold&quantity=1",
        "s%6Bu=tee&sku=gold&quantity=1",
        "sku=gold&quantity=1&_method=PUT",
        "sku=gold&quantity=1&sku%5Bfoo%5D=tee",
    ] {
        out.push(q(query));
    }
    for (label, body) in [
        ("sku=tee", "sku=tee"),
        ("quantity=2", "quantity=2"),
        ("sku=tee&quantity=2", "sku=tee&quantity=2"),
    ] {
        out.push(
            Variant::honest(Differential, Query, GOLD_SKU)
                .body("application/x-www-form-urlencoded", body)
                .named(format!("diff query + form body {label}")),
        );
    }
    out.push(
        Variant::honest(Differential, Query, GOLD_SKU)
            .body(
                "multipart/form-data; boundary=XyZ",
                "--XyZ\r\nContent-Disposition: form-data; name=\"sku\"\r\n\r\ntee\r\n--XyZ--\r\n",
            )
            .named("diff query + multipart body sku=tee"),
    );
    let h = |label: &str, headers: &[(&str, &str)]| {
        let mut v = Variant::honest(Differential, Header, GOLD_SKU);
        v.headers.clear();
        for (k, val) in headers {
            v = v.header(k, val);
        }
        v.named(format!("diff header {label}"))
    };
    for (label, headers) in [
        (
            "X-Sku twice",
            &[("X-Sku", "gold"), ("X-Sku", "tee"), ("X-Qty", "1")][..],
        ),
        (
            "x-sku + X-SKU",
            &[("x-sku", "gold"), ("X-SKU", "tee"), ("X-Qty", "1")],
        ),
        (
            "X_Sku twin",
            &[("X-Sku", "gold"), ("X_Sku", "tee"), ("X-Qty", "1")],
        ),
        ("X_Sku only", &[("X_Sku", "gold"), ("X-Qty", "1")]),
        ("X-Sku list", &[("X-Sku", "gold, tee"), ("X-Qty", "1")]),
        ("X-Sku padded", &[("X-Sku", "  gold  "), ("X-Qty", "1")]),
        ("X-Sku tab", &[("X-Sku", "gold\t"), ("X-Qty", "1")]),
        ("X-Qty 01", &[("X-Sku", "gold"), ("X-Qty", "01")]),
        ("X-Qty 2", &[("X-Sku", "gold"), ("X-Qty", "2")]),
        ("X-Qty +1", &[("X-Sku", "gold"), ("X-Qty", "+1")]),
        ("X-Qty 1.0", &[("X-Sku", "gold"), ("X-Qty", "1.0")]),
        ("X-Qty -1", &[("X-Sku", "gold"), ("X-Qty", "-1")]),
        ("X-Qty list", &[("X-Sku", "gold"), ("X-Qty", "1, 2")]),
        (
            "X-Qty twice",
            &[("X-Sku", "gold"), ("X-Qty", "1"), ("X-Qty", "2")],
        ),
        (
            "X_Qty twin",
            &[("X-Sku", "gold"), ("X-Qty", "1"), ("X_Qty", "2")],
        ),
        ("X-Qty 1abc", &[("X-Sku", "gold"), ("X-Qty", "1abc")]),
        ("X-Qty padded", &[("X-Sku", "gold"), ("X-Qty", " 1 ")]),
    ] {
        out.push(h(label, headers));
    }
    let j = |label: &str, ct: &str, body: &str| {
        Variant::honest(Differential, Json, GOLD_SKU)
            .body(ct, body)
            .named(format!("diff json {label}"))
    };
    const JSON: &str = "application/json";
    for (label, ct, body) in [
        (
            "dup sku",
            JSON,
            r#"{"sku":"gold","sku":"tee","quantity":1}"#,
        ),
        (
            "dup sku rev",
            JSON,
            r#"{"sku":"tee","sku":"gold","quantity":1}"#,
        ),
        ("SKU", JSON, r#"{"sku":"gold","SKU":"tee","quantity":1}"#),
        ("SKU only", JSON, r#"{"SKU":"gold","quantity":1}"#),
        (
            "Sku first",
            JSON,
            r#"{"Sku":"tee","sku":"gold","quantity":1}"#,
        ),
        ("long s", JSON, r#"{"sku":"gold","ſku":"tee","quantity":1}"#),
        (
            "long s escaped",
            JSON,
            r#"{"sku":"gold","\u017fku":"tee","quantity":1}"#,
        ),
        (
            "kelvin",
            JSON,
            r#"{"sku":"gold","s\u212au":"tee","quantity":1}"#,
        ),
        ("escaped key", JSON, r#"{"\u0073ku":"gold","quantity":1}"#),
        ("escaped value", JSON, r#"{"sku":"g\u006fld","quantity":1}"#),
        (
            "dup quantity",
            JSON,
            r#"{"sku":"gold","quantity":1,"quantity":2}"#,
        ),
        (
            "Quantity",
            JSON,
            r#"{"sku":"gold","quantity":1,"Quantity":2}"#,
        ),
        (
            "QUANTITY",
            JSON,
            r#"{"sku":"gold","QUANTITY":2,"quantity":1}"#,
        ),
        ("quantity string", JSON, r#"{"sku":"gold","quantity":"1"}"#),
        ("quantity 1.0", JSON, r#"{"sku":"gold","quantity":1.0}"#),
        ("quantity 1e0", JSON, r#"{"sku":"gold","quantity":1e0}"#),
        ("quantity -1", JSON, r#"{"sku":"gold","quantity":-1}"#),
        ("quantity 2", JSON, r#"{"sku":"gold","quantity":2}"#),
        ("quantity true", JSON, r#"{"sku":"gold","quantity":true}"#),
        ("quantity 1.5", JSON, r#"{"sku":"gold","quantity":1.5}"#),
        (
            "quantity huge",
            JSON,
            r#"{"sku":"gold","quantity":4294967297}"#,
        ),
        ("quantity null", JSON, r#"{"sku":"gold","quantity":null}"#),
        ("sku number", JSON, r#"{"sku":123,"quantity":1}"#),
        ("sku array", JSON, r#"{"sku":["gold"],"quantity":1}"#),
        (
            "nested",
            JSON,
            r#"{"sku":"gold","quantity":1,"x":{"sku":"tee"}}"#,
        ),
        (
            "sku NUL twin",
            JSON,
            r#"{"sku":"gold","sku\u0000":"tee","quantity":1}"#,
        ),
        ("trailing garbage", JSON, r#"{"sku":"gold","quantity":1}x"#),
        (
            "two documents",
            JSON,
            r#"{"sku":"gold","quantity":1}{"sku":"tee","quantity":1}"#,
        ),
        ("array", JSON, r#"[{"sku":"gold","quantity":1}]"#),
        ("BOM", JSON, "\u{feff}{\"sku\":\"gold\",\"quantity\":1}"),
        ("NaN", JSON, r#"{"sku":"gold","quantity":NaN}"#),
        ("text/plain", "text/plain", r#"{"sku":"gold","quantity":1}"#),
        (
            "charset",
            "application/json; charset=utf-8",
            r#"{"sku":"gold","quantity":1}"#,
        ),
        (
            "vnd+json",
            "application/vnd.api+json",
            r#"{"sku":"gold","quantity":1}"#,
        ),
        (
            "form",
            "application/x-www-form-urlencoded",
            "sku=gold&quantity=1",
        ),
    ] {
        out.push(j(label, ct, body));
    }
    out.push(
        Variant::honest(Differential, Json, GOLD_SKU)
            .target("/api/flash-j/buy?sku=tee&quantity=2")
            .named("diff json + query sku=tee"),
    );
    out.push(
        Variant::honest(Differential, Json, GOLD_SKU)
            .header("X-Sku", "tee")
            .named("diff json + X-Sku: tee"),
    );
    out.push(Variant {
        framed: true,
        ..Variant::honest(Differential, Json, GOLD_SKU)
            .header("Transfer-Encoding", "chunked")
            .body(
                JSON,
                "d\r\n{\"sku\":\"gold\"\r\nd\r\n,\"quantity\":1}\r\n0\r\n\r\n",
            )
            .named("diff json chunked")
    });
    out
}

// ---------------------------------------------------------------------------
// Backends

/// A backend process, killed on drop.
struct BackendProc {
    addr: SocketAddr,
    log: PathBuf,
    _child: Child,
}

/// Starts `cmd` (stdout piped) and waits for its "LISTENING <port>" line.
async fn start_backend(mut cmd: Command, dir: &Path, name: &str) -> BackendProc {
    let log = dir.join(format!("{name}.log"));
    let stderr = std::fs::File::create(&log).unwrap();
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(stderr))
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("{name}: cannot start {cmd:?}: {e}"));
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let port = tokio::time::timeout(START_TIMEOUT, async {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(p) = line.strip_prefix("LISTENING ") {
                return p.trim().parse::<u16>().ok();
            }
        }
        None
    })
    .await
    .ok()
    .flatten()
    .unwrap_or_else(|| {
        panic!(
            "{name} did not start; its log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    });
    // Keep draining stdout so the backend never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    BackendProc {
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        log,
        _child: child,
    }
}

async fn run_ok(mut cmd: Command, what: &str) {
    let out = tokio::time::timeout(BUILD_TIMEOUT, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{what} timed out"))
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn have(program: &str) -> bool {
    std::process::Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

fn have_go() -> bool {
    std::process::Command::new("go")
        .arg("version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn python_has(modules: &str) -> bool {
    std::process::Command::new("python3")
        .args(["-c", &format!("import {modules}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A Go command that never reaches the network.
fn go(dir: &Path) -> Command {
    let mut cmd = Command::new("go");
    cmd.current_dir(dir)
        .env("GOTOOLCHAIN", "local")
        .env("GOPROXY", "off")
        .env("GOFLAGS", "-mod=mod")
        .env("GOWORK", "off");
    cmd
}

const GIN_GOPATH: &str = "/usr/share/gocode";
const TOMCAT_JARS: &[&str] = &[
    "/usr/share/java/tomcat10-embed-core.jar",
    "/usr/share/java/jakarta-annotation-api.jar",
    "/usr/share/java/jackson-databind.jar",
    "/usr/share/java/jackson-core.jar",
    "/usr/share/java/jackson-annotations.jar",
];

/// How to get a framework's backend running; `Err` is the reason to skip it.
enum Framework {
    GoNetHttp { method_agnostic: bool },
    Gin,
    Flask,
    FastApi,
    Express,
    Tomcat,
}

impl Framework {
    fn name(&self) -> &'static str {
        match self {
            Framework::GoNetHttp {
                method_agnostic: false,
            } => "go_net_http (POST pattern)",
            Framework::GoNetHttp {
                method_agnostic: true,
            } => "go_net_http (any method + override)",
            Framework::Gin => "gin",
            Framework::Flask => "flask",
            Framework::FastApi => "fastapi",
            Framework::Express => "express",
            Framework::Tomcat => "tomcat",
        }
    }

    /// Why the framework cannot run here, if it cannot.
    fn missing(&self) -> Option<String> {
        match self {
            // The Go backends always run: a missing `go` fails the test.
            Framework::GoNetHttp { .. } => None,
            Framework::Gin => (!have_go())
                .then(|| "`go` not found (apt: golang-go)".to_owned())
                .or_else(|| {
                    (!Path::new(GIN_GOPATH)
                        .join("src/github.com/gin-gonic/gin")
                        .exists())
                    .then(|| {
                        "Gin sources not found (apt: golang-github-gin-gonic-gin-dev)".to_owned()
                    })
                }),
            Framework::Flask => (!python_has("flask, werkzeug")).then(|| {
                "python3 with flask not found (pip install -r tests/bypass/requirements.txt)"
                    .to_owned()
            }),
            Framework::FastApi => (!python_has("fastapi, uvicorn")).then(|| {
                "python3 with fastapi and uvicorn not found (pip install -r tests/bypass/requirements.txt)"
                    .to_owned()
            }),
            Framework::Express => (!have("node"))
                .then(|| "`node` not found (apt: nodejs)".to_owned())
                .or_else(|| {
                    (!bypass_dir().join("express/node_modules/express").exists()).then(|| {
                        "express not installed (run `npm ci` in tests/bypass/express)".to_owned()
                    })
                }),
            Framework::Tomcat => (!have("javac"))
                .then(|| "`javac` not found (apt: default-jdk-headless)".to_owned())
                .or_else(|| {
                    TOMCAT_JARS
                        .iter()
                        .find(|j| !Path::new(j).exists())
                        .map(|j| {
                            format!(
                                "{j} not found (apt: libtomcat10-embed-java libjakarta-annotation-api-java libjackson2-databind-java)"
                            )
                        })
                }),
        }
    }

    /// Builds (into `tmp`, never the repository) and starts the backend.
    async fn start(&self, tmp: &Path) -> BackendProc {
        let src = bypass_dir();
        match self {
            Framework::GoNetHttp { method_agnostic } => {
                assert!(
                    have_go(),
                    "`go` is required for the bypass matrix (apt: golang-go >= 1.22)"
                );
                let bin = tmp.join("go_net_http");
                let mut build = go(&src.join("go_net_http"));
                build.arg("build").arg("-o").arg(&bin).arg(".");
                run_ok(build, "go build (net/http backend)").await;
                let mut cmd = Command::new(&bin);
                cmd.args(["-mode", if *method_agnostic { "any" } else { "strict" }]);
                start_backend(cmd, tmp, "go_net_http").await
            }
            Framework::Gin => {
                let bin = tmp.join("gin");
                let mut build = go(tmp);
                build
                    .env("GO111MODULE", "off")
                    .env("GOPATH", GIN_GOPATH)
                    .env_remove("GOFLAGS")
                    .arg("build")
                    .arg("-o")
                    .arg(&bin)
                    .arg(src.join("gin/main.go"));
                run_ok(build, "go build (Gin backend)").await;
                start_backend(Command::new(&bin), tmp, "gin").await
            }
            Framework::Flask => {
                let mut cmd = Command::new("python3");
                cmd.arg(src.join("flask_app.py"))
                    .env("PYTHONDONTWRITEBYTECODE", "1");
                start_backend(cmd, tmp, "flask").await
            }
            Framework::FastApi => {
                let mut cmd = Command::new("python3");
                cmd.arg(src.join("fastapi_app.py"))
                    .env("PYTHONDONTWRITEBYTECODE", "1");
                start_backend(cmd, tmp, "fastapi").await
            }
            Framework::Express => {
                let mut cmd = Command::new("node");
                cmd.arg(src.join("express/app.js"));
                start_backend(cmd, tmp, "express").await
            }
            Framework::Tomcat => {
                let classes = tmp.join("classes");
                std::fs::create_dir_all(&classes).unwrap();
                let cp = TOMCAT_JARS.join(":");
                let mut build = Command::new("javac");
                build
                    .arg("-nowarn")
                    .arg("-d")
                    .arg(&classes)
                    .args(["-cp", &cp])
                    .arg(src.join("tomcat/BuyServer.java"));
                run_ok(build, "javac (Tomcat backend)").await;
                let mut cmd = Command::new("java");
                cmd.arg("-cp")
                    .arg(format!("{}:{cp}", classes.display()))
                    .arg("BuyServer");
                start_backend(cmd, tmp, "tomcat").await
            }
        }
    }
}

// ---------------------------------------------------------------------------
// flashgate in front

fn flashgate_yaml(backend: SocketAddr) -> String {
    let sale = |name: &str, path: &str, sale: &str| {
        format!(
            "  - name: {name}\n    match: {{ method: POST, path: \"{path}\" }}\n    identity: {{ header: X-User-Id }}\n    sale: {sale}\n"
        )
    };
    format!(
        "upstream: {{ url: \"http://{backend}\", connect_timeout: 500ms, request_timeout: 5s }}\n\
         admin: {{ listen: \"127.0.0.1:0\" }}\n\
         routes:\n{}{}{}{}  - name: everything-else\n    match: {{ path: \"/{{*rest}}\" }}\n",
        sale(
            "flash-path",
            "/api/flash/{sku}/buy",
            "{ sku: { path_param: sku }, quantity: 1, per_user_limit: 1 }"
        ),
        sale(
            "flash-query",
            "/api/flash-q/buy",
            "{ sku: { query: sku }, quantity: { query: quantity }, per_user_limit: 1000 }"
        ),
        sale(
            "flash-header",
            "/api/flash-h/buy",
            "{ sku: { header: X-Sku }, quantity: { header: X-Qty }, per_user_limit: 1000 }"
        ),
        sale(
            "flash-json",
            "/api/flash-j/buy",
            "{ sku: { json: sku }, quantity: { json: quantity }, per_user_limit: 1000 }"
        ),
    )
}

async fn set_stock(fg: &Flashgate, sku: &str, units: u64) {
    let auth = format!("Bearer {ADMIN_TOKEN}");
    let a = send(
        &client(),
        "PUT",
        &format!("{}/v1/stock/{sku}", fg.admin_url()),
        &[
            ("authorization", auth.as_str()),
            ("content-type", "application/json"),
        ],
        json!({ "stock": units }).to_string(),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text());
}

// ---------------------------------------------------------------------------
// Running the matrix

/// A fresh user id per request, so the per-user limit never hides anything.
fn next_user() -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!("u{}", N.fetch_add(1, Ordering::Relaxed))
}

/// What one send produced: the answer (or why none) and the buy-handler records it caused.
struct Sent {
    answer: Result<RawResponse, String>,
    records: Vec<Value>,
}

impl Sent {
    fn status(&self) -> String {
        match &self.answer {
            Ok(r) => r.status.to_string(),
            Err(_) => "none".into(),
        }
    }
}

async fn send_variant(v: &Variant, to: SocketAddr, backend: SocketAddr) -> Sent {
    let bytes = v.render(to, &next_user());
    let head_only = v.method.eq_ignore_ascii_case("HEAD");
    let answer = raw::exchange(to, &bytes, head_only, EXCHANGE_TIMEOUT)
        .await
        .map_err(|e| e.to_string());
    Sent {
        answer,
        records: seen(backend).await,
    }
}

/// Takes the backend's buy-handler records.
async fn seen(backend: SocketAddr) -> Vec<Value> {
    let req = format!("GET /__seen HTTP/1.1\r\nHost: {backend}\r\nConnection: close\r\n\r\n");
    let r = raw::exchange(backend, req.as_bytes(), false, EXCHANGE_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("GET /__seen on the backend: {e}"));
    assert_eq!(r.status, 200, "GET /__seen: {}", r.text());
    match serde_json::from_slice(&r.body) {
        Ok(Value::Array(a)) => a,
        other => panic!("GET /__seen answered {other:?}: {}", r.text()),
    }
}

/// Whether an answer is one of flashgate's own refusals (`{"error": …}`, JSON).
fn is_flashgate_reject(r: &RawResponse) -> bool {
    r.header("content-type")
        .is_some_and(|c| c.starts_with("application/json"))
        && serde_json::from_slice::<Value>(&r.body).is_ok_and(|v| v.get("error").is_some())
}

/// Why a record seen through flashgate is a failure, if it is.
fn judge(v: &Variant, rec: &Value) -> Option<String> {
    let s = |k: &str| rec.get(k).and_then(Value::as_str);
    let Some(reservation) = s("reservation") else {
        return Some("BYPASS: buy handler reached without X-Flashgate-Reservation".into());
    };
    if reservation.contains("fake") {
        return Some(format!(
            "SPOOF: buy handler saw a client's reservation header ({reservation:?})"
        ));
    }
    let route = s("route").unwrap_or("?");
    if route != v.route.name() {
        return Some(format!(
            "DIFFERENTIAL: admitted for the {} route, bought on the backend's {route} route",
            v.route.name()
        ));
    }
    let (x_sku, sku) = (s("x_sku"), s("sku"));
    if sku.is_some() && sku != x_sku {
        return Some(format!(
            "DIFFERENTIAL: flashgate sku {x_sku:?}, backend parsed sku {sku:?}"
        ));
    }
    let (x_qty, qty) = (s("x_qty"), s("qty"));
    if v.route != RouteKind::Path && qty.is_some() {
        let num = |q: Option<&str>| q.and_then(|q| q.trim().parse::<i64>().ok());
        let same = match (num(x_qty), num(qty)) {
            (Some(a), Some(b)) => a == b,
            _ => x_qty == qty,
        };
        if !same {
            return Some(format!(
                "DIFFERENTIAL: flashgate quantity {x_qty:?}, backend parsed quantity {qty:?}"
            ));
        }
    }
    None
}

/// A record admitted by flashgate that the backend could not read a value from (not a
/// bypass: the backend would answer 4xx and sell nothing, but worth seeing).
fn unparsed(v: &Variant, rec: &Value) -> bool {
    let missing = |k: &str| rec.get(k).is_none_or(Value::is_null);
    missing("sku") || (v.route != RouteKind::Path && missing("qty"))
}

async fn run_matrix(framework: Framework) {
    let name = framework.name();
    if let Some(reason) = framework.missing() {
        println!("SKIPPED {name}: {reason}");
        return;
    }
    let started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let backend = framework.start(tmp.path()).await;
    let fg = Flashgate::start(&flashgate_yaml(backend.addr)).await;
    set_stock(&fg, BYPASS_SKU, 0).await;
    set_stock(&fg, GOLD_SKU, 1_000_000).await;
    let all = variants();

    let mut failures: Vec<String> = Vec::new();
    let mut outside_handler: Vec<String> = Vec::new();
    let mut direct_reach: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    let mut through_statuses: BTreeMap<String, usize> = BTreeMap::new();
    // For variants that reach the buy handler directly: what flashgate answered instead.
    let mut direct_then: BTreeMap<String, usize> = BTreeMap::new();
    let mut fenced_only: Vec<String> = Vec::new();
    let mut admitted = [0usize; 4];
    let mut unparsed_names: Vec<&str> = Vec::new();
    let (mut bypasses, mut spoofs, mut diffs) = (0, 0, 0);
    for v in &all {
        let direct = send_variant(v, backend.addr, backend.addr).await;
        if !direct.records.is_empty() {
            let kind = match v.kind {
                Kind::Bypass => "bypass",
                Kind::Differential => "differential",
            };
            direct_reach.entry(kind).or_default().push(&v.name);
        }
        let through = send_variant(v, fg.addr, backend.addr).await;
        *through_statuses.entry(through.status()).or_default() += 1;
        if !direct.records.is_empty() {
            *direct_then.entry(through.status()).or_default() += 1;
            if v.kind == Kind::Bypass && through.status() != "410" {
                fenced_only.push(format!("{} → {}", v.name, through.status()));
            }
        }
        // An in-stock buy that flashgate passed on but the framework answered elsewhere (a
        // redirect, its own 404): the unit is spent, nothing was bought.
        if v.kind == Kind::Differential
            && through.records.is_empty()
            && let Ok(r) = &through.answer
            && !is_flashgate_reject(r)
        {
            outside_handler.push(format!("{} → {}", v.name, r.status));
        }
        for rec in &through.records {
            match judge(v, rec) {
                Some(why) => {
                    match why.split(':').next() {
                        Some("BYPASS") => bypasses += 1,
                        Some("SPOOF") => spoofs += 1,
                        _ => diffs += 1,
                    }
                    let report = format!(
                        "[{name}] {why}\n    variant: {}\n    request: {}\n    flashgate answered: {}\n    framework recorded: {rec}",
                        v.name,
                        v.show(fg.addr),
                        through.status()
                    );
                    failures.push(report);
                }
                None => {
                    admitted[v.route as usize] += 1;
                    if unparsed(v, rec) {
                        unparsed_names.push(&v.name);
                    }
                }
            }
        }
    }
    // The matrix must mean something: the honest request reaches the framework's buy handler
    // directly, and flashgate admits an honest `gold` buy on every route.
    let bypass_direct = direct_reach.get("bypass").map_or(0, Vec::len);
    let diff_direct = direct_reach.get("differential").map_or(0, Vec::len);
    let n_bypass = all.iter().filter(|v| v.kind == Kind::Bypass).count();
    let n_diff = all.len() - n_bypass;

    println!(
        "\n== {name} (backend {}, {} variants, {:.1}s) ==",
        backend.addr,
        all.len(),
        started.elapsed().as_secs_f64()
    );
    println!("| | variants | reach buy handler directly | through flashgate: failures |");
    println!("|---|---|---|---|");
    println!(
        "| bypass (sku {BYPASS_SKU}, stock 0) | {n_bypass} | {bypass_direct} | {bypasses} without reservation, {spoofs} spoofed |"
    );
    println!(
        "| differential (sku {GOLD_SKU}) | {n_diff} | {diff_direct} | {diffs} parser differentials |"
    );
    println!(
        "admitted through flashgate per route (path/query/header/json): {admitted:?}; flashgate answers: {through_statuses:?}"
    );
    if !unparsed_names.is_empty() {
        println!(
            "admitted, but the framework could not read sku/quantity itself (not counted): {unparsed_names:?}"
        );
    }
    println!(
        "variants reaching the buy handler directly, answered by flashgate with: {direct_then:?}"
    );
    println!(
        "bypass variants the framework buys directly that flashgate refuses before any stock check ({}): {}",
        fenced_only.len(),
        fenced_only.join("; ")
    );
    if !outside_handler.is_empty() {
        println!(
            "in-stock buys the framework answered outside its buy handler (after flashgate passed them on): {}",
            outside_handler.join("; ")
        );
    }

    let honest_direct = direct_reach
        .get("bypass")
        .is_some_and(|v| v.contains(&"path path exact"));
    assert!(
        honest_direct,
        "[{name}] the honest buy request never reached the backend's buy handler directly: the backend is broken, the matrix means nothing (log: {})",
        backend.log.display()
    );
    assert!(
        admitted.iter().all(|&n| n > 0),
        "[{name}] flashgate admitted no honest buy on some route ({admitted:?}): the differential half means nothing"
    );
    // A unit flashgate reserved for a request the buy handler never saw is spent for nothing
    // (and the buyer's per-user slot with it): flashgate must refuse such a spelling instead.
    assert!(
        outside_handler.is_empty(),
        "[{name}] in-stock buys admitted by flashgate but answered outside the buy handler: {}",
        outside_handler.join("; ")
    );
    assert!(
        failures.is_empty(),
        "{} request(s) got past flashgate to {name}'s buy handler without flashgate's reservation, or read differently:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_net_http_post_pattern() {
    run_matrix(Framework::GoNetHttp {
        method_agnostic: false,
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_net_http_method_agnostic() {
    run_matrix(Framework::GoNetHttp {
        method_agnostic: true,
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gin() {
    run_matrix(Framework::Gin).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flask() {
    run_matrix(Framework::Flask).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fastapi() {
    run_matrix(Framework::FastApi).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn express() {
    run_matrix(Framework::Express).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tomcat() {
    run_matrix(Framework::Tomcat).await;
}
