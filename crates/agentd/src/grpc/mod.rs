//! The internal gRPC API (`Superplane.Internal.Agents.Agents`): the main application manages chats with it.
//!
//! A chat is found only when its org, user and canvas all match the request; any other chat, existing or not, is
//! NOT_FOUND "chat not found", so the API never tells whether an id exists. The standard gRPC health service is served
//! beside it and says NOT_SERVING from the moment a shutdown signal arrives. With `INTERNAL_GRPC_TOKEN` set, every
//! call to the Agents service must carry `authorization: Bearer <token>`; the health service stays open for probes.

pub mod codec;
mod status;

use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::Interceptor;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::server::HealthReporter;
use uuid::Uuid;

use subtle::ConstantTimeEq;

use crate::auth::bearer_token;
use crate::error::ErrorCode;
use crate::runs::history;
use crate::store::{Chat, ChatOwner, SessionStore, StoredMessage};

pub mod proto {
    #![allow(missing_debug_implementations, clippy::all)]
    tonic::include_proto!("superplane.internal.agents");
}

use proto::agents_server::{Agents, AgentsServer};
use proto::{
    AgentChatMessage, ChatInfo, ChatUsage, CreateAgentChatRequest, CreateAgentChatResponse,
    DeleteAgentChatRequest, DeleteAgentChatResponse, DescribeAgentChatRequest,
    DescribeAgentChatResponse, DescribeOrganizationAgentUsageRequest,
    DescribeOrganizationAgentUsageResponse, ListAgentChatMessagesRequest,
    ListAgentChatMessagesResponse, ListAgentChatsRequest, ListAgentChatsResponse,
};

/// The full name of the service, as the health service reports it.
pub const SERVICE_NAME: &str = "Superplane.Internal.Agents.Agents";

#[derive(Debug, Clone)]
pub struct AgentsService {
    store: SessionStore,
}

/// The health service and the handle that sets what it reports, SERVING from the start.
pub async fn health() -> (HealthReporter, HealthServer<impl Health>) {
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status(SERVICE_NAME, ServingStatus::Serving)
        .await;
    reporter
        .set_service_status("", ServingStatus::Serving)
        .await;
    (reporter, service)
}

/// Serves the Agents and health services on `listener` until `stop` is cancelled and in-flight calls finish.
pub async fn serve(
    listener: TcpListener,
    store: SessionStore,
    token: Option<String>,
    health_service: HealthServer<impl Health>,
    stop: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let agents = AgentsServer::with_interceptor(AgentsService { store }, BearerToken { token });
    tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(agents)
        .serve_with_incoming_shutdown(TcpIncoming::from(listener), stop.cancelled_owned())
        .await
}

/// Says NOT_SERVING for the service and the server as a whole.
pub async fn set_not_serving(health: &HealthReporter) {
    health
        .set_service_status(SERVICE_NAME, ServingStatus::NotServing)
        .await;
    health
        .set_service_status("", ServingStatus::NotServing)
        .await;
}

/// Warns when the API is open to the network without a token, as the seed ran it.
pub fn warn_if_open(addr: SocketAddr, token: Option<&str>) {
    if token.is_none() && !addr.ip().is_loopback() {
        tracing::warn!(grpc_addr = %addr,
            "the internal gRPC API listens beyond loopback without INTERNAL_GRPC_TOKEN: anyone who can reach it can \
             read and delete chats");
    }
}

/// Checks `authorization: Bearer <token>` when a token is configured.
#[derive(Clone)]
struct BearerToken {
    token: Option<String>,
}

impl Interceptor for BearerToken {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.token else {
            return Ok(request);
        };
        let given = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(bearer_token);
        match given {
            Some(given) if bool::from(given.as_bytes().ct_eq(expected.as_bytes())) => Ok(request),
            _ => Err(ErrorCode::Unauthenticated.status("missing or invalid bearer token")),
        }
    }
}

/// Longest id (org, user, canvas) accepted, in characters.
const MAX_ID_CHARS: usize = 200;

