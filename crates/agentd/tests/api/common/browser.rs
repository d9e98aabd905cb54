//! A real browser for the web page's tests: Debian's Chromium, headless, driven over W3C WebDriver through Debian's
//! chromedriver (both installed by the harness when missing). Each browser has its own driver, profile and process
//! group, so a failing test leaves no Chromium behind.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};
use tokio::process::{Child, Command};

use super::{PATIENCE, apt, free_port};

/// The key WebDriver names an element reference by.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// The Enter key, as WebDriver types it.
pub const ENTER: &str = "\u{E007}";

pub struct Browser {
    driver: Child,
    _profile: tempfile::TempDir,
    http: reqwest::Client,
    /// `http://127.0.0.1:<port>/session/<id>`
    session: String,
    /// Names the screenshots.
    name: String,
}

impl Browser {
    /// A headless Chromium with a `width` × `height` window; `name` prefixes its screenshots.
    pub async fn start(name: &str, width: u32, height: u32) -> Self {
        let packages = ["chromium", "chromium-driver"];
        let chromium = apt::installed(&packages, &["/usr/bin/chromium"]);
        let chromedriver = apt::installed(&packages, &["/usr/bin/chromedriver"]);
        let profile = tempfile::tempdir().unwrap();
        let port = free_port();
        let driver = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .expect("chromedriver starts");
        let http = reqwest::Client::new();
        let base = format!("http://127.0.0.1:{port}");
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let status = http.get(format!("{base}/status")).send().await;
            if let Ok(status) = status {
                let body: Value = status.json().await.unwrap_or_default();
                if body["value"]["ready"] == true {
                    break;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "chromedriver never got ready"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let args = [
            "--headless=new".to_owned(),
            "--no-sandbox".to_owned(),
            "--disable-gpu".to_owned(),
            "--disable-dev-shm-usage".to_owned(),
            // The machine's network is closed: no calls home.
            "--disable-background-networking".to_owned(),
            "--disable-component-update".to_owned(),
            "--disable-sync".to_owned(),
            "--disable-quic".to_owned(),
            "--no-first-run".to_owned(),
            format!("--user-data-dir={}", profile.path().display()),
            format!("--window-size={width},{height}"),
        ];
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": chromium, "args": args},
            "goog:loggingPrefs": {"browser": "ALL"},
        }}});
        let created: Value = http
            .post(format!("{base}/session"))
            .json(&capabilities)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let id = created["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no browser session: {created}"));
        Self {
            driver,
            _profile: profile,
            http,
            session: format!("{base}/session/{id}"),
            name: name.to_owned(),
        }
    }

    async fn command(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut request = self.http.request(method, format!("{}{path}", self.session));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let answer: Value = request.send().await.unwrap().json().await.unwrap();
        let value = answer["value"].clone();
        if let Some(error) = value.get("error") {
            panic!("WebDriver {path}: {error}: {}", value["message"]);
        }
        value
    }

    /// Loads `url` and waits for it to load.
    pub async fn open(&self, url: &str) {
        self.command(reqwest::Method::POST, "/url", Some(json!({"url": url})))
            .await;
    }

    /// Reloads the page, as a person pressing F5 does.
    pub async fn reload(&self) {
        self.command(reqwest::Method::POST, "/refresh", Some(json!({})))
            .await;
    }

    /// Runs `body` (a function body: `return ...`) in the page; its result.
    pub async fn eval(&self, body: &str) -> Value {
        self.command(
            reqwest::Method::POST,
            "/execute/sync",
            Some(json!({"script": body, "args": []})),
        )
        .await
    }

    /// Polls `body` until it returns something truthy; that value. Fails the test after [`PATIENCE`].
    pub async fn wait_for(&self, what: &str, body: &str) -> Value {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let value = self.eval(body).await;
            let truthy = match &value {
                Value::Null => false,
                Value::Bool(b) => *b,
                Value::String(s) => !s.is_empty(),
                Value::Number(n) => n.as_f64() != Some(0.0),
                _ => true,
            };
            if truthy {
                return value;
            }
            if tokio::time::Instant::now() >= deadline {
                self.screenshot(&format!("timeout-{}", what.replace(' ', "-")))
                    .await;
                panic!(
                    "the page never showed {what}; its console: {}",
                    self.console().await
                );
            }
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
    }

    /// What the page wrote to its console (errors included), for a failing test's message.
    async fn console(&self) -> Value {
        let answer = self
            .http
            .post(format!("{}/se/log", self.session))
            .json(&json!({"type": "browser"}))
            .send()
            .await;
        match answer {
            Ok(answer) => answer.json::<Value>().await.unwrap_or_default()["value"].clone(),
            Err(error) => json!(error.to_string()),
        }
    }

    async fn element(&self, css: &str) -> String {
        let found = self
            .command(
                reqwest::Method::POST,
                "/element",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await;
        found[ELEMENT].as_str().unwrap().to_owned()
    }

    /// Types `keys` into the element `css` selects, as a keyboard does.
    pub async fn type_into(&self, css: &str, keys: &str) {
        let element = self.element(css).await;
        self.command(
            reqwest::Method::POST,
            &format!("/element/{element}/value"),
            Some(json!({"text": keys})),
        )
        .await;
    }

    /// Makes the frame `css` selects the one later commands act in.
    pub async fn enter_frame(&self, css: &str) {
        let element = self.element(css).await;
        self.command(
            reqwest::Method::POST,
            "/frame",
            Some(json!({"id": {ELEMENT: element}})),
        )
        .await;
    }

    /// Clicks the element `css` selects.
    pub async fn click(&self, css: &str) {
        let element = self.element(css).await;
        self.command(
            reqwest::Method::POST,
            &format!("/element/{element}/click"),
            Some(json!({})),
        )
        .await;
    }

    /// Saves what the window shows as `target/screenshots/<name>-<label>.png`.
    pub async fn screenshot(&self, label: &str) {
        let png = self
            .command(reqwest::Method::GET, "/screenshot", None)
            .await;
        let dir = screenshots();
        std::fs::create_dir_all(&dir).unwrap();
        let bytes = STANDARD.decode(png.as_str().unwrap()).unwrap();
        std::fs::write(dir.join(format!("{}-{label}.png", self.name)), bytes).unwrap();
    }

    /// Checks the page threw no error and broke no rule of its Content-Security-Policy, then ends the session, which
    /// closes Chromium.
    pub async fn close(self) {
        let console = self.console().await;
        let faults: Vec<&Value> = console
            .as_array()
            .into_iter()
            .flatten()
            .filter(|entry| {
                entry["source"] == "javascript"
                    || entry["source"] == "security"
                    || entry["message"]
                        .as_str()
                        .is_some_and(|m| m.contains("Content Security Policy"))
            })
            .collect();
        assert!(faults.is_empty(), "the page's console: {faults:?}");
        self.command(reqwest::Method::DELETE, "", None).await;
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Chromium runs in the driver's process group: whatever is left of it goes with the driver.
        if let Some(pid) = self.driver.id() {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{pid}")])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// `target/screenshots`, beside the tests' scratch directory.
fn screenshots() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("the scratch directory is inside target/")
        .join("screenshots")
}
