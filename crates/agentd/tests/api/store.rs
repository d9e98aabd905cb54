//! One store test suite, run against SQLite and against a real PostgreSQL.

use std::time::Duration;

use crate::common::db::{TestDb, runs_of, until_statements_wait_for_locks};
use crate::common::{Agentd, PATIENCE, new_chat, types};
use agentd::model::{Message, ToolCall, Usage};
use agentd::store::{
    Chat, ChatOwner, EVENTS_CHANNEL, LogRow, NewRun, RECORD_SEPARATOR, RELEASED_CHANNEL, RunEnd,
    RunStatus, STALE_RUN_ERROR, SessionStore, StoreError,
};
use serde_json::json;
use uuid::Uuid;

on_both_backends!(
    the_run_log_keeps_events_in_order_and_sweeps_only_finished_runs,
    a_sweep_goes_through_thousands_of_finished_runs_and_reads_on_from_where_it_got,
    chats_are_created_found_listed_newest_first_and_deleted,
    a_run_stores_its_prompt_then_its_messages_in_order,
    runs_go_through_every_status_and_add_to_the_chat_totals,
    deleting_a_chat_deletes_its_messages_runs_and_run_log,
    a_run_needs_an_existing_chat,
    a_run_starts_only_in_a_chat_of_the_owner_it_names,
    a_start_that_fails_part_way_writes_nothing_and_the_store_writes_on,
    a_start_can_make_its_chat_and_leaves_another_owners_alone,
    stale_runs_are_interrupted_and_live_ones_are_not,
    a_heartbeat_of_more_runs_than_one_statement_refreshes_each,
    concurrent_starts_on_one_chat_admit_exactly_one,
    starts_arriving_together_each_get_their_own_answer,
    ends_arriving_together_each_get_their_own_answer,
    releases_arriving_together_each_get_their_own_answer,
    a_claim_fences_the_old_producer_and_exactly_one_claimer_wins,
    a_followed_run_is_left_for_a_takeover_and_a_released_one_is_claimable_at_once,
    agentd_serves_a_store_a_newer_agentd_migrated,
);

fn owner(org: &str, user: &str, canvas: &str) -> ChatOwner {
    ChatOwner {
        org_id: org.into(),
        user_id: user.into(),
        canvas_id: canvas.into(),
    }
}

/// A run in a chat of o/u/c, whose chats the tests start runs in.
fn new_run(chat_id: Uuid, prompt: &str) -> NewRun {
    NewRun {
        id: Uuid::new_v4(),
        chat_id,
        owner: owner("o", "u", "c"),
        model: "test".into(),
        owner_instance: "instance-a".into(),
        prompt: prompt.into(),
        first_event: None,
        agent_context: None,
    }
}

/// The seqs of the events the store holds for run `run_id`, in order.
async fn stored_seqs(store: &SessionStore, run_id: Uuid) -> Vec<u64> {
    let events = store.events_of(run_id).await.unwrap();
    events.into_iter().map(|(seq, _)| seq).collect()
}

/// A new chat of o/u/c with a run started in it.
async fn started_run(store: &SessionStore) -> (Chat, NewRun) {
    let chat = store.create_chat(&owner("o", "u", "c")).await.unwrap();
    let run = new_run(chat.id, "q");
    store.start_run(&run).await.unwrap();
    (chat, run)
}

fn end(status: RunStatus, output: &str, usage: Usage, messages: Vec<Message>) -> RunEnd {
    RunEnd {
        status,
        error: (status != RunStatus::Completed).then(|| format!("{status} on purpose")),
        output: output.into(),
        usage,
        messages,
    }
}

/// A completed run's end: `text` as its answer and its only message, one token each way.
fn answered(text: &str) -> RunEnd {
    end(
        RunStatus::Completed,
        text,
        Usage::new(1, 1),
        vec![assistant(text)],
    )
}

fn user(text: &str) -> Message {
    Message::User {
        content: text.into(),
    }
}

fn assistant(text: &str) -> Message {
    Message::Assistant {
        content: text.into(),
        tool_calls: vec![],
    }
}

async fn chats_are_created_found_listed_newest_first_and_deleted(db: TestDb) {
    let store = db.open().await;
    let mine = owner("org", "alice", "canvas");
    let first = store.create_chat(&mine).await.unwrap();
    let second = store.create_chat(&mine).await.unwrap();
    let other_user = store
        .create_chat(&owner("org", "bob", "canvas"))
        .await
        .unwrap();
    store
        .create_chat(&owner("org", "alice", "other-canvas"))
        .await
        .unwrap();

    assert_eq!(first.owner, mine);
    assert_eq!(first.initial_message, None);
    assert_eq!(first.totals, Usage::default());
    assert_eq!(store.get_chat(first.id).await.unwrap(), Some(first.clone()));
    assert_eq!(store.get_chat(Uuid::new_v4()).await.unwrap(), None);

    let listed: Vec<Uuid> = store
        .list_chats(&mine)
        .await
        .unwrap()
        .iter()
        .map(|c| c.id)
        .collect();
    assert_eq!(listed, [second.id, first.id]);
    assert!(
        store
            .list_chats(&owner("org", "nobody", "canvas"))
            .await
            .unwrap()
            .is_empty()
    );

    assert!(store.delete_chat(first.id).await.unwrap());
    assert!(!store.delete_chat(first.id).await.unwrap());
    assert_eq!(store.get_chat(first.id).await.unwrap(), None);
    assert!(store.get_chat(other_user.id).await.unwrap().is_some());
    store.close().await;
}

async fn a_run_stores_its_prompt_then_its_messages_in_order(db: TestDb) {
    let store = db.open().await;
    let chat = store.create_chat(&owner("o", "u", "c")).await.unwrap();
    let run = new_run(chat.id, "What time is it?");
    let history = store.start_run(&run).await.unwrap();
    assert!(history.is_empty(), "a first run starts from nothing");

    let stored = store.get_run(run.id).await.unwrap().unwrap();
    assert_eq!(stored.status, RunStatus::Running);
    assert_eq!(stored.owner_instance, "instance-a");
    assert_eq!(stored.output, "");
    let chat_now = store.get_chat(chat.id).await.unwrap().unwrap();
    assert_eq!(
        chat_now.initial_message.as_deref(),
        Some("What time is it?")
    );

    store.save_partial(run.id, "It is").await.unwrap();
    assert_eq!(
        store.get_run(run.id).await.unwrap().unwrap().output,
        "It is"
    );

    let call = ToolCall {
        id: "call_1".into(),
        name: "current_time".into(),
        args: json!({}),
    };
    let answer = vec![
        Message::Assistant {
            content: String::new(),
            tool_calls: vec![call],
        },
        Message::ToolResult {
            tool_call_id: "call_1".into(),
            content: "{\"utc\":\"now\"}".into(),
        },
        // Stored as it was written: quotes, a line break, accents and an emoji.
        assistant("It is now: \"12:00\"\n\u{e9}t\u{e9} \u{1F550} \\ ok."),
    ];
    let usage = Usage::new(10, 4);
    store
        .finish_run(
            run.id,
            1,
            &end(RunStatus::Completed, "It is now.", usage, answer.clone()),
        )
        .await
        .unwrap();

    let messages = store.messages(chat.id).await.unwrap();
    let indexes: Vec<i64> = messages.iter().map(|m| m.index).collect();
    assert_eq!(indexes, [0, 1, 2, 3]);
    assert_eq!(
        messages[0].message,
        Message::User {
            content: "What time is it?".into()
        }
    );
    let rest: Vec<Message> = messages[1..].iter().map(|m| m.message.clone()).collect();
    assert_eq!(rest, answer);
    if let TestDb::Sqlite { url, .. } = &db {
        // SQLite keeps the text: each message's is the JSON agentd writes of it.
        use sqlx::Connection;
        let mut conn = sqlx::SqliteConnection::connect(url).await.unwrap();
        let texts: Vec<String> = sqlx::query_scalar(
            "SELECT message FROM agent_chat_messages WHERE chat_id = $1 AND message_index > 0 \
             ORDER BY message_index",
        )
        .bind(chat.id.to_string())
        .fetch_all(&mut conn)
        .await
        .unwrap();
        let written: Vec<String> = answer
            .iter()
            .map(|m| serde_json::to_string(m).unwrap())
            .collect();
        assert_eq!(texts, written);
    }
    assert!(messages.iter().all(|m| m.run_id == Some(run.id)));

    // A second prompt does not replace the initial message, and its run goes on from everything before it.
    let history = store
        .start_run(&new_run(chat.id, "And tomorrow?"))
        .await
        .unwrap();
    let before: Vec<Message> = messages.iter().map(|m| m.message.clone()).collect();
    assert_eq!(history, before);
    let chat_now = store.get_chat(chat.id).await.unwrap().unwrap();
    assert_eq!(
        chat_now.initial_message.as_deref(),
        Some("What time is it?")
    );
    assert_eq!(store.messages(chat.id).await.unwrap()[4].index, 4);
    store.close().await;
}

async fn runs_go_through_every_status_and_add_to_the_chat_totals(db: TestDb) {
    let store = db.open().await;
    let chat = store.create_chat(&owner("o", "u", "c")).await.unwrap();
    let mut ids = Vec::new();
    for (status, usage) in [
        (RunStatus::Completed, Usage::new(10, 5)),
        (RunStatus::Failed, Usage::new(3, 1)),
        (RunStatus::Interrupted, Usage::new(2, 2)),
    ] {
        let run = new_run(chat.id, "q");
        store.start_run(&run).await.unwrap();
        let messages = if status == RunStatus::Completed {
            vec![assistant("partial answer")]
        } else {
            vec![]
        };
        store
            .finish_run(run.id, 1, &end(status, "partial answer", usage, messages))
            .await
            .unwrap();
        ids.push((run.id, status));
    }
    let runs = runs_of(&store, chat.id).await;
    assert_eq!(runs.len(), 3);
    for (run, (id, status)) in runs.iter().zip(&ids) {
        assert_eq!((run.id, run.status), (*id, *status));
        assert_eq!(run.output, "partial answer");
        assert!(run.finished_at.is_some());
        match status {
            RunStatus::Completed => assert_eq!(run.error, None),
            _ => assert_eq!(
                run.error.as_deref(),
                Some(format!("{status} on purpose").as_str())
            ),
        }
    }
    assert_eq!(runs[0].usage, Usage::new(10, 5));
    let chat = store.get_chat(chat.id).await.unwrap().unwrap();
    assert_eq!(chat.totals, Usage::new(15, 8));
    assert_eq!(chat.latest_run_status, Some(RunStatus::Interrupted));
    let other = store.create_chat(&owner("o", "u2", "c")).await.unwrap();
    assert_eq!(other.latest_run_status, None);
    assert_eq!(store.org_usage("o").await.unwrap(), Usage::new(15, 8));
    assert_eq!(store.org_usage("nobody").await.unwrap(), Usage::default());
    // A run that has ended is not ended again: nothing more is added to it or its chat.
    assert!(matches!(
        store
            .finish_run(
                ids[0].0,
                1,
                &end(
                    RunStatus::Completed,
                    "again",
                    Usage::new(7, 7),
                    vec![assistant("again")]
                )
            )
            .await,
        Err(StoreError::Fenced(_))
    ));
    assert_eq!(
        store.get_chat(chat.id).await.unwrap().unwrap().totals,
        Usage::new(15, 8)
    );
    assert_eq!(store.messages(chat.id).await.unwrap().len(), 4);
    assert_eq!(runs_of(&store, chat.id).await[0].output, "partial answer");
    assert!(matches!(
        store
            .finish_run(
                Uuid::new_v4(),
                1,
                &end(RunStatus::Failed, "", Usage::default(), vec![])
            )
            .await,
        Err(StoreError::Fenced(_))
    ));
    store.close().await;
}

async fn deleting_a_chat_deletes_its_messages_runs_and_run_log(db: TestDb) {
    let store = db.open().await;
    let (chat, run) = started_run(&store).await;
    let events = LogRow {
        run_id: run.id,
        epoch: 1,
        seq: 2,
        last_seq: 3,
        events: "{\"type\":\"a\"}\n{\"type\":\"done\"}".into(),
    };
    assert!(store.append_events(&[events]).await.unwrap().is_empty());
    assert_eq!(store.last_seq(run.id).await.unwrap(), 3);
    store.finish_run(run.id, 1, &answered("a")).await.unwrap();
    assert!(store.delete_chat(chat.id).await.unwrap());
    assert_eq!(store.get_run(run.id).await.unwrap(), None);
    assert!(store.messages(chat.id).await.unwrap().is_empty());
    assert!(runs_of(&store, chat.id).await.is_empty());
    assert!(store.events_after(run.id, 0).await.unwrap().is_empty());
    // Nothing more lands for the run once it is gone.
    let late = LogRow {
        run_id: run.id,
        epoch: 1,
        seq: 4,
        last_seq: 4,
        events: "{\"type\":\"b\"}".into(),
    };
    assert_eq!(store.append_events(&[late]).await.unwrap(), [run.id]);
    assert!(store.events_after(run.id, 0).await.unwrap().is_empty());
    store.close().await;
}

async fn a_run_needs_an_existing_chat(db: TestDb) {
    let store = db.open().await;
    let missing = Uuid::new_v4();
    assert!(matches!(
        store.start_run(&new_run(missing, "q")).await,
        Err(StoreError::ChatNotFound(id)) if id == missing
    ));
    store.close().await;
}

