//! The `agentd` binary: parse, set up logs, build, run until a signal, map the outcome to an exit code.

use std::process::ExitCode;

use agentd::config::{Cli, Command, Config, EXIT_CONFIG, ServeArgs};
use agentd::startup::Application;
use agentd::{shutdown, telemetry};
use clap::Parser;

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Serve(args) => serve(args),
    }
}

fn serve(args: ServeArgs) -> ExitCode {
    telemetry::init(args.log_format);
    let config = match Config::from_args(args) {
        Ok(config) => config,
        Err(error) => {
            tracing::error!(%error, "refusing to start: invalid configuration");
            return ExitCode::from(EXIT_CONFIG as u8);
        }
    };
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
    });
    // Whatever is left (idle tasks) is not waited for: the sequence already finished everything that matters.
    runtime.shutdown_background();
    code
}
