//! Address parsing, the Endpoint the library owns, and redial.
//!
//! A [`Transport`] owns one tonic [`Channel`] (one HTTP/2 connection,
//! multiplexed by every client and scope that shares it). Three mechanisms
//! keep that connection usable:
//!
//! - **A bounded connect.** An eager connect (in `build()`) is bounded as a
//!   whole by the connect timeout, TLS handshake included: tonic's own
//!   `connect_timeout` covers only the TCP connect, so a peer that accepts TCP
//!   and never answers the TLS `ClientHello` would otherwise hang `build()`
//!   for ever. Running out of time is [`Error::ConnectTimeout`].
//! - **HTTP/2 keep-alive pings, only while a call is open.** tonic reconnects
//!   by itself after a GOAWAY or a reset; what it cannot see is a connection
//!   whose packets silently vanish (a partition). For the endpoints the
//!   library builds from an address, a call that has heard nothing from the
//!   server for the *ping interval* sends a PING, and a PING not answered
//!   within the *ping timeout* closes the connection (the call fails with
//!   `UNAVAILABLE`, and tonic dials afresh for the next one). Both are
//!   `clamp(max(ttl / 10, rpc_timeout / 3), 1 s, 10 s)` (see
//!   [`KeepAlive::for_timing`]): a dead connection under an open call is
//!   noticed within two intervals (interval + timeout), at most a quarter of
//!   the TTL for the default timing and a TTL of 10 s or more (3.3 s for the
//!   default 15 s), well within one lease.
//!
//!   Pings are **never sent on an idle connection**
//!   (`keep_alive_while_idle(false)`). The real server is grpc-go, whose
//!   default keep-alive enforcement (`MinTime` 5 min, `PermitWithoutStream`
//!   false) answers a client that pings more often than that with
//!   `GOAWAY ENHANCE_YOUR_CALM "too_many_pings"`. grpc-go forgives a ping that
//!   follows anything it sent (headers or data) and strikes the others,
//!   closing the connection at the third strike. Pinging only while a call is
//!   open and the connection has been silent for an interval is therefore
//!   safe: each answer resets the count, and the interval is at least a third
//!   of the call timeout, so a call that is slow on a live server times out
//!   (at most three pings) before it could draw the third strike. (hyper
//!   also pings as a call opens on a connection that has been silent for an
//!   interval, e.g. at each renewal; grpc-go forgives that one, since it
//!   answered the call before.)
//! - **Redial after a timed-out call.** After a call times out
//!   ([`is_timeout`]), [`Transport::call_timed_out`] replaces the channel
//!   with a fresh lazy one, at most once per `redial_after` (the call
//!   timeout), so the next call dials a new connection instead of queueing
//!   behind a dead one. It does not when the connection answered another
//!   call since the timed-out one was sent, within the last quarter of the
//!   call timeout: that connection is alive and the server merely slow (one
//!   connection carrying thousands of elections must not be replaced because
//!   one call among them was slow). Only a call that was on the wire counts: calls wait
//!   for a slot in the connection's [admission queue](crate::admission)
//!   first, and their timeout starts when they leave it, so local queueing
//!   never looks like a dead connection; nor does a call whose budget was
//!   cut to under a quarter of the call timeout (by its wait in the queue,
//!   or by a lease's deadline), too short a window to judge the connection.
//!
//! **TLS** lives in the [`Endpoint`] (tonic builds its connector from the
//! `ClientTlsConfig` once, in `endpoint_for`), so every redial, being a
//! `connect_lazy` of the same endpoint, uses the same CA, client identity
//! and domain. **Metadata** ([`CallMetadata`]) is not part of the
//! connection: it is put on each request (`rpc.rs`), so it survives redials
//! and works on a channel the user handed us too.
//!
//! A user-supplied [`Endpoint`] (`ClientBuilder::endpoint`) is owned and
//! redialed like an address, but its settings are the user's: the library adds
//! no keep-alive to it (tonic's `Endpoint` cannot be read back, so adding ours
//! would overwrite the user's), and the connect timeout is the endpoint's own
//! when it has one. A user-supplied [`Channel`] (`ClientBuilder::channel`) is
//! used as is and never redialed.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tonic::metadata::{AsciiMetadataKey, AsciiMetadataValue};
use tonic::service::Interceptor;
#[cfg(feature = "tls")]
use tonic::transport::ClientTlsConfig;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};

use crate::admission::{Admission, DEFAULT_MAX_CONCURRENT_CALLS};
use crate::config::Timing;
use crate::error::{Error, Result};

/// Parses a server address: `http://host:port`, `https://host:port` or the bare
/// `host:port` the Go and Python clients use (plaintext), without TLS
/// settings.
#[cfg(test)]
pub(crate) fn parse_address(address: &str) -> Result<Endpoint> {
    endpoint_for(address, None)
}

