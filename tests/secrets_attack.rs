//! Attacks on secrets: metadata values and credentials in an address must
//! not show up in errors (whose `Display` and `Debug` end up in logs).
#![cfg(feature = "testing")]

mod common;

use common::*;
use quorum_quest_client::QuorumQuestClient;

/// A bad metadata value (a token with a trailing newline read from a file,
/// the classic mistake) must not be quoted back in the error: the docs say
/// values never appear in `Debug` output or logs, and this error is what
/// gets logged.
#[tokio::test]
async fn a_bad_metadata_value_is_not_quoted_in_the_error() {
    for key in ["authorization", "x-api-key"] {
        let err = QuorumQuestClient::builder(SERVICE, DOMAIN)
            .address("http://127.0.0.1:1")
            .lazy_connect()
            .metadata(key, "Bearer s3cr3t-token\n")
            .build()
            .await
            .expect_err("a newline is not a valid header value");
        for shown in [err.to_string(), format!("{err:?}")] {
            assert!(
                !shown.contains("s3cr3t"),
                "{key}: the value leaked: {shown}"
            );
            assert!(
                shown.contains("metadata"),
                "{key}: the knob is named: {shown}"
            );
        }
    }
}

/// Credentials in the address (`http://user:password@host`) are never sent
/// by gRPC; they must be refused up front without being quoted, not
/// silently ignored and then printed in every connection error.
#[tokio::test]
async fn credentials_in_the_address_are_refused_without_quoting_them() {
    let err = QuorumQuestClient::builder(SERVICE, DOMAIN)
        .address("http://admin:hunter2@127.0.0.1:1")
        .build()
        .await
        .expect_err("nothing listens on port 1, and the address has credentials");
    for shown in [err.to_string(), format!("{err:?}")] {
        assert!(!shown.contains("hunter2"), "the password leaked: {shown}");
    }
    assert!(
        matches!(err, quorum_quest_client::Error::InvalidParameter(_)),
        "{err:?}"
    );
}
