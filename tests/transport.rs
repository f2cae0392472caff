//! The connection the library owns: a bounded connect, HTTP/2 keep-alive under
//! an open call, and a redial after a timed-out call (by address and by a
//! user-supplied `Endpoint`), against a real server on loopback.
#![cfg(feature = "testing")]

mod common;

use std::time::Duration;

use common::{eventually, ms, server, DOMAIN, SEC, SERVICE};
use quorum_quest_client::testing::{FaultProxy, ProxyMode, TestServer};
use quorum_quest_client::{ClientBuilder, Error, QuorumQuestClient};
use tokio::net::TcpListener;
use tokio::time::{timeout, Instant};
use tonic::transport::{ClientTlsConfig, Endpoint};
use tonic::Code;

/// A generous bound for anything that should take well under a second.
const SOON: Duration = Duration::from_secs(10);

async fn server_and_proxy() -> (TestServer, FaultProxy) {
    let server = server().await;
    let proxy = FaultProxy::start(server.addr())
        .await
        .expect("fault proxy starts");
    (server, proxy)
}

/// A TCP listener on loopback that accepts connections, keeps them open and
/// never writes a byte: a TLS handshake against it never completes.
async fn silent_listener() -> (u16, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let port = listener.local_addr().expect("local addr").port();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    (port, task)
}

/// A client with a long TTL and a short call timeout: keep-alive pings (every
/// 10 s / 3 s) never fire within one call, so only the redial can replace a
/// silent connection.
fn short_calls() -> ClientBuilder {
    QuorumQuestClient::builder(SERVICE, DOMAIN)
        .ttl(30 * SEC)
        .rpc_timeout(SEC)
}

fn assert_timed_out(result: Result<bool, Error>) {
    match result {
        Err(Error::Rpc(status)) => assert!(
            matches!(status.code(), Code::Cancelled | Code::DeadlineExceeded),
            "expected a timeout, got {status:?}"
        ),
        other => panic!("expected a timed-out call, got {other:?}"),
    }
}

/// Blackholes the proxy, lets one call time out, restores the path, and
/// checks that the next call succeeds on a new connection.
async fn next_call_after_a_timeout_dials_anew(
    client: &QuorumQuestClient,
    server: &TestServer,
    proxy: &FaultProxy,
) {
    assert!(client.try_acquire_lock().await.expect("first call"));
    assert_eq!(proxy.connections_accepted(), 1);
    assert_eq!(server.connections_accepted(), 1);

    proxy.set_mode(ProxyMode::Blackhole);
    let started = Instant::now();
    assert_timed_out(
        timeout(SOON, client.try_acquire_lock())
            .await
            .expect("the call is bounded"),
    );
    assert!(started.elapsed() >= ms(900), "{:?}", started.elapsed());
    // Nothing dialed yet: the fresh connection is made on first use.
    assert_eq!(proxy.connections_accepted(), 1);

    // The path works again, and so would the old connection (the proxy
    // delivers what it held): only a redial makes the next call use a new one.
    proxy.set_mode(ProxyMode::Pass);
    let again = timeout(SOON, client.try_acquire_lock())
        .await
        .expect("the call is bounded");
    assert!(again.expect("the call after the partition succeeds"));
    assert_eq!(
        proxy.connections_accepted(),
        2,
        "the call after a timed-out one must go out on a new connection"
    );
    assert_eq!(server.connections_accepted(), 2);
}

#[tokio::test]
async fn the_connect_timeout_bounds_the_whole_connect_tls_included() {
    let (port, listener) = silent_listener().await;
    let started = Instant::now();
    let built = timeout(
        SOON,
        QuorumQuestClient::builder(SERVICE, DOMAIN)
            .address(format!("https://127.0.0.1:{port}"))
            .connect_timeout(ms(300))
            .build(),
    )
    .await
    .expect("build() must give up after the connect timeout, not hang in the TLS handshake");
    match built {
        Err(Error::ConnectTimeout(limit)) => assert_eq!(limit, ms(300)),
        other => panic!("expected ConnectTimeout, got {other:?}"),
    }
    assert!(started.elapsed() >= ms(300), "{:?}", started.elapsed());
    let err = Error::ConnectTimeout(ms(300));
    assert!(err.to_string().contains("300ms"), "{err}");
    listener.abort();
}

