//! [`GoawayRelay`]: a gRPC hop in front of a server that sends HTTP/2 GOAWAY
//! on its client connections, or cuts them, on demand.

use std::fmt;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint, Server};
use tonic::{Request, Response, Status};

use super::accept::accept_until;
use super::background::Background;
use super::cut_io::CutIo;
use crate::proto::leader_election_service_client::LeaderElectionServiceClient;
use crate::proto::leader_election_service_server::{
    LeaderElectionService, LeaderElectionServiceServer,
};
use crate::proto::{
    KeepAliveRequest, KeepAliveResponse, ReleaseLockRequest, ReleaseLockResponse,
    TryAcquireLockRequest, TryAcquireLockResponse,
};

/// How long a connection may stay open after its GOAWAY.
const GOAWAY_GRACE: Duration = Duration::from_secs(1);

struct RelayInner {
    addr: SocketAddr,
    goaway: watch::Sender<u64>,
    cut: watch::Sender<u64>,
    goaways: Arc<AtomicU64>,
    background: Background,
}

/// A gRPC relay on `127.0.0.1` in front of a Quorum Quest server (a
/// [`TestServer`](super::TestServer) or any other): it forwards every call
/// upstream, and on demand sends HTTP/2 GOAWAY on its client connections
/// ([`goaway`](GoawayRelay::goaway)) or cuts them
/// ([`cut`](GoawayRelay::cut)).
///
/// A GOAWAY is what the real server's `MaxConnectionAge` does: the
/// connection takes no new calls, the calls in flight finish, and if the
/// connection is still open a second later it is cut. A client must then
/// dial anew without losing its lease. Where [`FaultProxy`](super::FaultProxy)
/// breaks the network below HTTP/2, the relay speaks it; chain them
/// (client → proxy → relay → server) for both.
///
/// `GoawayRelay` is a cheap handle: clone it freely. When the last handle is
/// dropped the relay stops (calling [`GoawayRelay::shutdown`] first waits
/// for its tasks to end).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use quorum_quest_client::proto::leader_election_service_client::LeaderElectionServiceClient;
/// use quorum_quest_client::proto::ReleaseLockRequest;
/// use quorum_quest_client::testing::{GoawayRelay, TestServer};
///
/// let server = TestServer::start().await?;
/// let relay = GoawayRelay::start(server.addr()).await?;
/// assert_eq!(relay.url(), format!("http://{}", relay.addr()));
/// let mut client = LeaderElectionServiceClient::connect(relay.url()).await?;
/// client.release_lock(ReleaseLockRequest::default()).await?;
///
/// // The live connection is told to go away (and cut a second later).
/// relay.goaway();
/// while relay.goaways_sent() == 0 {
///     tokio::time::sleep(Duration::from_millis(10)).await;
/// }
/// // New connections are served as before; `cut` drops them at once.
/// let mut client = LeaderElectionServiceClient::connect(relay.url()).await?;
/// client.release_lock(ReleaseLockRequest::default()).await?;
/// relay.cut();
/// # relay.shutdown().await;
/// # server.shutdown().await;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct GoawayRelay {
    inner: Arc<RelayInner>,
}

impl fmt::Debug for GoawayRelay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GoawayRelay")
            .field("addr", &self.inner.addr)
            .field("goaways_sent", &self.goaways_sent())
            .finish_non_exhaustive()
    }
}

impl GoawayRelay {
    /// Starts a relay on `127.0.0.1` (a free port) forwarding every call to
    /// the server at `upstream` (plain-text HTTP/2, dialled lazily). See the
    /// example on [`GoawayRelay`].
    ///
    /// # Errors
    ///
    /// If the listening socket cannot be bound.
    pub async fn start(upstream: SocketAddr) -> io::Result<GoawayRelay> {
        let endpoint = Endpoint::from_shared(format!("http://{upstream}"))
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let upstream = LeaderElectionServiceClient::new(endpoint.tcp_nodelay(true).connect_lazy());
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let (goaway, _) = watch::channel(0);
        let (cut, _) = watch::channel(0);
        let goaways = Arc::new(AtomicU64::new(0));
        let stop = CancellationToken::new();
        let task = tokio::spawn(relay_accept(
            listener,
            Forward { upstream },
            goaway.subscribe(),
            cut.subscribe(),
            Arc::clone(&goaways),
            stop.clone(),
        ));
        Ok(GoawayRelay {
            inner: Arc::new(RelayInner {
                addr,
                goaway,
                cut,
                goaways,
                background: Background::new(stop, task),
            }),
        })
    }

