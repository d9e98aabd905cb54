//! `bench`: open many SSE streams against agentd (or the reference) and report what happened, as JSON on stdout and
//! a short summary on stderr.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bench::{Plan, loopback_sources, raise_open_file_limit, run};
use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "bench",
    about = "SSE load generator: opens streams, parses events, reports latency, throughput and memory"
)]
struct Args {
    /// The server's HTTP address.
    #[arg(long, default_value = "127.0.0.1:8090")]
    target: SocketAddr,
    /// Streams to open.
    #[arg(long, default_value_t = 100)]
    streams: usize,
    /// New streams per second (0: as fast as possible).
    #[arg(long, default_value_t = 0.0)]
    ramp: f64,
    /// Streams in flight at once (default: all of them).
    #[arg(long)]
    concurrency: Option<usize>,
    /// Model id every stream asks for.
    #[arg(long, default_value = "test")]
    model: String,
    #[arg(long, default_value = "How are you?")]
    question: String,
    /// Bearer token to send.
    #[arg(long, env = "BENCH_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Keep the streams open this many seconds after all are open (or until all have ended), then stop
    /// (idle-capacity runs).
    #[arg(long)]
    hold: Option<f64>,
    /// Before the measured streams, open this many idle streams and keep them open (latency under load).
    #[arg(long, default_value_t = 0)]
    background: usize,
    /// Model of the background streams.
    #[arg(long, default_value = "test:deltas=1,delay_ms=3600000")]
    background_model: String,
    /// Stop opening streams after this many errors.
    #[arg(long, default_value_t = 100)]
    stop_after_errors: usize,
    /// Server process id, to read its memory.
    #[arg(long)]
    pid: Option<u32>,
    /// Comma-separated open-stream counts at which to read the server's memory (the ramp waits for each reading,
    /// then goes on at its rate).
    #[arg(long, value_delimiter = ',')]
    rss_at: Vec<usize>,
    /// Loopback source addresses to spread connections over (127.0.0.2 ...).
    #[arg(long, default_value_t = 8)]
    sources: usize,
    /// Seconds a stream may wait for its response head.
    #[arg(long, default_value_t = 30.0)]
    response_timeout: f64,
    /// GET this path on every stream instead of POSTing a question (attach to a finished run: a replay).
    #[arg(long)]
    path: Option<String>,
    /// POST to --target, then follow each run from this other replica's attach route, and measure that stream.
    #[arg(long)]
    follow_at: Option<SocketAddr>,
    /// With --follow-at: close the run's own stream (the client moved to the other replica) instead of draining it.
    #[arg(long)]
    leave_producer: bool,
    /// Each stream is a client that follows `reconnect` (and a lost connection) to its run's `done`, retrying 503s,
    /// and checks it saw every event once and the text equals the final answer (rolling restarts).
    #[arg(long)]
    follow_reconnect: bool,
    /// The server's gRPC address: make the chats there first (see --turns) for a token's caller, as the
    /// product's main application does. Needs --jwt-secret.
    #[arg(long, requires = "jwt_secret")]
    grpc: Option<SocketAddr>,
    /// With --grpc: how many questions each chat is asked, a conversation's length (at least one chat per stream in
    /// flight). One chat asked every question would make each run send the whole benchmark's history to the model.
    #[arg(long, default_value_t = 4)]
    turns: usize,
    /// Speak HTTP/2 without TLS (prior knowledge) to the server, this many streams per connection, as a load balancer
    /// speaking HTTP/2 to its backends does; without it each stream has its own HTTP/1.1 connection.
    #[arg(long)]
    h2_per_connection: Option<usize>,
    /// The server's JWT_SECRET, to mint the streams' token (with --grpc).
    #[arg(long, env = "BENCH_JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<String>,
}

/// The caller the benchmark's token speaks for, and the owner of its chats.
const CALLER: &str = "bench";

