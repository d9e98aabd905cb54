//! The command line: the clap tree of every subcommand, the conversion of `agentd serve`'s arguments into a typed
//! [`Config`], and the client subcommands `agentd token` and `agentd chat` (`client.rs`).
//!
//! Every flag can also be given as an environment variable (clap's `env`). This module imports [`crate::config`];
//! the config never imports the command line.

mod client;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use sqlx::postgres::{PgConnectOptions, PgSslMode};
use sqlx::sqlite::SqliteConnectOptions;

pub use client::{ChatArgs, EXIT_INTERRUPTED, TokenArgs, chat, parse_ttl, token};

use crate::auth::AuthConfig;
use crate::config::{
    ClientCompat, Config, ConfigError, CorsOrigins, DEFAULT_DRAIN, DEFAULT_HTTP_ADDR, LogFormat,
    MIN_SECRET_BYTES, ProviderSettings, ShutdownBudget, ShutdownMode, parse_duration,
    parse_seconds,
};
use crate::model::{Endpoint, ModelPolicy, ModelSpec};
use crate::secret::Secret;
use crate::store::StoreConfig;

#[derive(Debug, Parser)]
#[command(
    name = "agentd",
    version,
    about = "An AI-agent service that streams runs over SSE"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the service (HTTP) until SIGTERM or SIGINT.
    Serve(Box<ServeArgs>),
    /// Apply the store's migrations and exit (serve applies them at start too).
    Migrate(MigrateArgs),
    /// Mint a scoped token with JWT_SECRET, for trying things out and for scripts.
    Token(TokenArgs),
    /// Ask a question in a chat and print the run as it streams.
    Chat(Box<ChatArgs>),
}

/// Where the session store is.
#[derive(Debug, Clone, Args)]
pub struct StoreArgs {
    /// `sqlite://FILE` or `postgres://USER:PASSWORD@HOST:PORT/DB` [default: sqlite://agentd.db].
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// PostgreSQL host, as the seed configured it; used when DATABASE_URL is unset.
    #[arg(long, env = "DB_HOST")]
    pub db_host: Option<String>,
    #[arg(long, env = "DB_PORT", default_value_t = 5432)]
    pub db_port: u16,
    #[arg(long, env = "DB_NAME")]
    pub db_name: Option<String>,
    #[arg(long, env = "DB_USERNAME")]
    pub db_username: Option<String>,
    #[arg(long, env = "DB_PASSWORD", hide_env_values = true)]
    pub db_password: Option<String>,
    /// disable, allow, prefer, require, verify-ca or verify-full.
    #[arg(long, env = "DB_SSLMODE")]
    pub db_sslmode: Option<String>,
}

/// Model providers, the models requests may name, and the agent's tools.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// Comma-separated model ids requests may name [default: AI_MODEL, and test unless JWT_SECRET is set].
    #[arg(long, env = "AI_MODELS")]
    pub ai_models: Option<String>,
    /// Most `model_delta`s a run of the test model may ask for.
    #[arg(long, env = "TEST_MODEL_MAX_DELTAS", default_value_t = 100_000)]
    pub test_model_max_deltas: u32,
    #[arg(long, env = "OPENAI_API_KEY", hide_env_values = true)]
    pub openai_api_key: Option<String>,
    /// An OpenAI-compatible API (OpenAI, vLLM, Ollama, llama.cpp server, gateways).
    #[arg(
        long,
        env = "OPENAI_BASE_URL",
        default_value = "https://api.openai.com/v1"
    )]
    pub openai_base_url: String,
    /// Speak HTTP/2 without TLS (prior knowledge) to OPENAI_BASE_URL, for a local server that supports it: streams
    /// then share connections, at most 100 on each.
    #[arg(long = "openai-h2c", env = "OPENAI_H2C", action = clap::ArgAction::SetTrue,
        value_parser = clap::builder::BoolishValueParser::new())]
    pub openai_h2c: bool,
    #[arg(long, env = "ANTHROPIC_API_KEY", hide_env_values = true)]
    pub anthropic_api_key: Option<String>,
    #[arg(
        long,
        env = "ANTHROPIC_BASE_URL",
        default_value = "https://api.anthropic.com"
    )]
    pub anthropic_base_url: String,
    /// Seconds to wait for a connection to a model provider.
    #[arg(long, env = "MODEL_CONNECT_TIMEOUT", value_parser = parse_seconds, default_value = "10")]
    pub model_connect_timeout: Duration,
    /// Seconds a model provider's stream may stay silent before the run fails.
    #[arg(long, env = "MODEL_IDLE_TIMEOUT", value_parser = parse_seconds, default_value = "60")]
    pub model_idle_timeout: Duration,
    /// Model steps (an answer or a round of tool calls) a run may take.
    #[arg(long, env = "AGENT_MAX_STEPS", default_value_t = 10)]
    pub agent_max_steps: usize,
    /// YAML or JSON file declaring HTTP tools.
    #[arg(long, env = "TOOLS_FILE")]
    pub tools_file: Option<PathBuf>,
    /// The agent's instructions (the system prompt): Markdown or text, or YAML/JSON with an `instructions` string;
    /// `{org_id}`, `{canvas_id}`, `{context.mode}` … are filled per run. Read at start.
    #[arg(long, env = "AGENT_INSTRUCTIONS")]
    pub agent_instructions: Option<PathBuf>,
    /// A JSON Schema the final answer must match (an object with a string `answer`, which streams). Read at start.
    #[arg(long, env = "OUTPUT_SCHEMA")]
    pub output_schema: Option<PathBuf>,
}

