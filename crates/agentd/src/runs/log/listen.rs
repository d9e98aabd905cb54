//! Notifications from the store (PostgreSQL): events of runs produced elsewhere, cancels and releases.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::RunLog;
use crate::store::{CANCEL_CHANNEL, EVENTS_CHANNEL, RECORD_SEPARATOR, RELEASED_CHANNEL};

/// How long the listener waits before connecting again after its connection failed.
const LISTEN_RETRY: Duration = Duration::from_secs(1);

/// Follows the store's notifications (PostgreSQL): new events of runs followed here, and cancels of runs produced
/// here. One connection for the whole process; after it reconnects, every follower catches up from the store.
pub async fn listen(log: RunLog, stop: CancellationToken) {
    let mut listener = None;
    loop {
        if listener.is_none() {
            match log
                .inner
                .store
                .listen(&[EVENTS_CHANNEL, CANCEL_CHANNEL, RELEASED_CHANNEL])
                .await
            {
                Ok(Some(connected)) => {
                    listener = Some(connected);
                    log.catch_up_all();
                }
                // One process (SQLite): nothing to listen to.
                Ok(None) => return,
                Err(error) => {
                    tracing::warn!(%error, "cannot listen for run events; retrying");
                    tokio::select! {
                        () = tokio::time::sleep(LISTEN_RETRY) => continue,
                        () = stop.cancelled() => return,
                    }
                }
            }
        }
        let connected = listener.as_mut().expect("connected above");
        let received = tokio::select! {
            received = connected.recv() => received,
            () = stop.cancelled() => return,
        };
        match received {
            // The connection dropped (the next call reconnects): notifications may have been missed.
            Ok(None) => log.catch_up_all(),
            Ok(Some((channel, payload))) if channel == RELEASED_CHANNEL => {
                if let Ok(run_id) = Uuid::parse_str(&payload) {
                    log.released(run_id);
                }
            }
            Ok(Some((channel, payload))) if channel == CANCEL_CHANNEL => {
                if let Ok(run_id) = Uuid::parse_str(&payload) {
                    log.cancel_here(run_id);
                }
            }
            Ok(Some((_, payload))) => {
                for record in payload.split(RECORD_SEPARATOR) {
                    if let Some((run_id, seq, last_seq, events)) = parse_record(record) {
                        log.notified(run_id, seq, last_seq, events);
                    }
                }
            }
            Err(error) => {
                tracing::warn!(%error, "lost the run events listener; reconnecting");
                listener = None;
            }
        }
    }
}

/// One record of an events notification: `<run_id> <seq> <last_seq>`, then a newline and the events' JSON (one per
/// line) when they fitted.
fn parse_record(record: &str) -> Option<(Uuid, u64, u64, Option<&str>)> {
    let (head, events) = match record.split_once('\n') {
        Some((head, events)) => (head, Some(events)),
        None => (record, None),
    };
    let mut parts = head.split(' ');
    let run_id = Uuid::parse_str(parts.next()?).ok()?;
    let seq = parts.next()?.parse().ok()?;
    let last_seq = parts.next()?.parse().ok()?;
    Some((run_id, seq, last_seq, events))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_carry_their_events_when_they_fit() {
        let id = Uuid::new_v4();
        let with = format!("{id} 4 5\n{{}}\n{{}}");
        assert_eq!(parse_record(&with), Some((id, 4, 5, Some("{}\n{}"))));
        assert_eq!(parse_record(&format!("{id} 4 5")), Some((id, 4, 5, None)));
        assert_eq!(parse_record("garbage"), None);
    }
}
