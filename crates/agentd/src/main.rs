//! The `agentd` binary: parse, set up logs, build, run until a signal, map the outcome to an exit code.

use std::process::ExitCode;

use agentd::config::{Cli, Command, Config, EXIT_CONFIG, MigrateArgs, ServeArgs};
use agentd::startup::Application;
use agentd::{shutdown, store, telemetry};
use clap::Parser;

fn main() -> ExitCode {
    let command = Cli::parse().command;
    telemetry::init(match &command {
        Command::Serve(args) => args.log_format,
        Command::Migrate(args) => args.log_format,
    });
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!(%error, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(async {
        match command {
            Command::Serve(args) => serve(*args).await,
            Command::Migrate(args) => migrate(args).await,
        }
    });
    // Whatever is left (idle tasks) is not waited for: the command already finished everything that matters.
    runtime.shutdown_background();
    code
}

fn config_error(error: impl std::fmt::Display) -> ExitCode {
    tracing::error!(%error, "refusing to start: invalid configuration");
    ExitCode::from(EXIT_CONFIG as u8)
}

async fn serve(args: ServeArgs) -> ExitCode {
    let config = match Config::from_args(args) {
        Ok(config) => config,
        Err(error) => return config_error(error),
    };
    let signals = match shutdown::os_signals() {
        Ok(signals) => signals,
        Err(error) => {
            tracing::error!(%error, "cannot listen for signals");
            return ExitCode::FAILURE;
        }
    };
    match Application::build(config).await {
        Ok(app) => {
            app.run(signals).await;
            ExitCode::SUCCESS
        }
        Err(error) => {
            tracing::error!(%error, "cannot start");
            ExitCode::FAILURE
        }
    }
}

async fn migrate(args: MigrateArgs) -> ExitCode {
    let config = match args.store.parse() {
        Ok(config) => config,
        Err(error) => return config_error(error),
    };
    match store::open(&config).await {
        Ok(store) => {
            store.close().await;
            tracing::info!(backend = config.backend(), "migrations applied");
            ExitCode::SUCCESS
        }
        Err(error) => {
            tracing::error!(backend = config.backend(), %error, "migrations failed");
            ExitCode::FAILURE
        }
    }
}
