//! A real headless browser for tests: Debian's Chromium (`/usr/bin/chromium`, or
//! `FLASHGATE_CHROMIUM`), driven over the Chrome DevTools Protocol on a WebSocket with the
//! `tokio-tungstenite` the tests already use. Only a handful of long-stable CDP calls are
//! needed (open a tab, navigate, evaluate, screenshot), so a few lines here stand in for a
//! driver crate or a Node toolchain, and nothing ties the tests to one Chromium version.
//!
//! The browser gets a fresh profile in a temporary directory, listens on 127.0.0.1 only (on a
//! port it picks and writes to `DevToolsActivePort`), runs in its own process group, and is
//! closed (or that group killed) when the [`Browser`] is dropped. Every wait is bounded.

use std::collections::HashMap;
use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;

/// Bound on one DevTools call.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on the browser coming up.
const LAUNCH_TIMEOUT: Duration = Duration::from_secs(60);
/// Events kept for [`Page::problems`].
const MAX_EVENTS: usize = 2000;

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Value>>>>;

/// A running headless Chromium.
pub struct Browser {
    child: tokio::process::Child,
    profile: tempfile::TempDir,
    out: mpsc::UnboundedSender<Message>,
    pending: Pending,
    events: Arc<Mutex<Vec<Value>>>,
    next_id: AtomicU64,
}

/// Where the browser is: `FLASHGATE_CHROMIUM`, else Debian's `/usr/bin/chromium`.
pub fn executable() -> String {
    std::env::var("FLASHGATE_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".to_owned())
}

impl Browser {
    /// Starts Chromium headless with a new profile and connects to it.
    pub async fn launch() -> Browser {
        let profile = tempfile::tempdir().expect("a profile directory");
        let log = std::fs::File::create(profile.path().join("chromium.log")).expect("log file");
        let exe = executable();
        let mut cmd = tokio::process::Command::new(&exe);
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            "--disable-default-apps",
            "--disable-background-timer-throttling",
            "--disable-renderer-backgrounding",
            "--disable-backgrounding-occluded-windows",
            "--hide-scrollbars",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
            "--window-size=1280,900",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("about:blank")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        // Its own group: renderers and helpers go with it (see `Drop`).
        .process_group(0)
        .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {exe} (is `chromium` installed?): {e}"));
        let port_file = profile.path().join("DevToolsActivePort");
        let started = Instant::now();
        let endpoint = loop {
            if let Ok(text) = std::fs::read_to_string(&port_file) {
                let mut lines = text.lines();
                if let (Some(port), Some(path)) = (lines.next(), lines.next()) {
                    break format!("ws://127.0.0.1:{port}{path}");
                }
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "chromium exited at start ({status}, signal {:?}): {}",
                    status.signal(),
                    read_log(&profile)
                );
            }
            assert!(
                started.elapsed() < LAUNCH_TIMEOUT,
                "chromium did not open its DevTools port within {LAUNCH_TIMEOUT:?}: {}",
                read_log(&profile)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let (ws, _) =
            tokio::time::timeout(CALL_TIMEOUT, tokio_tungstenite::connect_async(&endpoint))
                .await
                .expect("DevTools connect timed out")
                .unwrap_or_else(|e| panic!("cannot connect to {endpoint}: {e}"));
        let (mut sink, mut stream) = ws.split();
        let (out, mut out_rx) = mpsc::unbounded_channel::<Message>();
        tokio::spawn(async move {
            while let Some(m) = out_rx.recv().await {
                if sink.send(m).await.is_err() {
                    return;
                }
            }
        });
        let pending: Pending = Arc::default();
        let events: Arc<Mutex<Vec<Value>>> = Arc::default();
        let (pending2, events2) = (pending.clone(), events.clone());
        tokio::spawn(async move {
            while let Some(Ok(msg)) = stream.next().await {
                let Ok(text) = msg.to_text() else { continue };
                let Ok(v) = serde_json::from_str::<Value>(text) else {
                    continue;
                };
                match v["id"].as_u64() {
                    Some(id) => {
                        if let Some(tx) = pending2.lock().unwrap().remove(&id) {
                            let _ = tx.send(v);
                        }
                    }
                    None => {
                        let mut events = events2.lock().unwrap();
                        if events.len() < MAX_EVENTS {
                            events.push(v);
                        }
                    }
                }
            }
        });
        Browser {
            child,
            profile,
            out,
            pending,
            events,
            next_id: AtomicU64::new(1),
        }
    }

    /// One DevTools call (to a tab's `session`, or to the browser); its `result`, or the
    /// protocol's error as `Err`.
    async fn call(
        &self,
        session: Option<&str>,
        method: &str,
        params: Value,
    ) -> Result<Value, String> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap().insert(id, tx);
        self.out
            .send(Message::text(msg.to_string()))
            .map_err(|_| "DevTools connection closed".to_owned())?;
        let answer = tokio::time::timeout(CALL_TIMEOUT, rx)
            .await
            .map_err(|_| format!("{method}: no answer within {CALL_TIMEOUT:?}"))?
            .map_err(|_| format!("{method}: DevTools connection closed"))?;
        match answer.get("error") {
            Some(e) => Err(format!("{method}: {e}")),
            None => Ok(answer["result"].clone()),
        }
    }

