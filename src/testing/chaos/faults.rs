//! The fault kinds ([`FaultKind`]) and how the harness injects and heals
//! each one.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::{sleep, sleep_until, timeout, Instant};
use tonic::Status;

use super::contender::Command;
use super::harness::Harness;
use super::schedule::Draw;
use super::SETTLE_WAIT;
use crate::testing::{LeasePolicy, ProxyMode};
use crate::RpcKind;

/// One kind of fault the schedule injects.
///
/// ```
/// use quorum_quest_client::testing::chaos::FaultKind;
///
/// assert_eq!("blackhole".parse::<FaultKind>(), Ok(FaultKind::Blackhole));
/// assert_eq!(FaultKind::Goaway.to_string(), "goaway");
/// assert!(!FaultKind::STANDARD.contains(&FaultKind::RestartDroppingLocks));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum FaultKind {
    /// One contender's network black-holes (nothing flows, sockets stay open)
    /// for 0.2 to 1.6 TTL, then heals.
    Blackhole,
    /// One contender's connections are reset (TCP RST), and new ones too, for
    /// up to half a second.
    Reset,
    /// The server hangs every call for 0.2 to 1.2 TTL.
    ServerPause,
    /// GOAWAY churn: for 0.5 to 1 TTL, connections get HTTP/2 GOAWAY every
    /// 100-600 ms (one contender's or everyone's), as the real server's
    /// `MaxConnectionAge` does.
    Goaway,
    /// Every answer is delayed (by 0.1 to 1.4 × the client's RPC timeout) for
    /// 0.3 to 1 TTL.
    Latency,
    /// The next 1 to 4 calls (of any RPC, or only `KeepAlive`) answer
    /// `UNAVAILABLE`.
    Unavailable,
    /// The server restarts keeping its lock table (every connection cut).
    Restart,
    /// A contender (the leader, more often than not) resigns, sits out 0.2 to
    /// 1.2 TTL, and campaigns again.
    Resign,
    /// The leader's stream is dropped mid-term (no resign); the contender
    /// rejoins later with a new stream.
    StreamDrop,
    /// One contender's live connections are held
    /// ([`FaultProxy::hold_live`](crate::testing::FaultProxy::hold_live)) long enough for its calls to time out and
    /// its client to dial a new connection (1.5 to 3.5 RPC timeouts); more
    /// often than not the contender resigns meanwhile (its release stalls on
    /// the held connection), sits out 2 to 10 % of a TTL and campaigns again. Then the
    /// held bytes reach the server ([`FaultProxy::deliver_held`](crate::testing::FaultProxy::deliver_held)), after the
    /// contender leads again if it does within a TTL: a stale release (or
    /// renewal, or acquire) delivered into a newer term. Held bytes reach
    /// the server at most about 3 TTLs after they were sent.
    DelayedDelivery,
    /// For 0.5 to 1.5 TTL, the server answers owners' `KeepAlive` with a
    /// hostile `lease_length` ([`LeasePolicy::Answer`] or
    /// [`LeasePolicy::Missing`]): far too long (3600 s, 1000 TTLs,
    /// `i64::MAX` s), far too short (1 ns, 0), negative, or out of range
    /// (nanos beyond a second, mixed signs, `i64::MIN` s). After a long one,
    /// the server sometimes pauses for about a TTL: a client that believed
    /// the long lease would lead past the real expiry.
    HostileLease,
    /// For 1 to 2 TTLs, the server grants renewals shorter than asked
    /// ([`LeasePolicy::ClampRenewals`]) and says so in the answer: half to
    /// 0.9 of the TTL, or (half the time) between the clients' safety margin
    /// and their renew interval, so that the lease runs out before the next
    /// renewal and the client must step down by its timer.
    ClampLease,
    /// For 1 to 2 TTLs, refusals (`is_leader = false`, `-1 s`) are decided on
    /// arrival but answered 0.5 to 2 RPC timeouts later
    /// ([`TestServer::set_refusal_delay`](crate::testing::TestServer::set_refusal_delay)): old refusals arrive after newer
    /// grants.
    DelayedRefusal,
    /// The leader's runtime is starved: the thread of its current-thread
    /// runtime (which runs its client and its stream consumer) is blocked
    /// with `std::thread::sleep` for 2 safety margins to 1.5 TTLs. Work
    /// bound to the term must stop by the deadline all the same: the term's
    /// end is observed from the harness's own runtime.
    StarvedRuntime,
    /// The server restarts *dropping* its lock table while someone leads. Not
    /// in [`FaultKind::STANDARD`]: without fencing tokens no client can avoid
    /// an overlap then; it is measured ([`ChaosReport::drop_samples`](super::ChaosReport::drop_samples)), not
    /// counted as a violation.
    RestartDroppingLocks,
}

