//! [`TestServer`]: an in-process Quorum Quest server over real loopback TCP
//! (and, for tests under paused time, over in-memory duplex pipes), with
//! controls to inject the faults a client must survive.

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, DuplexStream};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_stream::wrappers::{TcpListenerStream, UnboundedReceiverStream};
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected;
use tonic::transport::{Channel, Endpoint, Server};
use tonic::{Code, Request, Response, Status};

use super::cut_io::CutIo;
use super::store::{LockInfo, Store, Tenure};
use super::SHUTDOWN_WAIT;
use crate::proto::leader_election_service_server::{
    LeaderElectionService, LeaderElectionServiceServer,
};
use crate::proto::{
    KeepAliveRequest, KeepAliveResponse, ReleaseLockRequest, ReleaseLockResponse,
    TryAcquireLockRequest, TryAcquireLockResponse,
};
use crate::sync::cancel_and_join;
use crate::sync::lock;
use crate::RpcKind;

/// The server's default lease when a request carries `ttl <= 0` (the value in
/// the real server's sample configuration); change it with
/// [`TestServerBuilder::default_ttl`].
pub const SERVER_DEFAULT_TTL: Duration = Duration::from_secs(15);

/// How long an in-memory connection's pipe buffers, each way.
const DUPLEX_BUFFER: usize = 64 * 1024;

/// Where [`TestServer::calls`] counts calls of `rpc`, in `Shared::calls`.
fn call_index(rpc: RpcKind) -> usize {
    match rpc {
        RpcKind::TryAcquireLock => 0,
        RpcKind::KeepAlive => 1,
        RpcKind::ReleaseLock => 2,
    }
}

/// How the server grants and answers leases; see
/// [`TestServer::set_lease_policy`]. Only owners are affected: a non-owner's
/// `KeepAlive` still answers `-1 s` and its `TryAcquireLock` still `false`.
///
/// ```
/// use std::time::Duration;
/// use quorum_quest_client::testing::LeasePolicy;
///
/// assert_eq!(LeasePolicy::default(), LeasePolicy::AsAsked);
/// let short = LeasePolicy::Clamp(Duration::from_millis(1500));
/// let hostile = LeasePolicy::Answer { seconds: 3600, nanos: 0 };
/// assert_ne!(short, hostile);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum LeasePolicy {
    /// What the real server does: a grant lasts the requested ttl from now
    /// in the store, and `KeepAlive` answers that ttl.
    #[default]
    AsAsked,
    /// A server that grants less than asked: every grant (`TryAcquireLock`
    /// and `KeepAlive`) lasts `min(requested ttl, d)` in the store (the real
    /// expiry, so [`TestServer::tenures`] shows the shorter lease), and
    /// `KeepAlive` answers that shorter length. A zero `d` grants leases that
    /// are already over.
    Clamp(Duration),
    /// Like [`Clamp`](LeasePolicy::Clamp), but only for `KeepAlive`:
    /// `TryAcquireLock` grants the ttl asked. A `TryAcquireLockResponse`
    /// carries no lease length, so a client cannot learn that its acquire
    /// was clamped (no client can then be safe if its first renewal does
    /// not arrive within the clamp); a clamped renewal it can see in the
    /// answer, and must honour.
    ClampRenewals(Duration),
    /// A hostile or broken server: the store behaves as
    /// [`AsAsked`](LeasePolicy::AsAsked), but an owner's `KeepAlive` answers
    /// this raw `lease_length` (any values: 3600 s for a 3 s ttl, 1 ns,
    /// `i64::MAX` or `i64::MIN` seconds, nanos out of range, mixed signs).
    Answer {
        /// `lease_length.seconds`.
        seconds: i64,
        /// `lease_length.nanos`.
        nanos: i32,
    },
    /// The store behaves as [`AsAsked`](LeasePolicy::AsAsked), but an
    /// owner's `KeepAlive` answer has no `lease_length` at all.
    Missing,
}

/// A pending [`TestServer::fail_next`] rule.
#[derive(Debug)]
struct FailRule {
    remaining: usize,
    rpc: Option<RpcKind>,
    code: Code,
    message: String,
}

/// Everything the serving tasks, the in-memory connector and the handles share.
struct Shared {
    store: Mutex<Store>,
    default_ttl: Duration,
    paused: watch::Sender<bool>,
    latency: Mutex<Duration>,
    lease_policy: Mutex<LeasePolicy>,
    refusal_delay: Mutex<Duration>,
    faults: Mutex<VecDeque<FailRule>>,
    calls: [AtomicU64; 3],
    connections: AtomicU64,
    /// Metadata every call must carry (lower-case key, value); a call
    /// without it answers `UNAUTHENTICATED`.
    required: Mutex<Vec<(String, String)>>,
    /// Where the in-memory connector hands new connections; `None` while the
    /// server is down.
    memory: Mutex<Option<mpsc::UnboundedSender<DuplexStream>>>,
}

/// Connection settings, fixed for the server's life.
#[derive(Clone, Copy, Debug)]
struct ServeConfig {
    max_connection_age: Option<Duration>,
    max_connection_age_grace: Duration,
}

