//! Tests of the run log: what followers of runs produced elsewhere keep from notifications, and when they read the
//! store.

use super::*;
use std::time::Duration;

use crate::runs::follow::Follower;
use crate::store::{ChatOwner, LogRow, NewRun, StoreConfig};

fn reads(metrics: &Metrics) -> u64 {
    let text = metrics.render(0, &[]);
    let line = text
        .lines()
        .find(|line| line.starts_with("agentd_run_log_reads_total "))
        .expect("the reads counter");
    line.split(' ').nth(1).unwrap().parse().unwrap()
}

/// A follower of a run produced elsewhere reads the store once when it attaches, then lives on what the
/// notifications carry; a notification it has already read past costs no read, and a catch-up (the listener
/// reconnected) reads at once what the missed notifications would have said.
#[tokio::test]
async fn a_remote_follower_reads_the_store_only_when_the_notifications_cannot_tell() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("agentd.db").display());
    let store = crate::store::open(&StoreConfig::Sqlite(url.parse().unwrap()))
        .await
        .unwrap();
    let owner = ChatOwner {
        org_id: "org".to_owned(),
        user_id: "user".to_owned(),
        canvas_id: "canvas".to_owned(),
    };
    let chat = store.create_chat(&owner).await.unwrap();
    let run_id = Uuid::new_v4();
    let event = |seq: u64| format!("{{\"type\":\"model_delta\",\"content\":\"{seq}\"}}");
    store
        .start_run(&NewRun {
            id: run_id,
            chat_id: chat.id,
            owner,
            model: "test".to_owned(),
            owner_instance: "elsewhere".to_owned(),
            prompt: "q".to_owned(),
            first_event: Some(event(1)),
            agent_context: None,
        })
        .await
        .unwrap();
    let append = |seq: u64, last_seq: u64| {
        let store = store.clone();
        async move {
            let events: Vec<String> = (seq..=last_seq).map(event).collect();
            let row = LogRow {
                run_id,
                epoch: 1,
                seq,
                last_seq,
                events: events.join("\n"),
            };
            assert!(store.append_events(&[row]).await.unwrap().is_empty());
        }
    };
    append(2, 3).await;
    let metrics = Arc::new(Metrics::default());
    let (log, _queue) = RunLog::new(store.clone(), Arc::clone(&metrics));
    let mut follower = Follower::new(run_id, log.clone(), 0, Arc::clone(&metrics));
    assert!(!follower.is_local());
    let next = async |follower: &mut Follower| {
        tokio::time::timeout(Duration::from_secs(2), follower.next_event())
            .await
            .map(|event| event.expect("an event").0)
    };
    for seq in 1..=3 {
        assert_eq!(next(&mut follower).await, Ok(seq));
    }
    assert_eq!(reads(&metrics), 1);

    // The notification of events the read already found: nothing to read, nothing to send.
    log.notified(run_id, 3, 3, Some(&event(3)));
    assert!(
        tokio::time::timeout(Duration::from_millis(300), follower.next_event())
            .await
            .is_err()
    );
    assert_eq!(reads(&metrics), 1);

    // Committed while the listener was away: the catch-up reads them.
    append(4, 5).await;
    log.catch_up_all();
    assert_eq!(next(&mut follower).await, Ok(4));
    assert_eq!(next(&mut follower).await, Ok(5));
    assert_eq!(reads(&metrics), 2);

    // Then the notifications' events again, without reading.
    log.notified(run_id, 6, 6, Some(&event(6)));
    assert_eq!(next(&mut follower).await, Ok(6));
    assert_eq!(reads(&metrics), 2);
}

#[test]
fn notified_events_are_kept_in_order_and_a_gap_starts_over() {
    let run = RemoteRun {
        committed: Committed::new(0),
        recent: Mutex::default(),
        catch_ups: AtomicU64::new(0),
        caller: Mutex::default(),
    };
    run.carried(1, "{\"a\":1}\n{\"a\":2}");
    run.carried(3, "{\"a\":3}");
    let from_two: Vec<u64> = run
        .recent_from(2)
        .unwrap()
        .iter()
        .map(|(seq, _)| *seq)
        .collect();
    assert_eq!(from_two, [2, 3]);
    assert!(run.recent_from(4).is_none());
    run.carried(7, "{\"a\":7}");
    assert!(
        run.recent_from(3).is_none(),
        "a gap: what came before is dropped"
    );
    assert_eq!(&*run.recent_from(7).unwrap()[0].1, "{\"a\":7}");
}

