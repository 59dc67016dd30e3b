//! The admin API's answers for people: what the CLI prints without `--json`. Every function
//! takes the answer's JSON as it came and never panics on a field that is missing or odd
//! (it prints `?` instead).

use std::fmt::Write as _;
use std::time::{Duration, UNIX_EPOCH};

use serde_json::Value;

/// `flashgate sale status`, for people, with the audit checked.
pub fn sale_status(sku: &str, v: &Value) -> String {
    let counts = |kind: &str| {
        let c = &v[kind];
        let n = |s: &str| c[s].as_u64().unwrap_or(0);
        format!(
            "held {}, sold {}, released {}, uncertain {}",
            n("held"),
            n("sold"),
            n("released"),
            n("uncertain")
        )
    };
    let state = if v["closed"] == true {
        "closed"
    } else {
        "open"
    };
    let stock = v["stock"].as_u64();
    let added = v["added"].as_u64();
    let units = &v["units"];
    let u = |s: &str| units[s].as_u64().unwrap_or(0);
    let audit = match (added, stock) {
        (Some(added), Some(stock)) => {
            let total = u128::from(stock)
                + u128::from(u("held"))
                + u128::from(u("sold"))
                + u128::from(u("uncertain"));
            let verdict = if u128::from(added) == total {
                "ok"
            } else {
                "MISMATCH"
            };
            format!(
                "{verdict}: added {added} {} stock {stock} + held {} + sold {} + uncertain {}{}",
                if verdict == "ok" { "=" } else { "!=" },
                u("held"),
                u("sold"),
                u("uncertain"),
                if verdict == "ok" {
                    String::new()
                } else {
                    format!(" (= {total}); reconcile `uncertain` orders and check Redis")
                },
            )
        }
        (None, Some(_)) => "not recorded yet: the next stock set or add starts it".to_owned(),
        _ => "n/a (not configured)".to_owned(),
    };
    format!(
        "sale {sku}: {state}\n\
         \x20 stock         {}\n\
         \x20 added         {}\n\
         \x20 buyers        {}\n\
         \x20 units         {}\n\
         \x20 reservations  {}\n\
         \x20 audit         {audit}",
        stock.map_or("not configured".to_owned(), |s| s.to_string()),
        added.map_or("not recorded".to_owned(), |a| a.to_string()),
        v["buyers"].as_u64().unwrap_or(0),
        counts("units"),
        counts("reservations"),
    )
}

/// A refusal from the admin API, for people: the status, the reason, what to do.
pub fn human_error(status: http::StatusCode, sku: &str, v: &Value) -> String {
    let reason = v["error"].as_str().unwrap_or("error");
    let message = v["message"].as_str().unwrap_or("");
    if reason == "stock_changed" {
        let current = v["stock"]
            .as_u64()
            .map_or("not configured".to_owned(), |c| c.to_string());
        let expected = v["expected"]
            .as_u64()
            .map_or("?".to_owned(), |e| e.to_string());
        return format!(
            "{sku}: stock changed: it is {current}, not {expected}; nothing was set ({status} {reason})"
        );
    }
    if reason == "not_resolvable" {
        let id = v["id"].as_str().unwrap_or("?");
        return format!("{sku}: reservation {id} not resolved: {message} ({status} {reason})");
    }
    match v["field"].as_str() {
        Some(field) => format!("{status} {reason}: {field}: {message}"),
        None => format!("{status} {reason}: {message}"),
    }
}

/// `1 unit`, `2 units`.
fn plural(n: u64, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

/// A number field, or `?`.
fn num(v: &Value) -> String {
    v.as_u64().map_or_else(|| "?".to_owned(), |n| n.to_string())
}

/// A count that is absent when the sale has none (no stock set yet, nothing ever added): `-`.
fn num_or_dash(v: &Value) -> String {
    v.as_u64().map_or_else(|| "-".to_owned(), |n| n.to_string())
}

/// Rows as a table: columns padded to their widest cell; the first `left` columns aligned
/// left, the others right (numbers).
fn table(header: &[&str], rows: &[Vec<String>], left: usize) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.zip(&widths).enumerate() {
            if i > 0 {
                out.push_str("  ");
            }
            let pad = w.saturating_sub(cell.chars().count());
            if i < left {
                out.push_str(cell);
                out.extend(std::iter::repeat_n(' ', pad));
            } else {
                out.extend(std::iter::repeat_n(' ', pad));
                out.push_str(cell);
            }
        }
        out.trim_end().to_owned()
    };
    let mut out = line(&mut header.iter().copied());
    for row in rows {
        out.push('\n');
        out.push_str(&line(&mut row.iter().map(String::as_str)));
    }
    out
}

