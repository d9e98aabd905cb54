//! agentd: an AI-agent service that streams runs as Server-Sent Events and shuts down without cutting a stream.
//!
//! # Layout
//!
//! Imports run one way, top to bottom: main → startup → {http, grpc, shutdown, cli} → {runs, web} → {model, tools, auth,
//! store} → {error, secret, stages, sse, json, runtime}. Nothing lower imports anything higher.
//!
//! | module | what it holds |
//! |---|---|
//! | [`cli`] | the clap tree of every subcommand, `serve`'s arguments → [`config::Config`], and the clients `token`, `chat` |
//! | [`config`] | typed settings, with the checks that need no I/O (the shutdown budget); never imports `cli` |
//! | [`startup`] | build (load the tools file, bind, open the store, assemble the run service) and run until a signal |
//! | [`shutdown`] | signal → readiness off → delay → drain (deadline, progress logs) → close, in one place |
//! | [`stages`] | the components shutdown stops, registered at build time in ordered stages |
//! | [`runtime`] | the async runtimes: the workers, and the store's own thread for PostgreSQL's queues |
//! | [`http`] | router, state, thin routes, the token extractor, HTTP errors, and the accept loop |
//! | [`grpc`] | the internal gRPC API and its health service |
//! | [`runs`] | the run service (start, attach, cancel, history), the SSE events and their ids, the run log (group commit, in-memory fan-out, LISTEN/NOTIFY), followers (replay then follow), the engine (model ↔ tools), the recorder (what is stored when), leases |
//! | [`stream_tracker`] | admission and counting of open streams, and the guard each response body owns |
//! | [`model`] | the model trait and providers (the built-in `test` model, OpenAI-compatible, Anthropic) |
//! | [`tools`] | the tool registry, the built-in tool, HTTP tools, JSON Schema checks of arguments |
//! | [`instructions`] | the agent's instructions template (`AGENT_INSTRUCTIONS`) and output schema (`OUTPUT_SCHEMA`) |
//! | [`auth`] | scoped JWTs: `verify()` and minting, free of HTTP |
//! | [`store`] | the session store: chats, messages, runs; SQLite and PostgreSQL |
//! | [`metrics`] | Prometheus metrics |
//! | [`error`] | the table of error codes: HTTP status, gRPC code, retryable |
//! | [`sse`] | reading a Server-Sent Events stream in linear time (provider answers, `agentd chat`) |
//! | [`json`] | JSON string text scanned eight bytes at a time |
//! | [`secret`] | the one type that holds secrets; its `Debug` hides them |
//! | [`telemetry`] | log setup, and the thread that writes the lines so that a stalled stderr holds up nothing |
//! | [`web`] | the web chat page served at `/`: its HTML, CSS and JavaScript, embedded, and the settings rendered into it |

pub mod auth;
pub mod cli;
pub mod config;
pub mod error;
pub mod grpc;
pub mod http;
pub mod instructions;
pub mod json;
pub mod metrics;
pub mod model;
pub mod runs;
pub mod runtime;
pub mod secret;
pub mod shutdown;
pub mod sse;
pub mod stages;
pub mod startup;
pub mod store;
pub mod stream_tracker;
pub mod telemetry;
pub mod tools;
pub mod web;
