//! The three RPCs as typed calls that record when the request was sent.
//!
//! The send instant is taken just before the request is handed to the
//! transport, so it is never later than the moment the server acts on it: a
//! lease timed from it is conservative.
//!
//! Every call first waits for a slot in its connection's
//! [admission queue](crate::admission) (a leader's renewal and releases ahead
//! of followers' attempts). The send instant is taken, and the call's timeout
//! starts, only once the call has its slot: a call is timed from when it was
//! sent, not from when it was queued, and one that gives up while queued never
//! reached the connection (it does not count towards a redial).

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::admission::{Priority, Wait};
use crate::backoff::{classify, Class, TRANSPORT_ATTEMPTS, TRANSPORT_RETRY_PAUSE};
use crate::config::Scope;
use crate::event::RpcKind;
use crate::identity::Claim;
use crate::observe::RpcAttempt;
use crate::proto::{KeepAliveRequest, ReleaseLockRequest, TryAcquireLockRequest};
use crate::state::Observation;
use crate::transport::{CallMetadata, Stub, Transport};

/// An RPC's result with the instant its request was sent, the incarnation
/// of our identity it was sent under, and how many attempts it took.
#[derive(Debug)]
pub(crate) struct Answer<T> {
    pub(crate) sent_at: Instant,
    pub(crate) incarnation: u32,
    pub(crate) attempts: u32,
    pub(crate) result: Result<T, Status>,
}

impl<T> Answer<T> {
    fn failure(rpc: RpcKind, status: &Status) -> Observation {
        Observation::RpcFailed {
            rpc,
            code: status.code(),
            message: status.message().to_string(),
        }
    }

    /// `true` when the call failed in a way that says nothing about whether
    /// the server acted on it (a time-out, a cut connection, an unknown
    /// error): the request may still have been, or be, applied.
    pub(crate) fn outcome_unknown(&self) -> bool {
        self.result
            .as_ref()
            .err()
            .is_some_and(|s| classify(s.code()) == Class::Transient)
    }
}

impl Answer<bool> {
    /// What a `TryAcquireLock` answer means.
    pub(crate) fn observation(&self) -> Observation {
        let (sent_at, incarnation) = (self.sent_at, self.incarnation);
        match &self.result {
            Ok(true) => Observation::Granted {
                sent_at,
                incarnation,
            },
            Ok(false) => Observation::AcquireRefused {
                sent_at,
                incarnation,
            },
            Err(status) => Self::failure(RpcKind::TryAcquireLock, status),
        }
    }
}

impl Answer<LeaseAnswer> {
    /// What a `KeepAlive` answer means.
    pub(crate) fn observation(&self) -> Observation {
        let (sent_at, incarnation) = (self.sent_at, self.incarnation);
        match &self.result {
            Ok(LeaseAnswer::Granted(lease)) => Observation::Renewed {
                sent_at,
                incarnation,
                lease: *lease,
            },
            Ok(LeaseAnswer::Refused) => Observation::RenewRefused {
                sent_at,
                incarnation,
            },
            Ok(LeaseAnswer::Malformed(message)) => Observation::RenewMalformed {
                sent_at,
                incarnation,
                message: message.clone(),
            },
            Err(status) => Self::failure(RpcKind::KeepAlive, status),
        }
    }
}

/// What a `KeepAlive` answer's `lease_length` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LeaseAnswer {
    /// A positive lease (as sent; the state machine caps it at the TTL).
    Granted(Duration),
    /// Negative, zero or missing: "you are not the owner".
    Refused,
    /// Out of the protobuf `Duration` range, nanos out of range, or mixed
    /// signs: a broken server. Treated as a rejection.
    Malformed(String),
}

/// The largest magnitude of a protobuf `Duration`'s seconds (10,000 years).
const MAX_PROTO_SECONDS: i64 = 315_576_000_000;

