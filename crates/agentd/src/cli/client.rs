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
    #[arg(required_unless_present = "new")]
    pub question: Option<String>,
    /// The chat to ask in; without it, a chat is created over gRPC for --org/--user/--canvas (its id said on stderr),
    /// or (dev mode) a new id is used.
    #[arg(long, conflicts_with = "new")]
    pub chat: Option<Uuid>,
    /// Only create a chat over gRPC for --org/--user/--canvas and print its id on stdout, for a script to ask in it
    /// with --chat; no question.
    #[arg(long, conflicts_with = "question")]
    pub new: bool,
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
    if args.new {
        let Some((org, user, canvas)) = &owner else {
            return Err("--new creates a chat for --org, --user and --canvas".to_owned());
        };
        println!("{}", create_chat(&args, org, user, canvas).await?);
        return Ok(0);
    }
    let chat_id = match (args.chat, &owner) {
        (Some(id), _) => id,
        (None, Some((org, user, canvas))) => {
            let id = create_chat(&args, org, user, canvas).await?;
            eprintln!("chat {id}");
            id
        }
        (None, None) => Uuid::new_v4(),
    };

    let mut body = json!({ "question": args.question });
    if let Some(model) = &args.model {
        body["model"] = json!(model);
    }
    let base = args.url.trim_end_matches('/').to_owned();
    let url = format!("{base}/agents/chats/{chat_id}/stream");
    let client = reqwest::Client::new();
    let response = send(authorized(client.post(&url).json(&body), &token), &url).await?;
    follow(&client, &base, chat_id, &token, response).await
}

/// Adds the bearer token, when there is one.
fn authorized(request: reqwest::RequestBuilder, token: &Option<String>) -> reqwest::RequestBuilder {
    match token {
        Some(token) => request.bearer_auth(token),
        None => request,
    }
}

/// Sends `request`; an error status becomes the server's `detail`.
async fn send(request: reqwest::RequestBuilder, url: &str) -> Result<reqwest::Response, String> {
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
    Ok(response)
}

/// How many times in a row the client re-attaches to a run whose stream dropped before giving up.
const REATTACH_ATTEMPTS: u32 = 10;
/// How long it waits before re-attaching.
const REATTACH_AFTER: Duration = Duration::from_secs(1);

/// Prints the run as it streams. A stream that ends without `done` (a lost connection, or a `reconnect` from a replica
/// handing off) is re-attached with the last event id, so no text is printed twice. The first Ctrl-C cancels the run (its end is still printed); a second one
/// leaves at once, and the run goes on without this client.
async fn follow(
    client: &reqwest::Client,
    base: &str,
    chat_id: Uuid,
    token: &Option<String>,
    response: reqwest::Response,
) -> Result<i32, String> {
    use tokio::signal::unix::{SignalKind, signal};

    let mut interrupts =
        signal(SignalKind::interrupt()).map_err(|e| format!("cannot listen for Ctrl-C: {e}"))?;
    let mut printer = Printer::default();
    let mut cancelling = false;
    let mut attempts = 0;
    let mut response = Some(response);
    loop {
        if let Some(current) = response.take() {
            let mut events = crate::sse::events(current.bytes_stream());
            loop {
                let event = tokio::select! {
                    event = events.next() => event,
                    _ = interrupts.recv() => {
                        let Some(run_id) = printer.run_id.filter(|_| !cancelling) else {
                            printer.newline();
                            eprintln!("agentd chat: left; the run goes on without this client");
                            return Ok(EXIT_LEFT);
                        };
                        cancelling = true;
                        printer.newline();
                        eprintln!("agentd chat: cancelling the run (Ctrl-C again to leave it running)");
                        let url = format!("{base}/agents/chats/{chat_id}/runs/{run_id}/cancel");
                        if let Err(error) = send(authorized(client.post(&url), token), &url).await {
                            eprintln!("agentd chat: could not cancel: {error}");
                        }
                        continue;
                    }
                };
                match event {
                    Some(Ok(event)) => {
                        attempts = 0;
                        if !event.id.is_empty() {
                            printer.last_id = Some(event.id.clone());
                        }
                        if let Some(code) = printer.print(&event.data)? {
                            return Ok(code);
                        }
                    }
                    Some(Err(_)) | None => break,
                }
            }
        }
        // The stream ended before `done`: attach again after the last event seen.
        let Some(run_id) = printer.run_id else {
            return Err("the stream ended before the run started".to_owned());
        };
        match printer.reconnect.take() {
            // Told to: the replica is handing its streams over; another one takes this client.
            Some(after) => tokio::time::sleep(after).await,
            None => {
                attempts += 1;
                if attempts > REATTACH_ATTEMPTS {
                    return Err(format!("lost the run {run_id}; gave up re-attaching"));
                }
                tokio::time::sleep(REATTACH_AFTER).await;
            }
        }
        let url = format!("{base}/agents/chats/{chat_id}/runs/{run_id}/stream");
        let mut request = authorized(client.get(&url), token);
        if let Some(last) = &printer.last_id {
            request = request.header("last-event-id", last);
        }
        response = send(request, &url)
            .await
            .inspect_err(|error| eprintln!("agentd chat: re-attaching: {error}"))
            .ok();
    }
}

