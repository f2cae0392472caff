//! [`QuorumQuestClient`]: the documented API, as thin methods over one
//! election [`Session`](crate::election).

use std::sync::Arc;
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};
use tracing::Instrument;

use crate::admission::Wait;
use crate::callbacks::{drive_callbacks, Callbacks};
use crate::config::{check_max, Scope, Timing, TimingOverrides, DEFAULT_CONNECT_TIMEOUT};
use crate::election::{Leadership, Session};
use crate::error::{Error, Result};
use crate::event::LeaderTerm;
use crate::rpc::Rpc;
use crate::transport::{
    check_user_endpoint, endpoint_for, secure_user_endpoint, CallMetadata, Dialing, TlsSettings,
    Transport,
};

/// The default server address.
pub const DEFAULT_ADDRESS: &str = "http://localhost:5050";
/// The default lock TTL.
pub const DEFAULT_TTL: Duration = Duration::from_secs(15);

/// A Quorum Quest client: one contender for one (service, domain) lock.
///
/// Cheap to clone; every clone is the same contender (same identity, same
/// election state, same connection). All methods take `&self`, so the client
/// can be shared between tasks without a `Mutex`.
///
/// ```no_run
/// use std::time::Duration;
/// use quorum_quest_client::QuorumQuestClient;
///
/// # async fn demo() -> quorum_quest_client::Result<()> {
/// let client = QuorumQuestClient::new(
///     "my-service",
///     "production",
///     Duration::from_secs(15),
///     "http://localhost:5050",
///     None,
///     None,
/// )
/// .await?;
/// if client.try_acquire_lock().await? {
///     client.start_keep_alive().await?;
/// }
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct QuorumQuestClient {
    inner: Arc<ClientInner>,
}

struct ClientInner {
    session: Arc<Session>,
}

impl Drop for ClientInner {
    fn drop(&mut self) {
        // The last handle is gone: stop the keep-alive task; if no leadership
        // stream still campaigns, release the lock in the background.
        if let Some(shutdown) = self.session.client_dropped() {
            shutdown.run_on_drop();
        }
    }
}

impl std::fmt::Debug for QuorumQuestClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scope = self.inner.session.rpc.scope();
        f.debug_struct("QuorumQuestClient")
            .field("service", &scope.service)
            .field("domain", &scope.domain)
            .field("client_id", &scope.client_id)
            .field("ttl", &scope.ttl())
            .field("is_leader", &self.is_leader())
            .finish()
    }
}

impl QuorumQuestClient {
    /// Creates a client and connects to `address` (within a 5 s connect
    /// timeout). Every parameter is validated before any network I/O.
    ///
    /// - `ttl`: a whole number of seconds, 1 to `i32::MAX`.
    /// - `address`: `http://host:port`, `https://host:port` or `host:port`.
    /// - `client_id`: this contender's identity, unique per process; a random
    ///   UUID if `None`.
    /// - `callbacks`: called on leadership changes ([`NoOpCallbacks`](crate::NoOpCallbacks) if `None`).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidParameter`] naming the bad parameter;
    /// [`Error::Connection`] when the server cannot be reached;
    /// [`Error::ConnectTimeout`] when connecting takes over 5 s.
    ///
    /// ```
    /// use std::time::Duration;
    /// use quorum_quest_client::{Error, QuorumQuestClient};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let err = QuorumQuestClient::new("svc", "dom", Duration::from_millis(1500), "localhost:5050", None, None)
    ///     .await
    ///     .unwrap_err();
    /// assert!(matches!(err, Error::InvalidParameter(ref m) if m.starts_with("ttl:")));
    /// # }
    /// ```
    pub async fn new(
        service: impl Into<String>,
        domain: impl Into<String>,
        ttl: Duration,
        address: impl AsRef<str>,
        client_id: Option<String>,
        callbacks: Option<Arc<dyn Callbacks>>,
    ) -> Result<Self> {
        let mut builder = Self::builder(service, domain)
            .ttl(ttl)
            .address(address.as_ref());
        if let Some(id) = client_id {
            builder = builder.client_id(id);
        }
        if let Some(cb) = callbacks {
            builder = builder.callbacks(cb);
        }
        builder.build().await
    }

