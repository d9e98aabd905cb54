//! Scoped JWTs on the stream route, with tokens minted independently of agentd's JWT library (by hand, from
//! base64url and HMAC-SHA256), and the client subcommands against the real binary.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::common::db::TestDb;
use crate::common::{Agentd, create_chat, types};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

const SECRET: &str = "a-shared-secret-for-tests-32-bytes-long";
const AUDIENCE: &str = "superplane_api";

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A JWT built by hand: base64url(header) . base64url(claims) . base64url(HMAC-SHA256(key, both)).
fn sign(header: &Value, claims: &Value, key: &str) -> String {
    let encode = |v: &Value| URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap());
    let signing_input = format!("{}.{}", encode(header), encode(claims));
    let mut mac = Hmac::<Sha256>::new_from_slice(key.as_bytes()).unwrap();
    mac.update(signing_input.as_bytes());
    format!(
        "{signing_input}.{}",
        URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    )
}

fn hs256() -> Value {
    json!({"alg": "HS256", "typ": "JWT"})
}

/// The claims of a good token for `canvas`.
fn claims(org: &str, user: &str, canvas: &str) -> Value {
    json!({
        "sub": user,
        "org_id": org,
        "aud": AUDIENCE,
        "iat": now(),
        "nbf": now() - 5,
        "exp": now() + 600,
        "token_type": "scoped",
        "purpose": "agent-builder",
        "scopes": [format!("canvases:read:{canvas}"), "canvases:read:other"],
    })
}

fn good_token(org: &str, user: &str, canvas: &str) -> String {
    sign(&hs256(), &claims(org, user, canvas), SECRET)
}

async fn spawn_secured() -> Agentd {
    Agentd::spawn(&[
        ("JWT_SECRET", SECRET),
        ("AI_MODELS", "test"),
        ("RUST_LOG", "debug"),
    ])
    .await
}

async fn ask_with(server: &Agentd, chat: &str, authorization: Option<&str>) -> reqwest::Response {
    let mut request = server
        .http
        .post(server.url(&format!("/agents/chats/{chat}/stream")))
        .json(&json!({"question": "q", "model": "test:deltas=2"}));
    if let Some(value) = authorization {
        request = request.header("authorization", value);
    }
    request.send().await.unwrap()
}