async fn a_run_starts_only_in_a_chat_of_the_owner_it_names(db: TestDb) {
    let store = db.open().await;
    let chat = store.create_chat(&owner("o", "u", "c")).await.unwrap();
    let strangers = [
        owner("o2", "u", "c"),
        owner("o", "u2", "c"),
        owner("o", "u", "c2"),
    ];
    // Idle or with a run going, the chat is missing to another owner: not busy, and nothing is read or written.
    for going in [false, true] {
        for stranger in &strangers {
            let foreign = NewRun {
                owner: stranger.clone(),
                ..new_run(chat.id, "not mine")
            };
            assert!(matches!(
                store.start_run(&foreign).await,
                Err(StoreError::ChatNotFound(id)) if id == chat.id
            ));
            assert_eq!(store.get_run(foreign.id).await.unwrap(), None);
        }
        if !going {
            store.start_run(&new_run(chat.id, "mine")).await.unwrap();
        }
    }
    let kept = store.messages(chat.id).await.unwrap();
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert_eq!(
        store
            .get_chat(chat.id)
            .await
            .unwrap()
            .unwrap()
            .initial_message
            .as_deref(),
        Some("mine")
    );
    assert!(matches!(
        store.start_run(&new_run(chat.id, "again")).await,
        Err(StoreError::ChatBusy(_))
    ));
    store.close().await;
}

/// A start finds its chat by id, whichever plan the server picks: it never walks the owner's other chats (a generic
/// plan on the owner's index read every chat of the canvas, thousands, for each start).
#[tokio::test]
async fn a_start_reads_its_chat_by_id_however_many_chats_its_owner_has_postgres() {
    use sqlx::Connection;
    const CHATS: i64 = 3_000;
    const STARTS: usize = 20;
    let db = TestDb::postgres().await;
    // Every statement on the store's connections on a generic plan, as PL/pgSQL uses after a few calls.
    db.alter_database("SET plan_cache_mode = force_generic_plan")
        .await;
    let mut conn = sqlx::PgConnection::connect(db.url()).await.unwrap();
    let store = db.open().await;
    sqlx::query(
        "INSERT INTO agent_chats (id, org_id, user_id, canvas_id) \
         SELECT gen_random_uuid(), 'o', 'u', 'c' FROM generate_series(1, $1)",
    )
    .bind(CHATS)
    .execute(&mut conn)
    .await
    .unwrap();
    let chats: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM agent_chats LIMIT $1")
        .bind(STARTS as i64)
        .fetch_all(&mut conn)
        .await
        .unwrap();
    for chat in chats {
        store.start_run(&new_run(chat, "hello")).await.unwrap();
    }
    // A backend reports what it read when it exits: close the pool and wait for every start to be counted (the
    // rows kept: the rolled-back runs with which the store readied its connections are not live).
    store.close().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let read = loop {
        let (runs, read): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT n_live_tup FROM pg_stat_user_tables WHERE relname = 'agent_chat_runs'), \
             (SELECT sum(idx_tup_read)::BIGINT FROM pg_stat_user_indexes WHERE relname = 'agent_chats')",
        )
        .fetch_one(&mut conn)
        .await
        .unwrap();
        if runs >= STARTS as i64 {
            break read;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the server counted {runs} of {STARTS} starts"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        read < CHATS,
        "{STARTS} starts read {read} index entries of agent_chats, an owner has {CHATS} chats"
    );
}

