//! TLS, mutual TLS, auth metadata and the errors a user can act on, against
//! a real TestServer over loopback TCP (certificates made here with rcgen).
#![cfg(all(feature = "testing", feature = "tls"))]

mod common;

use std::time::{Duration, Instant};

use futures::StreamExt;
use quorum_quest_client::testing::TestServer;
use quorum_quest_client::tonic::Code;
use quorum_quest_client::{Error, LeadershipEvent, QuorumQuestClient, RpcKind};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, ExtendedKeyUsagePurpose, IsCa, KeyPair,
};

use common::*;

/// A certificate authority for one test.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its private key, PEM.
struct Leaf {
    cert: String,
    key: String,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        Ca {
            issuer: CertifiedIssuer::self_signed(params, key).unwrap(),
        }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A server certificate for 127.0.0.1 and localhost.
    fn server(&self) -> Leaf {
        self.leaf(
            vec!["127.0.0.1".into(), "localhost".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    /// A client certificate.
    fn client(&self) -> Leaf {
        self.leaf(
            vec!["client.test".into()],
            ExtendedKeyUsagePurpose::ClientAuth,
        )
    }

    fn leaf(&self, names: Vec<String>, usage: ExtendedKeyUsagePurpose) -> Leaf {
        let mut params = CertificateParams::new(names).unwrap();
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}

async fn tls_server(ca: &Ca) -> TestServer {
    let leaf = ca.server();
    TestServer::builder()
        .tls(&leaf.cert, &leaf.key)
        .start()
        .await
        .expect("TLS test server starts")
}

/// A TLS server that also requires a client certificate issued by `ca`.
async fn mtls_server(ca: &Ca) -> TestServer {
    let leaf = ca.server();
    TestServer::builder()
        .tls(&leaf.cert, &leaf.key)
        .client_ca(ca.pem())
        .start()
        .await
        .expect("mTLS test server starts")
}

async fn leads(client: &QuorumQuestClient, server: &TestServer) {
    assert!(client.try_acquire_lock().await.expect("acquire succeeds"));
    let owner = server
        .lock(client.service(), client.domain())
        .map(|l| l.owner);
    assert_eq!(owner.as_deref(), Some(client.client_id()));
}

#[tokio::test]
async fn a_private_ca_is_trusted_and_the_client_is_elected_and_keeps_tls_across_a_redial() {
    let ca = Ca::new("test CA");
    let server = tls_server(&ca).await;
    assert!(server.url().starts_with("https://127.0.0.1:"));
    let client = over_tcp(&server.url(), 3)
        .ca_certificate(ca.pem())
        .rpc_timeout(ms(300))
        .build()
        .await
        .expect("a client trusting the server's CA connects");
    leads(&client, &server).await;

    // A hanging server makes the call time out: reported as a deadline, and
    // the next call dials a fresh connection, TLS included.
    let before = server.connections_accepted();
    server.pause();
    let err = client.try_acquire_lock().await.unwrap_err();
    match &err {
        Error::Rpc(status) => assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}"),
        other => panic!("expected a deadline, got {other:?}"),
    }
    server.resume();
    leads(&client, &server).await;
    assert!(
        server.connections_accepted() > before,
        "the call after the time-out went out on a fresh TLS connection"
    );
    client.release_lock().await.unwrap();
    server.shutdown().await;
}

#[tokio::test]
async fn a_server_certificate_from_another_ca_is_a_connection_error_naming_the_certificate_problem()
{
    let server = tls_server(&Ca::new("server CA")).await;
    let connect_timeout = 3 * SEC;
    let started = Instant::now();
    let err = over_tcp(&server.url(), 3)
        .ca_certificate(Ca::new("some other CA").pem())
        .connect_timeout(connect_timeout)
        .build()
        .await
        .unwrap_err();
    let took = started.elapsed();
    eprintln!("untrusted certificate reported after {took:?}");
    assert!(matches!(err, Error::Connection(_)), "{err:?}");
    let message = err.to_string();
    eprintln!("{message}");
    assert!(message.contains("certificate not trusted"), "{message}");
    assert!(
        message.contains("unknown issuer") || message.contains("UnknownIssuer"),
        "{message}"
    );
    assert!(message.contains(&server.addr().to_string()), "{message}");
    assert!(took < connect_timeout, "failed after {took:?}, not at once");
    server.shutdown().await;
}

#[tokio::test]
async fn mutual_tls_required_and_given_elects() {
    let ca = Ca::new("mtls CA");
    let server = mtls_server(&ca).await;
    let me = ca.client();
    let client = over_tcp(&server.url(), 3)
        .ca_certificate(ca.pem())
        .identity(&me.cert, &me.key)
        .build()
        .await
        .expect("a client with a certificate from the client CA connects");
    leads(&client, &server).await;
    client.release_lock().await.unwrap();
    server.shutdown().await;
}

#[tokio::test]
async fn mutual_tls_required_but_not_given_is_a_clear_error() {
    let ca = Ca::new("mtls CA");
    let server = mtls_server(&ca).await;
    // TLS 1.3: the client's handshake may complete before the server checks
    // for a certificate, so the refusal shows on build() or on the first
    // call; either way it says a client certificate is wanted.
    let result = async {
        let client = over_tcp(&server.url(), 3)
            .ca_certificate(ca.pem())
            .build()
            .await?;
        client.try_acquire_lock().await
    }
    .await;
    let err = result.unwrap_err();
    let message = err.to_string();
    eprintln!("{message}");
    assert!(
        matches!(err, Error::Connection(_) | Error::Rpc(_)),
        "{err:?}"
    );
    assert!(message.contains("client certificate"), "{message}");
    assert!(message.contains(&server.addr().to_string()), "{message}");
    assert!(server.lock(SERVICE, DOMAIN).is_none());
    server.shutdown().await;
}

#[tokio::test]
async fn a_required_token_given_is_elected_and_wrong_or_missing_is_unauthenticated() {
    let server = TestServer::builder()
        .required_token("s3cret")
        .start()
        .await
        .unwrap();
    let good = over_tcp(&server.url(), 3)
        .bearer_token("s3cret")
        .build()
        .await
        .unwrap();
    leads(&good, &server).await;
    good.release_lock().await.unwrap();

    for builder in [
        over_tcp(&server.url(), 3),
        over_tcp(&server.url(), 3).bearer_token("wrong"),
    ] {
        let client = builder.build().await.unwrap();
        match client.try_acquire_lock().await.unwrap_err() {
            Error::Rpc(status) => assert_eq!(status.code(), Code::Unauthenticated, "{status:?}"),
            other => panic!("expected UNAUTHENTICATED, got {other:?}"),
        }
    }
    assert!(server.lock(SERVICE, DOMAIN).is_none());
    server.shutdown().await;
}

#[tokio::test]
async fn a_missing_token_surfaces_unauthenticated_and_is_retried_at_the_retry_period_not_in_a_tight_loop(
) {
    let server = TestServer::builder()
        .required_token("s3cret")
        .start()
        .await
        .unwrap();
    let retry_period = ms(400);
    let client = over_tcp(&server.url(), 3)
        .retry_period(retry_period)
        .build()
        .await
        .unwrap();
    let mut events = Box::pin(client.leadership());
    let failed = until(&mut events, 5 * SEC, "RpcFailed", |ev| {
        matches!(ev, LeadershipEvent::RpcFailed { .. })
    })
    .await;
    match failed {
        LeadershipEvent::RpcFailed { rpc, code, .. } => {
            assert_eq!(rpc, RpcKind::TryAcquireLock);
            assert_eq!(code, Code::Unauthenticated);
        }
        other => panic!("{other:?}"),
    }
    // Count the attempts over a window: a permanent failure waits the
    // retry period each time, so at most window / period + 1 attempts
    // (a tight loop would make hundreds).
    let start = server.calls(RpcKind::TryAcquireLock);
    let window = ms(2000);
    let deadline = tokio::time::Instant::now() + window;
    while let Ok(Some(ev)) = tokio::time::timeout_at(deadline, events.next()).await {
        match ev {
            LeadershipEvent::RpcFailed { code, .. } => assert_eq!(code, Code::Unauthenticated),
            LeadershipEvent::Elected { .. } => panic!("elected without a token"),
            _ => {}
        }
    }
    let attempts = server.calls(RpcKind::TryAcquireLock) - start;
    eprintln!("{attempts} TryAcquireLock attempts in {window:?} without a token");
    let most = window.as_millis() / retry_period.as_millis() + 1;
    assert!(
        (1..=most as u64).contains(&attempts),
        "{attempts} attempts in {window:?} with a retry period of {retry_period:?} (at most {most})"
    );
    drop(events);
    server.shutdown().await;
}

#[tokio::test]
async fn metadata_and_token_survive_redials_and_reach_for_scope_and_shared_clients() {
    let server = TestServer::builder()
        .required_token("s3cret")
        .max_connection_age(ms(300))
        .max_connection_age_grace(ms(200))
        .start()
        .await
        .unwrap();
    server.set_required_metadata("x-tenant", Some("blue"));
    let client = over_tcp(&server.url(), 3)
        .bearer_token("s3cret")
        .metadata("X-Tenant", "blue")
        .build()
        .await
        .unwrap();
    // Connections are aged out every 300 ms; every call must still carry
    // the metadata, on each new connection.
    let started = server.connections_accepted();
    let aged_out = async {
        while server.connections_accepted() < started + 3 {
            leads(&client, &server).await;
            tokio::time::sleep(ms(100)).await;
        }
    };
    tokio::time::timeout(10 * SEC, aged_out)
        .await
        .expect("three connections aged out within 10 s");
    // A restart: a fresh connection again.
    server.restart(true).await.unwrap();
    leads(&client, &server).await;

    let shard = client.for_scope("svc-2", DOMAIN).unwrap();
    assert!(
        shard.try_acquire_lock().await.unwrap(),
        "for_scope sends the metadata"
    );
    let shared = QuorumQuestClient::builder("svc-3", DOMAIN)
        .ttl(Duration::from_secs(3))
        .share_connection(&client)
        .build()
        .await
        .unwrap();
    assert!(
        shared.try_acquire_lock().await.unwrap(),
        "share_connection sends it too"
    );
    let overridden = QuorumQuestClient::builder("svc-4", DOMAIN)
        .ttl(Duration::from_secs(3))
        .share_connection(&client)
        .metadata("x-tenant", "green")
        .build()
        .await
        .unwrap();
    match overridden.try_acquire_lock().await.unwrap_err() {
        Error::Rpc(status) => assert_eq!(status.code(), Code::Unauthenticated),
        other => panic!("{other:?}"),
    }
    for c in [&client, &shard, &shared] {
        c.release_lock().await.unwrap();
    }
    server.shutdown().await;
}

#[tokio::test]
async fn an_interceptor_can_supply_a_rotating_token() {
    let server = TestServer::builder()
        .required_token("one")
        .start()
        .await
        .unwrap();
    let current = std::sync::Arc::new(std::sync::Mutex::new("one".to_string()));
    let source = current.clone();
    let client = over_tcp(&server.url(), 3)
        .interceptor(move |mut req: quorum_quest_client::tonic::Request<()>| {
            let token = format!("Bearer {}", source.lock().unwrap());
            req.metadata_mut()
                .insert("authorization", token.parse().unwrap());
            Ok(req)
        })
        .build()
        .await
        .unwrap();
    leads(&client, &server).await;
    server.set_required_token(Some("two"));
    *current.lock().unwrap() = "two".to_string();
    leads(&client, &server).await;
    client.release_lock().await.unwrap();
    server.shutdown().await;
}

#[tokio::test]
async fn a_refused_connection_names_the_address_and_says_refused() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let err = over_tcp(&format!("http://{addr}"), 3)
        .build()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Connection(_)), "{err:?}");
    let message = err.to_string();
    eprintln!("{message}");
    assert!(message.contains(&addr.to_string()), "{message}");
    assert!(message.contains("connection refused"), "{message}");
}