/// The TLS a server was built with: its certificate chain and key, and the
/// CA that client certificates must chain to (mutual TLS), all PEM.
#[derive(Clone)]
#[cfg_attr(not(feature = "tls"), allow(dead_code))]
struct ServerTls {
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    client_ca_pem: Option<Vec<u8>>,
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls")
            .field("mutual", &self.client_ca_pem.is_some())
            .finish_non_exhaustive()
    }
}

/// One period of serving, between a start and a shutdown.
struct Generation {
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

struct Inner {
    shared: Arc<Shared>,
    addr: SocketAddr,
    config: ServeConfig,
    /// TLS for the TCP listener (the in-memory pipes stay plaintext).
    tls: Option<ServerTls>,
    generation: tokio::sync::Mutex<Option<Generation>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The last handle is gone: stop serving so no task outlives the server.
        *lock(&self.shared.memory) = None;
        if let Some(generation) = self.generation.get_mut().take() {
            generation.stop.cancel();
        }
    }
}

/// An in-process Quorum Quest server that behaves like the real one (SPEC §2)
/// and lets a test inject faults: expired or stolen locks, hanging calls,
/// error answers, latency, connection ageing, shutdown and restart.
///
/// It serves plaintext HTTP/2 gRPC on `127.0.0.1`, and also over in-memory
/// pipes ([`TestServer::in_memory_channel`]) so that tests can run under
/// `tokio::time::pause()`. All lock times use [`tokio::time::Instant`].
///
/// `TestServer` is a cheap handle: clone it freely; all controls take `&self`.
/// When the last handle is dropped the server stops serving (calling
/// [`TestServer::shutdown`] first is tidier: it waits for the tasks to end).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use quorum_quest_client::proto::leader_election_service_client::LeaderElectionServiceClient;
/// use quorum_quest_client::proto::TryAcquireLockRequest;
/// use quorum_quest_client::testing::TestServer;
///
/// let server = TestServer::start().await?;
/// let mut client = LeaderElectionServiceClient::connect(server.url()).await?;
/// let answer = client
///     .try_acquire_lock(TryAcquireLockRequest {
///         service: "billing".into(),
///         domain: "eu".into(),
///         client_id: "node-1".into(),
///         ttl: 10,
///     })
///     .await?
///     .into_inner();
/// assert!(answer.is_leader);
/// assert_eq!(server.lock("billing", "eu").map(|l| l.owner), Some("node-1".to_string()));
/// server.shutdown().await;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct TestServer {
    inner: Arc<Inner>,
}

impl fmt::Debug for TestServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestServer")
            .field("addr", &self.inner.addr)
            .field("default_ttl", &self.inner.shared.default_ttl)
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

