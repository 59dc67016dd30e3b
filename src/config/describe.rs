//! The compiled config as `flashgate check` prints it: what will actually run, in words an
//! operator can compare with the sale plan (which routes, in which order, which store, which
//! SKU source, which window). Secrets never appear: a Redis password is masked.

use std::fmt::Write;
use std::time::{Duration, SystemTime};

use super::{
    Config, Identity, IdentitySource, Jwt, JwtKeys, Quantity, Rate, Route, Sale, Source, TokenFrom,
    Unmatched,
};

/// The whole summary, one setting a line.
pub fn describe(cfg: &Config) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{}: ok", cfg.file);
    let u = &cfg.upstream;
    let _ = writeln!(
        out,
        "listen {} -> upstream {}://{}{} (connect {:?}, request {:?})",
        cfg.listen,
        u.url.scheme,
        u.url.authority,
        u.url.path_prefix,
        u.connect_timeout,
        u.request_timeout
    );
    let _ = match &cfg.store {
        None => writeln!(out, "store: embedded memory (one instance only)"),
        Some(s) => writeln!(
            out,
            "store: redis {} (connections {}, response_timeout {}, key_prefix {}{})",
            s.redis.describe(),
            s.connections,
            dur(s.response_timeout),
            s.key_prefix,
            match s.wait_replicas {
                None => String::new(),
                Some((n, t)) => format!(", each reservation on {n} replica(s) within {}", dur(t)),
            }
        ),
    };
    let _ = match &cfg.admin {
        None => writeln!(out, "admin: off"),
        Some(a) => writeln!(
            out,
            "admin: on, listen {}, token from ${} (off while it is unset)",
            a.listen, a.token_env
        ),
    };
    if let Some(a) = &cfg.access_log {
        let _ = writeln!(
            out,
            "access_log: on, sample {}, to {}, user ids {}",
            a.sample,
            a.path
                .as_ref()
                .map_or_else(|| "stdout".to_owned(), |p| p.display().to_string()),
            if a.log_user_ids {
                "as they are"
            } else {
                "hashed"
            }
        );
    }
    let _ = if cfg.trusted_proxies.is_empty() {
        writeln!(
            out,
            "trusted_proxies: none (X-Forwarded-For is not believed)"
        )
    } else {
        let nets: Vec<String> = cfg.trusted_proxies.iter().map(|n| n.to_string()).collect();
        writeln!(out, "trusted_proxies: {}", nets.join(", "))
    };
    let _ = writeln!(out, "routes (first match wins):");
    for (i, r) in cfg.routes.iter().enumerate() {
        route_line(&mut out, i, r);
        if let Some(Identity {
            source: IdentitySource::Jwt(jwt),
            ..
        }) = &r.identity
        {
            jwt_lines(&mut out, jwt);
        }
        if let Some(sale) = &r.sale {
            sale_lines(&mut out, r, sale);
        }
        if let Some(room) = &r.waiting_room {
            room_lines(&mut out, room);
        }
    }
    let _ = writeln!(
        out,
        "unmatched: {}",
        match cfg.unmatched {
            Unmatched::Proxy => "proxy",
            Unmatched::NotFound => "not_found",
        }
    );
    out
}

fn route_line(out: &mut String, i: usize, r: &Route) {
    let methods = if r.methods.is_empty() {
        "*".to_owned()
    } else {
        r.methods
            .iter()
            .map(|m| m.as_str())
            .collect::<Vec<_>>()
            .join(",")
    };
    let _ = write!(out, "  {}. {} {} {}", i + 1, r.name, methods, r.path.source);
    if let Some(id) = &r.identity {
        let _ = match &id.source {
            IdentitySource::Header(h) => write!(out, " identity=header:{h}"),
            IdentitySource::Cookie(c) => write!(out, " identity=cookie:{c}"),
            IdentitySource::Jwt(_) => write!(out, " identity=jwt"),
        };
    }
    let l = &r.limits;
    for (name, rate) in [
        ("route", &l.route),
        ("per_ip", &l.per_ip),
        ("per_user", &l.per_user),
    ] {
        if let Some(rate) = rate {
            let _ = write!(out, " {name}={}", show_rate(rate));
        }
    }
    if let Some(n) = l.in_flight {
        let _ = write!(out, " in_flight={n}");
    }
    if let Some(n) = r.max_body {
        let _ = write!(out, " max_body={n}");
    }
    let _ = writeln!(out);
}