/// How scoped tokens are checked (and minted by `agentd token`).
#[derive(Debug, Clone, Args)]
pub struct JwtArgs {
    /// HS256 secret shared with the main application; unset = dev mode (the test model only, no token needed).
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// The `aud` every token must carry.
    #[arg(long, env = "JWT_AUDIENCE", default_value = "superplane_api")]
    pub jwt_audience: String,
    /// Seconds of tolerance on `exp` and `nbf`, for clock skew.
    #[arg(long, env = "JWT_LEEWAY", value_parser = parse_seconds, default_value = "0")]
    pub jwt_leeway: Duration,
}

impl JwtArgs {
    pub fn auth_config(&self) -> AuthConfig {
        AuthConfig {
            secret: self
                .jwt_secret
                .clone()
                .filter(|s| !s.is_empty())
                .map(Secret::new),
            audience: self.jwt_audience.clone(),
            leeway: self.jwt_leeway,
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct MigrateArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// Log line format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// Raw `agentd serve` settings, as the user typed them.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Dev mode asked for explicitly: lets JWT_SECRET be empty (a set, non-empty secret still wins).
    #[arg(long = "dev", env = "AGENTD_DEV", action = clap::ArgAction::SetTrue,
        value_parser = clap::builder::BoolishValueParser::new())]
    pub dev: bool,

    /// HTTP listener address [default: 127.0.0.1:8090].
    #[arg(long, env = "HTTP_ADDR")]
    pub http_addr: Option<SocketAddr>,

    /// HTTP port on all interfaces, as the container sets it; ignored when HTTP_ADDR is set.
    #[arg(long, env = "APP_PORT")]
    pub app_port: Option<u16>,

    /// Interface of the internal gRPC API.
    #[arg(long, env = "INTERNAL_GRPC_HOST", default_value = "127.0.0.1")]
    pub internal_grpc_host: IpAddr,

    /// Port of the internal gRPC API.
    #[arg(long, env = "INTERNAL_GRPC_PORT", default_value_t = 50061)]
    pub internal_grpc_port: u16,

    /// When set, every gRPC call must carry `authorization: Bearer <token>`.
    #[arg(long, env = "INTERNAL_GRPC_TOKEN", hide_env_values = true)]
    pub internal_grpc_token: Option<String>,

    /// Seconds in-flight gRPC calls may take to finish once gRPC stops, after the HTTP drain.
    #[arg(long, env = "GRPC_SHUTDOWN_GRACE", value_parser = parse_seconds, default_value = "5")]
    pub grpc_shutdown_grace: Duration,

    #[command(flatten)]
    pub jwt: JwtArgs,

    #[command(flatten)]
    pub models: ModelArgs,

    /// Model used when a request names none (`provider:model`).
    #[arg(long, env = "AI_MODEL", default_value = "test")]
    pub ai_model: String,

    /// Comma-separated origins allowed by CORS, or `*`.
    #[arg(long, env = "AGENT_HTTP_CORS_ORIGINS", default_value = "*")]
    pub cors_origins: String,

    /// Seconds open streams may run on after SIGTERM [default: 300].
    #[arg(long, env = "DRAIN_TIMEOUT", value_parser = parse_seconds)]
    pub drain_timeout: Option<Duration>,

