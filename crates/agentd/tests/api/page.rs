//! The web chat page at `/`, in a real headless Chromium against the real binary: it streams an answer in steps, never
//! loses or repeats text across a reload or a restart, stops a run, renders model output inert, and says clearly when
//! its token has expired. Each test saves screenshots under `target/screenshots/`.

use std::time::Duration;

use agentd::auth;
use agentd::secret::Secret;
use agentd::store::RunStatus;
use serde_json::{Value, json};

use crate::common::browser::{Browser, ENTER};
use crate::common::db::TestDb;
use crate::common::haproxy::{Haproxy, handoff_replicas};
use crate::common::runs::{ended, paced};
use crate::common::upstream::{FakeUpstream, Reply, openai};
use crate::common::{Agentd, PATIENCE, create_chat, free_port, metric, new_chat};

const SECRET: &str = "page-tests-secret-of-at-least-32-bytes!";
const ORG: &str = "acme";
const USER: &str = "alice";
const CANVAS: &str = "canvas-1";

/// What the last answer on the page shows: its text, whether its usage is shown, its run id, its notice.
const LAST_ANSWER: &str = "const all = document.querySelectorAll('#messages .assistant'); \
     const a = all[all.length - 1]; \
     if (!a) return {text: '', usage: '', run: '', notice: '', count: 0}; \
     const usage = a.querySelector('.usage'); const notice = a.querySelector('.notice'); \
     return {text: a.querySelector('.body').textContent, usage: usage.hidden ? '' : usage.textContent, \
             run: a.dataset.runId || '', notice: notice.hidden ? '' : notice.textContent, count: all.length};";

async fn last_answer(browser: &Browser) -> Value {
    browser.eval(LAST_ANSWER).await
}

/// Waits until the last answer's usage is shown (its `final_answer` arrived); the answer.
async fn until_answered(browser: &Browser) -> Value {
    browser
        .wait_for(
            "a finished answer",
            &format!("const r = (() => {{ {LAST_ANSWER} }})(); return r.usage ? r : null;"),
        )
        .await
}

/// Waits until the chat and its history are on screen, ready for a question.
async fn until_chat_shown(browser: &Browser) {
    browser
        .wait_for(
            "the chat",
            "return !document.getElementById('chat').hidden \
             && !document.getElementById('send').disabled",
        )
        .await;
}

/// Asks `question` (typed, then Enter) and waits until the answer on the page is longer than `chars`; the answer.
async fn ask_until_partial(browser: &Browser, question: &str, chars: usize) -> Value {
    browser
        .type_into("#question", &format!("{question}{ENTER}"))
        .await;
    browser
        .wait_for(
            "a partial answer",
            &format!("const r = (() => {{ {LAST_ANSWER} }})(); return r.text.length > {chars} ? r : null;"),
        )
        .await
}

/// The stored run of the answer `shown` on the page, once it ended: its status is `status` and its output is the
/// text the page shows.
async fn stored_as_shown(db: &TestDb, shown: &Value, status: RunStatus) -> agentd::store::Run {
    let stored = ended(&db.open().await, shown["run"].as_str().unwrap()).await;
    assert_eq!(stored.status, status);
    assert_eq!(shown["text"], stored.output.as_str());
    stored
}

/// Records every text the page's status line shows from now on, so a short-lived one is not missed between polls.
async fn watch_status(browser: &Browser) {
    browser
        .eval(
            "const status = document.getElementById('status'); window.__said = [status.textContent]; \
             new MutationObserver(() => window.__said.push(status.textContent)) \
               .observe(status, {childList: true, characterData: true, subtree: true});",
        )
        .await;
}

/// Waits until the status line has shown `needle` since [`watch_status`].
async fn until_status_said(browser: &Browser, needle: &str) {
    browser
        .wait_for(
            needle,
            &format!("return window.__said.some(s => s.includes({needle:?}))"),
        )
        .await;
}