    /// A builder with every knob: timing, lazy connect, a shared connection.
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use quorum_quest_client::QuorumQuestClient;
    ///
    /// # async fn demo() -> quorum_quest_client::Result<()> {
    /// let client = QuorumQuestClient::builder("billing", "eu-west")
    ///     .address("localhost:5050")
    ///     .ttl(Duration::from_secs(10))
    ///     .renew_interval(Duration::from_secs(2))
    ///     .lazy_connect()
    ///     .build()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn builder(service: impl Into<String>, domain: impl Into<String>) -> ClientBuilder {
        ClientBuilder::new(service.into(), domain.into())
    }

    /// Asks the server for the lock once. `Ok(true)` if this client is now
    /// leader (a fresh term, or a renewal if it already was); `Ok(false)` if
    /// another node holds the lock, or the answer came back too late to lead
    /// safely. Does not start renewing: call [`start_keep_alive`](Self::start_keep_alive).
    ///
    /// A grant is confirmed with one `KeepAlive` before this returns `true`:
    /// its answer tells how long the server really keeps the lock, and the
    /// lease never counts for more than the TTL asked for.
    ///
    /// # Errors
    ///
    /// [`Error::Rpc`] when a call fails or times out (leadership, if held,
    /// lasts until its deadline). A call that timed out may still have been
    /// granted on the server: the lock then expires after its TTL, unless
    /// you call [`release_lock`](Self::release_lock) (the background
    /// campaign does that by itself). [`Error::NoRuntime`] outside a Tokio
    /// runtime.
    pub async fn try_acquire_lock(&self) -> Result<bool> {
        crate::sync::runtime()?;
        let session = &self.inner.session;
        session.check_open()?;
        let wait = Wait::AtMost(session.timing.rpc_timeout);
        let answer = session.try_acquire(wait).await;
        if answer.result.is_err() {
            // Shut down while it waited for a call slot: it was not sent.
            session.check_open()?;
        }
        if !answer.result.map_err(Error::Rpc)? {
            return Ok(session.is_leader());
        }
        // `TryAcquireLock` does not say how long the server keeps the lock
        // (it may grant less than asked): one `KeepAlive` tells, and only its
        // answer makes this client leader.
        let confirm = session.keep_alive(session.timing.rpc_timeout, wait).await;
        confirm.result.map_err(Error::Rpc)?;
        Ok(session.is_leader())
    }

    /// Gives leadership up: stops the keep-alive task (so it cannot win the
    /// lock back), ends the term locally (`on_leader_lost` is queued and
    /// `is_leader()` turns false before the request leaves), then asks the
    /// server to delete the lock. Idempotent and harmless when not leader.
    /// Leadership streams of this client keep campaigning; resign them to
    /// stop them.
    ///
    /// # Errors
    ///
    /// [`Error::Rpc`] if the release call fails; this client is not leader
    /// either way, and the lock expires after its TTL.
    pub async fn release_lock(&self) -> Result<()> {
        crate::sync::runtime()?;
        let session = &self.inner.session;
        session.stop_keep_alive().await;
        session.release().await
    }

    /// Shuts this contender down for good, and waits until it is done: stops
    /// the keep-alive task and every leadership stream's campaign, ends the
    /// term (`is_leader()` turns false and `on_leader_lost` is queued before
    /// the release request leaves), asks the server to delete the lock, and
    /// then ends every [`Leadership`] stream of this client (after the events
    /// it still holds) and the callbacks (after their last call).
    ///
    /// Bounded: at most about one second to stop the campaign plus the RPC
    /// timeout for the release; if the release fails or times out, the lock
    /// expires after its TTL. Afterwards [`try_acquire_lock`](Self::try_acquire_lock)
    /// and [`start_keep_alive`](Self::start_keep_alive) fail with
    /// [`Error::Shutdown`] and new streams end at once. Idempotent.
    ///
    /// This is the exit path to use at the end of `main` or on SIGTERM.
    /// Dropping the last handle also releases (see the crate docs, "Exits"),
    /// but only `shutdown` waits on every runtime flavour and reports the
    /// outcome.
    ///
    /// # Errors
    ///
    /// [`Error::Rpc`] if the release call failed (this client is not leader
    /// either way); [`Error::NoRuntime`] outside a Tokio runtime.
    ///
    /// ```no_run
    /// # async fn demo(client: quorum_quest_client::QuorumQuestClient) -> quorum_quest_client::Result<()> {
    /// tokio::signal::ctrl_c().await.ok();
    /// client.shutdown().await?;
    /// # Ok(()) }
    /// ```
    pub async fn shutdown(&self) -> Result<()> {
        crate::sync::runtime()?;
        self.inner.session.close().run().await
    }

    /// The running term, if this client leads now: the same [`LeaderTerm`]
    /// that `Elected` carried, to bind leader-only work to (for example from
    /// [`Callbacks::on_leader_elected`]). `None` when not leader.
    ///
    /// ```no_run
    /// # async fn demo(client: quorum_quest_client::QuorumQuestClient) {
    /// if let Some(term) = client.current_term() {
    ///     // Stopped at the end of the term, by its own timer if need be.
    ///     term.spawn(async { /* leader-only work */ });
    /// }
    /// # }
    /// ```
    #[must_use]
    pub fn current_term(&self) -> Option<LeaderTerm> {
        self.inner.session.current_term()
    }

    /// Starts the background task that keeps the lock: renews it every renew
    /// interval while leader, and re-campaigns after a loss (trying to acquire
    /// every retry period). Started on a non-leader it simply campaigns.
    ///
    /// # Errors
    ///
    /// [`Error::KeepAliveAlreadyRunning`] if it is already running.
    pub async fn start_keep_alive(&self) -> Result<()> {
        self.inner.session.start_keep_alive()
    }

    /// Stops the background task promptly (it never waits for a hanging call).
    /// Does not release the lock: a leader stays leader until its lease runs
    /// out, and `on_leader_lost` fires then.
    pub async fn stop_keep_alive(&self) {
        self.inner.session.stop_keep_alive().await;
    }

    /// `true` if the keep-alive task is running.
    #[must_use]
    pub fn is_keep_alive_running(&self) -> bool {
        self.inner.session.keep_alive_running()
    }

    /// Time left before this client stops considering itself leader, counting
    /// down on a monotonic clock; `None` when not leader.
    #[must_use]
    pub fn get_remaining_lease(&self) -> Option<Duration> {
        self.inner.session.remaining()
    }

    /// `true` while this client holds a lease that is certainly still valid on
    /// the server. Turns `false` at the safe deadline even if no call returns.
    #[must_use]
    pub fn is_leader(&self) -> bool {
        self.inner.session.is_leader()
    }

    /// This contender's identity as sent to the server.
    #[must_use]
    pub fn client_id(&self) -> &str {
        &self.inner.session.rpc.scope().client_id
    }

    /// The service this client campaigns in.
    #[must_use]
    pub fn service(&self) -> &str {
        &self.inner.session.rpc.scope().service
    }

    /// The domain this client campaigns in.
    #[must_use]
    pub fn domain(&self) -> &str {
        &self.inner.session.rpc.scope().domain
    }

    /// The lock TTL.
    #[must_use]
    pub fn ttl(&self) -> Duration {
        self.inner.session.rpc.scope().ttl()
    }

    /// The timing in force.
    #[must_use]
    pub fn timing(&self) -> Timing {
        self.inner.session.timing
    }

    /// A snapshot of this client's election for a liveness probe: leading or
    /// not, the lease left, time since the last renewal and the last call,
    /// failed calls in a row, whether the campaign runs, and a verdict
    /// ([`Health::check`](crate::Health::check)) that catches a wedged
    /// leader (one that nothing renews) or a dead campaign. Cheap; no I/O.
    /// See [`Health`](crate::Health) for wiring it to a probe.
    #[must_use]
    pub fn health(&self) -> crate::health::Health {
        self.inner.session.health()
    }

    /// Leadership as a stream of events; see [`Leadership`]. The first poll
    /// starts campaigning; dropping the stream stops it and releases.
    pub fn leadership(&self) -> Leadership {
        Leadership::new(self.inner.session.clone())
    }

    /// A client for another (service, domain) with the same identity, TTL,
    /// timing and call metadata (headers, bearer token, interceptor),
    /// sharing this client's connection (one HTTP/2 channel for any
    /// number of shards). It has no callbacks; use its [`leadership`](Self::leadership)
    /// stream or [`ClientBuilder::share_connection`] for more control.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidParameter`] for an empty service or domain.
    ///
    /// ```no_run
    /// # async fn demo(client: quorum_quest_client::QuorumQuestClient) -> quorum_quest_client::Result<()> {
    /// let shards: Vec<_> = (0..16)
    ///     .map(|i| client.for_scope("indexer", format!("shard-{i}")))
    ///     .collect::<Result<_, _>>()?;
    /// # Ok(()) }
    /// ```
    pub fn for_scope(
        &self,
        service: impl Into<String>,
        domain: impl Into<String>,
    ) -> Result<QuorumQuestClient> {
        let parent = &self.inner.session.rpc;
        // Shares the parent's id, connection and metadata (no copies).
        let scope = parent.scope().sibling(service.into(), domain.into())?;
        let rpc = Rpc::new(parent.transport().clone(), Arc::new(scope))?
            .with_metadata(parent.metadata().clone());
        Ok(QuorumQuestClient {
            inner: Arc::new(ClientInner {
                session: Session::new(rpc, self.inner.session.timing, None),
            }),
        })
    }
}

