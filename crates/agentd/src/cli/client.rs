//! The client subcommands: `agentd token` mints a scoped token, `agentd chat` asks a question and prints the run as
//! it streams.

use std::io::Write;
use std::time::Duration;

use clap::Args;
use futures_util::StreamExt;
use serde_json::{Value, json};
use uuid::Uuid;

use super::JwtArgs;
use crate::auth;
use crate::config::EXIT_CONFIG;
use crate::grpc::proto::CreateAgentChatRequest;
use crate::grpc::proto::agents_client::AgentsClient;
use crate::secret::Secret;

/// Exit code of `agentd chat` when the run was interrupted (`sysexits.h` EX_TEMPFAIL: try again).
pub const EXIT_INTERRUPTED: i32 = 75;

#[derive(Debug, Clone, Args)]
pub struct TokenArgs {
    /// The organisation (`org_id` claim).
    #[arg(long)]
    pub org: String,
    /// The user (`sub` claim).
    #[arg(long)]
    pub user: String,
    /// The canvas the token may read (`canvases:read:<canvas>` scope).
    #[arg(long)]
    pub canvas: String,
    /// Lifetime: seconds, or with a unit (`90s`, `15m`, `1h`).
    #[arg(long, default_value = "15m", value_parser = parse_ttl)]
    pub ttl: Duration,
    #[command(flatten)]
    pub jwt: JwtArgs,
}

#[derive(Debug, Clone, Args)]
pub struct ChatArgs {
    /// The question.
    pub question: String,
    /// The chat to ask in; without it, a chat is created over gRPC for --org/--user/--canvas, or (dev mode) a new id
    /// is used.
    #[arg(long)]
    pub chat: Option<Uuid>,
    /// A scoped token; without it one is minted with JWT_SECRET when --org/--user/--canvas are given.
    #[arg(long, env = "AGENTD_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    #[arg(long)]
    pub org: Option<String>,
    #[arg(long)]
    pub user: Option<String>,
    #[arg(long)]
    pub canvas: Option<String>,
    /// Model id; the server's default when omitted.
    #[arg(long)]
    pub model: Option<String>,
    /// The service's HTTP address.
    #[arg(long, env = "AGENTD_URL", default_value = "http://127.0.0.1:8090")]
    pub url: String,
    /// The service's gRPC address, to create chats.
    #[arg(
        long,
        env = "AGENTD_GRPC_URL",
        default_value = "http://127.0.0.1:50061"
    )]
    pub grpc_url: String,
    /// Bearer token of the gRPC API, if it requires one.
    #[arg(long, env = "INTERNAL_GRPC_TOKEN", hide_env_values = true)]
    pub grpc_token: Option<String>,
    #[command(flatten)]
    pub jwt: JwtArgs,
}

/// Parses `900`, `90s`, `15m`, `1h`.
pub fn parse_ttl(raw: &str) -> Result<Duration, String> {
    let raw = raw.trim();
    let (number, unit) = match raw.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((at, _)) => raw.split_at(at),
        None => (raw, "s"),
    };
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{raw:?} is not a duration like 900, 90s, 15m or 1h"))?;
    let seconds = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => return Err(format!("{raw:?}: the unit must be s, m or h")),
    };
    if seconds == 0 {
        return Err("the lifetime must be more than 0".to_owned());
    }
    Ok(Duration::from_secs(seconds))
}

/// `agentd token`: prints a token; exit 0, or 64 without a secret.
pub fn token(args: TokenArgs) -> i32 {
    let config = args.jwt.auth_config();
    let Some(secret) = config.secret else {
        eprintln!("agentd token: JWT_SECRET is not set; there is nothing to sign with");
        return EXIT_CONFIG;
    };
    println!(
        "{}",
        auth::mint(
            &secret,
            &config.audience,
            &args.org,
            &args.user,
            &args.canvas,
            args.ttl
        )
    );
    0
}

/// `agentd chat`: asks, prints the answer as it streams; the exit code says how the run ended.
pub async fn chat(args: ChatArgs) -> i32 {
    match ask(args).await {
        Ok(code) => code,
        Err(message) => {
            eprintln!("agentd chat: {message}");
            1
        }
    }
}