impl FaultKind {
    /// Every kind the protocol must survive without a violation.
    pub const STANDARD: [FaultKind; 14] = [
        FaultKind::Blackhole,
        FaultKind::Reset,
        FaultKind::ServerPause,
        FaultKind::Goaway,
        FaultKind::Latency,
        FaultKind::Unavailable,
        FaultKind::Restart,
        FaultKind::Resign,
        FaultKind::StreamDrop,
        FaultKind::DelayedDelivery,
        FaultKind::HostileLease,
        FaultKind::ClampLease,
        FaultKind::DelayedRefusal,
        FaultKind::StarvedRuntime,
    ];

    /// Every kind, [`FaultKind::RestartDroppingLocks`] included.
    pub const ALL: [FaultKind; 15] = [
        FaultKind::Blackhole,
        FaultKind::Reset,
        FaultKind::ServerPause,
        FaultKind::Goaway,
        FaultKind::Latency,
        FaultKind::Unavailable,
        FaultKind::Restart,
        FaultKind::Resign,
        FaultKind::StreamDrop,
        FaultKind::DelayedDelivery,
        FaultKind::HostileLease,
        FaultKind::ClampLease,
        FaultKind::DelayedRefusal,
        FaultKind::StarvedRuntime,
        FaultKind::RestartDroppingLocks,
    ];

    /// The short name used in the summary line and on the command line.
    ///
    /// ```
    /// use quorum_quest_client::testing::chaos::FaultKind;
    ///
    /// assert_eq!(FaultKind::RestartDroppingLocks.name(), "restart-drop");
    /// ```
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Blackhole => "blackhole",
            FaultKind::Reset => "reset",
            FaultKind::ServerPause => "pause",
            FaultKind::Goaway => "goaway",
            FaultKind::Latency => "latency",
            FaultKind::Unavailable => "unavailable",
            FaultKind::Restart => "restart",
            FaultKind::Resign => "resign",
            FaultKind::StreamDrop => "drop",
            FaultKind::DelayedDelivery => "delayed-delivery",
            FaultKind::HostileLease => "hostile-lease",
            FaultKind::ClampLease => "clamp-lease",
            FaultKind::DelayedRefusal => "delayed-refusal",
            FaultKind::StarvedRuntime => "starved-runtime",
            FaultKind::RestartDroppingLocks => "restart-drop",
        }
    }

    pub(super) fn on_server_lane(self) -> bool {
        matches!(
            self,
            FaultKind::ServerPause
                | FaultKind::Goaway
                | FaultKind::Latency
                | FaultKind::Unavailable
                | FaultKind::Restart
                | FaultKind::RestartDroppingLocks
                | FaultKind::HostileLease
                | FaultKind::ClampLease
                | FaultKind::DelayedRefusal
        )
    }

    /// Whether the fault may keep everyone from leading for a while.
    pub(super) fn blocks(self) -> Blocking {
        match self {
            // A hostile or clamped lease may end every term early, and a
            // late refusal may delay the next election.
            FaultKind::ServerPause
            | FaultKind::RestartDroppingLocks
            | FaultKind::HostileLease
            | FaultKind::ClampLease
            | FaultKind::DelayedRefusal => Blocking::Always,
            FaultKind::Latency => Blocking::IfSlowerThanTimeout,
            FaultKind::Blackhole
            | FaultKind::Resign
            | FaultKind::StreamDrop
            | FaultKind::DelayedDelivery
            | FaultKind::StarvedRuntime => Blocking::IfTargetLed,
            // Transient by the rules (SPEC §3.3): a reset, a GOAWAY, a quick
            // restart or a few UNAVAILABLE answers while the lease is valid
            // must not cost leadership.
            FaultKind::Reset | FaultKind::Goaway | FaultKind::Restart | FaultKind::Unavailable => {
                Blocking::Never
            }
        }
    }
}