/// Parses a server address and applies the builder's TLS settings, if any.
///
/// - `https://`: TLS, with `tls` if given, else the public web PKI roots.
///   Without the `tls` feature this is [`Error::InvalidParameter`] naming
///   the feature.
/// - bare `host:port`: plaintext, or TLS when `tls` is given (TLS settings
///   say what the user wants; a bare address does not say otherwise).
/// - `http://` with `tls`: [`Error::InvalidParameter`], never a silent
///   plaintext connection the user asked to secure.
pub(crate) fn endpoint_for(address: &str, tls: Option<&TlsSettings>) -> Result<Endpoint> {
    let address = address.trim();
    if address.is_empty() {
        return Err(Error::invalid("address", "must not be empty"));
    }
    // `user:password@` is never sent by gRPC, and the address is quoted in
    // errors and logs: refuse it without quoting it.
    let authority = address
        .split_once("://")
        .map_or(address, |(_, rest)| rest)
        .split(['/', '?', '#'])
        .next()
        .unwrap_or_default();
    if authority.contains('@') {
        return Err(Error::invalid(
            "address",
            "it holds credentials (user:password@), which gRPC never sends; remove them and use bearer_token or metadata (the address is not quoted here)",
        ));
    }
    let (url, https) = match address.split_once("://") {
        Some((scheme, _)) => match scheme.to_ascii_lowercase().as_str() {
            "http" => (address.to_string(), false),
            "https" => (address.to_string(), true),
            other => {
                return Err(Error::invalid(
                    "address",
                    format!("unsupported scheme {other:?} in {address:?} (use http://, https:// or bare host:port)"),
                ))
            }
        },
        None if tls.is_some() => (format!("https://{address}"), true),
        None => (format!("http://{address}"), false),
    };
    let uri: http::Uri = url.parse().map_err(|e| {
        Error::invalid(
            "address",
            format!("cannot parse {address:?} ({e}); expected host:port or http(s)://host:port"),
        )
    })?;
    let host = uri.host().unwrap_or_default();
    if host.is_empty() {
        return Err(Error::invalid(
            "address",
            format!("no host in {address:?}; expected host:port or http(s)://host:port"),
        ));
    }
    match uri.port_u16() {
        Some(0) => return Err(Error::invalid("address", format!("port 0 in {address:?}"))),
        None if !address.contains("://") => {
            return Err(Error::invalid(
                "address",
                format!("no port in {address:?}; expected host:port"),
            ))
        }
        _ => {}
    }
    if uri.path() != "/" && !uri.path().is_empty() || uri.query().is_some() {
        return Err(Error::invalid(
            "address",
            format!("{address:?} has a path or query; give only scheme, host and port"),
        ));
    }
    if tls.is_some() && !https {
        return Err(Error::invalid(
            "address",
            format!("{address:?} is plaintext http:// but TLS settings were given; use https:// (or a bare host:port)"),
        ));
    }
    let endpoint = Endpoint::from_shared(url).map_err(|e| {
        Error::invalid(
            "address",
            format!("cannot use {address:?} as an endpoint: {e}"),
        )
    })?;
    let endpoint = if https {
        secure(endpoint, tls, address)?
    } else {
        endpoint
    };
    Ok(endpoint.tcp_nodelay(true))
}

/// Applies the builder's TLS settings to an endpoint the user configured
/// (`ClientBuilder::endpoint`): it must be `https://`; the settings replace
/// whatever TLS configuration it had.
pub(crate) fn secure_user_endpoint(endpoint: Endpoint, tls: &TlsSettings) -> Result<Endpoint> {
    let uri = endpoint.uri().to_string();
    if endpoint.uri().scheme_str() != Some("https") {
        return Err(Error::invalid(
            "endpoint",
            format!(
                "{uri:?} is not https:// but TLS settings were given; use an https:// endpoint"
            ),
        ));
    }
    secure(endpoint, Some(tls), &uri)
}

/// An endpoint the user configured, without TLS settings on the builder:
/// without the `tls` feature an `https://` one cannot work (it would speak
/// plaintext to a TLS port), so say so now.
pub(crate) fn check_user_endpoint(endpoint: &Endpoint) -> Result<()> {
    if cfg!(not(feature = "tls")) && endpoint.uri().scheme_str() == Some("https") {
        return Err(Error::invalid(
            "endpoint",
            format!("{} is https:// but quorum-quest-client was built without its `tls` feature (a default feature)", endpoint.uri()),
        ));
    }
    Ok(())
}

#[cfg(feature = "tls")]
fn secure(endpoint: Endpoint, tls: Option<&TlsSettings>, address: &str) -> Result<Endpoint> {
    let config = match tls {
        Some(tls) => tls.client_config()?,
        None => ClientTlsConfig::new().with_webpki_roots(),
    };
    endpoint
        .tls_config(config)
        .map_err(|e| Error::invalid("tls", format!("TLS setup for {address:?}: {}", chain(&e))))
}

#[cfg(not(feature = "tls"))]
fn secure(_: Endpoint, tls: Option<&TlsSettings>, address: &str) -> Result<Endpoint> {
    if let Some(tls) = tls {
        match *tls {}
    }
    Err(Error::invalid(
        "address",
        format!("{address:?} is https:// but quorum-quest-client was built without its `tls` feature (a default feature); enable it, or use a plaintext http:// address"),
    ))
}

/// An error and its sources, joined with `": "`.
#[cfg(feature = "tls")]
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut level = e.source();
    while let Some(s) = level {
        out.push_str(": ");
        out.push_str(&s.to_string());
        level = s.source();
    }
    out
}

/// TLS settings given on the builder (`ClientBuilder::tls`,
/// `ca_certificate`, `identity`, `tls_domain`). Certificates and keys are
/// kept as PEM and checked in `build()`; the private key never appears in
/// `Debug` output.
#[cfg(feature = "tls")]
#[derive(Clone, Default)]
pub(crate) struct TlsSettings {
    pub(crate) config: Option<ClientTlsConfig>,
    pub(crate) ca_certificates: Vec<Vec<u8>>,
    pub(crate) identity: Option<(Vec<u8>, Vec<u8>)>,
    pub(crate) domain: Option<String>,
}

/// Without the `tls` feature there are no TLS settings.
#[cfg(not(feature = "tls"))]
#[derive(Clone, Debug)]
pub(crate) enum TlsSettings {}

#[cfg(feature = "tls")]
impl std::fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSettings")
            .field("config", &self.config.as_ref().map(|_| "ClientTlsConfig"))
            .field("ca_certificates", &self.ca_certificates.len())
            .field("identity", &self.identity.as_ref().map(|_| "<redacted>"))
            .field("domain", &self.domain)
            .finish()
    }
}