/// A duration in milliseconds the way people read it (`1m 30s`; whole seconds past a minute).
fn age(ms: &Value) -> String {
    match ms.as_u64() {
        None => "?".to_owned(),
        Some(ms) if ms >= 60_000 => {
            humantime::format_duration(Duration::from_secs(ms / 1000)).to_string()
        }
        Some(ms) => humantime::format_duration(Duration::from_millis(ms)).to_string(),
    }
}

/// `flashgate audit`: one row per sale, then every problem, then the verdict.
pub fn audit(v: &Value) -> String {
    let sales = v["sales"].as_array().map_or(&[][..], Vec::as_slice);
    let held_older_than = age(&v["held_older_than_ms"]);
    if sales.is_empty() {
        return "audit ok: no sales to audit (no SKU was ever stocked)".to_owned();
    }
    let rows: Vec<Vec<String>> = sales
        .iter()
        .map(|s| {
            let u = &s["units"];
            let verdict = match s["verdict"].as_str().unwrap_or("?") {
                "ok" => "ok".to_owned(),
                other => other.to_uppercase(),
            };
            vec![
                s["sku"].as_str().unwrap_or("?").to_owned(),
                verdict,
                num_or_dash(&s["added"]),
                num_or_dash(&s["stock"]),
                num(&u["held"]),
                num(&u["sold"]),
                num(&u["uncertain"]),
                format!(
                    "{}{}",
                    num(&s["stale_held"]),
                    if s["stale_held_more"] == true {
                        "+"
                    } else {
                        ""
                    }
                ),
            ]
        })
        .collect();
    let mut out = table(
        &[
            "SKU",
            "VERDICT",
            "ADDED",
            "STOCK",
            "HELD",
            "SOLD",
            "UNCERTAIN",
            "STALE HELD",
        ],
        &rows,
        2,
    );
    let mut failed = 0;
    let mut uncertain = 0u64;
    for s in sales {
        uncertain += s["units"]["uncertain"].as_u64().unwrap_or(0);
        if s["ok"] != true {
            failed += 1;
        }
        for p in s["problems"].as_array().into_iter().flatten() {
            let _ = write!(
                out,
                "\n  {}: {}",
                s["sku"].as_str().unwrap_or("?"),
                p.as_str().unwrap_or("?")
            );
        }
    }
    out.push('\n');
    if failed == 0 {
        let _ = write!(
            out,
            "audit ok ({}): added = stock + held + sold + uncertain, nothing held longer than \
             {held_older_than}",
            plural(sales.len() as u64, "sale")
        );
    } else {
        let _ = write!(
            out,
            "audit FAILED: {failed} of {} (held longer than {held_older_than} counts as \
             left behind)",
            plural(sales.len() as u64, "sale")
        );
    }
    if uncertain > 0 {
        let _ = write!(
            out,
            "\n{} still uncertain: reconcile with `flashgate reservations SKU`",
            plural(uncertain, "unit")
        );
    }
    if v["truncated"] == true {
        let _ = write!(
            out,
            "\nnot every sale was audited (too many to list): name the SKUs to audit the rest"
        );
    }
    out
}

/// `flashgate sale list`: one row per sale, units by state, and whether its books balance.
pub fn sales(v: &Value) -> String {
    let sales = v["sales"].as_array().map_or(&[][..], Vec::as_slice);
    if sales.is_empty() {
        return "no sales: no SKU was ever stocked".to_owned();
    }
    let rows: Vec<Vec<String>> = sales
        .iter()
        .map(|s| {
            let u = &s["units"];
            vec![
                s["sku"].as_str().unwrap_or("?").to_owned(),
                if s["closed"] == true {
                    "closed"
                } else {
                    "open"
                }
                .to_owned(),
                num_or_dash(&s["stock"]),
                num_or_dash(&s["added"]),
                num(&s["buyers"]),
                num(&u["held"]),
                num(&u["sold"]),
                num(&u["released"]),
                num(&u["uncertain"]),
                books(s).to_owned(),
            ]
        })
        .collect();
    let mut out = table(
        &[
            "SKU",
            "SALE",
            "STOCK",
            "ADDED",
            "BUYERS",
            "HELD",
            "SOLD",
            "RELEASED",
            "UNCERTAIN",
            "BOOKS",
        ],
        &rows,
        2,
    );
    out.truncate(out.trim_end().len());
    if v["truncated"] == true {
        out.push_str("\n… more sales: pass a larger --limit");
    }
    out
}

/// Whether a status balances: `added == stock + held + sold + uncertain` (units).
fn books(s: &Value) -> &'static str {
    let u = |k: &str| u128::from(s["units"][k].as_u64().unwrap_or(0));
    match (s["added"].as_u64(), s["stock"].as_u64()) {
        (Some(added), Some(stock)) => {
            if u128::from(added) == u128::from(stock) + u("held") + u("sold") + u("uncertain") {
                "ok"
            } else {
                "MISMATCH"
            }
        }
        (None, Some(_)) => "not recorded",
        _ => "not configured",
    }
}

