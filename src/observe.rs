//! What one request reports once its answer is known: the route's metrics (status, latency,
//! a sale route's admission outcome) and the access log line. The request path fills a
//! [`Seen`] as it goes; [`finish`] reads it.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use http::{Method, Response, Uri};

use crate::access_log::Entry;
use crate::body::Body;
use crate::ids::UserId;
use crate::metrics::{self, InFlight, RouteMetrics, UNMATCHED};
use crate::reject::Reject;
use crate::state::{App, Snapshot};
use crate::trace::Trace;

/// What the request path learned on the way.
pub(crate) struct Seen<'s> {
    /// The matched route's name and metrics.
    pub route: Option<(&'s str, &'s RouteMetrics)>,
    /// Counted in `flashgate_in_flight` until the answer's head.
    pub in_flight: Option<InFlight>,
    /// A sale route's request won a unit (whatever the backend then answered).
    pub won: bool,
    /// The client's address (past trusted proxies, once a route matched).
    pub client_ip: IpAddr,
    pub user: Option<UserId>,
    /// The backend's status (if it answered) and how long it took.
    pub upstream: Option<(Option<u16>, Duration)>,
    /// A waiting room's cookie for the answer, whatever the answer is (`room/`).
    pub set_cookie: Option<http::HeaderValue>,
    /// A waiting room answered with the queue: no admission was decided.
    pub queued: bool,
}

impl<'s> Seen<'s> {
    pub fn new(peer_ip: IpAddr) -> Self {
        Seen {
            route: None,
            in_flight: None,
            won: false,
            client_ip: peer_ip,
            user: None,
            upstream: None,
            set_cookie: None,
            queued: false,
        }
    }

    /// The backend was asked at `started`, with this result.
    pub fn upstream(&mut self, started: Instant, result: &Result<Response<Body>, Reject>) {
        let status = result.as_ref().ok().map(|r| r.status().as_u16());
        self.upstream = Some((status, started.elapsed()));
    }
}

/// The request as it came, for the log line.
pub(crate) struct Asked<'a> {
    pub method: &'a Method,
    pub uri: &'a Uri,
    pub started: Instant,
    pub trace: &'a Trace,
}

/// Counts the answer in the metrics and writes the access log line.
pub(crate) fn finish(
    app: &App,
    snapshot: &Snapshot,
    seen: &Seen<'_>,
    result: &Result<Response<Body>, Reject>,
    asked: &Asked<'_>,
) {
    let took = asked.started.elapsed();
    let (status, reason) = match result {
        Ok(resp) => (resp.status().as_u16(), None),
        Err(reject) => (reject.status().as_u16(), Some(reject.reason())),
    };
    let (name, route) = seen
        .route
        .unwrap_or((UNMATCHED, snapshot.unmatched.as_ref()));
    route.answered(status, took);
    // A waiting room's queue answer decided no admission: a sale route behind a room counts
    // only what reached its reservation (or was refused on the way).
    if seen.route.is_some() && !seen.queued {
        route.admission(match result {
            Err(reject) if !seen.won => metrics::outcome_of(reject),
            _ => "won",
        });
    }
    if let Some(log) = &app.access_log
        && log.sampled(asked.trace)
    {
        log.write(&Entry {
            route: name,
            method: asked.method,
            path: asked.uri.path(),
            status,
            reason,
            duration: took,
            upstream: seen.upstream,
            client_ip: seen.client_ip,
            user: seen.user.as_ref(),
            trace_id: &asked.trace.id(),
        });
    }
}