#[cfg(feature = "tls")]
impl TlsSettings {
    /// The tonic configuration: the user's `ClientTlsConfig` (used as
    /// given) or, without one, the public web PKI roots unless CA
    /// certificates were given (then only those are trusted); then the CA
    /// certificates, identity and domain on top. Bad PEM is
    /// [`Error::InvalidParameter`] naming the knob.
    pub(crate) fn client_config(&self) -> Result<ClientTlsConfig> {
        use tonic::transport::{Certificate, Identity};
        let mut config = match &self.config {
            Some(config) => config.clone(),
            None if self.ca_certificates.is_empty() => ClientTlsConfig::new().with_webpki_roots(),
            None => ClientTlsConfig::new(),
        };
        for pem in &self.ca_certificates {
            check_certificates("ca_certificate", pem)?;
            config = config.ca_certificate(Certificate::from_pem(pem));
        }
        if let Some((cert, key)) = &self.identity {
            check_certificates("identity", cert)?;
            check_key(key)?;
            config = config.identity(Identity::from_pem(cert, key));
        }
        if let Some(domain) = &self.domain {
            rustls::pki_types::ServerName::try_from(domain.as_str()).map_err(|e| {
                Error::invalid(
                    "tls_domain",
                    format!("{domain:?} is not a valid DNS name or IP address ({e})"),
                )
            })?;
            config = config.domain_name(domain.clone());
        }
        Ok(config)
    }
}

/// At least one PEM certificate, and nothing unreadable.
#[cfg(feature = "tls")]
fn check_certificates(param: &str, pem: &[u8]) -> Result<()> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let mut found = 0;
    for cert in CertificateDer::pem_slice_iter(pem) {
        cert.map_err(|e| Error::invalid(param, format!("unreadable PEM certificate ({e})")))?;
        found += 1;
    }
    if found == 0 {
        return Err(Error::invalid(
            param,
            "no PEM certificate found (expected -----BEGIN CERTIFICATE-----)",
        ));
    }
    Ok(())
}

/// One PEM private key (PKCS#8, PKCS#1 or SEC1). The error never quotes it.
#[cfg(feature = "tls")]
fn check_key(pem: &[u8]) -> Result<()> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::PrivateKeyDer;
    PrivateKeyDer::from_pem_slice(pem).map(|_| ()).map_err(|_| {
        Error::invalid(
            "identity",
            "no readable PEM private key found (expected -----BEGIN PRIVATE KEY-----, RSA PRIVATE KEY or EC PRIVATE KEY)",
        )
    })
}

/// Metadata sent with every call of a client: fixed entries
/// (`ClientBuilder::metadata`, `bearer_token`) and an optional interceptor
/// that may add or change entries per call (a token that rotates). Shared
/// by `for_scope` clients. Values never appear in `Debug` output.
#[derive(Clone, Default)]
pub(crate) struct CallMetadata {
    entries: Vec<(AsciiMetadataKey, AsciiMetadataValue)>,
    interceptor: Option<Arc<Mutex<Box<dyn Interceptor + Send>>>>,
}

impl std::fmt::Debug for CallMetadata {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallMetadata")
            .field(
                "keys",
                &self
                    .entries
                    .iter()
                    .map(|(k, _)| k.as_str())
                    .collect::<Vec<_>>(),
            )
            .field("interceptor", &self.interceptor.is_some())
            .finish()
    }
}

/// Headers a user may not set: gRPC's own and HTTP/2's.
const RESERVED_KEYS: [&str; 4] = ["te", "content-type", "user-agent", "host"];

impl CallMetadata {
    /// Adds `key: value`, replacing an entry of the same key. Keys are
    /// lower-cased ASCII header names, not `grpc-*` or reserved, not
    /// `*-bin`; values are visible ASCII. `sensitive` values are marked so
    /// that HTTP/2 never indexes them (HPACK) and `Debug` hides them.
    pub(crate) fn insert(&mut self, key: &str, value: &str, sensitive: bool) -> Result<()> {
        let param = if sensitive {
            "bearer_token"
        } else {
            "metadata"
        };
        let lower = key.to_ascii_lowercase();
        if lower.starts_with("grpc-") || RESERVED_KEYS.contains(&lower.as_str()) {
            return Err(Error::invalid(
                param,
                format!("key {key:?} is reserved by gRPC/HTTP/2"),
            ));
        }
        let name: AsciiMetadataKey = lower.parse().map_err(|_| {
            Error::invalid(
                param,
                format!("key {key:?} is not a valid ASCII header name (letters, digits, - _ .; binary *-bin keys are not supported)"),
            )
        })?;
        let mut val: AsciiMetadataValue = value.parse().map_err(|_| {
            // Never quote the value (it is often a secret): say where it
            // goes wrong instead.
            let at = value
                .char_indices()
                .find(|(_, c)| !(c.is_ascii_graphic() || *c == ' ' || *c == '\t'))
                .map_or(String::new(), |(i, c)| {
                    format!(" ({} at byte {i})", if c.is_ascii_control() { "a control character" } else { "a non-ASCII character" })
                });
            Error::invalid(
                param,
                format!("the value for key {key:?} is not visible ASCII{at}: no control characters or line breaks (values are never quoted)"),
            )
        })?;
        // Credentials given as plain metadata get the same protection as
        // `bearer_token` (never indexed by HPACK).
        let secret_key = matches!(
            lower.as_str(),
            "authorization" | "proxy-authorization" | "cookie"
        );
        val.set_sensitive(sensitive || secret_key);
        self.entries.retain(|(k, _)| *k != name);
        self.entries.push((name, val));
        Ok(())
    }