/// Reads the wire's lease: a negative, zero or missing lease means "not the
/// owner"; a value outside what a protobuf `Duration` may hold is malformed.
/// Never panics, whatever the server sends.
pub(crate) fn lease_answer(lease: Option<prost_types::Duration>) -> LeaseAnswer {
    let Some(lease) = lease else {
        return LeaseAnswer::Refused;
    };
    let (seconds, nanos) = (lease.seconds, lease.nanos);
    let malformed = |why: &str| {
        LeaseAnswer::Malformed(format!(
            "KeepAlive answered lease_length {{ seconds: {seconds}, nanos: {nanos} }}: {why}; treated as a rejection"
        ))
    };
    if !(-MAX_PROTO_SECONDS..=MAX_PROTO_SECONDS).contains(&seconds) {
        return malformed("seconds out of the protobuf Duration range");
    }
    if !(-999_999_999..=999_999_999).contains(&nanos) {
        return malformed("nanos out of range");
    }
    if (seconds > 0 && nanos < 0) || (seconds < 0 && nanos > 0) {
        return malformed("seconds and nanos have different signs");
    }
    if seconds < 0 || nanos < 0 || (seconds == 0 && nanos == 0) {
        return LeaseAnswer::Refused;
    }
    match (u64::try_from(seconds), u32::try_from(nanos)) {
        (Ok(secs), Ok(nanos)) => LeaseAnswer::Granted(Duration::new(secs, nanos)),
        _ => malformed("not representable"),
    }
}

/// Typed calls for one scope over a shared transport.
///
/// One per client, inside its session: everything it owns is inline (the
/// scope, the claim, the shutdown flag) and the metadata is shared with the
/// clients made from it, so that a `for_scope` client costs little.
#[derive(Debug)]
pub(crate) struct Rpc {
    transport: Arc<Transport>,
    scope: Scope,
    /// This client's claim on its scope and identity on the transport.
    claim: Claim,
    /// Metadata put on every request (auth); shared with `for_scope` clients.
    metadata: Arc<CallMetadata>,
    /// The client span: every call and task of this client runs in it.
    span: tracing::Span,
    /// Set when the client shuts down: an acquire still waiting for a call
    /// slot then is not sent (the shutdown's release, urgent, may already
    /// have passed it in the queue: sent after it, it would win the lock
    /// back for a client that is gone).
    acquiring_stopped: AtomicBool,
}

impl Rpc {
    /// Calls for `scope` over `transport` (the scope is moved in, or copied
    /// if the `Arc` is shared).
    ///
    /// # Errors
    ///
    /// `InvalidParameter` if another live client on `transport` already
    /// campaigns for the same lock under the same client id.
    pub(crate) fn new(transport: Arc<Transport>, scope: Arc<Scope>) -> crate::error::Result<Self> {
        let scope = Arc::unwrap_or_clone(scope);
        let claim = Claim::new(
            transport.name(),
            &scope.service,
            &scope.domain,
            &scope.client_id,
        )?;
        Ok(Rpc {
            span: crate::observe::client_span(&scope),
            transport,
            scope,
            claim,
            metadata: Arc::default(),
            acquiring_stopped: AtomicBool::new(false),
        })
    }

    /// The same calls, sending `metadata` with every request.
    pub(crate) fn with_metadata(mut self, metadata: Arc<CallMetadata>) -> Self {
        self.metadata = metadata;
        self
    }

    /// The metadata sent with every request.
    pub(crate) fn metadata(&self) -> &Arc<CallMetadata> {
        &self.metadata
    }

    /// From now on no `TryAcquireLock` is sent, even one already waiting
    /// for a call slot (see `acquiring_stopped`).
    pub(crate) fn stop_acquiring(&self) {
        self.acquiring_stopped.store(true, Ordering::SeqCst);
    }

    /// `true` once [`stop_acquiring`](Self::stop_acquiring) was called.
    pub(crate) fn acquiring_stopped(&self) -> bool {
        self.acquiring_stopped.load(Ordering::SeqCst)
    }

    /// The client span.
    pub(crate) fn span(&self) -> &tracing::Span {
        &self.span
    }

    pub(crate) fn scope(&self) -> &Scope {
        &self.scope
    }

    /// This client's claim on its lock and identity.
    pub(crate) fn claim(&self) -> &Claim {
        &self.claim
    }

    pub(crate) fn transport(&self) -> &Arc<Transport> {
        &self.transport
    }

    /// `priority`: [`Priority::Urgent`] when the caller leads (a re-entrant
    /// acquire renews its lease), else [`Priority::Normal`].
    pub(crate) async fn try_acquire(
        &self,
        incarnation: u32,
        timeout: Duration,
        wait: Wait,
        priority: Priority,
    ) -> Answer<bool> {
        let s = &self.scope;
        let req = || TryAcquireLockRequest {
            service: String::from(&*s.service),
            domain: String::from(&*s.domain),
            client_id: s.wire_id(incarnation),
            ttl: s.ttl_secs,
        };
        self.call(
            (RpcKind::TryAcquireLock, priority),
            incarnation,
            (timeout, wait),
            req,
            |mut c, r| async move {
                let answer = c.try_acquire_lock(r).await;
                (c, answer)
            },
        )
        .await
        .map(|r| r.is_leader)
    }

