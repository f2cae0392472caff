//! The crate's error type.
//!
//! Four variants come from the documented API (`Connection`, `Rpc`,
//! `KeepAliveAlreadyRunning`, `InvalidParameter`); the enum is
//! `#[non_exhaustive]` so that more can be added without a breaking change,
//! as `ConnectTimeout` was (tonic's transport error cannot be made for a
//! timeout the library measures itself).

/// Everything that can go wrong in this crate.
///
/// ```
/// use quorum_quest_client::Error;
///
/// let err = Error::InvalidParameter("service: must not be empty".into());
/// assert!(err.to_string().contains("service"));
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The connection to the server could not be established (unreachable host,
    /// refused connection, TLS failure). A connect that runs out of time is
    /// [`Error::ConnectTimeout`].
    ///
    /// The message names the address and the root cause found along the
    /// error's [`source`](std::error::Error::source) chain, for example
    /// `could not connect to the Quorum Quest server at https://10.0.0.7:5050/:
    /// certificate not trusted: unknown issuer ...`; the chain itself is
    /// kept for code that wants to inspect it.
    #[error("{}", describe_connection(.0))]
    Connection(#[source] tonic::transport::Error),

    /// The connection to the server was not established within the connect
    /// timeout (TCP connect, TLS handshake and HTTP/2 setup together), for
    /// example because the host does not answer, or because an `https://`
    /// address leads to a server that does not speak TLS.
    ///
    /// ```
    /// use std::time::Duration;
    /// use quorum_quest_client::Error;
    ///
    /// let err = Error::ConnectTimeout(Duration::from_secs(5));
    /// assert!(err.to_string().contains("within 5s"));
    /// ```
    #[error("could not connect to the Quorum Quest server within {0:?} (check the address, that the server is running, and that an https:// address leads to a TLS endpoint)")]
    ConnectTimeout(std::time::Duration),

    /// The server (or the transport under a call) answered with a gRPC error,
    /// or the call timed out.
    #[error("Quorum Quest call failed: {code:?}: {message}", code = .0.code(), message = .0.message())]
    Rpc(#[source] tonic::Status),

    /// `start_keep_alive` was called while the keep-alive task is already running.
    #[error("keep-alive is already running (call stop_keep_alive first)")]
    KeepAliveAlreadyRunning,

    /// The call needs a Tokio runtime and none is running on this thread
    /// (build and use the client from inside `#[tokio::main]`, a
    /// `#[tokio::test]`, or a runtime's `block_on`).
    #[error(
        "no Tokio runtime: the Quorum Quest client must be built and used inside a Tokio runtime"
    )]
    NoRuntime,

    /// A parameter was rejected before any network I/O. The message names the
    /// parameter and what is wrong with it.
    #[error("invalid parameter: {0}")]
    InvalidParameter(String),

    /// The client was shut down with
    /// [`shutdown`](crate::QuorumQuestClient::shutdown): it no longer
    /// campaigns, and calls that would acquire the lock fail with this.
    #[error("the Quorum Quest client was shut down")]
    Shutdown,
}

impl Error {
    pub(crate) fn invalid(param: &str, problem: impl std::fmt::Display) -> Self {
        Error::InvalidParameter(format!("{param}: {problem}"))
    }
}

impl From<tonic::Status> for Error {
    fn from(status: tonic::Status) -> Self {
        Error::Rpc(status)
    }
}

impl From<tonic::transport::Error> for Error {
    fn from(err: tonic::transport::Error) -> Self {
        Error::Connection(err)
    }
}

/// Why a dial failed, with what the library knows and tonic's error does not
/// say: the address and the time limit. Put into the source chain of the
/// `tonic::transport::Error` an [`Error::Connection`] carries (see
/// `transport::connection_error`).
#[derive(Debug)]
pub(crate) struct DialFailed {
    pub(crate) address: String,
    pub(crate) limit: std::time::Duration,
    pub(crate) source: Option<tonic::transport::Error>,
}