    /// Sets the interceptor (replacing an earlier one).
    pub(crate) fn set_interceptor(&mut self, interceptor: Box<dyn Interceptor + Send>) {
        self.interceptor = Some(Arc::new(Mutex::new(interceptor)));
    }

    /// `self`'s entries and interceptor, then `other`'s on top (same keys
    /// replaced; `other`'s interceptor, if it has one, replaces `self`'s).
    pub(crate) fn merged(&self, other: &CallMetadata) -> CallMetadata {
        let mut out = self.clone();
        for (k, v) in &other.entries {
            out.entries.retain(|(key, _)| key != k);
            out.entries.push((k.clone(), v.clone()));
        }
        if other.interceptor.is_some() {
            out.interceptor.clone_from(&other.interceptor);
        }
        out
    }

    /// Puts the entries on `request`, then runs the interceptor. An
    /// interceptor's error is the call's result: the request is not sent.
    pub(crate) fn apply<T>(&self, request: Request<T>) -> std::result::Result<Request<T>, Status> {
        let mut request = request;
        for (k, v) in &self.entries {
            request.metadata_mut().insert(k.clone(), v.clone());
        }
        let Some(interceptor) = &self.interceptor else {
            return Ok(request);
        };
        let (metadata, extensions, message) = request.into_parts();
        let bare = Request::from_parts(metadata, extensions, ());
        let bare = crate::sync::lock(interceptor).call(bare)?;
        let (metadata, extensions, ()) = bare.into_parts();
        Ok(Request::from_parts(metadata, extensions, message))
    }
}

/// [`Error::Connection`] for a failed dial, with what the library knows
/// added (the address and the time limit) so that its message can name them.
///
/// The documented API fixes that variant as
/// `Connection(tonic::transport::Error)`, and tonic has no public
/// constructor for its error: the one way to add context is to let tonic
/// wrap it, by dialing through a connector that fails at once with the
/// context (which holds the original error as its source). Nothing is
/// spawned and no socket is opened.
pub(crate) async fn connection_error(
    err: tonic::transport::Error,
    address: &str,
    limit: Duration,
) -> Error {
    let failed = crate::error::DialFailed {
        address: address.to_string(),
        limit,
        source: Some(err),
    };
    let slot = Arc::new(Mutex::new(Some(failed)));
    let taken = Arc::clone(&slot);
    let connector = tower::service_fn(move |_: http::Uri| {
        let failed = crate::sync::lock(&taken).take();
        async move {
            Err::<hyper_util::rt::TokioIo<tokio::net::TcpStream>, _>(failed.unwrap_or(
                crate::error::DialFailed {
                    address: String::new(),
                    limit,
                    source: None,
                },
            ))
        }
    });
    match Endpoint::from_static("http://dial.invalid")
        .connect_with_connector(connector)
        .await
    {
        Err(wrapped) => Error::Connection(wrapped),
        // Cannot happen (the connector never succeeds); still a clear error.
        Ok(_) => match crate::sync::lock(&slot).take().and_then(|f| f.source) {
            Some(original) => Error::Connection(original),
            None => Error::Rpc(Status::unavailable(format!(
                "could not connect to the Quorum Quest server at {address}"
            ))),
        },
    }
}

/// Shortest keep-alive ping interval (and ping timeout).
const MIN_PING_INTERVAL: Duration = Duration::from_secs(1);
/// Longest keep-alive ping interval (and ping timeout).
const MAX_PING_INTERVAL: Duration = Duration::from_secs(10);

/// HTTP/2 keep-alive for an endpoint the library builds (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct KeepAlive {
    /// Silence on a connection with an open call before a PING is sent.
    pub(crate) interval: Duration,
    /// How long a PING may go unanswered before the connection is closed.
    pub(crate) timeout: Duration,
}

impl KeepAlive {
    /// `clamp(max(ttl / 10, rpc_timeout / 3), 1 s, 10 s)` for both: a dead
    /// connection is noticed within a quarter of the TTL (default timing,
    /// TTL of 10 s or more), and a
    /// call that is merely slow sends at most three pings before it times
    /// out, fewer than grpc-go's enforcement punishes.
    pub(crate) fn for_timing(ttl: Duration, timing: &Timing) -> Self {
        // A third of the call timeout, rounded up to the nanosecond.
        let third = timing.rpc_timeout.saturating_add(Duration::from_nanos(2)) / 3;
        let interval = (ttl / 10)
            .max(third)
            .clamp(MIN_PING_INTERVAL, MAX_PING_INTERVAL);
        KeepAlive {
            interval,
            timeout: interval,
        }
    }

    fn apply(self, endpoint: Endpoint) -> Endpoint {
        endpoint
            .http2_keep_alive_interval(self.interval)
            .keep_alive_timeout(self.timeout)
            .keep_alive_while_idle(false)
    }
}

/// How a [`Transport`] dials its endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Dialing {
    /// Bounds a whole eager connect (TLS included), and every TCP connect;
    /// used only when the endpoint has no connect timeout of its own.
    pub(crate) connect_timeout: Duration,
    /// The shortest spacing between two redials after timed-out calls.
    pub(crate) redial_after: Duration,
    /// Keep-alive to configure; `None` leaves the endpoint's own settings.
    pub(crate) keep_alive: Option<KeepAlive>,
}

impl Dialing {
    /// For an endpoint the library builds: redial at most once per call
    /// timeout, keep-alive derived from the timing.
    pub(crate) fn for_timing(ttl: Duration, timing: &Timing, connect_timeout: Duration) -> Self {
        Dialing {
            connect_timeout,
            redial_after: timing.rpc_timeout,
            keep_alive: Some(KeepAlive::for_timing(ttl, timing)),
        }
    }