    pub(crate) async fn keep_alive(
        &self,
        incarnation: u32,
        timeout: Duration,
        wait: Wait,
    ) -> Answer<LeaseAnswer> {
        let s = &self.scope;
        let req = || KeepAliveRequest {
            service: String::from(&*s.service),
            domain: String::from(&*s.domain),
            client_id: s.wire_id(incarnation),
            ttl: s.ttl_secs,
        };
        self.call(
            (RpcKind::KeepAlive, Priority::Urgent),
            incarnation,
            (timeout, wait),
            req,
            |mut c, r| async move {
                let answer = c.keep_alive(r).await;
                (c, answer)
            },
        )
        .await
        .map(|r| lease_answer(r.lease_length))
    }

    pub(crate) async fn release(
        &self,
        incarnation: u32,
        timeout: Duration,
        wait: Wait,
    ) -> Answer<()> {
        let s = &self.scope;
        let req = || ReleaseLockRequest {
            service: String::from(&*s.service),
            domain: String::from(&*s.domain),
            client_id: s.wire_id(incarnation),
        };
        self.call(
            (RpcKind::ReleaseLock, Priority::Urgent),
            incarnation,
            (timeout, wait),
            req,
            |mut c, r| async move {
                let answer = c.release_lock(r).await;
                (c, answer)
            },
        )
        .await
        .map(|_| ())
    }

