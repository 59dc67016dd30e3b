//! A waiting room's visitors: the room route's config and a visitor that keeps its cookie.

use std::time::{Duration, Instant, SystemTime};

use super::{Answer, Backend, Flashgate, HttpClient, config, send};

pub const KEY_VAR: &str = "FLASHGATE_TEST_ROOM_KEY";
const KEY: &str = "room-key-for-tests-0123456789abcdef";

/// A config with the admin API, the room route `pages` on `/sale/{*rest}` (its
/// `waiting_room:` lines given), and a catch-all.
pub fn room_config(backend: &Backend, store: &str, room: &str) -> String {
    // Only this test binary reads this variable, and it is set before flashgate starts.
    unsafe { std::env::set_var(KEY_VAR, KEY) };
    config(
        backend,
        &format!(
            "admin: {{ listen: \"127.0.0.1:0\" }}\n\
             {store}routes:\n\
             \x20 - name: pages\n\
             \x20   match: {{ path: \"/sale/{{*rest}}\" }}\n\
             \x20   waiting_room:\n\
             \x20     key_env: {KEY_VAR}\n{room}\
             \x20 - name: rest\n\
             \x20   match: {{ path: \"/{{*rest}}\" }}\n"
        ),
    )
}

/// One visitor's answer: passed (the backend answered 200) or queued at a position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Visit {
    Passed,
    Queued(u64),
}

/// A visitor: its cookie (`name=value`), if it has one.
#[derive(Debug, Clone, Default)]
pub struct Visitor {
    pub cookie: Option<String>,
}

impl Visitor {
    /// Asks `fg` for `/sale/item` (JSON), keeping any cookie set.
    pub async fn visit(&mut self, c: &HttpClient, fg: &Flashgate) -> Visit {
        let a = self.ask(c, fg, "application/json").await;
        match a.status.as_u16() {
            200 => Visit::Passed,
            429 => {
                let j = a.json();
                assert_eq!(j["state"], "queued", "{j}");
                assert!(a.headers.contains_key("retry-after"));
                Visit::Queued(j["position"].as_u64().expect("position"))
            }
            other => panic!("unexpected {other}: {}", a.text()),
        }
    }

    pub async fn ask(&mut self, c: &HttpClient, fg: &Flashgate, accept: &str) -> Answer {
        let mut headers = vec![("accept", accept)];
        let cookie = self.cookie.clone();
        if let Some(cookie) = &cookie {
            headers.push(("cookie", cookie));
        }
        let a = send(c, "GET", &fg.url("/sale/item"), &headers, "").await;
        if let Some(set) = a.headers.get("set-cookie") {
            let set = set.to_str().unwrap();
            assert!(
                set.contains("HttpOnly") && set.contains("SameSite=Lax"),
                "{set}"
            );
            self.cookie = Some(set.split(';').next().unwrap().to_owned());
        }
        a
    }
}

/// `prequeue_from` a minute ago and `opens_at` in `opens_in`, as config lines.
pub fn prequeue(opens_in: Duration) -> (String, Instant) {
    let now = SystemTime::now();
    let from = humantime::format_rfc3339_millis(now - Duration::from_secs(60));
    let start = humantime::format_rfc3339_millis(now + opens_in);
    (
        format!("      prequeue_from: {from}\n      opens_at: {start}\n"),
        Instant::now() + opens_in,
    )
}