/// What `build()` does for a connection, once the address is parsed.
enum Plan {
    Open(Box<Endpoint>, Dialing, bool),
    Channel(Channel),
    Shared(Arc<Transport>),
}

/// How a [`ClientBuilder`] gets its connection (`Shared`: another client's
/// connection, and the metadata that client sends).
enum Connection {
    Address { address: String, lazy: bool },
    Endpoint { endpoint: Box<Endpoint>, lazy: bool },
    Channel(Channel),
    Shared(Arc<Transport>, CallMetadata),
}

/// Builds a [`QuorumQuestClient`] with every knob. Defaults: ttl 15 s, address
/// `http://localhost:5050`, a random client id, no callbacks, eager connect
/// within 5 s, and timing derived from the TTL (see [`Timing::for_ttl`]).
#[must_use]
pub struct ClientBuilder {
    service: String,
    domain: String,
    ttl: Duration,
    client_id: Option<String>,
    callbacks: Option<Arc<dyn Callbacks>>,
    timing: TimingOverrides,
    connection: Connection,
    connect_timeout: Duration,
    seed: Option<u64>,
    /// TLS settings (`tls`, `ca_certificate`, `identity`, `tls_domain`).
    tls: Option<TlsSettings>,
    /// Metadata for every call; values are hidden from `Debug`.
    metadata: CallMetadata,
    /// The first bad `metadata`/`bearer_token`, reported by `build()`.
    metadata_error: Option<Error>,
    max_concurrent_calls: Option<usize>,
}

