//! `GET /v1/events`: the live dashboard's feed, a server-sent-events stream (`text/event-stream`)
//! with one `snapshot` event at once and then every [`EVERY`]:
//!
//! ```text
//! event: snapshot
//! data: {"time_ms":…,"interval_s":1.0,"skus":[{"sku":"tee","stock":12,"added":20,"closed":false,
//!        "units":{"held":0,"sold":8,"released":0,"uncertain":0},"fresh":true}],
//!        "admissions_per_s":{"won":2.0,…},"admissions_total":{"won":8,…},
//!        "answers_per_s":{"429":0.0,"503":0.0},"answers_total":{"429":0,"503":0},
//!        "breaker_open":false,"in_flight":0,"connections":3,
//!        "rooms":[{"room":"sale-pages","mode":"open","queued":40,"active":500,…}]}
//! ```
//!
//! Rates are the difference of two readings of the counters ([`Totals`]) over the time between
//! them (`null` in the first snapshot after nobody was watching). SKUs are the ones `/metrics`
//! exports, read by the same refresh ([`Metrics::refresh_skus`]); a SKU whose read failed keeps
//! its last values with `"fresh": false`. Rooms are the waiting rooms' statuses
//! (`admin/rooms.rs`), one store read each per tick.
//!
//! **Cost.** One sampler task reads the store once per tick however many pages watch, and only
//! while at least one does. Each subscriber has a forwarding task and a channel of one event:
//! a client that stops reading holds one event (and what the kernel buffers), never a growing
//! queue, and is dropped after [`STALLED`]. At most [`MAX_SUBSCRIBERS`] streams at once; past
//! that, 503 `too_many_subscribers`. Every stream ends when the admin API shuts down.
//!
//! [`Metrics::refresh_skus`]: crate::metrics::Metrics::refresh_skus

use std::collections::HashMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{HeaderValue, Method, Response, StatusCode};
use http_body::Frame;
use serde_json::{Map, Value, json};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::body::{self, Body};
use crate::ids::Sku;
use crate::metrics::{OUTCOMES, Totals};
use crate::state::App;
use crate::store::SaleStatus;

/// The path of the stream.
pub const PATH: &str = "/v1/events";
/// Time between snapshots.
pub const EVERY: Duration = Duration::from_secs(1);
/// Streams open at once (an admin page's feed, not a public one).
pub const MAX_SUBSCRIBERS: usize = 16;
/// A subscriber that has not taken an event for this long is dropped.
pub const STALLED: Duration = Duration::from_secs(30);

/// The stream's shared side: subscriber slots and the sampler's latest event.
pub struct Events {
    slots: Arc<Semaphore>,
    /// The latest `snapshot` event, encoded; `None` while the sampler is idle.
    latest: watch::Sender<Option<Bytes>>,
    /// Wakes an idle sampler when the first subscriber arrives.
    wake: Notify,
    stopping: CancellationToken,
}

impl Events {
    /// Starts the (idle) sampler; everything ends when `stopping` is cancelled.
    pub fn start(app: Arc<App>, stopping: CancellationToken) -> Arc<Events> {
        let events = Arc::new(Events {
            slots: Arc::new(Semaphore::new(MAX_SUBSCRIBERS)),
            latest: watch::Sender::new(None),
            wake: Notify::new(),
            stopping,
        });
        tokio::spawn(sampler(app, events.clone()));
        events
    }

    /// Answers `GET /v1/events` (the caller has checked the token).
    pub fn subscribe(&self, method: &Method) -> Response<Body> {
        if method != Method::GET {
            let mut resp = super::error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "the event stream is read with GET",
            );
            resp.headers_mut()
                .insert(http::header::ALLOW, HeaderValue::from_static("GET"));
            return resp;
        }
        if self.stopping.is_cancelled() {
            // A connection kept alive past the admin API's stop: no stream that ends at once.
            return super::error(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                "the admin API is stopping",
            );
        }
        let Ok(permit) = self.slots.clone().try_acquire_owned() else {
            let mut resp = super::error(
                StatusCode::SERVICE_UNAVAILABLE,
                "too_many_subscribers",
                &format!("at most {MAX_SUBSCRIBERS} event streams at once: close one and retry"),
            );
            resp.headers_mut()
                .insert(http::header::RETRY_AFTER, HeaderValue::from_static("5"));
            return resp;
        };
        let rx = self.latest.subscribe();
        self.wake.notify_one();
        let (tx, body_rx) = mpsc::channel(1);
        tokio::spawn(forward(rx, tx, self.stopping.clone(), permit, STALLED));
        let mut resp = Response::new(body::stream(EventBody { rx: body_rx }));
        let headers = resp.headers_mut();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        headers.insert(
            http::header::CACHE_CONTROL,
            HeaderValue::from_static("no-store"),
        );
        // A buffering proxy in front (nginx) would hold the events back.
        headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
        resp
    }
}

