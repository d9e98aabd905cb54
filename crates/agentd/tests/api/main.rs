//! The integration tests, as one binary (one link instead of seven): the real `agentd` binary on a free port, real
//! HTTP, SSE and gRPC clients, real signals, and both stores. `common` is the harness they share.

#[macro_use]
mod common;

mod auth;
mod cli;
mod compat;
mod deploy;
mod grpc;
mod handoff;
mod hardening;
mod http2;
mod layout;
mod page;
mod providers;
mod rolling;
mod runlog;
mod runs;
mod shutdown;
mod store;
mod stream;
