//! The three RPCs as typed calls that record when the request was sent.
//!
//! The send instant is taken just before the request is handed to the
//! transport, so it is never later than the moment the server acts on it: a
//! lease timed from it is conservative.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::config::Scope;
use crate::event::RpcKind;
use crate::proto::leader_election_service_client::LeaderElectionServiceClient;
use crate::proto::{KeepAliveRequest, ReleaseLockRequest, TryAcquireLockRequest};
use crate::state::Observation;
use crate::transport::Transport;

/// An RPC's result with the instant its request was sent.
#[derive(Debug)]
pub(crate) struct Answer<T> {
    pub(crate) sent_at: Instant,
    pub(crate) result: Result<T, Status>,
}

impl<T> Answer<T> {
    fn failure(&self, rpc: RpcKind) -> Option<Observation> {
        self.result
            .as_ref()
            .err()
            .map(|status| Observation::RpcFailed {
                rpc,
                code: status.code(),
                message: status.message().to_string(),
            })
    }
}

impl Answer<bool> {
    /// What a `TryAcquireLock` answer means; a granted lock lasts `ttl`.
    pub(crate) fn observation(&self, ttl: Duration) -> Observation {
        match &self.result {
            Ok(true) => Observation::Acquired {
                sent_at: self.sent_at,
                lease: ttl,
            },
            Ok(false) => Observation::AcquireRefused,
            Err(_) => self
                .failure(RpcKind::TryAcquireLock)
                .unwrap_or(Observation::Tick),
        }
    }
}

impl Answer<Option<Duration>> {
    /// What a `KeepAlive` answer means (`None` lease: refused).
    pub(crate) fn observation(&self) -> Observation {
        match &self.result {
            Ok(Some(lease)) => Observation::Renewed {
                sent_at: self.sent_at,
                lease: *lease,
            },
            Ok(None) => Observation::RenewRefused,
            Err(_) => self
                .failure(RpcKind::KeepAlive)
                .unwrap_or(Observation::Tick),
        }
    }
}

/// Converts the wire's lease to a positive `Duration`; a negative, zero or
/// missing lease means "not the owner".
pub(crate) fn positive_lease(lease: Option<prost_types::Duration>) -> Option<Duration> {
    let lease = lease?;
    if lease.seconds < 0 || lease.nanos < 0 || (lease.seconds == 0 && lease.nanos == 0) {
        return None;
    }
    let secs = u64::try_from(lease.seconds).ok()?;
    let nanos = u32::try_from(lease.nanos).ok()?;
    Some(Duration::from_secs(secs).saturating_add(Duration::from_nanos(u64::from(nanos))))
}

/// Typed calls for one scope over a shared transport.
#[derive(Debug, Clone)]
pub(crate) struct Rpc {
    transport: Arc<Transport>,
    scope: Arc<Scope>,
}

impl Rpc {
    pub(crate) fn new(transport: Arc<Transport>, scope: Arc<Scope>) -> Self {
        Rpc { transport, scope }
    }

    pub(crate) fn scope(&self) -> &Scope {
        &self.scope
    }

    pub(crate) fn transport(&self) -> &Arc<Transport> {
        &self.transport
    }

    pub(crate) async fn try_acquire(&self, timeout: Duration) -> Answer<bool> {
        let s = &self.scope;
        let req = TryAcquireLockRequest {
            service: s.service.clone(),
            domain: s.domain.clone(),
            client_id: s.client_id.clone(),
            ttl: s.ttl_secs,
        };
        let answer = self
            .call(
                RpcKind::TryAcquireLock,
                timeout,
                req,
                |mut c, r| async move { c.try_acquire_lock(r).await },
            )
            .await;
        Answer {
            sent_at: answer.sent_at,
            result: answer.result.map(|r| r.is_leader),
        }
    }