/// The chat id the page keeps in its address.
async fn chat_of(browser: &Browser) -> String {
    let hash = browser.eval("return location.hash").await;
    hash.as_str()
        .unwrap()
        .strip_prefix("#chat=")
        .expect("the address names the chat")
        .to_owned()
}

async fn count(browser: &Browser, css: &str) -> u64 {
    browser
        .eval(&format!("return document.querySelectorAll('{css}').length"))
        .await
        .as_u64()
        .unwrap()
}

/// The test model's answer of `n` deltas.
fn answer(n: u32) -> String {
    (0..n).map(agentd::model::delta_text).collect()
}

#[tokio::test]
async fn the_page_is_served_with_a_strict_policy_and_cache_validators() {
    let server = Agentd::spawn(&[("AGENT_HTTP_CORS_ORIGINS", "https://app.example")]).await;
    let page = server.get("/").await;
    assert_eq!(page.status(), 200);
    let headers = page.headers().clone();
    assert_eq!(headers["content-type"], "text/html; charset=utf-8");
    assert_eq!(headers["cache-control"], "no-cache");
    assert_eq!(headers["x-content-type-options"], "nosniff");
    let csp = headers["content-security-policy"].to_str().unwrap();
    for directive in [
        "default-src 'none'",
        "script-src 'self'",
        "connect-src 'self'",
        "frame-ancestors 'self' https://app.example",
    ] {
        assert!(csp.contains(directive), "{csp}");
    }
    assert!(!csp.contains("unsafe"), "{csp}");
    let html = page.text().await.unwrap();
    assert!(html.contains(r#""needs_token":false"#), "{html}");
    assert!(html.contains(r#""embed_origins":["https://app.example"]"#));

    // The page is revalidated, not downloaded again.
    let etag = headers["etag"].to_str().unwrap();
    let again = server
        .http
        .get(server.url("/"))
        .header("if-none-match", etag)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 304);

    // Its script and style sheet, named by their content, are cached for good; other names are the JSON 404.
    let script = html
        .split('"')
        .find(|s| s.starts_with("/assets/app.") && s.ends_with(".js"))
        .expect("the page names its script");
    let style = html
        .split('"')
        .find(|s| s.starts_with("/assets/app.") && s.ends_with(".css"))
        .expect("the page names its style sheet");
    for (path, kind) in [(script, "text/javascript"), (style, "text/css")] {
        let asset = server.get(path).await;
        assert_eq!(asset.status(), 200, "{path}");
        assert!(
            asset.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with(kind)
        );
        assert_eq!(
            asset.headers()["cache-control"],
            "public, max-age=31536000, immutable"
        );
        assert!(asset.headers().contains_key("content-security-policy"));
    }
    let stale = server.get("/assets/app.0123456789abcdef.js").await;
    assert_eq!(stale.status(), 404);
    let body: Value = stale.json().await.unwrap();
    assert_eq!(body["detail"], "Not Found");
}

#[tokio::test]
async fn an_answer_streams_in_growing_steps_with_its_tool_call_and_usage() {
    let db = TestDb::sqlite();
    let model = "test:deltas=30,delay_ms=100,tool=current_time";
    let server = Agentd::spawn_on(db.url(), &[("AI_MODEL", model)]).await;
    let browser = Browser::start("ask", 1024, 800).await;
    browser.open(&server.url("/")).await;
    until_chat_shown(&browser).await;
    assert_eq!(
        browser
            .eval("return [...document.querySelectorAll('#model option')].map(o => o.value)")
            .await,
        json!([model])
    );
    browser
        .type_into("#question", &format!("What time is it?{ENTER}"))
        .await;

    // Poll what the page shows until the usage appears: the text must grow in steps as it streams.
    let mut steps: Vec<String> = Vec::new();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let finished = loop {
        let shown = last_answer(&browser).await;
        let text = shown["text"].as_str().unwrap().to_owned();
        if !text.is_empty() && steps.last() != Some(&text) {
            steps.push(text);
        }
        if shown["usage"] != "" {
            break shown;
        }
        assert!(tokio::time::Instant::now() < deadline, "no answer");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    browser.screenshot("answered").await;
    assert!(steps.len() >= 4, "the answer appeared at once: {steps:?}");
    for pair in steps.windows(2) {
        assert!(
            pair[1].starts_with(&pair[0]) && pair[1].len() > pair[0].len(),
            "{pair:?}"
        );
    }
    assert!(
        finished["usage"].as_str().unwrap().starts_with("Tokens: "),
        "{finished}"
    );
    let tools = browser
        .eval(
            "return [...document.querySelectorAll('#messages .assistant .tool')]\
             .map(t => ({finished: t.classList.contains('finished'), text: t.textContent}))",
        )
        .await;
    assert_eq!(tools.as_array().unwrap().len(), 1, "{tools}");
    assert_eq!(tools[0]["finished"], true);
    let label = tools[0]["text"].as_str().unwrap();
    assert!(
        label.contains("current_time") && label.contains("finished in"),
        "{label}"
    );
    assert_eq!(
        browser
            .eval("return document.querySelector('#messages .user').textContent")
            .await,
        "What time is it?"
    );
    stored_as_shown(&db, &finished, RunStatus::Completed).await;
    browser.close().await;
}

#[tokio::test]
async fn a_reload_mid_answer_completes_the_same_answer_once() {
    let db = TestDb::sqlite();
    let server = Agentd::spawn_on(db.url(), &[("AI_MODEL", "test:deltas=80,delay_ms=100")]).await;
    let browser = Browser::start("reload", 1024, 800).await;
    browser.open(&server.url("/")).await;
    until_chat_shown(&browser).await;
    let partial = ask_until_partial(&browser, "Tell me a story", 20).await;
    assert_eq!(partial["usage"], "", "still streaming");
    let chat = chat_of(&browser).await;
    browser.screenshot("before-reload").await;

    browser.reload().await;
    until_chat_shown(&browser).await;
    assert_eq!(
        chat_of(&browser).await,
        chat,
        "the reload comes back to the chat"
    );
    let finished = until_answered(&browser).await;
    browser.screenshot("after-reload").await;
    assert_eq!(finished["text"], answer(80).as_str());
    assert_eq!(count(&browser, "#messages .user").await, 1);
    assert_eq!(count(&browser, "#messages .assistant").await, 1);
    stored_as_shown(&db, &finished, RunStatus::Completed).await;
    browser.close().await;
}

#[tokio::test]
async fn a_server_restart_mid_answer_shows_reconnecting_then_the_whole_answer_once() {
    let db = TestDb::sqlite();
    let addr = format!("127.0.0.1:{}", free_port());
    let env = [
        ("HTTP_ADDR", addr.as_str()),
        ("AI_MODEL", "test:deltas=60,delay_ms=100"),
        ("SHUTDOWN_MODE", "handoff"),
        ("DRAIN_TIMEOUT", "1"),
        ("SHUTDOWN_TIMEOUT", "10"),
        ("RUN_LEASE", "2"),
    ];
    let mut first = Agentd::spawn_on(db.url(), &env).await;
    let browser = Browser::start("restart", 1024, 800).await;
    browser.open(&first.url("/")).await;
    until_chat_shown(&browser).await;
    ask_until_partial(&browser, "Tell me a long story", 20).await;

    watch_status(&browser).await;
    first.signal("TERM");
    until_status_said(&browser, "reconnecting…").await;
    browser.screenshot("reconnecting").await;
    assert!(first.exit_status().await.success());
    let _second = Agentd::spawn_on(db.url(), &env).await;

    let finished = until_answered(&browser).await;
    browser.screenshot("continued").await;
    assert_eq!(finished["text"], answer(60).as_str());
    assert_eq!(count(&browser, "#messages .assistant").await, 1);
    stored_as_shown(&db, &finished, RunStatus::Completed).await;
    assert_eq!(
        browser
            .eval("return document.getElementById('status').textContent")
            .await,
        ""
    );
    browser.close().await;
}

#[tokio::test]
async fn a_question_asked_while_the_service_drains_says_so_and_is_sent_once_it_is_back() {
    let db = TestDb::sqlite();
    let addr = format!("127.0.0.1:{}", free_port());
    let env = [
        ("HTTP_ADDR", addr.as_str()),
        ("AI_MODEL", "test:deltas=5,delay_ms=50"),
        ("DRAIN_TIMEOUT", "30"),
        ("SHUTDOWN_TIMEOUT", "40"),
        // The other client's run stops as soon as it leaves.
        ("DETACH_GRACE", "0"),
    ];
    let mut first = Agentd::spawn_on(db.url(), &env).await;
    let browser = Browser::start("draining", 1024, 800).await;
    browser.open(&first.url("/")).await;
    until_chat_shown(&browser).await;

    // Another client's long answer keeps the service draining.
    let mut other = first.stream(&new_chat(), paced(1000, 100)).await;
    other.next().await.expect("run_started");
    watch_status(&browser).await;
    first.signal("TERM");
    first.wait_for_log("draining").await;
    browser
        .type_into("#question", &format!("Are you there?{ENTER}"))
        .await;
    until_status_said(&browser, "restarting").await;
    browser.screenshot("draining").await;

    // The other client leaves, the drain ends, a new process comes up; the page sends the question there.
    drop(other);
    assert!(first.exit_status().await.success());
    let _second = Agentd::spawn_on(db.url(), &env).await;
    let finished = until_answered(&browser).await;
    browser.screenshot("answered").await;
    assert_eq!(finished["text"], answer(5).as_str());
    assert_eq!(count(&browser, "#messages .user").await, 1);
    assert_eq!(count(&browser, "#messages .assistant").await, 1);
    let stored = ended(&db.open().await, finished["run"].as_str().unwrap()).await;
    assert_eq!(stored.status, RunStatus::Completed);
    browser.close().await;
}

#[tokio::test]
async fn a_handoff_between_two_replicas_behind_haproxy_mid_answer_loses_and_repeats_nothing() {
    let db = TestDb::postgres().await;
    let (addrs, mut replicas) =
        handoff_replicas(db.url(), &[("AI_MODEL", "test:deltas=60,delay_ms=100")]).await;
    let lb = Haproxy::start(&addrs).await;
    let browser = Browser::start("handoff", 1024, 800).await;
    browser.open(&lb.base).await;
    until_chat_shown(&browser).await;
    ask_until_partial(&browser, "Tell me a long story", 20).await;

    // Stop the replica that streams the answer; the other takes the page and, at the drain deadline, the run.
    let mut producer = None;
    for (i, replica) in replicas.iter().enumerate() {
        let metrics = replica.get("/metrics").await.text().await.unwrap();
        if metric(&metrics, "agentd_open_streams") == 1 {
            producer = Some(i);
        }
    }
    let mut stopping = replicas.remove(producer.expect("one replica streams the answer"));
    let peer = replicas.pop().unwrap();
    watch_status(&browser).await;
    stopping.signal("TERM");
    until_status_said(&browser, "reconnecting…").await;
    let finished = until_answered(&browser).await;
    browser.screenshot("continued").await;
    assert!(stopping.exit_status().await.success());
    assert_eq!(finished["text"], answer(60).as_str());
    assert_eq!(count(&browser, "#messages .assistant").await, 1);
    stored_as_shown(&db, &finished, RunStatus::Completed).await;
    let metrics = peer.get("/metrics").await.text().await.unwrap();
    assert_eq!(metric(&metrics, "agentd_runs_taken_over_total"), 1);
    browser.close().await;
}

#[tokio::test]
async fn stop_cancels_the_run_and_the_page_says_so() {
    let db = TestDb::sqlite();
    let server = Agentd::spawn_on(db.url(), &[("AI_MODEL", "test:deltas=300,delay_ms=100")]).await;
    let browser = Browser::start("stop", 1024, 800).await;
    browser.open(&server.url("/")).await;
    until_chat_shown(&browser).await;
    ask_until_partial(&browser, "Go on and on", 10).await;
    browser.click("#stop").await;
    let stopped = browser
        .wait_for(
            "the stop",
            &format!("const r = (() => {{ {LAST_ANSWER} }})(); return r.notice ? r : null;"),
        )
        .await;
    browser.screenshot("stopped").await;
    assert!(
        stopped["notice"].as_str().unwrap().starts_with("Stopped."),
        "{stopped}"
    );
    let stored = stored_as_shown(&db, &stopped, RunStatus::Interrupted).await;
    assert!(
        stored.output.len() < answer(300).len(),
        "stopped before the end"
    );
    assert_eq!(
        browser
            .eval("return [document.getElementById('stop').hidden, document.getElementById('send').disabled]")
            .await,
        json!([true, false])
    );
    browser.close().await;
}

/// A server that checks tokens, with a fake OpenAI-compatible provider; the chat made over gRPC.
async fn secured(env: &[(&str, &str)]) -> (Agentd, String) {
    let mut all = vec![("JWT_SECRET", SECRET)];
    all.extend_from_slice(env);
    let server = Agentd::spawn(&all).await;
    let chat = create_chat(&server, ORG, USER, CANVAS).await;
    (server, chat)
}

fn token(ttl: Duration) -> String {
    auth::mint(
        &Secret::new(SECRET),
        "superplane_api",
        ORG,
        USER,
        CANVAS,
        ttl,
    )
}

#[tokio::test]
async fn model_output_with_markup_and_script_links_renders_inert() {
    let fake = FakeUpstream::start().await;
    fake.script([Reply::Paced(
        openai::answer(
            &[
                "Look: <img src=x onerror=\"window.__pwned=1\">",
                " and [a link](javascript:window.__pwned=2)",
                " and [the docs](https://example.com/docs) **done**",
            ],
            10,
            20,
        ),
        Duration::from_millis(50),
    )]);
    let openai_base = format!("{}/v1", fake.base);
    let (server, chat) = secured(&[
        ("OPENAI_BASE_URL", openai_base.as_str()),
        ("OPENAI_API_KEY", "sk-test-key"),
        ("ANTHROPIC_BASE_URL", fake.base.as_str()),
        ("ANTHROPIC_API_KEY", "ak-test-key"),
        ("AI_MODEL", "openai:gpt-test"),
        ("AI_MODELS", "openai:gpt-test,anthropic:claude-test"),
    ])
    .await;
    let browser = Browser::start("inert", 390, 844).await;
    // The embedding application hands the token over in the address's fragment, which never reaches a server.
    browser
        .open(&server.url(&format!(
            "/#chat={chat}&token={}",
            token(Duration::from_secs(600))
        )))
        .await;
    until_chat_shown(&browser).await;
    assert_eq!(
        browser.eval("return location.hash").await,
        format!("#chat={chat}"),
        "the token leaves the address at once"
    );
    assert_eq!(
        browser
            .eval("return [...document.querySelectorAll('#model option')].map(o => o.value)")
            .await,
        json!(["openai:gpt-test", "anthropic:claude-test"])
    );
    browser
        .type_into("#question", &format!("Show me something{ENTER}"))
        .await;
    let finished = until_answered(&browser).await;
    browser.screenshot("rendered").await;
    let text = finished["text"].as_str().unwrap();
    assert!(
        text.contains("<img src=x onerror=\"window.__pwned=1\">"),
        "shown as text: {text}"
    );
    assert!(
        text.contains("a link") && !text.contains("javascript:"),
        "{text}"
    );
    assert_eq!(count(&browser, "#messages img").await, 0);
    assert_eq!(
        browser.eval("return typeof window.__pwned").await,
        "undefined"
    );
    assert_eq!(
        browser
            .eval("return [...document.querySelectorAll('#messages a')].map(a => a.href)")
            .await,
        json!(["https://example.com/docs"])
    );
    assert_eq!(
        browser
            .eval("return document.querySelector('#messages .assistant strong').textContent")
            .await,
        "done"
    );
    let request = &fake.seen("/v1/chat/completions")[0];
    assert_eq!(request.body["model"], "gpt-test");
    browser.close().await;
}

#[tokio::test]
async fn an_embedding_application_hands_the_token_over_with_post_message() {
    // The application's own page, on another origin, frames agentd's page and posts the token when asked.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app_origin = format!("http://{}", listener.local_addr().unwrap());
    let (server, chat) = secured(&[
        ("AI_MODEL", "test:deltas=4"),
        ("AI_MODELS", "test"),
        ("AGENT_HTTP_CORS_ORIGINS", app_origin.as_str()),
    ])
    .await;
    let agentd_origin = server.base.clone();
    let parent = format!(
        r#"<!doctype html><title>The application</title>
<iframe id="agent" src="{agentd_origin}/#chat={chat}" width="600" height="500"></iframe>
<script>
window.addEventListener("message", (event) => {{
  if (event.origin === "{agentd_origin}" && event.data && event.data.type === "agentd:ready") {{
    document.getElementById("agent").contentWindow.postMessage(
      {{type: "agentd:token", token: "{token}"}}, "{agentd_origin}");
  }}
}});
</script>"#,
        token = token(Duration::from_secs(600)),
    );
    let app = axum::Router::new().route(
        "/",
        axum::routing::get(move || async move { axum::response::Html(parent) }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let browser = Browser::start("embedded", 800, 700).await;
    browser.open(&app_origin).await;
    browser.enter_frame("#agent").await;
    until_chat_shown(&browser).await;
    assert_eq!(
        browser.eval("return location.hash").await,
        format!("#chat={chat}")
    );
    browser
        .type_into("#question", &format!("Hello from the app{ENTER}"))
        .await;
    let finished = until_answered(&browser).await;
    assert_eq!(finished["text"], answer(4).as_str());
    browser.screenshot("answered").await;
    browser.close().await;
}

#[tokio::test]
async fn an_expired_token_asks_to_sign_in_again_and_a_pasted_one_goes_on() {
    let (server, chat) = secured(&[("AI_MODEL", "test:deltas=3"), ("AI_MODELS", "test")]).await;
    let minted = tokio::time::Instant::now();
    // Long enough for the first question even on a busy machine; then it expires.
    let short = token(Duration::from_secs(8));
    let browser = Browser::start("expired", 1024, 800).await;
    browser
        .open(&server.url(&format!("/#chat={chat}&token={short}")))
        .await;
    until_chat_shown(&browser).await;
    browser
        .type_into("#question", &format!("first{ENTER}"))
        .await;
    until_answered(&browser).await;

    // `exp` is in whole seconds: past it for sure.
    tokio::time::sleep_until(minted + Duration::from_secs(10)).await;
    browser
        .type_into("#question", &format!("second{ENTER}"))
        .await;
    let message = browser
        .wait_for(
            "the sign-in request",
            "return !document.getElementById('signin').hidden \
             && document.getElementById('signin-message').textContent",
        )
        .await;
    browser.screenshot("expired").await;
    let message = message.as_str().unwrap();
    assert!(
        message.starts_with("Your session has ended")
            && message.ends_with("Sign in again to go on."),
        "{message}"
    );
    // What was on screen stays, and the question that was refused is back in the box.
    assert!(
        !browser
            .eval("return document.getElementById('chat').hidden")
            .await
            .as_bool()
            .unwrap()
    );
    assert_eq!(count(&browser, "#messages .assistant").await, 1);
    assert_eq!(
        browser
            .eval("return document.getElementById('question').value")
            .await,
        "second"
    );

    // A fresh token, pasted, picks the session up again.
    browser
        .type_into(
            "#token",
            &format!("{}{ENTER}", token(Duration::from_secs(600))),
        )
        .await;
    browser
        .wait_for(
            "the chat again",
            "return document.getElementById('signin').hidden \
             && !document.getElementById('send').disabled",
        )
        .await;
    browser.click("#send").await;
    browser
        .wait_for(
            "the second answer",
            &format!("const r = (() => {{ {LAST_ANSWER} }})(); return r.count === 2 && r.usage;"),
        )
        .await;
    browser.screenshot("signed-in-again").await;
    assert_eq!(count(&browser, "#messages .user").await, 2);
    browser.close().await;
}

/// The page's Markdown renderer, run in the browser on hostile and ordinary input: it makes only the elements it
/// means to, and links only to http(s) and mail addresses.
#[tokio::test]
async fn markdown_becomes_known_elements_and_safe_links_only() {
    let server = Agentd::spawn(&[]).await;
    let browser = Browser::start("markdown", 1024, 800).await;
    browser.open(&server.url("/")).await;
    until_chat_shown(&browser).await;
    let rendered = browser
        .eval(
            r##"
            const inputs = [
              "<script>window.__pwned = 1</script>",
              "<img src=x onerror=alert(1)>",
              "[a](javascript:alert(1))", "[a](JaVaScRiPt:alert(1))", "[a](  javascript:alert(1))",
              "[a](java\tscript:alert(1))", "[a](data:text/html,<script>alert(1)</script>)", "[a](vbscript:x)",
              "![a](javascript:alert(1))", "<javascript:alert(1)>", "[a](<javascript:alert(1)>)",
              "```\n<img src=x onerror=alert(1)>\n```", "`<b>code</b>`", "**<i>x</i>**",
              "[ok](https://example.com/a?b=1) and <https://example.com/c> and [mail](mailto:a@example.com)",
              "# Title\n\n- one\n- two\n\n3. three\n4. four\n\n> quoted *it*\n\n---\n\n```rust\nfn main() {}\n```",
              "snake_case_name and my__double__name and file_name.rs",
            ];
            const allowed = new Set(["DIV", "P", "BR", "A", "STRONG", "EM", "CODE", "PRE", "H3", "H4", "H5", "H6",
                                     "UL", "OL", "LI", "BLOCKQUOTE", "HR"]);
            const out = [];
            for (const input of inputs) {
              const div = document.createElement("div");
              renderMarkdown(div, input);
              const tags = [...div.querySelectorAll("*")].map(e => e.tagName);
              const links = [...div.querySelectorAll("a")].map(a => a.href);
              const attrs = [...div.querySelectorAll("*")].flatMap(e => [...e.attributes].map(a => a.name));
              out.push({input, tags, links, attrs, text: div.textContent,
                        bad: tags.filter(t => !allowed.has(t))});
            }
            return out;
            "##,
        )
        .await;
    for case in rendered.as_array().unwrap() {
        assert_eq!(case["bad"], json!([]), "{case}");
        for link in case["links"].as_array().unwrap() {
            let link = link.as_str().unwrap();
            assert!(
                link.starts_with("https://") || link.starts_with("mailto:"),
                "{case}"
            );
        }
        for attr in case["attrs"].as_array().unwrap() {
            assert!(
                ["href", "rel", "target", "class", "start"].contains(&attr.as_str().unwrap()),
                "{case}"
            );
        }
    }
    let case = |i: usize| &rendered[i];
    assert_eq!(case(0)["text"], "<script>window.__pwned = 1</script>");
    assert_eq!(case(11)["tags"], json!(["PRE", "CODE"]));
    assert_eq!(case(12)["tags"], json!(["P", "CODE"]));
    assert_eq!(
        case(14)["links"],
        json!([
            "https://example.com/a?b=1",
            "https://example.com/c",
            "mailto:a@example.com"
        ])
    );
    assert_eq!(
        case(15)["tags"],
        json!([
            "H3",
            "UL",
            "LI",
            "LI",
            "OL",
            "LI",
            "LI",
            "BLOCKQUOTE",
            "P",
            "EM",
            "HR",
            "PRE",
            "CODE"
        ])
    );
    assert_eq!(case(16)["tags"], json!(["P"]), "{}", case(16));
    assert_eq!(
        browser.eval("return typeof window.__pwned").await,
        "undefined"
    );
    browser.close().await;
}