#[tokio::test]
async fn a_valid_token_streams_and_every_broken_rule_is_a_401_with_its_reason() {
    let server = spawn_secured().await;
    let chat = create_chat(&server, "acme", "alice", "canvas-1").await;

    let token = good_token("acme", "alice", "canvas-1");
    let response = ask_with(&server, &chat, Some(&format!("Bearer {token}"))).await;
    assert_eq!(response.status(), 200);
    let events = crate::common::Events::new(response).rest().await;
    assert_eq!(events[0].1["canvas_id"], "canvas-1");
    assert_eq!(types(&events).last().unwrap(), "done");

    let base = claims("acme", "alice", "canvas-1");
    let with = |key: &str, value: Value| {
        let mut claims = base.clone();
        claims[key] = value;
        sign(&hs256(), &claims, SECRET)
    };
    let without = |key: &str| {
        let mut claims = base.clone();
        claims.as_object_mut().unwrap().remove(key);
        sign(&hs256(), &claims, SECRET)
    };
    let under = |alg: &str| {
        let header = json!({"alg": alg, "typ": "JWT"});
        sign(&header, &base, SECRET)
    };
    let unsigned = {
        let encode = |v: &Value| URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap());
        format!(
            "{}.{}.",
            encode(&json!({"alg": "none", "typ": "JWT"})),
            encode(&base)
        )
    };
    let cases: Vec<(&str, String, &str)> = vec![
        ("expired", with("exp", json!(now() - 30)), "expired"),
        (
            "not valid yet",
            with("nbf", json!(now() + 3600)),
            "not valid yet",
        ),
        (
            "wrong audience",
            with("aud", json!("someone_else")),
            "wrong audience",
        ),
        ("alg none", unsigned, "wrong algorithm \\\"none\\\""),
        (
            "HS512 header",
            under("HS512"),
            "wrong algorithm \\\"HS512\\\"",
        ),
        (
            "RS256 header",
            under("RS256"),
            "wrong algorithm \\\"RS256\\\"",
        ),
        (
            "wrong key",
            sign(&hs256(), &base, "another-secret"),
            "bad signature",
        ),
        ("no exp", without("exp"), "missing claim exp"),
        ("no sub", without("sub"), "missing claim sub"),
        ("blank sub", with("sub", json!("  ")), "claim sub is blank"),
        ("no org_id", without("org_id"), "missing claim org_id"),
        (
            "blank org_id",
            with("org_id", json!("")),
            "claim org_id is blank",
        ),
        (
            "wrong token_type",
            with("token_type", json!("access")),
            "claim token_type must be",
        ),
        (
            "wrong purpose",
            with("purpose", json!("admin")),
            "claim purpose must be",
        ),
        ("no scopes", without("scopes"), "missing claim scopes"),
        (
            "empty scopes",
            with("scopes", json!([])),
            "claim scopes is empty",
        ),
        (
            "blank scopes",
            with("scopes", json!([" ", ""])),
            "claim scopes is empty",
        ),
        (
            "scopes not a list",
            with("scopes", json!("canvases:read:canvas-1")),
            "list of strings",
        ),
        (
            "scopes with a number",
            with("scopes", json!(["canvases:read:canvas-1", 7])),
            "list of strings",
        ),
        ("garbage", "not-a-jwt".to_owned(), "malformed token"),
    ];
    let mut all_tokens = vec![token];
    for (case, token, reason) in cases {
        let response = ask_with(&server, &chat, Some(&format!("Bearer {token}"))).await;
        assert_eq!(response.status(), 401, "{case}");
        assert_eq!(response.headers()["www-authenticate"], "Bearer", "{case}");
        let body = response.text().await.unwrap();
        assert!(body.contains(reason), "{case}: {body}");
        assert!(!body.contains(&token), "{case}: the token was echoed");
        all_tokens.push(token);
    }
    for (case, header, reason) in [
        ("no header", None, "missing bearer token"),
        (
            "basic auth",
            Some("Basic YWxpY2U6cHc="),
            "malformed Authorization header",
        ),
        (
            "empty bearer",
            Some("Bearer "),
            "malformed Authorization header",
        ),
    ] {
        let response = ask_with(&server, &chat, header).await;
        assert_eq!(response.status(), 401, "{case}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["code"], "unauthenticated", "{case}");
        assert!(
            body["detail"].as_str().unwrap().contains(reason),
            "{case}: {body}"
        );
    }

    // Not a single token reaches the log, not even at debug level.
    let logs = server.log_text();
    assert!(logs.contains("token refused"), "refusals are logged");
    for token in all_tokens.iter().filter(|t| t.len() > 20) {
        assert!(!logs.contains(token.as_str()), "a token was logged");
        let signature = token.rsplit('.').next().unwrap();
        assert!(
            signature.is_empty() || !logs.contains(signature),
            "a token signature was logged"
        );
    }
}

on_both_backends!(another_org_user_or_canvas_and_an_unknown_chat_are_the_same_404);

/// A token whose scopes name exactly `canvases`.
fn token_for(org: &str, user: &str, canvases: &[&str]) -> String {
    let mut claims = claims(org, user, canvases[0]);
    claims["scopes"] = canvases
        .iter()
        .map(|canvas| format!("canvases:read:{canvas}"))
        .collect();
    sign(&hs256(), &claims, SECRET)
}

