//! Hot reload: on SIGHUP, or when the config file changes, load it again and swap the snapshot.
//! An invalid file keeps the running config and logs its `file:line` error.
//!
//! The parent directory is watched rather than the file: editors save by writing a new file and
//! renaming it over the old one, and Kubernetes swaps a ConfigMap's symlink, so a watch on the
//! file itself would follow the old inode and miss every change after the first.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::config;
use crate::state::App;

/// Changes arrive as bursts of events (write, chmod, rename); wait for the burst to end.
const SETTLE: Duration = Duration::from_millis(150);

/// Reloads `path` into `app` on SIGHUP or file change, until the process exits.
pub async fn watch(app: Arc<App>, path: PathBuf) {
    let (tx, mut rx) = mpsc::channel::<()>(16);

    // Keep the watcher alive for as long as this task runs.
    let _watcher = match watch_file(&path, tx.clone()) {
        Ok(w) => Some(w),
        Err(e) => {
            warn!(file = %path.display(), error = %e, "cannot watch the config file; reload with SIGHUP");
            None
        }
    };
    tokio::spawn(forward_sighup(tx));

    while rx.recv().await.is_some() {
        tokio::time::sleep(SETTLE).await;
        while rx.try_recv().is_ok() {}
        reload(&app, &path);
    }
}

/// Loads and applies `path`; returns whether the new config is now running.
pub fn reload(app: &App, path: &Path) -> bool {
    match config::load(path) {
        Ok(cfg) => {
            let current = app.snapshot();
            if cfg.server != current.config.server {
                warn!("`server` settings take effect on restart only");
            }
            app.reload(cfg);
            true
        }
        Err(e) => {
            app.reload_failures.fetch_add(1, Ordering::Relaxed);
            error!("config reload failed, keeping the running config: {e}");
            false
        }
    }
}

fn watch_file(path: &Path, tx: mpsc::Sender<()>) -> notify::Result<notify::RecommendedWatcher> {
    let file_name = path.file_name().map(|n| n.to_owned());
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        if event.kind.is_access() {
            return;
        }
        // Kubernetes updates `..data`, a symlink the file points through: any change in the
        // directory that touches our file or a hidden entry counts.
        let relevant = event.paths.iter().any(|p| {
            let name = p.file_name();
            name == file_name.as_deref()
                || name.is_some_and(|n| n.to_string_lossy().starts_with(".."))
        });
        if relevant {
            let _ = tx.try_send(());
        }
    })?;
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    info!(dir = %dir.display(), "watching the config directory for changes");
    Ok(watcher)
}

async fn forward_sighup(tx: mpsc::Sender<()>) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        warn!("cannot listen for SIGHUP");
        return;
    };
    while hup.recv().await.is_some() {
        info!("SIGHUP: reloading config");
        if tx.send(()).await.is_err() {
            return;
        }
    }
}
