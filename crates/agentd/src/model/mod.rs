//! Model providers: what the agent loop talks to.
//!
//! A model id has the form `provider[:model]`. [`ModelSpec::parse`] turns it into a typed spec at the edge (request
//! body or `AI_MODEL`), and [`ModelSpec::build`] gives the [`Model`] a run uses. A model answers one step of a
//! conversation as a stream of [`ModelEvent`]s: text as it arrives, the tool calls it wants, and its token usage.

mod anthropic;
mod lane;
mod openai;
mod test;
pub mod upstream;

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;

use futures_core::Stream;
use serde::{Deserialize, Serialize};

use crate::error::ErrorCode;
use crate::stream_tracker::Held;

pub use test::{TestOptions, delta_text};
pub use upstream::{Endpoint, Providers};

/// One step's output, as it arrives.
pub type ModelStream = Pin<Box<dyn Stream<Item = Result<ModelEvent, ModelError>> + Send>>;

pub trait Model: Send + Sync + fmt::Debug {
    /// Answers the conversation so far; the stream ends when the step is over.
    fn stream(&self, request: ModelRequest) -> ModelStream;
}

/// What a model is asked.
#[derive(Debug, Clone)]
pub struct ModelRequest {
    /// The agent's instructions (the system prompt), sent in each provider's own way.
    pub system: Option<String>,
    /// The conversation, oldest first, ending with the user's prompt or with tool results.
    pub messages: Vec<Message>,
    /// Tools the model may call (the registry's, shared).
    pub tools: Arc<[ToolDefinition]>,
    /// The final answer must be a JSON object of this schema: through the provider's structured output (OpenAI) or a
    /// [`FINAL_ANSWER_TOOL`] call (Anthropic); either way its JSON text arrives as [`ModelEvent::TextDelta`]s.
    pub output_schema: Option<Arc<serde_json::Value>>,
}

/// The tool an Anthropic model answers through when the answer has a schema: its arguments are the answer.
pub const FINAL_ANSWER_TOOL: &str = "final_answer";