/// The response body: whatever the forwarder queued, ending when it stops.
struct EventBody {
    rx: mpsc::Receiver<Bytes>,
}

impl http_body::Body for EventBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx.poll_recv(cx).map(|e| e.map(|e| Ok(Frame::data(e))))
    }
}

/// One subscriber: the latest event at once (when the sampler is running), then each new one.
/// A client slower than the sampler skips events (the watch keeps only the latest); one that
/// takes none for `stalled` ([`STALLED`]) is dropped. The slot is given back when this returns.
async fn forward(
    mut latest: watch::Receiver<Option<Bytes>>,
    tx: mpsc::Sender<Bytes>,
    stopping: CancellationToken,
    _slot: OwnedSemaphorePermit,
    stalled: Duration,
) {
    let mut next = latest.borrow_and_update().clone();
    loop {
        let event = match next.take() {
            Some(event) => event,
            None => {
                tokio::select! {
                    changed = latest.changed() => match changed {
                        Ok(()) => match latest.borrow_and_update().clone() {
                            Some(event) => event,
                            None => continue,
                        },
                        Err(_) => return,
                    },
                    () = tx.closed() => return,
                    () = stopping.cancelled() => return,
                }
            }
        };
        tokio::select! {
            sent = tokio::time::timeout(stalled, tx.send(event)) => {
                if !matches!(sent, Ok(Ok(()))) {
                    return;
                }
            }
            () = stopping.cancelled() => return,
        }
    }
}

/// Samples while anyone watches; idles (no store reads) while nobody does.
async fn sampler(app: Arc<App>, events: Arc<Events>) {
    let mut known: HashMap<Sku, SaleStatus> = HashMap::new();
    loop {
        while events.latest.receiver_count() == 0 {
            tokio::select! {
                () = events.wake.notified() => {}
                () = events.stopping.cancelled() => return,
            }
        }
        let mut previous: Option<(Instant, Totals)> = None;
        let mut ticks = tokio::time::interval(EVERY);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while events.latest.receiver_count() > 0 {
            tokio::select! {
                _ = ticks.tick() => {}
                () = events.stopping.cancelled() => return,
            }
            let read = app.metrics.refresh_skus(app.store.as_ref()).await;
            let now = (Instant::now(), app.metrics.totals());
            let mut snapshot = snapshot(&read, &mut known, previous.as_ref(), &now);
            snapshot["rooms"] = Value::Array(super::rooms::statuses(&app).await);
            previous = Some(now);
            events.latest.send_replace(Some(encode(&snapshot)));
        }
        // Nobody watches: the next first subscriber must not get this stale event.
        events.latest.send_replace(None);
    }
}

/// One `snapshot` event as an SSE frame.
fn encode(snapshot: &Value) -> Bytes {
    Bytes::from(format!("event: snapshot\ndata: {snapshot}\n\n"))
}