    pub(crate) async fn keep_alive(&self, timeout: Duration) -> Answer<Option<Duration>> {
        let s = &self.scope;
        let req = KeepAliveRequest {
            service: s.service.clone(),
            domain: s.domain.clone(),
            client_id: s.client_id.clone(),
            ttl: s.ttl_secs,
        };
        let answer = self
            .call(RpcKind::KeepAlive, timeout, req, |mut c, r| async move {
                c.keep_alive(r).await
            })
            .await;
        Answer {
            sent_at: answer.sent_at,
            result: answer.result.map(|r| positive_lease(r.lease_length)),
        }
    }

    pub(crate) async fn release(&self, timeout: Duration) -> Result<(), Status> {
        let s = &self.scope;
        let req = ReleaseLockRequest {
            service: s.service.clone(),
            domain: s.domain.clone(),
            client_id: s.client_id.clone(),
        };
        self.call(RpcKind::ReleaseLock, timeout, req, |mut c, r| async move {
            c.release_lock(r).await
        })
        .await
        .result
        .map(|_| ())
    }

    /// One call within `timeout`. A failure that the transport reports at
    /// once (the request was refused or its connection closed, as happens
    /// when a server ages connections out with GOAWAY) is retried up to twice
    /// after a few milliseconds, within the same budget: every call of this
    /// service is idempotent, and the send instant is that of the attempt
    /// that answered, so the lease stays conservative.
    async fn call<Req, Resp, F, Fut>(
        &self,
        rpc: RpcKind,
        timeout: Duration,
        req: Req,
        f: F,
    ) -> Answer<Resp>
    where
        Req: Clone,
        F: Fn(LeaderElectionServiceClient<Channel>, Request<Req>) -> Fut,
        Fut: Future<Output = Result<Response<Resp>, Status>>,
    {
        let budget_end = Instant::now() + timeout;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let client = LeaderElectionServiceClient::new(self.transport.channel());
            let sent_at = Instant::now();
            let left = budget_end.saturating_duration_since(sent_at);
            let mut request = Request::new(req.clone());
            request.set_timeout(left);
            let result = match tokio::time::timeout(left, f(client, request)).await {
                Ok(result) => result.map(Response::into_inner),
                Err(_) => {
                    self.transport.call_timed_out();
                    Err(Status::deadline_exceeded(format!(
                        "{rpc:?}: no answer within {timeout:?}"
                    )))
                }
            };
            let pause = TRANSPORT_RETRY_PAUSE * attempt;
            match result {
                Err(status)
                    if attempt < TRANSPORT_ATTEMPTS
                        && is_transport_failure(&status)
                        && Instant::now() + pause < budget_end =>
                {
                    tracing::debug!(?rpc, attempt, code = ?status.code(), message = status.message(), "call failed in transport; retrying");
                    // Long enough for the connection to take in its GOAWAY,
                    // so the retry goes out on a fresh one.
                    tokio::time::sleep(pause).await;
                }
                Err(status) => {
                    tracing::debug!(?rpc, code = ?status.code(), message = status.message(), "call failed");
                    return Answer {
                        sent_at,
                        result: Err(status),
                    };
                }
                Ok(resp) => {
                    return Answer {
                        sent_at,
                        result: Ok(resp),
                    }
                }
            }
        }
    }
}

/// Attempts per call when the transport fails at once (a GOAWAY race).
const TRANSPORT_ATTEMPTS: u32 = 3;
/// Pause before the n-th retry: n times this.
const TRANSPORT_RETRY_PAUSE: Duration = Duration::from_millis(10);

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
    fn only_positive_leases_count() {
        let d = |seconds, nanos| Some(prost_types::Duration { seconds, nanos });
        assert_eq!(positive_lease(None), None);
        assert_eq!(positive_lease(d(-1, 0)), None);
        assert_eq!(positive_lease(d(0, 0)), None);
        assert_eq!(positive_lease(d(0, -5)), None);
        assert_eq!(positive_lease(d(15, 0)), Some(Duration::from_secs(15)));
        assert_eq!(positive_lease(d(0, 500)), Some(Duration::from_nanos(500)));
    }
}
