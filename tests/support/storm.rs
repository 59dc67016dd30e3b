//! A storm of buyers: `workers` tasks that keep sending requests, each with a fresh user id,
//! recording every answer and how long it took, until told to stop or out of users. Fault tests
//! start one, break something underneath it (kill Redis, stall the backend), and then judge
//! every single answer.
#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::StatusCode;
use tokio::task::JoinSet;

use super::{client, send};

/// One answer a buyer got.
#[derive(Debug, Clone)]
pub struct Shot {
    pub user: String,
    pub status: StatusCode,
    /// The `error` field of a JSON answer from flashgate; `""` for a backend answer.
    pub error: String,
    pub retry_after: Option<String>,
    /// When the request was sent, from the storm's start.
    pub sent_at: Duration,
    /// How long the answer took (head and body).
    pub took: Duration,
}

pub struct Storm {
    shots: Arc<Mutex<Vec<Shot>>>,
    stop: Arc<AtomicBool>,
    started: Instant,
    workers: JoinSet<()>,
}

impl Storm {
    /// `workers` concurrent buyers POSTing to `url`, user ids `{prefix}-{n}` for n in
    /// `0..max_users`; each request bounded by the harness's 10 s timeout.
    pub fn start(url: String, prefix: &str, workers: usize, max_users: usize) -> Storm {
        let shots = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let next = Arc::new(AtomicUsize::new(0));
        let started = Instant::now();
        let client = client();
        let mut set = JoinSet::new();
        for _ in 0..workers {
            let (shots, stop, next, client, url) = (
                shots.clone(),
                stop.clone(),
                next.clone(),
                client.clone(),
                url.clone(),
            );
            let prefix = prefix.to_owned();
            set.spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    let n = next.fetch_add(1, Ordering::SeqCst);
                    if n >= max_users {
                        return;
                    }
                    let user = format!("{prefix}-{n}");
                    let sent_at = started.elapsed();
                    let t = Instant::now();
                    let a =
                        send(&client, "POST", &url, &[("x-user-id", &user)], Bytes::new()).await;
                    let took = t.elapsed();
                    let error = serde_json::from_slice::<serde_json::Value>(&a.body)
                        .ok()
                        .and_then(|v| v["error"].as_str().map(str::to_owned))
                        .unwrap_or_default();
                    let retry_after = a
                        .headers
                        .get("retry-after")
                        .map(|v| v.to_str().unwrap_or("?").to_owned());
                    shots.lock().unwrap().push(Shot {
                        user,
                        status: a.status,
                        error,
                        retry_after,
                        sent_at,
                        took,
                    });
                }
            });
        }
        Storm {
            shots,
            stop,
            started,
            workers: set,
        }
    }

    /// Time since the storm started (to compare with [`Shot::sent_at`]).
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// The answers so far.
    pub fn shots(&self) -> Vec<Shot> {
        self.shots.lock().unwrap().clone()
    }

    /// How many answers so far satisfy `pred`.
    pub fn count(&self, pred: impl Fn(&Shot) -> bool) -> usize {
        self.shots
            .lock()
            .unwrap()
            .iter()
            .filter(|s| pred(s))
            .count()
    }

    /// Polls until `pred` holds for at least `n` answers; false after `within`.
    pub async fn wait_for(&self, n: usize, within: Duration, pred: impl Fn(&Shot) -> bool) -> bool {
        super::eventually(within, || self.count(&pred) >= n).await
    }

    /// Stops the workers (each finishes its request in flight) and returns every answer.
    pub async fn stop(mut self) -> Vec<Shot> {
        self.stop.store(true, Ordering::SeqCst);
        self.join().await
    }

    /// Waits for the workers to run out of users, then returns every answer.
    pub async fn finish(self) -> Vec<Shot> {
        let mut this = self;
        this.join().await
    }

    async fn join(&mut self) -> Vec<Shot> {
        while let Some(done) = self.workers.join_next().await {
            done.expect("a buyer task panicked");
        }
        self.shots()
    }
}

/// How many answers had each (status, error) pair, for assertion messages.
pub fn tally(shots: &[Shot]) -> std::collections::BTreeMap<(u16, String), usize> {
    let mut t = std::collections::BTreeMap::new();
    for s in shots {
        *t.entry((s.status.as_u16(), s.error.clone())).or_insert(0) += 1;
    }
    t
}
