//! The request path, top to bottom. Every step either passes the request on or returns a
//! [`Reject`], which is turned into a response in exactly one place ([`handle`]).
//!
//! All in-process checks run before any I/O, so a flood of rejected requests costs no round
//! trip to the store or the backend.

use std::borrow::Cow;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use std::time::{Instant, SystemTime};

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use tracing::{debug, info, warn};

use crate::body::{self, Body};
use crate::client_ip;
use crate::config::{Sale, Unmatched};
use crate::forward::{ForwardError, Peer};
use crate::ids::UserId;
use crate::interim::Outbox;
use crate::observe::{self, Asked, Seen};
use crate::reject::Reject;
use crate::sale;
use crate::state::{App, Snapshot};
use crate::store::{ReserveOutcome, ReserveRequest, StoreError};
use crate::trace::{TRACEPARENT, Trace};
use crate::{canonical, fence, hygiene, stock_events};

/// Marks a request whose head declared both `Content-Length` and `Transfer-Encoding`
/// (set by the server from the raw head bytes; see `framing.rs`).
#[derive(Debug, Clone, Copy)]
pub struct TwoFramings;

/// Marks a request whose target was longer than `server.max_uri_bytes` (cut short by the
/// server as it was read; see `request_line.rs`).
#[derive(Debug, Clone, Copy)]
pub struct UriTooLong;

/// Handles one request; never fails (every failure is an answer).
pub async fn handle(
    app: Arc<App>,
    peer: SocketAddr,
    hints: Option<Arc<Outbox>>,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let started = Instant::now();
    let snapshot = app.snapshot();
    // The trace the request came with, or a new one; the backend gets flashgate's hop.
    let trace = Trace::from_headers(req.headers());
    req.headers_mut().insert(TRACEPARENT, trace.header());
    // For the log lines; cloning the URI shares its bytes rather than copying them.
    let method = req.method().clone();
    let uri = req.uri().clone();
    let mut seen = Seen::new(peer.ip());
    // Boxed as `Send` here, where every lifetime is concrete: rustc cannot prove the
    // higher-ranked `Send` bound hyper asks for through the store's boxed futures otherwise.
    let path_future: Pin<Box<dyn Future<Output = Result<Response<Body>, Reject>> + Send + '_>> =
        Box::pin(admit_and_forward(
            &app,
            &snapshot,
            (peer, hints),
            req,
            &mut seen,
        ));
    let result = path_future.await;
    let asked = Asked {
        method: &method,
        uri: &uri,
        started,
        trace: &trace,
    };
    observe::finish(&app, &snapshot, &seen, &result, &asked);
    let mut resp = match result {
        Ok(resp) => resp,
        Err(reject) => {
            let trace_id = trace.id();
            debug!(%method, path = uri.path(), status = reject.status().as_u16(), reason = reject.reason(), trace_id, "answered by flashgate");
            reject.into_response_traced(Some(&trace_id))
        }
    };
    // A waiting room's session cookie goes with any answer (a visitor let in and then
    // refused by a limit keeps its session).
    if let Some(cookie) = seen.set_cookie.take() {
        resp.headers_mut().append(http::header::SET_COOKIE, cookie);
    }
    Ok(resp)
}