/// Configures a [`TestServer`] before it starts; see [`TestServer::builder`].
///
/// ```no_run
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> std::io::Result<()> {
/// use std::time::Duration;
/// use quorum_quest_client::testing::TestServer;
///
/// let server = TestServer::builder()
///     .default_ttl(Duration::from_secs(5))
///     .max_connection_age(Duration::from_secs(30))
///     .start()
///     .await?;
/// assert!(server.url().starts_with("http://127.0.0.1:"));
/// server.shutdown().await;
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
#[must_use = "a builder does nothing until `.start().await`"]
pub struct TestServerBuilder {
    port: u16,
    default_ttl: Duration,
    max_connection_age: Option<Duration>,
    max_connection_age_grace: Option<Duration>,
    latency: Duration,
    lease_policy: LeasePolicy,
    refusal_delay: Duration,
    tls: Option<ServerTls>,
    required: Vec<(String, String)>,
}

impl Default for TestServerBuilder {
    fn default() -> Self {
        TestServerBuilder {
            port: 0,
            default_ttl: SERVER_DEFAULT_TTL,
            max_connection_age: None,
            max_connection_age_grace: None,
            latency: Duration::ZERO,
            lease_policy: LeasePolicy::AsAsked,
            refusal_delay: Duration::ZERO,
            tls: None,
            required: Vec::new(),
        }
    }
}

impl TestServerBuilder {
    /// The TCP port to listen on, on `127.0.0.1` (default 0: any free port).
    pub fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    /// The lease granted when a request carries `ttl <= 0` (default 15 s).
    pub fn default_ttl(mut self, ttl: Duration) -> Self {
        self.default_ttl = ttl;
        self
    }

    /// Close every connection after this age, like the real server's
    /// `MaxConnectionAge`: the connection gets an HTTP/2 GOAWAY at `age`
    /// (calls in flight finish, new calls must go to a new connection) and is
    /// cut outright `max_connection_age_grace` later (default 1 s) if still open.
    /// Default: connections live forever.
    pub fn max_connection_age(mut self, age: Duration) -> Self {
        self.max_connection_age = Some(age);
        self
    }

    /// How long a connection may stay open after its GOAWAY (see
    /// [`max_connection_age`](Self::max_connection_age)); default 1 s.
    pub fn max_connection_age_grace(mut self, grace: Duration) -> Self {
        self.max_connection_age_grace = Some(grace);
        self
    }

    /// Initial added latency, as [`TestServer::set_latency`] (default none).
    pub fn latency(mut self, latency: Duration) -> Self {
        self.latency = latency;
        self
    }

    /// Initial lease policy, as [`TestServer::set_lease_policy`] (default
    /// [`LeasePolicy::AsAsked`]).
    pub fn lease_policy(mut self, policy: LeasePolicy) -> Self {
        self.lease_policy = policy;
        self
    }

    /// Initial refusal delay, as [`TestServer::set_refusal_delay`] (default
    /// none).
    pub fn refusal_delay(mut self, delay: Duration) -> Self {
        self.refusal_delay = delay;
        self
    }

    /// Serve TLS on the TCP listener with this certificate (chain) and
    /// private key, PEM (feature `tls`). [`TestServer::url`] is then
    /// `https://127.0.0.1:PORT`, so the certificate should name the IP
    /// address `127.0.0.1` (or the client sets
    /// [`tls_domain`](crate::ClientBuilder::tls_domain)). The in-memory
    /// pipes ([`TestServer::in_memory_channel`]) stay plaintext. A bad
    /// certificate or key fails [`start`](Self::start) with
    /// `InvalidInput`.
    #[cfg(feature = "tls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
    pub fn tls(mut self, cert_pem: impl AsRef<[u8]>, key_pem: impl AsRef<[u8]>) -> Self {
        let client_ca_pem = self.tls.take().and_then(|t| t.client_ca_pem);
        self.tls = Some(ServerTls {
            cert_pem: cert_pem.as_ref().to_vec(),
            key_pem: key_pem.as_ref().to_vec(),
            client_ca_pem,
        });
        self
    }

    /// Require a client certificate signed by this CA (PEM): mutual TLS
    /// (feature `tls`; needs [`tls`](Self::tls), else
    /// [`start`](Self::start) fails with `InvalidInput`). A client without
    /// one fails its handshake.
    #[cfg(feature = "tls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
    pub fn client_ca(mut self, ca_pem: impl AsRef<[u8]>) -> Self {
        let tls = self.tls.get_or_insert_with(|| ServerTls {
            cert_pem: Vec::new(),
            key_pem: Vec::new(),
            client_ca_pem: None,
        });
        tls.client_ca_pem = Some(ca_pem.as_ref().to_vec());
        self
    }

    /// Require `authorization: Bearer <token>` on every call, as
    /// [`TestServer::set_required_token`].
    pub fn required_token(mut self, token: impl AsRef<str>) -> Self {
        self.required.retain(|(k, _)| k != "authorization");
        self.required.push((
            "authorization".to_string(),
            format!("Bearer {}", token.as_ref()),
        ));
        self
    }

    /// Binds `127.0.0.1:port` and starts serving.
    pub async fn start(self) -> io::Result<TestServer> {
        #[cfg(feature = "tls")]
        if let Some(tls) = &self.tls {
            server_tls_config(tls)?;
        }
        let (paused, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::default()),
            default_ttl: self.default_ttl,
            paused,
            latency: Mutex::new(self.latency),
            lease_policy: Mutex::new(self.lease_policy),
            refusal_delay: Mutex::new(self.refusal_delay),
            faults: Mutex::new(VecDeque::new()),
            calls: [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)],
            connections: AtomicU64::new(0),
            required: Mutex::new(self.required),
            memory: Mutex::new(None),
        });
        let config = ServeConfig {
            max_connection_age: self.max_connection_age,
            max_connection_age_grace: self
                .max_connection_age_grace
                .unwrap_or(Duration::from_secs(1)),
        };
        let requested = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let listener = bind(requested)?;
        let addr = listener.local_addr()?;
        let generation = serve(&shared, config, self.tls.as_ref(), listener);
        tracing::info!(%addr, "test server listening");
        Ok(TestServer {
            inner: Arc::new(Inner {
                shared,
                addr,
                config,
                tls: self.tls,
                generation: tokio::sync::Mutex::new(Some(generation)),
            }),
        })
    }
}

/// A listening socket with `SO_REUSEADDR`, so a restart can rebind at once.
fn bind(addr: SocketAddr) -> io::Result<tokio::net::TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// tonic's server TLS configuration (checked in `start`, so it cannot fail
/// at a restart).
#[cfg(feature = "tls")]
fn server_tls_config(tls: &ServerTls) -> io::Result<tonic::transport::ServerTlsConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let bad = |what: &str| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("test server TLS: {what}"),
        )
    };
    let certs = CertificateDer::pem_slice_iter(&tls.cert_pem).count();
    if certs == 0 || CertificateDer::pem_slice_iter(&tls.cert_pem).any(|c| c.is_err()) {
        return Err(bad(
            "no readable PEM certificate (did you call tls(cert, key)?)",
        ));
    }
    PrivateKeyDer::from_pem_slice(&tls.key_pem).map_err(|_| bad("no readable PEM private key"))?;
    let mut config = tonic::transport::ServerTlsConfig::new().identity(
        tonic::transport::Identity::from_pem(&tls.cert_pem, &tls.key_pem),
    );
    if let Some(ca) = &tls.client_ca_pem {
        if CertificateDer::pem_slice_iter(ca).count() == 0 {
            return Err(bad("no readable PEM certificate in the client CA"));
        }
        config = config.client_ca_root(tonic::transport::Certificate::from_pem(ca));
    }
    Ok(config)
}