/// agentd on PostgreSQL serves with every pooled connection open and ready for a burst: each has started and ended a
/// run once (compiling the functions a run start and end call, as its first request would), the run log's connection
/// has started one and committed a row of its events, and nothing of it is left in the store.
#[tokio::test]
async fn agentd_serves_with_every_store_connection_ready_and_nothing_left_behind_postgres() {
    use sqlx::Connection;
    const POOL: i64 = 16;
    let db = TestDb::postgres().await;
    db.alter_database("SET track_functions = 'pl'").await;
    let mut conn = sqlx::PgConnection::connect(db.url()).await.unwrap();
    let mut server = Agentd::spawn_on(db.url(), &[]).await;
    let open: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    // The pool's connections and the run log's (the listener's may still be connecting).
    assert!(open > POOL, "{open} connections open once agentd serves");
    let (chats, runs, messages, events): (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM agent_chats), (SELECT count(*) FROM agent_chat_runs), \
         (SELECT count(*) FROM agent_chat_messages), (SELECT count(*) FROM agent_run_events)",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!((chats, runs, messages, events), (0, 0, 0, 0));
    // A backend reports its function calls and the rows it inserted (rolled back or not) when it exits: stop agentd
    // and wait for all of them (a start is a call of agent_start_runs, which calls agent_start_run for each of its
    // starts, and stores the run's first event).
    server.signal("TERM");
    assert!(server.exit_status().await.success());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let calls: Vec<(String, i64)> = sqlx::query_as(
            "SELECT DISTINCT funcname::TEXT, calls FROM pg_stat_user_functions \
             WHERE funcname IN ('agent_start_run', 'agent_start_runs', 'agent_finish_run') \
             UNION ALL SELECT relname::TEXT, n_tup_ins FROM pg_stat_user_tables WHERE relname = 'agent_run_events' \
             ORDER BY 1",
        )
        .fetch_all(&mut conn)
        .await
        .unwrap();
        let expected = vec![
            ("agent_finish_run".to_owned(), POOL),
            ("agent_run_events".to_owned(), POOL + 2),
            ("agent_start_run".to_owned(), POOL + 1),
            ("agent_start_runs".to_owned(), POOL + 1),
        ];
        if calls == expected {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "function calls and run log rows counted: {calls:?}, expected {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A run's end on PostgreSQL reads its own row, however many runs are running. A connection plans the end once for any
/// parameters, when agentd readies it, maybe on a store with no run running: planned there, the end read every
/// running run (through the index of the running runs) for as long as the connection lived.
#[tokio::test]
async fn a_run_end_reads_its_own_row_however_many_runs_are_running_postgres() {
    let db = TestDb::postgres().await;
    db.open().await.close().await;
    let mut conn = planning_as_agentd(&db).await;
    let end = |run: Uuid| {
        format!(
            "SELECT agent_finish_run('{run}', 1, 'completed', NULL, 'an answer', 1, 2, 3, '[]'::jsonb)"
        )
    };
    // Planned on an empty store, as agentd readies its connections on a new database.
    let ended: bool = sqlx::query_scalar(sqlx::AssertSqlSafe(end(Uuid::new_v4())))
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert!(!ended);
    add_runs(&mut conn, 2_000, true).await;
    let runs: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM agent_chat_runs LIMIT 2")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    // The first end after the fill reads the catalog for the tables and indexes it writes (about 200 blocks); the
    // second reads what an end reads.
    let ended: bool = sqlx::query_scalar(sqlx::AssertSqlSafe(end(runs[0])))
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert!(ended);
    let run = runs[1];
    let plan: sqlx::types::Json<serde_json::Value> = sqlx::query_scalar(sqlx::AssertSqlSafe(
        format!("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {}", end(run)),
    ))
    .fetch_one(&mut conn)
    .await
    .unwrap();
    let top = &plan.0[0]["Plan"];
    let blocks =
        top["Shared Hit Blocks"].as_u64().unwrap() + top["Shared Read Blocks"].as_u64().unwrap();
    // Its row, the chat's, the indexes they are in: a few dozen blocks. Through every running run: over 2,000.
    assert!(blocks < 100, "the end read {blocks} blocks: {plan:?}");
    let status: String = sqlx::query_scalar("SELECT status FROM agent_chat_runs WHERE id = $1")
        .bind(run)
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(status, "completed");
}

/// The sweep of stale runs on PostgreSQL locks the stale runs once, however it was planned. A connection plans it once
/// for any parameters, maybe on a new database's empty store (the first lease round of a replica): with the locking
/// subquery under `IN`, the plan made there locked the stale runs, then read them all again for each running run (3.4 s
/// for a crashed peer's 5,000 runs, every one of them held meanwhile).
#[tokio::test]
async fn the_sweep_planned_on_an_empty_store_reads_the_stale_runs_once_postgres() {
    const STALE: i64 = 2_000;
    let lease = Duration::from_secs(30);
    let db = TestDb::postgres().await;
    let store = db.open().await;
    assert!(store.interrupt_stale(lease).await.unwrap().is_empty());
    // The statement as agentd sent it, planned on a connection set as agentd's are, on the empty store.
    let mut conn = planning_as_agentd(&db).await;
    let sweep: String = sqlx::query_scalar(
        "SELECT query FROM pg_stat_activity WHERE datname = current_database() \
         AND query LIKE 'UPDATE agent_chat_runs SET status = ''interrupted''%' LIMIT 1",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    for statement in [
        format!("PREPARE sweep(text, bigint) AS {sweep}"),
        "EXECUTE sweep('stale', 30000)".to_owned(),
    ] {
        sqlx::raw_sql(sqlx::AssertSqlSafe(statement))
            .execute(&mut conn)
            .await
            .unwrap();
    }

    add_runs(&mut conn, STALE, true).await;
    db.age_heartbeats(60).await;
    sqlx::raw_sql("BEGIN").execute(&mut conn).await.unwrap();
    let plan: sqlx::types::Json<serde_json::Value> =
        sqlx::query_scalar("EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE sweep('stale', 30000)")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    sqlx::raw_sql("ROLLBACK").execute(&mut conn).await.unwrap();
    let mut nodes = vec![&plan.0[0]["Plan"]];
    let mut locks = Vec::new();
    while let Some(node) = nodes.pop() {
        if node["Node Type"] == "LockRows" {
            locks.push((&node["Actual Loops"], &node["Actual Rows"]));
        }
        nodes.extend(node["Plans"].as_array().into_iter().flatten());
    }
    assert_eq!(locks, [(&json!(1), &json!(STALE))], "{plan:?}");

    // And agentd's own sweep ends them all.
    assert_eq!(
        store.interrupt_stale(lease).await.unwrap().len(),
        STALE as usize
    );
    store.close().await;
}

/// A connection to `db` (PostgreSQL) that plans a statement as agentd's pooled connections do: once, for any
/// parameters, when it first runs it.
async fn planning_as_agentd(db: &TestDb) -> sqlx::PgConnection {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(db.url()).await.unwrap();
    sqlx::query("SET plan_cache_mode = force_generic_plan")
        .execute(&mut conn)
        .await
        .unwrap();
    conn
}

/// Adds `count` chats to the PostgreSQL store of `conn`, each with a run: running (instance-a's), or completed. Their
/// owners are spread as a service's are: a user each, in 100 organisations.
async fn add_runs(conn: &mut sqlx::PgConnection, count: i64, running: bool) {
    sqlx::query(
        "WITH chats AS (INSERT INTO agent_chats (id, org_id, user_id, canvas_id) \
         SELECT gen_random_uuid(), 'o' || i % 100, 'u' || i, 'c' FROM generate_series(1, $1) i RETURNING id) \
         INSERT INTO agent_chat_runs (id, chat_id, model, status, owner_instance, finished_at) \
         SELECT gen_random_uuid(), id, 'test', CASE WHEN $2 THEN 'running' ELSE 'completed' END, \
         CASE WHEN $2 THEN 'instance-a' ELSE 'gone' END, CASE WHEN $2 THEN NULL ELSE now() END FROM chats",
    )
    .bind(count)
    .bind(running)
    .execute(conn)
    .await
    .unwrap();
}

/// agentd started on a new PostgreSQL database reads rows by key once the store holds many: what a run does (its start,
/// group commits, end, replay, cancel, detach, the lease rounds) and what the gRPC API does read no table whole.
/// Its connections plan each statement once, and a plan made on the empty store (reading a table whole looks cheapest
/// there) was kept: every group commit read every run there was. Deleting a chat read every message once for each of
/// its runs (their messages are deleted with them, by `run_id`, which had no index). Then an agentd started on that
/// store sweeps the events of its 5,000 runs that finished two days ago, a step of runs at a time, by key too.
#[tokio::test]
async fn agentd_reads_no_table_whole_once_the_store_holds_many_postgres() {
    use agentd::grpc::proto::agents_client::AgentsClient;
    use agentd::grpc::proto::{
        DeleteAgentChatRequest, DescribeAgentChatRequest, DescribeOrganizationAgentUsageRequest,
        ListAgentChatMessagesRequest, ListAgentChatsRequest,
    };
    use sqlx::Connection;
    const MANY: i64 = 5_000;
    let db = TestDb::postgres().await;
    let mut conn = sqlx::PgConnection::connect(db.url()).await.unwrap();
    let mut server =
        Agentd::spawn_on(db.url(), &[("RUN_LEASE", "1.5"), ("DETACH_GRACE", "0")]).await;
    add_runs(&mut conn, MANY, false).await;
    for fill in [
        "INSERT INTO agent_chat_messages (chat_id, message_index, message, run_id) \
         SELECT chat_id, i, '{\"role\":\"user\",\"content\":\"q\"}', id FROM agent_chat_runs, \
         generate_series(0, 1) i",
        "INSERT INTO agent_run_events (run_id, seq, last_seq, events) \
         SELECT id, 1, 1, '{\"type\":\"done\"}' FROM agent_chat_runs",
        // Past the retention: swept by the next agentd to start (this one swept the empty store as it started).
        "UPDATE agent_chat_runs SET finished_at = now() - interval '2 days'",
        "ANALYZE",
        // What this connection read filling the store is not counted.
        "SELECT pg_stat_force_next_flush()",
        "SELECT pg_stat_reset()",
    ] {
        sqlx::query(fill).execute(&mut conn).await.unwrap();
    }

    let chat = new_chat();
    let mut run = String::new();
    for _ in 0..10 {
        let events = server
            .stream(&chat, json!({"question": "q"}))
            .await
            .rest()
            .await;
        assert_eq!(types(&events).last().unwrap(), "done");
        run = events[0].1["run_id"].as_str().unwrap().into();
    }
    let replay = server.follow(&chat, &run, None).await.rest().await;
    assert_eq!(types(&replay).last().unwrap(), "done");
    let long = json!({"question": "q", "model": "test:deltas=1000,delay_ms=10"});
    let cancelled = new_chat();
    let mut going = server.stream(&cancelled, long.clone()).await;
    let run = going.next_data().await["run_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        server
            .ask(&cancelled, json!({"question": "q"}))
            .await
            .status(),
        409
    );
    // Through a few lease rounds: heartbeats, the look for stale runs.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(server.cancel(&cancelled, &run).await.status(), 202);
    assert_eq!(types(&going.rest().await).last().unwrap(), "done");
    let mut detached = server.stream(&new_chat(), long).await;
    detached.next_data().await;
    drop(detached);
    server
        .wait_for_log_where(|l| l["outcome"] == "detached")
        .await
        .unwrap();

    // The chats are dev mode's, all of one owner.
    let mut grpc = AgentsClient::connect(server.grpc.clone()).await.unwrap();
    let (org_id, user_id, canvas_id) = ("dev-org", "dev-user", "dev-canvas");
    let listed = grpc
        .list_agent_chats(ListAgentChatsRequest {
            org_id: org_id.into(),
            canvas_id: canvas_id.into(),
            user_id: user_id.into(),
        })
        .await
        .unwrap();
    assert_eq!(listed.into_inner().chats.len(), 3);
    grpc.describe_agent_chat(DescribeAgentChatRequest {
        org_id: org_id.into(),
        canvas_id: canvas_id.into(),
        user_id: user_id.into(),
        chat_id: chat.clone(),
    })
    .await
    .unwrap();
    let messages = grpc
        .list_agent_chat_messages(ListAgentChatMessagesRequest {
            org_id: org_id.into(),
            canvas_id: canvas_id.into(),
            user_id: user_id.into(),
            chat_id: chat.clone(),
        })
        .await
        .unwrap();
    assert_eq!(messages.into_inner().messages.len(), 20);
    grpc.describe_organization_agent_usage(DescribeOrganizationAgentUsageRequest {
        org_id: org_id.into(),
    })
    .await
    .unwrap();
    grpc.delete_agent_chat(DeleteAgentChatRequest {
        org_id: org_id.into(),
        canvas_id: canvas_id.into(),
        user_id: user_id.into(),
        chat_id: cancelled,
    })
    .await
    .unwrap();

    // A backend reports what it read when it exits: stop agentd and wait for all of its backends to be gone.
    server.signal("TERM");
    assert!(server.exit_status().await.success());
    let mut server = Agentd::spawn_on(db.url(), &[]).await;
    let swept = server
        .wait_for_log_where(|l| l["message"] == "swept the events of finished runs")
        .await
        .unwrap();
    assert_eq!(swept["rows"], MANY, "{swept}");
    server.signal("TERM");
    assert!(server.exit_status().await.success());
    other_backends_gone(&mut conn).await;
    // Each table holds at least 5,000 rows: reading one whole once reads 5,000.
    let scanned: Vec<(String, i64)> = sqlx::query_as(
        "SELECT relname::text, seq_tup_read FROM pg_stat_user_tables WHERE relname LIKE 'agent\\_%' \
         AND relname <> 'agent_run_log_sweep' ORDER BY relname",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    assert_eq!(scanned.len(), 4, "{scanned:?}");
    assert!(
        scanned.iter().all(|(_, rows)| *rows < MANY),
        "rows read by reading tables whole: {scanned:?}"
    );
}

/// Every foreign key of the SQLite store has an index whose leading columns are the key's: deleting a chat deletes
/// its runs, their messages and their run log through the keys (`ON DELETE CASCADE`), and SQLite finds the rows of a
/// key without such an index by reading the whole table, once per row deleted. (The PostgreSQL store is checked by
/// what agentd reads: `agentd_reads_no_table_whole_once_the_store_holds_many_postgres`.)
#[tokio::test]
async fn every_foreign_key_of_the_store_has_an_index_that_finds_its_rows_sqlite() {
    use sqlx::Connection;
    let db = TestDb::sqlite();
    db.open().await.close().await;
    let mut conn = sqlx::SqliteConnection::connect(db.url()).await.unwrap();
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE 'agent\\_%' ESCAPE '\\'",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    let mut keys = 0;
    for table in &tables {
        // (key, position, column), and each index's columns in order.
        let mut columns: Vec<(i64, i64, String)> = sqlx::query_as(
            "SELECT id, seq, \"from\" FROM pragma_foreign_key_list($1) ORDER BY id, seq",
        )
        .bind(table)
        .fetch_all(&mut conn)
        .await
        .unwrap();
        let mut indexes = Vec::new();
        let names: Vec<String> = sqlx::query_scalar("SELECT name FROM pragma_index_list($1)")
            .bind(table)
            .fetch_all(&mut conn)
            .await
            .unwrap();
        for name in names {
            let indexed: Vec<String> =
                sqlx::query_scalar("SELECT name FROM pragma_index_info($1) ORDER BY seqno")
                    .bind(&name)
                    .fetch_all(&mut conn)
                    .await
                    .unwrap();
            indexes.push(indexed);
        }
        while let Some(&(id, _, _)) = columns.first() {
            let key: Vec<String> = columns
                .iter()
                .take_while(|(of, _, _)| *of == id)
                .map(|(_, _, column)| column.clone())
                .collect();
            columns.drain(..key.len());
            keys += 1;
            assert!(
                indexes.iter().any(|index| index.starts_with(&key)),
                "{table} ({}) has no index that starts with it: {indexes:?}",
                key.join(", ")
            );
        }
    }
    // The chats' runs and messages, the runs' messages and run log.
    assert!(keys >= 4, "{keys} foreign keys in {tables:?}");
}

/// Waits until `conn` is the only connection to its database: a backend reports what it read (`pg_stat_*`) as it
/// exits.
async fn other_backends_gone(conn: &mut sqlx::PgConnection) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let others: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        .fetch_one(&mut *conn)
        .await
        .unwrap();
        if others == 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{others} backends left"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A client re-attaching near the end of a long run reads the end of its log, not all of it: the look-up of the run's
/// last seq (also a cancel's) reads its last row, and the replay starts at the row holding the next event. A run
/// paced as a model answers stores about one event to a row, thousands by its end, and at a handoff every client of
/// the replica re-attaches at once: each read its run's whole log, twice.
#[tokio::test]
async fn re_attaching_near_the_end_of_a_long_run_reads_the_end_of_its_log_postgres() {
    use sqlx::Connection;
    const ROWS: i64 = 2_000;
    let db = TestDb::postgres().await;
    let store = db.open().await;
    let mut conn = sqlx::PgConnection::connect(db.url()).await.unwrap();
    add_runs(&mut conn, 1, false).await;
    let (chat, run): (Uuid, Uuid) = sqlx::query_as("SELECT chat_id, id FROM agent_chat_runs")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    // Rows of one event each, about 600 bytes: 13 to a page.
    sqlx::query(
        "INSERT INTO agent_run_events (run_id, seq, last_seq, events) \
         SELECT $1, i, i, json_build_object('type', 'model_delta', 'content', repeat('x', 560))::text \
         FROM generate_series(1, $2) i",
    )
    .bind(run)
    .bind(ROWS)
    .execute(&mut conn)
    .await
    .unwrap();
    for reset in [
        "SELECT pg_stat_force_next_flush()",
        "SELECT pg_stat_reset()",
    ] {
        sqlx::query(reset).execute(&mut conn).await.unwrap();
    }

    let (_, found) = store.chat_run(chat, run).await.unwrap().unwrap();
    assert_eq!(found.unwrap().1, ROWS as u64);
    assert_eq!(store.last_seq(run).await.unwrap(), ROWS as u64);
    let replayed = store.events_after(run, ROWS as u64 - 10).await.unwrap();
    let seqs: Vec<u64> = replayed.iter().map(|(seq, _)| *seq).collect();
    assert_eq!(seqs, (ROWS as u64 - 9..=ROWS as u64).collect::<Vec<_>>());
    store.close().await;
    other_backends_gone(&mut conn).await;
    let blocks: i64 = sqlx::query_scalar(
        "SELECT heap_blks_hit + heap_blks_read FROM pg_statio_user_tables WHERE relname = 'agent_run_events'",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    // The three reads, each of the last row's page or two: a few blocks. Reading every row: the log's 154 pages, each
    // time.
    assert!(blocks < 20, "{blocks} blocks of the run log read");
}

/// A PostgreSQL server that takes fewer connections than agentd's pool: agentd shrinks its pool to the connections
/// the server granted and says so, and runs that together need more connections than that all complete, each waiting
/// for one of the pool's connections rather than for one the server refuses.
#[tokio::test]
async fn agentd_keeps_to_the_connections_the_store_grants_postgres() {
    use sqlx::Connection;
    let db = TestDb::postgres().await;
    // A superuser is not held to connection limits: agentd connects as a role of its own that owns the database.
    let role = format!("agentd_limited_{}", Uuid::new_v4().simple());
    let mut admin = sqlx::PgConnection::connect(db.url()).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE ROLE {role} LOGIN CONNECTION LIMIT 6"
    )))
    .execute(&mut admin)
    .await
    .unwrap();
    admin.close().await.unwrap();
    db.alter_database(&format!("OWNER TO {role}")).await;
    let url = db.url().replacen("postgres@", &format!("{role}@"), 1);
    assert_ne!(url, db.url(), "the test database's URL names its user");
    let mut server = Agentd::spawn_on(&url, &[]).await;
    // Six for the role: the run log's connection, the LISTEN connection, and four for the pool.
    let warning = server.wait_for_log("refused some connections").await;
    assert_eq!(warning["level"], "WARN", "{warning}");
    assert_eq!(
        (warning["connections"].as_u64(), warning["wanted"].as_u64()),
        (Some(4), Some(16)),
        "{warning}"
    );
    assert!(
        !server.log_text().contains("could not all be readied"),
        "{}",
        server.log_text()
    );
    // Each run takes a connection to start and one to end, and the run log's commits run meanwhile.
    let runs = futures_util::future::join_all((0..12).map(|_| async {
        server
            .stream(
                &new_chat(),
                json!({"question": "q", "model": "test:deltas=20,delay_ms=1"}),
            )
            .await
            .rest()
            .await
    }))
    .await;
    for events in &runs {
        assert_eq!(types(events).last().map(String::as_str), Some("done"));
        assert!(
            events.iter().any(|(_, e)| e["type"] == "run_completed"),
            "{events:?}"
        );
    }
}

/// A rollback, or a replica of the earlier version restarting while a deploy replaces it: the store has a migration
/// this build does not know. agentd serves it, and says so.
async fn agentd_serves_a_store_a_newer_agentd_migrated(db: TestDb) {
    db.open().await.close().await;
    let newer = 29_991_231_000_000_i64;
    db.record_newer_migration(newer).await;
    let mut server = Agentd::spawn_on(db.url(), &[]).await;
    let warning = server.wait_for_log("a newer agentd applied").await;
    assert_eq!(warning["level"], "WARN", "{warning}");
    assert!(
        warning["migrations"]
            .as_str()
            .unwrap()
            .contains(&newer.to_string()),
        "{warning}"
    );
    let events = server
        .stream(
            &new_chat(),
            json!({"question": "q", "model": "test:deltas=3"}),
        )
        .await
        .rest()
        .await;
    assert_eq!(types(&events).last().map(String::as_str), Some("done"));
    // The migrate command too.
    let migrated = std::process::Command::new(env!("CARGO_BIN_EXE_agentd"))
        .arg("migrate")
        .env("DATABASE_URL", db.url())
        .output()
        .unwrap();
    assert!(migrated.status.success(), "{migrated:?}");
}

/// The run log's writer keeps its PostgreSQL connection out of the pool between commits, and gives it back (where its
/// buffers go back to their first size) once a second passes with nothing to commit, rather than keep it, with the
/// buffers a burst's last commits grew, until the next commit; the next commit takes it from the pool again.
#[tokio::test]
async fn the_run_logs_writer_gives_its_connection_back_once_it_has_nothing_to_commit_postgres() {
    use agentd::runs::events::RunEvent;
    use agentd::runs::log::{RunLog, write};
    let db = TestDb::postgres().await;
    let store = db.open().await;
    let (_, run) = started_run(&store).await;
    let (log, queue) = RunLog::new(store.clone(), std::sync::Arc::default());
    let stop = tokio_util::sync::CancellationToken::new();
    let writer = store
        .runtime()
        .spawn(write(log.clone(), queue, stop.clone()));
    let mut events = log.produce(run.id, 1, vec![r#"{"type":"run_started"}"#.into()]);
    let delta = |content: &str| RunEvent::ModelDelta {
        content: content.into(),
    };

    events.emit(delta("first")).await;
    events.flushed().await;
    let given_back = async {
        while store.log_connection_kept() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), given_back)
        .await
        .expect("the writer gives its connection back once it has nothing to commit");

    events.emit(delta("second")).await;
    events.flushed().await;
    assert_eq!(stored_seqs(&store, run.id).await, [2, 3]);
    stop.cancel();
    writer.await.unwrap();
}

/// Long values are not written through pglz (slow enough that a wave of runs ending held up every run's events): a run
/// log row longer than a page's limit is compressed with lz4 where the server has it (stored as it is otherwise), a
/// shorter one is stored as it is, and both are read back whole; a run's answer is compressed with lz4 where the server
/// has it.
#[tokio::test]
async fn long_log_rows_and_answers_are_compressed_with_lz4_short_rows_not_postgres() {
    use sqlx::Connection;
    let db = TestDb::postgres().await;
    let store = db.open().await;
    let (_, run) = started_run(&store).await;
    // Text that compresses well, well over the 2 KB at which PostgreSQL compresses a value by default.
    let answer = "the same words again and again ".repeat(400);
    let events: Vec<String> = (0..100)
        .map(|n| {
            json!({"type": "model_delta", "delta": answer[..120].to_string(), "n": n}).to_string()
        })
        .collect();
    let long_row = LogRow {
        run_id: run.id,
        epoch: 1,
        seq: 2,
        last_seq: 101,
        events: events.join("\n"),
    };
    assert!(long_row.events.len() > 12_000);
    // Under the page's limit (8,160 bytes) and over the 2 KB at which PostgreSQL would compress it by default.
    let short_events = events[..30].join("\n");
    assert!((4_000..8_000).contains(&short_events.len()));
    let short_row = LogRow {
        seq: 102,
        last_seq: 131,
        events: short_events.clone(),
        ..long_row.clone()
    };
    store.append_events(&[long_row, short_row]).await.unwrap();
    store
        .finish_run(
            run.id,
            1,
            &end(
                RunStatus::Completed,
                &answer,
                Usage::new(1, 1),
                vec![assistant(&answer)],
            ),
        )
        .await
        .unwrap();

    let mut conn = sqlx::PgConnection::connect(db.url()).await.unwrap();
    let (log, short_log, output): (Option<String>, Option<String>, Option<String>) = sqlx::query_as(
        "SELECT (SELECT pg_column_compression(events) FROM agent_run_events WHERE run_id = $1 AND seq = 2), \
         (SELECT pg_column_compression(events) FROM agent_run_events WHERE run_id = $1 AND seq = 102), \
         (SELECT pg_column_compression(partial_output) FROM agent_chat_runs WHERE id = $1)",
    )
    .bind(run.id)
    .fetch_one(&mut conn)
    .await
    .unwrap();
    let message: Option<String> = sqlx::query_scalar(
        "SELECT pg_column_compression(message) FROM agent_chat_messages WHERE run_id = $1 \
         ORDER BY message_index DESC LIMIT 1",
    )
    .bind(run.id)
    .fetch_one(&mut conn)
    .await
    .unwrap();
    let lz4: bool = sqlx::query_scalar(
        "SELECT 'lz4' = ANY (enumvals) FROM pg_settings WHERE name = 'default_toast_compression'",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(log.as_deref(), lz4.then_some("lz4"), "the long run log row");
    assert_eq!(short_log, None, "the short run log row is stored as it is");
    let expected = if lz4 { "lz4" } else { "pglz" };
    assert_eq!(output.as_deref(), Some(expected));
    assert_eq!(message.as_deref(), Some(expected));
    // And read back as written.
    let read = store.events_after(run.id, 1).await.unwrap();
    let written: Vec<&str> = events
        .iter()
        .map(String::as_str)
        .chain(short_events.split('\n'))
        .collect();
    assert_eq!(read.len(), 130);
    assert!(
        read.iter()
            .zip(&written)
            .all(|((_, got), sent)| got == sent)
    );
    assert_eq!(
        read.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(),
        (2..132).collect::<Vec<_>>()
    );
    store.close().await;
}

async fn a_start_that_fails_part_way_writes_nothing_and_the_store_writes_on(db: TestDb) {
    let store = db.open().await;
    let first = store.create_chat(&owner("o", "u", "c")).await.unwrap();
    let second = store.create_chat(&owner("o", "u", "c")).await.unwrap();
    let run = new_run(first.id, "q");
    store.start_run(&run).await.unwrap();
    // The same run id again, in another chat: the run's insert fails, after the chat was read and locked.
    let again = NewRun {
        chat_id: second.id,
        ..run.clone()
    };
    assert!(store.start_run(&again).await.is_err());
    assert!(store.messages(second.id).await.unwrap().is_empty());
    let untouched = store.get_chat(second.id).await.unwrap().unwrap();
    assert_eq!(untouched.initial_message, None);
    assert_eq!(
        store.get_run(run.id).await.unwrap().unwrap().chat_id,
        first.id
    );
    // No transaction was left open on the writer: what it writes next is committed, and readers see it.
    for _ in 0..3 {
        let next = new_run(second.id, "q2");
        store.start_run(&next).await.unwrap();
        assert_eq!(
            store.get_run(next.id).await.unwrap().unwrap().status,
            RunStatus::Running
        );
        store.finish_run(next.id, 1, &answered("a")).await.unwrap();
    }
    assert_eq!(store.messages(second.id).await.unwrap().len(), 6);
    store.close().await;
}

async fn a_start_can_make_its_chat_and_leaves_another_owners_alone(db: TestDb) {
    let store = db.open().await;
    // No chat has this id: the start makes it, of the run's owner, and starts the run in it.
    let run = new_run(Uuid::new_v4(), "q");
    let history = store.start_run_making_its_chat(&run).await.unwrap();
    assert!(history.is_empty());
    let chat = store.get_chat(run.chat_id).await.unwrap().unwrap();
    assert_eq!(chat.owner, owner("o", "u", "c"));
    let runs = runs_of(&store, run.chat_id).await;
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].status, RunStatus::Running);
    // The chat exists now: made again, it is left as it is, and its run is still going.
    let next = new_run(run.chat_id, "q2");
    assert!(matches!(
        store.start_run_making_its_chat(&next).await,
        Err(StoreError::ChatBusy(id)) if id == run.id
    ));
    // Another owner's chat is not theirs to start in, made or not: nothing is written.
    let theirs = store.create_chat(&owner("o", "else", "c")).await.unwrap();
    assert!(matches!(
        store
            .start_run_making_its_chat(&new_run(theirs.id, "q"))
            .await,
        Err(StoreError::ChatNotFound(_))
    ));
    assert!(runs_of(&store, theirs.id).await.is_empty());
    assert_eq!(store.get_chat(theirs.id).await.unwrap(), Some(theirs));
    store.close().await;
}

async fn stale_runs_are_interrupted_and_live_ones_are_not(db: TestDb) {
    let store = db.open().await;
    let chat = store.create_chat(&owner("o", "u", "c")).await.unwrap();
    let other = store.create_chat(&owner("o", "u", "c")).await.unwrap();
    let dead = new_run(chat.id, "q");
    let live = new_run(other.id, "q");
    store.start_run(&dead).await.unwrap();
    store.start_run(&live).await.unwrap();
    store.save_partial(dead.id, "half an ans").await.unwrap();

    // Both were just started: nothing is stale.
    assert!(
        store
            .interrupt_stale(Duration::from_secs(30))
            .await
            .unwrap()
            .is_empty()
    );

    // A minute passes; only the live run's process refreshes its lease.
    db.age_heartbeats(60).await;
    assert_eq!(
        store
            .heartbeat("instance-a", &[live.id, Uuid::new_v4()])
            .await
            .unwrap(),
        [live.id]
    );
    assert_eq!(
        store
            .interrupt_stale(Duration::from_secs(30))
            .await
            .unwrap(),
        [(dead.id, 2)],
        "the stop raises the epoch"
    );

    let dead = store.get_run(dead.id).await.unwrap().unwrap();
    assert_eq!(dead.status, RunStatus::Interrupted);
    assert_eq!(dead.output, "half an ans");
    assert_eq!(dead.error.as_deref(), Some(STALE_RUN_ERROR));
    assert_eq!(
        store.get_run(live.id).await.unwrap().unwrap().status,
        RunStatus::Running
    );
    assert!(
        store
            .interrupt_stale(Duration::from_secs(30))
            .await
            .unwrap()
            .is_empty()
    );
    assert!(store.heartbeat("instance-a", &[]).await.unwrap().is_empty());
    store.close().await;
}

async fn a_heartbeat_of_more_runs_than_one_statement_refreshes_each(db: TestDb) {
    use futures_util::StreamExt;
    let store = db.open().await;
    // Two statements' worth and one more (500 a statement).
    let mut runs: Vec<Uuid> = futures_util::stream::iter(0..1_001)
        .map(|_| async { started_run(&store).await.1.id })
        .buffer_unordered(16)
        .collect()
        .await;
    db.age_heartbeats(60).await;
    let mut asked = runs.clone();
    asked.insert(700, Uuid::new_v4());
    let mut held = store.heartbeat("instance-a", &asked).await.unwrap();
    held.sort_unstable();
    runs.sort_unstable();
    assert_eq!(held, runs, "every run held here, and no other");
    assert!(
        store
            .interrupt_stale(Duration::from_secs(30))
            .await
            .unwrap()
            .is_empty(),
        "every heartbeat is fresh"
    );
    store.close().await;
}

async fn concurrent_starts_on_one_chat_admit_exactly_one(db: TestDb) {
    let store = db.open().await;
    let chat = store.create_chat(&owner("o", "u", "c")).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let run = new_run(chat.id, &format!("question {i}"));
            store.start_run(&run).await.map(|_| run.id)
        }));
    }
    let mut started = Vec::new();
    let mut busy = Vec::new();
    for task in tasks {
        match task.await.unwrap() {
            Ok(id) => started.push(id),
            Err(StoreError::ChatBusy(going)) => busy.push(going),
            Err(other) => panic!("{other}"),
        }
    }
    assert_eq!(started.len(), 1, "one run at a time per chat");
    assert!(
        busy.iter().all(|going| *going == started[0]),
        "the refused are told which run is going"
    );
    // Once it ended, the next run starts, after it in the history.
    store
        .finish_run(started[0], 1, &answered("a"))
        .await
        .unwrap();
    store.start_run(&new_run(chat.id, "next")).await.unwrap();
    let indexes: Vec<i64> = store
        .messages(chat.id)
        .await
        .unwrap()
        .iter()
        .map(|m| m.index)
        .collect();
    assert_eq!(indexes, [0, 1, 2]);
    store.close().await;
}

