//! What the client tells operators: log lines, `tracing` spans, and (with the
//! `metrics` feature) metrics. Fed from the two places where things happen,
//! and nowhere else:
//!
//! - **the session's fan-out** ([`Observer::published`]): every leadership
//!   event, whichever task caused it, is logged, counted and turned into
//!   gauge moves here, under the same lock that orders it for the streams;
//!   and every observation updates the health counters ([`Observer::observed`]);
//! - **the RPC call site** ([`RpcAttempt`]): one span and one latency sample
//!   per attempt.
//!
//! # Log levels
//!
//! | what | level |
//! |---|---|
//! | elected, lost (with its reason), another node leads | `info` |
//! | a call failed while leading (with the lease left and the gRPC code) | `warn` |
//! | a call failed with a permanent code (`UNAUTHENTICATED`, `UNIMPLEMENTED`, ...) | `warn` |
//! | a follower's transient failure, each renewal, each failed attempt | `debug` |
//!
//! # Spans
//!
//! One span per client, `quorum_quest.client` (`service`, `domain`,
//! `client_id`), at `WARN` level so that it is there whenever the client's
//! warnings are; the campaign (its calls and steps), the step-down timer and the callbacks run
//! in it, and every log line of the client names it as parent. One span per
//! RPC attempt, `quorum_quest.rpc` (`rpc`, `attempt`, and on close `code` and
//! `latency_ms`), at `DEBUG` level, child of the client span: a renewal every
//! few seconds is not news at `info`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use tokio::time::Instant;
use tonic::{Code, Status};
use tracing::field::Empty;
use tracing::Span;

use crate::backoff::{classify, Class};
use crate::config::Scope;
use crate::event::{LeadershipEvent, LossReason, RpcKind};
use crate::health::Stats;
use crate::state::Observation;
use crate::sync::lock;

/// The span every task and call of one client runs in.
pub(crate) fn client_span(scope: &Scope) -> Span {
    tracing::warn_span!(
        "quorum_quest.client",
        service = &*scope.service,
        domain = &*scope.domain,
        client_id = &*scope.client_id,
    )
}

/// The RPC's name as the service defines it.
pub(crate) fn rpc_name(rpc: RpcKind) -> &'static str {
    match rpc {
        RpcKind::TryAcquireLock => "TryAcquireLock",
        RpcKind::KeepAlive => "KeepAlive",
        RpcKind::ReleaseLock => "ReleaseLock",
    }
}

/// The full gRPC method, as OpenTelemetry names client spans.
fn grpc_method(rpc: RpcKind) -> &'static str {
    match rpc {
        RpcKind::TryAcquireLock => "quorum.quest.api.v1.LeaderElectionService/TryAcquireLock",
        RpcKind::KeepAlive => "quorum.quest.api.v1.LeaderElectionService/KeepAlive",
        RpcKind::ReleaseLock => "quorum.quest.api.v1.LeaderElectionService/ReleaseLock",
    }
}

/// A status code's canonical gRPC name (`OK`, `UNAVAILABLE`, ...): 17
/// values, so a bounded label.
pub(crate) fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// A loss reason as a short label.
pub(crate) fn reason_name(reason: LossReason) -> &'static str {
    match reason {
        LossReason::Expired => "expired",
        LossReason::Rejected => "rejected",
        LossReason::Released => "released",
        LossReason::Failed => "failed",
    }
}

/// One attempt of one RPC: its span, closed with the outcome.
pub(crate) struct RpcAttempt {
    span: Span,
    rpc: RpcKind,
}

impl RpcAttempt {
    /// Opens the span of attempt number `attempt` of `rpc`, under `client`.
    pub(crate) fn start(client: &Span, rpc: RpcKind, attempt: u32) -> Self {
        let span = tracing::debug_span!(
            parent: client,
            "quorum_quest.rpc",
            rpc = rpc_name(rpc),
            attempt,
            code = Empty,
            latency_ms = Empty,
            "otel.name" = grpc_method(rpc),
            "otel.kind" = "client",
            "otel.status_code" = Empty,
            "rpc.system" = "grpc",
        );
        RpcAttempt { span, rpc }
    }

    /// The span to run the attempt in.
    pub(crate) fn span(&self) -> &Span {
        &self.span
    }