fn required(field: &'static str, value: String) -> Result<String, Status> {
    if value.trim().is_empty() {
        return Err(ErrorCode::InvalidRequest.status(format!("{field} is required")));
    }
    if value.contains('\0') {
        return Err(
            ErrorCode::InvalidRequest.status(format!("{field} must not contain NUL characters"))
        );
    }
    if value.chars().count() > MAX_ID_CHARS {
        return Err(ErrorCode::InvalidRequest
            .status(format!("{field} is longer than {MAX_ID_CHARS} characters")));
    }
    Ok(value)
}

fn owner(org_id: String, user_id: String, canvas_id: String) -> Result<ChatOwner, Status> {
    Ok(ChatOwner {
        org_id: required("org_id", org_id)?,
        user_id: required("user_id", user_id)?,
        canvas_id: required("canvas_id", canvas_id)?,
    })
}

fn chat_id(raw: &str) -> Result<Uuid, Status> {
    Uuid::parse_str(raw)
        .map_err(|_| ErrorCode::InvalidRequest.status("chat_id is not a valid UUID"))
}

impl AgentsService {
    /// The chat, when it exists and belongs to `owner`; NOT_FOUND otherwise, either way.
    async fn find(&self, owner: &ChatOwner, id: Uuid) -> Result<Chat, Status> {
        match self.store.get_chat(id).await.map_err(status::from_store)? {
            Some(chat) if &chat.owner == owner => Ok(chat),
            _ => Err(ErrorCode::ChatNotFound.status("chat not found")),
        }
    }
}

fn timestamp(at: time::OffsetDateTime) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: at.unix_timestamp(),
        nanos: i32::try_from(at.nanosecond()).unwrap_or(0),
    }
}

fn chat_info(chat: &Chat) -> ChatInfo {
    ChatInfo {
        id: chat.id.to_string(),
        initial_message: chat.initial_message.clone().unwrap_or_default(),
        created_at: Some(timestamp(chat.created_at)),
        latest_run_status: chat
            .latest_run_status
            .map(|s| s.as_str().to_owned())
            .unwrap_or_default(),
    }
}

/// The chat as a UI shows it (see [`history::entries`]), in the proto's shape.
pub fn flatten(messages: &[StoredMessage]) -> Vec<AgentChatMessage> {
    history::entries(messages)
        .into_iter()
        .map(|entry| AgentChatMessage {
            id: entry.id,
            role: entry.role.to_owned(),
            content: entry.content,
            tool_call_id: entry.tool_call_id,
            tool_status: entry.tool_status.to_owned(),
            created_at: Some(timestamp(entry.created_at)),
        })
        .collect()
}

#[tonic::async_trait]
impl Agents for AgentsService {
    async fn create_agent_chat(
        &self,
        request: Request<CreateAgentChatRequest>,
    ) -> Result<Response<CreateAgentChatResponse>, Status> {
        let r = request.into_inner();
        let owner = owner(r.org_id, r.user_id, r.canvas_id)?;
        let chat = self
            .store
            .create_chat(&owner)
            .await
            .map_err(status::from_store)?;
        tracing::info!(chat_id = %chat.id, org_id = %owner.org_id, "chat created");
        Ok(Response::new(CreateAgentChatResponse {
            chat: Some(chat_info(&chat)),
        }))
    }

    async fn list_agent_chats(
        &self,
        request: Request<ListAgentChatsRequest>,
    ) -> Result<Response<ListAgentChatsResponse>, Status> {
        let r = request.into_inner();
        let owner = owner(r.org_id, r.user_id, r.canvas_id)?;
        let chats = self
            .store
            .list_chats(&owner)
            .await
            .map_err(status::from_store)?;
        Ok(Response::new(ListAgentChatsResponse {
            chats: chats.iter().map(chat_info).collect(),
        }))
    }

    async fn describe_agent_chat(
        &self,
        request: Request<DescribeAgentChatRequest>,
    ) -> Result<Response<DescribeAgentChatResponse>, Status> {
        let r = request.into_inner();
        let id = chat_id(&r.chat_id)?;
        let chat = self
            .find(&owner(r.org_id, r.user_id, r.canvas_id)?, id)
            .await?;
        Ok(Response::new(DescribeAgentChatResponse {
            chat: Some(chat_info(&chat)),
        }))
    }