/// `flashgate reservations SKU`: the reservations listed, oldest first.
pub fn reservations(v: &Value) -> String {
    let sku = v["sku"].as_str().unwrap_or("?");
    let state = v["state"].as_str().unwrap_or("?");
    let list = v["reservations"].as_array().map_or(&[][..], Vec::as_slice);
    let older = match v["older_than_ms"].as_u64() {
        Some(0) | None => String::new(),
        Some(_) => format!(" older than {}", age(&v["older_than_ms"])),
    };
    if list.is_empty() {
        return format!("sale {sku}: no {state} reservations{older}");
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|r| {
            let at = r["reserved_at_ms"].as_u64().map_or_else(
                || "?".to_owned(),
                |ms| {
                    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms))
                        .to_string()
                },
            );
            vec![
                r["id"].as_str().unwrap_or("?").to_owned(),
                r["user"].as_str().unwrap_or("?").to_owned(),
                at,
                num(&r["quantity"]),
                age(&r["age_ms"]),
            ]
        })
        .collect();
    let more = if v["truncated"] == true {
        " or more"
    } else {
        ""
    };
    let count = plural(list.len() as u64, &format!("{state} reservation"));
    let mut out = format!("sale {sku}: {count}{more}{older}, oldest first\n");
    out.push_str(&table(
        &["ID", "USER", "RESERVED AT", "QTY", "AGE"],
        &rows,
        3,
    ));
    if v["truncated"] == true {
        out.push_str("\n… more: resolve these, then list again (or pass a larger --limit)");
    }
    if state == "uncertain" {
        let _ = write!(
            out,
            "\nCheck each with the shop's orders, then: flashgate reservations resolve {sku} ID \
             sold|released"
        );
    }
    out
}

/// `flashgate reservations resolve`: what changed.
pub fn resolved(v: &Value) -> String {
    let (sku, id) = (
        v["sku"].as_str().unwrap_or("?"),
        v["id"].as_str().unwrap_or("?"),
    );
    let (from, to) = (
        v["from"].as_str().unwrap_or("?"),
        v["to"].as_str().unwrap_or("?"),
    );
    let units = v["quantity"]
        .as_u64()
        .map_or_else(|| "? units".to_owned(), |n| plural(n, "unit"));
    let what = if to == "released" {
        format!(
            ": {units} back in stock (now {}); the buyer may buy again",
            num(&v["stock"])
        )
    } else {
        format!(": {units} sold")
    };
    format!("{sku}: reservation {id} resolved {from} → {to}{what}")
}

/// `flashgate room status`, for people.
pub fn room_status(v: &Value) -> String {
    let n = |k: &str| num(&v[k]);
    let wait = v["estimated_wait_s"].as_u64().map_or("?".to_owned(), |s| {
        humantime::format_duration(Duration::from_secs(s)).to_string()
    });
    let order = match (v["queueing"].as_str(), v["prequeue"] == true) {
        (Some(q), true) => format!("{q}, with a pre-queue shuffled at the start"),
        (Some(q), false) => q.to_owned(),
        (None, _) => "?".to_owned(),
    };
    format!(
        "room {}: {}\n\
         \x20 queued               {}\n\
         \x20 active               {} of {}\n\
         \x20 admitted last minute {} (pace {} per minute)\n\
         \x20 admitted in all      {}\n\
         \x20 estimated wait       {wait} (for a visitor joining now)\n\
         \x20 order                {order}; sessions of {}s",
        v["room"].as_str().unwrap_or("?"),
        v["mode"].as_str().unwrap_or("?"),
        n("queued"),
        n("active"),
        n("total_active"),
        n("admitted_last_minute"),
        n("new_per_minute"),
        n("admitted_total"),
        n("session_s"),
    )
}

/// `flashgate room list`, for people.
pub fn rooms(v: &Value) -> String {
    let rows: Vec<Vec<String>> = v["rooms"]
        .as_array()
        .map(|a| a.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|r| {
            vec![
                r["room"].as_str().unwrap_or("?").to_owned(),
                r["mode"].as_str().unwrap_or("?").to_owned(),
                num(&r["queued"]),
                format!("{}/{}", num(&r["active"]), num(&r["total_active"])),
                num(&r["admitted_last_minute"]),
                num(&r["estimated_wait_s"]),
            ]
        })
        .collect();
    if rows.is_empty() {
        return "no waiting room in the running config".to_owned();
    }
    table(
        &["room", "mode", "queued", "active", "admitted/min", "wait s"],
        &rows,
        2,
    )
}
