//! haproxy from Debian in front of agentd replicas, as a deployment has it: `/readyz` health checks every 200 ms, and
//! timeouts long enough for streams. Installed by the harness when missing, so a fresh machine runs the tests.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::Duration;

use tokio::process::{Child, Command};

use super::{Agentd, PATIENCE};

pub struct Haproxy {
    _child: Child,
    _dir: tempfile::TempDir,
    /// `http://<addr>` of the frontend.
    pub base: String,
}

impl Haproxy {
    /// Starts haproxy balancing over `backends` (`host:port`), and waits until it serves through one of them.
    pub async fn start(backends: &[SocketAddr]) -> Self {
        Self::configured(backends, "", "").await
    }

    /// The same, speaking HTTP/2 to the backends (`proto h2`), where every client's streams may share a connection
    /// (`http-reuse always`; by default haproxy gives each client's first request a connection of its own).
    pub async fn start_http2(backends: &[SocketAddr]) -> Self {
        Self::configured(backends, " proto h2", "    http-reuse always\n").await
    }

    async fn configured(backends: &[SocketAddr], server: &str, backend: &str) -> Self {
        let bin = installed();
        let dir = tempfile::tempdir().unwrap();
        let port = super::free_port();
        let servers: String = backends
            .iter()
            .enumerate()
            .map(|(i, addr)| format!("    server agentd{i} {addr} check{server}\n"))
            .collect();
        let config = format!(
            "global\n    maxconn 8192\n\n\
             defaults\n    mode http\n    timeout connect 2s\n    timeout client 120s\n    timeout server 120s\n    \
             timeout http-request 10s\n    retries 3\n    option redispatch\n\n\
             frontend agents\n    bind 127.0.0.1:{port}\n    default_backend agentd\n\n\
             backend agentd\n    balance roundrobin\n    option httpchk GET /readyz\n    \
             http-check expect status 200\n    default-server inter 200ms fall 1 rise 1\n{backend}{servers}"
        );
        let file = dir.path().join("haproxy.cfg");
        std::fs::write(&file, config).unwrap();
        let child = Command::new(bin)
            .args(["-db", "-f"])
            .arg(&file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("haproxy starts");
        let lb = Self {
            _child: child,
            _dir: dir,
            base: format!("http://127.0.0.1:{port}"),
        };
        let deadline = tokio::time::Instant::now() + PATIENCE;
        let http = reqwest::Client::new();
        loop {
            let ready = http.get(format!("{}/readyz", lb.base)).send().await;
            if ready.is_ok_and(|r| r.status() == 200) {
                return lb;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "haproxy never served"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Two replicas on the store at `database_url`, in `handoff` mode with a one-second drain, each on a port of its own,
/// with `extra` settings besides: the pair a handoff behind haproxy needs. Their addresses, for haproxy, and them.
pub async fn handoff_replicas(
    database_url: &str,
    extra: &[(&str, &str)],
) -> (Vec<SocketAddr>, Vec<Agentd>) {
    let addrs: Vec<SocketAddr> = (0..2)
        .map(|_| format!("127.0.0.1:{}", super::free_port()).parse().unwrap())
        .collect();
    let mut replicas = Vec::new();
    for addr in &addrs {
        let addr = addr.to_string();
        let mut env = vec![
            ("HTTP_ADDR", addr.as_str()),
            ("SHUTDOWN_MODE", "handoff"),
            // Longer than haproxy takes to see /readyz fail (200 ms checks).
            ("SHUTDOWN_DELAY", "0.6"),
            ("DRAIN_TIMEOUT", "1"),
            ("SHUTDOWN_TIMEOUT", "10"),
            ("RUN_LEASE", "2"),
        ];
        env.extend_from_slice(extra);
        replicas.push(Agentd::spawn_on(database_url, &env).await);
    }
    (addrs, replicas)
}

/// The haproxy binary; installs Debian's package first when there is none.
pub fn installed() -> &'static PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        super::apt::installed(
            &["haproxy"],
            &[
                "/usr/sbin/haproxy",
                "/usr/bin/haproxy",
                "/usr/local/sbin/haproxy",
            ],
        )
    })
}
