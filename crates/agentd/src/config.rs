//! Typed settings of `agentd serve`, and the checks that need no I/O: the shutdown budget, CORS origins, durations.
//!
//! Nothing here binds, connects or opens a file: the command line (`cli/`) is turned into a [`Config`], and
//! `startup.rs` does the I/O it describes (the tools file is read there, too).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::ValueEnum;

use crate::auth::AuthConfig;
use crate::model::{Endpoint, ModelPolicy, ModelSpec};
use crate::secret::Secret;
use crate::store::StoreConfig;

/// `sysexits.h` EX_USAGE: the configuration is wrong and retrying will not help.
pub const EXIT_CONFIG: i32 = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Typed, checked settings of `agentd serve`.
#[derive(Debug, Clone)]
pub struct Config {
    pub http_addr: SocketAddr,
    /// Which models requests may name, and the default.
    pub models: ModelPolicy,
    pub providers: ProviderSettings,
    /// HTTP tools to load at start (`TOOLS_FILE`).
    pub tools_file: Option<PathBuf>,
    /// The agent's instructions template (`AGENT_INSTRUCTIONS`), read at start.
    pub instructions_file: Option<PathBuf>,
    /// The final answer's JSON Schema (`OUTPUT_SCHEMA`), read at start.
    pub output_schema_file: Option<PathBuf>,
    pub max_steps: usize,
    pub grpc_addr: SocketAddr,
    /// Required bearer token of gRPC calls.
    pub grpc_token: Option<Secret>,
    pub grpc_grace: Duration,
    /// Parsed at start so a misspelt `AI_MODEL` fails the deploy, not the first request.
    pub default_model: ModelSpec,
    pub cors_origins: CorsOrigins,
    pub budget: ShutdownBudget,
    pub max_streams: Option<usize>,
    pub log_format: LogFormat,
    pub store: StoreConfig,
    /// See `RUN_LEASE`; heartbeats are sent three times per lease.
    pub run_lease: Duration,
    /// `DETACH_GRACE`: how long a run nobody follows goes on waiting for a follower.
    pub detach_grace: Duration,
    /// `RUN_LOG_RETENTION`: how long the events of finished runs stay replayable.
    pub run_log_retention: Duration,
    pub auth: AuthConfig,
    /// `CLIENT_COMPAT`: which clients the streams are shaped for.
    pub client_compat: ClientCompat,
}

/// Where the model providers are; the HTTP client is built from this at start.
#[derive(Debug, Clone)]
pub struct ProviderSettings {
    pub openai: Endpoint,
    pub anthropic: Endpoint,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CorsOrigins {
    Any,
    List(Vec<String>),
}

/// The time allowed to each shutdown phase; see the README's "Shutdown budget".
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ShutdownBudget {
    /// Normal service after the signal, readiness already failing.
    pub delay: Duration,
    /// How long open streams may run once admission stops.
    pub drain: Duration,
    /// From the signal to exit, whatever is stuck.
    pub timeout: Duration,
    /// The orchestrator's own deadline, if known; it kills the process at that point.
    pub grace_period: Option<Duration>,
    pub mode: ShutdownMode,
}

/// Which clients the streams are shaped for (`CLIENT_COMPAT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum ClientCompat {
    /// Clients that know every event type of the protocol.
    #[default]
    Agentd,
    /// The seed's web client, which drops event types it does not know: an interrupted run also sends `run_failed`
    /// (a short plain message) before `done`, so it never looks complete.
    Seed,
}

/// What a draining replica does with its open streams (`SHUTDOWN_MODE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum ShutdownMode {
    /// The seed's behaviour: open streams run on until their run ends or `DRAIN_TIMEOUT`, then are interrupted.
    #[default]
    Drain,
    /// After `SHUTDOWN_DELAY` every open stream gets `reconnect` and ends; the runs keep producing into the log until
    /// they end or `DRAIN_TIMEOUT`, then are released for another replica to continue.
    Handoff,
}