    /// Alias of DRAIN_TIMEOUT, as the seed named it.
    #[arg(long, env = "GRACEFUL_SHUTDOWN_TIMEOUT", value_parser = parse_seconds, hide = true)]
    pub graceful_shutdown_timeout: Option<Duration>,

    /// Seconds to keep serving normally after SIGTERM (readiness already failing) so load balancers deregister.
    #[arg(long, env = "SHUTDOWN_DELAY", value_parser = parse_seconds, default_value = "0")]
    pub shutdown_delay: Duration,

    /// What a draining replica does with its open streams: `drain` (they run on until done or DRAIN_TIMEOUT) or
    /// `handoff` (they get `reconnect` after SHUTDOWN_DELAY; the runs are continued by another replica).
    #[arg(long, env = "SHUTDOWN_MODE", value_enum, default_value_t = ShutdownMode::Drain)]
    pub shutdown_mode: ShutdownMode,

    /// Seconds from SIGTERM to process exit, whatever is stuck.
    #[arg(long, env = "SHUTDOWN_TIMEOUT", value_parser = parse_seconds, default_value = "310")]
    pub shutdown_timeout: Duration,

    /// The orchestrator's grace period in seconds (Kubernetes terminationGracePeriodSeconds), checked at start.
    #[arg(long, env = "TERMINATION_GRACE_PERIOD", value_parser = parse_seconds)]
    pub termination_grace_period: Option<Duration>,

    /// Most streams open at once; more are refused with 503.
    #[arg(long, env = "MAX_STREAMS")]
    pub max_streams: Option<usize>,

    /// Seconds without a heartbeat after which a running run is taken for the run of a stopped process and marked
    /// interrupted.
    #[arg(long, env = "RUN_LEASE", value_parser = parse_seconds, default_value = "30")]
    pub run_lease: Duration,

    /// Seconds a run whose last client left goes on, waiting for one to attach, before it stops.
    #[arg(long, env = "DETACH_GRACE", value_parser = parse_seconds, default_value = "30")]
    pub detach_grace: Duration,

    /// How long the events of finished runs stay replayable: seconds, or with a unit (`90s`, `15m`, `24h`, `7d`).
    #[arg(long, env = "RUN_LOG_RETENTION", value_parser = parse_duration, default_value = "24h")]
    pub run_log_retention: Duration,

    /// Which clients the streams are shaped for: `agentd`, or `seed` (the seed's web client, which drops event types
    /// it does not know: an interrupted run also sends `run_failed` before `done`). `seed` needs SHUTDOWN_MODE=drain.
    #[arg(long, env = "CLIENT_COMPAT", value_enum, default_value_t = ClientCompat::Agentd)]
    pub client_compat: ClientCompat,

    /// Log line format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    #[command(flatten)]
    pub store: StoreArgs,
}

