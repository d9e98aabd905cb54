//! What a run writes to the store, and when.
//!
//! The run row and the prompt are stored before the stream starts ([`super::RunService::start`]). While the answer
//! streams, every event is in the run log ([`super::log`]) before anyone sees it, so nothing else is written: a run
//! whose process dies gets its answer so far back from its log ([`super::lease`]). How the run ended is stored before
//! the client is told: the answer's messages and usage for a completed run, the error for a failed one, and the
//! partial answer for an interrupted one.

use uuid::Uuid;

use crate::model::{Message, Usage};
use crate::store::{RunEnd, RunStatus, SessionStore, StoreError};

/// What a completed run whose answer the model's output limit cut keeps as its `error`.
pub(super) const TRUNCATED: &str = "the answer was cut by the model's output token limit";

/// What the run has produced so far; kept outside the cancellable loop so an interrupted run still has it. It lives
/// in the run's task for as long as the run lasts, beside the run's context: what the context holds (the store, the
/// run, its epoch) is not held here again.
#[derive(Debug, Default)]
pub(super) struct Recorder {
    /// The answer text so far, across steps.
    pub output: String,
    pub usage: Usage,
    /// Messages added after the prompt: the model's answers and the tool results.
    pub messages: Vec<Message>,
    /// With an output schema, the validated answer object: what `final_answer` carries.
    pub structured: Option<serde_json::Value>,
    /// The model's output limit cut the answer: said on `final_answer` and kept with the run.
    pub truncated: bool,
}

impl Recorder {
    /// Stores in `store` how run `run_id` ended, if it is still held under `epoch`: its messages only when it
    /// completed, the answer so far in any case.
    pub async fn finish(
        &mut self,
        store: &SessionStore,
        run_id: Uuid,
        epoch: u64,
        status: RunStatus,
        error: Option<String>,
    ) -> Result<RunEnd, StoreError> {
        let error = match (status, self.truncated) {
            (RunStatus::Completed, true) => Some(TRUNCATED.to_owned()),
            _ => error,
        };
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
        store.finish_run(run_id, epoch, &end).await?;
        Ok(end)
    }
}
