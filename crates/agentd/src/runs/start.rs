//! Starting a run: the checks that can refuse it, the store's start (run row, prompt, first event), the task that
//! drives it, and its first follower.

use std::sync::Arc;

use uuid::Uuid;

use super::drive::drive;
use super::engine::{Prompt, Resumed, RunContext};
use super::events::RunEvent;
use super::{
    AgentContext, ContextMode, RunError, RunHandle, RunRequest, RunService, dev_owner, owned,
    tool_context,
};
use crate::auth::{AuthError, Identity};
use crate::instructions::Fill;
use crate::model::{Model, ModelSpec};
use crate::store::{ChatOwner, NewRun};
use crate::tools::ToolContext;

impl RunService {
    /// Starts a run of `request` in `chat_id` for `caller`, and follows it from its first event. Everything that can
    /// be refused is refused here, before any event: a service that is not admitting says so before the store is
    /// asked anything.
    pub async fn start(
        &self,
        caller: Identity,
        chat_id: Uuid,
        request: RunRequest,
    ) -> Result<RunHandle, RunError> {
        let parts = &self.inner.parts;
        let model = request
            .model
            .unwrap_or_else(|| parts.models.default.clone());
        // A run streaming from a provider holds its socket too, beside the client's, or its share of one when the
        // provider's streams share connections (HTTP/2).
        let descriptors = model.descriptors(&parts.providers);
        parts
            .tracker
            .admitting(descriptors)
            .map_err(|r| self.rejected(r))?;
        if !parts.models.allows(&model) {
            return Err(RunError::ModelNotAllowed(model.to_string()));
        }
        parts
            .models
            .test_within_limit(&model)
            .map_err(RunError::ModelOverLimit)?;
        if let ModelSpec::Test(options) = &model
            && let Some(tool) = &options.tool
            && parts.tools.get(tool).is_none()
        {
            return Err(RunError::UnknownTool(tool.clone()));
        }
        if matches!(caller, Identity::Dev) && !model.is_test() {
            return Err(RunError::Unauthorized(AuthError::TokenRequired(
                model.to_string(),
            )));
        }
        // Whose chat this must be. A token for one canvas says so itself, and the store checks it as it starts the run
        // (a chat of another owner is missing there too); otherwise the chat is looked up first.
        let sole_owner = match &caller {
            Identity::Token(claims) => claims.sole_owner(),
            Identity::Dev => None,
        };
        let (owner, missing) = match sole_owner {
            Some(owner) => (owner, false),
            None => match (&caller, parts.store.get_chat(chat_id).await?) {
                (Identity::Dev, None) => (dev_owner(), true),
                (caller, found) => (owned(caller, found)?.owner, false),
            },
        };
        // Counted before anything is written, so a refused stream leaves nothing behind.
        let guard = parts
            .tracker
            .try_admit_holding(descriptors)
            .map_err(|r| self.rejected(r))?;
        let system = self.instructions_for(chat_id, &owner, &request.context);
        let run_id = Uuid::new_v4();
        let model_id = model.to_string();
        let run_started = serde_json::to_string(&RunEvent::RunStarted {
            chat_id,
            run_id,
            model: model_id.clone(),
            canvas_id: Some(owner.canvas_id.clone()),
        })
        .expect("run events always serialize");
        let run = NewRun {
            id: run_id,
            chat_id,
            owner,
            model: model_id,
            owner_instance: parts.instance_id.to_string(),
            prompt: request.question.clone(),
            first_event: Some(run_started.clone()),
            agent_context: Some(
                serde_json::to_string(&request.context).expect("a context serializes"),
            ),
        };
        // Dev mode: a chat nobody made is made with the run's start.
        let history = if missing {
            parts.store.start_run_making_its_chat(&run).await?
        } else {
            parts.store.start_run(&run).await?
        };
        parts.metrics.stream_admitted();

        let writer = parts.log.produce(run_id, 1, vec![run_started.into()]);
        // The first follower exists before the run does, so a run never starts unfollowed.
        let follower = self.follower(run_id, 0);
        let ctx = self.context(
            chat_id,
            run_id,
            1,
            &model,
            system,
            ToolContext {
                canvas_version: request.context.canvas_version,
                ..tool_context(&caller, &parts.tools)
            },
            std::time::Instant::now(),
        );
        tracing::info!(%run_id, %chat_id, model = %model, "run admitted");
        self.inner.component.tasks.spawn(drive(
            ctx,
            Prompt {
                history,
                question: request.question,
            },
            writer,
            Resumed::default(),
        ));
        Ok(RunHandle {
            chat_id,
            follower,
            guard,
        })
    }

    /// The model a run of `spec` talks to. A provider's model holds nothing of a run's, so it is made once and shared
    /// (a run made its own, with copies of the provider's endpoint and settings: about 250 bytes per open stream); the
    /// test model, whose options come with each request, is made per run.
    fn model(&self, spec: &ModelSpec) -> Arc<dyn Model> {
        let providers = &self.inner.parts.providers;
        if matches!(spec, ModelSpec::Test(_)) {
            return spec.build(providers);
        }
        let mut models = self.inner.provider_models.lock().expect("models lock");
        if let Some((_, model)) = models.iter().find(|(made, _)| made == spec) {
            return Arc::clone(model);
        }
        let model = spec.build(providers);
        models.push((spec.clone(), Arc::clone(&model)));
        model
    }

    /// What run `run_id` of `chat_id` needs to be driven here under `epoch`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn context(
        &self,
        chat_id: Uuid,
        run_id: Uuid,
        epoch: u64,
        model: &ModelSpec,
        system: Option<String>,
        tool_context: ToolContext,
        started: std::time::Instant,
    ) -> RunContext {
        let parts = &self.inner.parts;
        RunContext {
            system,
            output_schema: parts.output_schema.clone(),
            chat_id,
            run_id,
            epoch,
            handoff: parts.handoff,
            seed_clients: parts.seed_clients,
            started,
            model: self.model(model),
            interrupt: self.inner.component.stop.clone(),
            metrics: Arc::clone(&parts.metrics),
            store: parts.store.clone(),
            live: self.inner.live.clone(),
            tools: parts.tools.clone(),
            tool_context,
            max_steps: parts.max_steps,
            detach_grace: parts.detach_grace,
            lease: parts.lease,
        }
    }

    /// The agent's instructions for a run in `chat_id` of `owner`, asked in `context`.
    pub(super) fn instructions_for(
        &self,
        chat_id: Uuid,
        owner: &ChatOwner,
        context: &AgentContext,
    ) -> Option<String> {
        let instructions = self.inner.parts.instructions.as_ref()?;
        let chat_id = chat_id.to_string();
        Some(instructions.render(&Fill {
            org_id: &owner.org_id,
            user_id: &owner.user_id,
            canvas_id: &owner.canvas_id,
            chat_id: &chat_id,
            mode: match context.mode {
                ContextMode::Inspect => "inspect",
                ContextMode::Build => "build",
            },
            enabled: context.enabled,
            canvas_version: context.canvas_version.as_deref(),
        }))
    }
}