    /// The same, for an endpoint the user configured: the library adds no
    /// keep-alive to it.
    pub(crate) fn for_user_endpoint(self) -> Self {
        Dialing {
            keep_alive: None,
            ..self
        }
    }
}

/// Whether a call that failed with `status` timed out: it ended with
/// `CANCELLED` (tonic's own request timeout: "Timeout expired") or
/// `DEADLINE_EXCEEDED`, at or after its `budget` from `started` ran out.
/// A call cancelled or refused earlier is not a timeout.
pub(crate) fn is_timeout(
    status: &Status,
    started: Instant,
    budget: Duration,
    now: Instant,
) -> bool {
    matches!(status.code(), Code::Cancelled | Code::DeadlineExceeded)
        && now.saturating_duration_since(started) >= budget
}

/// Whether `status` says the call's channel is closed for good: its worker
/// task is gone (the runtime it was dialed on shut down), so every call on
/// it fails at once with this, and none times out. tonic's generated client
/// reports a failed `ready()` so; a channel dialed lazily (as every one we
/// dial: redials are lazy) fails `ready()` only then, connection failures
/// surfacing from the call itself.
pub(crate) fn is_closed_channel(status: &Status) -> bool {
    status.code() == Code::Unknown && status.message().starts_with("Service was not ready")
}

/// Whether `channel`'s worker task is gone (the runtime it was dialed on
/// shut down): its queue then refuses every request at once. Asked without
/// waiting (a full queue is open); the probe's reservation, if any, goes
/// with it.
fn channel_is_closed(channel: &Channel) -> bool {
    let mut probe = channel.clone();
    let mut cx = std::task::Context::from_waker(futures::task::noop_waker_ref());
    matches!(
        tower::Service::<http::Request<tonic::body::Body>>::poll_ready(&mut probe, &mut cx),
        std::task::Poll::Ready(Err(_))
    )
}

/// Replaces `cur`'s connection with a fresh lazy one on `endpoint` (its
/// worker task spawned on the current runtime), dropping the stubs kept on
/// the old one.
fn redial(cur: &mut Current, endpoint: &Endpoint, now: Instant) {
    cur.channel = endpoint.connect_lazy();
    cur.spare.clear();
    cur.dialed_at = now;
    cur.generation = cur.generation.wrapping_add(1);
    cur.last_answer = None;
}

/// Numbers the channels users hand us, to name them in the identity registry.
static CHANNELS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The generated client on a [`Channel`].
pub(crate) type Stub =
    crate::proto::leader_election_service_client::LeaderElectionServiceClient<Channel>;

/// One shared connection to the server.
#[derive(Debug)]
pub(crate) struct Transport {
    /// The endpoint to redial; `None` for a channel the user handed us.
    endpoint: Option<Endpoint>,
    redial_after: Duration,
    current: Mutex<Current>,
    /// What names this connection in the identity registry: the endpoint's
    /// URI, or a number of its own for a channel the user handed us.
    /// Shared with every client's claim on this connection.
    name: Arc<str>,
    /// The cap on calls in flight and the queue of the others
    /// ([`crate::admission`]).
    admission: Arc<Admission>,
    /// The tasks that campaign for, and keep the step-down timers of, the
    /// elections on this connection: one per runtime using it (started on
    /// first use there), so that a campaign runs on the runtime that
    /// started it, not on another one that may sit idle.
    driver: Mutex<Vec<crate::election::DriverHandle>>,
}

#[derive(Debug)]
struct Current {
    channel: Channel,
    /// Stubs on `channel` that finished a call, for the next calls to
    /// reuse ([`Transport::stub`]): a fresh copy of the channel costs two
    /// allocations (its queue handle and that handle's reservation) on
    /// every call. At most the cap on calls in flight are kept.
    spare: Vec<Stub>,
    dialed_at: Instant,
    /// Counts the connections dialed, so that an answer is credited to the
    /// connection that carried it.
    generation: u64,
    /// When a call on this connection last got an answer: evidence that it
    /// is alive.
    last_answer: Option<Instant>,
}

impl Transport {
    /// A transport that owns `endpoint` and redials it: connected on first
    /// use if `lazy`, else now, within the connect timeout (the endpoint's
    /// own if it has one, else `dialing.connect_timeout`), TLS included.
    ///
    /// Fails with [`Error::Connection`] when the connection is refused or
    /// TLS fails, and [`Error::ConnectTimeout`] when the connect does not
    /// complete in time.
    pub(crate) async fn open(endpoint: Endpoint, dialing: Dialing, lazy: bool) -> Result<Self> {
        let limit = endpoint
            .get_connect_timeout()
            .unwrap_or(dialing.connect_timeout);
        let endpoint = endpoint.connect_timeout(limit);
        let endpoint = match dialing.keep_alive {
            Some(keep_alive) => keep_alive.apply(endpoint),
            None => endpoint,
        };
        let channel = if lazy {
            endpoint.connect_lazy()
        } else {
            match tokio::time::timeout(limit, endpoint.connect()).await {
                Ok(Ok(channel)) => channel,
                Ok(Err(err)) => {
                    let address = endpoint.uri().to_string();
                    let err = connection_error(err, &address, limit).await;
                    tracing::debug!(%err, "connect failed");
                    return Err(err);
                }
                Err(_) => {
                    tracing::debug!(uri = %endpoint.uri(), ?limit, "connect timed out");
                    return Err(Error::ConnectTimeout(limit));
                }
            }
        };
        Ok(Self::with_channel(
            Some(endpoint),
            channel,
            dialing.redial_after,
        ))
    }

    /// Uses a channel built by the caller (never redialed).
    pub(crate) fn from_channel(channel: Channel) -> Self {
        Self::with_channel(None, channel, Duration::MAX)
    }

