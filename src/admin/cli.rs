//! The operator's commands that talk to a running flashgate's admin API: `flashgate stock …`,
//! `sale …`, `audit …` and `reservations …`. `main.rs` parses them (clap) and hands them here.
//!
//! They never succeed silently: an answer without `X-Flashgate-Admin: 1` is refused as not
//! flashgate's, a refused connection names the address tried, an error answer exits 1 with its
//! status and reason. Exit codes: 0 done (an audit that passed), 1 refused, failed or an audit
//! that found a problem, 2 a bad command line (clap's usage errors: a bad SKU, reservation id,
//! duration or count in the newer commands).

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Subcommand, ValueEnum};
use http::{Method, StatusCode};
use serde_json::{Value, json};

mod room;
pub use room::{RoomAction, room};

use super::client::{self, CallError};
use super::render;
use crate::ids::{ReservationId, Sku};
use crate::store::MAX_UNITS;

/// How long an audit or a listing may take (one store read per sale).
const LONG_CALL: Duration = Duration::from_secs(120);

#[derive(clap::Args)]
pub struct AdminArgs {
    /// Base URL of flashgate's admin API.
    #[arg(long, global = true, default_value = "http://127.0.0.1:9090")]
    admin: String,
    /// Bearer token of the admin API.
    #[arg(
        long,
        global = true,
        env = "FLASHGATE_ADMIN_TOKEN",
        hide_env_values = true
    )]
    token: Option<String>,
    /// Print the admin API's JSON answer as it is (for scripts), errors included.
    #[arg(long, global = true)]
    json: bool,
}

/// Units on the command line: 0 to 2^53 - 1 (what the stores can count exactly).
fn units_arg() -> clap::builder::RangedU64ValueParser<u64> {
    clap::value_parser!(u64).range(0..=MAX_UNITS)
}

/// A delta on the command line: within ±(2^53 - 1).
fn delta_arg() -> clap::builder::RangedI64ValueParser<i64> {
    let max = i64::try_from(MAX_UNITS).unwrap_or(i64::MAX);
    clap::value_parser!(i64).range(-max..=max)
}

fn sku_arg(s: &str) -> Result<Sku, String> {
    Sku::parse(s).map_err(|e| e.to_string())
}

fn id_arg(s: &str) -> Result<ReservationId, String> {
    ReservationId::parse(s).map_err(|e| e.to_string())
}

/// A duration like `60s`, `500ms`, `2m`.
fn duration_arg(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (write it like 60s, 500ms or 2m)"))
}

/// A refresh interval: at least 100ms.
fn interval_arg(s: &str) -> Result<Duration, String> {
    let d = duration_arg(s)?;
    if d < Duration::from_millis(100) {
        return Err("the interval must be at least 100ms".into());
    }
    Ok(d)
}

#[derive(Subcommand)]
pub enum StockAction {
    /// Set the units left (0 to 2^53 - 1).
    Set {
        sku: String,
        #[arg(value_parser = units_arg())]
        units: u64,
        /// Only if the stock is still this many units (compare-and-set); otherwise print
        /// the current stock, change nothing and exit 1.
        #[arg(long, value_parser = units_arg())]
        expect: Option<u64>,
    },
    /// Add units (negative removes); the stock must stay within 0 to 2^53 - 1.
    Add {
        sku: String,
        #[arg(allow_hyphen_values = true, value_parser = delta_arg())]
        delta: i64,
    },
    /// Read the units left.
    Get { sku: String },
}

#[derive(Subcommand)]
pub enum SaleAction {
    /// Stock, units ever added, open or closed, buyers, reservations and units by state, and
    /// whether the books balance.
    Status {
        sku: String,
        /// Refresh every --interval until Ctrl-C (with --json: one JSON line per refresh).
        #[arg(long)]
        watch: bool,
        /// Time between two refreshes of --watch (at least 100ms).
        #[arg(long, default_value = "2s", value_parser = interval_arg, requires = "watch")]
        interval: Duration,
        /// Stop --watch after this many refreshes.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..), requires = "watch")]
        count: Option<u64>,
    },
    /// Every SKU ever stocked: stock and units by state.
    List {
        /// At most this many sales (1 to 10000; default 1000).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=10_000))]
        limit: Option<u64>,
    },
    /// Close the sale: every buyer gets 410 `closed`, on every instance; stock is untouched.
    Close { sku: String },
    /// Reopen a closed sale.
    Open { sku: String },
}