async fn another_org_user_or_canvas_and_an_unknown_chat_are_the_same_404(db: TestDb) {
    let server = Agentd::spawn_on(db.url(), &[("JWT_SECRET", SECRET), ("AI_MODELS", "test")]).await;
    let chat = create_chat(&server, "acme", "alice", "canvas-1").await;
    let answer = |token: String, chat: String| {
        let server = &server;
        async move {
            let response = ask_with(server, &chat, Some(&format!("Bearer {token}"))).await;
            (response.status().as_u16(), response.text().await.unwrap())
        }
    };
    let expected = (
        404,
        r#"{"code":"chat_not_found","detail":"Chat not found"}"#.to_owned(),
    );
    let strangers = [
        ("other-org", "alice", "canvas-1"),
        ("acme", "bob", "canvas-1"),
        ("acme", "alice", "canvas-2"),
    ];
    // A token for one canvas has the store check the chat's owner as it starts the run (no lookup first); a token
    // for several has the chat looked up first. Both answer alike.
    for others in [&[][..], &["other"][..]] {
        let token = |(org, user, canvas): (&str, &str, &str)| {
            token_for(org, user, &[&[canvas][..], others].concat())
        };
        for stranger in strangers {
            assert_eq!(answer(token(stranger), chat.clone()).await, expected);
        }
        let unknown = crate::common::new_chat();
        assert_eq!(
            answer(token(("acme", "alice", "canvas-1")), unknown).await,
            expected
        );
        assert_eq!(
            answer(token(("acme", "alice", "canvas-1")), chat.clone())
                .await
                .0,
            200
        );
    }

    // With a run going in the chat: still missing to others, busy to its owner.
    let going = server
        .http
        .post(server.url(&format!("/agents/chats/{chat}/stream")))
        .bearer_auth(token_for("acme", "alice", &["canvas-1"]))
        .json(&json!({"question": "q", "model": "test:deltas=50,delay_ms=100"}))
        .send()
        .await
        .unwrap();
    assert_eq!(going.status(), 200);
    for others in [&[][..], &["other"][..]] {
        for (org, user, canvas) in strangers {
            let token = token_for(org, user, &[&[canvas][..], others].concat());
            assert_eq!(answer(token, chat.clone()).await, expected);
        }
        let (status, body) = answer(
            token_for("acme", "alice", &[&["canvas-1"][..], others].concat()),
            chat.clone(),
        )
        .await;
        assert_eq!(status, 409, "{body}");
    }

    // Following the run, stopping it, reading the chat: the same 404 to others on every route.
    let mut going = crate::common::Events::new(going);
    let run = going.next().await.unwrap().1["run_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let call = |method: reqwest::Method, path: String, token: String| {
        let server = &server;
        async move {
            let response = server
                .http
                .request(method, server.url(&path))
                .bearer_auth(token)
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            // A stream that was let in is only opened, not read.
            let body = if status == 200 {
                String::new()
            } else {
                response.text().await.unwrap()
            };
            (status, body)
        }
    };
    let routes = [
        (
            reqwest::Method::GET,
            format!("/agents/chats/{chat}/runs/{run}/stream"),
        ),
        (
            reqwest::Method::GET,
            format!("/agents/chats/{chat}/messages"),
        ),
        (
            reqwest::Method::POST,
            format!("/agents/chats/{chat}/runs/{run}/cancel"),
        ),
    ];
    for (method, path) in &routes {
        for (org, user, canvas) in strangers {
            let token = token_for(org, user, &[canvas]);
            assert_eq!(
                call(method.clone(), path.clone(), token).await,
                expected,
                "{path}"
            );
        }
        let owner = token_for("acme", "alice", &["canvas-1"]);
        let (status, body) = call(method.clone(), path.clone(), owner).await;
        let allowed = if *method == reqwest::Method::POST {
            202
        } else {
            200
        };
        assert_eq!(status, allowed, "{path}: {body}");
    }
}

#[tokio::test]
async fn tokens_from_agentd_token_verify() {
    let server = spawn_secured().await;
    let chat = create_chat(&server, "acme", "alice", "canvas-1").await;
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_agentd"))
        .args([
            "token", "--org", "acme", "--user", "alice", "--canvas", "canvas-1", "--ttl", "5m",
        ])
        .env_clear()
        .env("JWT_SECRET", SECRET)
        .output()
        .await
        .unwrap();
    assert!(output.status.success());
    let token = String::from_utf8(output.stdout).unwrap();
    let response = ask_with(&server, &chat, Some(&format!("Bearer {}", token.trim()))).await;
    assert_eq!(response.status(), 200);

    let no_secret = tokio::process::Command::new(env!("CARGO_BIN_EXE_agentd"))
        .args([
            "token", "--org", "acme", "--user", "alice", "--canvas", "canvas-1",
        ])
        .env_clear()
        .output()
        .await
        .unwrap();
    assert_eq!(no_secret.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&no_secret.stderr).contains("JWT_SECRET is not set"));
}