impl ServeArgs {
    /// The typed settings, checked; nothing is opened or bound.
    pub fn config(self) -> Result<Config, ConfigError> {
        let args = self;
        let http_addr = match (args.http_addr, args.app_port) {
            (Some(addr), _) => addr,
            // The seed's container sets only the port and expects to be reachable from outside the pod.
            (None, Some(port)) => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port),
            (None, None) => DEFAULT_HTTP_ADDR,
        };
        let budget = ShutdownBudget {
            delay: args.shutdown_delay,
            drain: args
                .drain_timeout
                .or(args.graceful_shutdown_timeout)
                .unwrap_or(DEFAULT_DRAIN),
            timeout: args.shutdown_timeout,
            grace_period: args.termination_grace_period,
            mode: args.shutdown_mode,
        };
        budget.check()?;
        match args.jwt.jwt_secret.as_deref() {
            // A secret mount that came out empty must not open the service to everyone.
            Some(secret) if secret.trim().is_empty() && !args.dev => {
                return Err(ConfigError::EmptySecret);
            }
            Some(secret) if !secret.trim().is_empty() && secret.len() < MIN_SECRET_BYTES => {
                return Err(ConfigError::ShortSecret(secret.len()));
            }
            _ => {}
        }
        if args.client_compat == ClientCompat::Seed && budget.mode == ShutdownMode::Handoff {
            return Err(ConfigError::SeedClientsNeedDrain);
        }
        if args.max_streams == Some(0) {
            return Err(ConfigError::ZeroMaxStreams);
        }
        let default_model = ModelSpec::parse(&args.ai_model)
            .map_err(|e| ConfigError::DefaultModel(e.to_string()))?;
        if args.run_lease < Duration::from_secs(1) {
            return Err(ConfigError::ShortLease);
        }
        let secured = args.jwt.auth_config().secret.is_some();
        let test_named = args.models.ai_models.as_deref().is_some_and(|ids| {
            ids.split(',')
                .any(|id| matches!(ModelSpec::parse(id.trim()), Ok(ModelSpec::Test(_))))
        });
        if secured && default_model.is_test() && !test_named {
            return Err(ConfigError::TestModelUnnamed);
        }
        let models = ModelPolicy::new(
            default_model.clone(),
            args.models.ai_models.as_deref(),
            secured,
            args.models.test_model_max_deltas,
        )
        .map_err(|e| ConfigError::AllowedModels(e.to_string()))?;
        if args.models.agent_max_steps == 0 {
            return Err(ConfigError::ZeroSteps);
        }
        let key = |k: &Option<String>| k.clone().filter(|k| !k.is_empty()).map(Secret::new);
        let providers = ProviderSettings {
            openai: Endpoint {
                base_url: args.models.openai_base_url.clone(),
                api_key: key(&args.models.openai_api_key),
                h2c: args.models.openai_h2c,
            },
            anthropic: Endpoint {
                base_url: args.models.anthropic_base_url.clone(),
                api_key: key(&args.models.anthropic_api_key),
                h2c: false,
            },
            connect_timeout: args.models.model_connect_timeout,
            idle_timeout: args.models.model_idle_timeout,
        };
        let grpc_token = args
            .internal_grpc_token
            .filter(|t| !t.trim().is_empty())
            .map(Secret::new);
        Ok(Config {
            http_addr,
            models,
            providers,
            tools_file: args.models.tools_file.clone(),
            instructions_file: args.models.agent_instructions.clone(),
            output_schema_file: args.models.output_schema.clone(),
            max_steps: args.models.agent_max_steps,
            grpc_addr: SocketAddr::new(args.internal_grpc_host, args.internal_grpc_port),
            grpc_token,
            grpc_grace: args.grpc_shutdown_grace,
            default_model,
            cors_origins: CorsOrigins::parse(&args.cors_origins)?,
            budget,
            max_streams: args.max_streams,
            log_format: args.log_format,
            store: args.store.parse()?,
            run_lease: args.run_lease,
            detach_grace: args.detach_grace,
            run_log_retention: args.run_log_retention,
            client_compat: args.client_compat,
            auth: args.jwt.auth_config(),
        })
    }
}

impl StoreArgs {
    /// `DATABASE_URL` when set; otherwise PostgreSQL from the seed's `DB_*` settings when `DB_HOST` is set; otherwise
    /// the embedded SQLite file `agentd.db` in the working directory.
    pub fn parse(&self) -> Result<StoreConfig, ConfigError> {
        if let Some(url) = &self.database_url {
            let scheme = url.split_once(':').map(|(scheme, _)| scheme).unwrap_or("");
            return match scheme {
                "sqlite" => SqliteConnectOptions::from_str(url)
                    .map(StoreConfig::Sqlite)
                    .map_err(|e| ConfigError::DatabaseUrl(format!("not a valid SQLite URL ({e})"))),
                "postgres" | "postgresql" => PgConnectOptions::from_str(url)
                    .map(StoreConfig::Postgres)
                    .map_err(|_| ConfigError::DatabaseUrl("not a valid PostgreSQL URL".to_owned())),
                _ => Err(ConfigError::DatabaseUrl(
                    "must start with sqlite:// or postgres://".to_owned(),
                )),
            };
        }
        let Some(host) = &self.db_host else {
            let options = SqliteConnectOptions::from_str("sqlite://agentd.db")
                .expect("the default URL is valid");
            return Ok(StoreConfig::Sqlite(options));
        };
        let mut options = PgConnectOptions::new_without_pgpass()
            .host(host)
            .port(self.db_port);
        if let Some(name) = &self.db_name {
            options = options.database(name);
        }
        if let Some(user) = &self.db_username {
            options = options.username(user);
        }
        if let Some(password) = &self.db_password {
            options = options.password(password);
        }
        if let Some(mode) = &self.db_sslmode {
            let mode = PgSslMode::from_str(mode).map_err(|_| ConfigError::SslMode(mode.clone()))?;
            options = options.ssl_mode(mode);
        }
        Ok(StoreConfig::Postgres(options))
    }
}

#[cfg(test)]
mod tests;