    /// One call within `timeout`. A failure that the transport reports at
    /// once (the request was refused or its connection closed, as happens
    /// when a server ages connections out with GOAWAY) is retried up to twice
    /// after a few milliseconds, within the same budget: every call of this
    /// service is idempotent, and the send instant is that of the attempt
    /// that answered, so the lease stays conservative. `attempts` tells the
    /// caller whether an earlier copy of the request may still be on its way.
    ///
    /// Each attempt first waits for a slot on the connection (`wait` bounds
    /// how long the first one may wait); the `timeout` budget starts when the
    /// first attempt is sent, and never runs past a [`Wait::Until`] instant.
    ///
    /// `req` builds each attempt's request (built per attempt rather than
    /// built once and cloned for each: one copy of its strings per call, not
    /// two).
    async fn call<Req, Resp, M, F, Fut>(
        &self,
        (rpc, priority): (RpcKind, Priority),
        incarnation: u32,
        (timeout, wait): (Duration, Wait),
        req: M,
        f: F,
    ) -> Answer<Resp>
    where
        M: Fn() -> Req,
        F: Fn(Stub, Request<Req>) -> Fut,
        Fut: Future<Output = (Stub, Result<Response<Resp>, Status>)>,
    {
        let queued_at = Instant::now();
        let mut queue_until = wait.queue_deadline(queued_at);
        // Set when the first attempt is sent.
        let mut budget_end: Option<Instant> = None;
        let mut attempts = 0;
        loop {
            attempts += 1;
            let admitted = self
                .transport
                .admission()
                .admit(priority, queue_until)
                .await;
            // The send instant: after the queue, before the request is handed
            // to the connection (so never later than its transmission).
            let sent_at = Instant::now();
            if rpc == RpcKind::TryAcquireLock && self.acquiring_stopped() {
                // Never sent, so no outcome to settle.
                return Answer {
                    sent_at,
                    incarnation,
                    attempts,
                    result: Err(Status::failed_precondition(
                        "TryAcquireLock: not sent: the client was shut down",
                    )),
                };
            }
            let end = *budget_end.get_or_insert_with(|| {
                let end = crate::time::after(sent_at, timeout);
                wait.hard_end().map_or(end, |hard| end.min(hard))
            });
            let left = end.saturating_duration_since(sent_at);
            let Some(permit) = admitted.filter(|_| !left.is_zero()) else {
                // Never sent: says nothing about the connection.
                let waited = sent_at.saturating_duration_since(queued_at);
                tracing::debug!(
                    ?rpc,
                    attempts,
                    ?waited,
                    "no free call slot on the connection in time"
                );
                return Answer {
                    sent_at,
                    incarnation,
                    attempts,
                    result: Err(Status::deadline_exceeded(format!(
                        "{rpc:?}: not sent: no free call slot on the connection within {waited:?} \
                         (at most {} calls in flight)",
                        self.transport.admission().cap()
                    ))),
                };
            };
            queue_until = Some(end);
            let (stub, connection) = self.transport.stub();
            let mut request = Request::new(req());
            set_timeout(&mut request, left);
            let attempt = RpcAttempt::start(&self.span, rpc, attempts);
            let result = match self.metadata.apply(request) {
                Err(status) => Err(status),
                Ok(request) => {
                    let call = tokio::time::timeout(left, f(stub, request));
                    match call.instrument(attempt.span().clone()).await {
                        Ok((stub, result)) => {
                            // A stub whose call timed out is dropped with it.
                            self.transport.give_back(stub, connection);
                            result.map(Response::into_inner)
                        }
                        Err(_) => Err(Status::deadline_exceeded(format!(
                            "{rpc:?}: no answer within {timeout:?}"
                        ))),
                    }
                }
            };
            // The answer is recorded before the slot is handed on, so that a
            // call admitted by it is sent after the answer: "answered since
            // it was sent" ([`Transport::call_timed_out`]) then never credits
            // it with an answer that came before it.
            if result.is_ok() {
                self.transport.answered(connection);
            }
            // The slot is free for the next call (a retry queues again).
            drop(permit);
            let result = match result {
                // tonic's own deadline (from the request's grpc-timeout) may
                // fire first and say `Cancelled`: a failure at or past the
                // budget is a time-out either way, reported as a deadline,
                // and the connection may be dead: dial a fresh one for the
                // next call (unless it answers other calls).
                Err(status)
                    if crate::transport::is_timeout(&status, sent_at, left, Instant::now()) =>
                {
                    self.transport.call_timed_out(connection, sent_at, left);
                    Err(as_deadline(rpc, timeout, status))
                }
                Err(status) => {
                    if crate::transport::is_closed_channel(&status) {
                        // Dead for good: the retry (or the next call) goes
                        // out on a fresh connection.
                        self.transport.channel_closed(connection);
                    }
                    Err(explain(status, self.transport.address().as_deref()))
                }
                ok => ok,
            };
            attempt.finish(sent_at, result.as_ref().err());
            let pause = TRANSPORT_RETRY_PAUSE.saturating_mul(attempts);
            match result {
                Err(status)
                    if attempts < TRANSPORT_ATTEMPTS
                        && is_transport_failure(&status)
                        && crate::time::after(Instant::now(), pause) < end =>
                {
                    tracing::debug!(?rpc, attempt = attempts, code = ?status.code(), message = status.message(), "call failed in transport; retrying");
                    // Long enough for the connection to take in its GOAWAY,
                    // so the retry goes out on a fresh one.
                    tokio::time::sleep(pause).await;
                }
                result => {
                    if let Err(status) = &result {
                        tracing::debug!(?rpc, attempts, code = ?status.code(), message = status.message(), "call failed");
                    }
                    return Answer {
                        sent_at,
                        incarnation,
                        attempts,
                        result,
                    };
                }
            }
        }
    }
}

thread_local! {
    /// The `grpc-timeout` value of the last timeout a call on this thread
    /// sent (nearly always the RPC timeout: a first attempt's).
    static TIMEOUT_HEADER: std::cell::RefCell<Option<(Duration, tonic::metadata::AsciiMetadataValue)>> =
        const { std::cell::RefCell::new(None) };
}

/// [`Request::set_timeout`], without formatting and allocating the header
/// again for the timeout the last call on this thread sent: the copy is a
/// reference count (the allocation would otherwise be freed on the
/// connection's thread, which glibc's malloc serves only on its slow path).
fn set_timeout<T>(request: &mut Request<T>, timeout: Duration) {
    const KEY: &str = "grpc-timeout";
    // `try_with`: a call made while the thread's locals are destroyed (a
    // thread-local's `Drop` that releases through the client) finds the
    // cache gone; it formats its header as tonic does.
    let cached = TIMEOUT_HEADER
        .try_with(|cell| {
            let cell = cell.try_borrow().ok()?;
            let (d, value) = cell.as_ref()?;
            (*d == timeout).then(|| value.clone())
        })
        .ok()
        .flatten();
    if let Some(value) = cached {
        request.metadata_mut().insert(KEY, value);
        return;
    }
    request.set_timeout(timeout);
    if let Some(value) = request.metadata().get(KEY) {
        let value = value.clone();
        let _ = TIMEOUT_HEADER.try_with(|cell| {
            if let Ok(mut cell) = cell.try_borrow_mut() {
                *cell = Some((timeout, value));
            }
        });
    }
}