/// Exit code of `agentd chat` when the user left a run going (128 + SIGINT, as shells report it).
pub const EXIT_LEFT: i32 = 130;

/// What has been printed so far: the run, the last event id, and whether a line is open.
#[derive(Debug, Default)]
struct Printer {
    run_id: Option<Uuid>,
    last_id: Option<String>,
    mid_line: bool,
    /// The stream said to re-attach elsewhere after this long.
    reconnect: Option<Duration>,
}

impl Printer {
    fn newline(&mut self) {
        if self.mid_line {
            println!();
            self.mid_line = false;
        }
    }

    fn line(&mut self, text: String) {
        self.newline();
        println!("{text}");
    }

    /// Prints one event; the exit code once the run has ended.
    fn print(&mut self, data: &str) -> Result<Option<i32>, String> {
        let event: Value =
            serde_json::from_str(data).map_err(|e| format!("a garbled event: {e}"))?;
        match event["type"].as_str().unwrap_or_default() {
            "run_started" => self.run_id = text(&event["run_id"]).parse().ok(),
            "model_delta" => {
                print!("{}", event["content"].as_str().unwrap_or_default());
                let _ = std::io::stdout().flush();
                self.mid_line = true;
            }
            "tool_started" => self.line(format!(
                "[tool {} {}]",
                text(&event["tool_name"]),
                event["args"]
            )),
            "tool_finished" => self.line(format!(
                "[tool {} done in {} ms]",
                text(&event["tool_name"]),
                event["elapsed_ms"]
            )),
            "run_failed" => {
                self.newline();
                eprintln!("agentd chat: the run failed: {}", text(&event["error"]));
                return Ok(Some(1));
            }
            "run_interrupted" => {
                self.newline();
                eprintln!(
                    "agentd chat: the run was interrupted ({}); resume at {}",
                    text(&event["reason"]),
                    text(&event["resume"])
                );
                return Ok(Some(EXIT_INTERRUPTED));
            }
            "done" => {
                self.newline();
                return Ok(Some(0));
            }
            "reconnect" => {
                let last = text(&event["last_event_id"]);
                if let Some((run, _)) = last.rsplit_once(':') {
                    self.run_id = run.parse().ok().or(self.run_id);
                    self.last_id = Some(last.to_owned());
                }
                let retry = event["retry_ms"].as_u64().unwrap_or(1_000);
                self.reconnect = Some(Duration::from_millis(retry));
            }
            _ => {}
        }
        Ok(None)
    }
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
    Uuid::parse_str(&id).map_err(|_| "the server answered without a chat id".to_owned())
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
