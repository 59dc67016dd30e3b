//! The shopper's side: which paths are stock streams ([`Paths`]), the answer to a request for
//! one ([`answer`], called by `gate.rs` before routing), and one subscriber's view of its
//! SKU's source ([`Subscription`]), streamed as the response body.

use std::convert::Infallible;

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE};
use http::{HeaderName, HeaderValue, Method, Response};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use tokio::sync::watch;
use tracing::warn;

use super::source::{Event, Published};
use crate::body::Body;
use crate::config::Route;
use crate::ids::Sku;
use crate::reject::Reject;
use crate::state::App;

/// The comment a subscriber gets every `HEARTBEAT_EVERY` without a change.
const KEEP_ALIVE: &[u8] = b": keep-alive\n\n";

/// Asks nginx (and proxies that honour it) not to buffer the stream.
const X_ACCEL_BUFFERING: HeaderName = HeaderName::from_static("x-accel-buffering");

/// Every route's `sale.stock_events` template, compiled into one router (built with the
/// snapshot; the config has refused templates that overlap each other or a route).
#[derive(Default)]
pub struct Paths {
    router: Option<matchit::Router<()>>,
}

impl Paths {
    pub fn new(routes: &[Route]) -> Paths {
        let mut router = matchit::Router::new();
        let mut any = false;
        // The same template on two sale routes is one stream.
        let templates: std::collections::BTreeSet<&str> = routes
            .iter()
            .filter_map(|r| r.sale.as_ref()?.stock_events.as_deref())
            .collect();
        for template in templates {
            match router.insert(template, ()) {
                Ok(()) => any = true,
                Err(e) => warn!(template, error = %e, "stock stream path not served"),
            }
        }
        Paths {
            router: any.then_some(router),
        }
    }

    /// The `{sku}` of a (canonical) path that is a stock stream, as written in the path.
    pub fn sku_in<'p>(&self, path: &'p str) -> Option<&'p str> {
        let m = self.router.as_ref()?.at(path).ok()?;
        m.params.get("sku")
    }
}

/// Answers a request for a stock stream: GET only (405 otherwise); the SKU from the path,
/// percent-decoded once and parsed by the one SKU rule; then the subscription (see
/// [`super::StockEvents::subscribe`] for its refusals).
pub async fn answer(app: &App, method: &Method, raw_sku: &str) -> Result<Response<Body>, Reject> {
    if method != Method::GET {
        return Err(Reject::MethodNotAllowed {
            allow: "GET".into(),
        });
    }
    let sku = percent_encoding::percent_decode_str(raw_sku)
        .decode_utf8()
        .map_err(|_| Reject::BadRequest("path parameter is not valid UTF-8".into()))?;
    let sku = Sku::parse(&sku)?;
    let subscription = app.stock_events.subscribe(sku).await?;
    Ok(response(subscription))
}

/// The `text/event-stream` answer, marked for the server to take out of hyper once its head
/// is written (`server::Detach`).
fn response(subscription: Subscription) -> Response<Body> {
    let events = futures_util::stream::unfold(subscription, |mut s| async move {
        let data = s.next().await?;
        Some((Ok::<_, Infallible>(Frame::data(data)), s))
    });
    let body = StreamBody::new(events)
        .map_err(|never| match never {})
        .boxed_unsync();
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(X_ACCEL_BUFFERING, HeaderValue::from_static("no"));
    resp.extensions_mut().insert(crate::server::Detach);
    resp
}

/// One subscriber: a receiver of its SKU's source and what it last wrote (a few words).
pub struct Subscription {
    rx: watch::Receiver<Published>,
    /// The event last written (`None` before the first).
    last: Option<Event>,
    heartbeat: u32,
}

impl Subscription {
    pub(super) fn new(rx: watch::Receiver<Published>) -> Subscription {
        Subscription {
            rx,
            last: None,
            heartbeat: 0,
        }
    }

    /// The next bytes to write: the current event first, then each new one (the newest
    /// only, never the one just written), or a keep-alive comment when the heartbeat ticks.
    /// `None` once the source is gone (the server is shutting down).
    pub async fn next(&mut self) -> Option<Bytes> {
        loop {
            {
                let published = self.rx.borrow_and_update();
                let Published::Live(live) = &*published else {
                    return None;
                };
                if self.last != Some(live.event) {
                    self.last = Some(live.event);
                    self.heartbeat = live.heartbeat;
                    return Some(live.frame.clone());
                }
                if self.heartbeat != live.heartbeat {
                    self.heartbeat = live.heartbeat;
                    return Some(Bytes::from_static(KEEP_ALIVE));
                }
            }
            self.rx.changed().await.ok()?;
        }
    }
}