/// Starts that arrive together (on SQLite, committed together: see `store/starts.rs`) are each answered as if alone.
async fn starts_arriving_together_each_get_their_own_answer(db: TestDb) {
    let store = db.open().await;
    let (asked, earlier) = started_run(&store).await;
    store
        .finish_run(earlier.id, 1, &answered("a"))
        .await
        .unwrap();
    let mut chats = Vec::new();
    for _ in 0..12 {
        chats.push(store.create_chat(&owner("o", "u", "c")).await.unwrap().id);
    }
    let untouched = store.create_chat(&owner("o", "u", "c")).await.unwrap();
    let theirs = store.create_chat(&owner("o", "else", "c")).await.unwrap();
    let made = Uuid::new_v4();

    // (the start, whether it makes its chat); each of `chats` and `made` is asked twice at once.
    let mut starts: Vec<(NewRun, bool)> =
        chats.iter().map(|c| (new_run(*c, "one"), false)).collect();
    // A run's id again, in another chat: the store refuses its insert, and nothing else of it is kept.
    starts.insert(
        1,
        (
            NewRun {
                chat_id: untouched.id,
                ..earlier.clone()
            },
            false,
        ),
    );
    starts.extend(chats.iter().map(|c| (new_run(*c, "two"), false)));
    starts.push((new_run(asked.id, "q2"), false));
    starts.push((new_run(made, "one"), true));
    starts.push((new_run(made, "two"), true));
    starts.push((new_run(theirs.id, "q"), true));
    let missing = new_run(Uuid::new_v4(), "q");
    starts.push((missing.clone(), false));

    let answers = futures_util::future::join_all(starts.iter().map(|(run, make)| async {
        if *make {
            store.start_run_making_its_chat(run).await
        } else {
            store.start_run(run).await
        }
    }))
    .await;
    let answered: Vec<(&NewRun, Result<Vec<Message>, StoreError>)> =
        starts.iter().map(|(run, _)| run).zip(answers).collect();
    let of = |chat: Uuid| answered.iter().filter(move |(run, _)| run.chat_id == chat);

    // Of two starts in one chat, one started and the other was told it is going.
    for chat in chats.iter().chain([&made]) {
        let started: Vec<&NewRun> = of(*chat)
            .filter(|(_, answer)| matches!(answer, Ok(history) if history.is_empty()))
            .map(|(run, _)| *run)
            .collect();
        assert_eq!(started.len(), 1, "{:?}", of(*chat).collect::<Vec<_>>());
        assert!(of(*chat).any(
            |(_, answer)| matches!(answer, Err(StoreError::ChatBusy(id)) if *id == started[0].id)
        ));
        assert_eq!(runs_of(&store, *chat).await.len(), 1);
        let messages = store.messages(*chat).await.unwrap();
        assert_eq!(messages.len(), 1);
        assert_eq!(
            (messages[0].index, &messages[0].message),
            (0, &user(&started[0].prompt))
        );
    }
    assert!(matches!(
        of(asked.id).collect::<Vec<_>>()[..],
        [(_, Ok(history))] if history == &[user("q"), assistant("a")]
    ));
    assert_eq!(store.messages(asked.id).await.unwrap().len(), 3);
    assert!(matches!(
        of(untouched.id).collect::<Vec<_>>()[..],
        [(_, Err(StoreError::Database(_)))]
    ));
    assert_eq!(
        store.get_chat(untouched.id).await.unwrap(),
        Some(untouched.clone())
    );
    assert!(runs_of(&store, untouched.id).await.is_empty());
    assert!(store.messages(untouched.id).await.unwrap().is_empty());
    for chat in [theirs.id, missing.chat_id] {
        assert!(matches!(
            of(chat).collect::<Vec<_>>()[..],
            [(_, Err(StoreError::ChatNotFound(id)))] if *id == chat
        ));
        assert!(runs_of(&store, chat).await.is_empty());
    }
    assert_eq!(store.get_chat(theirs.id).await.unwrap(), Some(theirs));
    assert_eq!(store.get_chat(missing.chat_id).await.unwrap(), None);
    assert_eq!(
        store.get_run(earlier.id).await.unwrap().unwrap().chat_id,
        asked.id
    );
    store.close().await;
}