/// How a fault may keep everyone from leading (see the availability figure).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Blocking {
    /// Always.
    Always,
    /// When the target contender led during the fault.
    IfTargetLed,
    /// When answers came slower than (most of) the client's RPC timeout.
    IfSlowerThanTimeout,
    /// Never: transient by the rules.
    Never,
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The error of parsing an unknown [`FaultKind`] name.
///
/// ```
/// use quorum_quest_client::testing::chaos::FaultKind;
///
/// let err = "earthquake".parse::<FaultKind>().unwrap_err();
/// assert!(err.to_string().contains("earthquake"));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnknownFaultKind(String);

impl fmt::Display for UnknownFaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = FaultKind::ALL.iter().map(|k| k.name()).collect();
        write!(
            f,
            "unknown fault kind {:?} (known: {})",
            self.0,
            names.join(", ")
        )
    }
}

impl std::error::Error for UnknownFaultKind {}

impl FromStr for FaultKind {
    type Err = UnknownFaultKind;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        FaultKind::ALL
            .into_iter()
            .find(|k| k.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| UnknownFaultKind(s.to_string()))
    }
}

impl Harness {
    /// Injects one fault and heals it; false if it could not be injected.
    pub(super) async fn inject(&self, kind: FaultKind, d: Draw) -> bool {
        let ttl = self.config.ttl;
        let start = Instant::now();
        match kind {
            FaultKind::Blackhole => {
                let t = self.target(&d);
                let proxy = &self.contenders[t].proxy;
                proxy.set_mode(ProxyMode::Blackhole);
                sleep(ttl.mul_f64(0.2 + 1.4 * d.a)).await;
                proxy.set_mode(ProxyMode::Pass);
                self.recorded(kind, Some(t), start, Instant::now());
            }
            FaultKind::Reset => {
                let t = self.target(&d);
                let proxy = &self.contenders[t].proxy;
                proxy.set_mode(ProxyMode::Reset);
                sleep(Duration::from_millis(50) + Duration::from_millis(450).mul_f64(d.a)).await;
                proxy.set_mode(ProxyMode::Pass);
                self.recorded(kind, Some(t), start, Instant::now());
            }
            FaultKind::ServerPause => {
                self.server.pause();
                sleep(ttl.mul_f64(0.2 + d.a)).await;
                self.server.resume();
                self.recorded(kind, None, start, Instant::now());
            }
            FaultKind::Goaway => {
                // A churn window: GOAWAY to one contender or to all, every
                // 100-600 ms. The ticks come from a sub-generator so their
                // number does not shift the main schedule.
                let window = ttl.mul_f64(0.5 + 0.5 * d.a);
                let mut sub = fastrand::Rng::with_seed(d.sub);
                let mut at = Duration::ZERO;
                loop {
                    at += Duration::from_millis(sub.u64(100..=600));
                    if at >= window {
                        break;
                    }
                    let everyone = sub.f64() < 0.3;
                    let one = sub.usize(..self.contenders.len());
                    sleep_until(start + at).await;
                    for (i, c) in self.contenders.iter().enumerate() {
                        if everyone || i == one {
                            c.relay.goaway();
                        }
                    }
                }
                sleep_until(start + window).await;
                self.recorded(kind, None, start, Instant::now());
            }
            FaultKind::Latency => {
                let latency = self.timing.rpc_timeout.mul_f64(0.1 + 1.4 * d.a);
                self.server.set_latency(latency);
                sleep(ttl.mul_f64(0.3 + 0.7 * d.b)).await;
                self.server.set_latency(Duration::ZERO);
                self.recorded_with(kind, None, start, Instant::now(), latency);
            }
            FaultKind::Unavailable => {
                let n = 1 + (d.a * 4.0) as usize;
                let rpc = (d.b >= 0.5).then_some(RpcKind::KeepAlive);
                self.server
                    .fail_next(n, rpc, Status::unavailable("chaos: injected UNAVAILABLE"));
                // The burst is used up by the next calls; count a TTL for it.
                self.recorded(kind, None, start, start + ttl);
            }
            FaultKind::Restart | FaultKind::RestartDroppingLocks => {
                let keep = kind == FaultKind::Restart;
                if !keep && self.wait_for_leader(ttl * 2).await.is_none() {
                    return false;
                }
                let start = Instant::now();
                let restarted = self.server.restart(keep).await;
                self.cut_all_relays();
                if let Err(e) = restarted {
                    self.problem(format!("server restart (keep_locks={keep}) failed: {e}"));
                    return false;
                }
                self.recorded(kind, None, start, Instant::now());
            }
            FaultKind::DelayedDelivery => return self.delayed_delivery(kind, &d).await,
            FaultKind::HostileLease => {
                let mut sub = fastrand::Rng::with_seed(d.sub);
                let ttl_secs = i64::try_from(ttl.as_secs()).unwrap_or(1);
                let policies = [
                    LeasePolicy::Answer {
                        seconds: 3600,
                        nanos: 0,
                    },
                    LeasePolicy::Answer {
                        seconds: ttl_secs.saturating_mul(1000),
                        nanos: 0,
                    },
                    LeasePolicy::Answer {
                        seconds: i64::MAX,
                        nanos: 999_999_999,
                    },
                    LeasePolicy::Answer {
                        seconds: 0,
                        nanos: 1,
                    },
                    LeasePolicy::Answer {
                        seconds: 0,
                        nanos: 0,
                    },
                    LeasePolicy::Answer {
                        seconds: i64::MIN,
                        nanos: 0,
                    },
                    LeasePolicy::Answer {
                        seconds: 1,
                        nanos: 1_000_000_000,
                    },
                    LeasePolicy::Answer {
                        seconds: 0,
                        nanos: -1,
                    },
                    LeasePolicy::Answer {
                        seconds: 2,
                        nanos: -500_000_000,
                    },
                    LeasePolicy::Answer {
                        seconds: -2,
                        nanos: 500_000_000,
                    },
                    LeasePolicy::Missing,
                ];
                let policy = policies[sub.usize(..policies.len())];
                self.server.set_lease_policy(policy);
                sleep(ttl.mul_f64(0.5 + d.a)).await;
                let long =
                    matches!(policy, LeasePolicy::Answer { seconds, .. } if seconds > ttl_secs);
                if long && d.b < 0.5 {
                    // The server goes silent after granting "long" leases:
                    // whoever believed one would lead past the real expiry.
                    self.server.pause();
                    self.server.set_lease_policy(LeasePolicy::AsAsked);
                    sleep(ttl.mul_f64(0.8 + 0.4 * sub.f64())).await;
                    self.server.resume();
                } else {
                    self.server.set_lease_policy(LeasePolicy::AsAsked);
                }
                tracing::debug!(?policy, "hostile lease healed");
                self.recorded(kind, None, start, Instant::now());
            }
            FaultKind::ClampLease => {
                let margin = self.timing.safety_margin;
                let renew = self.timing.renew_interval;
                let clamp = if d.b < 0.5 && renew > margin {
                    // Shorter than the renew interval: the lease runs out
                    // before the next renewal.
                    margin + (renew - margin).mul_f64(0.3 + 0.6 * d.a)
                } else {
                    ttl.mul_f64(0.5 + 0.4 * d.a).max(margin * 2)
                };
                self.server
                    .set_lease_policy(LeasePolicy::ClampRenewals(clamp));
                let mut sub = fastrand::Rng::with_seed(d.sub);
                sleep(ttl.mul_f64(1.0 + sub.f64())).await;
                self.server.set_lease_policy(LeasePolicy::AsAsked);
                self.recorded_with(kind, None, start, Instant::now(), clamp);
            }
            FaultKind::DelayedRefusal => {
                let delay = self.timing.rpc_timeout.mul_f64(0.5 + 1.5 * d.a);
                self.server.set_refusal_delay(delay);
                sleep(ttl.mul_f64(1.0 + d.b)).await;
                self.server.set_refusal_delay(Duration::ZERO);
                // Refusals decided before the heal still arrive later.
                self.recorded_with(kind, None, start, Instant::now() + delay, delay);
            }
            FaultKind::StarvedRuntime => {
                let Some(t) = self.wait_for_leader(ttl * 2).await else {
                    return false;
                };
                let start = Instant::now();
                let margin = self.timing.safety_margin;
                let longest = ttl.mul_f64(1.5).max(margin * 3);
                let block = margin * 2 + (longest - margin * 2).mul_f64(d.a);
                let (done, back) = oneshot::channel();
                let c = &self.contenders[t];
                if c.commands.send(Command::Starve { block, done }).is_err() {
                    self.problem(format!("{}: contender task is gone", c.id));
                    return false;
                }
                let bound = block + SETTLE_WAIT;
                if !matches!(timeout(bound, back).await, Ok(Ok(()))) {
                    self.problem(format!(
                        "{}: its runtime was not starved and back within {bound:?}",
                        c.id
                    ));
                }
                self.recorded_with(kind, Some(t), start, Instant::now(), block);
            }
            FaultKind::Resign | FaultKind::StreamDrop => {
                let t = if kind == FaultKind::StreamDrop {
                    match self.wait_for_leader(ttl * 2).await {
                        Some(t) => t,
                        None => return false,
                    }
                } else {
                    self.target(&d)
                };
                let start = Instant::now();
                let out = ttl.mul_f64(0.2 + d.a);
                let (done, back) = oneshot::channel();
                let command = if kind == FaultKind::Resign {
                    Command::Resign { out, done }
                } else {
                    Command::Drop { out, done }
                };
                let c = &self.contenders[t];
                if c.commands.send(command).is_err() {
                    self.problem(format!("{}: contender task is gone", c.id));
                    return false;
                }
                let bound = out + ttl * 3 + SETTLE_WAIT;
                if !matches!(timeout(bound, back).await, Ok(Ok(()))) {
                    self.problem(format!(
                        "{}: did not rejoin within {bound:?} after {kind}",
                        c.id
                    ));
                }
                self.recorded(kind, Some(t), start, Instant::now());
            }
        }
        true
    }

