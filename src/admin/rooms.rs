//! The waiting rooms' admin calls (`room/`; the operator's `flashgate room …`):
//!
//! | call | answer |
//! |---|---|
//! | `GET /v1/rooms` | `{"rooms":[status…]}`: every route's room in the running config |
//! | `GET /v1/rooms/{name}` | one room's status (below); 404 `unknown_room` |
//! | `POST /v1/rooms/{name}/pause` | admit no one new from the queue; sessions go on (and slide) |
//! | `POST /v1/rooms/{name}/resume` | admit again |
//! | `POST /v1/rooms/{name}/drain` | admit no one new, and extend no session: every session ends within `session_duration`; new visitors queue |
//!
//! A status: `{"room","mode","queued","active","admitted_total","admitted_last_minute",
//! "estimated_wait_s" (for a visitor joining the back now),"total_active","new_per_minute",
//! "session_s","queueing","prequeue"}`, counted by the store at one instant (every instance
//! answers the same on a shared store). `{name}` is the route's name, percent-decoded once.

use http::{Method, Response, StatusCode};
use serde_json::{Value, json};
use tracing::info;

use super::{error, reply, store_error};
use crate::body::Body;
use crate::config::Queueing;
use crate::room::RoomGate;
use crate::state::App;
use crate::store::{RoomCall, RoomMode, RoomReply, RoomStatus, StoreError};

/// A room call, from its path.
pub(super) enum Call {
    List,
    Status(String),
    Mode(String, RoomMode),
}

impl Call {
    pub(super) fn from_path(segments: &[&str]) -> Option<Call> {
        let name = |raw: &str| {
            percent_encoding::percent_decode_str(raw)
                .decode_utf8_lossy()
                .into_owned()
        };
        Some(match segments {
            ["v1", "rooms"] => Call::List,
            ["v1", "rooms", n] => Call::Status(name(n)),
            ["v1", "rooms", n, "pause"] => Call::Mode(name(n), RoomMode::Paused),
            ["v1", "rooms", n, "resume"] => Call::Mode(name(n), RoomMode::Open),
            ["v1", "rooms", n, "drain"] => Call::Mode(name(n), RoomMode::Draining),
            _ => return None,
        })
    }
}

pub(super) async fn handle(app: &App, who: &str, call: Call, method: &Method) -> Response<Body> {
    let snapshot = app.snapshot();
    let rooms: Vec<&RoomGate> = snapshot
        .routes
        .iter()
        .filter_map(|r| r.room.as_deref())
        .collect();
    let find = |name: &str| rooms.iter().copied().find(|g| g.config.name == name);
    let unknown = |name: &str| {
        error(
            StatusCode::NOT_FOUND,
            "unknown_room",
            &format!("no route named `{name}` has a waiting room"),
        )
    };
    let wrong_method = || {
        error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "wrong method for this call",
        )
    };
    match call {
        Call::List if method == Method::GET => {
            let mut all = Vec::with_capacity(rooms.len());
            for gate in &rooms {
                match ask(app, gate, &RoomCall::Status).await {
                    Ok(v) => all.push(v),
                    Err(e) => return store_error(e),
                }
            }
            reply(StatusCode::OK, json!({ "rooms": all }))
        }
        Call::Status(name) if method == Method::GET => match find(&name) {
            None => unknown(&name),
            Some(gate) => match ask(app, gate, &RoomCall::Status).await {
                Ok(v) => reply(StatusCode::OK, v),
                Err(e) => store_error(e),
            },
        },
        Call::Mode(name, mode) if method == Method::POST => match find(&name) {
            None => unknown(&name),
            Some(gate) => match ask(app, gate, &RoomCall::SetMode(mode)).await {
                Ok(v) => {
                    info!(token = who, room = %name, mode = mode.as_str(), "admin write: room mode");
                    reply(StatusCode::OK, v)
                }
                Err(e) => store_error(e),
            },
        },
        _ => wrong_method(),
    }
}

/// One store call for `gate`'s room; its status as the API's JSON (the gauges updated too).
async fn ask(app: &App, gate: &RoomGate, call: &RoomCall) -> Result<Value, StoreError> {
    match app.store.room(gate.rules(), call).await? {
        RoomReply::Status(s) => {
            gate.observe(&s);
            Ok(status_json(gate, &s))
        }
        other => Err(StoreError::Protocol(format!(
            "a room status call answered {other:?}"
        ))),
    }
}

/// A room's status for the API, the CLI and the dashboard.
pub fn status_json(gate: &RoomGate, s: &RoomStatus) -> Value {
    let c = &gate.config;
    json!({
        "room": c.name,
        "mode": s.mode.as_str(),
        "queued": s.queued,
        "active": s.active,
        "admitted_total": s.admitted_total,
        "admitted_last_minute": s.admitted_last_minute,
        "estimated_wait_s": gate.estimate(s.queued + 1, s.now_ms),
        "total_active": c.total_active,
        "new_per_minute": c.new_per_minute,
        "session_s": c.session.as_secs(),
        "queueing": match c.queueing { Queueing::Fifo => "fifo", Queueing::Random => "random" },
        "prequeue": c.prequeue.is_some(),
    })
}

/// Every room's status for the dashboard's snapshot, each read bounded by a second; a room
/// whose read failed shows `"error"`.
pub async fn statuses(app: &App) -> Vec<Value> {
    let snapshot = app.snapshot();
    let mut all = Vec::new();
    for gate in snapshot.routes.iter().filter_map(|r| r.room.as_deref()) {
        let read = tokio::time::timeout(
            crate::metrics::SKU_STATUS_TIMEOUT,
            ask(app, gate, &RoomCall::Status),
        )
        .await;
        all.push(match read {
            Ok(Ok(v)) => v,
            _ => json!({ "room": gate.config.name, "error": "unavailable" }),
        });
    }
    all
}