impl std::fmt::Debug for ClientBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientBuilder")
            .field("service", &self.service)
            .field("domain", &self.domain)
            .field("ttl", &self.ttl)
            .field("client_id", &self.client_id)
            .finish_non_exhaustive()
    }
}

impl ClientBuilder {
    fn new(service: String, domain: String) -> Self {
        ClientBuilder {
            service,
            domain,
            ttl: DEFAULT_TTL,
            client_id: None,
            callbacks: None,
            timing: TimingOverrides::default(),
            connection: Connection::Address {
                address: DEFAULT_ADDRESS.to_string(),
                lazy: false,
            },
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            seed: None,
            tls: None,
            metadata: CallMetadata::default(),
            metadata_error: None,
            max_concurrent_calls: None,
        }
    }

    /// The lock TTL (whole seconds, default 15 s).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// The server address (default `http://localhost:5050`).
    pub fn address(mut self, address: impl Into<String>) -> Self {
        let lazy = self.is_lazy();
        self.connection = Connection::Address {
            address: address.into(),
            lazy,
        };
        self
    }

    /// Connect on first use instead of in `build()`; an unreachable server
    /// then shows as failed calls (`RpcFailed` events) rather than an error.
    pub fn lazy_connect(mut self) -> Self {
        if let Connection::Address { lazy, .. } | Connection::Endpoint { lazy, .. } =
            &mut self.connection
        {
            *lazy = true;
        }
        self
    }

