//! Address parsing and the shared gRPC channel.
//!
//! A [`Transport`] owns one tonic [`Channel`] (one HTTP/2 connection,
//! multiplexed by every client and scope that shares it). tonic reconnects by
//! itself after a GOAWAY or a reset; what it cannot see is a connection whose
//! packets silently vanish (a partition). After a call times out, the transport
//! therefore replaces the channel with a fresh lazy one, at most once per
//! `redial_after`, so the next call dials a new connection instead of queueing
//! behind a dead one.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use crate::error::{Error, Result};

/// Parses a server address: `http://host:port`, `https://host:port` or the bare
/// `host:port` the Go and Python clients use (plaintext).
pub(crate) fn parse_address(address: &str) -> Result<Endpoint> {
    let address = address.trim();
    if address.is_empty() {
        return Err(Error::invalid("address", "must not be empty"));
    }
    let (url, tls) = match address.split_once("://") {
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
    let endpoint = Endpoint::from_shared(url).map_err(|e| {
        Error::invalid(
            "address",
            format!("cannot use {address:?} as an endpoint: {e}"),
        )
    })?;
    let endpoint = if tls {
        endpoint
            .tls_config(ClientTlsConfig::new().with_webpki_roots())
            .map_err(|e| Error::invalid("address", format!("TLS setup for {address:?}: {e}")))?
    } else {
        endpoint
    };
    Ok(endpoint.tcp_nodelay(true))
}

/// One shared connection to the server.
#[derive(Debug)]
pub(crate) struct Transport {
    /// The endpoint to redial; `None` for a channel the user handed us.
    endpoint: Option<Endpoint>,
    redial_after: Duration,
    current: Mutex<Current>,
}

#[derive(Debug)]
struct Current {
    channel: Channel,
    dialed_at: Instant,
}

impl Transport {
    /// Connects eagerly: fails with [`Error::Connection`] when the server cannot
    /// be reached within the endpoint's connect timeout.
    pub(crate) async fn connect(endpoint: Endpoint, redial_after: Duration) -> Result<Self> {
        let channel = endpoint.connect().await.map_err(Error::Connection)?;
        Ok(Self::with_channel(Some(endpoint), channel, redial_after))
    }

    /// Connects on first use.
    pub(crate) fn lazy(endpoint: Endpoint, redial_after: Duration) -> Self {
        let channel = endpoint.connect_lazy();
        Self::with_channel(Some(endpoint), channel, redial_after)
    }

    /// Uses a channel built by the caller (never redialed).
    pub(crate) fn from_channel(channel: Channel) -> Self {
        Self::with_channel(None, channel, Duration::MAX)
    }

    fn with_channel(endpoint: Option<Endpoint>, channel: Channel, redial_after: Duration) -> Self {
        Transport {
            endpoint,
            redial_after,
            current: Mutex::new(Current {
                channel,
                dialed_at: Instant::now(),
            }),
        }
    }

    /// The channel to issue the next call on.
    pub(crate) fn channel(&self) -> Channel {
        self.lock().channel.clone()
    }

    /// A call on this transport timed out: dial a fresh connection for the
    /// next call unless that was done recently.
    pub(crate) fn call_timed_out(&self) {
        let Some(endpoint) = &self.endpoint else {
            return;
        };
        let mut cur = self.lock();
        if cur.dialed_at.elapsed() >= self.redial_after {
            tracing::debug!("call timed out: dialing a fresh connection for the next call");
            cur.channel = endpoint.connect_lazy();
            cur.dialed_at = Instant::now();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Current> {
        self.current.lock().unwrap_or_else(|e| e.into_inner())
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

    #[test]
    fn accepts_urls_and_bare_host_port() {
        for a in [
            "http://localhost:5050",
            "https://example.com:443",
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
