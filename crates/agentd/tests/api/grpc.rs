//! The internal gRPC API, with a real tonic client against the real binary.

use crate::common::{Agentd, types};
use agentd::grpc::proto::agents_client::AgentsClient;
use agentd::grpc::proto::{
    CreateAgentChatRequest, DeleteAgentChatRequest, DescribeAgentChatRequest,
    DescribeOrganizationAgentUsageRequest, ListAgentChatMessagesRequest, ListAgentChatsRequest,
};
use serde_json::json;
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

async fn client(server: &Agentd) -> AgentsClient<Channel> {
    AgentsClient::connect(server.grpc.clone())
        .await
        .expect("gRPC connects")
}

fn create(org: &str, user: &str, canvas: &str) -> CreateAgentChatRequest {
    CreateAgentChatRequest {
        org_id: org.into(),
        canvas_id: canvas.into(),
        user_id: user.into(),
    }
}

fn describe(org: &str, user: &str, canvas: &str, chat_id: &str) -> DescribeAgentChatRequest {
    DescribeAgentChatRequest {
        org_id: org.into(),
        canvas_id: canvas.into(),
        user_id: user.into(),
        chat_id: chat_id.into(),
    }
}

async fn health(server: &Agentd, service: &str) -> ServingStatus {
    let channel = Channel::from_shared(server.grpc.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    let response = health
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap();
    response.into_inner().status()
}

#[tokio::test]
async fn every_rpc_answers_and_a_chat_is_found_only_by_its_owner() {
    let server = Agentd::spawn(&[]).await;
    let mut grpc = client(&server).await;

    let first = grpc
        .create_agent_chat(create("acme", "alice", "c1"))
        .await
        .unwrap()
        .into_inner()
        .chat
        .unwrap();
    let second = grpc
        .create_agent_chat(create("acme", "alice", "c1"))
        .await
        .unwrap()
        .into_inner()
        .chat
        .unwrap();
    grpc.create_agent_chat(create("acme", "bob", "c1"))
        .await
        .unwrap();
    assert_eq!(first.initial_message, "");
    assert_eq!(first.latest_run_status, "");
    assert!(first.created_at.is_some());

    let listed = grpc
        .list_agent_chats(ListAgentChatsRequest {
            org_id: "acme".into(),
            canvas_id: "c1".into(),
            user_id: "alice".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .chats;
    let ids: Vec<&str> = listed.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids, [second.id.as_str(), first.id.as_str()]);

    let described = grpc
        .describe_agent_chat(describe("acme", "alice", "c1", &first.id))
        .await
        .unwrap();
    assert_eq!(described.into_inner().chat.unwrap().id, first.id);
    let messages = grpc
        .list_agent_chat_messages(ListAgentChatMessagesRequest {
            org_id: "acme".into(),
            canvas_id: "c1".into(),
            user_id: "alice".into(),
            chat_id: first.id.clone(),
        })
        .await
        .unwrap();
    assert!(messages.into_inner().messages.is_empty());
    let usage = grpc
        .describe_organization_agent_usage(DescribeOrganizationAgentUsageRequest {
            org_id: "acme".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .usage
        .unwrap();
    assert_eq!(
        (
            usage.total_input_tokens,
            usage.total_output_tokens,
            usage.total_tokens
        ),
        (0, 0, 0)
    );

    // Another org, user or canvas, and a chat that does not exist: the same NOT_FOUND.
    for (org, user, canvas, id) in [
        ("other", "alice", "c1", first.id.as_str()),
        ("acme", "bob", "c1", first.id.as_str()),
        ("acme", "alice", "c2", first.id.as_str()),
        (
            "acme",
            "alice",
            "c1",
            "6f1d0c8e-5d0a-4c47-9d44-3a3f8b0e1a11",
        ),
    ] {
        let status = grpc
            .describe_agent_chat(describe(org, user, canvas, id))
            .await
            .unwrap_err();
        assert_eq!(
            (status.code(), status.message()),
            (Code::NotFound, "chat not found"),
            "{org}/{user}/{canvas}"
        );
        let status = grpc
            .delete_agent_chat(DeleteAgentChatRequest {
                org_id: org.into(),
                canvas_id: canvas.into(),
                user_id: user.into(),
                chat_id: id.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::NotFound);
    }

    let status = grpc
        .describe_agent_chat(describe("acme", "alice", "c1", "nope"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("chat_id"), "{}", status.message());
    let status = grpc
        .create_agent_chat(create("", "alice", "c1"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("org_id"));

    grpc.delete_agent_chat(DeleteAgentChatRequest {
        org_id: "acme".into(),
        canvas_id: "c1".into(),
        user_id: "alice".into(),
        chat_id: first.id.clone(),
    })
    .await
    .unwrap();
    let status = grpc
        .describe_agent_chat(describe("acme", "alice", "c1", &first.id))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);

    assert_eq!(health(&server, "").await, ServingStatus::Serving);
    assert_eq!(
        health(&server, "Superplane.Internal.Agents.Agents").await,
        ServingStatus::Serving
    );
}

#[tokio::test]
async fn a_configured_token_is_required_on_every_call() {
    let server = Agentd::spawn(&[("INTERNAL_GRPC_TOKEN", "s3cret-token")]).await;
    let mut anonymous = client(&server).await;
    let status = anonymous
        .create_agent_chat(create("o", "u", "c"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);

    let channel = Channel::from_shared(server.grpc.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let with = |token: &'static str| {
        AgentsClient::with_interceptor(channel.clone(), move |mut request: tonic::Request<()>| {
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
            Ok(request)
        })
    };
    let status = with("wrong")
        .create_agent_chat(create("o", "u", "c"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(
        with("s3cret-token")
            .create_agent_chat(create("o", "u", "c"))
            .await
            .is_ok()
    );
    // Probes carry no token: health stays open.
    assert_eq!(health(&server, "").await, ServingStatus::Serving);
    assert!(!server.log_text().contains("s3cret-token"));
}

#[tokio::test]
async fn a_chat_created_over_grpc_streams_over_http_and_shows_its_history() {
    let server = Agentd::spawn(&[]).await;
    let mut grpc = client(&server).await;
    // Requests without a token act for the development owner.
    let (org, user, canvas) = ("dev-org", "dev-user", "dev-canvas");
    let chat = grpc
        .create_agent_chat(create(org, user, canvas))
        .await
        .unwrap()
        .into_inner()
        .chat
        .unwrap();

    let events = server
        .stream(
            &chat.id,
            json!({"question": "What time is it?", "model": "test:deltas=3,tool=current_time"}),
        )
        .await
        .rest()
        .await;
    assert_eq!(types(&events).last().unwrap(), "done");
    let final_usage = &events
        .iter()
        .find(|(_, e)| e["type"] == "final_answer")
        .unwrap()
        .1["usage"];

    let messages = grpc
        .list_agent_chat_messages(ListAgentChatMessagesRequest {
            org_id: org.into(),
            canvas_id: canvas.into(),
            user_id: user.into(),
            chat_id: chat.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .messages;
    let seen: Vec<(&str, &str, &str)> = messages
        .iter()
        .map(|m| (m.role.as_str(), m.content.as_str(), m.tool_status.as_str()))
        .collect();
    assert_eq!(
        seen,
        [
            ("user", "What time is it?", ""),
            ("tool", "Used tool current time", "completed"),
            ("assistant", "Agents answer in", ""),
        ]
    );
    assert_eq!(messages[1].tool_call_id, events[1].1["tool_call_id"]);

    let described = grpc
        .describe_agent_chat(describe(org, user, canvas, &chat.id))
        .await
        .unwrap()
        .into_inner()
        .chat
        .unwrap();
    assert_eq!(described.latest_run_status, "completed");
    assert_eq!(described.initial_message, "What time is it?");

    let usage = grpc
        .describe_organization_agent_usage(DescribeOrganizationAgentUsageRequest {
            org_id: org.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .usage
        .unwrap();
    assert_eq!(
        usage.total_input_tokens,
        final_usage["input_tokens"].as_i64().unwrap()
    );
    assert_eq!(
        usage.total_output_tokens,
        final_usage["output_tokens"].as_i64().unwrap()
    );
    assert_eq!(
        usage.total_tokens,
        final_usage["total_tokens"].as_i64().unwrap()
    );

    grpc.delete_agent_chat(DeleteAgentChatRequest {
        org_id: org.into(),
        canvas_id: canvas.into(),
        user_id: user.into(),
        chat_id: chat.id.clone(),
    })
    .await
    .unwrap();
    let listed = grpc
        .list_agent_chats(ListAgentChatsRequest {
            org_id: org.into(),
            canvas_id: canvas.into(),
            user_id: user.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .chats;
    assert!(listed.is_empty());
}

#[tokio::test]
async fn grpc_keeps_answering_during_the_drain_then_stops_before_exit() {
    let mut server = Agentd::spawn(&[("DRAIN_TIMEOUT", "60"), ("SHUTDOWN_TIMEOUT", "90")]).await;
    let mut grpc = client(&server).await;
    let chat = grpc
        .create_agent_chat(create("dev-org", "dev-user", "dev-canvas"))
        .await
        .unwrap()
        .into_inner()
        .chat
        .unwrap();
    let mut stream = server
        .stream(
            &chat.id,
            json!({"question": "q", "model": "test:deltas=30,delay_ms=100"}),
        )
        .await;
    assert_eq!(stream.next_data().await["type"], "run_started");

    server.signal("TERM");
    server.wait_for_log("draining").await;
    assert_eq!(health(&server, "").await, ServingStatus::NotServing);
    assert_eq!(
        health(&server, "Superplane.Internal.Agents.Agents").await,
        ServingStatus::NotServing
    );
    let described = grpc
        .describe_agent_chat(describe("dev-org", "dev-user", "dev-canvas", &chat.id))
        .await;
    assert_eq!(
        described
            .unwrap()
            .into_inner()
            .chat
            .unwrap()
            .latest_run_status,
        "running"
    );

    let rest = stream.rest().await;
    assert_eq!(types(&rest).last().unwrap(), "done");
    assert!(server.exit_status().await.success());
    let addr = server.grpc.trim_start_matches("http://").to_owned();
    assert!(
        tokio::net::TcpStream::connect(&addr).await.is_err(),
        "the gRPC port is closed"
    );
}