impl<T> Answer<T> {
    /// Maps the answer's value.
    fn map<U>(self, f: impl FnOnce(T) -> U) -> Answer<U> {
        Answer {
            sent_at: self.sent_at,
            incarnation: self.incarnation,
            attempts: self.attempts,
            result: self.result.map(f),
        }
    }
}

/// A timed-out call as `DEADLINE_EXCEEDED` (tonic's own timeout says
/// `CANCELLED` "Timeout expired"), naming the call and its budget.
fn as_deadline(rpc: RpcKind, timeout: Duration, status: Status) -> Status {
    if status.code() == tonic::Code::DeadlineExceeded {
        return status;
    }
    Status::deadline_exceeded(format!(
        "{rpc:?}: no answer within {timeout:?} ({})",
        status.message()
    ))
}

/// A failure whose cause the peer's answer shows, in words a user can act
/// on; the code is kept (it drives the retry class). Two cases: a peer that
/// answers HTTP but not gRPC (tonic maps the HTTP status to a code and says
/// "grpc-status header missing"), and a peer that does not speak HTTP/2 at
/// all (an HTTP/1 server: an h2 protocol error). A cause found in the
/// status's source chain (connection refused, a TLS rejection) is named
/// with `address`, the server the transport dials.
pub(crate) fn explain(status: Status, address: Option<&str>) -> Status {
    let message = status.message();
    let source = std::error::Error::source(&status);
    let chain = source.map(crate::error::chain_text).unwrap_or_default();
    let seen = format!("{message} {chain}");
    let peer = match address {
        Some(address) => format!("the peer at {address}"),
        None => "the peer".to_string(),
    };
    let hint = if seen.contains("grpc-status header missing") {
        format!("{peer} answered HTTP without a grpc-status: it is not a Quorum Quest gRPC server (wrong address or port, or a proxy that does not route gRPC)")
    } else if let Some(cause) = source.and_then(crate::error::named_cause) {
        match address {
            Some(address) => format!("connecting to {address}: {cause}"),
            None => cause,
        }
    } else if seen.contains("frame with invalid size") || seen.contains("invalid HTTP version") {
        format!("{peer} does not speak HTTP/2 (gRPC): is it an HTTP/1 server, or a TLS endpoint reached with http://?")
    } else if source.is_some() {
        // tonic's "transport error" alone says nothing: add its causes.
        let detail = match chain.strip_prefix(message) {
            Some(rest) => format!("{message}{rest}"),
            None => format!("{message}: {chain}"),
        };
        return Status::new(status.code(), detail);
    } else {
        return status;
    };
    let detail = if chain.is_empty() || chain == message {
        message.to_string()
    } else if let Some(rest) = chain.strip_prefix(message) {
        format!("{message}{rest}")
    } else {
        format!("{message}: {chain}")
    };
    Status::new(status.code(), format!("{hint} [{detail}]"))
}