#[tokio::test]
async fn with_a_secret_the_test_model_needs_a_token_too_and_dev_mode_says_so_at_start() {
    let server = spawn_secured().await;
    let response = ask_with(&server, &crate::common::new_chat(), None).await;
    assert_eq!(response.status(), 401);
    assert!(!server.log_text().contains("dev mode"));

    let dev = Agentd::spawn(&[]).await;
    assert!(dev.log_text().contains("dev mode: JWT_SECRET is unset"));
    assert_eq!(
        ask_with(&dev, &crate::common::new_chat(), None)
            .await
            .status(),
        200
    );
}

fn chat_command(server: &Agentd, args: &[&str], env: &[(&str, &str)]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_agentd"));
    command
        .arg("chat")
        .args(["--url", &server.base, "--grpc-url", &server.grpc])
        .args(args)
        .env_clear()
        .envs(env.iter().copied());
    command
}

#[tokio::test]
async fn agentd_chat_prints_the_streamed_answer_and_its_exit_code_tells_the_outcome() {
    let server = Agentd::spawn(&[]).await;
    let output = chat_command(
        &server,
        &[
            "--model",
            "test:deltas=3,tool=current_time",
            "What time is it?",
        ],
        &[],
    )
    .output()
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines[0].starts_with("[tool current_time"), "{stdout}");
    assert!(
        lines[1].starts_with("[tool current_time done in"),
        "{stdout}"
    );
    assert_eq!(lines[2], "Agents answer in");

    let failed = chat_command(&server, &["--model", "test:fail_after=1", "q"], &[])
        .output()
        .await
        .unwrap();
    assert_eq!(failed.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&failed.stdout).contains("Agents"));
    assert!(
        String::from_utf8_lossy(&failed.stderr)
            .contains("the run failed: the test model failed after 1 deltas")
    );

    let refused = chat_command(&server, &["--model", "gpt-none", "q"], &[])
        .output()
        .await
        .unwrap();
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("422"));
}

#[tokio::test]
async fn agentd_chat_creates_a_chat_over_grpc_and_signs_its_own_token() {
    let server = spawn_secured().await;
    let output = chat_command(
        &server,
        &[
            "--org",
            "acme",
            "--user",
            "alice",
            "--canvas",
            "canvas-1",
            "--model",
            "test:deltas=2",
            "hello",
        ],
        &[("JWT_SECRET", SECRET)],
    )
    .output()
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        "Agents answer"
    );
    assert!(String::from_utf8_lossy(&output.stderr).starts_with("chat "));

    // A script creates the chat first, reads its id from stdout, and asks in it.
    let owner = ["--org", "acme", "--user", "alice", "--canvas", "canvas-1"];
    let created = chat_command(&server, &[&owner[..], &["--new"]].concat(), &[])
        .output()
        .await
        .unwrap();
    assert!(created.status.success(), "{created:?}");
    let chat = String::from_utf8_lossy(&created.stdout).trim().to_owned();
    assert!(uuid::Uuid::parse_str(&chat).is_ok(), "{created:?}");
    let asked = chat_command(
        &server,
        &[
            &owner[..],
            &["--chat", &chat, "--model", "test:deltas=2", "again"],
        ]
        .concat(),
        &[("JWT_SECRET", SECRET)],
    )
    .output()
    .await
    .unwrap();
    assert!(asked.status.success(), "{asked:?}");
    assert!(asked.stderr.is_empty(), "no new chat: {asked:?}");
    let mut grpc = agentd::grpc::proto::agents_client::AgentsClient::connect(server.grpc.clone())
        .await
        .unwrap();
    let messages = grpc
        .list_agent_chat_messages(agentd::grpc::proto::ListAgentChatMessagesRequest {
            org_id: "acme".into(),
            canvas_id: "canvas-1".into(),
            user_id: "alice".into(),
            chat_id: chat.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .messages;
    let seen: Vec<&str> = messages.iter().map(|m| m.content.as_str()).collect();
    assert_eq!(seen, ["again", "Agents answer"]);

    // --new needs the owner, and takes no question.
    let alone = chat_command(&server, &["--new"], &[])
        .output()
        .await
        .unwrap();
    assert_eq!(alone.status.code(), Some(1), "{alone:?}");
    assert!(String::from_utf8_lossy(&alone.stderr).contains("--new creates a chat for --org"));
    let both = chat_command(&server, &[&owner[..], &["--new", "q"]].concat(), &[])
        .output()
        .await
        .unwrap();
    assert_eq!(both.status.code(), Some(64), "a usage error: {both:?}");
}