    fn with_channel(endpoint: Option<Endpoint>, channel: Channel, redial_after: Duration) -> Self {
        let endpoint_name = endpoint.as_ref().map(|e| e.uri().to_string());
        Transport {
            endpoint,
            redial_after,
            current: Mutex::new(Current {
                channel,
                spare: Vec::new(),
                dialed_at: Instant::now(),
                generation: 0,
                last_answer: None,
            }),
            name: match &endpoint_name {
                Some(uri) => uri.as_str().into(),
                None => format!(
                    "channel-{}",
                    CHANNELS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                )
                .into(),
            },
            admission: Admission::new(DEFAULT_MAX_CONCURRENT_CALLS),
            driver: Mutex::new(Vec::new()),
        }
    }

    /// This connection's driver on the current runtime, started if none
    /// runs there (first use, or that runtime was restarted); `None` outside
    /// a runtime.
    pub(crate) fn driver(&self) -> Option<crate::election::DriverHandle> {
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        let here = runtime.id();
        let mut drivers = crate::sync::lock(&self.driver);
        // Drivers of runtimes that shut down are gone.
        drivers.retain(|d| d.is_alive());
        if let Some(driver) = drivers.iter().find(|d| d.runtime() == here) {
            return Some(driver.clone());
        }
        let driver =
            crate::election::DriverHandle::spawn(&runtime, self.admission.cap().saturating_mul(2));
        drivers.push(driver.clone());
        Some(driver)
    }

    /// A live driver of this connection, on whichever runtime, without
    /// starting one (what a dying driver hands its step-down timers to).
    pub(crate) fn live_driver(&self) -> Option<crate::election::DriverHandle> {
        crate::sync::lock(&self.driver)
            .iter()
            .find(|d| d.is_alive())
            .cloned()
    }

    /// Lets at most `cap` calls be in flight on this connection at once.
    pub(crate) fn with_max_concurrent_calls(mut self, cap: usize) -> Self {
        self.admission = Admission::new(cap);
        self
    }

    /// The admission queue every call on this connection goes through.
    pub(crate) fn admission(&self) -> &Arc<Admission> {
        &self.admission
    }

    /// What names this connection in the identity registry
    /// ([`crate::identity`]).
    pub(crate) fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// The address this transport dials, for error messages; `None` for a
    /// channel the user handed us.
    pub(crate) fn address(&self) -> Option<String> {
        self.endpoint.as_ref().map(|e| e.uri().to_string())
    }

    /// Which connection the next call goes out on.
    #[cfg(test)]
    fn generation(&self) -> u64 {
        self.lock().generation
    }

    #[cfg(test)]
    fn spare(&self) -> usize {
        self.lock().spare.len()
    }

    /// A stub to issue the next call on (one a finished call gave back, or
    /// a fresh one on the current connection), and which connection it is
    /// (for [`answered`](Self::answered),
    /// [`call_timed_out`](Self::call_timed_out) and
    /// [`give_back`](Self::give_back)).
    pub(crate) fn stub(&self) -> (Stub, u64) {
        let mut cur = self.lock();
        let stub = match cur.spare.pop() {
            Some(stub) => stub,
            None => Stub::new(cur.channel.clone()),
        };
        (stub, cur.generation)
    }

    /// Keeps `stub`, whose call finished, for a later call: unless its
    /// connection was replaced since, or enough are kept already.
    pub(crate) fn give_back(&self, stub: Stub, generation: u64) {
        let mut cur = self.lock();
        if cur.generation == generation && cur.spare.len() < self.admission.cap() {
            cur.spare.push(stub);
        }
    }

    /// A call on connection `generation` got its answer: the connection is
    /// alive.
    pub(crate) fn answered(&self, generation: u64) {
        let mut cur = self.lock();
        if cur.generation == generation {
            cur.last_answer = Some(Instant::now());
        }
    }

    /// A call sent at `sent_at` on connection `generation` timed out: dial a
    /// fresh connection for the next call, unless the connection shows it is
    /// alive (it answered another call since this one was sent, within the
    /// last quarter of the call timeout: the server is slow, not the
    /// connection dead), it was already replaced, or it was dialed recently.
    ///
    /// A call whose `budget` was under a quarter of `redial_after` (cut
    /// short by its wait for a call slot, or by a lease's deadline) says
    /// nothing either way: the window in which an answer could show the
    /// connection alive was too short to judge it.
    pub(crate) fn call_timed_out(&self, generation: u64, sent_at: Instant, budget: Duration) {
        let Some(endpoint) = &self.endpoint else {
            return;
        };
        if budget < self.redial_after / 4 {
            tracing::debug!(
                ?budget,
                "a call with a short budget timed out: no evidence about the connection"
            );
            return;
        }
        let mut cur = self.lock();
        if cur.generation != generation {
            return;
        }
        let now = Instant::now();
        let recent = now
            .checked_sub(self.redial_after / 4)
            .map_or(sent_at, |t| t.max(sent_at));
        if cur.last_answer.is_some_and(|at| at >= recent) {
            tracing::debug!(
                "call timed out on a connection that answers other calls: not redialing"
            );
            return;
        }
        if now.saturating_duration_since(cur.dialed_at) >= self.redial_after {
            tracing::debug!("call timed out: dialing a fresh connection for the next call");
            redial(&mut cur, endpoint, now);
        }
    }

