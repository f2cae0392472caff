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
//!   never looks like a dead connection.
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
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Status};

use crate::admission::{Admission, DEFAULT_MAX_CONCURRENT_CALLS};
use crate::config::Timing;
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

/// Numbers the channels users hand us, to name them in the identity registry.
static CHANNELS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// One shared connection to the server.
#[derive(Debug)]
pub(crate) struct Transport {
    /// The endpoint to redial; `None` for a channel the user handed us.
    endpoint: Option<Endpoint>,
    redial_after: Duration,
    current: Mutex<Current>,
    /// What names this connection in the identity registry: the endpoint's
    /// URI, or a number of its own for a channel the user handed us.
    name: String,
    /// The cap on calls in flight and the queue of the others
    /// ([`crate::admission`]).
    admission: Arc<Admission>,
}

#[derive(Debug)]
struct Current {
    channel: Channel,
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
                Ok(channel) => channel.map_err(Error::Connection)?,
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
                dialed_at: Instant::now(),
                generation: 0,
                last_answer: None,
            }),
            name: match &endpoint_name {
                Some(uri) => uri.clone(),
                None => format!(
                    "channel-{}",
                    CHANNELS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                ),
            },
            admission: Admission::new(DEFAULT_MAX_CONCURRENT_CALLS),
        }
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
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// The channel to issue the next call on, and which connection it is
    /// (for [`answered`](Self::answered) and
    /// [`call_timed_out`](Self::call_timed_out)).
    pub(crate) fn channel(&self) -> (Channel, u64) {
        let cur = self.lock();
        (cur.channel.clone(), cur.generation)
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
    pub(crate) fn call_timed_out(&self, generation: u64, sent_at: Instant) {
        let Some(endpoint) = &self.endpoint else {
            return;
        };
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
            cur.channel = endpoint.connect_lazy();
            cur.dialed_at = now;
            cur.generation = cur.generation.wrapping_add(1);
            cur.last_answer = None;
        }
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
        let (_, first) = t.channel();
        let sent = Instant::now();
        tokio::time::advance(4 * SEC).await;
        // Another call was answered just now: the connection lives.
        t.answered(first);
        t.call_timed_out(first, sent);
        assert_eq!(
            t.channel().1,
            first,
            "a slow server is not a dead connection"
        );
        // That answer is now more than a quarter of the timeout old.
        tokio::time::advance(2 * SEC).await;
        t.call_timed_out(first, sent);
        let (_, second) = t.channel();
        assert_ne!(second, first, "silent for too long: redialed");
        // A time-out on the connection already replaced changes nothing, and
        // neither does one within `redial_after` of the redial.
        t.call_timed_out(first, Instant::now());
        t.call_timed_out(second, Instant::now());
        assert_eq!(t.channel().1, second);
        // An answer from before the call was sent is no evidence.
        tokio::time::advance(5 * SEC).await;
        t.answered(second);
        tokio::time::advance(ms(1)).await;
        let sent = Instant::now();
        t.call_timed_out(second, sent);
        assert_ne!(t.channel().1, second);
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
