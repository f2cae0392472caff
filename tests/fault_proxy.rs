#![cfg(feature = "testing")]
//! The `FaultProxy` passes, black-holes and resets traffic, and mode switches
//! apply to live connections.

use std::time::Duration;

use quorum_quest_client::proto::leader_election_service_client::LeaderElectionServiceClient;
use quorum_quest_client::proto::{KeepAliveRequest, ReleaseLockRequest, TryAcquireLockRequest};
use quorum_quest_client::testing::{FaultProxy, ProxyMode, TenureEnd, TestServer};
use quorum_quest_client::RpcKind;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};
use tonic::transport::{Channel, Endpoint};

type Client = LeaderElectionServiceClient<Channel>;

const SOON: Duration = Duration::from_secs(10);

fn acquire_req(id: &str) -> TryAcquireLockRequest {
    TryAcquireLockRequest {
        service: "svc".into(),
        domain: "dom".into(),
        client_id: id.into(),
        ttl: 60,
    }
}

fn keep_alive_req(id: &str) -> KeepAliveRequest {
    KeepAliveRequest {
        service: "svc".into(),
        domain: "dom".into(),
        client_id: id.into(),
        ttl: 60,
    }
}

async fn setup() -> (TestServer, FaultProxy, Client) {
    let server = TestServer::start().await.unwrap();
    let proxy = FaultProxy::start(server.addr()).await.unwrap();
    let channel = Endpoint::from_shared(proxy.url())
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
        .unwrap();
    (server, proxy, LeaderElectionServiceClient::new(channel))
}

/// A request that gives up after `t` (as a client's per-call deadline would).
fn with_timeout<T>(msg: T, t: Duration) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.set_timeout(t);
    req
}

