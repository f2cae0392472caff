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
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::admission::{Priority, Wait};
use crate::backoff::{classify, Class, TRANSPORT_ATTEMPTS, TRANSPORT_RETRY_PAUSE};
use crate::config::Scope;
use crate::event::RpcKind;
use crate::identity::Claim;
use crate::proto::leader_election_service_client::LeaderElectionServiceClient;
use crate::proto::{KeepAliveRequest, ReleaseLockRequest, TryAcquireLockRequest};
use crate::state::Observation;
use crate::transport::Transport;

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
#[derive(Debug, Clone)]
pub(crate) struct Rpc {
    transport: Arc<Transport>,
    scope: Arc<Scope>,
    /// This client's claim on its scope and identity on the transport.
    claim: Arc<Claim>,
}

impl Rpc {
    /// Calls for `scope` over `transport`.
    ///
    /// # Errors
    ///
    /// `InvalidParameter` if another live client on `transport` already
    /// campaigns for the same lock under the same client id.
    pub(crate) fn new(transport: Arc<Transport>, scope: Arc<Scope>) -> crate::error::Result<Self> {
        let claim = Claim::new(
            transport.name(),
            &scope.service,
            &scope.domain,
            &scope.client_id,
        )?;
        Ok(Rpc {
            transport,
            scope,
            claim: Arc::new(claim),
        })
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

    pub(crate) async fn try_acquire(
        &self,
        incarnation: u32,
        timeout: Duration,
        wait: Wait,
    ) -> Answer<bool> {
        let s = &self.scope;
        let req = TryAcquireLockRequest {
            service: s.service.clone(),
            domain: s.domain.clone(),
            client_id: s.wire_id(incarnation),
            ttl: s.ttl_secs,
        };
        self.call(
            RpcKind::TryAcquireLock,
            incarnation,
            (timeout, wait),
            req,
            |mut c, r| async move { c.try_acquire_lock(r).await },
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
        let req = KeepAliveRequest {
            service: s.service.clone(),
            domain: s.domain.clone(),
            client_id: s.wire_id(incarnation),
            ttl: s.ttl_secs,
        };
        self.call(
            RpcKind::KeepAlive,
            incarnation,
            (timeout, wait),
            req,
            |mut c, r| async move { c.keep_alive(r).await },
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
        let req = ReleaseLockRequest {
            service: s.service.clone(),
            domain: s.domain.clone(),
            client_id: s.wire_id(incarnation),
        };
        self.call(
            RpcKind::ReleaseLock,
            incarnation,
            (timeout, wait),
            req,
            |mut c, r| async move { c.release_lock(r).await },
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
    async fn call<Req, Resp, F, Fut>(
        &self,
        rpc: RpcKind,
        incarnation: u32,
        (timeout, wait): (Duration, Wait),
        req: Req,
        f: F,
    ) -> Answer<Resp>
    where
        Req: Clone,
        F: Fn(LeaderElectionServiceClient<Channel>, Request<Req>) -> Fut,
        Fut: Future<Output = Result<Response<Resp>, Status>>,
    {
        let priority = match rpc {
            RpcKind::TryAcquireLock => Priority::Normal,
            RpcKind::KeepAlive | RpcKind::ReleaseLock => Priority::Urgent,
        };
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
            let (channel, connection) = self.transport.channel();
            let client = LeaderElectionServiceClient::new(channel);
            let mut request = Request::new(req.clone());
            request.set_timeout(left);
            let result = match tokio::time::timeout(left, f(client, request)).await {
                Ok(result) => result.map(Response::into_inner),
                Err(_) => Err(Status::deadline_exceeded(format!(
                    "{rpc:?}: no answer within {timeout:?}"
                ))),
            };
            // The slot is free for the next call (a retry queues again).
            drop(permit);
            if result.is_ok() {
                self.transport.answered(connection);
            }
            if let Err(status) = &result {
                // tonic's own deadline (from the request's grpc-timeout) may
                // fire first and say `Cancelled`: a failure at or past the
                // budget is a time-out either way, and the connection may be
                // dead: dial a fresh one for the next call (unless it
                // answers other calls).
                if crate::transport::is_timeout(status, sent_at, left, Instant::now()) {
                    self.transport.call_timed_out(connection, sent_at);
                }
            }
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