#[tokio::test]
async fn a_lazy_client_reports_a_refused_connection_with_the_address_in_its_rpc_failures() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let client = over_tcp(&format!("http://{addr}"), 3)
        .lazy_connect()
        .build()
        .await
        .unwrap();
    match client.try_acquire_lock().await.unwrap_err() {
        Error::Rpc(status) => {
            assert_eq!(status.code(), Code::Unavailable, "{status:?}");
            let message = status.message();
            assert!(message.contains(&addr.to_string()), "{message}");
            assert!(message.contains("connection refused"), "{message}");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_peer_that_answers_http_but_not_grpc_says_so() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let web = tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = conn.read(&mut buf).await;
                let _ = conn
                    .write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
                    .await;
                // Keep the connection open (read until the client goes), as
                // a web server with keep-alive does.
                while matches!(conn.read(&mut buf).await, Ok(n) if n > 0) {}
            });
        }
    });
    let result = async {
        let client = over_tcp(&format!("http://{addr}"), 3).build().await?;
        client.try_acquire_lock().await
    }
    .await;
    let err = result.unwrap_err();
    let message = err.to_string();
    eprintln!("{message}");
    assert!(
        message.contains("does not speak HTTP/2") || message.contains("not a Quorum Quest"),
        "{message}"
    );
    web.abort();
}

