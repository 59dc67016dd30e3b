//! The `flashgate` command: `serve` runs the proxy, `check` validates a config like `nginx -t`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use flashgate::admin::client::{self, CallError};
use flashgate::config;
use flashgate::state::App;
use flashgate::store::MAX_UNITS;
use serde_json::{Value, json};
use tracing::{error, info, warn};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "flashgate",
    version,
    about = "Admission sidecar for flash sales"
)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Serve {
        #[arg(long, short, default_value = "config/flashgate.yaml")]
        config: PathBuf,
        /// Listen here instead of the config's `listen` (e.g. 0.0.0.0:8080 in a container).
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
    },
    /// Exit 0 if GET URL answers 200 (for container health checks).
    Health {
        #[arg(long, default_value = "http://127.0.0.1:8080/healthz")]
        url: String,
    },
    /// Validate a config and print the compiled routes; exit 1 on error.
    Check {
        #[arg(long, short, default_value = "config/flashgate.yaml")]
        config: PathBuf,
    },
    /// Set, add or read a SKU's stock through the admin API.
    Stock {
        #[command(subcommand)]
        action: StockAction,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// A sale's status, or close and reopen it, through the admin API.
    Sale {
        #[command(subcommand)]
        action: SaleAction,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Check an `X-Flashgate-Signature` by hand: the request as the backend received it, and
    /// the key from an environment variable. Exit 0 when it holds (for debugging a backend).
    Verify {
        /// Environment variable holding the signing key.
        #[arg(long, default_value = "FLASHGATE_SIGNING_KEY")]
        key_env: String,
        /// The key's id (`signing.key_id`).
        #[arg(long, default_value = "k1")]
        key_id: String,
        /// The request's method, e.g. POST.
        #[arg(long)]
        method: String,
        /// The request target as received: path and `?query`.
        #[arg(long)]
        path: String,
        /// A header line as received, `Name: value`; repeat for each `X-Flashgate-*` header.
        #[arg(long = "header", short = 'H')]
        headers: Vec<String>,
        /// Refuse signatures older than this many seconds.
        #[arg(long, default_value_t = 60)]
        max_age: u64,
    },
    /// A stand-in shop backend for trying flashgate out (NOT for production).
    DemoUpstream {
        #[arg(long, default_value = "127.0.0.1:3000")]
        listen: std::net::SocketAddr,
    },
}

#[derive(clap::Args)]
struct AdminArgs {
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

#[derive(Subcommand)]
enum StockAction {
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
enum SaleAction {
    /// Stock, units ever added, open or closed, buyers, reservations and units by state.
    Status { sku: String },
    /// Close the sale: every buyer gets 410 `closed`, on every instance; stock is untouched.
    Close { sku: String },
    /// Reopen a closed sale.
    Open { sku: String },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Held until exit: dropping it flushes the log lines still queued.
    let _log_guard = init_tracing(cli.log_format);
    match cli.command {
        Command::Check { config } => check(&config),
        Command::Serve { config, listen } => serve(&config, listen),
        Command::Health { url } => run_async(async move {
            match client::call(&url, "", http::Method::GET, "", None).await {
                Ok(a) if a.status == http::StatusCode::OK => ExitCode::SUCCESS,
                Ok(a) => {
                    eprintln!("{url}: {} {}", a.status, a.body);
                    ExitCode::FAILURE
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::FAILURE
                }
            }
        }),
        Command::Stock { action, admin } => {
            let (op, sku) = match action {
                StockAction::Set { sku, units, expect } => (AdminOp::Set { units, expect }, sku),
                StockAction::Add { sku, delta } => (AdminOp::Add { delta }, sku),
                StockAction::Get { sku } => (AdminOp::Get, sku),
            };
            admin_call(&admin, op, &sku)
        }
        Command::Sale { action, admin } => {
            let (op, sku) = match action {
                SaleAction::Status { sku } => (AdminOp::Status, sku),
                SaleAction::Close { sku } => (AdminOp::Close, sku),
                SaleAction::Open { sku } => (AdminOp::Open, sku),
            };
            admin_call(&admin, op, &sku)
        }
        Command::Verify {
            key_env,
            key_id,
            method,
            path,
            headers,
            max_age,
        } => verify(&key_env, &key_id, &method, &path, &headers, max_age),
        Command::DemoUpstream { listen } => run_async(async move {
            match flashgate::demo::run(listen).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("demo upstream on {listen}: {e}");
                    ExitCode::FAILURE
                }
            }
        }),
    }
}

/// Logs go to stderr through a background writer: when Redis or the backend fails under
/// load, every request may log a warning, and a blocking write to a slow stderr (a pipe, a
/// container log driver) must not stall the request path. Lines beyond the writer's buffer
/// are dropped rather than waited for.
fn init_tracing(format: LogFormat) -> tracing_appender::non_blocking::WorkerGuard {
    let (writer, guard) = tracing_appender::non_blocking(std::io::stderr());
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour only for a person at a terminal: a file or a pipe gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(writer);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    guard
}

fn run_async(fut: impl std::future::Future<Output = ExitCode>) -> ExitCode {
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(fut),
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

/// One admin CLI command.
#[derive(Debug, Clone, Copy)]
enum AdminOp {
    Set { units: u64, expect: Option<u64> },
    Add { delta: i64 },
    Get,
    Status,
    Close,
    Open,
}

impl AdminOp {
    /// The admin API call: method, path, body.
    fn request(self, sku: &str) -> (http::Method, String, Option<Value>) {
        use http::Method;
        match self {
            AdminOp::Set { units, expect } => {
                let mut body = json!({ "stock": units });
                if let Some(e) = expect {
                    body["expect"] = json!(e);
                }
                (Method::PUT, format!("/v1/stock/{sku}"), Some(body))
            }
            AdminOp::Add { delta } => (
                Method::POST,
                format!("/v1/stock/{sku}/add"),
                Some(json!({ "delta": delta })),
            ),
            AdminOp::Get => (Method::GET, format!("/v1/stock/{sku}"), None),
            AdminOp::Status => (Method::GET, format!("/v1/sales/{sku}"), None),
            AdminOp::Close => (Method::POST, format!("/v1/sales/{sku}/close"), None),
            AdminOp::Open => (Method::POST, format!("/v1/sales/{sku}/open"), None),
        }
    }
}

/// Runs one admin command. It never does nothing silently: the SKU is checked (and
/// percent-encoded) before anything is sent, an answer without `X-Flashgate-Admin: 1` is
/// refused as not flashgate's, and a refused connection names the address tried.
fn admin_call(admin: &AdminArgs, op: AdminOp, sku: &str) -> ExitCode {
    let segment = match client::sku_segment(sku) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let Some(token) = admin.token.as_deref() else {
        eprintln!("no admin token: pass --token or set FLASHGATE_ADMIN_TOKEN");
        return ExitCode::FAILURE;
    };
    let (method, path, body) = op.request(&segment);
    run_async(async move {
        let answer = match client::call(&admin.admin, token, method, &path, body).await {
            Ok(a) => a,
            Err(e @ CallError::Refused { .. }) => {
                eprintln!(
                    "cannot reach flashgate's admin API: {e}.\n\
                     Is flashgate running with `admin.listen` at that address (and its admin \
                     token variable set, without which the admin API is off)? Check \
                     admin.listen in its config, or point this command elsewhere with --admin URL."
                );
                return ExitCode::FAILURE;
            }
            Err(e) => {
                eprintln!("cannot reach flashgate's admin API: {e}");
                return ExitCode::FAILURE;
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
            return ExitCode::FAILURE;
        }
        let parsed: Option<Value> = serde_json::from_str(&answer.body).ok();
        if admin.json {
            println!("{}", answer.body);
            if !answer.status.is_success() {
                eprintln!("{}", answer.status);
                return ExitCode::FAILURE;
            }
            return ExitCode::SUCCESS;
        }
        let Some(v) = parsed else {
            eprintln!("{}: {}", answer.status, answer.body);
            return ExitCode::FAILURE;
        };
        if answer.status.is_success() {
            println!("{}", human(op, sku, &v));
            ExitCode::SUCCESS
        } else {
            eprintln!("{}", client::human_error(answer.status, sku, &v));
            ExitCode::FAILURE
        }
    })
}

/// A successful answer, for people.
fn human(op: AdminOp, sku: &str, v: &Value) -> String {
    let n = |key: &str| v[key].as_u64().map_or("?".to_owned(), |n| n.to_string());
    match op {
        AdminOp::Set { expect: None, .. } => format!("{sku}: stock set to {}", n("stock")),
        AdminOp::Set {
            expect: Some(e), ..
        } => format!("{sku}: stock set to {} (was {e})", n("stock")),
        AdminOp::Add { delta } => format!("{sku}: stock {} ({delta:+})", n("stock")),
        AdminOp::Get => format!("{sku}: {} units left", n("stock")),
        AdminOp::Close => format!(
            "{sku}: sale closed: buyers get 410 closed on every instance; stock unchanged \
             (reopen with `flashgate sale open {sku}`)"
        ),
        AdminOp::Open => format!("{sku}: sale open"),
        AdminOp::Status => client::sale_status(sku, v),
    }
}

fn verify(
    key_env: &str,
    key_id: &str,
    method: &str,
    path: &str,
    headers: &[String],
    max_age: u64,
) -> ExitCode {
    let key = match flashgate::signing::Key::from_env(key_id, key_env) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let header = |name: &str| {
        headers
            .iter()
            .filter_map(|h| h.split_once(':'))
            .find(|(n, _)| n.trim().eq_ignore_ascii_case(name))
            .map_or("", |(_, v)| v.trim())
    };
    let Ok(quantity) = header("x-flashgate-quantity").parse() else {
        eprintln!("no valid X-Flashgate-Quantity header given (-H 'X-Flashgate-Quantity: 1')");
        return ExitCode::from(2);
    };
    let admission = flashgate::signing::Admission {
        method,
        path_and_query: path,
        reservation: header("x-flashgate-reservation"),
        sku: header("x-flashgate-sku"),
        user: header("x-flashgate-user"),
        quantity,
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    match flashgate::signing::verify(
        header("x-flashgate-signature"),
        &[key],
        &admission,
        now,
        max_age,
    ) {
        Ok(()) => {
            println!("ok: signed by flashgate");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("refused: {e}");
            ExitCode::FAILURE
        }
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    match config::load(path) {
        Ok(cfg) => {
            print!("{}", config::describe(&cfg));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn serve(path: &std::path::Path, listen: Option<std::net::SocketAddr>) -> ExitCode {
    let mut cfg = match config::load(path) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(listen) = listen {
        cfg.listen = listen;
    }
    let config_path = path.to_path_buf();
    run_async(async move {
        let listen = cfg.listen;
        let threads = match cfg.server.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let admin = cfg.admin.clone();
        info!(upstream = %cfg.upstream.url.authority, routes = cfg.routes.len(), "flashgate starting");
        let app = match App::build(cfg).await {
            Ok(app) => app,
            Err(e) => {
                error!(error = %e, "cannot start");
                return ExitCode::FAILURE;
            }
        };
        if let Some(admin) = admin {
            let env_token = |name: &str| {
                std::env::var(name)
                    .ok()
                    .map(|t| t.trim().to_owned())
                    .filter(|t| !t.is_empty())
            };
            match env_token(&admin.token_env) {
                Some(token) => {
                    let read = admin.read_token_env.as_deref().and_then(env_token);
                    let tokens = flashgate::admin::auth::Tokens::new(token, read);
                    if let Err(e) = tokens.check_for(admin.listen) {
                        error!(listen = %admin.listen, "admin API refused: {e}");
                        return ExitCode::FAILURE;
                    }
                    match tokio::net::TcpListener::bind(admin.listen).await {
                        Ok(l) => {
                            tokio::spawn(flashgate::admin::run(
                                l,
                                app.clone(),
                                tokens,
                                std::future::pending(),
                            ));
                        }
                        Err(e) => {
                            error!(listen = %admin.listen, error = %e, "cannot bind the admin API");
                            return ExitCode::FAILURE;
                        }
                    }
                }
                None => warn!(
                    env = %admin.token_env,
                    "admin API disabled: set this environment variable to its bearer token"
                ),
            }
        }
        tokio::spawn(flashgate::reload::watch(app.clone(), config_path));
        match flashgate::server::run_per_core(listen, threads, app, shutdown_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                error!(listen = %listen, error = %e, "server failed");
                ExitCode::FAILURE
            }
        }
    })
}

/// Resolves on the first SIGTERM or SIGINT; a second one exits at once.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        warn!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    info!("shutdown signal received (send another to exit at once)");
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        warn!("second signal: exiting now");
        std::process::exit(130);
    });
}