    async fn list_agent_chat_messages(
        &self,
        request: Request<ListAgentChatMessagesRequest>,
    ) -> Result<Response<ListAgentChatMessagesResponse>, Status> {
        let r = request.into_inner();
        let id = chat_id(&r.chat_id)?;
        let chat = self
            .find(&owner(r.org_id, r.user_id, r.canvas_id)?, id)
            .await?;
        let messages = self
            .store
            .messages(chat.id)
            .await
            .map_err(status::from_store)?;
        Ok(Response::new(ListAgentChatMessagesResponse {
            messages: flatten(&messages),
        }))
    }

    async fn delete_agent_chat(
        &self,
        request: Request<DeleteAgentChatRequest>,
    ) -> Result<Response<DeleteAgentChatResponse>, Status> {
        let r = request.into_inner();
        let id = chat_id(&r.chat_id)?;
        let chat = self
            .find(&owner(r.org_id, r.user_id, r.canvas_id)?, id)
            .await?;
        if !self
            .store
            .delete_chat(chat.id)
            .await
            .map_err(status::from_store)?
        {
            return Err(ErrorCode::ChatNotFound.status("chat not found"));
        }
        tracing::info!(chat_id = %chat.id, "chat deleted");
        Ok(Response::new(DeleteAgentChatResponse {}))
    }

    async fn describe_organization_agent_usage(
        &self,
        request: Request<DescribeOrganizationAgentUsageRequest>,
    ) -> Result<Response<DescribeOrganizationAgentUsageResponse>, Status> {
        let org_id = required("org_id", request.into_inner().org_id)?;
        let usage = self
            .store
            .org_usage(&org_id)
            .await
            .map_err(status::from_store)?;
        let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        Ok(Response::new(DescribeOrganizationAgentUsageResponse {
            usage: Some(ChatUsage {
                total_input_tokens: n(usage.input_tokens),
                total_output_tokens: n(usage.output_tokens),
                total_tokens: n(usage.total_tokens),
            }),
        }))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::model::Message;
    use crate::model::ToolCall;

    fn stored(index: i64, message: Message) -> StoredMessage {
        StoredMessage {
            index,
            message,
            run_id: None,
            created_at: time::OffsetDateTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn flattening_shows_prompts_tool_calls_and_answers_in_order() {
        let call = ToolCall {
            id: "call_1".into(),
            name: "current_time".into(),
            args: json!({}),
        };
        let messages = [
            stored(
                0,
                Message::User {
                    content: "time?".into(),
                },
            ),
            stored(
                1,
                Message::Assistant {
                    content: String::new(),
                    tool_calls: vec![call],
                },
            ),
            stored(
                2,
                Message::ToolResult {
                    tool_call_id: "call_1".into(),
                    content: "{}".into(),
                },
            ),
            stored(
                3,
                Message::Assistant {
                    content: "Noon.".into(),
                    tool_calls: vec![],
                },
            ),
        ];
        let flat = flatten(&messages);
        let seen: Vec<(&str, &str, &str, &str)> = flat
            .iter()
            .map(|m| {
                (
                    m.role.as_str(),
                    m.content.as_str(),
                    m.tool_call_id.as_str(),
                    m.tool_status.as_str(),
                )
            })
            .collect();
        assert_eq!(
            seen,
            [
                ("user", "time?", "", ""),
                ("tool", "Used tool current time", "call_1", "completed"),
                ("assistant", "Noon.", "", ""),
            ]
        );
        let ids: Vec<&str> = flat.iter().map(|m| m.id.as_str()).collect();
        assert_eq!(ids, ["0-0", "1-1", "3-0"]);
    }

    #[test]
    fn tokens_compare_exactly() {
        let mut check = BearerToken {
            token: Some("secret".to_owned()),
        };
        let with = |value: &str| {
            let mut request = Request::new(());
            request
                .metadata_mut()
                .insert("authorization", value.parse().unwrap());
            request
        };
        assert!(check.call(with("Bearer secret")).is_ok());
        for wrong in ["Bearer secreT", "Bearer secret2", "Bearer secre"] {
            let refused = check.call(with(wrong)).unwrap_err();
            assert_eq!(refused.code(), tonic::Code::Unauthenticated);
        }
    }
}