async fn admit_and_forward<'s>(
    app: &Arc<App>,
    snap: &'s Snapshot,
    (peer, hints): (SocketAddr, Option<Arc<Outbox>>),
    mut req: Request<Incoming>,
    seen: &mut Seen<'s>,
) -> Result<Response<Body>, Reject> {
    let cfg = &snap.config;
    // Only flashgate may speak as flashgate: the backend trusts these headers.
    let found = hygiene::clean(req.headers_mut(), &snap.hygiene);

    // 1. Accept-level limits hyper does not enforce itself (it handles 400/431 on parse).
    let uri_len = req.uri().path_and_query().map_or(0, |pq| pq.as_str().len());
    if uri_len > cfg.server.max_uri_bytes || req.extensions().get::<UriTooLong>().is_some() {
        return Err(Reject::UriTooLong);
    }
    // Two framings for one body is how requests get smuggled: refuse. hyper drops
    // Content-Length from such an HTTP/1 request before we see it, so the server tells us
    // from the raw head; the header check covers any other way in.
    let h = req.headers();
    if req.extensions().get::<TwoFramings>().is_some()
        || (h.contains_key(http::header::CONTENT_LENGTH)
            && h.contains_key(http::header::TRANSFER_ENCODING))
    {
        return Err(Reject::BadRequest(
            "Content-Length and Transfer-Encoding together are not accepted".into(),
        ));
    }
    hygiene::check_host(req.version(), req.headers()).map_err(|m| Reject::BadRequest(m.into()))?;
    if cfg.health_path.as_deref() == Some(req.uri().path()) {
        return Ok(health());
    }

    let peer = Peer {
        ip: peer.ip(),
        trusted: client_ip::is_trusted(peer.ip(), &cfg.trusted_proxies),
        // A 1xx goes to HTTP/1.1 clients only (RFC 9110 §15.2: never to HTTP/1.0).
        hints: hints.filter(|_| req.version() == http::Version::HTTP_11),
    };

    // 2. One canonical path, matched AND forwarded, so the backend routes exactly what was
    //    checked; ambiguous spellings are refused. A clone of the URI (a reference count, not
    //    a copy) lets the route's path parameters borrow from it while the request moves on.
    let uri = req.uri().clone();
    let path = canonical::canonicalize(uri.path(), &cfg.paths)
        .map_err(|a| Reject::BadRequest(a.message().into()))?;
    if let Cow::Owned(p) = &path {
        set_path(&mut req, p)?;
    }
    // 2a. A sale's stock stream is flashgate's own answer, read from the canonical path and
    //     never forwarded; before routing, as the config lets no route but a catch-all share
    //     a stream path (see `stock_events`).
    if let Some(sku) = snap.stock_streams.sku_in(canonical::match_form(&path)) {
        return stock_events::answer(app, req.method(), sku).await;
    }
    // First match wins; then the fence: no other spelling of a sale path gets through.
    let matched = snap.route_for(req.method(), canonical::match_form(&path));
    if let Some(m) = &matched {
        seen.route = Some((&m.route.route.name, &m.route.metrics));
        seen.in_flight = Some(m.route.metrics.enter());
    }
    let on_sale = matched
        .as_ref()
        .is_some_and(|m| m.route.route.sale.is_some());
    if on_sale {
        if found.method_override || fence::overrides_method(req.headers(), uri.query()) {
            info!(peer = %peer.ip, method = %req.method(), path = uri.path(), "fence: method override on a sale route refused");
            return Err(Reject::BadRequest(
                "a method override is not accepted on a sale route".into(),
            ));
        }
        // A sale request goes on in the exact form it matched: with a trailing slash some
        // routers (Go, Flask, Gin, FastAPI) would not run the buy handler, and the unit won
        // would count as sold for an order nobody placed.
        let exact = canonical::match_form(&path);
        if exact.len() != path.len() {
            set_path(&mut req, exact)?;
        }
    } else {
        snap.fence
            .check(
                req.method(),
                &path,
                matched.as_ref().map(|m| &m.route.route),
            )
            .inspect_err(|_| {
                // Someone is trying spellings of a sale path: worth a line at the default level.
                info!(peer = %peer.ip, method = %req.method(), path = uri.path(), "fence: another spelling or method of a sale path refused");
            })?;
    }
    let Some(matched) = matched else {
        return match cfg.unmatched {
            Unmatched::Proxy => {
                let (req, limit) = body::limit_request(req, cfg.server.max_body)?;
                let asked = Instant::now();
                let result = forward(snap, req, peer, limit).await;
                seen.upstream(asked, &result);
                result
            }
            Unmatched::NotFound => Err(Reject::NoRoute),
        };
    };
    let route = matched.route;
    let guards = &route.guards;
    let max_body = route.route.max_body.or(cfg.server.max_body);
    if body::declared_length(&req).is_some_and(|n| max_body.is_some_and(|max| n > max)) {
        return Err(Reject::PayloadTooLarge);
    }

    // 3. Guards. The in-flight slot first (the only reversible check), then per-client buckets,
    //    then the shared route bucket, so a client rejected for its own excess spends no token
    //    that other clients need. See `limit/mod.rs` for the full argument.
    let slot = guards.enter()?;
    seen.client_ip = client_ip::client_ip(peer.ip, req.headers(), &cfg.trusted_proxies);
    guards.check_ip(seen.client_ip)?;
    // 3a. The waiting room, once the per-IP bucket has passed (every visitor without an active
    //     cookie costs one store call, so a flood from one client is cut here first) and
    //     before the per-user and route buckets: a visitor over the room's limits is given a
    //     place in the queue rather than a 429 (which rewards whoever retries fastest), and an
    //     admitted visitor's cookie is checked with no store call. The remaining limits then
    //     apply to those let in, and a sale route behind the room keeps its reservation.
    if let Some(room) = &route.room {
        match room.admit(&*app.store, req.headers()).await? {
            crate::room::Step::Pass(cookie) => seen.set_cookie = cookie,
            crate::room::Step::Answer(resp) => {
                seen.queued = true;
                return Ok(resp);
            }
        }
    }
    // 4. Identity (needed by the per-user bucket, so it sits between the buckets). A JWT is
    //    verified here, after the per-IP bucket, so a flood of forged tokens from one client
    //    is cut before it costs signature checks; a token seen before is a cache hit.
    let user = match &route.identity {
        Some(identity) => Some(identity.user_id(req.headers()).await?),
        None => None,
    };
    if let Some(user) = &user {
        seen.user = Some(user.clone());
        guards.check_user(user.as_str())?;
    }
    guards.check_route()?;
    // 3b. Global buckets (`scope: global`): asked of the store only now, once every local
    //     bucket (the same rates) admitted, so a flood is cut above without a round trip;
    //     one call for all of them. A store error fails open or closed as each says.
    if let Some(global) = &route.global {
        global
            .check(&*app.store, seen.client_ip, user.as_ref())
            .await?;
    }

    let (req, limit) = body::limit_request(req, max_body)?;
    let resp = if let Some(sale) = route.route.sale.as_ref() {
        // 5–9. A flash-sale route: only a request that wins stock is forwarded.
        let user = user.ok_or_else(|| Reject::Unauthenticated("no user identity".into()))?;
        admit_sale(
            app,
            snap,
            sale,
            user,
            &matched.params,
            (req, limit, seen),
            peer,
        )
        .await?
    } else {
        // An ordinary route: forward untouched.
        let asked = Instant::now();
        let result = forward(snap, req, peer, limit).await;
        seen.upstream(asked, &result);
        result?
    };
    // The in-flight slot is held until the response body has been sent.
    Ok(match slot {
        Some(slot) => resp.map(|b| body::guarded(b, slot)),
        None => resp,
    })
}

