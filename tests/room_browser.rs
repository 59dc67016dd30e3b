//! The waiting room in a real headless Chromium (Debian's `chromium`, driven over DevTools by
//! `support::browser`): the queue page shows the visitor's position, updates it by itself as
//! the queue moves, and lets the visitor in (the page reloads into the shop's answer) when its
//! turn comes. The admin dashboard shows the room's panel meanwhile.
mod support;

use std::time::{Duration, Instant};

use serde_json::Value;
use support::browser::Browser;
use support::room::{Visit, Visitor, room_config};
use support::*;

const SHOWS: Duration = Duration::from_secs(20);

fn text_of(selector: &str) -> String {
    format!(
        "(() => {{ const e = document.querySelector({}); return e ? e.textContent.trim() : null; }})()",
        Value::from(selector)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_page_updates_its_position_and_lets_the_visitor_in() {
    support::shop::bounded(async {
        // The browser first: its start may take seconds on a loaded machine, longer than a
        // session (the queued places below would be dropped as abandoned meanwhile).
        let browser = Browser::launch().await;
        let page = browser.page(1000, 700).await;
        let backend = Backend::start_echo().await;
        let room =
            "      total_active: 1\n      new_per_minute: 60000\n      session_duration: 3s\n";
        let fg = Flashgate::start(&room_config(&backend, "", room)).await;
        let c = client();
        // One visitor in, two queued ahead of the browser.
        assert_eq!(Visitor::default().visit(&c, &fg).await, Visit::Passed);
        let mut ahead = vec![Visitor::default(), Visitor::default()];
        for (i, v) in ahead.iter_mut().enumerate() {
            assert_eq!(v.visit(&c, &fg).await, Visit::Queued(i as u64 + 1));
        }
        page.goto(&fg.url("/sale/item")).await;
        assert_eq!(page.eval(&text_of("#fg-position")).await, "3");
        assert_eq!(page.eval("document.title").await, "You are in the queue");
        let dash = browser.page(1280, 680).await;
        dash.goto(&format!(
            "{}/dashboard#token={ADMIN_READ_TOKEN}",
            fg.admin_url()
        ))
        .await;
        let cell = |n: u32| text_of(&format!("#rooms tr[data-room=\"pages\"] td:nth-child({n})"));
        dash.wait_for(&format!("{} === 'open'", cell(2)), SHOWS)
            .await;

        // The two ahead keep polling; as sessions end they are let in, and the page (polling
        // with its own cookie) shows 2, then 1, then the shop's page.
        let mut shown = vec!["3".to_owned()];
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            assert!(Instant::now() < deadline, "the page showed {shown:?}");
            let mut still = Vec::new();
            for mut v in ahead {
                if v.visit(&c, &fg).await != Visit::Passed {
                    still.push(v);
                }
            }
            ahead = still;
            let text = page
                .eval("document.body ? document.body.innerText : ''")
                .await;
            let text = text.as_str().unwrap_or_default().to_owned();
            if text.contains("\"request\"") {
                assert!(text.contains("GET /sale/item"), "{text}");
                break;
            }
            if let Some(p) = page.eval(&text_of("#fg-position")).await.as_str()
                && shown.last().map(String::as_str) != Some(p)
            {
                shown.push(p.to_owned());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(
            shown.len() >= 2 && shown.windows(2).all(|w| w[1] < w[0]),
            "the position shown must fall: {shown:?}"
        );
        // The dashboard's panel: nobody queued now, the one session taken by the browser.
        dash.wait_for(
            &format!("{} === '0' && {} === '1 / 1'", cell(3), cell(4)),
            SHOWS,
        )
        .await;
        assert_eq!(page.problems(), Vec::<String>::new(), "errors in the page");
        assert_eq!(
            dash.problems(),
            Vec::<String>::new(),
            "errors in the dashboard"
        );
        browser.close().await;
    })
    .await;
}