/// Starts the TCP and in-memory servers of one generation.
fn serve(
    shared: &Arc<Shared>,
    config: ServeConfig,
    tls: Option<&ServerTls>,
    listener: tokio::net::TcpListener,
) -> Generation {
    let stop = CancellationToken::new();
    let (tx, rx) = mpsc::unbounded_channel::<DuplexStream>();
    *lock(&shared.memory) = Some(tx);

    let tcp_incoming = {
        let shared = Arc::clone(shared);
        let stop = stop.clone();
        TcpListenerStream::new(listener).map(move |conn: io::Result<TcpStream>| {
            conn.map(|stream| {
                // Best effort: a failure only costs a little latency.
                let _ = stream.set_nodelay(true);
                server_io(stream, &shared, &stop, config)
            })
        })
    };
    let memory_incoming = {
        let shared = Arc::clone(shared);
        let stop = stop.clone();
        UnboundedReceiverStream::new(rx)
            .map(move |pipe| Ok::<_, io::Error>(server_io(pipe, &shared, &stop, config)))
    };

    let tcp = tokio::spawn(run_server(
        "tcp",
        Arc::clone(shared),
        config,
        tls.cloned(),
        stop.clone(),
        tcp_incoming,
    ));
    let memory = tokio::spawn(run_server(
        "in-memory",
        Arc::clone(shared),
        config,
        None,
        stop.clone(),
        memory_incoming,
    ));
    Generation {
        stop,
        tasks: vec![tcp, memory],
    }
}

async fn run_server<I, IO>(
    what: &'static str,
    shared: Arc<Shared>,
    config: ServeConfig,
    tls: Option<ServerTls>,
    stop: CancellationToken,
    incoming: I,
) where
    I: tokio_stream::Stream<Item = io::Result<IO>>,
    IO: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static,
{
    let service = LeaderElectionServiceServer::new(Handler {
        shared,
        stop: stop.clone(),
    });
    let mut builder = Server::builder();
    if let Some(age) = config.max_connection_age {
        // Only the age: tonic 0.14 skips the GOAWAY entirely when a grace is
        // also set, so the grace is enforced by `server_io` instead.
        builder = builder.max_connection_age(age);
    }
    #[cfg(feature = "tls")]
    if let Some(tls) = &tls {
        // Checked in `start`: cannot fail here, but say so if it does.
        match server_tls_config(tls).and_then(|c| {
            builder
                .tls_config(c)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
        }) {
            Ok(with_tls) => builder = with_tls,
            Err(err) => {
                tracing::warn!(what, %err, "test server TLS setup failed");
                return;
            }
        }
    }
    #[cfg(not(feature = "tls"))]
    let _ = tls;
    let result = builder
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
        .await;
    match result {
        Ok(()) => tracing::debug!(what, "test server stopped"),
        Err(err) => tracing::warn!(what, %err, "test server failed"),
    }
}

/// Wraps an accepted connection (TCP or in-memory): counts it, and cuts it
/// when the server shuts down or when it outlives `max_connection_age + grace`.
fn server_io<T>(
    inner: T,
    shared: &Shared,
    stop: &CancellationToken,
    config: ServeConfig,
) -> CutIo<T> {
    shared.connections.fetch_add(1, Ordering::Relaxed);
    // The deadline is fixed now, when the connection is accepted.
    let deadline = config
        .max_connection_age
        .map(|age| tokio::time::sleep(age.saturating_add(config.max_connection_age_grace)));
    let stopped = stop.clone().cancelled_owned();
    let cut = async move {
        match deadline {
            Some(deadline) => tokio::select! {
                biased;
                () = stopped => {}
                () = deadline => {}
            },
            None => stopped.await,
        }
    };
    CutIo::new(inner, cut, "test server closed the connection")
}

/// The gRPC service of one generation.
struct Handler {
    shared: Arc<Shared>,
    stop: CancellationToken,
}

fn unavailable() -> Status {
    Status::unavailable("test server is shutting down")
}

impl Handler {
    /// Everything that happens before a call touches the store: count it,
    /// check the required metadata, hang while paused, answer an injected
    /// failure.
    async fn admit(
        &self,
        rpc: RpcKind,
        metadata: &tonic::metadata::MetadataMap,
    ) -> Result<(), Status> {
        self.shared.calls[call_index(rpc)].fetch_add(1, Ordering::Relaxed);
        let missing = lock(&self.shared.required)
            .iter()
            .find(|(key, value)| {
                metadata.get(key.as_str()).and_then(|v| v.to_str().ok()) != Some(value.as_str())
            })
            .map(|(key, _)| key.clone());
        if let Some(key) = missing {
            tracing::info!(?rpc, key, "missing or wrong required metadata");
            return Err(Status::unauthenticated(format!(
                "test server: missing or wrong {key:?} metadata"
            )));
        }
        let mut paused = self.shared.paused.subscribe();
        tokio::select! {
            r = paused.wait_for(|p| !*p) => {
                if r.is_err() {
                    return Err(unavailable());
                }
            }
            _ = self.stop.cancelled() => return Err(unavailable()),
        }
        let injected = {
            let mut faults = lock(&self.shared.faults);
            let hit = faults
                .iter_mut()
                .find(|f| f.remaining > 0 && f.rpc.is_none_or(|r| r == rpc))
                .map(|f| {
                    f.remaining -= 1;
                    Status::new(f.code, f.message.clone())
                });
            faults.retain(|f| f.remaining > 0);
            hit
        };
        if let Some(status) = injected {
            tracing::info!(?rpc, code = ?status.code(), "injected failure");
            self.delay().await?;
            return Err(status);
        }
        Ok(())
    }