/// `flashgate audit [SKU…]`.
#[derive(clap::Args)]
pub struct AuditArgs {
    /// The SKUs to audit (default: every SKU ever stocked).
    #[arg(value_parser = sku_arg)]
    skus: Vec<Sku>,
    /// A reservation `held` longer than this fails the audit (default: twice the serving
    /// flashgate's upstream.request_timeout, at least 60s).
    #[arg(long, value_parser = duration_arg)]
    held_older_than: Option<Duration>,
}

/// `flashgate reservations SKU` lists; `flashgate reservations resolve …` resolves.
#[derive(clap::Args)]
pub struct ReservationsArgs {
    #[command(subcommand)]
    action: Option<ReservationsAction>,
    #[command(flatten)]
    list: ListArgs,
}

#[derive(clap::Args)]
struct ListArgs {
    /// The sale.
    #[arg(value_parser = sku_arg, required = true)]
    sku: Option<Sku>,
    /// Which reservations.
    #[arg(long, value_enum, default_value_t = StateArg::Uncertain)]
    state: StateArg,
    /// Only those reserved at least this long ago.
    #[arg(long, value_parser = duration_arg)]
    older_than: Option<Duration>,
    /// At most this many (1 to 1000; default 100).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1000))]
    limit: Option<u64>,
}