/// The shortest HS256 secret accepted: 256 bits, as the algorithm's key size.
pub const MIN_SECRET_BYTES: usize = 32;

/// What a handoff drain needs after `DRAIN_TIMEOUT`, before the hard deadline: to commit what its runs produced and
/// release them.
pub const HANDOFF_RELEASE: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    #[error(
        "impossible shutdown budget: SHUTDOWN_DELAY ({delay}s) + DRAIN_TIMEOUT ({drain}s) must be less than \
         SHUTDOWN_TIMEOUT ({timeout}s), so open streams can be closed before the hard deadline"
    )]
    DrainPastTimeout {
        delay: f64,
        drain: f64,
        timeout: f64,
    },
    #[error(
        "impossible shutdown budget: with SHUTDOWN_MODE=handoff, SHUTDOWN_DELAY ({delay}s) + DRAIN_TIMEOUT ({drain}s) \
         + 1s must be less than SHUTDOWN_TIMEOUT ({timeout}s), so the runs still producing can be released for \
         another replica before the hard deadline"
    )]
    ReleasePastTimeout {
        delay: f64,
        drain: f64,
        timeout: f64,
    },
    #[error(
        "impossible shutdown budget: SHUTDOWN_TIMEOUT ({timeout}s) must be less than TERMINATION_GRACE_PERIOD \
         ({grace}s), or the orchestrator kills the process before it finishes"
    )]
    TimeoutPastGracePeriod { timeout: f64, grace: f64 },
    #[error("AI_MODEL: {0}")]
    DefaultModel(String),
    #[error("MAX_STREAMS must be at least 1")]
    ZeroMaxStreams,
    #[error("AGENT_HTTP_CORS_ORIGINS: {0}")]
    CorsOrigins(String),
    /// Never carries the URL itself: it may hold a password.
    #[error("DATABASE_URL: {0}")]
    DatabaseUrl(String),
    #[error(
        "DB_SSLMODE: {0:?} is not one of disable, allow, prefer, require, verify-ca, verify-full"
    )]
    SslMode(String),
    #[error("RUN_LEASE must be at least 1 second")]
    ShortLease,
    #[error(
        "AI_MODEL is the test model, which a service with JWT_SECRET set offers only when AI_MODELS names it: set \
         AI_MODEL to a real model, or AI_MODELS to a list with test in it"
    )]
    TestModelUnnamed,
    #[error(
        "JWT_SECRET is set but empty: refusing to start in dev mode by accident (a broken secret mount?); set the \
         secret, or unset it, or ask for dev mode with AGENTD_DEV=1"
    )]
    EmptySecret,
    #[error("JWT_SECRET is {0} bytes; it must be at least {MIN_SECRET_BYTES} bytes")]
    ShortSecret(usize),
    #[error(
        "CLIENT_COMPAT=seed with SHUTDOWN_MODE=handoff: the seed's clients cannot follow `reconnect`, so a handoff \
         would leave their answers cut without a word; run them with SHUTDOWN_MODE=drain"
    )]
    SeedClientsNeedDrain,
    #[error("AI_MODELS: {0}")]
    AllowedModels(String),
    #[error("AGENT_MAX_STEPS must be at least 1")]
    ZeroSteps,
}

pub(crate) const DEFAULT_HTTP_ADDR: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8090);
pub(crate) const DEFAULT_DRAIN: Duration = Duration::from_secs(300);

impl ShutdownBudget {
    pub fn check(&self) -> Result<(), ConfigError> {
        let (delay, drain, timeout) = (
            self.delay.as_secs_f64(),
            self.drain.as_secs_f64(),
            self.timeout.as_secs_f64(),
        );
        if self.delay + self.drain >= self.timeout {
            return Err(ConfigError::DrainPastTimeout {
                delay,
                drain,
                timeout,
            });
        }
        if self.mode == ShutdownMode::Handoff
            && self.delay + self.drain + HANDOFF_RELEASE >= self.timeout
        {
            return Err(ConfigError::ReleasePastTimeout {
                delay,
                drain,
                timeout,
            });
        }
        if let Some(grace) = self.grace_period
            && self.timeout >= grace
        {
            return Err(ConfigError::TimeoutPastGracePeriod {
                timeout: self.timeout.as_secs_f64(),
                grace: grace.as_secs_f64(),
            });
        }
        Ok(())
    }
}

