//! Build (bind the listener, open and migrate the store, assemble the state) and run until a signal ends the service.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::mpsc;

use uuid::Uuid;

use crate::config::{ClientCompat, Config, EXIT_CONFIG, ShutdownMode};
use crate::grpc;
use crate::http::{self, AppState};
use crate::instructions::{Instructions, OutputSchema};
use crate::metrics::Metrics;
use crate::model::FINAL_ANSWER_TOOL;
use crate::model::Providers;
use crate::runs::log::{self as run_log, RunLog};
use crate::runs::{RunService, RunServiceParts, lease};
use crate::secret::Secret;
use crate::shutdown::{self, Lifecycle, Shutdown, Signal};
use crate::stages::{Component, Stage, Stages};
use crate::store::{self, StoreError};
use crate::stream_tracker::StreamTracker;
use crate::telemetry;
use crate::tools::ToolRegistry;

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("cannot listen for HTTP on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot listen for gRPC on {addr}: {source}")]
    BindGrpc {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot open the {backend} session store: {source}")]
    Store {
        backend: &'static str,
        source: StoreError,
    },
    #[error("TOOLS_FILE: {0}")]
    Tools(String),
    #[error("AGENT_INSTRUCTIONS: {0}")]
    Instructions(String),
    #[error("OUTPUT_SCHEMA: {0}")]
    OutputSchema(String),
}

impl StartupError {
    /// The process exit code: a configuration that cannot work is [`EXIT_CONFIG`]; the rest may pass on a retry.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Tools(_) | Self::Instructions(_) | Self::OutputSchema(_) => EXIT_CONFIG,
            _ => 1,
        }
    }
}

/// File descriptors kept for everything but client connections: listeners, the store's pool, gRPC, logs.
const RESERVED_FDS: u64 = 128;

/// Connections a listener keeps waiting to be accepted (the kernel caps it at `net.core.somaxconn`). With the usual
/// 128, a larger burst of new connections (clients coming back after a deploy, a crowd arriving at once) has its
/// connection requests dropped, and each client whose request was dropped waits a second or more to send it again.
const BACKLOG: u32 = 4096;

/// A listener on `addr` with [`BACKLOG`].
fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // As the standard listener does: a restarted server binds the port its predecessor's closed connections still
    // name.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// Raises the soft open-file limit to the hard one (each open stream holds a socket) and returns the limit in force.
fn raise_open_file_limit() -> u64 {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => limit,
        Err(error) => {
            let limit = rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(soft, _)| soft);
            tracing::warn!(%error, open_file_limit = limit, "could not raise the open-file limit");
            limit
        }
    }
}

/// A service that is bound and ready to run.
#[derive(Debug)]
pub struct Application {
    config: Config,
    listener: TcpListener,
    grpc_listener: TcpListener,
    state: AppState,
    /// Every component the shutdown stops, registered here in its stage.
    stages: Stages,
    http: Component,
    grpc: Component,
    leases: Component,
}