impl std::fmt::Display for DialFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "connecting to {}", self.address)
    }
}

impl std::error::Error for DialFailed {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_ref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// The message of [`Error::Connection`]: the address (when the library
/// dialed it) and the root cause, in words a user can act on.
fn describe_connection(err: &tonic::transport::Error) -> String {
    let mut address = None;
    let mut limit = None;
    let mut cause = None;
    let mut last = err.to_string();
    let mut level: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = level {
        if let Some(dial) = e.downcast_ref::<DialFailed>() {
            address = Some(dial.address.as_str());
            limit = Some(dial.limit);
        } else {
            last = e.to_string();
        }
        if cause.is_none() {
            cause = explain_level(e, limit);
        }
        level = e.source();
    }
    let cause = cause
        .unwrap_or_else(|| format!("{last} (check the address and that the server is running)"));
    match address {
        Some(address) => {
            format!("could not connect to the Quorum Quest server at {address}: {cause}")
        }
        None => format!("could not connect to the Quorum Quest server: {cause}"),
    }
}

/// The first cause along `e`'s source chain (itself included) that can be
/// named in words a user can act on.
pub(crate) fn named_cause(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut level = Some(e);
    while let Some(e) = level {
        if let Some(found) = explain_level(e, None) {
            return Some(found);
        }
        level = e.source();
    }
    None
}

/// `e` and its sources, joined with `": "` (repeats of the level above
/// skipped).
pub(crate) fn chain_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut level = e.source();
    while let Some(s) = level {
        let text = s.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        level = s.source();
    }
    out
}

