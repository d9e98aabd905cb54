//! A provider over TLS: its certificate checked against the system's roots, HTTP/2 taken when it offers it, and its
//! streams put 100 to a connection.

use axum::http::Version;

use super::failures::parked_past_the_file_limit;
use super::{answer_of, setup_on};
use crate::common::types;
use crate::common::upstream::{FakeUpstream, Reply, fixture, openai};

/// Settings that make agentd trust the test CA alone, as the system's roots (`SSL_CERT_FILE`).
fn trusting_the_test_ca() -> String {
    fixture("provider-ca.pem").to_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_provider_over_tls_with_a_trusted_certificate_answers_over_http2() {
    let ca = trusting_the_test_ca();
    let s = setup_on(FakeUpstream::start_tls().await, &[("SSL_CERT_FILE", &ca)]).await;
    s.fake
        .script([Reply::Frames(openai::answer(&["Hello", " there"], 3, 2))]);
    let chat = s.chat().await;
    let events = s.run(&chat, "openai:gpt-test", "Hi").await;
    assert_eq!(answer_of(&events)["output"], "Hello there");
    let seen = s.fake.seen("/v1/");
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].version, Version::HTTP_2, "taken by ALPN");
    assert_eq!(
        seen[0].headers["authorization"], "Bearer sk-test-key",
        "the key went inside TLS"
    );
}

#[tokio::test]
async fn a_provider_whose_certificate_is_not_trusted_is_sent_nothing() {
    // The system's roots do not include the test CA.
    let s = setup_on(FakeUpstream::start_tls().await, &[]).await;
    let chat = s.chat().await;
    let events = s.run(&chat, "openai:gpt-test", "Hi").await;
    let kinds = types(&events);
    assert_eq!(
        kinds[kinds.len() - 2..],
        ["run_failed", "done"],
        "{kinds:?}"
    );
    let failed = &events[events.len() - 2].1;
    assert_eq!(failed["code"], "provider_unavailable", "{failed}");
    assert!(s.fake.seen("/v1/").is_empty(), "no request got through");
}

#[tokio::test]
async fn streams_to_a_provider_over_tls_and_http2_go_100_to_a_connection() {
    let ca = trusting_the_test_ca();
    let parked = parked_past_the_file_limit(
        FakeUpstream::start_tls().await,
        150,
        1000,
        &[("SSL_CERT_FILE", &ca)],
    )
    .await;
    assert_eq!(
        (parked.open.len(), parked.refused),
        (150, 0),
        "every stream reached its provider"
    );
    assert_eq!((parked.connections, parked.clients), (2, 2));
    assert!(
        parked
            .fake
            .seen("/v1/")
            .iter()
            .all(|seen| seen.version == Version::HTTP_2)
    );
}
