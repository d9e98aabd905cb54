//! What a run writes to the store, and when.
//!
//! The run row and the prompt are stored before the stream starts ([`super::RunService::start`]). While the answer
//! streams, the answer so far is saved at most every [`SAVE_EVERY`] while it changes, so a crash loses at most the
//! text of the last 250 ms. How the run ended is stored before the client is told: the answer's messages and usage
//! for a completed run, the error for a failed one, and the partial answer for an interrupted one.

use std::time::Duration;

use uuid::Uuid;

use crate::model::{Message, Usage};
use crate::store::{RunEnd, RunStatus, SessionStore, StoreError};

/// How often the answer so far is saved while it grows: the most text a crash can lose.
pub const SAVE_EVERY: Duration = Duration::from_millis(250);

/// What the run has produced so far; kept outside the cancellable loop so an interrupted run still has it.
#[derive(Debug)]
pub(super) struct Recorder {
    store: SessionStore,
    run_id: Uuid,
    /// The answer text so far, across steps.
    pub output: String,
    pub usage: Usage,
    /// Messages added after the prompt: the model's answers and the tool results.
    pub messages: Vec<Message>,
    /// How much of `output` the store has.
    saved_len: usize,
    pub save_tick: tokio::time::Interval,
}

impl Recorder {
    pub fn new(store: SessionStore, run_id: Uuid) -> Self {
        let mut save_tick =
            tokio::time::interval_at(tokio::time::Instant::now() + SAVE_EVERY, SAVE_EVERY);
        save_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Self {
            store,
            run_id,
            output: String::new(),
            usage: Usage::default(),
            messages: Vec::new(),
            saved_len: 0,
            save_tick,
        }
    }

    pub fn unsaved(&self) -> bool {
        self.output.len() != self.saved_len
    }

    /// Saves the answer so far if it grew since the last save.
    pub async fn save(&mut self) -> Result<(), StoreError> {
        if !self.unsaved() {
            return Ok(());
        }
        self.store
            .save_partial(self.run_id, &self.output)
            .await
            .inspect_err(|error| {
                tracing::error!(run_id = %self.run_id, %error, "could not save the answer so far");
            })?;
        self.saved_len = self.output.len();
        Ok(())
    }

    /// Stores how the run ended: its messages only when it completed, the answer so far in any case.
    pub async fn finish(
        &mut self,
        status: RunStatus,
        error: Option<String>,
    ) -> Result<RunEnd, StoreError> {
        let end = RunEnd {
            status,
            error,
            output: std::mem::take(&mut self.output),
            usage: self.usage,
            messages: if status == RunStatus::Completed {
                std::mem::take(&mut self.messages)
            } else {
                Vec::new()
            },
        };
        self.store.finish_run(self.run_id, &end).await?;
        Ok(end)
    }
}