/// On PostgreSQL, starts that arrive while others wait for a connection go to the server together: one call of
/// `agent_start_runs` (one round trip, one commit) for up to 16 of them, each answered as if alone.
#[tokio::test]
async fn starts_arriving_together_go_in_one_call_each_sixteen_postgres() {
    let db = TestDb::postgres().await;
    db.alter_database("SET track_functions = 'pl'").await;
    let store = db.open().await;
    let mut runs = Vec::new();
    for i in 0..40 {
        let chat = store.create_chat(&owner("o", "u", "c")).await.unwrap();
        runs.push(new_run(chat.id, &format!("question {i}")));
    }
    let answers =
        queued_together(&store, {
            let (store, runs) = (store.clone(), runs.clone());
            async move {
                futures_util::future::join_all(runs.iter().map(|run| store.start_run(run))).await
            }
        })
        .await;
    for (run, answer) in runs.iter().zip(answers) {
        assert_eq!(answer.unwrap(), Vec::<Message>::new());
        assert_eq!(
            store.messages(run.chat_id).await.unwrap()[0].message,
            user(&run.prompt)
        );
    }
    // The first start takes a connection alone while the others queue behind it: 16, 16, then 8.
    store.close().await;
    calls_come_to(&db, "agent_start_runs", 3).await;
}

/// Runs `work` on the runtime where `store`'s queues of run starts, ends and releases are read (PostgreSQL's thread of
/// its own, or the test's for SQLite): what `work` queues in one poll is all there before a queue is read again, as
/// when requests arrive together on a busy process. (Made from another thread, the first could be taken from its
/// queue alone, and the calls counted would differ.)
async fn queued_together<T: Send + 'static>(
    store: &SessionStore,
    work: impl Future<Output = T> + Send + 'static,
) -> T {
    store.runtime().spawn(work).await.expect("the work ran")
}

/// Waits until PostgreSQL has counted `calls` calls of function `name` in `db` (a server process reports them when it
/// exits: close the store first), and fails if it counts more.
async fn calls_come_to(db: &TestDb, name: &str, calls: i64) {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(db.url()).await.unwrap();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let counted = calls_counted(&mut conn, name).await;
        if counted == Some(calls) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline && counted.is_none_or(|counted| counted < calls),
            "{counted:?} calls of {name}, not {calls}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The calls of function `name` PostgreSQL has counted in the database `conn` is on (`None` before any).
async fn calls_counted(conn: &mut sqlx::PgConnection, name: &str) -> Option<i64> {
    sqlx::query_scalar("SELECT sum(calls)::BIGINT FROM pg_stat_user_functions WHERE funcname = $1")
        .bind(name)
        .fetch_one(conn)
        .await
        .unwrap()
}

/// Starts made together lock their chats in the order of the chats' ids, whatever the order they came in, so two
/// such calls on other connections never wait for each other in a circle.
#[tokio::test]
async fn starts_made_together_lock_their_chats_in_one_order_postgres() {
    use sqlx::Connection;
    let db = TestDb::postgres().await;
    let store = db.open().await;
    let mut chats = [
        store.create_chat(&owner("o", "u", "c")).await.unwrap().id,
        store.create_chat(&owner("o", "u", "c")).await.unwrap().id,
    ];
    chats.sort();
    let [first, second] = chats;
    // Another transaction holds the later chat.
    let mut holder = sqlx::PgConnection::connect(db.url()).await.unwrap();
    sqlx::query("BEGIN").execute(&mut holder).await.unwrap();
    sqlx::query("SELECT 1 FROM agent_chats WHERE id = $1 FOR UPDATE")
        .bind(second)
        .execute(&mut holder)
        .await
        .unwrap();
    // Two starts, the later chat's first: the call locks the earlier chat, then waits for the later one.
    let start = |chat: Uuid| {
        json!({"run": Uuid::new_v4(), "chat": chat, "org": "o", "user": "u", "canvas": "c", "model": "m",
               "owner": "here", "prompt": "q", "message": {"role": "user", "content": "q"}, "make_chat": false})
    };
    let starts = json!([start(second), start(first)]).to_string();
    let mut caller = sqlx::PgConnection::connect(db.url()).await.unwrap();
    let caller_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut caller)
        .await
        .unwrap();
    let call = tokio::spawn(async move {
        sqlx::query_as::<_, (i32, bool)>(
            "SELECT place, chat_found FROM agent_start_runs($1::jsonb) WHERE busy_run IS NULL",
        )
        .bind(starts)
        .fetch_all(&mut caller)
        .await
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let waiting: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1 AND wait_event_type = 'Lock')",
        )
        .bind(caller_pid)
        .fetch_one(&mut holder)
        .await
        .unwrap();
        if waiting {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the call never waited for the held chat"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The earlier chat, though second in the call, is locked already.
    let taken = sqlx::query("SELECT 1 FROM agent_chats WHERE id = $1 FOR UPDATE NOWAIT")
        .bind(first)
        .execute(&mut holder)
        .await;
    let refused = taken.unwrap_err().into_database_error().unwrap();
    assert_eq!(
        refused.code().as_deref(),
        Some("55P03"),
        "lock_not_available"
    );
    sqlx::query("ROLLBACK").execute(&mut holder).await.unwrap();
    // Let go, both start, each answered at its own place.
    let mut answered = call.await.unwrap().unwrap();
    answered.sort();
    assert_eq!(answered, [(0, true), (1, true)]);
    assert_eq!(runs_of(&store, first).await.len(), 1);
    assert_eq!(runs_of(&store, second).await.len(), 1);
    store.close().await;
}

/// Ends that arrive together are committed together (on PostgreSQL in one call), each answered as if alone: a run no
/// longer held under the epoch given, one that ended already and one that does not exist are refused, and nothing is
/// written for them; the others store their answers, messages and usage.
async fn ends_arriving_together_each_get_their_own_answer(db: TestDb) {
    let store = db.open().await;
    let mut runs = Vec::new();
    for i in 0..30 {
        let (chat, run) = started_run(&store).await;
        runs.push((chat.id, run.id, answered(&format!("answer {i}"))));
    }
    let (claimed_chat, claimed) = started_run(&store).await;
    // Its producer is gone (a heartbeat a minute old): another replica claims it.
    db.age_heartbeats(60).await;
    let won = store
        .claim(&[claimed.id], Duration::from_secs(30), "instance-b")
        .await
        .unwrap();
    assert_eq!(won, [(claimed.id, 2)]);
    let (ended_chat, ended) = started_run(&store).await;
    store
        .finish_run(ended.id, 1, &answered("first"))
        .await
        .unwrap();
    // Under the epoch its old producer held, the end of the claimed run; the ended run's end again; a run nobody
    // started. Among the others, so that they go in the same calls.
    let refused = [
        (claimed_chat.id, claimed.id, answered("stale")),
        (ended_chat.id, ended.id, answered("again")),
        (Uuid::new_v4(), Uuid::new_v4(), answered("nobody's")),
    ];
    let mut ends = runs.clone();
    for (at, end) in [3, 17, 25].into_iter().zip(refused.clone()) {
        ends.insert(at, end);
    }
    let answers = futures_util::future::join_all(
        ends.iter()
            .map(|(_, run, end)| store.finish_run(*run, 1, end)),
    )
    .await;
    for ((_, run, _), answer) in ends.iter().zip(&answers) {
        if refused.iter().any(|(_, refused, _)| refused == run) {
            assert!(
                matches!(answer, Err(StoreError::Fenced(id)) if id == run),
                "{answer:?}"
            );
        } else {
            assert!(answer.is_ok(), "{answer:?}");
        }
    }
    for (chat, run, end) in &runs {
        let stored = store.get_run(*run).await.unwrap().unwrap();
        assert_eq!(
            (stored.status, &stored.output),
            (RunStatus::Completed, &end.output)
        );
        let messages = store.messages(*chat).await.unwrap();
        assert_eq!(
            messages.iter().map(|m| &m.message).collect::<Vec<_>>(),
            [&user("q"), &end.messages[0]]
        );
        assert_eq!(
            store.get_chat(*chat).await.unwrap().unwrap().totals,
            Usage::new(1, 1)
        );
    }
    let claimed_run = store.get_run(claimed.id).await.unwrap().unwrap();
    assert_eq!(
        (claimed_run.status, claimed_run.epoch),
        (RunStatus::Running, 2)
    );
    assert_eq!(store.messages(claimed_chat.id).await.unwrap().len(), 1);
    assert_eq!(
        store.get_run(ended.id).await.unwrap().unwrap().output,
        "first"
    );
    assert_eq!(store.messages(ended_chat.id).await.unwrap().len(), 2);
    assert_eq!(
        store.get_chat(ended_chat.id).await.unwrap().unwrap().totals,
        Usage::new(1, 1)
    );
    store.close().await;
}

/// On PostgreSQL, ends that arrive together go to the server together: one call of `agent_finish_runs` (one round
/// trip, one commit) for up to 64 of them. An end the server refuses (text with a NUL, which PostgreSQL's text cannot
/// hold) fails its call, which leaves nothing; its ends are then made one by one, and only that one fails.
#[tokio::test]
async fn ends_arriving_together_go_in_calls_of_sixty_four_and_one_refused_fails_alone_postgres() {
    let db = TestDb::postgres().await;
    db.alter_database("SET track_functions = 'pl'").await;
    let store = db.open().await;
    let mut runs = Vec::new();
    for i in 0..100 {
        let (_, run) = started_run(&store).await;
        runs.push((run.id, answered(&format!("answer {i}"))));
    }
    let answers = queued_together(&store, {
        let store = store.clone();
        async move {
            futures_util::future::join_all(
                runs.iter().map(|(run, end)| store.finish_run(*run, 1, end)),
            )
            .await
        }
    })
    .await;
    assert!(answers.iter().all(Result::is_ok), "{answers:?}");
    // 64, then the 36 left.
    store.close().await;
    calls_come_to(&db, "agent_finish_runs", 2).await;

    let store = db.open().await;
    one_refused_end_fails_alone(&store, "a NUL \u{0}").await;
    store.close().await;
}

/// On PostgreSQL, ends that arrive one after another while a call of ends is in flight wait for it and go together,
/// rather than a call each on the pool's free connections; a call held up holds them up no longer than a moment. Here
/// the first end's call waits for its run's row, which another connection holds: the ten ends after it, a millisecond
/// apart, go on in one call or a few while it waits (one call each, eleven in all, before they were gathered).
#[tokio::test]
async fn ends_arriving_while_a_call_is_in_flight_go_together_postgres() {
    use sqlx::Connection;
    let db = TestDb::postgres().await;
    db.alter_database("SET track_functions = 'pl'").await;
    let store = db.open().await;
    let mut runs = Vec::new();
    for i in 0..11 {
        let (_, run) = started_run(&store).await;
        runs.push((run.id, answered(&format!("answer {i}"))));
    }
    let mut holder = sqlx::PgConnection::connect(db.url()).await.unwrap();
    sqlx::query("BEGIN").execute(&mut holder).await.unwrap();
    sqlx::query("SELECT 1 FROM agent_chat_runs WHERE id = $1 FOR UPDATE")
        .bind(runs[0].0)
        .execute(&mut holder)
        .await
        .unwrap();
    let finish = |(run, end): (Uuid, RunEnd)| {
        let store = store.clone();
        tokio::spawn(async move { store.finish_run(run, 1, &end).await })
    };
    let first = finish(runs[0].clone());
    until_statements_wait_for_locks(&mut holder, 1, "the first end's call").await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut later = Vec::new();
    for run in &runs[1..] {
        later.push(finish(run.clone()));
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    for answer in futures_util::future::join_all(later).await {
        assert!(answer.unwrap().is_ok());
    }
    assert!(
        !first.is_finished(),
        "the first end went on while its run was locked"
    );
    sqlx::query("COMMIT").execute(&mut holder).await.unwrap();
    first.await.unwrap().unwrap();
    store.close().await;
    // Counted by each server process as it exits: read until the count holds still.
    let mut counted = None;
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = calls_counted(&mut holder, "agent_finish_runs").await;
        if now.is_some() && now == counted {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the calls were not counted: {now:?}"
        );
        counted = now;
    }
    let calls = counted.unwrap();
    // The first end's call, then a call or a few for the ten (each gathers what comes within 20 ms of its first).
    assert!((2..=6).contains(&calls), "{calls} calls for 11 ends");
}

/// Ten ends arrive together, the fifth with an answer beginning with `refused`, which the store refuses: only that
/// one fails, and nothing of it is kept (its run still going, its chat without its message or usage); the others are
/// stored. Then such an end alone fails as the store refused it, not as a store that could not be reached.
async fn one_refused_end_fails_alone(store: &SessionStore, refused: &str) {
    let mut runs = Vec::new();
    for i in 0..10 {
        let (chat, run) = started_run(store).await;
        let text = if i == 4 {
            format!("{refused} in a call")
        } else {
            format!("answer {i}")
        };
        runs.push((chat.id, run.id, answered(&text)));
    }
    let answers = futures_util::future::join_all(
        runs.iter()
            .map(|(_, run, end)| store.finish_run(*run, 1, end)),
    )
    .await;
    for (i, ((chat, run, end), answer)) in runs.iter().zip(&answers).enumerate() {
        let stored = store.get_run(*run).await.unwrap().unwrap();
        let messages = store.messages(*chat).await.unwrap().len();
        let totals = store.get_chat(*chat).await.unwrap().unwrap().totals;
        if i == 4 {
            assert!(
                matches!(answer, Err(StoreError::Database(sqlx::Error::Database(_)))),
                "{answer:?}"
            );
            assert_eq!(
                (stored.status, messages, totals),
                (RunStatus::Running, 1, Usage::default())
            );
        } else {
            assert!(answer.is_ok(), "{answer:?}");
            assert_eq!(
                (stored.status, &stored.output, messages, totals),
                (RunStatus::Completed, &end.output, 2, Usage::new(1, 1))
            );
        }
    }
    let (_, alone) = started_run(store).await;
    let refused = store
        .finish_run(alone.id, 1, &answered(&format!("{refused} alone")))
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, StoreError::Database(sqlx::Error::Database(_)))
            && !refused.is_unavailable(),
        "{refused:?}"
    );
}