impl Application {
    pub async fn build(config: Config) -> Result<Self, StartupError> {
        // Read before anything binds, so a bad file fails the start cleanly.
        let tools = match &config.tools_file {
            Some(path) => ToolRegistry::load(path).map_err(StartupError::Tools)?,
            None => ToolRegistry::default(),
        };
        let instructions = config
            .instructions_file
            .as_deref()
            .map(Instructions::load)
            .transpose()
            .map_err(StartupError::Instructions)?;
        let output_schema = config
            .output_schema_file
            .as_deref()
            .map(OutputSchema::load)
            .transpose()
            .map_err(StartupError::OutputSchema)?;
        if output_schema.is_some() && tools.get(FINAL_ANSWER_TOOL).is_some() {
            return Err(StartupError::Tools(format!(
                "the tool name {FINAL_ANSWER_TOOL:?} is reserved when OUTPUT_SCHEMA is set"
            )));
        }
        let addr = config.http_addr;
        let listener = bind(addr).map_err(|source| StartupError::Bind { addr, source })?;
        let grpc_addr = config.grpc_addr;
        let grpc_listener = bind(grpc_addr).map_err(|source| StartupError::BindGrpc {
            addr: grpc_addr,
            source,
        })?;
        let backend = config.store.backend();
        let mut store = store::open(&config.store)
            .await
            .map_err(|source| StartupError::Store { backend, source })?;
        if let Err(error) = store.warm_up().await {
            // Only the first requests pay for it: each connection gets ready on its first use instead.
            tracing::warn!(%error, "the store's connections could not all be readied before serving");
        }
        let instance_id: Arc<str> = Uuid::new_v4().to_string().into();
        tracing::info!(backend, %instance_id, "session store ready");
        let fd_limit = raise_open_file_limit();
        let descriptors =
            usize::try_from(fd_limit.saturating_sub(RESERVED_FDS)).unwrap_or(usize::MAX);
        let max_streams = config
            .max_streams
            .map_or(descriptors, |limit| limit.min(descriptors));
        tracing::info!(
            open_file_limit = fd_limit,
            max_streams,
            stream_descriptors = descriptors,
            "stream admission limit set (a stream from a provider over HTTP/1.1 holds two descriptors)"
        );
        let mut stages = Stages::default();
        let closing = stages.register(Stage::Store, "store", None);
        let (stop, to_close) = (closing.stop.clone(), store.clone());
        closing.spawn(async move {
            stop.cancelled().await;
            to_close.close().await;
        });
        let metrics = Arc::new(
            Metrics::default()
                .with_store(store.pool_waits())
                .with_log(telemetry::dropped_lines()),
        );
        let tracker = StreamTracker::with_descriptors(Some(max_streams), Some(descriptors));
        let (log, queue) = RunLog::new(store.clone(), Arc::clone(&metrics));
        // The writer stops after the runs and the servers: followers still waiting for a `done` get it.
        let writer = stages.register(Stage::Background, "run log writer", None);
        // Both on the runtime of the store's queues of run starts and ends (see `runtime::for_store`).
        let queues = store.runtime();
        writer.spawn_on(
            run_log::write(log.clone(), queue, writer.stop.clone()),
            &queues,
        );
        let notifications = stages.register(Stage::Background, "run log listener", None);
        notifications.spawn_on(
            run_log::listen(log.clone(), notifications.stop.clone()),
            &queues,
        );
        let runs = RunService::new(
            RunServiceParts {
                store: store.clone(),
                log,
                providers: Providers::new(
                    config.providers.openai.clone(),
                    config.providers.anthropic.clone(),
                    config.providers.connect_timeout,
                    config.providers.idle_timeout,
                ),
                tools,
                models: config.models.clone(),
                metrics: Arc::clone(&metrics),
                tracker: tracker.clone(),
                max_steps: config.max_steps,
                instance_id,
                detach_grace: config.detach_grace,
                lease: config.run_lease,
                handoff: config.budget.mode == ShutdownMode::Handoff,
                seed_clients: config.client_compat == ClientCompat::Seed,
                instructions,
                output_schema,
            },
            stages.register(Stage::Runs, "runs", None),
        );
        let http = stages.register(Stage::Servers, "http", None);
        let grpc = stages.register(Stage::Servers, "grpc", Some(config.grpc_grace));
        let leases = stages.register(Stage::Background, "leases", None);
        let state = AppState {
            runs,
            lifecycle: Arc::new(Lifecycle::default()),
            tracker,
            metrics,
            store,
            auth: Arc::new(config.auth.clone()),
        };
        Ok(Self {
            config,
            listener,
            grpc_listener,
            state,
            stages,
            http,
            grpc,
            leases,
        })
    }

    /// The bound HTTP address (the real port when the configured one was 0).
    pub fn http_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// The bound gRPC address.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Serves until the first signal, then runs the shutdown sequence to its end.
    pub async fn run(self, mut signals: mpsc::Receiver<Signal>) -> shutdown::Outcome {
        let http_addr = self.http_addr();
        let grpc_addr = self.grpc_addr();
        let Self {
            config,
            listener,
            grpc_listener,
            state,
            stages,
            http,
            grpc,
            leases,
        } = self;
        let router = http::router(state.clone(), &config.cors_origins);
        http.spawn(http::server::serve(
            listener,
            router,
            http.stop.clone(),
            state.lifecycle.handoff.clone(),
            http.tasks.clone(),
        ));
        if config.auth.secret.is_none() {
            tracing::warn!(
                "dev mode: JWT_SECRET is unset, so streams need no token and only the test model runs"
            );
        }
        grpc::warn_if_open(grpc_addr, config.grpc_token.as_ref().map(Secret::expose));
        let (grpc_health, health_service) = grpc::health().await;
        let served = grpc::serve(
            grpc_listener,
            state.store.clone(),
            config.grpc_token.as_ref().map(|t| t.expose().to_owned()),
            health_service,
            grpc.stop.clone(),
        );
        grpc.spawn(async move {
            if let Err(error) = served.await {
                tracing::error!(%error, "the gRPC server failed");
            }
        });
        leases.spawn(lease::maintain(
            state.runs.clone(),
            config.run_lease,
            config.run_log_retention,
            leases.stop.clone(),
        ));
        tracing::info!(%http_addr, %grpc_addr, default_model = %config.default_model, "agentd is serving");

        let Some(first) = signals.recv().await else {
            tracing::warn!("signal listener ended; shutting down");
            return shutdown::Outcome::Clean;
        };
        let shutdown = Shutdown {
            lifecycle: state.lifecycle,
            tracker: state.tracker,
            metrics: state.metrics,
            live_runs: state.runs.live().clone(),
            grpc_health,
            stages: Arc::new(stages),
            store: state.store,
        };
        shutdown.run(config.budget, first, &mut signals).await
    }
}