    /// The address the relay listens on.
    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// The address to give a client: `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.inner.addr)
    }

    /// Sends GOAWAY on every connection open now (that has not had one yet);
    /// each is cut one second later if its client has not closed it by then.
    /// Connections opened afterwards are not affected.
    pub fn goaway(&self) {
        self.inner.goaway.send_modify(|g| *g = g.wrapping_add(1));
    }

    /// Cuts every connection open now at once (its reads and writes fail, so
    /// the client sees the connection die). Connections opened afterwards
    /// are not affected.
    pub fn cut(&self) {
        self.inner.cut.send_modify(|g| *g = g.wrapping_add(1));
    }

    /// How many GOAWAY frames the relay has sent (one per connection told to
    /// go away). Counted when the connection acts on
    /// [`goaway`](GoawayRelay::goaway), a moment after the call.
    pub fn goaways_sent(&self) -> u64 {
        self.inner.goaways.load(Ordering::Relaxed)
    }

    /// Stops the relay: closes the listener, cuts every connection, and waits
    /// (bounded) for its tasks to end.
    pub async fn shutdown(&self) {
        self.inner.background.shutdown("GOAWAY relay").await;
    }
}

async fn relay_accept(
    listener: TcpListener,
    forward: Forward,
    goaway: watch::Receiver<u64>,
    cut: watch::Receiver<u64>,
    goaways: Arc<AtomicU64>,
    stop: CancellationToken,
) {
    let serve_stop = stop.clone();
    accept_until(listener, stop, "GOAWAY relay", |stream, _| {
        Some(relay_connection(
            stream,
            forward.clone(),
            goaway.clone(),
            cut.clone(),
            Arc::clone(&goaways),
            serve_stop.clone(),
        ))
    })
    .await;
}

/// Serves one client connection with its own tonic server, whose shutdown
/// signal is this connection's GOAWAY: tonic then sends GOAWAY, lets calls in
/// flight finish and closes; the grace timer cuts it if it lingers.
async fn relay_connection(
    stream: TcpStream,
    forward: Forward,
    mut goaway: watch::Receiver<u64>,
    mut cut: watch::Receiver<u64>,
    goaways: Arc<AtomicU64>,
    stop: CancellationToken,
) {
    goaway.borrow_and_update();
    cut.borrow_and_update();
    let kill = CancellationToken::new();
    let go = CancellationToken::new();
    let io = CutIo::new(
        stream,
        kill.clone().cancelled_owned(),
        "GOAWAY relay cut the connection",
    );
    let incoming =
        futures::stream::iter([Ok::<_, io::Error>(io)]).chain(futures::stream::pending());
    let server = Server::builder()
        .add_service(LeaderElectionServiceServer::new(forward))
        .serve_with_incoming_shutdown(incoming, go.clone().cancelled_owned());
    tokio::pin!(server);
    let mut grace: Option<Instant> = None;
    loop {
        tokio::select! {
            result = &mut server => {
                if let Err(err) = result {
                    tracing::debug!(%err, "GOAWAY relay connection ended");
                }
                break;
            }
            _ = goaway.changed(), if grace.is_none() => {
                go.cancel();
                goaways.fetch_add(1, Ordering::Relaxed);
                grace = Some(Instant::now() + GOAWAY_GRACE);
            }
            _ = cut.changed(), if !kill.is_cancelled() => {
                kill.cancel();
                go.cancel();
            }
            _ = stop.cancelled(), if !kill.is_cancelled() => {
                kill.cancel();
                go.cancel();
            }
            _ = async {
                match grace {
                    Some(at) => sleep_until(at).await,
                    None => futures::future::pending().await,
                }
            }, if !kill.is_cancelled() => {
                kill.cancel();
            }
        }
    }
}

/// Forwards every call to the server.
#[derive(Clone)]
struct Forward {
    upstream: LeaderElectionServiceClient<Channel>,
}

#[tonic::async_trait]
impl LeaderElectionService for Forward {
    async fn try_acquire_lock(
        &self,
        request: Request<TryAcquireLockRequest>,
    ) -> Result<Response<TryAcquireLockResponse>, Status> {
        let mut upstream = self.upstream.clone();
        let answer = upstream.try_acquire_lock(request.into_inner()).await?;
        Ok(Response::new(answer.into_inner()))
    }

    async fn release_lock(
        &self,
        request: Request<ReleaseLockRequest>,
    ) -> Result<Response<ReleaseLockResponse>, Status> {
        let mut upstream = self.upstream.clone();
        let answer = upstream.release_lock(request.into_inner()).await?;
        Ok(Response::new(answer.into_inner()))
    }

    async fn keep_alive(
        &self,
        request: Request<KeepAliveRequest>,
    ) -> Result<Response<KeepAliveResponse>, Status> {
        let mut upstream = self.upstream.clone();
        let answer = upstream.keep_alive(request.into_inner()).await?;
        Ok(Response::new(answer.into_inner()))
    }
}