/// On SQLite, ends that arrive while the writer is busy go to it together, in scripts of up to 16 (one transaction,
/// one commit, one trip to the writer's thread each) rather than a commit each. An end SQLite refuses (here a trigger
/// aborts it) fails its script, which leaves nothing; its ends are then made one by one, and only that one fails.
#[tokio::test]
async fn ends_arriving_together_go_in_scripts_of_sixteen_and_one_refused_fails_alone_sqlite() {
    let db = TestDb::sqlite();
    let store = db.open().await;
    // Commits counted in the WAL, while a reader keeps SQLite from starting it over (tried again if it did).
    let mut counted = None;
    for _ in 0..5 {
        let mut runs = Vec::new();
        for i in 0..60 {
            let (_, run) = started_run(&store).await;
            runs.push((run.id, answered(&format!("answer {i}"))));
        }
        let pin = db.pin_wal().await;
        let (salt, before) = db.wal_commits();
        for (run, end) in &runs[..20] {
            store.finish_run(*run, 1, end).await.unwrap();
        }
        let (_, alone) = db.wal_commits();
        let answers = queued_together(&store, {
            let (store, runs) = (store.clone(), runs[20..].to_vec());
            async move {
                futures_util::future::join_all(
                    runs.iter().map(|(run, end)| store.finish_run(*run, 1, end)),
                )
                .await
            }
        })
        .await;
        assert!(answers.iter().all(Result::is_ok), "{answers:?}");
        let (salt_after, together) = db.wal_commits();
        drop(pin);
        for (run, end) in &runs {
            let stored = store.get_run(*run).await.unwrap().unwrap();
            assert_eq!(
                (stored.status, &stored.output),
                (RunStatus::Completed, &end.output)
            );
        }
        if salt_after == salt {
            counted = Some((alone - before, together - alone));
            break;
        }
    }
    let (alone, together) = counted.expect("the WAL was started over in each of five tries");
    assert_eq!(alone, 20, "a commit per end made alone");
    // All 40 queue before the first is taken: 16, 16, then 8.
    assert!(
        (3..=6).contains(&together),
        "{together} commits for 40 ends arriving together"
    );

    db.execute(
        "CREATE TRIGGER refuse_an_end BEFORE UPDATE OF status ON agent_chat_runs \
         WHEN NEW.partial_output LIKE 'refuse%' BEGIN SELECT RAISE(ABORT, 'refused on purpose'); END",
        "",
    )
    .await;
    one_refused_end_fails_alone(&store, "refuse").await;
    store.close().await;
}

/// Releases that arrive together (every run of a replica at its shutdown deadline, in handoff mode) are committed
/// together, each answered as if alone: a run held under the epoch given is released (no owner, its epoch raised),
/// one claimed meanwhile or ended is not, and nothing is written for it. Ends arriving at the same moment go beside
/// them.
async fn releases_arriving_together_each_get_their_own_answer(db: TestDb) {
    let store = db.open().await;
    let mut held = Vec::new();
    for _ in 0..20 {
        held.push(started_run(&store).await.1);
    }
    let (_, claimed) = started_run(&store).await;
    db.age_heartbeats(60).await;
    assert_eq!(
        store
            .claim(&[claimed.id], Duration::from_secs(30), "instance-b")
            .await
            .unwrap(),
        [(claimed.id, 2)]
    );
    let (_, ended) = started_run(&store).await;
    store.finish_run(ended.id, 1, &answered("a")).await.unwrap();
    let (ending_chat, ending) = started_run(&store).await;

    let mut asked: Vec<Uuid> = held.iter().map(|run| run.id).collect();
    asked.insert(5, claimed.id);
    asked.insert(12, ended.id);
    let end = answered("b");
    let (released, finished) = tokio::join!(
        futures_util::future::join_all(asked.iter().map(|run| store.release(*run, 1))),
        store.finish_run(ending.id, 1, &end),
    );
    finished.unwrap();
    for (run, released) in asked.iter().zip(released) {
        let still_held = held.iter().any(|held| held.id == *run);
        assert_eq!(released.unwrap(), still_held, "{run}");
        let stored = store.get_run(*run).await.unwrap().unwrap();
        if still_held {
            assert_eq!((stored.owner_instance.as_str(), stored.epoch), ("", 2));
            assert_eq!(stored.status, RunStatus::Running);
        }
    }
    let claimed = store.get_run(claimed.id).await.unwrap().unwrap();
    assert_eq!(
        (claimed.owner_instance.as_str(), claimed.epoch),
        ("instance-b", 2)
    );
    let ended = store.get_run(ended.id).await.unwrap().unwrap();
    assert_eq!((ended.status, ended.epoch), (RunStatus::Completed, 1));
    assert_eq!(store.messages(ending_chat.id).await.unwrap().len(), 2);
    store.close().await;
}

/// On PostgreSQL, releases that arrive together go in calls of up to 256 (one round trip and one commit each), and
/// each run released is announced to the replicas, once, as its call commits; a run not released is not announced.
#[tokio::test]
async fn releases_arriving_together_go_in_calls_and_each_is_announced_postgres() {
    let db = TestDb::postgres().await;
    db.alter_database("SET track_functions = 'pl'").await;
    let store = db.open().await;
    let mut listener = store.listen(&[RELEASED_CHANNEL]).await.unwrap().unwrap();
    let mut runs = Vec::new();
    for _ in 0..300 {
        runs.push(started_run(&store).await.1.id);
    }
    let released = queued_together(&store, {
        let (store, runs) = (store.clone(), runs.clone());
        async move {
            futures_util::future::join_all(
                runs.iter()
                    .enumerate()
                    // The last one under an epoch it is not held under.
                    .map(|(i, run)| store.release(*run, if i == 299 { 5 } else { 1 })),
            )
            .await
        }
    })
    .await;
    let released: Vec<bool> = released.into_iter().map(Result::unwrap).collect();
    assert_eq!(released, [vec![true; 299], vec![false]].concat());
    let mut announced = Vec::new();
    while let Ok(got) = tokio::time::timeout(Duration::from_secs(2), listener.recv()).await {
        let (channel, payload) = got.unwrap().unwrap();
        assert_eq!(channel, RELEASED_CHANNEL);
        announced.push(payload.parse::<Uuid>().unwrap());
    }
    announced.sort();
    let mut expected = runs[..299].to_vec();
    expected.sort();
    assert_eq!(announced, expected);
    // Every release queued before the first call: 256, then 44.
    drop(listener);
    store.close().await;
    calls_come_to(&db, "agent_release_runs", 2).await;
}

/// Ends made together lock their runs in the order of the runs' ids, whatever the order they came in, and only then
/// their chats; the heartbeat locks the runs it refreshes in that order too. So ends and heartbeats on other
/// connections never wait for each other in a circle.
#[tokio::test]
async fn ends_made_together_lock_runs_by_id_then_chats_postgres() {
    let db = TestDb::postgres().await;
    let store = db.open().await;
    let ([first, second], [mut holder, mut check]) = two_runs_by_id(&db, &store).await;
    for call in ["heartbeat", "ends"] {
        // Another transaction holds the later run; the call names it first.
        hold(
            &mut holder,
            "SELECT 1 FROM agent_chat_runs WHERE id = $1 FOR NO KEY UPDATE",
            second.id,
        )
        .await;
        let made = {
            let (store, ids) = (store.clone(), [second.id, first.id]);
            // Queued together (see `queued_together`): the two ends are made in one call.
            store.runtime().spawn(async move {
                if call == "heartbeat" {
                    store
                        .heartbeat("instance-a", &ids)
                        .await
                        .map(|held| held.len())
                } else {
                    let end = answered("a");
                    let ends = futures_util::future::join_all(
                        ids.iter().map(|id| store.finish_run(*id, 1, &end)),
                    )
                    .await;
                    ends.into_iter()
                        .collect::<Result<Vec<()>, _>>()
                        .map(|ended| ended.len())
                }
            })
        };
        until_statements_wait_for_locks(&mut check, 1, call).await;
        // The earlier run, though second in the call, is locked already; no chat is.
        assert!(
            !lockable(
                &mut check,
                "SELECT 1 FROM agent_chat_runs WHERE id = $1 FOR NO KEY UPDATE NOWAIT",
                first.id
            )
            .await,
            "{call}: the earlier run was not locked first"
        );
        for chat in [first.chat_id, second.chat_id] {
            assert!(
                lockable(
                    &mut check,
                    "SELECT 1 FROM agent_chats WHERE id = $1 FOR UPDATE NOWAIT",
                    chat
                )
                .await,
                "{call}: a chat was locked before the runs"
            );
        }
        sqlx::query("ROLLBACK").execute(&mut holder).await.unwrap();
        assert_eq!(made.await.unwrap().unwrap(), 2, "{call}");
    }
    for run in [&first, &second] {
        assert_eq!(
            store.get_run(run.id).await.unwrap().unwrap().status,
            RunStatus::Completed
        );
    }
    store.close().await;
}

/// A group commit of the run log key-share-locks its runs by id, as a claim locks them for update by id, whatever the
/// order of its rows: the two never wait for each other in a circle (which PostgreSQL would break only after a second,
/// failing one of them, the run log's every run waiting meanwhile).
#[tokio::test]
async fn a_group_commit_locks_its_runs_by_id_postgres() {
    let db = TestDb::postgres().await;
    let store = db.open().await;
    let ([first, second], [mut holder, mut check]) = two_runs_by_id(&db, &store).await;
    // Another transaction holds the later run as a claim does; the commit's rows name it first.
    hold(
        &mut holder,
        "SELECT 1 FROM agent_chat_runs WHERE id = $1 FOR UPDATE",
        second.id,
    )
    .await;
    let row = |run: Uuid| LogRow {
        run_id: run,
        epoch: 1,
        seq: 1,
        last_seq: 1,
        events: r#"{"type":"a"}"#.into(),
    };
    let commit = {
        let (store, rows) = (store.clone(), [row(second.id), row(first.id)]);
        tokio::spawn(async move { store.append_events(&rows).await })
    };
    until_statements_wait_for_locks(&mut check, 1, "group commit").await;
    assert!(
        !lockable(
            &mut check,
            "SELECT 1 FROM agent_chat_runs WHERE id = $1 FOR UPDATE NOWAIT",
            first.id
        )
        .await,
        "the earlier run was not locked first"
    );
    sqlx::query("ROLLBACK").execute(&mut holder).await.unwrap();
    assert_eq!(commit.await.unwrap().unwrap(), Vec::<Uuid>::new());
    for run in [&first, &second] {
        assert_eq!(store.events_of(run.id).await.unwrap().len(), 1);
    }
    store.close().await;
}

/// Deleting a chat locks its runs before it, as every transaction locks runs before chats: a delete waiting for a run
/// (held by its end, say) holds no lock on the chat meanwhile, which the end then takes.
#[tokio::test]
async fn deleting_a_chat_locks_its_runs_before_it_postgres() {
    use sqlx::Connection;
    let db = TestDb::postgres().await;
    let store = db.open().await;
    let (chat, run) = started_run(&store).await;
    let mut holder = sqlx::PgConnection::connect(db.url()).await.unwrap();
    let mut check = sqlx::PgConnection::connect(db.url()).await.unwrap();
    hold(
        &mut holder,
        "SELECT 1 FROM agent_chat_runs WHERE id = $1 FOR NO KEY UPDATE",
        run.id,
    )
    .await;
    let deleted = {
        let store = store.clone();
        tokio::spawn(async move { store.delete_chat(chat.id).await })
    };
    until_statements_wait_for_locks(&mut check, 1, "the delete").await;
    assert!(
        lockable(
            &mut check,
            "SELECT 1 FROM agent_chats WHERE id = $1 FOR UPDATE NOWAIT",
            chat.id
        )
        .await,
        "the chat was locked before its run"
    );
    sqlx::query("ROLLBACK").execute(&mut holder).await.unwrap();
    assert!(deleted.await.unwrap().unwrap());
    assert_eq!(store.get_chat(chat.id).await.unwrap(), None);
    assert_eq!(store.get_run(run.id).await.unwrap(), None);
    store.close().await;
}