    fn is_lazy(&self) -> bool {
        matches!(
            self.connection,
            Connection::Address { lazy: true, .. } | Connection::Endpoint { lazy: true, .. }
        )
    }

    /// How long an eager connect may take, TLS handshake included (default
    /// 5 s); [`Error::ConnectTimeout`] after that. For an
    /// [`endpoint`](Self::endpoint) with a connect timeout of its own, that
    /// one applies instead.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Use a channel you built. Overrides [`address`](Self::address).
    ///
    /// The channel is used as is: the library never redials it, and neither
    /// [`connect_timeout`](Self::connect_timeout) nor
    /// [`lazy_connect`](Self::lazy_connect) applies. tonic reconnects it by
    /// itself after a reset or a GOAWAY, but a connection that goes silent
    /// (a partition) is noticed only by the HTTP/2 keep-alive you configured
    /// on it, if any; until then every call times out on it. Prefer
    /// [`endpoint`](Self::endpoint), which the library redials.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use tonic::transport::Endpoint;
    /// use quorum_quest_client::QuorumQuestClient;
    ///
    /// let channel = Endpoint::from_static("http://localhost:5050").connect_lazy();
    /// let client = QuorumQuestClient::builder("svc", "dom")
    ///     .channel(channel)
    ///     .build()
    ///     .await?;
    /// # drop(client);
    /// # Ok(())
    /// # }
    /// ```
    pub fn channel(mut self, channel: Channel) -> Self {
        self.connection = Connection::Channel(channel);
        self
    }

    /// Use an endpoint you configured (TLS, user agent, window sizes, HTTP/2
    /// keep-alive...). Overrides [`address`](Self::address).
    ///
    /// The library owns the endpoint and dials it like an address: eagerly
    /// in `build()` (bounded by the endpoint's connect timeout if it has one,
    /// else by [`connect_timeout`](Self::connect_timeout), TLS included) or,
    /// after [`lazy_connect`](Self::lazy_connect), on first use; and after a
    /// call times out it dials a fresh connection for the next call. Your
    /// settings are kept as they are: the library adds no HTTP/2 keep-alive
    /// to an endpoint you give (set `http2_keep_alive_interval` with
    /// `keep_alive_while_idle(false)` yourself if you want a silent
    /// connection noticed under an open call).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use std::time::Duration;
    /// use tonic::transport::Endpoint;
    /// use quorum_quest_client::QuorumQuestClient;
    ///
    /// let endpoint = Endpoint::from_static("http://localhost:5050")
    ///     .user_agent("my-service/1.0")?
    ///     .http2_keep_alive_interval(Duration::from_secs(2))
    ///     .keep_alive_while_idle(false);
    /// let client = QuorumQuestClient::builder("svc", "dom")
    ///     .endpoint(endpoint)
    ///     .lazy_connect()
    ///     .build()
    ///     .await?;
    /// # drop(client);
    /// # Ok(())
    /// # }
    /// ```
    pub fn endpoint(mut self, endpoint: Endpoint) -> Self {
        let lazy = self.is_lazy();
        self.connection = Connection::Endpoint {
            endpoint: Box::new(endpoint),
            lazy,
        };
        self
    }

    /// Share `other`'s connection (one HTTP/2 channel for many clients).
    ///
    /// The connection keeps its own TLS settings (TLS knobs on this builder
    /// are an error). The new client sends `other`'s call metadata (headers,
    /// bearer token, interceptor), with this builder's
    /// [`metadata`](Self::metadata) on top: an entry of the same key, or an
    /// [`interceptor`](Self::interceptor), replaces `other`'s.
    pub fn share_connection(mut self, other: &QuorumQuestClient) -> Self {
        let rpc = &other.inner.session.rpc;
        self.connection = Connection::Shared(rpc.transport().clone(), (**rpc.metadata()).clone());
        self
    }