/// Steps 5–9 of the request path for a flash-sale route.
async fn admit_sale(
    app: &Arc<App>,
    snap: &Snapshot,
    sale: &Sale,
    user: UserId,
    params: &matchit::Params<'_, '_>,
    (req, limit, seen): (Request<Body>, body::BodyLimit, &mut Seen<'_>),
    peer: Peer,
) -> Result<Response<Body>, Reject> {
    let (parts, body) = req.into_parts();
    let (order, body) = sale::read_order(sale, &parts, params, body).await?;

    // 5. Sale window, then 6. the local sold-out flag: both answer without the store.
    sale::check_window(sale, SystemTime::now())?;
    if app.sold_out.is_sold_out(&order.sku) {
        return Err(Reject::SoldOut { remaining: 0 });
    }

    // 7. The reservation: one atomic script. Any store failure fails closed.
    let request = ReserveRequest {
        sku: order.sku.clone(),
        user: user.clone(),
        quantity: order.quantity,
        per_user_limit: sale.per_user_limit,
    };
    // The SKU's stock stream, if shoppers watch it, learns what this reserve decided.
    let probe = app.stock_events.probe(&order.sku);
    let reserved = app.store.reserve(&request).await;
    app.stock_events.decided(probe, &reserved);
    let reservation = match reserved {
        Ok(ReserveOutcome::Won { reservation, .. }) => {
            seen.won = true;
            app.metrics.saw_sku(&order.sku);
            reservation
        }
        Ok(ReserveOutcome::SoldOut { remaining }) => {
            app.metrics.saw_sku(&order.sku);
            // Only an empty SKU is sold out for everybody; an order larger than what is
            // left is refused for itself (or one buyer could close the sale for all).
            if remaining == 0 {
                app.sold_out.mark(&order.sku, sale.sold_out_recheck);
            }
            return Err(Reject::SoldOut { remaining });
        }
        // Closed by the operator: not sold out, so the local sold-out flag stays unset.
        Ok(ReserveOutcome::Closed) => return Err(Reject::Closed),
        Ok(ReserveOutcome::AlreadyPurchased { held }) => {
            return Err(Reject::AlreadyPurchased { held });
        }
        Ok(ReserveOutcome::NotConfigured) => {
            return Err(Reject::NotConfigured {
                sku: order.sku.to_string(),
            });
        }
        Err(StoreError::Invalid(m)) => return Err(Reject::BadRequest(m)),
        Err(e) => {
            warn!(sku = %order.sku, error = %e, "store unavailable: failing closed");
            return Err(Reject::Unavailable);
        }
    };

    // 8–9 run in a task of their own: once a unit is won, the exchange with the backend is
    // finished (bounded by the upstream request timeout) and its real outcome recorded even
    // when the buyer goes away meanwhile (hyper then drops this future, not the task).
    let won = crate::order::Won {
        app: Arc::clone(app),
        upstream: Arc::clone(&snap.upstream),
        release_on_status: sale.release_on_status.clone(),
        sku: order.sku,
        user,
        quantity: order.quantity,
        reservation,
    };
    let asked = Instant::now();
    let (answer, answered) = tokio::sync::oneshot::channel();
    app.bookkeeping
        .spawn(won.forward(Request::from_parts(parts, body), peer, answer));
    let result = match answered.await {
        Ok(result) => result.map_err(|e| forward_error(e, &limit)),
        // The task panicked before it answered: its `Pending` guard has recorded the unit
        // as uncertain.
        Err(_) => {
            warn!("winner's exchange with the backend ended without an answer");
            Err(Reject::BadGateway)
        }
    };
    seen.upstream(asked, &result);
    result
}

/// Replaces the request's path with its canonical form, keeping the query.
fn set_path<B>(req: &mut Request<B>, path: &str) -> Result<(), Reject> {
    let pq = match req.uri().query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_owned(),
    };
    let mut parts = req.uri().clone().into_parts();
    parts.path_and_query = Some(
        pq.parse()
            .map_err(|_| Reject::BadRequest("the request path cannot be rebuilt".into()))?,
    );
    *req.uri_mut() = http::Uri::from_parts(parts)
        .map_err(|_| Reject::BadRequest("the request path cannot be rebuilt".into()))?;
    Ok(())
}

async fn forward(
    snap: &Snapshot,
    req: Request<Body>,
    peer: Peer,
    limit: body::BodyLimit,
) -> Result<Response<Body>, Reject> {
    snap.upstream
        .forward(req, peer, crate::forward::Again::IfIdempotent)
        .await
        .map_err(|e| forward_error(e, &limit))
}

fn forward_error(e: ForwardError, limit: &body::BodyLimit) -> Reject {
    if limit.as_ref().is_some_and(|t| t.load(Ordering::Acquire)) {
        return Reject::PayloadTooLarge;
    }
    warn!(error = %e, "forward failed");
    match e {
        ForwardError::Connect(_) | ForwardError::Failed(_) => Reject::BadGateway,
        ForwardError::Timeout(_) => Reject::GatewayTimeout,
        ForwardError::BadResponse(_) => Reject::BadUpstreamResponse,
        ForwardError::ClientBody(e) => {
            Reject::BadRequest(format!("the request body could not be read: {e}"))
        }
    }
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