    /// Records the outcome of an attempt sent at `sent_at` (`None`: answered)
    /// on the span, and its latency in the RPC histogram.
    pub(crate) fn finish(self, sent_at: Instant, failure: Option<&Status>) {
        let latency = Instant::now().saturating_duration_since(sent_at);
        let code = code_name(failure.map_or(Code::Ok, Status::code));
        self.span.record("code", code);
        self.span
            .record("latency_ms", latency.as_secs_f64() * 1000.0);
        if failure.is_some() {
            self.span.record("otel.status_code", "ERROR");
        }
        #[cfg(feature = "metrics")]
        crate::metrics::rpc_attempt(self.rpc, code, latency);
        #[cfg(not(feature = "metrics"))]
        let _ = self.rpc;
    }
}

/// A session's link to the outside: its span, its health counters, and
/// whether it counts in the leader gauge.
#[derive(Debug)]
pub(crate) struct Observer {
    span: Span,
    stats: Mutex<Stats>,
    /// Whether this session is counted as leading in the leader gauge.
    leading: AtomicBool,
    #[cfg(feature = "metrics")]
    lock: crate::metrics::LockLabels,
}

impl Observer {
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(crate) fn new(scope: &Scope, span: Span) -> Self {
        let observer = Observer {
            span,
            stats: Mutex::new(Stats::default()),
            leading: AtomicBool::new(false),
            #[cfg(feature = "metrics")]
            lock: crate::metrics::LockLabels::new(&scope.service, &scope.domain),
        };
        #[cfg(feature = "metrics")]
        observer.lock.register();
        observer
    }

    /// The client span.
    pub(crate) fn span(&self) -> &Span {
        &self.span
    }

    /// The health counters.
    pub(crate) fn stats(&self) -> std::sync::MutexGuard<'_, Stats> {
        lock(&self.stats)
    }

    /// An observation is about to be applied at `now`.
    pub(crate) fn observed(&self, obs: &Observation, now: Instant) {
        self.stats().observed(obs, now);
    }

    /// The campaign was (re)started at `now`.
    pub(crate) fn campaign_started(&self, now: Instant) {
        self.stats().campaign_started(now);
    }

    /// Events are being handed to the consumers: log, count, move the gauge.
    pub(crate) fn published(&self, events: &[LeadershipEvent]) {
        for ev in events {
            self.log(ev);
            match ev {
                LeadershipEvent::Elected { .. } => self.set_leading(true),
                LeadershipEvent::Lost { .. } => self.set_leading(false),
                _ => {}
            }
            #[cfg(feature = "metrics")]
            self.lock.event(ev);
        }
    }

    fn set_leading(&self, leading: bool) {
        let was = self.leading.swap(leading, Ordering::SeqCst);
        #[cfg(feature = "metrics")]
        if was != leading {
            self.lock.leading(leading);
        }
        #[cfg(not(feature = "metrics"))]
        let _ = was;
    }

    /// The one place where leadership events become log lines.
    fn log(&self, ev: &LeadershipEvent) {
        let span = &self.span;
        match ev {
            LeadershipEvent::Elected {
                term,
                lease_remaining,
            } => tracing::info!(
                parent: span,
                term = term.id(),
                ?lease_remaining,
                "elected leader"
            ),
            LeadershipEvent::Renewed {
                term_id,
                lease_remaining,
            } => tracing::debug!(parent: span, term = term_id, ?lease_remaining, "lease renewed"),
            LeadershipEvent::Follower => {
                tracing::info!(parent: span, "another node holds the lock")
            }
            LeadershipEvent::Lost { term, reason } => tracing::info!(
                parent: span,
                term = term.id(),
                reason = reason_name(*reason),
                "lost leadership: {reason}"
            ),
            LeadershipEvent::RpcFailed {
                rpc,
                code,
                message,
                lease_remaining,
            } => {
                let failures = self.stats().consecutive_failures();
                let (rpc, code_label) = (rpc_name(*rpc), code_name(*code));
                match lease_remaining {
                    Some(left) => tracing::warn!(
                        parent: span,
                        rpc,
                        code = code_label,
                        lease_remaining = ?left,
                        consecutive_failures = failures,
                        error = message.as_str(),
                        "{rpc} failed while leading; retrying while the lease lasts"
                    ),
                    None if classify(*code) == Class::Permanent => tracing::warn!(
                        parent: span,
                        rpc,
                        code = code_label,
                        consecutive_failures = failures,
                        error = message.as_str(),
                        "{rpc} failed with a permanent error; retrying at the retry period"
                    ),
                    None => tracing::debug!(
                        parent: span,
                        rpc,
                        code = code_label,
                        consecutive_failures = failures,
                        error = message.as_str(),
                        "{rpc} failed"
                    ),
                }
            }
        }
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        // A session never goes away leading without `Lost` in practice;
        // this keeps the gauge right even if one did.
        self.set_leading(false);
    }
}
