//! The command line as `agentd serve` parses it: defaults, aliases and the settings it refuses.

use super::*;

fn parse(args: ServeArgs) -> Result<Config, ConfigError> {
    args.config()
}

fn serve(args: &[&str]) -> ServeArgs {
    let argv = ["agentd", "serve"].iter().chain(args);
    match Cli::try_parse_from(argv).unwrap().command {
        Command::Serve(args) => *args,
        _ => unreachable!("only serve is parsed here"),
    }
}

#[test]
fn defaults_hold_the_documented_budget() {
    let config = parse(serve(&[])).unwrap();
    assert_eq!(config.http_addr, "127.0.0.1:8090".parse().unwrap());
    assert_eq!(config.budget.drain, Duration::from_secs(300));
    assert_eq!(config.budget.timeout, Duration::from_secs(310));
    assert_eq!(config.budget.delay, Duration::ZERO);
    assert_eq!(config.cors_origins, CorsOrigins::Any);
    assert_eq!(config.grpc_addr, "127.0.0.1:50061".parse().unwrap());
    assert_eq!(config.grpc_token, None);
    assert_eq!(config.grpc_grace, Duration::from_secs(5));
}

#[test]
fn app_port_listens_on_all_interfaces_unless_http_addr_is_set() {
    let config = parse(serve(&["--app-port", "9000"])).unwrap();
    assert_eq!(config.http_addr, "0.0.0.0:9000".parse().unwrap());
    let config = parse(serve(&["--app-port", "9000", "--http-addr", "127.0.0.1:1"])).unwrap();
    assert_eq!(config.http_addr, "127.0.0.1:1".parse().unwrap());
}

#[test]
fn the_seed_alias_sets_the_drain_and_the_new_name_wins() {
    let config = parse(serve(&["--graceful-shutdown-timeout", "20"])).unwrap();
    assert_eq!(config.budget.drain, Duration::from_secs(20));
    let config = parse(serve(&[
        "--graceful-shutdown-timeout",
        "20",
        "--drain-timeout",
        "30",
    ]))
    .unwrap();
    assert_eq!(config.budget.drain, Duration::from_secs(30));
}

#[test]
fn a_drain_that_reaches_the_hard_deadline_is_refused() {
    let err = parse(serve(&["--shutdown-delay", "10", "--drain-timeout", "300"])).unwrap_err();
    assert_eq!(
        err.to_string(),
        "impossible shutdown budget: SHUTDOWN_DELAY (10s) + DRAIN_TIMEOUT (300s) must be less than \
         SHUTDOWN_TIMEOUT (310s), so open streams can be closed before the hard deadline"
    );
}

#[test]
fn a_deadline_past_the_grace_period_is_refused() {
    let err = parse(serve(&["--termination-grace-period", "30"])).unwrap_err();
    assert_eq!(
        err,
        ConfigError::TimeoutPastGracePeriod {
            timeout: 310.0,
            grace: 30.0
        }
    );
    assert!(parse(serve(&["--termination-grace-period", "330"])).is_ok());
}

#[test]
fn bad_model_and_limits_are_refused() {
    assert!(matches!(
        parse(serve(&["--ai-model", "nope"])),
        Err(ConfigError::DefaultModel(_))
    ));
    assert_eq!(
        parse(serve(&["--max-streams", "0"])).unwrap_err(),
        ConfigError::ZeroMaxStreams
    );
}

#[test]
fn the_store_is_sqlite_by_default_and_postgres_from_the_seed_settings() {
    let config = parse(serve(&[])).unwrap();
    assert_eq!(config.store.backend(), "sqlite");
    let seed = serve(&[
        "--db-host",
        "db",
        "--db-name",
        "agents",
        "--db-username",
        "u",
        "--db-password",
        "p@ss/w",
    ]);
    let StoreConfig::Postgres(options) = seed.config().unwrap().store else {
        panic!("DB_HOST selects PostgreSQL");
    };
    assert_eq!(options.get_host(), "db");
    assert_eq!(options.get_port(), 5432);
    assert_eq!(options.get_database(), Some("agents"));
    let url = serve(&[
        "--database-url",
        "postgres://u:p@h:6543/d",
        "--db-host",
        "ignored",
    ]);
    let StoreConfig::Postgres(options) = url.config().unwrap().store else {
        panic!("a postgres URL selects PostgreSQL");
    };
    assert_eq!((options.get_host(), options.get_port()), ("h", 6543));
}

#[test]
fn a_bad_database_setting_is_refused_without_echoing_it() {
    let err = parse(serve(&["--database-url", "mysql://u:secret@h/d"])).unwrap_err();
    assert_eq!(
        err.to_string(),
        "DATABASE_URL: must start with sqlite:// or postgres://"
    );
    assert!(!err.to_string().contains("secret"));
    let err = parse(serve(&["--db-host", "h", "--db-sslmode", "sometimes"])).unwrap_err();
    assert!(matches!(err, ConfigError::SslMode(_)));
    let err = parse(serve(&["--run-lease", "0.5"])).unwrap_err();
    assert_eq!(err, ConfigError::ShortLease);
}

#[test]
fn the_grpc_token_never_shows_in_debug_output() {
    let config = parse(serve(&["--internal-grpc-token", "hunter2"])).unwrap();
    assert_eq!(
        config.grpc_token.as_ref().map(Secret::expose),
        Some("hunter2")
    );
    assert!(!format!("{config:?}").contains("hunter2"));
}

#[test]
fn the_run_log_settings_have_their_documented_defaults() {
    let config = parse(serve(&[])).unwrap();
    assert_eq!(config.detach_grace, Duration::from_secs(30));
    assert_eq!(config.run_log_retention, Duration::from_secs(24 * 3600));
    let config = parse(serve(&[
        "--detach-grace",
        "0.5",
        "--run-log-retention",
        "15m",
    ]))
    .unwrap();
    assert_eq!(config.detach_grace, Duration::from_millis(500));
    assert_eq!(config.run_log_retention, Duration::from_secs(900));
}