/// A JWT identity, indented under its route line: where the token is, which keys, which checks.
fn jwt_lines(out: &mut String, jwt: &Jwt) {
    const IN: &str = "       ";
    let from = match &jwt.from {
        TokenFrom::Bearer => "header `Authorization: Bearer`".to_owned(),
        TokenFrom::Header(h) => format!("header `{h}`"),
        TokenFrom::Cookie(c) => format!("cookie `{c}`"),
    };
    let _ = writeln!(
        out,
        "{IN}jwt: token from {from}, user from claim `{}`",
        jwt.claim
    );
    let _ = match &jwt.keys {
        JwtKeys::File { path, keys } => writeln!(
            out,
            "{IN}jwt keys: file {} ({} key(s): {}; re-read on reload)",
            path.display(),
            keys.len(),
            keys.summary()
        ),
        JwtKeys::Url {
            url,
            refresh,
            min_refresh,
        } => writeln!(
            out,
            "{IN}jwt keys: fetched from {url} (refresh {}, at most one fetch per {}; 503 until the first succeeds)",
            dur(*refresh),
            dur(*min_refresh)
        ),
        JwtKeys::Secret { env, .. } => writeln!(out, "{IN}jwt keys: HMAC secret from ${env}"),
    };
    let algs: Vec<String> = jwt.algorithms.iter().map(|a| format!("{a:?}")).collect();
    let _ = writeln!(
        out,
        "{IN}jwt checks: alg in [{}], exp required, nbf, iss {}, aud {}, leeway {}",
        algs.join(", "),
        jwt.issuer.as_deref().unwrap_or("(not checked)"),
        jwt.audience.as_deref().unwrap_or("(not checked)"),
        dur(jwt.leeway)
    );
    let cache = if jwt.cache_entries == 0 {
        "off".to_owned()
    } else {
        format!("{} tokens", jwt.cache_entries)
    };
    let _ = writeln!(
        out,
        "{IN}jwt limits: token at most {} bytes, cache {cache}",
        jwt.max_token_bytes
    );
}

/// A sale route's admission rules, indented under its route line.
fn sale_lines(out: &mut String, r: &Route, sale: &Sale) {
    const IN: &str = "       ";
    let _ = writeln!(out, "{IN}sale: sku from {}", source(&sale.sku));
    let _ = match &sale.quantity {
        Quantity::Fixed(n) => writeln!(out, "{IN}quantity: {n}"),
        Quantity::From(s) => writeln!(out, "{IN}quantity: from {}", source(s)),
    };
    let _ = writeln!(out, "{IN}per_user_limit: {}", sale.per_user_limit);
    let _ = writeln!(
        out,
        "{IN}window: start {}, end {}",
        time(sale.start, "(none)"),
        time(sale.end, "(none)")
    );
    // A refused connection always releases; the statuses are the operator's.
    let mut release = vec!["connect_error (always)".to_owned()];
    release.extend(sale.release_on_status.iter().map(u16::to_string));
    let _ = writeln!(out, "{IN}release_on: {}", release.join(", "));
    let _ = writeln!(out, "{IN}sold_out_recheck: {}", dur(sale.sold_out_recheck));
    if let Some(path) = &sale.stock_events {
        let _ = writeln!(out, "{IN}stock_events: GET {path} (server-sent events)");
    }
    let _ = writeln!(
        out,
        "{IN}max_body: {} bytes ({})",
        sale.max_body,
        if sale.reads_body() {
            "read for the JSON field"
        } else {
            "body not read"
        }
    );
    let l = &r.limits;
    if l.route.is_none() && l.per_ip.is_none() && l.per_user.is_none() && l.in_flight.is_none() {
        let _ = writeln!(out, "{IN}limits: none");
    }
}

fn source(s: &Source) -> String {
    match s {
        Source::PathParam(p) => format!("path_param `{p}`"),
        Source::Query(q) => format!("query `{q}`"),
        Source::Header(h) => format!("header `{h}`"),
        Source::Json(j) => format!("json field `{j}`"),
    }
}

/// A route's waiting room, indented under its route line (the key is never shown).
fn room_lines(out: &mut String, room: &super::Room) {
    const IN: &str = "       ";
    let order = match room.queueing {
        super::Queueing::Fifo => "fifo",
        super::Queueing::Random => "random",
    };
    let _ = writeln!(
        out,
        "{IN}waiting_room: {} at once, {} per minute, sessions of {}, {order}",
        room.total_active,
        room.new_per_minute,
        dur(room.session)
    );
    if let Some((from, start)) = room.prequeue {
        let _ = writeln!(
            out,
            "{IN}pre-queue: {} to {}, shuffled at the start",
            time(Some(from), ""),
            time(Some(start), "")
        );
    }
    let _ = writeln!(
        out,
        "{IN}cookie: {}{}, page {} / JSON {} for {}{}",
        room.cookie,
        if room.secure_cookie { " (Secure)" } else { "" },
        room.page_status.as_u16(),
        room.json_status.as_u16(),
        room.json_for.join(", "),
        if room.page_template.is_some() {
            ", own page template"
        } else {
            ""
        }
    );
}

fn time(t: Option<SystemTime>, none: &str) -> String {
    t.map_or_else(
        || none.to_owned(),
        |t| humantime::format_rfc3339_seconds(t).to_string(),
    )
}