#[derive(Subcommand)]
enum ReservationsAction {
    /// List a sale's reservations (what `flashgate reservations SKU` does; spelled out, it
    /// also lists a SKU named `list` or `resolve`).
    List(ListArgs),
    /// Settle one reservation after the shop checked its orders: `sold` (the shop has the
    /// order) or `released` (it has not: the units go back to stock, the buyer may buy
    /// again). Only an `uncertain` reservation, or one `held` longer than the audit's default
    /// threshold, is resolved, and only once.
    Resolve {
        #[arg(value_parser = sku_arg)]
        sku: Sku,
        #[arg(value_parser = id_arg)]
        id: ReservationId,
        #[arg(value_enum)]
        to: ResolveTo,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum StateArg {
    Uncertain,
    Held,
}

#[derive(Clone, Copy, ValueEnum)]
enum ResolveTo {
    Sold,
    Released,
}

/// `flashgate stock …`.
pub fn stock(admin: &AdminArgs, action: StockAction) -> ExitCode {
    let (op, sku) = match action {
        StockAction::Set { sku, units, expect } => (Op::Set { units, expect }, sku),
        StockAction::Add { sku, delta } => (Op::Add { delta }, sku),
        StockAction::Get { sku } => (Op::Get, sku),
    };
    one_call(admin, op, &sku)
}

/// `flashgate sale …`.
pub fn sale(admin: &AdminArgs, action: SaleAction) -> ExitCode {
    let (op, sku) = match action {
        SaleAction::Status {
            sku,
            watch: true,
            interval,
            count,
        } => return watch(admin, &sku, interval, count),
        SaleAction::Status { sku, .. } => (Op::Status, sku),
        SaleAction::Close { sku } => (Op::Close, sku),
        SaleAction::Open { sku } => (Op::Open, sku),
        SaleAction::List { limit } => {
            let path = match limit {
                Some(n) => format!("/v1/sales?limit={n}"),
                None => "/v1/sales".to_owned(),
            };
            return run(admin, async |token| {
                let reply = ask(admin, token, Method::GET, &path, None, LONG_CALL).await?;
                Ok(print_answer(admin, &reply, "sales", render::sales))
            });
        }
    };
    one_call(admin, op, &sku)
}

/// `flashgate audit [SKU…]`: exit 0 only when every sale passed.
pub fn audit(admin: &AdminArgs, args: AuditArgs) -> ExitCode {
    let mut query = form_urlencoded::Serializer::new(String::new());
    for sku in &args.skus {
        query.append_pair("sku", sku.as_str());
    }
    if let Some(d) = args.held_older_than {
        query.append_pair("held_older_than", &format!("{}ms", d.as_millis()));
    }
    let query = query.finish();
    let path = if query.is_empty() {
        "/v1/audit".to_owned()
    } else {
        format!("/v1/audit?{query}")
    };
    run(admin, async |token| {
        let reply = ask(admin, token, Method::GET, &path, None, LONG_CALL).await?;
        let answered = print_answer(admin, &reply, "audit", render::audit);
        Ok(answered && reply.json.as_ref().is_some_and(|v| v["ok"] == true))
    })
}

/// `flashgate reservations …`.
pub fn reservations(admin: &AdminArgs, args: ReservationsArgs) -> ExitCode {
    let list = match args.action {
        Some(ReservationsAction::Resolve { sku, id, to }) => return resolve(admin, &sku, &id, to),
        Some(ReservationsAction::List(list)) => list,
        None => args.list,
    };
    let Some(sku) = list.sku else {
        // clap requires it; say so rather than panic should that ever change.
        eprintln!("which sale? flashgate reservations SKU");
        return ExitCode::from(2);
    };
    let mut query = form_urlencoded::Serializer::new(String::new());
    query.append_pair(
        "state",
        match list.state {
            StateArg::Uncertain => "uncertain",
            StateArg::Held => "held",
        },
    );
    if let Some(d) = list.older_than {
        query.append_pair("older_than", &format!("{}ms", d.as_millis()));
    }
    if let Some(n) = list.limit {
        query.append_pair("limit", &n.to_string());
    }
    let path = format!(
        "/v1/sales/{}/reservations?{}",
        segment(&sku),
        query.finish()
    );
    run(admin, async |token| {
        let reply = ask(admin, token, Method::GET, &path, None, LONG_CALL).await?;
        Ok(print_answer(
            admin,
            &reply,
            sku.as_str(),
            render::reservations,
        ))
    })
}

fn resolve(admin: &AdminArgs, sku: &Sku, id: &ReservationId, to: ResolveTo) -> ExitCode {
    let path = format!("/v1/sales/{}/reservations/{id}/resolve", segment(sku));
    let to = match to {
        ResolveTo::Sold => "sold",
        ResolveTo::Released => "released",
    };
    run(admin, async |token| {
        let body = Some(json!({ "to": to }));
        let reply = ask(
            admin,
            token,
            Method::POST,
            &path,
            body,
            client::CALL_TIMEOUT,
        )
        .await?;
        Ok(print_answer(admin, &reply, sku.as_str(), render::resolved))
    })
}

/// `sale status --watch`: the status every `interval`, until Ctrl-C or `count` refreshes.
/// A refresh that fails is reported and the next one tried. Ctrl-C ends it with exit 0; after
/// `count` refreshes the exit code is the last refresh's.
fn watch(admin: &AdminArgs, sku: &str, interval: Duration, count: Option<u64>) -> ExitCode {
    let Ok(segment) = client::sku_segment(sku) else {
        return one_call(admin, Op::Status, sku);
    };
    let path = format!("/v1/sales/{segment}");
    let clear = !admin.json && std::io::stdout().is_terminal();
    run(admin, async |token| {
        let ctrl_c = tokio::signal::ctrl_c();
        tokio::pin!(ctrl_c);
        let mut done = 0u64;
        loop {
            if clear {
                print!("\x1b[H\x1b[2J");
            }
            if !admin.json {
                let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
                let every = humantime::format_duration(interval);
                println!("{now}  every {every} (Ctrl-C to stop)");
            }
            let ok = match ask(admin, token, Method::GET, &path, None, client::CALL_TIMEOUT).await {
                Ok(reply) => print_answer(admin, &reply, sku, |v| render::sale_status(sku, v)),
                Err(()) => false,
            };
            if !admin.json && !clear {
                println!();
            }
            done += 1;
            if count.is_some_and(|c| done >= c) {
                return Ok(ok);
            }
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                _ = &mut ctrl_c => return Ok(true),
            }
        }
    })
}

/// One of the original one-call commands.
#[derive(Debug, Clone, Copy)]
enum Op {
    Set { units: u64, expect: Option<u64> },
    Add { delta: i64 },
    Get,
    Status,
    Close,
    Open,
}

impl Op {
    /// The admin API call: method, path, body.
    fn request(self, sku: &str) -> (Method, String, Option<Value>) {
        match self {
            Op::Set { units, expect } => {
                let mut body = json!({ "stock": units });
                if let Some(e) = expect {
                    body["expect"] = json!(e);
                }
                (Method::PUT, format!("/v1/stock/{sku}"), Some(body))
            }
            Op::Add { delta } => (
                Method::POST,
                format!("/v1/stock/{sku}/add"),
                Some(json!({ "delta": delta })),
            ),
            Op::Get => (Method::GET, format!("/v1/stock/{sku}"), None),
            Op::Status => (Method::GET, format!("/v1/sales/{sku}"), None),
            Op::Close => (Method::POST, format!("/v1/sales/{sku}/close"), None),
            Op::Open => (Method::POST, format!("/v1/sales/{sku}/open"), None),
        }
    }

