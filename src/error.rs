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
    #[error("could not connect to the Quorum Quest server: {0} (check the address and that the server is running)")]
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

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