/// Two runs started on `store`, the one with the lower id first, and two connections to `db` of their own: one to
/// hold rows ([`hold`]), one to look at the locks.
async fn two_runs_by_id(
    db: &TestDb,
    store: &SessionStore,
) -> ([NewRun; 2], [sqlx::PgConnection; 2]) {
    use sqlx::Connection;
    let (_, one) = started_run(store).await;
    let (_, two) = started_run(store).await;
    let runs = if one.id < two.id {
        [one, two]
    } else {
        [two, one]
    };
    let holder = sqlx::PgConnection::connect(db.url()).await.unwrap();
    let check = sqlx::PgConnection::connect(db.url()).await.unwrap();
    (runs, [holder, check])
}

/// Begins a transaction on `holder` that locks row `id` as `sql` does, until it is rolled back.
async fn hold(holder: &mut sqlx::PgConnection, sql: &'static str, id: Uuid) {
    sqlx::query("BEGIN").execute(&mut *holder).await.unwrap();
    sqlx::query(sql)
        .bind(id)
        .execute(&mut *holder)
        .await
        .unwrap();
}

/// Whether `sql` could lock row `id` at once (`NOWAIT`), in a transaction rolled back.
async fn lockable(check: &mut sqlx::PgConnection, sql: &'static str, id: Uuid) -> bool {
    sqlx::query("BEGIN").execute(&mut *check).await.unwrap();
    let taken = sqlx::query(sql).bind(id).execute(&mut *check).await;
    sqlx::query("ROLLBACK").execute(&mut *check).await.unwrap();
    taken.is_ok()
}