    /// A call on connection `generation` found its channel closed for good
    /// ([`is_closed_channel`]: its worker task died with the runtime it was
    /// dialed on): dial a fresh one now, on the current runtime, whatever
    /// the spacing of redials (every call on the closed one fails at once,
    /// none times out). Nothing for a channel the user handed us.
    pub(crate) fn channel_closed(&self, generation: u64) {
        let Some(endpoint) = &self.endpoint else {
            return;
        };
        let mut cur = self.lock();
        if cur.generation != generation {
            return;
        }
        // The same words may come from the server (a gRPC proxy built on
        // tonic whose own upstream is down): then the channel still works,
        // and redialing per answer would open a connection each time.
        if !channel_is_closed(&cur.channel) {
            tracing::debug!(
                "'Service was not ready' came from a channel still open: not redialing"
            );
            return;
        }
        tracing::debug!("the connection's channel is closed (its runtime shut down): redialing");
        redial(&mut cur, endpoint, Instant::now());
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Current> {
        crate::sync::lock(&self.current)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(a: &str) -> String {
        match parse_address(a) {
            Err(Error::InvalidParameter(m)) => m,
            other => panic!("{a:?}: expected InvalidParameter, got {other:?}"),
        }
    }

    const SEC: Duration = Duration::from_secs(1);

    #[test]
    fn a_call_that_ends_cancelled_or_past_deadline_after_its_budget_is_a_timeout() {
        let started = Instant::now();
        let budget = 2 * SEC;
        let late = started + budget;
        // tonic's own request timeout ("Timeout expired") and a server-side
        // deadline, both at or after the budget ran out.
        for status in [
            Status::cancelled("Timeout expired"),
            Status::deadline_exceeded("deadline exceeded"),
        ] {
            assert!(is_timeout(&status, started, budget, late), "{status:?}");
            assert!(
                is_timeout(&status, started, budget, late + SEC),
                "{status:?}"
            );
            // Before the budget ran out it is something else (a cancelled
            // stream, a server that gave up early).
            assert!(
                !is_timeout(&status, started, budget, late - Duration::from_millis(1)),
                "{status:?}"
            );
            assert!(!is_timeout(&status, started, budget, started), "{status:?}");
        }
        // Other codes are never timeouts, however late.
        for status in [
            Status::unavailable("connection reset"),
            Status::unknown("h2 protocol error"),
            Status::internal("boom"),
            Status::invalid_argument("bad"),
        ] {
            assert!(
                !is_timeout(&status, started, budget, late + SEC),
                "{status:?}"
            );
        }
        // A clock read before `started` (never in practice) is not a timeout.
        assert!(!is_timeout(
            &Status::cancelled("Timeout expired"),
            late,
            budget,
            started
        ));
    }

    #[test]
    fn keep_alive_notices_a_dead_connection_within_a_quarter_of_the_ttl_and_pings_a_slow_call_at_most_three_times(
    ) {
        let ka = |ttl_secs: u64| {
            let ttl = Duration::from_secs(ttl_secs);
            KeepAlive::for_timing(ttl, &Timing::for_ttl(ttl))
        };
        // Default timing: ttl / 10 when that is over rpc_timeout / 3.
        assert_eq!(ka(15).interval, Duration::from_nanos(1_666_666_667)); // 5 s / 3
        assert_eq!(ka(30).interval, 3 * SEC);
        assert_eq!(ka(60).interval, 6 * SEC);
        // Clamped to 1 s ..= 10 s.
        assert_eq!(ka(1).interval, SEC);
        assert_eq!(ka(5).interval, SEC);
        assert_eq!(ka(600).interval, 10 * SEC);
        for ttl_secs in [1, 2, 3, 5, 10, 15, 20, 30, 45, 60, 100, 600, 3600] {
            let ttl = Duration::from_secs(ttl_secs);
            let timing = Timing::for_ttl(ttl);
            let k = KeepAlive::for_timing(ttl, &timing);
            assert_eq!(k.timeout, k.interval, "ttl {ttl_secs}");
            assert!(
                (MIN_PING_INTERVAL..=MAX_PING_INTERVAL).contains(&k.interval),
                "ttl {ttl_secs}"
            );
            // A dead connection under an open call is noticed well within
            // one lease (ttl >= 5 s; shorter TTLs hit the 1 s floor).
            if ttl_secs >= 10 {
                assert!(k.interval + k.timeout <= ttl / 4, "ttl {ttl_secs}: {k:?}");
            }
            // A slow call sends a ping at its start and one per interval: the
            // fourth (grpc-go's third strike) would come after it timed out.
            assert!(
                3 * k.interval >= timing.rpc_timeout,
                "ttl {ttl_secs}: {k:?}"
            );
        }
        // A long user rpc_timeout widens the interval, up to 10 s.
        let mut slow = Timing::for_ttl(15 * SEC);
        slow.rpc_timeout = 12 * SEC;
        assert_eq!(KeepAlive::for_timing(15 * SEC, &slow).interval, 4 * SEC);
    }

    #[tokio::test(start_paused = true)]
    async fn a_timed_out_call_redials_only_without_evidence_that_the_connection_lives() {
        let endpoint = parse_address("http://127.0.0.1:1").unwrap();
        let dialing = Dialing {
            connect_timeout: SEC,
            redial_after: 4 * SEC,
            keep_alive: None,
        };
        let t = Transport::open(endpoint, dialing, true).await.unwrap();
        tokio::time::advance(5 * SEC).await;
        let first = t.generation();
        let sent = Instant::now();
        tokio::time::advance(4 * SEC).await;
        // Another call was answered just now: the connection lives.
        t.answered(first);
        t.call_timed_out(first, sent, 4 * SEC);
        assert_eq!(
            t.generation(),
            first,
            "a slow server is not a dead connection"
        );
        // That answer is now more than a quarter of the timeout old.
        tokio::time::advance(2 * SEC).await;
        t.call_timed_out(first, sent, 4 * SEC);
        let second = t.generation();
        assert_ne!(second, first, "silent for too long: redialed");
        // A time-out on the connection already replaced changes nothing, and
        // neither does one within `redial_after` of the redial.
        t.call_timed_out(first, Instant::now(), 4 * SEC);
        t.call_timed_out(second, Instant::now(), 4 * SEC);
        assert_eq!(t.generation(), second);
        // An answer from before the call was sent is no evidence.
        tokio::time::advance(5 * SEC).await;
        t.answered(second);
        tokio::time::advance(ms(1)).await;
        let sent = Instant::now();
        t.call_timed_out(second, sent, 4 * SEC);
        let third = t.generation();
        assert_ne!(third, second);
        // A call given under a quarter of the timeout (cut short by the
        // queue) is no evidence of a dead connection.
        tokio::time::advance(5 * SEC).await;
        let sent = Instant::now();
        tokio::time::advance(ms(900)).await;
        t.call_timed_out(third, sent, ms(900));
        assert_eq!(t.generation(), third, "too short a call to judge");
        t.call_timed_out(third, sent, SEC);
        assert_ne!(t.generation(), third);
    }

    #[tokio::test(start_paused = true)]
    async fn a_finished_calls_stub_is_reused_on_its_connection_only_and_at_most_cap_are_kept() {
        let endpoint = parse_address("http://127.0.0.1:1").unwrap();
        let dialing = Dialing {
            connect_timeout: SEC,
            redial_after: 4 * SEC,
            keep_alive: None,
        };
        let t = Transport::open(endpoint, dialing, true)
            .await
            .unwrap()
            .with_max_concurrent_calls(2);
        let (a, first) = t.stub();
        let (b, _) = t.stub();
        let (c, _) = t.stub();
        t.give_back(a, first);
        t.give_back(b, first);
        t.give_back(c, first);
        assert_eq!(t.spare(), 2, "no more kept than calls can be in flight");
        let (a, _) = t.stub();
        assert_eq!(
            t.spare(),
            1,
            "a kept stub is taken before a new one is made"
        );
        // The connection is replaced: what was kept on the old one goes, and
        // a stub of the old one coming back is not kept.
        tokio::time::advance(5 * SEC).await;
        t.call_timed_out(first, Instant::now(), 4 * SEC);
        tokio::time::advance(4 * SEC).await;
        assert_ne!(t.generation(), first);
        assert_eq!(t.spare(), 0);
        t.give_back(a, first);
        assert_eq!(t.spare(), 0);
        let (d, second) = t.stub();
        assert_eq!(second, t.generation());
        t.give_back(d, second);
        assert_eq!(t.spare(), 1);
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_user_endpoint_gets_no_keep_alive_of_ours() {
        let d = Dialing::for_timing(15 * SEC, &Timing::for_ttl(15 * SEC), 5 * SEC);
        assert!(d.keep_alive.is_some());
        assert_eq!(d.redial_after, 5 * SEC);
        let user = d.for_user_endpoint();
        assert_eq!(user.keep_alive, None);
        assert_eq!(user.connect_timeout, d.connect_timeout);
        assert_eq!(user.redial_after, d.redial_after);
    }

    #[cfg(feature = "tls")]
    #[test]
    fn tls_settings_make_a_bare_address_https_and_refuse_a_plaintext_one() {
        let tls = TlsSettings::default();
        let e = endpoint_for("localhost:5050", Some(&tls)).unwrap();
        assert_eq!(e.uri().scheme_str(), Some("https"));
        assert!(endpoint_for("https://localhost:5050", Some(&tls)).is_ok());
        match endpoint_for("http://localhost:5050", Some(&tls)) {
            Err(Error::InvalidParameter(m)) => assert!(m.contains("plaintext"), "{m}"),
            other => panic!("{other:?}"),
        }
        // Without settings: https uses the public roots, the rest plaintext.
        assert!(parse_address("https://example.com").is_ok());
        assert_eq!(
            parse_address("localhost:5050").unwrap().uri().scheme_str(),
            Some("http")
        );
    }

    #[cfg(not(feature = "tls"))]
    #[test]
    fn without_the_tls_feature_https_names_the_feature() {
        let m = err("https://example.com:443");
        assert!(m.contains("`tls` feature"), "{m}");
    }

    #[test]
    fn metadata_values_stay_out_of_debug_and_bad_keys_are_named() {
        let mut md = CallMetadata::default();
        md.insert("authorization", "Bearer hunter2", true).unwrap();
        md.insert("X-Tenant", "blue", false).unwrap();
        let shown = format!("{md:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("blue"),
            "{shown}"
        );
        assert!(shown.contains("x-tenant"), "{shown}");
        for key in ["grpc-timeout", "TE", "content-type", "a b", "x-bin", ""] {
            match md.insert(key, "v", false) {
                Err(Error::InvalidParameter(m)) => assert!(m.starts_with("metadata:"), "{m}"),
                other => panic!("{key:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn accepts_urls_and_bare_host_port() {
        for a in [
            "http://localhost:5050",
            "localhost:5050",
            "127.0.0.1:5050",
            "[::1]:5050",
            "http://localhost",
            " http://localhost:5050/ ",
        ] {
            assert!(parse_address(a).is_ok(), "{a}");
        }
        assert_eq!(
            parse_address("localhost:5050").unwrap().uri().to_string(),
            "http://localhost:5050/"
        );
    }

    #[test]
    fn rejects_bad_addresses_naming_the_parameter() {
        for a in [
            "",
            "   ",
            "localhost",
            "ftp://localhost:21",
            "http://",
            "localhost:0",
            "local host:5050",
            "localhost:99999",
            "http://localhost:5050/path",
        ] {
            assert!(err(a).starts_with("address:"), "{a}: {}", err(a));
        }
    }
}