async fn ask(args: ChatArgs) -> Result<i32, String> {
    let owner = match (&args.org, &args.user, &args.canvas) {
        (Some(org), Some(user), Some(canvas)) => Some((org.clone(), user.clone(), canvas.clone())),
        (None, None, None) => None,
        _ => return Err("--org, --user and --canvas go together".to_owned()),
    };
    let config = args.jwt.auth_config();
    let token = match (&args.token, &owner, &config.secret) {
        (Some(token), _, _) => Some(token.clone()),
        (None, Some((org, user, canvas)), Some(secret)) => {
            Some(mint(secret, &config.audience, org, user, canvas))
        }
        _ => None,
    };
    let chat_id = match (args.chat, &owner) {
        (Some(id), _) => id,
        (None, Some((org, user, canvas))) => create_chat(&args, org, user, canvas).await?,
        (None, None) => Uuid::new_v4(),
    };

    let mut body = json!({ "question": args.question });
    if let Some(model) = &args.model {
        body["model"] = json!(model);
    }
    let url = format!(
        "{}/agents/chats/{chat_id}/stream",
        args.url.trim_end_matches('/')
    );
    let mut request = reqwest::Client::new().post(&url).json(&body);
    if let Some(token) = &token {
        request = request.bearer_auth(token);
    }
    let response = request
        .send()
        .await
        .map_err(|e| format!("cannot reach {url}: {e}"))?;
    if !response.status().is_success() {
        let status = response.status();
        let detail = response
            .json::<Value>()
            .await
            .map(|body| body["detail"].to_string())
            .unwrap_or_default();
        return Err(format!("{status}: {detail}"));
    }
    print_stream(response).await
}

fn mint(secret: &Secret, audience: &str, org: &str, user: &str, canvas: &str) -> String {
    auth::mint(
        secret,
        audience,
        org,
        user,
        canvas,
        Duration::from_secs(900),
    )
}

async fn create_chat(args: &ChatArgs, org: &str, user: &str, canvas: &str) -> Result<Uuid, String> {
    let channel = tonic::transport::Endpoint::from_shared(args.grpc_url.clone())
        .map_err(|e| format!("bad gRPC address: {e}"))?
        .connect()
        .await
        .map_err(|e| format!("cannot reach {}: {e}", args.grpc_url))?;
    let grpc_token = args.grpc_token.clone();
    let mut client =
        AgentsClient::with_interceptor(channel, move |mut request: tonic::Request<()>| {
            if let Some(token) = &grpc_token {
                let value = format!("Bearer {token}").parse().map_err(|_| {
                    tonic::Status::invalid_argument("the gRPC token is not a valid header value")
                })?;
                request.metadata_mut().insert("authorization", value);
            }
            Ok(request)
        });
    let created = client
        .create_agent_chat(CreateAgentChatRequest {
            org_id: org.to_owned(),
            canvas_id: canvas.to_owned(),
            user_id: user.to_owned(),
        })
        .await
        .map_err(|status| format!("could not create a chat: {}", status.message()))?;
    let id = created
        .into_inner()
        .chat
        .map(|chat| chat.id)
        .unwrap_or_default();
    let id =
        Uuid::parse_str(&id).map_err(|_| "the server answered without a chat id".to_owned())?;
    eprintln!("chat {id}");
    Ok(id)
}

/// Prints the answer text as it comes, tool calls on their own lines.
async fn print_stream(response: reqwest::Response) -> Result<i32, String> {
    use eventsource_stream::Eventsource;

    let mut events = response.bytes_stream().eventsource();
    let mut out = std::io::stdout();
    let mut mid_line = false;
    while let Some(event) = events.next().await {
        let event = event.map_err(|e| format!("the stream broke: {e}"))?;
        let event: Value =
            serde_json::from_str(&event.data).map_err(|e| format!("a garbled event: {e}"))?;
        let mut line = |text: String| {
            if mid_line {
                println!();
                mid_line = false;
            }
            println!("{text}");
        };
        match event["type"].as_str().unwrap_or_default() {
            "model_delta" => {
                print!("{}", event["content"].as_str().unwrap_or_default());
                let _ = out.flush();
                mid_line = true;
            }
            "tool_started" => line(format!(
                "[tool {} {}]",
                text(&event["tool_name"]),
                event["args"]
            )),
            "tool_finished" => line(format!(
                "[tool {} done in {} ms]",
                text(&event["tool_name"]),
                event["elapsed_ms"]
            )),
            "run_failed" => {
                line(String::new());
                eprintln!("agentd chat: the run failed: {}", text(&event["error"]));
                return Ok(1);
            }
            "run_interrupted" => {
                line(String::new());
                eprintln!(
                    "agentd chat: the run was interrupted ({}); resume at {}",
                    text(&event["reason"]),
                    text(&event["resume"])
                );
                return Ok(EXIT_INTERRUPTED);
            }
            "done" => break,
            _ => {}
        }
    }
    if mid_line {
        println!();
    }
    Ok(0)
}

fn text(value: &Value) -> &str {
    value.as_str().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls_take_seconds_or_a_unit() {
        assert_eq!(parse_ttl("900"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_ttl("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_ttl("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_ttl("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_ttl("0").is_err());
        assert!(parse_ttl("5d").is_err());
        assert!(parse_ttl("m").is_err());
    }
}