    /// The added latency, before the answer goes out.
    async fn delay(&self) -> Result<(), Status> {
        let latency = *lock(&self.shared.latency);
        if latency.is_zero() {
            return Ok(());
        }
        tokio::select! {
            _ = tokio::time::sleep(latency) => Ok(()),
            _ = self.stop.cancelled() => Err(unavailable()),
        }
    }

    /// The refusal delay, before a refusal goes out (after the latency).
    async fn refusal_delay(&self) -> Result<(), Status> {
        let delay = *lock(&self.shared.refusal_delay);
        if delay.is_zero() {
            return Ok(());
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => Ok(()),
            _ = self.stop.cancelled() => Err(unavailable()),
        }
    }

    fn lease_policy(&self) -> LeasePolicy {
        *lock(&self.shared.lease_policy)
    }

    /// The lease the store grants for a requested `ttl` under `policy`
    /// (`renewal`: for a `KeepAlive`).
    fn granted(policy: LeasePolicy, ttl: Duration, renewal: bool) -> Duration {
        match policy {
            LeasePolicy::Clamp(d) => ttl.min(d),
            LeasePolicy::ClampRenewals(d) if renewal => ttl.min(d),
            _ => ttl,
        }
    }

    fn ttl(&self, ttl: i32) -> Duration {
        if ttl <= 0 {
            self.shared.default_ttl
        } else {
            Duration::from_secs(u64::from(ttl.unsigned_abs()))
        }
    }

    fn store(&self) -> MutexGuard<'_, Store> {
        lock(&self.shared.store)
    }
}

#[tonic::async_trait]
impl LeaderElectionService for Handler {
    async fn try_acquire_lock(
        &self,
        request: Request<TryAcquireLockRequest>,
    ) -> Result<Response<TryAcquireLockResponse>, Status> {
        self.admit(RpcKind::TryAcquireLock, request.metadata())
            .await?;
        let req = request.into_inner();
        let ttl = Self::granted(self.lease_policy(), self.ttl(req.ttl), false);
        let is_leader = self.store().try_acquire(
            &req.service,
            &req.domain,
            &req.client_id,
            ttl,
            Instant::now(),
        );
        tracing::info!(
            rpc = "TryAcquireLock",
            service = %req.service,
            domain = %req.domain,
            client_id = %req.client_id,
            ttl = req.ttl,
            is_leader,
            "call"
        );
        self.delay().await?;
        if !is_leader {
            self.refusal_delay().await?;
        }
        Ok(Response::new(TryAcquireLockResponse { is_leader }))
    }

    async fn release_lock(
        &self,
        request: Request<ReleaseLockRequest>,
    ) -> Result<Response<ReleaseLockResponse>, Status> {
        self.admit(RpcKind::ReleaseLock, request.metadata()).await?;
        let req = request.into_inner();
        let released =
            self.store()
                .release(&req.service, &req.domain, &req.client_id, Instant::now());
        tracing::info!(
            rpc = "ReleaseLock",
            service = %req.service,
            domain = %req.domain,
            client_id = %req.client_id,
            released,
            "call"
        );
        self.delay().await?;
        Ok(Response::new(ReleaseLockResponse {}))
    }

    async fn keep_alive(
        &self,
        request: Request<KeepAliveRequest>,
    ) -> Result<Response<KeepAliveResponse>, Status> {
        self.admit(RpcKind::KeepAlive, request.metadata()).await?;
        let req = request.into_inner();
        let policy = self.lease_policy();
        let ttl = Self::granted(policy, self.ttl(req.ttl), true);
        let granted = self.store().keep_alive(
            &req.service,
            &req.domain,
            &req.client_id,
            ttl,
            Instant::now(),
        );
        let lease_length = match (granted, policy) {
            (None, _) => Some(prost_types::Duration {
                seconds: -1,
                nanos: 0,
            }),
            (Some(_), LeasePolicy::Answer { seconds, nanos }) => {
                Some(prost_types::Duration { seconds, nanos })
            }
            (Some(_), LeasePolicy::Missing) => None,
            (Some(ttl), _) => Some(prost_types::Duration {
                seconds: i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX),
                nanos: i32::try_from(ttl.subsec_nanos()).unwrap_or(0),
            }),
        };
        tracing::info!(
            rpc = "KeepAlive",
            service = %req.service,
            domain = %req.domain,
            client_id = %req.client_id,
            ttl = req.ttl,
            lease = ?lease_length,
            "call"
        );
        self.delay().await?;
        if granted.is_none() {
            self.refusal_delay().await?;
        }
        Ok(Response::new(KeepAliveResponse { lease_length }))
    }
}