#[tokio::test]
async fn the_connect_timeout_of_a_user_endpoint_bounds_its_whole_connect() {
    let (port, listener) = silent_listener().await;
    let endpoint = Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
        .expect("valid uri")
        .tls_config(ClientTlsConfig::new().with_webpki_roots())
        .expect("tls config")
        .connect_timeout(ms(300));
    // The endpoint's own timeout applies, not the builder's (default 5 s).
    let built = timeout(
        SOON,
        QuorumQuestClient::builder(SERVICE, DOMAIN)
            .endpoint(endpoint)
            .build(),
    )
    .await
    .expect("build() must give up after the endpoint's connect timeout");
    match built {
        Err(Error::ConnectTimeout(limit)) => assert_eq!(limit, ms(300)),
        other => panic!("expected ConnectTimeout, got {other:?}"),
    }
    listener.abort();
}

#[tokio::test]
async fn keep_alive_pings_notice_a_silent_connection_under_an_open_call() {
    let (server, proxy) = server_and_proxy().await;
    // ttl 30 s, call timeout 9 s: pings after 3 s of silence, 3 s to answer.
    let client = QuorumQuestClient::builder(SERVICE, DOMAIN)
        .address(proxy.url())
        .ttl(30 * SEC)
        .rpc_timeout(9 * SEC)
        .build()
        .await
        .expect("client connects");
    // The proxy and the server count a connection when their accept loops
    // get to it, which may be after the client's connect returned.
    eventually(SOON, "one connection through the proxy", || {
        proxy.connections_accepted() == 1 && server.connections_accepted() == 1
    })
    .await;

    proxy.set_mode(ProxyMode::Blackhole);
    let started = Instant::now();
    let call = tokio::spawn(async move { client.try_acquire_lock().await });
    // The unanswered ping closes the connection while the call is still
    // open, and tonic dials a new one for the call's retry. Without pings the
    // call would sit on the dead connection until its 9 s timeout.
    eventually(
        8 * SEC,
        "keep-alive closes the silent connection before the call times out",
        || proxy.connections_accepted() >= 2,
    )
    .await;
    let noticed = started.elapsed();
    assert!(noticed < 9 * SEC, "noticed after {noticed:?}");
    assert!(noticed >= 3 * SEC, "noticed after only {noticed:?}");
    assert_eq!(
        server.connections_accepted(),
        1,
        "blackholed: nothing reached the server"
    );

    proxy.set_mode(ProxyMode::Pass);
    timeout(SOON, call)
        .await
        .expect("the call is bounded by its timeout")
        .expect("the call task does not panic")
        .ok();
}

#[tokio::test]
async fn after_a_timed_out_call_the_next_call_goes_out_on_a_new_connection() {
    let (server, proxy) = server_and_proxy().await;
    let client = short_calls()
        .address(proxy.url())
        .build()
        .await
        .expect("client connects");
    next_call_after_a_timeout_dials_anew(&client, &server, &proxy).await;
}

#[tokio::test]
async fn a_client_built_with_an_endpoint_redials_after_a_timed_out_call() {
    let (server, proxy) = server_and_proxy().await;
    let endpoint = Endpoint::from_shared(proxy.url())
        .expect("valid uri")
        .user_agent("transport-test")
        .expect("valid user agent");
    let client = short_calls()
        .endpoint(endpoint)
        .build()
        .await
        .expect("client connects");
    next_call_after_a_timeout_dials_anew(&client, &server, &proxy).await;
}

