//! A real headless Chromium for tests, driven over the Chrome DevTools
//! Protocol: open one page, evaluate JavaScript in it, take a screenshot.
//!
//! ```text
//!  Browser::launch ── /usr/bin/chromium --headless --remote-debugging-port=0
//!       │                 --user-data-dir=<fresh temp dir> …
//!       ├─ reads <user-data-dir>/DevToolsActivePort (port, browser path)
//!       └─ websocket (tungstenite) ─ Target.createTarget + attachToTarget
//!                                   └─ Page.navigate, Runtime.evaluate,
//!                                      Page.captureScreenshot (session id)
//! ```
//!
//! Debian's `chromium` package is expected at [`CHROMIUM`]; when it is
//! missing, [`Browser::launch`] fails with a message to run `scripts/test.sh`,
//! which installs it. The flags switch off Chromium's own network traffic
//! (updates, sync, field trials), which would otherwise flood a closed
//! network, and the sandbox, which does not start as root.

use std::io::Read;
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use base64::Engine;
use serde_json::{json, Value};
use tungstenite::{Message, WebSocket};

/// Where Debian's `chromium` package puts the browser.
pub const CHROMIUM: &str = "/usr/bin/chromium";

/// How long Chromium may take to start and one protocol call to answer.
const STARTUP: Duration = Duration::from_secs(30);
const CALL: Duration = Duration::from_secs(30);

/// A headless Chromium with one page open; killed (and its profile
/// removed) on drop.
pub struct Browser {
    child: Child,
    /// Holds `profile/` (the user-data-dir) and `chromium.log`.
    work: tempfile::TempDir,
    cdp: Cdp,
    /// The attached page's session id.
    session: String,
}

impl std::fmt::Debug for Browser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Browser")
            .field("pid", &self.child.id())
            .field("work", &self.work.path())
            .finish_non_exhaustive()
    }
}