impl CorsOrigins {
    pub fn parse(raw: &str) -> Result<Self, ConfigError> {
        let origins: Vec<String> = raw
            .split(',')
            .map(str::trim)
            .filter(|o| !o.is_empty())
            .map(str::to_owned)
            .collect();
        if origins.is_empty() || origins.iter().any(|o| o == "*") {
            return Ok(Self::Any);
        }
        if let Some(bad) = origins
            .iter()
            .find(|o| axum::http::HeaderValue::from_str(o).is_err())
        {
            return Err(ConfigError::CorsOrigins(format!(
                "{bad:?} is not a valid origin"
            )));
        }
        Ok(Self::List(origins))
    }
}

/// Parses a duration given in seconds: `300`, `0.5`.
pub fn parse_seconds(raw: &str) -> Result<Duration, String> {
    let seconds: f64 = raw
        .trim()
        .parse()
        .map_err(|_| format!("{raw:?} is not a number of seconds"))?;
    let duration = Duration::try_from_secs_f64(seconds)
        .map_err(|_| format!("{raw:?} is not a non-negative number of seconds"))?;
    // Deadlines are added to the clock: a bound keeps every sum of them far from overflowing.
    if duration > MAX_DURATION {
        return Err(format!(
            "{raw:?} is longer than {} days",
            MAX_DURATION.as_secs() / 86_400
        ));
    }
    Ok(duration)
}

/// The longest duration any setting takes: a year.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 86_400);

/// Parses a duration: seconds (`300`, `0.5`) or a number with a unit (`90s`, `15m`, `24h`, `7d`).
pub fn parse_duration(raw: &str) -> Result<Duration, String> {
    let raw = raw.trim();
    let (number, scale) = match raw.chars().last() {
        Some('s') => (&raw[..raw.len() - 1], 1.0),
        Some('m') => (&raw[..raw.len() - 1], 60.0),
        Some('h') => (&raw[..raw.len() - 1], 3600.0),
        Some('d') => (&raw[..raw.len() - 1], 86400.0),
        _ => (raw, 1.0),
    };
    let seconds = parse_seconds(number)
        .map_err(|_| format!("{raw:?} is not a duration like 300, 90s, 15m, 24h or 7d"))?;
    Duration::try_from_secs_f64(seconds.as_secs_f64() * scale)
        .ok()
        .filter(|d| *d <= MAX_DURATION)
        .ok_or_else(|| format!("{raw:?} is too long"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_seconds_or_a_unit() {
        assert_eq!(parse_duration("300"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1.5m"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86400)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86400)));
        assert!(parse_duration("h").is_err());
        assert!(
            parse_seconds("1e19")
                .unwrap_err()
                .contains("longer than 365 days")
        );
        assert!(parse_duration("100000d").is_err());
        assert!(parse_duration("5w").is_err());
        assert!(parse_duration("-1h").is_err());
    }

    #[test]
    fn seconds_accept_fractions_and_refuse_garbage() {
        assert_eq!(parse_seconds("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_seconds("300"), Ok(Duration::from_secs(300)));
        assert!(parse_seconds("-1").is_err());
        assert!(parse_seconds("5m").is_err());
    }

    #[test]
    fn cors_origins_are_a_list_or_any() {
        assert_eq!(
            CorsOrigins::parse("https://a.example, https://b.example").unwrap(),
            CorsOrigins::List(vec!["https://a.example".into(), "https://b.example".into()])
        );
        assert_eq!(CorsOrigins::parse("*").unwrap(), CorsOrigins::Any);
        assert!(CorsOrigins::parse("https://a.example\n").is_ok());
        assert!(CorsOrigins::parse("bad\u{7f}origin").is_err());
    }
}
