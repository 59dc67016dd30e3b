//! A route's waiting room (`waiting_room` in the config): the gate step that lets a visitor
//! through, or answers with its place in the queue.
//!
//! - An admitted visitor carries an active cookie (`cookie.rs`) with its own session end: it
//!   passes with no store call, and once more than half its session has passed, one store
//!   call extends the session and a fresh cookie goes back with the answer (a sliding
//!   session, at most one store call per half session per visitor).
//! - Anyone else (no cookie, a queued cookie, an expired or forged one) costs one atomic
//!   store call (`store::room`, `lua/room.lua` on Redis): let in now (a new active cookie,
//!   and the request goes on), or queued (the page or JSON from `page.rs`, with the queued
//!   cookie that keeps the place). A forged cookie verifies as nothing: a new place at the
//!   back.
//! - The store cannot answer: new and queued visitors get 503 `unavailable` (fail closed: a
//!   room exists to protect the backend); active cookies still pass, needing no store call.

mod cookie;
mod page;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderValue, Response};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tracing::{debug, warn};

pub use self::cookie::{Pass, new_id, sign, verify};
use crate::body::Body;
use crate::config::{Queueing, Room};
use crate::metrics::Metrics;
use crate::reject::Reject;
use crate::store::limits::route_tag;
use crate::store::{RoomCall, RoomReply, RoomRules, RoomStatus, Store, StoreError};

/// What the room decided for one request.
pub enum Step {
    /// Go on (to the route's limits and the rest); with a cookie to set on the answer.
    Pass(Option<HeaderValue>),
    /// The queue's answer.
    Answer(Response<Body>),
}

/// One route's room, compiled (stateless: the store keeps the queue; rebuilt on reload).
pub struct RoomGate {
    pub config: Room,
    rules: RoomRules,
    queued: Gauge,
    active: Gauge,
    admitted: Counter,
}

impl RoomGate {
    pub fn new(room: &Room, metrics: &Metrics) -> RoomGate {
        let (queued, active, admitted) = metrics.room(&room.name);
        RoomGate {
            rules: RoomRules {
                room: route_tag(&room.name),
                total_active: room.total_active,
                new_per_minute: room.new_per_minute,
                session_ms: millis(room.session),
                random: room.queueing == Queueing::Random,
                prequeue: room
                    .prequeue
                    .map(|(from, start)| (unix_ms(from), unix_ms(start))),
            },
            config: room.clone(),
            queued,
            active,
            admitted,
        }
    }

    pub fn rules(&self) -> &RoomRules {
        &self.rules
    }

    /// Updates the room's gauges from the store's counts.
    pub fn observe(&self, s: &RoomStatus) {
        self.queued.set(i64::try_from(s.queued).unwrap_or(i64::MAX));
        self.active.set(i64::try_from(s.active).unwrap_or(i64::MAX));
    }

    /// The room's step for a request with `headers`.
    pub async fn admit(&self, store: &dyn Store, headers: &HeaderMap) -> Result<Step, Reject> {
        let key = &self.config.key.0;
        let pass = cookie::read(headers, &self.config.cookie, key, &self.config.name);
        let now = unix_ms(SystemTime::now());
        let place = match pass {
            Some(Pass::Active { id, expires_ms }) if expires_ms > now => {
                return Ok(Step::Pass(self.refresh(store, id, expires_ms, now).await));
            }
            Some(Pass::Queued { id, .. }) => Some(id),
            _ => None,
        };
        let call = RoomCall::Visit {
            place,
            new_id: new_id(),
            draw: rand::random(),
            seed: new_id(),
        };
        match store.room(&self.rules, &call).await {
            Ok(RoomReply::Admitted { id, expires_ms }) => {
                self.admitted.inc();
                debug!(room = %self.config.name, "room: admitted");
                Ok(Step::Pass(Some(self.active_cookie(id, expires_ms, now))))
            }
            Ok(RoomReply::Queued {
                id,
                position,
                status,
                ..
            }) => {
                self.observe(&status);
                let value = sign(
                    key,
                    &self.config.name,
                    &Pass::Queued {
                        id,
                        entered_ms: status.now_ms,
                    },
                );
                let set = self.set_cookie(&value, Duration::from_secs(24 * 3600));
                let wait = self.estimate(position, status.now_ms);
                Ok(Step::Answer(page::queued(
                    &self.config,
                    headers,
                    position,
                    wait,
                    set,
                )))
            }
            Ok(other) => {
                warn!(room = %self.config.name, reply = ?other, "room: the store answered a visit oddly; failing closed");
                Err(Reject::Unavailable)
            }
            Err(StoreError::Invalid(m)) => Err(Reject::BadRequest(m)),
            Err(e) => {
                warn!(room = %self.config.name, error = %e, "room: store unavailable, failing closed for new visitors");
                Err(Reject::Unavailable)
            }
        }
    }

    /// An active visitor past half its session: extend it in the store, once, and give the
    /// new end in a fresh cookie. Otherwise (early, draining, store down) nothing to set.
    async fn refresh(
        &self,
        store: &dyn Store,
        id: String,
        expires_ms: u64,
        now: u64,
    ) -> Option<HeaderValue> {
        if expires_ms.saturating_sub(now) > self.rules.session_ms / 2 {
            return None;
        }
        let call = RoomCall::Refresh { id: id.clone() };
        match store.room(&self.rules, &call).await {
            Ok(RoomReply::Refreshed {
                expires_ms: Some(e),
            }) if e > expires_ms => Some(self.active_cookie(id, e, now)),
            Ok(_) => None,
            Err(e) => {
                debug!(room = %self.config.name, error = %e, "room: session not extended (store unavailable)");
                None
            }
        }
    }

    fn active_cookie(&self, id: String, expires_ms: u64, now: u64) -> HeaderValue {
        let value = sign(
            &self.config.key.0,
            &self.config.name,
            &Pass::Active { id, expires_ms },
        );
        self.set_cookie(
            &value,
            Duration::from_millis(expires_ms.saturating_sub(now).max(1000)),
        )
    }

    fn set_cookie(&self, value: &str, max_age: Duration) -> HeaderValue {
        let secure = if self.config.secure_cookie {
            "; Secure"
        } else {
            ""
        };
        let text = format!(
            "{}={value}; Path=/; Max-Age={}; HttpOnly; SameSite=Lax{secure}",
            self.config.cookie,
            max_age.as_secs().max(1)
        );
        // The name is checked at load and the value is hex, digits and dots.
        HeaderValue::from_str(&text)
            .unwrap_or_else(|_| HeaderValue::from_static("fg_room=; Max-Age=0"))
    }

    /// Seconds until position `position` is let in, from the configured pace: the slower of
    /// `new_per_minute` and the turnover of sessions (`total_active` per session); plus the
    /// time left before the pre-queue's start. Every instance computes the same from the
    /// store's answer.
    pub fn estimate(&self, position: u64, now_ms: u64) -> u64 {
        let turnover = f64::from(self.rules.total_active) * 60_000.0 / self.rules.session_ms as f64;
        let per_minute = f64::from(self.rules.new_per_minute).min(turnover).max(1e-6);
        let mut wait = (position as f64 * 60.0 / per_minute).ceil() as u64;
        if let Some((_, start)) = self.rules.prequeue {
            wait += start.saturating_sub(now_ms).div_ceil(1000);
        }
        wait
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(millis).unwrap_or(0)
}