/// Retries until a call goes through (a channel may need one failed call to
/// notice its connection is gone).
async fn eventually_acquire(c: &mut Client, id: &str) -> bool {
    let deadline = Instant::now() + SOON;
    loop {
        let req = with_timeout(acquire_req(id), Duration::from_secs(2));
        match c.try_acquire_lock(req).await {
            Ok(r) => return r.into_inner().is_leader,
            Err(e) => {
                assert!(Instant::now() < deadline, "never got through: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

#[tokio::test]
async fn pass_mode_forwards_calls() {
    let (server, proxy, mut c) = setup().await;
    assert_eq!(proxy.mode(), ProxyMode::Pass);
    assert!(
        c.try_acquire_lock(acquire_req("a"))
            .await
            .unwrap()
            .into_inner()
            .is_leader
    );
    let lease = c
        .keep_alive(keep_alive_req("a"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(lease.lease_length.unwrap().seconds, 60);
    assert_eq!(proxy.connections_accepted(), 1);
    assert_eq!(server.calls(RpcKind::TryAcquireLock), 1);
    proxy.shutdown().await;
    server.shutdown().await;
}

#[tokio::test]
async fn blackhole_makes_calls_time_out_until_pass() {
    let (server, proxy, mut c) = setup().await;
    assert!(
        c.try_acquire_lock(acquire_req("a"))
            .await
            .unwrap()
            .into_inner()
            .is_leader
    );

    proxy.set_mode(ProxyMode::Blackhole);
    let started = Instant::now();
    let err = c
        .keep_alive(with_timeout(
            keep_alive_req("a"),
            Duration::from_millis(500),
        ))
        .await
        .unwrap_err();
    assert!(started.elapsed() >= Duration::from_millis(450));
    assert!(
        matches!(
            err.code(),
            tonic::Code::Cancelled | tonic::Code::DeadlineExceeded
        ),
        "deadline exceeded: {err}"
    );
    assert_eq!(
        server.calls(RpcKind::KeepAlive),
        0,
        "nothing reached the server"
    );

    proxy.set_mode(ProxyMode::Pass);
    let lease = timeout(SOON, c.keep_alive(keep_alive_req("a")))
        .await
        .expect("flows again after Pass")
        .unwrap()
        .into_inner();
    assert_eq!(lease.lease_length.unwrap().seconds, 60);
    proxy.shutdown().await;
    server.shutdown().await;
}

#[tokio::test]
async fn blackhole_accepts_new_connections_but_forwards_nothing() {
    let server = TestServer::start().await.unwrap();
    let proxy = FaultProxy::start(server.addr()).await.unwrap();
    proxy.set_mode(ProxyMode::Blackhole);
    let mut raw = TcpStream::connect(proxy.addr()).await.unwrap();
    raw.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    assert!(
        timeout(Duration::from_millis(300), raw.read(&mut buf))
            .await
            .is_err(),
        "no answer while black-holed"
    );
    assert_eq!(
        server.connections_accepted(),
        0,
        "nothing reached the server"
    );
    // Pass: the buffered preface is delivered and the server answers (SETTINGS).
    proxy.set_mode(ProxyMode::Pass);
    let n = timeout(SOON, raw.read(&mut buf))
        .await
        .expect("server answers after Pass")
        .unwrap();
    assert!(n > 0);
    assert_eq!(server.connections_accepted(), 1);
    proxy.shutdown().await;
    server.shutdown().await;
}

#[tokio::test]
async fn reset_cuts_connections_until_pass() {
    let (server, proxy, mut c) = setup().await;
    assert!(
        c.try_acquire_lock(acquire_req("a"))
            .await
            .unwrap()
            .into_inner()
            .is_leader
    );

    proxy.set_mode(ProxyMode::Reset);
    for _ in 0..3 {
        let err = c
            .keep_alive(with_timeout(keep_alive_req("a"), Duration::from_secs(5)))
            .await
            .unwrap_err();
        assert!(
            matches!(
                err.code(),
                tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Internal
            ),
            "{err}"
        );
    }
    // A raw connection is accepted, then reset.
    let mut raw = TcpStream::connect(proxy.addr()).await.unwrap();
    let mut buf = [0u8; 8];
    let read = timeout(SOON, raw.read(&mut buf))
        .await
        .expect("cut promptly");
    assert!(matches!(read, Ok(0) | Err(_)));

    proxy.set_mode(ProxyMode::Pass);
    assert!(
        eventually_acquire(&mut c, "a").await,
        "a still owns its lock"
    );
    proxy.shutdown().await;
    server.shutdown().await;
}

#[tokio::test]
async fn reset_cuts_a_call_in_flight() {
    let (server, proxy, c) = setup().await;
    server.pause();
    let mut c2 = c.clone();
    let call = tokio::spawn(async move { c2.try_acquire_lock(acquire_req("a")).await });
    let deadline = Instant::now() + SOON;
    while server.calls(RpcKind::TryAcquireLock) == 0 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    proxy.set_mode(ProxyMode::Reset);
    let result = timeout(SOON, call).await.expect("cut promptly").unwrap();
    assert!(result.is_err());
    server.resume();
    proxy.shutdown().await;
    server.shutdown().await;
}

#[tokio::test]
async fn shutdown_closes_the_proxy() {
    let (server, proxy, mut c) = setup().await;
    assert!(
        c.try_acquire_lock(acquire_req("a"))
            .await
            .unwrap()
            .into_inner()
            .is_leader
    );
    proxy.shutdown().await;
    proxy.shutdown().await;
    assert!(TcpStream::connect(proxy.addr()).await.is_err());
    assert!(c
        .try_acquire_lock(with_timeout(acquire_req("a"), Duration::from_secs(5)))
        .await
        .is_err());
    server.shutdown().await;
}

#[tokio::test]
async fn no_task_outlives_the_proxy() {
    let (server, proxy, mut c) = setup().await;
    assert!(
        c.try_acquire_lock(acquire_req("a"))
            .await
            .unwrap()
            .into_inner()
            .is_leader
    );
    proxy.set_mode(ProxyMode::Blackhole);
    let _idle = TcpStream::connect(proxy.addr()).await.unwrap();
    proxy.shutdown().await;
    server.shutdown().await;
    drop(c);
    let metrics = tokio::runtime::Handle::current().metrics();
    let deadline = Instant::now() + SOON;
    while metrics.num_alive_tasks() > 0 {
        assert!(
            Instant::now() < deadline,
            "{} tasks alive",
            metrics.num_alive_tasks()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn release_req(id: &str) -> ReleaseLockRequest {
    ReleaseLockRequest {
        service: "svc".into(),
        domain: "dom".into(),
        client_id: id.into(),
    }
}

async fn connect_through(proxy: &FaultProxy) -> Client {
    let channel = Endpoint::from_shared(proxy.url())
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
        .unwrap();
    LeaderElectionServiceClient::new(channel)
}

/// Polls `cond` until it holds (bounded).
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + SOON;
    while !cond() {
        assert!(Instant::now() < deadline, "{what}: not within {SOON:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The stale-release split brain, at the raw-stub level: a ReleaseLock stalls
/// on connection 1, the client gives up, cuts that connection and re-acquires
/// on connection 2; then the held ReleaseLock reaches the server and deletes
/// the new lock.
#[tokio::test]
async fn hold_live_delivers_a_stale_release_after_the_client_moved_on() {
    let server = TestServer::start().await.unwrap();
    let proxy = FaultProxy::start(server.addr()).await.unwrap();

    // Term 1 on connection 1.
    let mut first = connect_through(&proxy).await;
    assert!(
        first
            .try_acquire_lock(acquire_req("a"))
            .await
            .unwrap()
            .into_inner()
            .is_leader
    );

    // Connection 1 stalls; the release hangs and the client gives up on it.
    proxy.hold_live();
    let gave_up = timeout(
        Duration::from_millis(300),
        first.release_lock(release_req("a")),
    )
    .await;
    assert!(gave_up.is_err(), "the release must hang while held");
    assert_eq!(server.calls(RpcKind::ReleaseLock), 0, "held: not delivered");
    // The client cuts connection 1.
    drop(first);

    // Term 2 on a new connection, which passes normally. The lock expired
    // meanwhile (forced here), so this is a new tenure.
    server.force_expire("svc", "dom");
    let mut second = connect_through(&proxy).await;
    assert!(
        timeout(SOON, second.try_acquire_lock(acquire_req("a")))
            .await
            .expect("new connections pass while the old ones are held")
            .unwrap()
            .into_inner()
            .is_leader
    );
    let acquired_again = Instant::now();
    assert_eq!(proxy.connections_accepted(), 2);
    assert_eq!(server.tenures().len(), 2);
    assert_eq!(server.calls(RpcKind::ReleaseLock), 0);

    // The held release now reaches the server and ends the new tenure.
    proxy.deliver_held();
    wait_until("the held release reached the server", || {
        server.calls(RpcKind::ReleaseLock) == 1
    })
    .await;
    wait_until("the lock is gone", || server.lock("svc", "dom").is_none()).await;
    let tenures = server.tenures();
    assert_eq!(tenures.len(), 2, "{tenures:?}");
    let second_tenure = &tenures[1];
    assert_eq!(second_tenure.owner, "a");
    assert_eq!(second_tenure.ended_by, TenureEnd::Released);
    assert!(second_tenure.start <= acquired_again);
    assert!(second_tenure.end >= acquired_again);

    // The client on connection 2 still believes it holds term 2; the server
    // says otherwise.
    let lease = second
        .keep_alive(keep_alive_req("a"))
        .await
        .unwrap()
        .into_inner()
        .lease_length;
    assert_eq!(lease.map(|d| d.seconds), Some(-1));
    proxy.shutdown().await;
    server.shutdown().await;
}