#[tokio::test]
async fn bad_tls_and_metadata_settings_are_invalid_parameters_that_never_quote_secrets() {
    let expect_invalid = |result: Result<QuorumQuestClient, Error>, starts: &str| match result {
        Err(Error::InvalidParameter(m)) => {
            assert!(m.starts_with(starts), "{m}");
            assert!(!m.contains("hunter2"), "{m}");
            m
        }
        other => panic!("expected InvalidParameter({starts}..), got {other:?}"),
    };
    let b = || QuorumQuestClient::builder(SERVICE, DOMAIN).lazy_connect();
    expect_invalid(
        b().metadata("grpc-timeout", "1S").build().await,
        "metadata:",
    );
    expect_invalid(b().metadata("content-type", "x").build().await, "metadata:");
    expect_invalid(b().metadata("bad key", "x").build().await, "metadata:");
    expect_invalid(b().metadata("x-data-bin", "x").build().await, "metadata:");
    expect_invalid(
        b().metadata("x-ok", "line\nbreak").build().await,
        "metadata:",
    );
    expect_invalid(b().bearer_token("hunter2\n").build().await, "bearer_token:");
    expect_invalid(b().bearer_token("").build().await, "bearer_token:");
    // TLS settings need a TLS address (the default one is plaintext).
    let b = || b().address("localhost:5050");
    expect_invalid(
        b().ca_certificate("not a pem").build().await,
        "ca_certificate:",
    );
    let ca = Ca::new("ca");
    let leaf = ca.client();
    expect_invalid(
        b().identity(&leaf.cert, "hunter2").build().await,
        "identity:",
    );
    expect_invalid(b().identity("nope", &leaf.key).build().await, "identity:");
    expect_invalid(b().tls_domain("not a domain!").build().await, "tls_domain:");
    // TLS settings with a plaintext address, a channel or a shared
    // connection: an error, never silently ignored.
    expect_invalid(
        b().address("http://localhost:5050")
            .ca_certificate(ca.pem())
            .build()
            .await,
        "address:",
    );
    let channel =
        quorum_quest_client::tonic::transport::Endpoint::from_static("http://localhost:5050")
            .connect_lazy();
    expect_invalid(
        b().channel(channel).ca_certificate(ca.pem()).build().await,
        "tls:",
    );
    // A bare host:port with TLS settings means TLS.
    assert!(b()
        .address("localhost:5050")
        .ca_certificate(ca.pem())
        .build()
        .await
        .is_ok());

    // Secrets stay out of Debug output.
    let builder = b().bearer_token("hunter2").identity(&leaf.cert, &leaf.key);
    let shown = format!("{builder:?}");
    assert!(
        !shown.contains("hunter2") && !shown.contains("PRIVATE KEY"),
        "{shown}"
    );
    let client = builder.build().await.unwrap();
    let shown = format!("{client:?}");
    assert!(!shown.contains("hunter2"), "{shown}");
}