    /// A new tab, `width`×`height` CSS pixels.
    pub async fn page(&self, width: u32, height: u32) -> Page<'_> {
        let target = self
            .call(None, "Target.createTarget", json!({"url": "about:blank"}))
            .await
            .expect("new tab");
        let attached = self
            .call(
                None,
                "Target.attachToTarget",
                json!({"targetId": target["targetId"], "flatten": true}),
            )
            .await
            .expect("attach to the tab");
        let session = attached["sessionId"]
            .as_str()
            .expect("a session id")
            .to_owned();
        let page = Page {
            browser: self,
            session,
        };
        for domain in ["Page.enable", "Runtime.enable", "Log.enable"] {
            page.call(domain, json!({})).await;
        }
        page.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": false}),
        )
        .await;
        page
    }

    /// The browser's own log (stderr), for a failure message.
    pub fn log(&self) -> String {
        read_log(&self.profile)
    }
}

fn read_log(profile: &tempfile::TempDir) -> String {
    std::fs::read_to_string(profile.path().join("chromium.log")).unwrap_or_default()
}

impl Browser {
    /// Closes the browser (Browser.close), waiting a bounded time for it to exit.
    pub async fn close(mut self) {
        let _ = self.call(None, "Browser.close", json!({})).await;
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Whatever is left of the process group we started (renderers, helpers), and only it:
        // after `close` nothing, after a failed test the whole browser.
        if let Ok(None) = self.child.try_wait()
            && let Some(pid) = self.child.id()
        {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{pid}")])
                .stderr(Stdio::null())
                .status();
        }
        let _ = self.child.start_kill();
    }
}

/// One tab.
pub struct Page<'b> {
    browser: &'b Browser,
    session: String,
}

impl Page<'_> {
    async fn call(&self, method: &str, params: Value) -> Value {
        self.browser
            .call(Some(&self.session), method, params)
            .await
            .unwrap_or_else(|e| panic!("{e}\nchromium log:\n{}", self.browser.log()))
    }

    /// Opens `url` and waits for the document to have loaded.
    pub async fn goto(&self, url: &str) {
        let nav = self.call("Page.navigate", json!({"url": url})).await;
        assert!(nav.get("errorText").is_none(), "navigate to {url}: {nav}");
        self.wait_for(
            "document.readyState === 'complete'",
            Duration::from_secs(15),
        )
        .await;
    }

    /// The value of a JavaScript expression (awaited if it is a promise).
    pub async fn eval(&self, expression: &str) -> Value {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
            )
            .await;
        if let Some(e) = r.get("exceptionDetails") {
            panic!("`{expression}` threw: {e}");
        }
        r["result"]["value"].clone()
    }

    /// Polls `expression` every 100 ms until it is truthy (returning its value) or `within`
    /// passes (a panic naming the last value and what the page showed).
    pub async fn wait_for(&self, expression: &str, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let v = self.eval(expression).await;
            let truthy = match &v {
                Value::Null => false,
                Value::Bool(b) => *b,
                Value::Number(n) => n.as_f64() != Some(0.0),
                Value::String(s) => !s.is_empty(),
                _ => true,
            };
            if truthy {
                return v;
            }
            if Instant::now() >= deadline {
                let text = self
                    .eval("document.body ? document.body.innerText : ''")
                    .await;
                panic!(
                    "`{expression}` did not hold within {within:?} (last: {v}); the page shows:\n{}",
                    text.as_str().unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A PNG of the viewport.
    pub async fn screenshot(&self) -> Vec<u8> {
        let shot = self
            .call("Page.captureScreenshot", json!({"format": "png"}))
            .await;
        let data = shot["data"].as_str().expect("screenshot data");
        data_encoding::BASE64
            .decode(data.as_bytes())
            .expect("screenshot is base64")
    }

    /// What went wrong in this tab so far: uncaught exceptions, and console errors other than
    /// the network's own (a refused request is logged as one, and some tests want that).
    /// A Content-Security-Policy violation shows here.
    pub fn problems(&self) -> Vec<String> {
        let events = self.browser.events.lock().unwrap();
        events
            .iter()
            .filter(|e| e["sessionId"] == self.session.as_str())
            .filter_map(|e| match e["method"].as_str()? {
                "Runtime.exceptionThrown" => Some(e["params"]["exceptionDetails"].to_string()),
                "Log.entryAdded" => {
                    let entry = &e["params"]["entry"];
                    (entry["level"] == "error" && entry["source"] != "network")
                        .then(|| entry.to_string())
                }
                "Runtime.consoleAPICalled" => {
                    (e["params"]["type"] == "error").then(|| e["params"].to_string())
                }
                _ => None,
            })
            .collect()
    }
}