    /// A successful answer, for people.
    fn human(self, sku: &str, v: &Value) -> String {
        let n = |key: &str| v[key].as_u64().map_or("?".to_owned(), |n| n.to_string());
        match self {
            Op::Set { expect: None, .. } => format!("{sku}: stock set to {}", n("stock")),
            Op::Set {
                expect: Some(e), ..
            } => format!("{sku}: stock set to {} (was {e})", n("stock")),
            Op::Add { delta } => format!("{sku}: stock {} ({delta:+})", n("stock")),
            Op::Get => format!("{sku}: {} units left", n("stock")),
            Op::Close => format!(
                "{sku}: sale closed: buyers get 410 closed on every instance; stock unchanged \
                 (reopen with `flashgate sale open {sku}`)"
            ),
            Op::Open => format!("{sku}: sale open"),
            Op::Status => render::sale_status(sku, v),
        }
    }
}

/// Runs one stock or sale command. The SKU is checked (and percent-encoded) before anything
/// is sent: an invalid one exits 1, as these commands always have.
fn one_call(admin: &AdminArgs, op: Op, sku: &str) -> ExitCode {
    let segment = match client::sku_segment(sku) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let (method, path, body) = op.request(&segment);
    run(admin, async |token| {
        let reply = ask(admin, token, method, &path, body, client::CALL_TIMEOUT).await?;
        Ok(print_answer(admin, &reply, sku, |v| op.human(sku, v)))
    })
}

/// A SKU as a path segment (a parsed SKU always is one).
fn segment(sku: &Sku) -> String {
    client::sku_segment(sku.as_str()).unwrap_or_else(|_| sku.to_string())
}

/// Runs `command` with the token on a small runtime. `Ok(true)`: exit 0; `Ok(false)` or
/// `Err(())` (the reason already printed): exit 1.
fn run(admin: &AdminArgs, command: impl AsyncFnOnce(&str) -> Result<bool, ()>) -> ExitCode {
    let Some(token) = admin.token.as_deref() else {
        eprintln!("no admin token: pass --token or set FLASHGATE_ADMIN_TOKEN");
        return ExitCode::FAILURE;
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(command(token)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) | Err(()) => ExitCode::FAILURE,
    }
}

/// An answer from flashgate's admin API.
struct Reply {
    status: StatusCode,
    body: String,
    json: Option<Value>,
}

/// Sends one call. Anything but an answer from flashgate's admin API (nothing listening, a
/// timeout, another server on that port) is printed with what to check, and is `Err`.
async fn ask(
    admin: &AdminArgs,
    token: &str,
    method: Method,
    path: &str,
    body: Option<Value>,
    timeout: Duration,
) -> Result<Reply, ()> {
    let answer = match client::call_within(&admin.admin, token, method, path, body, timeout).await {
        Ok(a) => a,
        Err(e @ CallError::Refused { .. }) => {
            eprintln!(
                "cannot reach flashgate's admin API: {e}.\n\
                 Is flashgate running with `admin.listen` at that address (and its admin \
                 token variable set, without which the admin API is off)? Check \
                 admin.listen in its config, or point this command elsewhere with --admin URL."
            );
            return Err(());
        }
        Err(e) => {
            eprintln!("cannot reach flashgate's admin API: {e}");
            return Err(());
        }
    };
    if !answer.from_admin {
        let mut head: String = answer.body.chars().take(200).collect();
        if head.len() < answer.body.len() {
            head.push('…');
        }
        eprintln!(
            "{}{path} answered {} but is not flashgate's admin API (no X-Flashgate-Admin \
             header; Server: {}; body: {head:?}), so flashgate's admin API did not do this. \
             Check --admin against admin.listen in flashgate's config.",
            admin.admin.trim_end_matches('/'),
            answer.status,
            answer.server.as_deref().unwrap_or("not given"),
        );
        return Err(());
    }
    Ok(Reply {
        status: answer.status,
        json: serde_json::from_str(&answer.body).ok(),
        body: answer.body,
    })
}

/// Prints an answer: as it came with `--json`, else for people (`human` on success, the
/// status, reason and message of a refusal on stderr). True when the call succeeded.
fn print_answer(
    admin: &AdminArgs,
    reply: &Reply,
    sku: &str,
    human: impl FnOnce(&Value) -> String,
) -> bool {
    let success = reply.status.is_success();
    if admin.json {
        println!("{}", reply.body);
        if !success {
            eprintln!("{}", reply.status);
        }
        return success;
    }
    let Some(v) = &reply.json else {
        eprintln!("{}: {}", reply.status, reply.body);
        return false;
    };
    if success {
        println!("{}", human(v));
    } else {
        eprintln!("{}", render::human_error(reply.status, sku, v));
    }
    success
}