/// One message of a conversation, as stored in the chat (JSON, tagged by `role`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "role", rename_all = "snake_case")]
pub enum Message {
    User {
        content: String,
    },
    Assistant {
        content: String,
        tool_calls: Vec<ToolCall>,
    },
    #[serde(rename = "tool")]
    ToolResult {
        tool_call_id: String,
        content: String,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct ToolDefinition {
    pub name: String,
    pub description: String,
    /// JSON Schema of the arguments.
    pub parameters: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    pub args: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ModelEvent {
    TextDelta(String),
    ToolCall(ToolCall),
    Usage(Usage),
    /// The answer stopped at the model's output token limit, not where the model meant to end it.
    Truncated,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub total_tokens: u64,
}

impl Usage {
    pub fn new(input_tokens: u64, output_tokens: u64) -> Self {
        Self {
            input_tokens,
            output_tokens,
            total_tokens: input_tokens + output_tokens,
        }
    }
}

impl std::ops::AddAssign for Usage {
    fn add_assign(&mut self, other: Self) {
        self.input_tokens += other.input_tokens;
        self.output_tokens += other.output_tokens;
        self.total_tokens += other.total_tokens;
    }
}

/// A model step that could not finish, by kind; the message is shown to the user in `run_failed`, beside the code
/// of [`ModelError::code`]. The log keeps the provider's own words where the failure happens.
#[derive(Debug, Clone, Copy, thiserror::Error, PartialEq, Eq)]
pub enum ModelError {
    #[error("{0} is rate limiting requests right now; please try again in a moment")]
    RateLimited(&'static str),
    #[error("{0} is unavailable right now; please try again later")]
    Unavailable(&'static str),
    #[error("{0} is overloaded right now; please try again later")]
    Overloaded(&'static str),
    #[error("{0} refused the request; the service's model configuration needs attention")]
    Refused(&'static str),
    #[error("{0} sent a broken answer stream; please try again")]
    BrokenStream(&'static str),
    #[error("{0} stopped answering; please try again")]
    StoppedAnswering(&'static str),
    #[error("{0} failed while answering; please try again")]
    FailedMidStream(&'static str),
    /// The model's output token limit cut a tool call: its arguments are incomplete, so it is neither run nor kept.
    #[error("{0} reached its output limit in the middle of a tool call; please try again")]
    TruncatedToolCall(&'static str),
    /// The built-in model's `fail_after` option.
    #[error("the test model failed after {0} deltas, as asked")]
    TestFailure(u32),
}

impl ModelError {
    pub fn code(self) -> ErrorCode {
        match self {
            Self::RateLimited(_) => ErrorCode::ProviderRateLimited,
            Self::Unavailable(_) | Self::Overloaded(_) => ErrorCode::ProviderUnavailable,
            Self::Refused(_) => ErrorCode::ProviderRefused,
            Self::BrokenStream(_) => ErrorCode::ProviderBrokenStream,
            Self::StoppedAnswering(_) => ErrorCode::ProviderStoppedAnswering,
            Self::FailedMidStream(_) => ErrorCode::ProviderFailed,
            Self::TruncatedToolCall(_) => ErrorCode::OutputTruncated,
            Self::TestFailure(_) => ErrorCode::ModelFailed,
        }
    }
}

/// A model id, checked.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelSpec {
    /// The built-in deterministic model: `test` or `test:deltas=8,delay_ms=0,tool=NAME,fail_after=N`.
    Test(TestOptions),
    /// `openai:<model>`: an OpenAI-compatible Chat Completions endpoint.
    OpenAi(String),
    /// `anthropic:<model>`: the Anthropic Messages API.
    Anthropic(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelIdError {
    #[error("unknown model {0:?}")]
    Unknown(String),
    #[error("model {id:?}: {reason}")]
    BadOption { id: String, reason: String },
}

impl ModelSpec {
    pub fn parse(id: &str) -> Result<Self, ModelIdError> {
        let (provider, rest) = match id.split_once(':') {
            Some((provider, rest)) => (provider, Some(rest)),
            None => (id, None),
        };
        match provider {
            "test" => TestOptions::parse(rest.unwrap_or(""))
                .map(Self::Test)
                .map_err(|reason| ModelIdError::BadOption {
                    id: id.to_owned(),
                    reason,
                }),
            "openai" | "anthropic" => {
                let model = rest
                    .map(str::trim)
                    .filter(|m| !m.is_empty())
                    .ok_or_else(|| ModelIdError::BadOption {
                        id: id.to_owned(),
                        reason: format!("name the model: {provider}:<model>"),
                    })?;
                Ok(if provider == "openai" {
                    Self::OpenAi(model.to_owned())
                } else {
                    Self::Anthropic(model.to_owned())
                })
            }
            _ => Err(ModelIdError::Unknown(id.to_owned())),
        }
    }

    /// The built-in model, which dev mode allows without a token.
    pub fn is_test(&self) -> bool {
        matches!(self, Self::Test(_))
    }

    /// The file descriptors a stream of this model holds: its client's socket, and its own connection to the
    /// provider, or its share of one when the provider's streams share connections (HTTP/2, at most
    /// `lane::STREAMS_PER_CONNECTION` on each).
    pub fn descriptors(&self, providers: &Providers) -> Held {
        let lane = match self {
            Self::Test(_) => return Held::descriptors(1),
            Self::OpenAi(_) => &providers.openai_lane,
            Self::Anthropic(_) => &providers.anthropic_lane,
        };
        let provider = if lane.multiplexed() {
            Held::share_of_one(lane::STREAMS_PER_CONNECTION)
        } else {
            Held::descriptors(1)
        };
        Held::descriptors(1).and(provider)
    }

    pub fn build(&self, providers: &Providers) -> Arc<dyn Model> {
        match self {
            Self::Test(options) => Arc::new(test::TestModel::new(options.clone())),
            Self::OpenAi(model) => Arc::new(openai::OpenAi {
                model: model.clone(),
                providers: providers.clone(),
            }),
            Self::Anthropic(model) => Arc::new(anthropic::Anthropic {
                model: model.clone(),
                providers: providers.clone(),
            }),
        }
    }
}

impl fmt::Display for ModelSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Test(options) => write!(f, "test{options}"),
            Self::OpenAi(model) => write!(f, "openai:{model}"),
            Self::Anthropic(model) => write!(f, "anthropic:{model}"),
        }
    }
}

/// Which model ids requests may name (`AI_MODELS`), and the default (`AI_MODEL`), which is always allowed.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelPolicy {
    pub default: ModelSpec,
    /// Allowed ids; `test` allows the test model with any options.
    allowed: Vec<String>,
    /// Most `model_delta`s a test-model run may ask for (`TEST_MODEL_MAX_DELTAS`).
    pub test_max_deltas: u32,
}

impl ModelPolicy {
    /// `allowed` as configured; `None` means the default and, unless the service is `secured` (it checks tokens),
    /// `test`: a service open to real users offers the test model only when it is named.
    pub fn new(
        default: ModelSpec,
        allowed: Option<&str>,
        secured: bool,
        test_max_deltas: u32,
    ) -> Result<Self, ModelIdError> {
        let mut list: Vec<String> = match allowed {
            Some(raw) => raw
                .split(',')
                .map(str::trim)
                .filter(|id| !id.is_empty())
                .map(|id| ModelSpec::parse(id).map(|spec| spec.allow_key()))
                .collect::<Result<_, _>>()?,
            None if secured => Vec::new(),
            None => vec!["test".to_owned()],
        };
        list.push(default.allow_key());
        Ok(Self {
            default,
            allowed: list,
            test_max_deltas,
        })
    }

    /// Whether the test model may run with these options: the number of deltas is bounded.
    pub fn test_within_limit(&self, spec: &ModelSpec) -> Result<(), String> {
        match spec {
            ModelSpec::Test(options) if options.deltas > self.test_max_deltas => Err(format!(
                "the test model may stream at most {} deltas here (TEST_MODEL_MAX_DELTAS)",
                self.test_max_deltas
            )),
            _ => Ok(()),
        }
    }

    /// The model ids a client may offer its user: the default (as configured, options and all) first, then the
    /// others allowed.
    pub fn offered(&self) -> Vec<String> {
        let default_key = self.default.allow_key();
        let mut offered = vec![self.default.to_string()];
        for key in &self.allowed {
            if *key != default_key && !offered.contains(key) {
                offered.push(key.clone());
            }
        }
        offered
    }

    pub fn allows(&self, spec: &ModelSpec) -> bool {
        self.allowed.contains(&spec.allow_key())
    }
}

impl ModelSpec {
    /// What the allow-list compares: the test model's options do not matter.
    fn allow_key(&self) -> String {
        match self {
            Self::Test(_) => "test".to_owned(),
            other => other.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provider_ids_parse_and_print_back() {
        assert_eq!(
            ModelSpec::parse("openai:gpt-4o").unwrap(),
            ModelSpec::OpenAi("gpt-4o".into())
        );
        assert_eq!(
            ModelSpec::parse("anthropic:claude-x").unwrap().to_string(),
            "anthropic:claude-x"
        );
        assert!(ModelSpec::parse("openai:").is_err());
        assert!(ModelSpec::parse("gemini:pro").is_err());
    }

    #[test]
    fn the_allow_list_holds_the_default_and_test_unless_told_otherwise() {
        let gpt = || ModelSpec::parse("openai:gpt-4o").unwrap();
        let policy = ModelPolicy::new(gpt(), None, false, 10).unwrap();
        assert!(policy.allows(&gpt()));
        assert!(policy.allows(&ModelSpec::parse("test:deltas=2").unwrap()));
        assert!(!policy.allows(&ModelSpec::parse("openai:gpt-5").unwrap()));
        // With tokens checked, the test model runs only when named.
        let secured = ModelPolicy::new(gpt(), None, true, 10).unwrap();
        assert!(!secured.allows(&ModelSpec::parse("test").unwrap()));
        assert!(secured.allows(&gpt()));
        // Its options are bounded in any mode.
        assert!(
            policy
                .test_within_limit(&ModelSpec::parse("test:deltas=10").unwrap())
                .is_ok()
        );
        assert!(
            policy
                .test_within_limit(&ModelSpec::parse("test:deltas=11").unwrap())
                .is_err()
        );
        let policy = ModelPolicy::new(
            ModelSpec::parse("test").unwrap(),
            Some("anthropic:claude-x, openai:gpt-5"),
            false,
            10,
        )
        .unwrap();
        assert!(policy.allows(&ModelSpec::parse("openai:gpt-5").unwrap()));
        assert!(policy.allows(&ModelSpec::parse("test:deltas=1").unwrap()));
        assert!(!policy.allows(&ModelSpec::parse("openai:gpt-4o").unwrap()));
        assert!(
            ModelPolicy::new(ModelSpec::parse("test").unwrap(), Some("nope"), false, 10).is_err()
        );
    }

    #[test]
    fn a_client_is_offered_the_default_first_and_each_allowed_model_once() {
        let policy = ModelPolicy::new(
            ModelSpec::parse("test:deltas=3").unwrap(),
            Some("openai:gpt-5, test, anthropic:claude-x"),
            true,
            10,
        )
        .unwrap();
        assert_eq!(
            policy.offered(),
            ["test:deltas=3", "openai:gpt-5", "anthropic:claude-x"]
        );
    }
}