impl TestServer {
    /// Starts a server on `127.0.0.1` on a free port, with the default 15 s
    /// lease for `ttl <= 0`.
    pub async fn start() -> io::Result<TestServer> {
        TestServerBuilder::default().start().await
    }

    /// A builder to set the port, default ttl, connection age or latency.
    pub fn builder() -> TestServerBuilder {
        TestServerBuilder::default()
    }

    /// The address to give a client: `http://127.0.0.1:PORT`, or
    /// `https://127.0.0.1:PORT` for a server built with
    /// [`tls`](TestServerBuilder::tls).
    pub fn url(&self) -> String {
        let scheme = if self.inner.tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.inner.addr)
    }

    /// From now on, every call must carry `authorization: Bearer <token>`
    /// (`None`: no longer required); one without it is counted by
    /// [`calls`](Self::calls) and answered `UNAUTHENTICATED` without
    /// touching the locks, as an authenticating proxy would.
    pub fn set_required_token(&self, token: Option<&str>) {
        self.set_required_metadata(
            "authorization",
            token.map(|t| format!("Bearer {t}")).as_deref(),
        );
    }

    /// From now on, every call must carry metadata `key: value` (`None`:
    /// `key` is no longer required); see
    /// [`set_required_token`](Self::set_required_token).
    pub fn set_required_metadata(&self, key: &str, value: Option<&str>) {
        let key = key.to_ascii_lowercase();
        let mut required = lock(&self.inner.shared.required);
        required.retain(|(k, _)| *k != key);
        if let Some(value) = value {
            required.push((key.clone(), value.to_string()));
        }
        tracing::info!(key, required = value.is_some(), "required metadata");
    }

    /// The socket address the server listens on (the same across restarts).
    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// A channel to this server over in-memory pipes (no sockets), so that a
    /// test can run under `tokio::time::pause()` with exact timing.
    ///
    /// The channel connects lazily and reconnects as needed; each new
    /// connection is a fresh pipe. It keeps working across
    /// [`restart`](Self::restart); while the server is down, connecting fails
    /// and calls answer an error. Must be called inside a Tokio runtime.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use quorum_quest_client::proto::leader_election_service_client::LeaderElectionServiceClient;
    /// use quorum_quest_client::proto::KeepAliveRequest;
    /// use quorum_quest_client::testing::TestServer;
    ///
    /// tokio::time::pause();
    /// let server = TestServer::start().await?;
    /// let mut client = LeaderElectionServiceClient::new(server.in_memory_channel());
    /// let lease = client
    ///     .keep_alive(KeepAliveRequest {
    ///         service: "s".into(),
    ///         domain: "d".into(),
    ///         client_id: "c".into(),
    ///         ttl: 5,
    ///     })
    ///     .await?
    ///     .into_inner()
    ///     .lease_length;
    /// assert_eq!(lease.map(|d| d.seconds), Some(-1)); // not the owner
    /// # server.shutdown().await;
    /// # Ok(())
    /// # }
    /// ```
    pub fn in_memory_channel(&self) -> Channel {
        let shared = Arc::downgrade(&self.inner.shared);
        let connector = tower::service_fn(move |_: http::Uri| {
            let shared = shared.clone();
            async move {
                let refused = || {
                    io::Error::new(
                        io::ErrorKind::ConnectionRefused,
                        "in-memory test server is not serving",
                    )
                };
                let shared = shared.upgrade().ok_or_else(refused)?;
                let sender = lock(&shared.memory).clone().ok_or_else(refused)?;
                let (client, server) = tokio::io::duplex(DUPLEX_BUFFER);
                sender.send(server).map_err(|_| refused())?;
                Ok::<_, io::Error>(TokioIo::new(client))
            }
        });
        Endpoint::from_static("http://in-memory.invalid").connect_with_connector_lazy(connector)
    }

    /// Removes the lock now, whoever owns it (its tenure ends with
    /// [`TenureEnd::ForceExpired`](super::TenureEnd::ForceExpired)). The owner
    /// learns it only on its next call.
    pub fn force_expire(&self, service: &str, domain: &str) {
        let removed = lock(&self.inner.shared.store).force_expire(service, domain, Instant::now());
        tracing::info!(service, domain, removed, "force_expire");
    }

    /// Makes `owner` the owner of the lock for `ttl` from now, as if another
    /// node had won it (the previous owner's tenure ends with
    /// [`TenureEnd::Stolen`](super::TenureEnd::Stolen)). If `owner` already
    /// owns it, its lease is set to `ttl` from now.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> std::io::Result<()> {
    /// use std::time::Duration;
    /// use quorum_quest_client::testing::TestServer;
    ///
    /// let server = TestServer::start().await?;
    /// server.set_owner("s", "d", "intruder", Duration::from_secs(30));
    /// assert_eq!(server.lock("s", "d").map(|l| l.owner), Some("intruder".to_string()));
    /// server.force_expire("s", "d");
    /// assert!(server.lock("s", "d").is_none());
    /// # server.shutdown().await;
    /// # Ok(())
    /// # }
    /// ```
    pub fn set_owner(&self, service: &str, domain: &str, owner: &str, ttl: Duration) {
        lock(&self.inner.shared.store).set_owner(service, domain, owner, ttl, Instant::now());
        tracing::info!(service, domain, owner, ?ttl, "set_owner");
    }

    /// The live owner of a lock and its remaining time; `None` if the lock
    /// is free or expired.
    pub fn lock(&self, service: &str, domain: &str) -> Option<LockInfo> {
        lock(&self.inner.shared.store).lock(service, domain, Instant::now())
    }

    /// From now on, every incoming call hangs: it is counted by
    /// [`calls`](Self::calls) but neither answered nor allowed to touch the
    /// locks until [`resume`](Self::resume). Calls already past that point
    /// are not affected.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> std::io::Result<()> {
    /// use quorum_quest_client::testing::TestServer;
    ///
    /// let server = TestServer::start().await?;
    /// server.pause();
    /// assert!(server.is_paused());
    /// server.resume();
    /// # server.shutdown().await;
    /// # Ok(())
    /// # }
    /// ```
    pub fn pause(&self) {
        self.inner.shared.paused.send_replace(true);
        tracing::info!("paused");
    }

    /// Ends a [`pause`](Self::pause): the hanging calls proceed.
    pub fn resume(&self) {
        self.inner.shared.paused.send_replace(false);
        tracing::info!("resumed");
    }

    /// Whether the server is [paused](Self::pause).
    pub fn is_paused(&self) -> bool {
        *self.inner.shared.paused.borrow()
    }

    /// The next `n` calls (of `rpc` only, or of any RPC if `None`) answer
    /// `status` (its code and message) without touching the locks. They are
    /// still counted, still hang while paused and still get the added latency.
    /// Rules from several `fail_next` calls queue up: a call takes the oldest
    /// rule that matches it.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use quorum_quest_client::proto::leader_election_service_client::LeaderElectionServiceClient;
    /// use quorum_quest_client::proto::ReleaseLockRequest;
    /// use quorum_quest_client::testing::TestServer;
    /// use quorum_quest_client::RpcKind;
    ///
    /// let server = TestServer::start().await?;
    /// server.fail_next(1, Some(RpcKind::ReleaseLock), tonic::Status::unavailable("injected"));
    /// let mut client = LeaderElectionServiceClient::connect(server.url()).await?;
    /// let err = client.release_lock(ReleaseLockRequest::default()).await.unwrap_err();
    /// assert_eq!(err.code(), tonic::Code::Unavailable);
    /// assert!(client.release_lock(ReleaseLockRequest::default()).await.is_ok());
    /// assert_eq!(server.calls(RpcKind::ReleaseLock), 2); // failed calls count too
    /// # server.shutdown().await;
    /// # Ok(())
    /// # }
    /// ```
    pub fn fail_next(&self, n: usize, rpc: Option<RpcKind>, status: Status) {
        if n == 0 {
            return;
        }
        lock(&self.inner.shared.faults).push_back(FailRule {
            remaining: n,
            rpc,
            code: status.code(),
            message: status.message().to_owned(),
        });
    }

    /// Adds `latency` before each answer (`Duration::ZERO` turns it off).
    /// The call acts on the locks first, then waits: a client that gives up
    /// early may still have changed the server's state, as on a real network.
    pub fn set_latency(&self, latency: Duration) {
        *lock(&self.inner.shared.latency) = latency;
    }

    /// Changes how leases are granted and answered from now on (see
    /// [`LeasePolicy`]); leases already granted keep their expiry.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use std::time::Duration;
    /// use quorum_quest_client::proto::leader_election_service_client::LeaderElectionServiceClient;
    /// use quorum_quest_client::proto::{KeepAliveRequest, TryAcquireLockRequest};
    /// use quorum_quest_client::testing::{LeasePolicy, TestServer};
    ///
    /// let server = TestServer::start().await?;
    /// server.set_lease_policy(LeasePolicy::Clamp(Duration::from_secs(2)));
    /// let mut client = LeaderElectionServiceClient::connect(server.url()).await?;
    /// let acquire = TryAcquireLockRequest {
    ///     service: "s".into(),
    ///     domain: "d".into(),
    ///     client_id: "c".into(),
    ///     ttl: 10,
    /// };
    /// assert!(client.try_acquire_lock(acquire).await?.into_inner().is_leader);
    /// assert!(server.lock("s", "d").map(|l| l.remaining) <= Some(Duration::from_secs(2)));
    /// let keep_alive = KeepAliveRequest {
    ///     service: "s".into(),
    ///     domain: "d".into(),
    ///     client_id: "c".into(),
    ///     ttl: 10,
    /// };
    /// let lease = client.keep_alive(keep_alive).await?.into_inner().lease_length;
    /// assert_eq!(lease.map(|d| d.seconds), Some(2));
    /// # server.shutdown().await;
    /// # Ok(())
    /// # }
    /// ```
    pub fn set_lease_policy(&self, policy: LeasePolicy) {
        *lock(&self.inner.shared.lease_policy) = policy;
        tracing::info!(?policy, "lease policy");
    }

    /// The current [`LeasePolicy`].
    pub fn lease_policy(&self) -> LeasePolicy {
        *lock(&self.inner.shared.lease_policy)
    }

    /// Delays every refusal (`TryAcquireLock` answering `is_leader = false`,
    /// `KeepAlive` answering `-1 s`) by `delay` (`Duration::ZERO` turns it
    /// off). The refusal is decided against the store when the call arrives;
    /// only its answer is held back (after any
    /// [latency](Self::set_latency)), while other calls, on the same
    /// connection too, proceed. So a client may get a grant and then, later,
    /// a refusal that was decided before it: an old answer arriving after a
    /// newer one.
    ///
    /// ```no_run
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> std::io::Result<()> {
    /// use std::time::Duration;
    /// use quorum_quest_client::testing::TestServer;
    ///
    /// let server = TestServer::start().await?;
    /// server.set_refusal_delay(Duration::from_millis(500));
    /// assert_eq!(server.refusal_delay(), Duration::from_millis(500));
    /// server.set_refusal_delay(Duration::ZERO);
    /// # server.shutdown().await;
    /// # Ok(())
    /// # }
    /// ```
    pub fn set_refusal_delay(&self, delay: Duration) {
        *lock(&self.inner.shared.refusal_delay) = delay;
        tracing::info!(?delay, "refusal delay");
    }

    /// The current refusal delay (see
    /// [`set_refusal_delay`](Self::set_refusal_delay)).
    pub fn refusal_delay(&self) -> Duration {
        *lock(&self.inner.shared.refusal_delay)
    }

    /// How many calls of `rpc` the server has received, including failed,
    /// hanging and interrupted ones (not reset by restart).
    pub fn calls(&self, rpc: RpcKind) -> u64 {
        self.inner.shared.calls[call_index(rpc)].load(Ordering::Relaxed)
    }

    /// How many connections (TCP and in-memory) the server has accepted since
    /// it started (not reset by restart). With
    /// [`max_connection_age`](TestServerBuilder::max_connection_age) it shows
    /// clients reconnecting.
    pub fn connections_accepted(&self) -> u64 {
        self.inner.shared.connections.load(Ordering::Relaxed)
    }

    /// The full ownership history, oldest first (expired locks are observed
    /// first, so a lease that ran out shows as
    /// [`TenureEnd::Expired`](super::TenureEnd::Expired)).
    pub fn tenures(&self) -> Vec<Tenure> {
        lock(&self.inner.shared.store).tenures(Instant::now())
    }

    /// Whether the server is serving (false after [`shutdown`](Self::shutdown)
    /// until [`restart`](Self::restart)).
    pub async fn is_serving(&self) -> bool {
        self.inner.generation.lock().await.is_some()
    }

    /// Stops serving: closes the listener and cuts every connection at once
    /// (calls in flight, hanging or not, fail on the client side). The lock
    /// table and all controls are kept. Idempotent.
    pub async fn shutdown(&self) {
        let mut generation = self.inner.generation.lock().await;
        if let Some(generation) = generation.take() {
            self.stop(generation).await;
        }
    }

    async fn stop(&self, generation: Generation) {
        *lock(&self.inner.shared.memory) = None;
        cancel_and_join(
            &generation.stop,
            generation.tasks,
            SHUTDOWN_WAIT,
            "test server task",
        )
        .await;
        tracing::info!(addr = %self.inner.addr, "test server shut down");
    }

    /// Shuts down (if serving), then serves again on the same address, as a
    /// restarted server process would. With `keep_locks = false` the lock table
    /// is cleared (running tenures end with
    /// [`TenureEnd::Dropped`](super::TenureEnd::Dropped)), as with a store that
    /// does not persist.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> std::io::Result<()> {
    /// use std::time::Duration;
    /// use quorum_quest_client::testing::TestServer;
    ///
    /// let server = TestServer::start().await?;
    /// let addr = server.addr();
    /// server.set_owner("s", "d", "node-1", Duration::from_secs(30));
    /// server.restart(true).await?;
    /// assert_eq!(server.addr(), addr);
    /// assert!(server.lock("s", "d").is_some());
    /// server.restart(false).await?;
    /// assert!(server.lock("s", "d").is_none());
    /// # server.shutdown().await;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn restart(&self, keep_locks: bool) -> io::Result<()> {
        let mut generation = self.inner.generation.lock().await;
        if let Some(old) = generation.take() {
            self.stop(old).await;
        }
        if !keep_locks {
            lock(&self.inner.shared.store).drop_all(Instant::now());
        }
        // SO_REUSEADDR makes the rebind immediate; retry briefly in case the
        // old listener's close has not fully landed.
        let mut attempt = 0;
        let listener = loop {
            match bind(self.inner.addr) {
                Ok(listener) => break listener,
                Err(err) if attempt < 40 && err.kind() == io::ErrorKind::AddrInUse => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(err) => return Err(err),
            }
        };
        *generation = Some(serve(
            &self.inner.shared,
            self.inner.config,
            self.inner.tls.as_ref(),
            listener,
        ));
        tracing::info!(addr = %self.inner.addr, keep_locks, "test server restarted");
        Ok(())
    }
}