/// The snapshot's JSON: SKUs as read (or last known), rates since `previous`.
fn snapshot(
    read: &[(Sku, Option<SaleStatus>)],
    known: &mut HashMap<Sku, SaleStatus>,
    previous: Option<&(Instant, Totals)>,
    (at, now): &(Instant, Totals),
) -> Value {
    let mut skus: Vec<Value> = read
        .iter()
        .filter_map(|(sku, status)| {
            let fresh = status.is_some();
            if let Some(s) = status {
                known.insert(sku.clone(), s.clone());
            }
            let s = known.get(sku)?;
            Some(json!({
                "sku": sku,
                "stock": s.stock,
                "added": s.added,
                "closed": s.closed,
                "units": s.units,
                "fresh": fresh,
            }))
        })
        .collect();
    skus.sort_by(|a, b| a["sku"].as_str().cmp(&b["sku"].as_str()));
    let seconds = previous.map(|(then, _)| at.duration_since(*then).as_secs_f64());
    let rate = |now: u64, then: u64| match seconds {
        Some(s) if s > 0.0 => {
            let per_s = now.saturating_sub(then) as f64 / s;
            json!((per_s * 100.0).round() / 100.0)
        }
        _ => Value::Null,
    };
    let before = previous.map(|(_, t)| t.clone()).unwrap_or_default();
    let mut admissions_per_s = Map::new();
    let mut admissions_total = Map::new();
    for ((outcome, n), then) in OUTCOMES.iter().zip(now.admissions).zip(before.admissions) {
        admissions_per_s.insert((*outcome).to_owned(), rate(n, then));
        admissions_total.insert((*outcome).to_owned(), json!(n));
    }
    let time_ms = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    json!({
        "time_ms": u64::try_from(time_ms).unwrap_or(u64::MAX),
        "interval_s": seconds.map(|s| (s * 1000.0).round() / 1000.0),
        "skus": skus,
        "admissions_per_s": admissions_per_s,
        "admissions_total": admissions_total,
        "answers_per_s": {
            "429": rate(now.answered_429, before.answered_429),
            "503": rate(now.answered_503, before.answered_503),
        },
        "answers_total": {"429": now.answered_429, "503": now.answered_503},
        "breaker_open": now.breaker_open,
        "in_flight": now.in_flight,
        "connections": now.connections,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StateCounts;

    fn status(sku: &Sku, stock: u64, sold: u64) -> SaleStatus {
        SaleStatus {
            sku: sku.clone(),
            stock: Some(stock),
            added: Some(stock + sold),
            closed: false,
            buyers: sold,
            reservations: StateCounts::default(),
            units: StateCounts {
                sold,
                ..StateCounts::default()
            },
        }
    }

    #[test]
    fn rates_are_differences_over_time_and_failed_reads_keep_the_last_values() {
        let (a, b) = (Sku::parse("a").unwrap(), Sku::parse("b").unwrap());
        let mut known = HashMap::new();
        let start = Instant::now();
        let mut t0 = Totals::default();
        t0.admissions[0] = 10;
        let first = snapshot(
            &[(b.clone(), Some(status(&b, 5, 0))), (a.clone(), None)],
            &mut known,
            None,
            &(start, t0.clone()),
        );
        // `a` was never read: nothing to show yet. No previous reading: no rates.
        assert_eq!(first["skus"].as_array().unwrap().len(), 1);
        assert_eq!(first["admissions_per_s"]["won"], Value::Null);
        assert_eq!(first["admissions_total"]["won"], 10);
        let mut t1 = t0.clone();
        t1.admissions[0] = 14;
        t1.answered_429 = 3;
        let later = start + Duration::from_secs(2);
        let second = snapshot(
            &[(b.clone(), None), (a.clone(), Some(status(&a, 1, 2)))],
            &mut known,
            Some(&(start, t0)),
            &(later, t1),
        );
        assert_eq!(second["admissions_per_s"]["won"], 2.0);
        assert_eq!(second["admissions_per_s"]["sold_out"], 0.0);
        assert_eq!(second["answers_per_s"]["429"], 1.5);
        assert_eq!(second["interval_s"], 2.0);
        let skus = second["skus"].as_array().unwrap();
        assert_eq!(skus[0]["sku"], "a", "sorted by SKU");
        assert_eq!(
            (skus[0]["stock"].clone(), skus[0]["fresh"].clone()),
            (json!(1), json!(true))
        );
        assert_eq!(
            (skus[1]["stock"].clone(), skus[1]["fresh"].clone()),
            (json!(5), json!(false))
        );
        assert_eq!(skus[0]["units"]["sold"], 2);
    }

    #[tokio::test]
    async fn a_subscriber_that_stops_reading_holds_one_event_and_is_dropped() {
        let stalled = Duration::from_millis(300);
        let (latest, rx) = watch::channel(Some(Bytes::from_static(b"one")));
        let (tx, mut body) = mpsc::channel(1);
        let slots = Arc::new(Semaphore::new(1));
        let slot = slots.clone().try_acquire_owned().unwrap();
        let task = tokio::spawn(forward(rx, tx, CancellationToken::new(), slot, stalled));
        tokio::task::yield_now().await; // the first event goes out at once
        // Many events while nobody reads: the channel holds one, the forwarder waits.
        for i in 0..100 {
            latest.send_replace(Some(Bytes::from(format!("e{i}"))));
            tokio::task::yield_now().await;
        }
        assert_eq!(body.len(), 1);
        assert_eq!(slots.available_permits(), 0);
        tokio::time::timeout(stalled * 10, task)
            .await
            .expect("the stalled subscriber was not dropped")
            .unwrap();
        assert_eq!(slots.available_permits(), 1, "the slot is given back");
        assert_eq!(body.recv().await.as_deref(), Some(&b"one"[..]));
    }

    #[tokio::test]
    async fn every_stream_ends_when_stopping() {
        let (_latest, rx) = watch::channel(None);
        let (tx, mut body) = mpsc::channel(1);
        let stopping = CancellationToken::new();
        let slot = Arc::new(Semaphore::new(1)).try_acquire_owned().unwrap();
        let task = tokio::spawn(forward(rx, tx, stopping.clone(), slot, STALLED));
        stopping.cancel();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(body.recv().await, None);
    }
}