/// Failures raised by the connection rather than by the service.
fn is_transport_failure(status: &Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable
            | tonic::Code::Internal
            | tonic::Code::Unknown
            | tonic::Code::Cancelled
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The header tonic itself would send for `timeout`.
    fn tonic_header(timeout: Duration) -> String {
        let mut request = Request::new(());
        request.set_timeout(timeout);
        let value = request.metadata().get("grpc-timeout").cloned();
        value
            .and_then(|v| v.to_str().ok().map(str::to_string))
            .unwrap_or_default()
    }

    #[test]
    fn the_reused_timeout_header_is_the_one_for_each_calls_own_timeout() {
        // The same timeout twice (the second is the reused value), another
        // one, then the first again: each request carries its own.
        let timeouts = [
            Duration::from_secs(5),
            Duration::from_secs(5),
            Duration::from_millis(1_234),
            Duration::from_secs(5),
            Duration::from_secs(3 * 3600),
            Duration::ZERO,
        ];
        for timeout in timeouts {
            let mut request = Request::new(());
            set_timeout(&mut request, timeout);
            let sent = request.metadata().get_all("grpc-timeout").iter().count();
            assert_eq!(sent, 1, "one grpc-timeout per request");
            let value = request.metadata().get("grpc-timeout").cloned();
            let value = value.and_then(|v| v.to_str().ok().map(str::to_string));
            assert_eq!(value.as_deref(), Some(tonic_header(timeout).as_str()));
        }
    }

    /// A call made while the thread's locals are being destroyed (a
    /// thread-local's `Drop` that releases a lock through the client, after
    /// the header cache was destroyed) still gets its `grpc-timeout`, and
    /// no "cannot access a Thread Local Storage value during or after
    /// destruction" panic (which, in a destructor, aborts the process).
    #[test]
    fn a_timeout_set_while_the_threads_locals_are_destroyed_is_sent_without_a_panic() {
        struct Late(std::sync::mpsc::Sender<Option<String>>);
        impl Drop for Late {
            fn drop(&mut self) {
                let header = std::panic::catch_unwind(|| {
                    let mut request = Request::new(());
                    set_timeout(&mut request, Duration::from_secs(5));
                    let value = request.metadata().get("grpc-timeout").cloned();
                    value.and_then(|v| v.to_str().ok().map(str::to_string))
                });
                let _ = self.0.send(header.unwrap_or(Some("panicked".into())));
            }
        }
        thread_local! {
            static LATE: std::cell::RefCell<Option<Late>> = const { std::cell::RefCell::new(None) };
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            // Registered before the header cache, so destroyed after it
            // (thread-local destructors run in reverse order).
            LATE.with(|late| *late.borrow_mut() = Some(Late(tx)));
            let mut request = Request::new(());
            set_timeout(&mut request, Duration::from_secs(5));
        });
        assert!(thread.join().is_ok());
        let sent = rx.recv().ok().flatten();
        assert_eq!(
            sent.as_deref(),
            Some(tonic_header(Duration::from_secs(5)).as_str())
        );
    }

    #[test]
    fn a_peer_answering_http_without_grpc_status_is_named_and_keeps_its_code() {
        // What tonic answers when an HTTP/2 peer replies 404 without gRPC.
        let status =
            Status::unimplemented("grpc-status header missing, mapped from HTTP status code 404");
        let explained = explain(status, Some("http://127.0.0.1:1/"));
        assert_eq!(explained.code(), tonic::Code::Unimplemented);
        assert!(
            explained
                .message()
                .contains("not a Quorum Quest gRPC server"),
            "{explained:?}"
        );
        assert!(explained.message().contains("404"), "{explained:?}");
        // A status from the service itself is left alone.
        let plain = explain(Status::unauthenticated("missing token"), None);
        assert_eq!(plain.message(), "missing token");
    }

    #[test]
    fn a_timeout_is_a_deadline_naming_the_call_and_its_budget() {
        let status = as_deadline(
            RpcKind::KeepAlive,
            Duration::from_secs(5),
            Status::cancelled("Timeout expired"),
        );
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
        assert!(status.message().contains("KeepAlive"), "{status:?}");
        assert!(status.message().contains("5s"), "{status:?}");
    }

    #[test]
    fn only_positive_leases_count_and_hostile_ones_never_panic() {
        let d = |seconds, nanos| Some(prost_types::Duration { seconds, nanos });
        assert_eq!(lease_answer(None), LeaseAnswer::Refused);
        assert_eq!(lease_answer(d(-1, 0)), LeaseAnswer::Refused);
        assert_eq!(lease_answer(d(0, 0)), LeaseAnswer::Refused);
        assert_eq!(lease_answer(d(0, -5)), LeaseAnswer::Refused);
        assert_eq!(lease_answer(d(-3, -5)), LeaseAnswer::Refused);
        assert_eq!(
            lease_answer(d(15, 0)),
            LeaseAnswer::Granted(Duration::from_secs(15))
        );
        assert_eq!(
            lease_answer(d(0, 500)),
            LeaseAnswer::Granted(Duration::from_nanos(500))
        );
        assert_eq!(
            lease_answer(d(MAX_PROTO_SECONDS, 999_999_999)),
            LeaseAnswer::Granted(Duration::new(MAX_PROTO_SECONDS as u64, 999_999_999))
        );
        for (s, n) in [
            (i64::MAX, 0),
            (i64::MIN, 0),
            (MAX_PROTO_SECONDS + 1, 0),
            (0, 1_000_000_000),
            (0, i32::MIN),
            (0, i32::MAX),
            (5, -1),
            (-5, 1),
        ] {
            match lease_answer(d(s, n)) {
                LeaseAnswer::Malformed(m) => assert!(m.contains("lease_length"), "{m}"),
                other => panic!("({s}, {n}) gave {other:?}"),
            }
        }
    }
}