/// A run log on a new SQLite store, with its writer's queue (nothing writes) and the store's directory.
async fn log_on_a_new_sqlite_store() -> (RunLog, WriterQueue, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("agentd.db").display());
    let store = crate::store::open(&StoreConfig::Sqlite(url.parse().unwrap()))
        .await
        .unwrap();
    let (log, queue) = RunLog::new(store, Arc::new(Metrics::default()));
    (log, queue, dir)
}

/// One producer of a run per process: a run produced here again (a claim under a newer epoch) stops the producer
/// before it, whose followers read on from the store, and its new followers follow the new one.
#[tokio::test]
async fn a_run_produced_here_again_stops_its_earlier_producer() {
    let (log, _queue, _dir) = log_on_a_new_sqlite_store().await;
    let run_id = Uuid::new_v4();
    let first = log.produce(run_id, 2, vec!["{\"type\":\"run_started\"}".into()]);
    assert!(!first.live().has_halted_for(Halt::Moved));
    let second = log.produce(run_id, 3, vec!["{\"type\":\"run_started\"}".into()]);
    assert!(first.live().has_halted_for(Halt::Moved));
    assert!(!second.live().has_halted_for(Halt::Moved));
    assert!(Arc::ptr_eq(&log.live(run_id).unwrap(), second.live()));
}

/// A wait for a run's halt ends for the reasons it waits for only, with the first of them that happened, in `Halt`'s
/// order; waits begun before a halt and after it see it alike.
#[tokio::test]
async fn a_wait_for_a_halt_ends_for_its_reasons_only() {
    let (log, _queue, _dir) = log_on_a_new_sqlite_store().await;
    let writer = log.produce(Uuid::new_v4(), 1, vec!["{\"type\":\"run_started\"}".into()]);
    let live = Arc::clone(writer.live());
    // Each wait on a task of its own, and bounded: a wait nothing wakes fails the test rather than hangs it.
    let waiting = |reasons: &'static [Halt]| {
        let live = Arc::clone(&live);
        tokio::spawn(async move { live.halted_for(reasons).await })
    };
    let ended = |wait: tokio::task::JoinHandle<Halt>| async move {
        tokio::time::timeout(Duration::from_secs(5), wait)
            .await
            .expect("the wait ends")
            .unwrap()
    };
    let moved = waiting(&[Halt::Moved]);
    let stopped = waiting(&[Halt::Unlogged, Halt::Moved]);
    let any = waiting(&HALTS);
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(!any.is_finished());

    live.halt(Halt::Cancelled);
    assert_eq!(ended(any).await, Halt::Cancelled);
    assert!(live.has_halted_for(Halt::Cancelled));
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(!moved.is_finished() && !stopped.is_finished());

    live.halt(Halt::Unlogged);
    assert_eq!(ended(stopped).await, Halt::Unlogged);
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(!moved.is_finished());

    live.halt(Halt::Moved);
    assert_eq!(ended(moved).await, Halt::Moved);
    // Begun after the halts: they end at once, with the first reason in order.
    assert_eq!(ended(waiting(&HALTS)).await, Halt::Moved);
    assert_eq!(
        ended(waiting(&[Halt::Cancelled, Halt::Unlogged])).await,
        Halt::Cancelled
    );
}

/// A run whose events find the writer's queue full waits for room, and its event goes in after those before it: none
/// is dropped or reordered.
#[tokio::test]
async fn an_event_that_finds_the_queue_full_waits_for_room_and_keeps_its_place() {
    let (log, mut queue, _dir) = log_on_a_new_sqlite_store().await;
    let run_id = Uuid::new_v4();
    let mut writer = log.produce(run_id, 1, vec!["{\"type\":\"run_started\"}".into()]);
    let delta = |content: &str| RunEvent::ModelDelta {
        content: content.to_owned(),
    };
    for _ in 0..QUEUE {
        writer.emit(delta("a")).await;
    }
    let waiting = tokio::spawn(async move {
        writer.emit(delta("last")).await;
        writer
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!waiting.is_finished(), "the queue is full: the event waits");
    let first = queue.0.recv().await.unwrap();
    assert_eq!((first.run_id, first.seq), (run_id, 2));
    let writer = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("room was made: the event goes in")
        .unwrap();
    let mut seqs = vec![first.seq];
    while let Ok(append) = queue.0.try_recv() {
        seqs.push(append.seq);
        if append.seq == seqs[0] + QUEUE as u64 {
            assert!(append.json.contains("\"last\""), "{}", append.json);
        }
    }
    assert_eq!(seqs, (2..=QUEUE as u64 + 2).collect::<Vec<_>>());
    assert_eq!(writer.live().events.lock().unwrap().len(), QUEUE + 2);
}