async fn the_run_log_keeps_events_in_order_and_sweeps_only_finished_runs(db: TestDb) {
    let store = db.open().await;
    let chat = store.create_chat(&owner("o", "u", "c")).await.unwrap();
    let other = store.create_chat(&owner("o", "u", "c")).await.unwrap();
    let (done, going) = (new_run(chat.id, "q"), new_run(other.id, "q"));
    store.start_run(&done).await.unwrap();
    store.start_run(&going).await.unwrap();
    let row = |run: Uuid, seq: u64, events: &[&str]| LogRow {
        run_id: run,
        epoch: 1,
        seq,
        last_seq: seq + events.len() as u64 - 1,
        events: events.join("\n"),
    };
    // One batch, several runs, consecutive events of a run in one row.
    store
        .append_events(&[
            row(done.id, 1, &[r#"{"type":"a"}"#, r#"{"type":"b"}"#]),
            row(going.id, 1, &[r#"{"type":"x"}"#]),
        ])
        .await
        .unwrap();
    store
        .append_events(&[row(done.id, 3, &[r#"{"type":"c"}"#])])
        .await
        .unwrap();
    let all = store.events_after(done.id, 0).await.unwrap();
    assert_eq!(
        all,
        [
            (1, r#"{"type":"a"}"#.to_owned()),
            (2, r#"{"type":"b"}"#.to_owned()),
            (3, r#"{"type":"c"}"#.to_owned()),
        ]
    );
    // From within a row, from its end, from the log's end.
    assert_eq!(store.events_after(done.id, 1).await.unwrap(), all[1..]);
    assert_eq!(store.events_after(done.id, 2).await.unwrap(), all[2..]);
    assert_eq!(store.events_after(done.id, 3).await.unwrap(), []);
    assert_eq!(store.last_seq(done.id).await.unwrap(), 3);
    assert_eq!(store.last_seq(Uuid::new_v4()).await.unwrap(), 0);
    // A seq is written once.
    assert!(
        store
            .append_events(&[row(done.id, 3, &[r#"{"type":"again"}"#])])
            .await
            .is_err()
    );

    store
        .finish_run(
            done.id,
            1,
            &end(RunStatus::Completed, "", Usage::default(), vec![]),
        )
        .await
        .unwrap();
    assert_eq!(
        store.sweep_events(Duration::from_secs(3600)).await.unwrap(),
        0
    );
    assert_eq!(store.sweep_events(Duration::ZERO).await.unwrap(), 2);
    assert_eq!(store.events_after(done.id, 0).await.unwrap(), []);
    assert_eq!(
        store.events_after(going.id, 0).await.unwrap().len(),
        1,
        "a running run keeps its log"
    );
    store.close().await;
}

/// A sweep deletes the events of every run past the retention however many there are (it reads a step of runs at a
/// time), the runs that ended at the same moment as a step's last one included; the next sweep reads on from where
/// this one got to, not from the first run the store holds.
async fn a_sweep_goes_through_thousands_of_finished_runs_and_reads_on_from_where_it_got(
    db: TestDb,
) {
    let store = db.open().await;
    let chat = store.create_chat(&owner("o", "u", "c")).await.unwrap();
    let going = new_run(chat.id, "q");
    store.start_run(&going).await.unwrap();
    // 2,500 runs with an event each: 1,000 that ended two hours ago one millisecond apart, 1,500 an hour ago at
    // the same moment (as a stopped process's runs are marked), and one that ended just now.
    db.execute(
        &format!(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 2501) \
             INSERT INTO agent_chat_runs (id, chat_id, model, status, owner_instance, heartbeat_at, created_at, \
             finished_at) SELECT 'old-' || i, '{chat}', 'test', 'completed', 'x', 0, 0, \
             CASE WHEN i <= 1000 THEN unixepoch() * 1000 - 7200000 + i \
             WHEN i <= 2500 THEN unixepoch() * 1000 - 3600000 ELSE unixepoch() * 1000 END FROM n; \
             INSERT INTO agent_run_events (run_id, seq, last_seq, events) \
             SELECT id, 1, 1, '{{}}' FROM agent_chat_runs WHERE id LIKE 'old-%';",
            chat = chat.id
        ),
        &format!(
            "INSERT INTO agent_chat_runs (id, chat_id, model, status, owner_instance, finished_at) \
             SELECT gen_random_uuid(), '{chat}', 'test', 'completed', 'x', \
             CASE WHEN i <= 1000 THEN now() - interval '2 hours' + i * interval '1 millisecond' \
             WHEN i <= 2500 THEN now() - interval '1 hour' ELSE now() END FROM generate_series(1, 2501) i; \
             INSERT INTO agent_run_events (run_id, seq, last_seq, events) \
             SELECT id, 1, 1, '{{}}' FROM agent_chat_runs WHERE owner_instance = 'x';",
            chat = chat.id
        ),
    )
    .await;
    store
        .append_events(&[log_row(going.id, 1, 1, r#"{"type":"run_started"}"#)])
        .await
        .unwrap();

    let retention = Duration::from_secs(1800);
    assert_eq!(store.sweep_events(retention).await.unwrap(), 2_500);
    assert_eq!(store.sweep_events(retention).await.unwrap(), 0);
    assert_eq!(
        store.events_after(going.id, 0).await.unwrap().len(),
        1,
        "a running run keeps its log"
    );
    // A row left behind by a run that ended long before where the sweeps got to stays: no sweep reads back there.
    let left = "INSERT INTO agent_run_events (run_id, seq, last_seq, events) \
                SELECT id, 2, 2, '{}' FROM agent_chat_runs WHERE finished_at IS NOT NULL \
                ORDER BY finished_at LIMIT 1";
    db.execute(left, left).await;
    assert_eq!(store.sweep_events(retention).await.unwrap(), 0);
    // The run that ended just now goes once it is past the retention.
    assert_eq!(store.sweep_events(Duration::ZERO).await.unwrap(), 1);
    store.close().await;
}

fn log_row(run_id: Uuid, epoch: u64, seq: u64, json: &str) -> LogRow {
    LogRow {
        run_id,
        epoch,
        seq,
        last_seq: seq,
        events: json.to_owned(),
    }
}

async fn a_claim_fences_the_old_producer_and_exactly_one_claimer_wins(db: TestDb) {
    let store = db.open().await;
    let (_, run) = started_run(&store).await;
    let lease = Duration::from_secs(30);
    // A live producer's run cannot be claimed.
    assert!(store.claim(&[run.id], lease, "b").await.unwrap().is_empty());

    // Its producer stops refreshing (paused, or dead); two replicas try to claim it at once.
    db.age_heartbeats(60).await;
    let ids = [run.id];
    let (b, c) = tokio::join!(store.claim(&ids, lease, "b"), store.claim(&ids, lease, "c"));
    let won: Vec<_> = [b.unwrap(), c.unwrap()].concat();
    assert_eq!(won, [(run.id, 2)], "exactly one claimer wins");
    let held = store.get_run(run.id).await.unwrap().unwrap();
    assert_eq!(held.epoch, 2);

    // The old producer wakes up: its appends, heartbeat and end are refused; the new one's are not.
    assert_eq!(
        store
            .append_events(&[log_row(run.id, 1, 1, r#"{"type":"stale"}"#)])
            .await
            .unwrap(),
        [run.id]
    );
    assert!(
        store
            .heartbeat("instance-a", &[run.id])
            .await
            .unwrap()
            .is_empty()
    );
    assert!(matches!(
        store
            .finish_run(
                run.id,
                1,
                &end(RunStatus::Completed, "", Usage::default(), vec![])
            )
            .await,
        Err(StoreError::Fenced(_))
    ));
    assert!(
        store
            .append_events(&[log_row(run.id, held.epoch, 1, r#"{"type":"fresh"}"#)])
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store.events_after(run.id, 0).await.unwrap(),
        [(1, r#"{"type":"fresh"}"#.to_owned())],
        "nothing of the old producer landed, and no seq twice"
    );
    // In one batch, a fenced run's row does not cost another run its append.
    let other_chat = store.create_chat(&owner("o", "u", "c")).await.unwrap();
    let other = new_run(other_chat.id, "q");
    store.start_run(&other).await.unwrap();
    assert_eq!(
        store
            .append_events(&[
                log_row(run.id, 1, 2, r#"{"type":"stale"}"#),
                log_row(other.id, 1, 1, r#"{"type":"ok"}"#),
            ])
            .await
            .unwrap(),
        [run.id]
    );
    assert_eq!(store.last_seq(other.id).await.unwrap(), 1);
    store
        .finish_run(
            run.id,
            2,
            &end(RunStatus::Completed, "", Usage::default(), vec![]),
        )
        .await
        .unwrap();
    store.close().await;
}

async fn a_followed_run_is_left_for_a_takeover_and_a_released_one_is_claimable_at_once(db: TestDb) {
    let store = db.open().await;
    let (_, run) = started_run(&store).await;
    let lease = Duration::from_secs(30);

    // Released by its draining producer: claimable at once, though its heartbeat is fresh.
    assert!(store.release(run.id, 1).await.unwrap());
    assert!(!store.release(run.id, 1).await.unwrap(), "released once");
    assert_eq!(
        store.get_run(run.id).await.unwrap().unwrap().owner_instance,
        ""
    );
    assert_eq!(
        store.claim(&[run.id], lease, "b").await.unwrap(),
        [(run.id, 3)]
    );

    // Its new producer dies too, but a replica still follows it: it is not interrupted, and stays claimable.
    db.age_heartbeats(60).await;
    store.touch_followed(&[run.id]).await.unwrap();
    assert!(store.interrupt_stale(lease).await.unwrap().is_empty());
    assert_eq!(
        store.claim(&[run.id], lease, "c").await.unwrap(),
        [(run.id, 4)]
    );
    store.close().await;
}

/// PostgreSQL: a group commit notifies every row it stored, and only those, in payloads PostgreSQL takes (under
/// 8,000 bytes), carrying the events of each row that fits when its run is followed on another replica, and only
/// the range of one that does not fit or whose run nobody follows elsewhere.
#[tokio::test]
async fn a_group_commit_notifies_each_stored_row_in_payloads_postgres_takes() {
    let db = TestDb::postgres().await;
    let store = db.open().await;
    let mut listener = store.listen(&[EVENTS_CHANNEL]).await.unwrap().unwrap();
    let chat = store.create_chat(&owner("o", "u", "c")).await.unwrap();
    let mut rows = Vec::new();
    for i in 0..120_usize {
        let other = store.create_chat(&owner("o", "u", "c")).await.unwrap();
        let run = new_run(if i == 0 { chat.id } else { other.id }, "q");
        store.start_run(&run).await.unwrap();
        // Every other run is followed on another replica.
        if i % 2 == 1 {
            store.follow_elsewhere(run.id).await.unwrap();
        }
        // Small rows, rows just under the size carried and rows just over it, mixed.
        let text = "x".repeat([10, 2_950, 3_100][i % 3]);
        rows.push(LogRow {
            run_id: run.id,
            // The first run is held under another epoch: refused, and not notified.
            epoch: if i == 0 { 7 } else { 1 },
            seq: 1,
            last_seq: 2,
            events: format!("{{\"t\":\"{text}\"}}\n{{\"type\":\"done\"}}"),
        });
    }
    assert_eq!(store.append_events(&rows).await.unwrap(), [rows[0].run_id]);

    let mut notified = std::collections::HashMap::new();
    let mut payloads = 0;
    while notified.len() < rows.len() - 1 {
        let Ok(got) = tokio::time::timeout(Duration::from_secs(3), listener.recv()).await else {
            for (i, row) in rows.iter().enumerate() {
                if !notified.contains_key(&row.run_id) {
                    eprintln!("missing {i}");
                }
            }
            panic!();
        };
        let (channel, payload) = got.unwrap().unwrap();
        assert_eq!(channel, EVENTS_CHANNEL);
        assert!(
            payload.len() < 8_000,
            "a payload of {} bytes",
            payload.len()
        );
        payloads += 1;
        for record in payload.split(RECORD_SEPARATOR) {
            let (head, events) = match record.split_once('\n') {
                Some((head, events)) => (head, Some(events.to_owned())),
                None => (record, None),
            };
            let mut parts = head.split(' ');
            let run_id: Uuid = parts.next().unwrap().parse().unwrap();
            assert_eq!(parts.collect::<Vec<_>>(), ["1", "2"]);
            assert!(notified.insert(run_id, events).is_none(), "notified once");
        }
    }
    assert!(payloads > 1, "the records are spread over several payloads");
    for (i, row) in rows.iter().enumerate().skip(1) {
        let carried = notified
            .remove(&row.run_id)
            .expect("a stored row is notified");
        if row.events.len() > 3_000 {
            assert_eq!(carried, None, "too large to carry: only its range");
        } else if i % 2 == 0 {
            assert_eq!(carried, None, "nobody follows it elsewhere: only its range");
        } else {
            assert_eq!(carried.as_deref(), Some(row.events.as_str()));
        }
    }
    assert!(notified.is_empty(), "the refused row is not notified");
    // The listener's connection is the pool's: give it back before closing.
    drop(listener);
    store.close().await;
}

/// PostgreSQL: the server ends every session of the store (as a restart does) a moment after each of its pooled
/// connections was used. The first statement after it fails on its lost connection; the pool then checks the others
/// before their next use and replaces them, so the statements after it do not fail.
#[tokio::test]
async fn once_a_connection_is_found_lost_the_others_are_checked_before_use() {
    let db = TestDb::postgres().await;
    let mut store = db.open().await;
    // Every pooled connection opened and used just now.
    store.warm_up().await.unwrap();
    let ended = end_every_session(&db).await;
    assert!(ended >= 16, "{ended} sessions ended");

    let first = store.ping().await;
    assert!(
        first.as_ref().is_err_and(StoreError::is_unavailable),
        "{first:?}"
    );
    for i in 0..20 {
        store
            .ping()
            .await
            .unwrap_or_else(|e| panic!("statement {i} after the first: {e}"));
    }
    store.ping_write().await.unwrap();
    store.close().await;
}

/// PostgreSQL: the run log's connection, kept from one group commit to the next, is checked before a commit that
/// comes after a pause or after a connection was found lost, as the pool's are: the server ending every session
/// then fails no group commit.
#[tokio::test]
async fn the_run_logs_kept_connection_is_checked_after_a_pause_or_a_loss() {
    let db = TestDb::postgres().await;
    let store = db.open().await;
    let (_, run) = started_run(&store).await;
    let append = |seq: u64| {
        let store = &store;
        let row = log_row(run.id, 1, seq, "{}");
        async move { store.append_events(&[row]).await }
    };
    assert!(append(2).await.unwrap().is_empty());

    // A pause longer than a connection may sit idle unchecked, then every session ends.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert!(end_every_session(&db).await >= 1);
    assert!(
        append(3)
            .await
            .expect("the commit after a pause")
            .is_empty()
    );

    // Every session ends again, a moment after the last commit and statements on the pool; one of those
    // connections, used too recently to be checked, is found lost before the next commit.
    store.ping().await.unwrap();
    assert!(end_every_session(&db).await >= 1);
    let mut lost = None;
    for _ in 0..16 {
        if let Err(error) = store.ping().await {
            lost = Some(error);
            break;
        }
    }
    assert!(
        lost.as_ref().is_some_and(StoreError::is_unavailable),
        "{lost:?}"
    );
    assert!(append(4).await.expect("the commit after a loss").is_empty());

    assert_eq!(stored_seqs(&store, run.id).await, [2, 3, 4]);
    store.close().await;
}

/// Ends every session of the test's database but the asking one, as a server restart does, and waits until they are
/// gone; how many it ended.
async fn end_every_session(db: &TestDb) -> usize {
    use sqlx::Connection as _;

    let mut admin = sqlx::PgConnection::connect(db.url()).await.unwrap();
    let ended: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    .fetch_all(&mut admin)
    .await
    .unwrap();
    for _ in 0..100 {
        let left: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        .fetch_one(&mut admin)
        .await
        .unwrap();
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    ended.len()
}

/// Opens a transaction on `conn` that holds run `run_id` key-share-locked, as a group commit in flight does; it ends
/// with the caller's `COMMIT`.
async fn begin_commit_in_flight(conn: &mut sqlx::PgConnection, run_id: Uuid) {
    sqlx::query("BEGIN").execute(&mut *conn).await.unwrap();
    sqlx::query("SELECT id FROM agent_chat_runs WHERE id = $1 FOR KEY SHARE")
        .bind(run_id)
        .execute(&mut *conn)
        .await
        .unwrap();
}

/// PostgreSQL: the note that a follower on another replica attaches to a run waits for a group commit in flight for
/// the run (which did not see it, and carries only its range), and the commits after it carry the run's events.
#[tokio::test]
async fn a_follower_noted_elsewhere_waits_for_the_commit_in_flight_then_the_events_are_carried() {
    use sqlx::Connection as _;

    let db = TestDb::postgres().await;
    let store = db.open().await;
    let mut listener = store.listen(&[EVENTS_CHANNEL]).await.unwrap().unwrap();
    let (_, run) = started_run(&store).await;
    // A group commit in flight holds the run key-share-locked, as the append does.
    let mut in_flight = sqlx::PgConnection::connect(db.url()).await.unwrap();
    begin_commit_in_flight(&mut in_flight, run.id).await;
    let noting = tokio::spawn({
        let store = store.clone();
        async move { store.follow_elsewhere(run.id).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !noting.is_finished(),
        "the note waits for the commit in flight"
    );
    sqlx::query("COMMIT").execute(&mut in_flight).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), noting)
        .await
        .expect("the note is made once the commit in flight is done")
        .unwrap()
        .unwrap();

    let row = |seq: u64| LogRow {
        run_id: run.id,
        epoch: 1,
        seq,
        last_seq: seq,
        events: format!("{{\"seq\":{seq}}}"),
    };
    assert!(store.append_events(&[row(2)]).await.unwrap().is_empty());
    let (channel, payload) = tokio::time::timeout(Duration::from_secs(3), listener.recv())
        .await
        .expect("the commit notifies")
        .unwrap()
        .unwrap();
    assert_eq!(channel, EVENTS_CHANNEL);
    assert_eq!(payload, format!("{} 2 2\n{{\"seq\":2}}", run.id));

    // Another follower attaching elsewhere later: the run is noted already, and the note waits for no commit.
    begin_commit_in_flight(&mut in_flight, run.id).await;
    tokio::time::timeout(Duration::from_secs(5), store.follow_elsewhere(run.id))
        .await
        .expect("a run noted already is noted again without waiting")
        .unwrap();
    sqlx::query("COMMIT").execute(&mut in_flight).await.unwrap();
    drop(listener);
    store.close().await;
}

/// A SQLite database made before the run log's rows moved out of its key keeps its log: the rows are moved, read back
/// in order, appended to and deleted with their chat, as in a new database.
#[tokio::test]
async fn a_sqlite_run_log_written_before_its_rows_moved_out_of_the_key_is_kept() {
    use sqlx::Connection;

    let db = TestDb::sqlite();
    let (chat, run) = (Uuid::new_v4(), Uuid::new_v4());
    {
        let options: sqlx::sqlite::SqliteConnectOptions = db.url().parse().unwrap();
        let mut conn = sqlx::SqliteConnection::connect_with(&options.create_if_missing(true))
            .await
            .unwrap();
        let all = sqlx::migrate!("../../migrations/sqlite");
        let before = sqlx::migrate::Migrator {
            migrations: all
                .migrations
                .iter()
                .filter(|m| m.version < 20261203000003)
                .cloned()
                .collect::<Vec<_>>()
                .into(),
            ..sqlx::migrate::Migrator::DEFAULT
        };
        assert!(before.migrations.len() < all.migrations.len());
        before.run(&mut conn).await.unwrap();
        sqlx::query(
            "INSERT INTO agent_chats (id, org_id, user_id, canvas_id, created_at, updated_at) \
             VALUES (?1, 'o', 'u', 'c', 0, 0)",
        )
        .bind(chat.to_string())
        .execute(&mut conn)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO agent_chat_runs (id, chat_id, model, status, owner_instance, heartbeat_at, created_at) \
             VALUES (?1, ?2, 'test', 'running', 'instance-a', 0, 0)",
        )
        .bind(run.to_string())
        .bind(chat.to_string())
        .execute(&mut conn)
        .await
        .unwrap();
        // A batch larger than a key entry keeps on its page, as a busy group commit writes.
        let long: Vec<String> = (2..=60)
            .map(|seq| format!(r#"{{"type":"model_delta","seq":{seq},"text":"word {seq}"}}"#))
            .collect();
        for (seq, last_seq, events) in [
            (1, 1, r#"{"type":"run_started"}"#.to_owned()),
            (2, 60, long.join("\n")),
        ] {
            sqlx::query(
                "INSERT INTO agent_run_events (run_id, seq, last_seq, events) VALUES (?1, ?2, ?3, ?4)",
            )
            .bind(run.to_string())
            .bind(seq)
            .bind(last_seq)
            .bind(events)
            .execute(&mut conn)
            .await
            .unwrap();
        }
        conn.close().await.unwrap();
    }

    let store = db.open().await;
    let events = store.events_of(run).await.unwrap();
    assert_eq!(events.len(), 60);
    assert_eq!(events[0], (1, r#"{"type":"run_started"}"#.to_owned()));
    assert_eq!(
        events[59],
        (
            60,
            r#"{"type":"model_delta","seq":60,"text":"word 60"}"#.to_owned()
        )
    );
    assert!(events.windows(2).all(|pair| pair[1].0 == pair[0].0 + 1));
    assert!(
        store
            .append_events(&[log_row(run, 1, 61, r#"{"type":"done"}"#)])
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(store.last_seq(run).await.unwrap(), 61);
    // A seq is still written once.
    assert!(
        store
            .append_events(&[log_row(run, 1, 61, r#"{"type":"again"}"#)])
            .await
            .is_err()
    );
    assert!(store.delete_chat(chat).await.unwrap());
    assert!(store.events_after(run, 0).await.unwrap().is_empty());
    store.close().await;
}

/// A run start on SQLite waits for the one writer as long as a request waits for any pooled connection (3 s), then
/// is refused as unavailable and counted, and leaves nothing; a start whose request is given up is not made; the store
/// starts runs again once the writer is free.
#[tokio::test]
async fn a_sqlite_start_waits_for_the_writer_no_longer_than_for_a_connection() {
    let db = TestDb::sqlite();
    let store = db.open().await;
    let chat = store.create_chat(&owner("o", "u", "c")).await.unwrap();
    // Another process holds the database's write lock: the writer's next statement waits for it in SQLite's busy
    // handler (up to 5 s), holding the writer.
    let mut other = db.hold_write_lock().await;
    let held = tokio::spawn({
        let store = store.clone();
        async move { store.heartbeat("instance-a", &[Uuid::new_v4()]).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;

    let run = new_run(chat.id, "q");
    let asked = std::time::Instant::now();
    let refused = store.start_run(&run).await;
    assert!(
        matches!(&refused, Err(error) if error.is_busy() && error.is_unavailable()),
        "{refused:?}"
    );
    assert!(asked.elapsed() >= Duration::from_millis(2_900));
    assert!(
        !held.is_finished(),
        "refused while the writer was still held"
    );
    assert_eq!(store.pool_waits().timeouts.get(), 1);
    // A start whose request is given up while it waits (its client left) is not made once the writer is free.
    let abandoned = new_run(chat.id, "gone");
    assert!(
        tokio::time::timeout(Duration::from_millis(300), store.start_run(&abandoned))
            .await
            .is_err()
    );

    sqlx::query("ROLLBACK").execute(&mut other).await.unwrap();
    held.await.unwrap().unwrap();
    assert!(runs_of(&store, chat.id).await.is_empty());
    assert!(store.messages(chat.id).await.unwrap().is_empty());
    let next = new_run(chat.id, "q2");
    store.start_run(&next).await.unwrap();
    assert_eq!(runs_of(&store, chat.id).await.len(), 1);
    store.close().await;
}

/// Once the process is closing (its drain began), a SQLite store keeps its WAL small, so that emptying it at exit is
/// short; while serving, the WAL is started over only past 32 MiB.
#[tokio::test]
async fn a_closing_sqlite_store_keeps_its_wal_small() {
    let db = TestDb::sqlite();
    let store = db.open().await;
    let (_, run) = started_run(&store).await;
    let delta = json!({"type": "model_delta", "delta": "x".repeat(60_000)}).to_string();
    let mut seq = 1;
    let mut write = async |rows: u64| {
        for _ in 0..rows {
            seq += 1;
            let row = log_row(run.id, 1, seq, &delta);
            assert!(store.append_events(&[row]).await.unwrap().is_empty());
        }
    };
    // About 6 MiB, checkpointed in the background but not started over.
    write(100).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    write(1).await;
    assert!(db.wal_bytes() > 4 << 20, "{} bytes", db.wal_bytes());
    store.closing_soon();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    // The checkpointer starts the WAL over, and the next write trims it to 1 MiB.
    while db.wal_bytes() > 2 << 20 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the WAL is still {} bytes",
            db.wal_bytes()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        write(1).await;
    }
    // Nothing written was lost.
    let written = usize::try_from(seq - 1).unwrap();
    assert_eq!(store.events_after(run.id, 1).await.unwrap().len(), written);
    store.close().await;
    assert_eq!(db.wal_bytes(), 0, "emptied at the end");
}