    /// [`FaultKind::DelayedDelivery`]: hold one contender's live connections,
    /// maybe resign it meanwhile, then deliver the held bytes (after it leads
    /// again, if it does soon).
    async fn delayed_delivery(&self, kind: FaultKind, d: &Draw) -> bool {
        let ttl = self.config.ttl;
        let t = self.target(d);
        let start = Instant::now();
        let c = &self.contenders[t];
        let mut sub = fastrand::Rng::with_seed(d.sub);
        c.proxy.hold_live();
        let mut rejoined = None;
        if d.b < 0.6 {
            // Its release stalls on the held connection. A short sit-out, so
            // that it is the likeliest to take the lock again (it is free if
            // a retried release got through, or still its own if not).
            let out = ttl.mul_f64(0.02 + 0.08 * sub.f64());
            let (done, back) = oneshot::channel();
            if c.commands.send(Command::Resign { out, done }).is_err() {
                c.proxy.deliver_held();
                self.problem(format!("{}: contender task is gone", c.id));
                return false;
            }
            rejoined = Some((out, back));
        }
        // Long enough for its calls to time out and its client to dial anew.
        sleep(self.timing.rpc_timeout.mul_f64(1.5 + 2.0 * d.a)).await;
        if let Some((out, back)) = rejoined {
            let bound = out + ttl * 3 + SETTLE_WAIT;
            if !matches!(timeout(bound, back).await, Ok(Ok(()))) {
                self.problem(format!(
                    "{}: did not rejoin within {bound:?} after {kind}",
                    c.id
                ));
            }
            // Deliver into its next term, if it gets one soon.
            let deadline = Instant::now() + ttl;
            while !c.client.is_leader() && Instant::now() < deadline {
                sleep(Duration::from_millis(20)).await;
            }
            sleep(self.timing.retry_period.mul_f64(sub.f64())).await;
        }
        c.proxy.deliver_held();
        self.recorded(kind, Some(t), start, Instant::now());
        true
    }
}
