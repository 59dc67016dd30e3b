//! A route's `waiting_room`: the visitors let in at once and per minute, how long an idle
//! visitor keeps a place, the queue's order, the pre-queue before a sale's start, the cookie
//! and its HMAC key (read from the environment here, so `flashgate check` and a start both
//! refuse a missing key with the file, line and key), and how the queue answers.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::StatusCode;
use serde::Deserialize;
use serde_saphyr::{Location, Spanned};

use super::ConfigError;
use super::values::{Dur, Timestamp};

/// Shortest room key accepted (as for the signing key).
pub const MIN_ROOM_KEY_BYTES: usize = 32;
/// Longest session: a cookie's expiry and the store's scores stay small numbers.
const MAX_SESSION: Duration = Duration::from_secs(7 * 24 * 3600);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoom {
    pub total_active: Spanned<u32>,
    pub new_per_minute: Spanned<u32>,
    pub session_duration: Option<Spanned<Dur>>,
    #[serde(default)]
    pub queueing: Queueing,
    pub prequeue_from: Option<Spanned<Timestamp>>,
    pub opens_at: Option<Spanned<Timestamp>>,
    pub cookie: Option<Spanned<String>>,
    #[serde(default)]
    pub secure_cookie: bool,
    pub key_env: Spanned<String>,
    pub json_for: Option<Vec<String>>,
    pub page_status: Option<Spanned<u16>>,
    pub json_status: Option<Spanned<u16>>,
    pub page_template: Option<Spanned<std::path::PathBuf>>,
}

/// The order visitors leave the queue in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Queueing {
    /// By entry time.
    #[default]
    Fifo,
    /// By a random draw made when the visitor entered.
    Random,
}

/// The room's HMAC key; never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct RoomKey(pub Arc<[u8]>);

impl std::fmt::Debug for RoomKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RoomKey(..)")
    }
}

/// A compiled `waiting_room`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Room {
    /// The route's name: the room's name in the store, the cookie's MAC and the admin API.
    pub name: String,
    pub total_active: u32,
    pub new_per_minute: u32,
    pub session: Duration,
    pub queueing: Queueing,
    /// From `prequeue_from` to `opens_at`, everyone is queued, then shuffled once at the start.
    pub prequeue: Option<(SystemTime, SystemTime)>,
    pub cookie: String,
    pub secure_cookie: bool,
    pub key: RoomKey,
    /// Lower-cased media types whose `Accept` gets the JSON answer.
    pub json_for: Vec<String>,
    pub page_status: StatusCode,
    pub json_status: StatusCode,
    /// The page template's text (read at load), or the embedded page.
    pub page_template: Option<Arc<str>>,
}

type Err<'a> = dyn Fn(&Location, &str, String) -> ConfigError + 'a;

/// Compiles route `name`'s room. `sale_start` is the route's own sale start, the pre-queue's
/// end when `opens_at` is not set.
pub(super) fn compile_room(
    raw: RawRoom,
    name: &str,
    sale_start: Option<SystemTime>,
    base: &Path,
    err: &Err<'_>,
) -> Result<Room, ConfigError> {
    let positive = |v: &Spanned<u32>, k: &str| {
        if v.value == 0 {
            Err(err(&v.referenced, k, "must be at least 1".into()))
        } else {
            Ok(v.value)
        }
    };
    let total_active = positive(&raw.total_active, "total_active")?;
    let new_per_minute = positive(&raw.new_per_minute, "new_per_minute")?;
    let session = match raw.session_duration {
        None => Duration::from_secs(300),
        Some(s) if s.value.0 < Duration::from_secs(1) || s.value.0 > MAX_SESSION => {
            return Err(err(
                &s.referenced,
                "session_duration",
                "must be between 1s and 7 days".into(),
            ));
        }
        Some(s) => s.value.0,
    };
    if let (None, Some(opens)) = (&raw.prequeue_from, &raw.opens_at) {
        return Err(err(
            &opens.referenced,
            "opens_at",
            "only the end of a pre-queue: set `prequeue_from` too".into(),
        ));
    }
    let prequeue = match (
        raw.prequeue_from,
        raw.opens_at.map(|o| o.value.0).or(sale_start),
    ) {
        (None, _) => None,
        (Some(from), None) => {
            return Err(err(
                &from.referenced,
                "prequeue_from",
                "needs the start it queues for: `opens_at`, or a `sale.start` on the route".into(),
            ));
        }
        (Some(from), Some(start)) if from.value.0 >= start => {
            return Err(err(
                &from.referenced,
                "prequeue_from",
                "must be before the start (`opens_at` or the route's `sale.start`)".into(),
            ));
        }
        (Some(from), Some(start)) => Some((from.value.0, start)),
    };
    let cookie = match raw.cookie {
        None => "fg_room".to_owned(),
        Some(c) if valid_cookie_name(&c.value) => c.value,
        Some(c) => {
            return Err(err(
                &c.referenced,
                "cookie",
                "a cookie name: letters, digits, `-`, `_`, `.` only".into(),
            ));
        }
    };
    let status = |s: Option<Spanned<u16>>, k: &str, default: StatusCode| match s {
        None => Ok(default),
        Some(s) => match StatusCode::from_u16(s.value) {
            Ok(code) if (200..=599).contains(&s.value) && s.value != 204 && s.value != 304 => {
                Ok(code)
            }
            _ => Err(err(
                &s.referenced,
                k,
                "a status from 200 to 599 with a body (not 204 or 304)".into(),
            )),
        },
    };
    let page_status = status(raw.page_status, "page_status", StatusCode::OK)?;
    let json_status = status(
        raw.json_status,
        "json_status",
        StatusCode::TOO_MANY_REQUESTS,
    )?;
    let page_template = raw
        .page_template
        .map(|p| {
            let path = base.join(&p.value);
            std::fs::read_to_string(&path).map(Arc::from).map_err(|e| {
                err(
                    &p.referenced,
                    "page_template",
                    format!("cannot read {}: {e}", path.display()),
                )
            })
        })
        .transpose()?;
    let json_for = raw
        .json_for
        .unwrap_or_else(|| vec!["application/json".into()])
        .into_iter()
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect();
    // The key last: every other rule is checked without it (`flashgate check` on a machine
    // that does not hold the key still reports them).
    let var = raw.key_env.value.trim();
    let key = match std::env::var(var) {
        Ok(k) if k.len() >= MIN_ROOM_KEY_BYTES => RoomKey(k.into_bytes().into()),
        Ok(k) => {
            return Err(err(
                &raw.key_env.referenced,
                "key_env",
                format!(
                    "environment variable {var} holds {} bytes; the room key must be at least {MIN_ROOM_KEY_BYTES} (e.g. `openssl rand -hex 32`), the same on every instance",
                    k.len()
                ),
            ));
        }
        Err(_) => {
            return Err(err(
                &raw.key_env.referenced,
                "key_env",
                format!("environment variable {var} is not set (the room's cookie key)"),
            ));
        }
    };
    Ok(Room {
        name: name.to_owned(),
        total_active,
        new_per_minute,
        session,
        queueing: raw.queueing,
        prequeue,
        cookie,
        secure_cookie: raw.secure_cookie,
        key,
        json_for,
        page_status,
        json_status,
        page_template,
    })
}

fn valid_cookie_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}
