//! flashgate: a reverse-proxy admission sidecar for flash sales.
//!
//! All traffic to a shop backend flows through flashgate. Ordinary routes are proxied
//! untouched; flash-sale routes are admitted only when they win a unit of stock.
//!
//! The request path, in the order a request meets it:
//! 1. [`server`] accepts HTTP/1.1 and h2c, enforces connection, header and idle limits;
//!    [`request_line`] repairs what clients send unencoded in a request target;
//!    [`head_errors`] gives hyper's own answers to heads it refused a JSON body.
//! 2. [`gate`] runs the steps below in order and turns any [`reject::Reject`] into an answer.
//! 3. [`hygiene`] strips headers only flashgate may set; [`canonical`] gives the one path
//!    that is both matched and forwarded (ambiguous spellings refused);
//!    [`state::Snapshot::route_for`] matches the route (first match wins); [`fence`] refuses
//!    any other spelling of a sale path.
//!    A route with a waiting room meets [`room`] next: an admitted visitor's signed cookie
//!    passes, anyone else gets a place in the queue (one store call) or is let in.
//! 4. [`limit`] guards: in-flight slot, per-IP bucket, [`identity`], per-user bucket, route bucket;
//!    then a route's `scope: global` buckets, in one store call ([`limit::global`]).
//! 5. On a sale route, [`sale`] reads the order (SKU, quantity) — parsed once into the
//!    [`ids`] newtypes the store takes — and the store reserves a unit;
//!    [`order`] forwards the winner and records the outcome (sold, released, uncertain).
//!
//! Before routing, a sale's stock stream (`sale.stock_events`) is answered by
//! [`stock_events`] itself: server-sent events, never forwarded.
//! 6. [`forward`] sends the request to the backend over a pooled client, streaming both ways;
//!    [`interim`] passes the backend's `103 Early Hints` on and bounds a bare `100`/`102`.
//!
//! Configuration is parsed, validated and compiled once by [`config`]. Around the path:
//! [`admin`] (the operator's API and CLI) and [`audit`] (do a sale's books balance?).

pub mod access_log;
pub mod admin;
pub mod audit;
pub mod body;
pub mod canonical;
pub mod client_ip;
pub mod config;
pub mod demo;
pub mod fence;
pub mod fleet;
pub mod forward;
pub mod framing;
pub mod gate;
pub mod head_errors;
pub mod heap;
pub mod hygiene;
pub mod identity;
pub mod ids;
pub mod interim;
pub mod limit;
pub mod metrics;
pub mod observe;
pub mod order;
pub mod reject;
pub mod reload;
pub mod request_line;
pub mod room;
pub mod sale;
pub mod server;
pub mod signing;
pub mod state;
pub mod stock_events;
pub mod store;
pub mod trace;