    /// Use this TLS configuration (feature `tls`): a private CA, a client
    /// certificate for mutual TLS, a domain name to verify, public or
    /// native roots... The address must be `https://` or a bare
    /// `host:port` (which then means TLS); `http://` is an error, never a
    /// silent plaintext connection.
    ///
    /// The library still owns the connection: it dials with this
    /// configuration in `build()` (bounded by the connect timeout, handshake
    /// included) and on every redial. The configuration is used as given
    /// (enable roots on it: `with_webpki_roots()`, `ca_certificate(..)`);
    /// [`ca_certificate`](Self::ca_certificate), [`identity`](Self::identity)
    /// and [`tls_domain`](Self::tls_domain) are applied on top of it. With an
    /// [`endpoint`](Self::endpoint) (which must be `https://`), it replaces
    /// the endpoint's own TLS configuration; with a
    /// [`channel`](Self::channel) or
    /// [`share_connection`](Self::share_connection) it is an error (that
    /// connection's TLS is already set).
    ///
    /// Without any TLS knob, an `https://` address uses the public web PKI
    /// roots.
    #[cfg(feature = "tls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
    pub fn tls(mut self, config: tonic::transport::ClientTlsConfig) -> Self {
        self.tls.get_or_insert_with(TlsSettings::default).config = Some(config);
        self
    }

    /// Trust the CA certificate(s) in this PEM (feature `tls`); may be
    /// called more than once. Without [`tls`](Self::tls), only the CAs given
    /// here are trusted (not the public roots): what a private CA calls for.
    /// Checked in `build()`: no readable certificate is
    /// [`Error::InvalidParameter`] naming `ca_certificate`. See
    /// [`tls`](Self::tls) for which addresses and connections TLS applies to.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// use quorum_quest_client::QuorumQuestClient;
    ///
    /// let client = QuorumQuestClient::builder("billing", "eu-west")
    ///     .address("https://quorum.internal:5050")
    ///     .ca_certificate(std::fs::read("/etc/quorum/ca.pem")?)
    ///     .identity(
    ///         std::fs::read("/etc/quorum/client.pem")?,
    ///         std::fs::read("/etc/quorum/client.key")?,
    ///     )
    ///     .bearer_token(std::env::var("QUORUM_TOKEN")?)
    ///     .build()
    ///     .await?;
    /// # drop(client); Ok(()) }
    /// ```
    #[cfg(feature = "tls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
    pub fn ca_certificate(mut self, pem: impl AsRef<[u8]>) -> Self {
        self.tls
            .get_or_insert_with(TlsSettings::default)
            .ca_certificates
            .push(pem.as_ref().to_vec());
        self
    }

    /// Present this client certificate and private key (PEM) for mutual
    /// TLS (feature `tls`). Without [`tls`](Self::tls) or
    /// [`ca_certificate`](Self::ca_certificate), the server is verified
    /// against the public roots. Checked in `build()`
    /// ([`Error::InvalidParameter`] naming `identity`; the key is never
    /// quoted in errors, logs or `Debug` output).
    #[cfg(feature = "tls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
    pub fn identity(mut self, cert_pem: impl AsRef<[u8]>, key_pem: impl AsRef<[u8]>) -> Self {
        self.tls.get_or_insert_with(TlsSettings::default).identity =
            Some((cert_pem.as_ref().to_vec(), key_pem.as_ref().to_vec()));
        self
    }

    /// The name to verify the server's certificate against (feature `tls`;
    /// default: the address's host). For an address by IP, or through a
    /// tunnel, whose certificate names the service.
    #[cfg(feature = "tls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
    pub fn tls_domain(mut self, name: impl Into<String>) -> Self {
        self.tls.get_or_insert_with(TlsSettings::default).domain = Some(name.into());
        self
    }

    /// Send this metadata (an HTTP/2 header) with every call, including
    /// after a redial; a second call with the same key replaces the value.
    /// Keys are ASCII header names (case-insensitive), not `grpc-*` or
    /// reserved ones, not binary (`*-bin`); values are visible ASCII. A bad
    /// key or value is [`Error::InvalidParameter`] from `build()`. Values
    /// never appear in `Debug` output or logs.
    ///
    /// Clients made with [`QuorumQuestClient::for_scope`] send the same
    /// metadata; see [`share_connection`](Self::share_connection) for that
    /// case.
    pub fn metadata(mut self, key: impl AsRef<str>, value: impl AsRef<str>) -> Self {
        if let Err(e) = self.metadata.insert(key.as_ref(), value.as_ref(), false) {
            self.metadata_error.get_or_insert(e);
        }
        self
    }

