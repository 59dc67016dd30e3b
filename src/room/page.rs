//! The queue's answer: the HTML page (embedded, self-contained, or the configured
//! `page_template`) or, for an `Accept` in `json_for`, JSON
//! `{"state":"queued","position":N,"estimated_wait_s":S,"retry_after_s":R}`.
//!
//! The page refreshes itself: a small inline script asks the same URL for the JSON form
//! (same cookie) every `retry_after_s` seconds, shows the new position and wait, and reloads
//! the page once the answer is no longer a queue answer (the visitor was let in). A template
//! may use `{{position}}`, `{{estimated_wait}}` (e.g. `3 min`), `{{estimated_wait_s}}`,
//! `{{retry_after_s}}`, `{{room}}` and `{{refresh_script}}` (the script, which updates the
//! elements with ids `fg-position` and `fg-wait`).

use http::header::{CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER, SET_COOKIE};
use std::time::Duration;

use http::{HeaderMap, HeaderValue, Response};

use crate::body::{self, Body};
use crate::config::Room;

const PAGE: &str = include_str!("page.html");

/// The page's script: `{{retry_after_s}}` is filled in when the page is made.
const SCRIPT: &str = r#"<script>
(function () {
  var wait = function (s) { return s < 60 ? s + " s" : Math.ceil(s / 60) + " min"; };
  var next = {{retry_after_s}};
  function poll() {
    fetch(location.href, { headers: { Accept: "application/json" }, credentials: "same-origin", cache: "no-store" })
      .then(function (r) { return r.json().catch(function () { return null; }); })
      .then(function (j) {
        if (!j || j.state !== "queued") { location.reload(); return; }
        document.getElementById("fg-position").textContent = j.position;
        var w = document.getElementById("fg-wait");
        if (w) { w.textContent = wait(j.estimated_wait_s); }
        next = j.retry_after_s;
        setTimeout(poll, next * 1000);
      })
      .catch(function () { setTimeout(poll, next * 1000); });
  }
  setTimeout(poll, next * 1000);
})();
</script>"#;

/// How soon a queued visitor should ask again: a quarter of the wait, 1 to 10 seconds, and
/// never more than a third of a session (the store drops a place nobody asked about for a
/// session: a visitor told to wait longer would lose it between two polls).
pub fn retry_after(wait_s: u64, session: Duration) -> u64 {
    let most = (session.as_secs() / 3).clamp(1, 10);
    wait_s.div_ceil(4).clamp(1, most)
}

/// The answer for a visitor at `position`, `wait_s` from being let in.
pub fn queued(
    room: &Room,
    headers: &HeaderMap,
    position: u64,
    wait_s: u64,
    cookie: HeaderValue,
) -> Response<Body> {
    let retry = retry_after(wait_s, room.session);
    let (status, content_type, text) = if wants_json(room, headers) {
        let json = serde_json::json!({
            "state": "queued",
            "position": position,
            "estimated_wait_s": wait_s,
            "retry_after_s": retry,
        });
        (room.json_status, "application/json", format!("{json}\n"))
    } else {
        let template = room.page_template.as_deref().unwrap_or(PAGE);
        (
            room.page_status,
            "text/html; charset=utf-8",
            fill(template, room, position, wait_s, retry),
        )
    };
    let mut resp = Response::new(body::full(text.into_bytes()));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(RETRY_AFTER, HeaderValue::from(retry));
    h.insert(SET_COOKIE, cookie);
    resp
}

/// Whether the request's `Accept` names one of the room's `json_for` types.
fn wants_json(room: &Room, headers: &HeaderMap) -> bool {
    headers
        .get_all(http::header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| {
            t.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .any(|t| room.json_for.contains(&t))
}

fn fill(template: &str, room: &Room, position: u64, wait_s: u64, retry: u64) -> String {
    let wait = if wait_s < 60 {
        format!("{wait_s} s")
    } else {
        format!("{} min", wait_s.div_ceil(60))
    };
    template
        .replace(
            "{{refresh_script}}",
            &SCRIPT.replace("{{retry_after_s}}", &retry.to_string()),
        )
        .replace("{{position}}", &position.to_string())
        .replace("{{estimated_wait_s}}", &wait_s.to_string())
        .replace("{{estimated_wait}}", &wait)
        .replace("{{retry_after_s}}", &retry.to_string())
        .replace("{{room}}", &escape(&room.name))
}

fn escape(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '<' => "&lt;".into(),
            '>' => "&gt;".into(),
            '&' => "&amp;".into(),
            '"' => "&quot;".into(),
            '\'' => "&#39;".into(),
            c => c.to_string(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_a_quarter_of_the_wait_within_bounds() {
        let five_min = Duration::from_secs(300);
        assert_eq!(retry_after(0, five_min), 1);
        assert_eq!(retry_after(8, five_min), 2);
        assert_eq!(retry_after(3600, five_min), 10);
        // Short sessions: asked again well within one, or the place is dropped meanwhile.
        assert_eq!(retry_after(3600, Duration::from_secs(15)), 5);
        assert_eq!(retry_after(3600, Duration::from_secs(2)), 1);
    }

    #[test]
    fn the_embedded_page_has_every_placeholder_filled() {
        assert!(PAGE.contains("{{position}}") && PAGE.contains("{{refresh_script}}"));
        let room_yaml_free = fill(PAGE, &test_room(), 7, 90, 3);
        assert!(!room_yaml_free.contains("{{"), "{room_yaml_free}");
        assert!(room_yaml_free.contains(">7<") && room_yaml_free.contains("2 min"));
        assert!(room_yaml_free.contains("var next = 3;"));
        assert!(
            !room_yaml_free.contains("http://") && !room_yaml_free.contains("https://"),
            "self-contained"
        );
    }

    fn test_room() -> Room {
        Room {
            name: "<pages>".into(),
            total_active: 1,
            new_per_minute: 1,
            session: std::time::Duration::from_secs(60),
            queueing: crate::config::Queueing::Fifo,
            prequeue: None,
            cookie: "fg_room".into(),
            secure_cookie: false,
            key: crate::config::RoomKey(b"k".to_vec().into()),
            json_for: vec!["application/json".into()],
            page_status: http::StatusCode::OK,
            json_status: http::StatusCode::TOO_MANY_REQUESTS,
            page_template: None,
        }
    }
}
