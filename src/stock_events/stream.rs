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

#[cfg(test)]
mod tests {
    use super::super::source::{Live, StockState};
    use super::*;

    fn live(remaining: u64, heartbeat: u32) -> Published {
        Published::Live(Live {
            event: Event {
                remaining,
                state: StockState::Open,
            },
            frame: Bytes::from(format!("data: {remaining}\n\n")),
            heartbeat,
        })
    }

    async fn next(s: &mut Subscription) -> Option<Bytes> {
        tokio::time::timeout(std::time::Duration::from_secs(1), s.next())
            .await
            .expect("a value in time")
    }

    #[tokio::test]
    async fn each_event_once_the_newest_only_and_keep_alives() {
        let tx = watch::Sender::new(live(5, 0));
        let mut s = Subscription::new(tx.subscribe());
        assert_eq!(next(&mut s).await.unwrap(), "data: 5\n\n");
        // Two changes before the subscriber reads: only the newest is written.
        tx.send_replace(live(4, 0));
        tx.send_replace(live(3, 0));
        assert_eq!(next(&mut s).await.unwrap(), "data: 3\n\n");
        // The same event again (a slow reader that missed a change back): nothing.
        tx.send_replace(live(2, 0));
        tx.send_replace(live(3, 0));
        let quiet = tokio::time::timeout(std::time::Duration::from_millis(50), s.next()).await;
        assert!(quiet.is_err(), "an event repeated");
        // The heartbeat with no change: a comment.
        tx.send_replace(live(3, 1));
        assert_eq!(next(&mut s).await.unwrap(), KEEP_ALIVE);
        // The source gone (a shutdown): the stream ends.
        drop(tx);
        assert_eq!(next(&mut s).await, None);
    }

    #[test]
    fn stream_paths() {
        let route = |stream: &str| {
            let yaml = format!(
                "upstream: {{ url: \"http://127.0.0.1:1\" }}\nroutes:\n  - name: b\n    \
                 match: {{ method: POST, path: \"/b/{{sku}}\" }}\n    identity: {{ header: U }}\n    \
                 sale: {{ sku: {{ path_param: sku }}, stock_events: \"{stream}\" }}\n"
            );
            crate::config::parse(&yaml, "t.yaml").unwrap().routes
        };
        let paths = Paths::new(&route("/e/{sku}/events"));
        assert_eq!(paths.sku_in("/e/tee/events"), Some("tee"));
        assert_eq!(paths.sku_in("/e/tee"), None);
        assert_eq!(Paths::new(&[]).sku_in("/e/tee/events"), None);
    }
}