    /// Send `authorization: Bearer <token>` with every call (see
    /// [`metadata`](Self::metadata)). The value is marked sensitive: never
    /// shown in `Debug` output or logs, never indexed by HTTP/2 header
    /// compression. For a token that rotates while the client runs, use an
    /// [`interceptor`](Self::interceptor) that reads the current one.
    ///
    /// A server that rejects the token answers `UNAUTHENTICATED` (or
    /// `PERMISSION_DENIED`): [`Error::Rpc`] from the imperative calls, a
    /// [`LeadershipEvent::RpcFailed`](crate::LeadershipEvent::RpcFailed)
    /// with that code in a campaign, which retries at the slowest pace (the
    /// retry period), not in a tight loop.
    pub fn bearer_token(mut self, token: impl AsRef<str>) -> Self {
        let token = token.as_ref();
        let result = if token.trim().is_empty() {
            Err(Error::invalid("bearer_token", "must not be empty"))
        } else {
            self.metadata
                .insert("authorization", &format!("Bearer {token}"), true)
        };
        if let Err(e) = result {
            self.metadata_error.get_or_insert(e);
        }
        self
    }

    /// Run this tonic interceptor on every call, after the
    /// [`metadata`](Self::metadata) is set and before the request is sent:
    /// it may add or replace metadata (a token read fresh from a file or a
    /// token source, so that a rotation needs no new client), or refuse the
    /// call with a `Status` (the call then fails with it, unsent). It runs on
    /// the runtime: it must not block. Replaces an earlier interceptor.
    ///
    /// ```
    /// use quorum_quest_client::tonic::{metadata::MetadataValue, Request, Status};
    /// use quorum_quest_client::QuorumQuestClient;
    ///
    /// let builder = QuorumQuestClient::builder("svc", "dom").interceptor(
    ///     |mut request: Request<()>| -> Result<Request<()>, Status> {
    ///         let token: MetadataValue<_> = "Bearer fresh-token"
    ///             .parse()
    ///             .map_err(|_| Status::unauthenticated("bad token"))?;
    ///         request.metadata_mut().insert("authorization", token);
    ///         Ok(request)
    ///     },
    /// );
    /// # drop(builder);
    /// ```
    pub fn interceptor(
        mut self,
        interceptor: impl tonic::service::Interceptor + Send + 'static,
    ) -> Self {
        self.metadata.set_interceptor(Box::new(interceptor));
        self
    }

    /// This contender's identity (default: a random UUID). Must be unique
    /// among contenders: two processes with one id are one owner to the server.
    pub fn client_id(mut self, client_id: impl Into<String>) -> Self {
        self.client_id = Some(client_id.into());
        self
    }

    /// Callbacks for leadership changes.
    pub fn callbacks(mut self, callbacks: Arc<dyn Callbacks>) -> Self {
        self.callbacks = Some(callbacks);
        self
    }

    /// How often a leader renews (default ttl / 3).
    pub fn renew_interval(mut self, d: Duration) -> Self {
        self.timing.renew_interval = Some(d);
        self
    }

    /// How often a follower retries (default ttl / 3, at most 2 s; jittered).
    pub fn retry_period(mut self, d: Duration) -> Self {
        self.timing.retry_period = Some(d);
        self
    }

    /// The longest one call may take (default ttl / 3, at most 5 s).
    pub fn rpc_timeout(mut self, d: Duration) -> Self {
        self.timing.rpc_timeout = Some(d);
        self
    }

    /// How long before the server-side expiry a leader steps down (default
    /// max(ttl / 10, 100 ms)).
    pub fn safety_margin(mut self, d: Duration) -> Self {
        self.timing.safety_margin = Some(d);
        self
    }

    /// Seeds the retry jitter, for reproducible tests.
    pub fn jitter_seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// The most calls in flight at once on this client's connection, shared
    /// by every client on it ([`for_scope`](QuorumQuestClient::for_scope),
    /// [`share_connection`](Self::share_connection)); default
    /// [`DEFAULT_MAX_CONCURRENT_CALLS`](crate::DEFAULT_MAX_CONCURRENT_CALLS)
    /// (100). Further calls wait in a local queue, leaders' renewals and
    /// releases ahead of followers' attempts, and a call's timeout starts
    /// only when it leaves the queue. Keep it at or below the server's
    /// HTTP/2 `max_concurrent_streams`.
    ///
    /// Must be at least 1; it cannot be combined with
    /// [`share_connection`](Self::share_connection) (the connection keeps the
    /// cap it was opened with).
    pub fn max_concurrent_calls(mut self, max: usize) -> Self {
        self.max_concurrent_calls = Some(max);
        self
    }