/// What one level of a connect error's chain says, if it is a cause we can
/// name. `std::io::Error` hides the error it wraps from `source()` (it
/// returns that error's own source), so a wrapped TLS error is looked at
/// through `get_ref`.
fn explain_level(
    e: &(dyn std::error::Error + 'static),
    limit: Option<std::time::Duration>,
) -> Option<String> {
    if let Some(io) = e.downcast_ref::<std::io::Error>() {
        if let Some(inner) = io.get_ref() {
            if let Some(found) = explain_level(inner, limit) {
                return Some(found);
            }
        }
        return match io.kind() {
            std::io::ErrorKind::ConnectionRefused => Some(
                "connection refused (nothing listens there: check the address and port, and that the server is running)"
                    .to_string(),
            ),
            std::io::ErrorKind::TimedOut => Some(match limit {
                Some(limit) => format!("timed out after {limit:?} (the host does not answer: check the address, firewalls and that the server is running)"),
                None => "timed out (the host does not answer: check the address, firewalls and that the server is running)".to_string(),
            }),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::UnexpectedEof => Some(format!(
                "the peer closed the connection during setup ({io}): is it a gRPC server, and does it expect TLS (https://) or plaintext (http://)?"
            )),
            _ => None,
        };
    }
    #[cfg(feature = "tls")]
    if let Some(tls) = e.downcast_ref::<rustls::Error>() {
        return Some(explain_tls(tls));
    }
    let text = e.to_string();
    if text == "dns error" {
        let detail = e.source().map(|s| format!(" ({s})")).unwrap_or_default();
        return Some(format!("DNS lookup failed{detail}: check the host name"));
    }
    if text.starts_with("HTTP/2 was not negotiated") {
        return Some("TLS worked but the peer did not offer HTTP/2 (ALPN h2): it is not a gRPC server, or a proxy in front of it does not pass HTTP/2".to_string());
    }
    if let Some(alert) = text.strip_prefix("received fatal alert: ") {
        // A TLS alert seen after the handshake (TLS 1.3: the server checks
        // the client's certificate after the client is done), as text.
        if matches!(
            alert,
            "CertificateRequired"
                | "BadCertificate"
                | "UnknownCA"
                | "CertificateUnknown"
                | "AccessDenied"
                | "HandshakeFailure"
        ) {
            return Some(format!("the server rejected the TLS handshake ({text}): it may require a client certificate (ClientBuilder::identity) signed by a CA it trusts"));
        }
    }
    if text.starts_with("Connecting to HTTPS without TLS enabled") {
        return Some("the endpoint is https:// but has no TLS configuration: call Endpoint::tls_config on it, or give ClientBuilder::tls / ca_certificate".to_string());
    }
    if text.starts_with("TLS handshake timeout") {
        return Some(
            "the TLS handshake timed out: does the address lead to a TLS endpoint?".to_string(),
        );
    }
    None
}

/// A TLS failure in words: which side rejected what, and the knob to fix it.
#[cfg(feature = "tls")]
fn explain_tls(e: &rustls::Error) -> String {
    use rustls::{AlertDescription as A, CertificateError as C, Error as E};
    match e {
        E::InvalidCertificate(C::UnknownIssuer) => format!(
            "certificate not trusted: unknown issuer ({e}); give the CA that signed the server's certificate with ClientBuilder::ca_certificate"
        ),
        E::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }) => format!(
            "the server's certificate is not valid for this host name ({e}); connect by the name in the certificate or set ClientBuilder::tls_domain"
        ),
        E::InvalidCertificate(C::Expired | C::ExpiredContext { .. } | C::NotValidYet | C::NotValidYetContext { .. }) => {
            format!("the server's certificate is outside its validity period ({e}); check its dates and this host's clock")
        }
        E::InvalidCertificate(_) => format!("the server's certificate was rejected ({e})"),
        E::AlertReceived(A::CertificateRequired | A::BadCertificate | A::UnknownCA | A::CertificateUnknown | A::AccessDenied | A::HandshakeFailure) => format!(
            "the server rejected the TLS handshake ({e}): it may require a client certificate (ClientBuilder::identity) signed by a CA it trusts"
        ),
        E::InvalidMessage(_) => format!(
            "TLS handshake failed ({e}): is the server speaking TLS? Use http:// for a plaintext server"
        ),
        other => format!("TLS failed: {other}"),
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    fn cause(e: &(dyn std::error::Error + 'static)) -> String {
        named_cause(e).unwrap_or_else(|| panic!("no named cause for {e:?}"))
    }

    #[test]
    fn io_causes_are_named() {
        let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
        assert!(cause(&refused).starts_with("connection refused"));
        let timed_out = io::Error::from(io::ErrorKind::TimedOut);
        assert!(cause(&timed_out).starts_with("timed out"));
        assert!(
            explain_level(&timed_out, Some(std::time::Duration::from_secs(5)))
                .is_some_and(|m| m.starts_with("timed out after 5s"))
        );
        assert!(named_cause(&io::Error::other("something else")).is_none());
    }

    #[cfg(feature = "tls")]
    #[test]
    fn tls_causes_name_the_knob_that_fixes_them() {
        use rustls::{AlertDescription, CertificateError, Error as E};
        // tokio-rustls wraps rustls errors in an io::Error.
        let wrapped = |e: E| io::Error::new(io::ErrorKind::InvalidData, e);
        let unknown = cause(&wrapped(E::InvalidCertificate(
            CertificateError::UnknownIssuer,
        )));
        assert!(
            unknown.starts_with("certificate not trusted: unknown issuer"),
            "{unknown}"
        );
        assert!(unknown.contains("ca_certificate"), "{unknown}");
        let name = cause(&wrapped(E::InvalidCertificate(
            CertificateError::NotValidForName,
        )));
        assert!(name.contains("tls_domain"), "{name}");
        let expired = cause(&wrapped(E::InvalidCertificate(CertificateError::Expired)));
        assert!(expired.contains("validity period"), "{expired}");
        let required = cause(&wrapped(E::AlertReceived(
            AlertDescription::CertificateRequired,
        )));
        assert!(required.contains("client certificate"), "{required}");
        // The same alert seen as text only (after the handshake).
        let text = io::Error::other("received fatal alert: CertificateRequired");
        assert!(cause(&text).contains("client certificate"));
    }
}