#[tokio::test]
async fn an_endpoint_is_connected_eagerly_unless_lazy_connect() {
    let (server, proxy) = server_and_proxy().await;
    let endpoint = Endpoint::from_shared(proxy.url()).expect("valid uri");

    let lazy = short_calls()
        .lazy_connect()
        .endpoint(endpoint.clone())
        .build()
        .await
        .expect("a lazy client builds without connecting");
    assert_eq!(proxy.connections_accepted(), 0);
    assert!(lazy.try_acquire_lock().await.expect("first call connects"));
    assert_eq!(proxy.connections_accepted(), 1);

    let eager = short_calls()
        .endpoint(endpoint)
        .build()
        .await
        .expect("an eager client connects in build()");
    eventually(SOON, "the eager connect reached the proxy", || {
        proxy.connections_accepted() == 2
    })
    .await;
    drop(eager);

    // An unreachable endpoint fails build() unless lazy.
    server.shutdown().await;
    proxy.shutdown().await;
    let gone = Endpoint::from_shared(proxy.url()).expect("valid uri");
    let err = short_calls()
        .endpoint(gone)
        .connect_timeout(2 * SEC)
        .build()
        .await
        .expect_err("nothing listens there");
    assert!(
        matches!(err, Error::Connection(_) | Error::ConnectTimeout(_)),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_user_channel_is_never_redialed() {
    let (server, proxy) = server_and_proxy().await;
    let channel = Endpoint::from_shared(proxy.url())
        .expect("valid uri")
        .connect()
        .await
        .expect("channel connects");
    let client = short_calls()
        .channel(channel)
        .build()
        .await
        .expect("client builds");
    assert!(client.try_acquire_lock().await.expect("first call"));

    proxy.set_mode(ProxyMode::Blackhole);
    assert_timed_out(
        timeout(SOON, client.try_acquire_lock())
            .await
            .expect("the call is bounded"),
    );
    proxy.set_mode(ProxyMode::Pass);
    // The old connection carries on once the path is back: the library did
    // not replace it.
    assert!(timeout(SOON, client.try_acquire_lock())
        .await
        .expect("the call is bounded")
        .expect("the old connection works again"));
    assert_eq!(proxy.connections_accepted(), 1);
    assert_eq!(server.connections_accepted(), 1);
}

/// A call whose budget was cut short by its wait for a call slot (here a
/// release, which gets one RPC timeout in all, queue included, behind
/// another lock's slow call on the one slot) says nothing about the
/// connection when it times out: the connection answered the call ahead of
/// it a moment before. It must not be redialed (found by attack: it was,
/// because only answers after the short call's own send counted as evidence).
#[tokio::test]
async fn a_call_timed_out_on_a_budget_cut_short_by_the_queue_does_not_redial_a_live_connection() {
    let server = server().await;
    let leader = QuorumQuestClient::builder(SERVICE, DOMAIN)
        .address(server.url())
        .ttl(Duration::from_secs(6))
        .rpc_timeout(3 * SEC)
        .max_concurrent_calls(1)
        .build()
        .await
        .unwrap();
    assert!(leader.try_acquire_lock().await.unwrap());
    // With the waits below, long enough after the dial for a redial to be
    // allowed.
    tokio::time::sleep(ms(500)).await;
    server.set_owner("other", "lock", "someone-else", 100 * SEC);
    let other = QuorumQuestClient::builder("other", "lock")
        .share_connection(&leader)
        .ttl(Duration::from_secs(30))
        .rpc_timeout(10 * SEC)
        .build()
        .await
        .unwrap();
    server.set_latency(ms(2_900));
    let acquires = server.calls(quorum_quest_client::RpcKind::TryAcquireLock);
    let hog = tokio::spawn(async move { other.try_acquire_lock().await });
    eventually(SOON, "the other attempt is on the wire", || {
        server.calls(quorum_quest_client::RpcKind::TryAcquireLock) > acquires
    })
    .await;
    // Queued for about 2.9 s behind it, the release goes out with about
    // 0.1 s left of its 3 s (under the quarter, 0.75 s, that can judge the
    // connection), and times out.
    let released = leader.release_lock().await;
    assert!(released.is_err(), "{released:?}");
    assert!(matches!(hog.await.unwrap(), Ok(false)));
    server.set_latency(Duration::ZERO);
    assert!(leader.try_acquire_lock().await.unwrap());
    assert_eq!(
        server.connections_accepted(),
        1,
        "a live connection was redialed"
    );
}