    /// Validates everything, then connects (unless lazy or given a channel).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidParameter`] naming the first bad parameter, before any
    /// network I/O; [`Error::Connection`] if an eager connect fails,
    /// [`Error::ConnectTimeout`] if it does not complete within the connect
    /// timeout.
    pub async fn build(self) -> Result<QuorumQuestClient> {
        let scope = Scope::new(self.service, self.domain, self.client_id, self.ttl)?;
        let timing = self.timing.resolve(scope.ttl())?;
        if self.connect_timeout.is_zero() {
            return Err(Error::invalid(
                "connect_timeout",
                "must be greater than zero",
            ));
        }
        check_max("connect_timeout", self.connect_timeout)?;
        if let Some(err) = self.metadata_error {
            return Err(err);
        }
        match (self.max_concurrent_calls, &self.connection) {
            (Some(0), _) => {
                return Err(Error::invalid(
                    "max_concurrent_calls",
                    "must be at least 1 (got 0)",
                ))
            }
            (Some(_), Connection::Shared(..)) => {
                return Err(Error::invalid(
                    "max_concurrent_calls",
                    "cannot be set with share_connection: a shared connection keeps the cap it was opened with",
                ))
            }
            _ => {}
        }
        let cap = self
            .max_concurrent_calls
            .unwrap_or(crate::admission::DEFAULT_MAX_CONCURRENT_CALLS);
        let dialing = Dialing::for_timing(scope.ttl(), &timing, self.connect_timeout);
        let tls = self.tls.as_ref();
        let mut metadata = self.metadata;
        // The address is parsed here, before anything needs a runtime, so a
        // bad one is `InvalidParameter` wherever `build()` runs.
        let plan = match self.connection {
            Connection::Address { address, lazy } => {
                Plan::Open(Box::new(endpoint_for(&address, tls)?), dialing, lazy)
            }
            Connection::Endpoint { endpoint, lazy } => {
                let endpoint = match tls {
                    Some(tls) => Box::new(secure_user_endpoint(*endpoint, tls)?),
                    None => {
                        check_user_endpoint(&endpoint)?;
                        endpoint
                    }
                };
                Plan::Open(endpoint, dialing.for_user_endpoint(), lazy)
            }
            Connection::Channel(_) if tls.is_some() => {
                return Err(Error::invalid(
                    "tls",
                    "a channel you built is used as is; configure TLS on its Endpoint",
                ))
            }
            Connection::Channel(channel) => Plan::Channel(channel),
            Connection::Shared(..) if tls.is_some() => {
                return Err(Error::invalid(
                    "tls",
                    "share_connection uses the other client's connection and its TLS settings",
                ))
            }
            Connection::Shared(transport, theirs) => {
                metadata = theirs.merged(&metadata);
                Plan::Shared(transport)
            }
        };
        // Everything after this point (connecting, the step-down timer, the
        // callbacks adapter) needs a Tokio runtime: say so instead of
        // panicking inside tokio.
        crate::sync::runtime()?;
        let transport = match plan {
            Plan::Open(endpoint, dialing, lazy) => Arc::new(
                Transport::open(*endpoint, dialing, lazy)
                    .await?
                    .with_max_concurrent_calls(cap),
            ),
            Plan::Channel(channel) => {
                Arc::new(Transport::from_channel(channel).with_max_concurrent_calls(cap))
            }
            Plan::Shared(transport) => transport,
        };
        let rpc = Rpc::new(transport, Arc::new(scope))?.with_metadata(Arc::new(metadata));
        let session = Session::new(rpc, timing, self.seed);
        if let Some(callbacks) = self.callbacks {
            let events = session.callback_events();
            let span = session.observer.span().clone();
            tokio::spawn(drive_callbacks(events, callbacks).instrument(span));
        }
        Ok(QuorumQuestClient {
            inner: Arc::new(ClientInner { session }),
        })
    }
}
