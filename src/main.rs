//! The `flashgate` command: `serve` runs the proxy, `check` validates a config like `nginx -t`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
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
    /// Sale status (stock, buyers, reservations by state) through the admin API.
    Sale {
        #[command(subcommand)]
        action: SaleAction,
        #[command(flatten)]
        admin: AdminArgs,
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
}

#[derive(Subcommand)]
enum StockAction {
    /// Set the units left.
    Set { sku: String, units: u64 },
    /// Add units (negative removes).
    Add {
        sku: String,
        #[arg(allow_hyphen_values = true)]
        delta: i64,
    },
    /// Read the units left.
    Get { sku: String },
}

#[derive(Subcommand)]
enum SaleAction {
    /// Stock, buyers, reservations and units by state.
    Status { sku: String },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Held until exit: dropping it flushes the log lines still queued.
    let _log_guard = init_tracing(cli.log_format);
    match cli.command {
        Command::Check { config } => check(&config),
        Command::Serve { config, listen } => serve(&config, listen),
        Command::Health { url } => run_async(async move {
            match flashgate::admin::client::call(&url, "", http::Method::GET, "", None).await {
                Ok((status, _)) if status == http::StatusCode::OK => ExitCode::SUCCESS,
                Ok((status, text)) => {
                    eprintln!("{url}: {status} {text}");
                    ExitCode::FAILURE
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::FAILURE
                }
            }
        }),
        Command::Stock { action, admin } => {
            let (method, path, body) = match action {
                StockAction::Set { sku, units } => (
                    http::Method::PUT,
                    format!("/v1/stock/{sku}"),
                    Some(serde_json::json!({ "stock": units })),
                ),
                StockAction::Add { sku, delta } => (
                    http::Method::POST,
                    format!("/v1/stock/{sku}/add"),
                    Some(serde_json::json!({ "delta": delta })),
                ),
                StockAction::Get { sku } => (http::Method::GET, format!("/v1/stock/{sku}"), None),
            };
            admin_call(&admin, method, &path, body)
        }
        Command::Sale {
            action: SaleAction::Status { sku },
            admin,
        } => admin_call(&admin, http::Method::GET, &format!("/v1/sales/{sku}"), None),
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
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
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

fn admin_call(
    admin: &AdminArgs,
    method: http::Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> ExitCode {
    let Some(token) = admin.token.as_deref() else {
        eprintln!("no admin token: pass --token or set FLASHGATE_ADMIN_TOKEN");
        return ExitCode::FAILURE;
    };
    run_async(async move {
        match flashgate::admin::client::call(&admin.admin, token, method, path, body).await {
            Ok((status, text)) if status.is_success() => {
                println!("{text}");
                ExitCode::SUCCESS
            }
            Ok((status, text)) => {
                eprintln!("{status}: {text}");
                ExitCode::FAILURE
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        }
    })
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
                error!(error = %e, "cannot set up the stock store");
                return ExitCode::FAILURE;
            }
        };
        if let Some(admin) = admin {
            match std::env::var(&admin.token_env) {
                Ok(token) if !token.trim().is_empty() => {
                    match tokio::net::TcpListener::bind(admin.listen).await {
                        Ok(l) => {
                            tokio::spawn(flashgate::admin::run(
                                l,
                                app.clone(),
                                token.trim().to_owned(),
                                std::future::pending(),
                            ));
                        }
                        Err(e) => {
                            error!(listen = %admin.listen, error = %e, "cannot bind the admin API");
                            return ExitCode::FAILURE;
                        }
                    }
                }
                _ => warn!(
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
