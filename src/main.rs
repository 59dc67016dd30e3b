//! The `flashgate` command: `serve` runs the proxy, `check` validates a config like `nginx -t`;
//! the operator's commands (`stock`, `sale`, `audit`, `reservations`) are in `admin/cli.rs`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use flashgate::admin::cli::{
    self, AdminArgs, AuditArgs, ReservationsArgs, SaleAction, StockAction,
};
use flashgate::admin::client;
use flashgate::config;
use flashgate::state::App;
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
    /// A sale's status (--watch to follow it), every sale (list), or close and reopen one,
    /// through the admin API.
    Sale {
        #[command(subcommand)]
        action: SaleAction,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// A waiting room's status, or pause, resume or drain it, through the admin API.
    Room {
        #[command(subcommand)]
        action: cli::RoomAction,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Check that each sale's books balance (added = stock + held + sold + uncertain) and
    /// that no reservation was left held; print a table, exit 1 on any problem.
    Audit {
        #[command(flatten)]
        args: AuditArgs,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// List a sale's reservations that need reconciling (`reservations SKU [--state
    /// uncertain|held]`), or settle one (`reservations resolve SKU ID sold|released`).
    #[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
    Reservations {
        #[command(flatten)]
        args: ReservationsArgs,
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
        Command::Stock { action, admin } => cli::stock(&admin, action),
        Command::Sale { action, admin } => cli::sale(&admin, action),
        Command::Room { action, admin } => cli::room(&admin, action),
        Command::Audit { args, admin } => cli::audit(&admin, args),
        Command::Reservations { args, admin } => cli::reservations(&admin, args),
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

/// How many diagnostic log lines wait for the writer at most: about a third of a second of a
/// warning on every request at 50,000 requests/s. The buffer is allocated, and its pages
/// touched, at start: tracing-appender's default (128,000 lines) is 4 MiB, a quarter of an
/// idle flashgate's memory; this one is 512 KiB.
const LOG_BUFFER_LINES: usize = 16_384;

/// Logs go to stderr through a background writer: when Redis or the backend fails under
/// load, every request may log a warning, and a blocking write to a slow stderr (a pipe, a
/// container log driver) must not stall the request path. Lines beyond the writer's buffer
/// ([`LOG_BUFFER_LINES`]) are dropped rather than waited for.
fn init_tracing(format: LogFormat) -> tracing_appender::non_blocking::WorkerGuard {
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .buffered_lines_limit(LOG_BUFFER_LINES)
        .finish(std::io::stderr());
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