#[tokio::test]
async fn tls_settings_apply_to_a_user_endpoint_and_survive_its_redial() {
    use quorum_quest_client::tonic::transport::Endpoint;
    let ca = Ca::new("endpoint CA");
    let server = tls_server(&ca).await;
    let endpoint = Endpoint::from_shared(server.url())
        .unwrap()
        .user_agent("tls-test/1.0")
        .unwrap();
    let client = QuorumQuestClient::builder(SERVICE, DOMAIN)
        .ttl(Duration::from_secs(3))
        .endpoint(endpoint)
        .ca_certificate(ca.pem())
        .tls_domain("localhost")
        .build()
        .await
        .expect("the builder's TLS settings apply to the endpoint");
    leads(&client, &server).await;
    server.restart(true).await.unwrap();
    leads(&client, &server).await;
    client.release_lock().await.unwrap();

    // A plaintext endpoint with TLS settings is refused, not downgraded.
    let plain = Endpoint::from_static("http://127.0.0.1:1");
    match QuorumQuestClient::builder(SERVICE, DOMAIN)
        .endpoint(plain)
        .ca_certificate(ca.pem())
        .build()
        .await
    {
        Err(Error::InvalidParameter(m)) => assert!(m.starts_with("endpoint:"), "{m}"),
        other => panic!("{other:?}"),
    }
    server.shutdown().await;
}

#[tokio::test]
async fn a_test_server_with_unreadable_tls_material_fails_to_start_with_invalid_input() {
    let ca = Ca::new("ca");
    let leaf = ca.server();
    for builder in [
        TestServer::builder().tls("not a cert", &leaf.key),
        TestServer::builder().tls(&leaf.cert, "not a key"),
        // A client CA without a server certificate.
        TestServer::builder().client_ca(ca.pem()),
        TestServer::builder()
            .tls(&leaf.cert, &leaf.key)
            .client_ca("not a cert"),
    ] {
        let err = builder.start().await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput, "{err}");
        assert!(err.to_string().starts_with("test server TLS:"), "{err}");
    }
}