fn dur(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

fn show_rate(r: &Rate) -> String {
    let per_sec = 1.0 / r.period.as_secs_f64();
    let rate = if per_sec >= 1.0 {
        format!("{per_sec:.0}/s burst {}", r.burst)
    } else {
        format!("{:.0}/min burst {}", per_sec * 60.0, r.burst)
    };
    match r.global {
        None => rate,
        // Counted across every instance sharing the store, behind this instance's own bucket.
        Some(on_error) => format!("{rate} scope=global on_store_error={}", on_error.as_str()),
    }
}

/// Hides a password in a Redis URL: the one in `user:password@` (a lone `secret@` too, which
/// some clients read as a password), and a `pass=` / `password=` query parameter
/// (`redis+unix:///path?pass=…`).
pub fn mask_password(url: &str) -> String {
    const MASK: &str = "****";
    let (head, rest) = match url.find("://") {
        Some(i) => url.split_at(i + 3),
        None => ("", url),
    };
    let auth_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(auth_end);
    let authority = match authority.rfind('@') {
        Some(at) => {
            let (userinfo, host) = authority.split_at(at);
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{user}:{MASK}{host}"),
                None => format!("{MASK}{host}"),
            }
        }
        None => authority.to_owned(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let params: Vec<String> = query
                .split('&')
                .map(|kv| match kv.split_once('=') {
                    Some((k, _)) if k == "pass" || k == "password" => format!("{k}={MASK}"),
                    _ => kv.to_owned(),
                })
                .collect();
            format!("{path}?{}", params.join("&"))
        }
        None => tail.to_owned(),
    };
    format!("{head}{authority}{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_masked() {
        for (url, shown) in [
            ("redis://127.0.0.1:6379", "redis://127.0.0.1:6379"),
            ("redis://:s3cret@host:6379/0", "redis://:****@host:6379/0"),
            (
                "rediss://app:s3cret@host:6380",
                "rediss://app:****@host:6380",
            ),
            ("redis://s3cret@host", "redis://****@host"),
            ("redis://u:p@ss@host/1", "redis://u:****@host/1"),
            (
                "redis+unix:///run/redis.sock?db=1&pass=s3cret",
                "redis+unix:///run/redis.sock?db=1&pass=****",
            ),
            (
                "unix:///run/redis.sock?password=s3cret",
                "unix:///run/redis.sock?password=****",
            ),
        ] {
            assert_eq!(mask_password(url), shown, "{url}");
        }
    }

    #[test]
    fn sale_settings_are_listed() {
        let yaml = "upstream: { url: \"http://127.0.0.1:3000\" }\n\
                    store: { redis: \"redis://:pw@127.0.0.1:6379\" }\n\
                    routes:\n\
                    \x20 - name: buy\n\
                    \x20   match: { method: POST, path: /api/order }\n\
                    \x20   identity: { cookie: uid }\n\
                    \x20   sale:\n\
                    \x20     sku: { json: sku }\n\
                    \x20     quantity: { json: qty }\n\
                    \x20     per_user_limit: 3\n\
                    \x20     start: 2026-11-27T09:00:00Z\n\
                    \x20     end: 2026-11-27T10:00:00Z\n\
                    \x20     sold_out_recheck: 250ms\n";
        let text = describe(&super::super::parse(yaml, "t.yaml").unwrap_or_else(|e| panic!("{e}")));
        for line in [
            "store: redis redis://:****@127.0.0.1:6379 (connections 4, response_timeout 250ms, key_prefix fg)",
            "admin: off",
            "trusted_proxies: none (X-Forwarded-For is not believed)",
            "  1. buy POST /api/order identity=cookie:uid",
            "       sale: sku from json field `sku`",
            "       quantity: from json field `qty`",
            "       per_user_limit: 3",
            "       window: start 2026-11-27T09:00:00Z, end 2026-11-27T10:00:00Z",
            "       release_on: connect_error (always)",
            "       sold_out_recheck: 250ms",
            "       max_body: 16384 bytes (read for the JSON field)",
            "       limits: none",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing `{line}` in\n{text}"
            );
        }
        assert!(!text.contains("pw"), "{text}");
    }

    #[test]
    fn global_buckets_say_so() {
        let yaml = "upstream: { url: \"http://127.0.0.1:3000\" }\n\
                    routes:\n\
                    \x20 - name: api\n\
                    \x20   match: { path: \"/api/{*rest}\" }\n\
                    \x20   identity: { header: X-User-Id }\n\
                    \x20   limits:\n\
                    \x20     route: { per_second: 100, scope: global }\n\
                    \x20     per_user: { per_second: 1, burst: 1, scope: global, on_store_error: closed }\n\
                    \x20     per_ip: { per_second: 5 }\n";
        let text = describe(&super::super::parse(yaml, "t.yaml").unwrap_or_else(|e| panic!("{e}")));
        let line = "  1. api * /api/{*rest} identity=header:x-user-id \
                    route=100/s burst 100 scope=global on_store_error=open per_ip=5/s burst 5 \
                    per_user=1/s burst 1 scope=global on_store_error=closed";
        assert!(
            text.lines().any(|l| l == line),
            "missing `{line}` in\n{text}"
        );
    }
}
