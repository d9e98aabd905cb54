//! agentd: an AI-agent service that streams runs as Server-Sent Events and shuts down without cutting a stream.
//!
//! # Layout
//!
//! | module | what it holds |
//! |---|---|
//! | [`cli`] | the client subcommands `agentd token` and `agentd chat` |
//! | [`config`] | command line and settings, parsed without side effects; the shutdown budget check |
//! | [`startup`] | build (bind, assemble state) and run until a signal |
//! | [`shutdown`] | signal → readiness off → delay → drain (deadline, progress logs) → close, in one place |
//! | [`stream_tracker`] | admission and counting of open streams, and the guard each response body owns |
//! | [`auth`] | scoped JWTs: `verify()`, the HTTP extractor, minting for `agentd token` |
//! | [`error`] | errors a client can see and their HTTP mapping |
//! | [`http`] | router, state, routes, and the accept loop |
//! | [`grpc`] | the internal gRPC API and its health service |
//! | [`model`] | the model trait and providers (the built-in `test` model) |
//! | [`agent`] | the run loop: model ↔ tools, events out |
//! | [`store`] | the session store: chats, messages, runs; SQLite and PostgreSQL |
//! | [`metrics`] | Prometheus metrics |
//! | [`telemetry`] | log setup |

pub mod agent;
pub mod auth;
pub mod cli;
pub mod config;
pub mod error;
pub mod grpc;
pub mod http;
pub mod metrics;
pub mod model;
pub mod shutdown;
pub mod startup;
pub mod store;
pub mod stream_tracker;
pub mod telemetry;