/// The last lines of Chromium's log, for error messages.
fn log_tail(work: &Path) -> String {
    let mut text = String::new();
    if let Ok(mut f) = std::fs::File::open(work.join("chromium.log")) {
        let _ = f.read_to_string(&mut text);
    }
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

impl Browser {
    /// Start Chromium with a fresh profile and open a blank page.
    pub fn launch() -> anyhow::Result<Self> {
        if !Path::new(CHROMIUM).exists() {
            bail!(
                "{CHROMIUM} is missing: run `scripts/test.sh`, which installs Debian's \
                 chromium package (or `apt-get install chromium`) and runs the tests"
            );
        }
        let work = tempfile::tempdir()?;
        let profile = work.path().join("profile");
        std::fs::create_dir(&profile)?;
        let log = std::fs::File::create(work.path().join("chromium.log"))?;
        let mut child = Command::new(CHROMIUM)
            .args([
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
                "--disable-dev-shm-usage",
                "--mute-audio",
                "--window-size=1000,900",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {CHROMIUM}"))?;
        match Self::connect(&mut child, &profile) {
            Ok((cdp, session)) => Ok(Self {
                child,
                work,
                cdp,
                session,
            }),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(e.context(format!("chromium's log ends:\n{}", log_tail(work.path()))))
            }
        }
    }

    /// Wait for the DevTools port, connect, and attach to a new page.
    fn connect(child: &mut Child, profile: &Path) -> anyhow::Result<(Cdp, String)> {
        let active = profile.join("DevToolsActivePort");
        let deadline = Instant::now() + STARTUP;
        // The file holds the port, then the browser target's path.
        let (port, path) = loop {
            if let Ok(text) = std::fs::read_to_string(&active) {
                let mut lines = text.lines();
                if let (Some(port), Some(path)) = (lines.next(), lines.next()) {
                    if let Ok(port) = port.trim().parse::<u16>() {
                        break (port, path.trim().to_string());
                    }
                }
            }
            if let Some(status) = child.try_wait()? {
                bail!("chromium exited at start ({status})");
            }
            if Instant::now() > deadline {
                bail!("chromium wrote no {} within {STARTUP:?}", active.display());
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let tcp = TcpStream::connect(("127.0.0.1", port))
            .with_context(|| format!("connecting to chromium's DevTools port {port}"))?;
        tcp.set_read_timeout(Some(CALL))?;
        let (ws, _) = tungstenite::client(format!("ws://127.0.0.1:{port}{path}"), tcp)
            .map_err(|e| anyhow::anyhow!("DevTools websocket handshake: {e}"))?;
        let mut cdp = Cdp { ws, next_id: 0 };
        let target = cdp.call(None, "Target.createTarget", json!({"url": "about:blank"}))?;
        let target_id = target["targetId"]
            .as_str()
            .context("Target.createTarget gave no targetId")?
            .to_string();
        let attached = cdp.call(
            None,
            "Target.attachToTarget",
            json!({"targetId": target_id, "flatten": true}),
        )?;
        let session = attached["sessionId"]
            .as_str()
            .context("Target.attachToTarget gave no sessionId")?
            .to_string();
        Ok((cdp, session))
    }

    /// Open `url` in the page and wait until it has loaded.
    pub fn open(&mut self, url: &str) -> anyhow::Result<()> {
        let answer = self.page_call("Page.navigate", json!({ "url": url }))?;
        if let Some(err) = answer["errorText"].as_str() {
            bail!("opening {url}: {err}");
        }
        let deadline = Instant::now() + CALL;
        loop {
            // Evaluating during the navigation may hit the old document's
            // context; only a loaded new document counts.
            if let Ok(state) = self.eval("location.href + ' ' + document.readyState") {
                if state == format!("{url} complete") {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("{url} did not finish loading within {CALL:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Evaluate a JavaScript expression in the page; a string result as it
    /// is, anything else as JSON text.
    pub fn eval(&mut self, expression: &str) -> anyhow::Result<String> {
        let answer = self.page_call(
            "Runtime.evaluate",
            json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
        )?;
        if let Some(details) = answer.get("exceptionDetails") {
            bail!("evaluating {expression:?} threw: {details}");
        }
        let value = &answer["result"]["value"];
        Ok(match value.as_str() {
            Some(s) => s.to_string(),
            None => value.to_string(),
        })
    }

    /// Poll `expression` until it gives `expected`; on timeout the error
    /// names the last value seen.
    pub fn wait_for(
        &mut self,
        expression: &str,
        expected: &str,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self.eval(expression) {
                Ok(value) if value == expected => return Ok(()),
                Ok(value) => value,
                // A reload in progress has no context to evaluate in.
                Err(e) => format!("error: {e:#}"),
            };
            if Instant::now() > deadline {
                bail!("{expression} was not {expected:?} within {timeout:?}; last: {last}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A PNG screenshot of the page as it is now.
    pub fn screenshot_png(&mut self) -> anyhow::Result<Vec<u8>> {
        let answer = self.page_call("Page.captureScreenshot", json!({"format": "png"}))?;
        let data = answer["data"]
            .as_str()
            .context("Page.captureScreenshot gave no data")?;
        let png = base64::engine::general_purpose::STANDARD
            .decode(data)
            .context("screenshot data is not base64")?;
        if !png.starts_with(b"\x89PNG\r\n\x1a\n") {
            bail!("the screenshot is not a PNG");
        }
        Ok(png)
    }

    fn page_call(&mut self, method: &str, params: Value) -> anyhow::Result<Value> {
        self.cdp.call(Some(&self.session), method, params)
    }
}

/// The DevTools websocket: one command at a time.
struct Cdp {
    ws: WebSocket<TcpStream>,
    next_id: u64,
}

impl Cdp {
    /// Send a command, then skip events and other answers until the one
    /// with its id arrives.
    fn call(
        &mut self,
        session: Option<&str>,
        method: &str,
        params: Value,
    ) -> anyhow::Result<Value> {
        self.next_id += 1;
        let id = self.next_id;
        let mut command = json!({"id": id, "method": method, "params": params});
        if let Some(session) = session {
            command["sessionId"] = json!(session);
        }
        self.ws
            .send(Message::text(command.to_string()))
            .with_context(|| format!("sending {method} to chromium"))?;
        let deadline = Instant::now() + CALL;
        loop {
            if Instant::now() > deadline {
                bail!("chromium did not answer {method} within {CALL:?}");
            }
            let message = self
                .ws
                .read()
                .with_context(|| format!("reading chromium's answer to {method}"))?;
            let Message::Text(text) = message else {
                continue;
            };
            let answer: Value = serde_json::from_str(text.as_str())
                .with_context(|| format!("chromium sent a non-JSON message: {text}"))?;
            if answer["id"].as_u64() != Some(id) {
                continue;
            }
            if let Some(err) = answer.get("error") {
                bail!("chromium refused {method}: {err}");
            }
            return Ok(answer["result"].clone());
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Browser.close lets Chromium take its helper processes down too.
        let closed = self.cdp.call(None, "Browser.close", json!({})).is_ok();
        let deadline = Instant::now() + Duration::from_secs(5);
        while closed && Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// The driver against a page it makes itself: evaluation, DOM reads and
    /// a screenshot. Fails (never skips) where Chromium is missing.
    #[test]
    fn drives_a_data_page() {
        let mut browser = Browser::launch().unwrap();
        let url = "data:text/html,<title>t</title><p id=n>41</p>";
        browser.open(url).unwrap();
        assert_eq!(browser.eval("1 + 1").unwrap(), "2");
        browser
            .eval("document.getElementById('n').textContent = '42'")
            .unwrap();
        browser
            .wait_for(
                "document.getElementById('n').textContent",
                "42",
                Duration::from_secs(5),
            )
            .unwrap();
        let err = browser.eval("null.x").unwrap_err();
        assert!(err.to_string().contains("threw"), "{err}");
        assert!(browser.screenshot_png().unwrap().len() > 100);
    }
}