/// `n` chats made over gRPC at `grpc`, for [`CALLER`].
async fn make_chats(grpc: SocketAddr, n: usize) -> Arc<bench::ChatPool> {
    use agentd::grpc::proto::CreateAgentChatRequest;
    use agentd::grpc::proto::agents_client::AgentsClient;
    let mut client = AgentsClient::connect(format!("http://{grpc}"))
        .await
        .expect("the gRPC API answers");
    let mut ids = Vec::with_capacity(n);
    for _ in 0..n {
        let chat = client
            .create_agent_chat(CreateAgentChatRequest {
                org_id: CALLER.into(),
                canvas_id: CALLER.into(),
                user_id: CALLER.into(),
            })
            .await
            .expect("a chat is made")
            .into_inner()
            .chat
            .expect("the answer holds the chat");
        ids.push(chat.id.parse().expect("a chat id is a UUID"));
    }
    Arc::new(bench::ChatPool::new(ids))
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let fd_limit = raise_open_file_limit();
    eprintln!("bench: open-file limit {fd_limit}");
    let token = args.jwt_secret.as_deref().map(|secret| {
        agentd::auth::mint(
            &agentd::secret::Secret::new(secret),
            "superplane_api",
            CALLER,
            CALLER,
            CALLER,
            Duration::from_secs(3600),
        )
    });
    let chats = |n: usize| async move {
        match args.grpc {
            Some(grpc) => Some(make_chats(grpc, n).await),
            None => None,
        }
    };
    let h2 = args
        .h2_per_connection
        .map(|n| Arc::new(bench::H2Connections::new(n)));
    let plan = |streams, model: &str, hold, concurrency: Option<usize>| Plan {
        target: args.target,
        streams,
        ramp_per_sec: args.ramp,
        concurrency: concurrency.unwrap_or(streams).max(1),
        model: model.to_owned(),
        question: args.question.clone(),
        sources: loopback_sources(args.sources),
        bearer: token.clone().or_else(|| args.token.clone()),
        hold,
        stop_after_errors: args.stop_after_errors,
        server_pid: args.pid,
        rss_checkpoints: args.rss_at.clone(),
        response_timeout: Duration::from_secs_f64(args.response_timeout),
        settled: None,
        path: None,
        follow_at: None,
        leave_producer: false,
        follow_reconnect: false,
        chats: None,
        h2: h2.clone(),
    };
    let background = if args.background > 0 {
        let settled = Arc::new(AtomicUsize::new(0));
        let mut background = plan(args.background, &args.background_model, None, None);
        background.rss_checkpoints.clear();
        background.ramp_per_sec = 0.0;
        background.settled = Some(Arc::clone(&settled));
        let handle = tokio::spawn(run(Plan {
            hold: Some(Duration::from_secs(3600)),
            chats: chats(args.background).await,
            ..background
        }));
        eprintln!("bench: opening {} background streams", args.background);
        // Measure only once every background stream is open (or failed), and the server has settled.
        while settled.load(Ordering::Relaxed) < args.background {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        Some(handle)
    } else {
        None
    };
    let limit = if fd_limit < args.streams as u64 + args.background as u64 + 64 {
        eprintln!(
            "bench: warning: the open-file limit ({fd_limit}) is below the streams asked for; it will stop the run"
        );
        true
    } else {
        false
    };
    let report = run(Plan {
        path: args.path.clone(),
        follow_at: args.follow_at,
        leave_producer: args.leave_producer,
        follow_reconnect: args.follow_reconnect,
        chats: chats(
            args.concurrency
                .unwrap_or(args.streams)
                .max(args.streams.div_ceil(args.turns.max(1)))
                .max(1),
        )
        .await,
        ..plan(
            args.streams,
            &args.model,
            args.hold.map(Duration::from_secs_f64),
            args.concurrency,
        )
    })
    .await;
    if let Some(background) = background {
        background.abort();
    }
    eprintln!(
        "bench: {} requested, {} started, {} done, max open {}, errors {:?}, {:.0} events/s, run_started p50 {:.2} ms p99 {:.2} ms, delivery p99 {:.2} ms, stopped by: {}{}",
        report.requested,
        report.started,
        report.done,
        report.max_open,
        report.errors,
        report.events_per_sec,
        report.to_run_started_ms.p50,
        report.to_run_started_ms.p99,
        report.delta_delivery_ms.p99,
        report.stopped_by,
        if limit {
            " (client open-file limit)"
        } else {
            ""
        }
    );
    if let Some(h2) = &h2 {
        eprintln!(
            "bench: {} HTTP/2 connections to the server",
            h2.opened().await
        );
    }
    println!(
        "{}",
        serde_json::to_string(&report).expect("a report serializes")
    );
}
