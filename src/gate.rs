//! The request path, top to bottom. Every step either passes the request on or returns a
//! [`Reject`], which is turned into a response in exactly one place ([`handle`]).
//!
//! All in-process checks run before any I/O, so a flood of rejected requests costs no round
//! trip to the store or the backend.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use tracing::{debug, warn};

use crate::body::{self, Body};
use crate::client_ip;
use crate::config::Unmatched;
use crate::forward::{ForwardError, Peer};
use crate::identity;
use crate::reject::Reject;
use crate::state::{App, Snapshot};

/// Handles one request; never fails (every failure is an answer).
pub async fn handle(
    app: Arc<App>,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let snapshot = app.snapshot();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    Ok(match admit_and_forward(&snapshot, peer, req).await {
        Ok(resp) => resp,
        Err(reject) => {
            debug!(%method, %path, status = reject.status().as_u16(), reason = reject.reason(), "answered by flashgate");
            reject.into_response()
        }
    })
}

async fn admit_and_forward(
    snap: &Snapshot,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<Body>, Reject> {
    let cfg = &snap.config;

    // 1. Accept-level limits hyper does not enforce itself (it handles 400/431 on parse).
    let uri_len = req.uri().path_and_query().map_or(0, |pq| pq.as_str().len());
    if uri_len > cfg.server.max_uri_bytes {
        return Err(Reject::UriTooLong);
    }
    if cfg.health_path.as_deref() == Some(req.uri().path()) {
        return Ok(health());
    }

    let peer = Peer {
        ip: peer.ip(),
        trusted: client_ip::is_trusted(peer.ip(), &cfg.trusted_proxies),
    };

    // 2. Route match: first match wins; no match → the configured default.
    let Some(matched) = snap.route_for(req.method(), req.uri().path()) else {
        return match cfg.unmatched {
            Unmatched::Proxy => forward(snap, req, peer).await,
            Unmatched::NotFound => Err(Reject::NoRoute),
        };
    };
    let route = matched.route;
    let guards = &route.guards;

    // 3. Guards. The in-flight slot first (the only reversible check), then per-client buckets,
    //    then the shared route bucket, so a client rejected for its own excess spends no token
    //    that other clients need. See `limit.rs` for the full argument.
    let slot = guards.enter()?;
    guards.check_ip(client_ip::client_ip(
        peer.ip,
        req.headers(),
        &cfg.trusted_proxies,
    ))?;
    // 4. Identity (needed by the per-user bucket, so it sits between the buckets).
    let user = match &route.route.identity {
        Some(identity) => Some(identity::user_id(identity, req.headers())?),
        None => None,
    };
    if let Some(user) = user {
        guards.check_user(user)?;
    }
    guards.check_route()?;

    // 5. Forward; the in-flight slot is held until the response body has been sent.
    let resp = forward(snap, req, peer).await?;
    Ok(match slot {
        Some(slot) => resp.map(|b| body::guarded(b, slot)),
        None => resp,
    })
}

async fn forward(
    snap: &Snapshot,
    req: Request<Incoming>,
    peer: Peer,
) -> Result<Response<Body>, Reject> {
    let req = req.map(body::stream);
    snap.upstream.forward(req, peer).await.map_err(|e| {
        warn!(error = %e, "forward failed");
        match e {
            ForwardError::Connect(_) | ForwardError::Failed(_) => Reject::BadGateway,
            ForwardError::Timeout(_) => Reject::GatewayTimeout,
        }
    })
}

fn health() -> Response<Body> {
    let mut resp = Response::new(body::full(&b"{\"status\":\"ok\"}\n"[..]));
    *resp.status_mut() = StatusCode::OK;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}
