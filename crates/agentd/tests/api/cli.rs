//! `agentd chat` follows its run through a lost connection and stops it on Ctrl-C, against the real binary.

use std::process::Stdio;

use agentd::store::RunStatus;
use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};
use uuid::Uuid;

use crate::common::db::TestDb;
use crate::common::{Agentd, PATIENCE, free_port, new_chat};

/// `agentd chat` against `url`, in chat `chat`, its output piped.
fn chat(url: &str, chat: &str, model: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_agentd"))
        .args(["chat", "--url", url, "--chat", chat, "--model", model, "q"])
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// Reads the child's stdout until it has at least `n` bytes.
async fn read_at_least(child: &mut Child, n: usize, out: &mut Vec<u8>) {
    let stdout = child.stdout.as_mut().unwrap();
    let mut buf = [0u8; 256];
    tokio::time::timeout(PATIENCE, async {
        while out.len() < n {
            let read = stdout.read(&mut buf).await.unwrap();
            assert!(read > 0, "stdout closed early");
            out.extend_from_slice(&buf[..read]);
        }
    })
    .await
    .expect("output in time");
}

/// Waits for the child to exit; its exit code, all of its stdout and its stderr.
async fn finish(mut child: Child, mut out: Vec<u8>) -> (Option<i32>, String, String) {
    let mut rest = Vec::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_end(&mut rest)
        .await
        .unwrap();
    out.extend(rest);
    let mut err = Vec::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_end(&mut err)
        .await
        .unwrap();
    let status = tokio::time::timeout(PATIENCE, child.wait())
        .await
        .expect("agentd chat exits")
        .unwrap();
    (
        status.code(),
        String::from_utf8(out).unwrap(),
        String::from_utf8_lossy(&err).into_owned(),
    )
}

#[tokio::test]
async fn agentd_chat_follows_its_run_to_the_end_when_the_producer_is_killed_and_another_takes_over()
{
    let db = TestDb::sqlite();
    let addr = format!("127.0.0.1:{}", free_port());
    let env = [("HTTP_ADDR", addr.as_str()), ("RUN_LEASE", "2")];
    let mut first = Agentd::spawn_on(db.url(), &env).await;
    let chat_id = new_chat();
    let mut child = chat(
        &format!("http://{addr}"),
        &chat_id,
        "test:deltas=150,delay_ms=20",
    );
    let mut out = Vec::new();
    read_at_least(&mut child, 40, &mut out).await;

    // The producer dies mid-answer; a new process on the same address and store takes the run over once its lease
    // ran out, for the client that re-attached, and continues it at the next delta.
    first.kill().await;
    let _second = Agentd::spawn_on(db.url(), &env).await;
    let (code, stdout, stderr) = finish(child, out).await;
    assert_eq!(code, Some(0), "{stderr}");

    // What it printed is the whole answer, once, as stored.
    let store = db.open().await;
    let chat_id = chat_id.parse().unwrap();
    let run_id = store.messages(chat_id).await.unwrap()[0].run_id.unwrap();
    let run = store.get_run(run_id).await.unwrap().unwrap();
    assert_eq!(run.status, RunStatus::Completed);
    assert_eq!(run.epoch, 2, "claimed once");
    let expected: String = (0..150).map(agentd::model::delta_text).collect();
    assert_eq!(run.output, expected);
    assert_eq!(stdout.trim_end(), expected);
}

#[tokio::test]
async fn agentd_chat_follows_a_handoff_to_the_next_process_and_prints_no_text_twice() {
    let db = TestDb::sqlite();
    let addr = format!("127.0.0.1:{}", free_port());
    let env = [
        ("HTTP_ADDR", addr.as_str()),
        ("SHUTDOWN_MODE", "handoff"),
        ("DRAIN_TIMEOUT", "1"),
        ("RUN_LEASE", "5"),
    ];
    let mut first = Agentd::spawn_on(db.url(), &env).await;
    let chat_id = new_chat();
    let mut child = chat(
        &format!("http://{addr}"),
        &chat_id,
        "test:deltas=150,delay_ms=20",
    );
    let mut out = Vec::new();
    read_at_least(&mut child, 40, &mut out).await;

    // The replica hands the stream over (reconnect) and releases the run; the next process continues it.
    first.signal("TERM");
    assert!(first.exit_status().await.success());
    let _second = Agentd::spawn_on(db.url(), &env).await;
    let (code, stdout, stderr) = finish(child, out).await;
    assert_eq!(code, Some(0), "{stderr}");
    let expected: String = (0..150).map(agentd::model::delta_text).collect();
    assert_eq!(stdout.trim_end(), expected);
}

#[tokio::test]
async fn ctrl_c_in_agentd_chat_cancels_the_run_and_prints_its_end() {
    let db = TestDb::sqlite();
    let server = Agentd::spawn_on(db.url(), &[]).await;
    let chat_id = new_chat();
    let mut child = chat(&server.base, &chat_id, "test:deltas=1000,delay_ms=20");
    let mut out = Vec::new();
    read_at_least(&mut child, 20, &mut out).await;
    let status = std::process::Command::new("kill")
        .args(["-INT", &child.id().unwrap().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let (code, _, stderr) = finish(child, out).await;
    assert_eq!(code, Some(75), "{stderr}");
    assert!(stderr.contains("cancelling the run"), "{stderr}");
    assert!(stderr.contains("interrupted (cancelled)"), "{stderr}");
    let store = db.open().await;
    let run: Uuid = store.messages(chat_id.parse().unwrap()).await.unwrap()[0]
        .run_id
        .unwrap();
    let stored = store.get_run(run).await.unwrap().unwrap();
    assert_eq!(stored.status, RunStatus::Interrupted);
    assert_eq!(stored.error.as_deref(), Some("the run was cancelled"));
}
