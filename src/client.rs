//! [`QuorumQuestClient`]: the documented API, as thin methods over one
//! election [`Session`](crate::election).

use std::sync::Arc;
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

use crate::admission::Wait;
use crate::callbacks::{drive_callbacks, Callbacks};
use crate::config::{check_max, Scope, Timing, TimingOverrides, DEFAULT_CONNECT_TIMEOUT};
use crate::election::{Leadership, Session};
use crate::error::{Error, Result};
use crate::rpc::Rpc;
use crate::transport::{parse_address, Dialing, Transport};

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
            shutdown.run_in_background();
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
        tokio::runtime::Handle::try_current().map_err(|_| Error::NoRuntime)?;
        let session = &self.inner.session;
        let wait = Wait::AtMost(session.timing.rpc_timeout);
        let (answer, _) = session.try_acquire(wait).await;
        if !answer.result.map_err(Error::Rpc)? {
            return Ok(session.is_leader());
        }
        // `TryAcquireLock` does not say how long the server keeps the lock
        // (it may grant less than asked): one `KeepAlive` tells, and only its
        // answer makes this client leader.
        let (confirm, _) = session.keep_alive(session.timing.rpc_timeout, wait).await;
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
        tokio::runtime::Handle::try_current().map_err(|_| Error::NoRuntime)?;
        let session = &self.inner.session;
        session.stop_keep_alive().await;
        session.release().await
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

    /// Leadership as a stream of events; see [`Leadership`]. The first poll
    /// starts campaigning; dropping the stream stops it and releases.
    pub fn leadership(&self) -> Leadership {
        Leadership::new(self.inner.session.clone())
    }

    /// A client for another (service, domain) with the same identity, TTL and
    /// timing, sharing this client's connection (one HTTP/2 channel for any
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
        let mine = self.inner.session.rpc.scope();
        let scope = Scope::new(
            service.into(),
            domain.into(),
            Some(mine.client_id.clone()),
            mine.ttl(),
        )?;
        let rpc = Rpc::new(self.inner.session.rpc.transport().clone(), Arc::new(scope))?;
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

/// How a [`ClientBuilder`] gets its connection.
enum Connection {
    Address { address: String, lazy: bool },
    Endpoint { endpoint: Box<Endpoint>, lazy: bool },
    Channel(Channel),
    Shared(Arc<Transport>),
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
    pub fn share_connection(mut self, other: &QuorumQuestClient) -> Self {
        self.connection = Connection::Shared(other.inner.session.rpc.transport().clone());
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
        match (self.max_concurrent_calls, &self.connection) {
            (Some(0), _) => {
                return Err(Error::invalid(
                    "max_concurrent_calls",
                    "must be at least 1 (got 0)",
                ))
            }
            (Some(_), Connection::Shared(_)) => {
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
        // The address is parsed here, before anything needs a runtime, so a
        // bad one is `InvalidParameter` wherever `build()` runs.
        let plan = match self.connection {
            Connection::Address { address, lazy } => {
                Plan::Open(Box::new(parse_address(&address)?), dialing, lazy)
            }
            Connection::Endpoint { endpoint, lazy } => {
                Plan::Open(endpoint, dialing.for_user_endpoint(), lazy)
            }
            Connection::Channel(channel) => Plan::Channel(channel),
            Connection::Shared(transport) => Plan::Shared(transport),
        };
        // Everything after this point (connecting, the step-down timer, the
        // callbacks adapter) needs a Tokio runtime: say so instead of
        // panicking inside tokio.
        tokio::runtime::Handle::try_current().map_err(|_| Error::NoRuntime)?;
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
        let session = Session::new(Rpc::new(transport, Arc::new(scope))?, timing, self.seed);
        if let Some(callbacks) = self.callbacks {
            let mut events = session.subscribe();
            let events = futures::stream::poll_fn(move |cx| events.poll_recv(cx));
            tokio::spawn(drive_callbacks(events, callbacks));
        }
        Ok(QuorumQuestClient {
            inner: Arc::new(ClientInner { session }),
        })
    }
}
