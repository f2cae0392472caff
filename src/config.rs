//! Everything a user sets, validated in one place.
//!
//! Validation happens before any network I/O, so a typo fails fast with an
//! [`Error::InvalidParameter`](crate::Error::InvalidParameter) that names the
//! parameter, instead of surfacing later as a confusing RPC failure.

use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, Result};

/// Upper bound for the default follower retry period.
const MAX_DEFAULT_RETRY: Duration = Duration::from_secs(2);
/// Lower bound for the default safety margin.
const MIN_DEFAULT_MARGIN: Duration = Duration::from_millis(100);
/// Upper bound for the default per-RPC timeout.
const MAX_DEFAULT_RPC_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest value any duration knob may take: the largest TTL the wire
/// can carry (`i32::MAX` seconds, about 68 years). Larger values cannot be
/// meant, and would overflow instant arithmetic.
pub(crate) const MAX_KNOB: Duration = Duration::from_secs(i32::MAX as u64);
/// Default connect timeout for eager connects.
pub(crate) const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The lock a client campaigns for and the identity it campaigns with.
///
/// The names are shared (`Arc<str>`): the identity registry's claim
/// ([`crate::identity`]) holds the same strings, and a client made with
/// `for_scope` shares its parent's client id (and its service when it is the
/// same), so 100,000 shards do not hold 100,000 copies of one id.
#[derive(Debug, Clone)]
pub(crate) struct Scope {
    pub(crate) service: Arc<str>,
    pub(crate) domain: Arc<str>,
    pub(crate) client_id: Arc<str>,
    /// The TTL in whole seconds, as sent on the wire.
    pub(crate) ttl_secs: i32,
    /// A random tag that makes this client's retired-identity names its own
    /// (`client_id#N.tag`), so they cannot equal another contender's id.
    tag: u32,
}

impl Scope {
    pub(crate) fn new(
        service: String,
        domain: String,
        client_id: Option<String>,
        ttl: Duration,
    ) -> Result<Self> {
        validate_name("service", &service)?;
        validate_name("domain", &domain)?;
        let client_id = match client_id {
            Some(id) => {
                validate_name("client_id", &id)?;
                id
            }
            None => uuid::Uuid::new_v4().to_string(),
        };
        let ttl_secs = validate_ttl(ttl)?;
        Ok(Scope {
            service: service.into(),
            domain: domain.into(),
            client_id: client_id.into(),
            ttl_secs,
            tag: fastrand::u32(..),
        })
    }

    /// The scope of another (service, domain) lock with this scope's
    /// identity and TTL (and a tag of its own): what `for_scope` makes. The
    /// client id, and the service when it is the same, are shared, not
    /// copied.
    pub(crate) fn sibling(&self, service: String, domain: String) -> Result<Self> {
        validate_name("service", &service)?;
        validate_name("domain", &domain)?;
        let service = if *self.service == *service {
            self.service.clone()
        } else {
            service.into()
        };
        Ok(Scope {
            service,
            domain: domain.into(),
            client_id: self.client_id.clone(),
            ttl_secs: self.ttl_secs,
            tag: fastrand::u32(..),
        })
    }

    /// The identity sent on the wire for `incarnation`: the client id itself
    /// first, then `client_id#N.tag` after a release whose outcome was
    /// unknown (see the state machine's fences), so that no request of an
    /// earlier incarnation can touch a lock taken by a later one. The random
    /// tag keeps the name from equalling another contender's id (`node#1`).
    pub(crate) fn wire_id(&self, incarnation: u32) -> String {
        if incarnation == 0 {
            // Not `to_string`: that formats through `Display`.
            String::from(&*self.client_id)
        } else {
            format!("{}#{incarnation}.{:08x}", self.client_id, self.tag)
        }
    }

    /// The TTL as a `Duration`.
    pub(crate) fn ttl(&self) -> Duration {
        Duration::from_secs(u64::from(self.ttl_secs.unsigned_abs()))
    }
}

fn validate_name(param: &str, value: &str) -> Result<()> {
    if value.trim().is_empty() {
        return Err(Error::invalid(param, "must not be empty"));
    }
    if value.chars().any(char::is_control) {
        return Err(Error::invalid(
            param,
            format!("must not contain control characters (got {value:?})"),
        ));
    }
    Ok(())
}

/// Checks that `ttl` is a whole, positive number of seconds that fits the
/// wire's `int32`, and returns it in seconds.
pub(crate) fn validate_ttl(ttl: Duration) -> Result<i32> {
    if ttl.is_zero() {
        return Err(Error::invalid("ttl", "must be at least 1 second (got 0)"));
    }
    if ttl.subsec_nanos() != 0 {
        return Err(Error::invalid(
            "ttl",
            format!("must be a whole number of seconds (got {ttl:?}); the server counts the lease in seconds"),
        ));
    }
    i32::try_from(ttl.as_secs()).map_err(|_| {
        Error::invalid(
            "ttl",
            format!(
                "must be at most {} seconds (got {} s)",
                i32::MAX,
                ttl.as_secs()
            ),
        )
    })
}

/// The timing knobs of an election.
///
/// Every field has a default derived from the TTL (see
/// [`ClientBuilder`](crate::ClientBuilder)); [`Timing::for_ttl`] computes them.
///
/// ```
/// use std::time::Duration;
/// use quorum_quest_client::Timing;
///
/// let t = Timing::for_ttl(Duration::from_secs(15));
/// assert_eq!(t.renew_interval, Duration::from_secs(5));
/// assert_eq!(t.retry_period, Duration::from_secs(2));
/// assert_eq!(t.safety_margin, Duration::from_millis(1500));
/// assert_eq!(t.rpc_timeout, Duration::from_secs(5));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Timing {
    /// How often a leader renews its lease (default: ttl / 3).
    pub renew_interval: Duration,
    /// How often a follower tries to acquire the lock (default: ttl / 3,
    /// capped at 2 s); each wait is jittered by ±20 %.
    pub retry_period: Duration,
    /// How long one RPC may take before it counts as failed (default:
    /// ttl / 3, capped at 5 s). A leader's renewals are further capped by the
    /// time left on its lease.
    pub rpc_timeout: Duration,
    /// How long before the server-side expiry a leader steps down (default:
    /// max(ttl / 10, 100 ms)). Covers clock-rate differences and the delay
    /// between sending a request and the server acting on it.
    pub safety_margin: Duration,
}

impl Timing {
    /// The default timing for a TTL.
    #[must_use]
    pub fn for_ttl(ttl: Duration) -> Self {
        let third = ttl / 3;
        Timing {
            renew_interval: third,
            retry_period: third.min(MAX_DEFAULT_RETRY),
            rpc_timeout: third.min(MAX_DEFAULT_RPC_TIMEOUT),
            safety_margin: (ttl / 10).max(MIN_DEFAULT_MARGIN),
        }
    }

    /// Rejects combinations that cannot keep a lease safely.
    pub(crate) fn validate(&self, ttl: Duration) -> Result<()> {
        let nonzero = [
            ("renew_interval", self.renew_interval),
            ("retry_period", self.retry_period),
            ("rpc_timeout", self.rpc_timeout),
            ("safety_margin", self.safety_margin),
        ];
        for (param, value) in nonzero {
            if value.is_zero() {
                return Err(Error::invalid(param, "must be greater than zero"));
            }
            check_max(param, value)?;
        }
        if ttl.saturating_sub(self.safety_margin) < crate::state::MIN_USABLE_LEASE {
            return Err(Error::invalid(
                "safety_margin",
                format!(
                    "must leave at least {:?} of the ttl (got {:?} with ttl {ttl:?})",
                    crate::state::MIN_USABLE_LEASE,
                    self.safety_margin
                ),
            ));
        }
        let usable = ttl - self.safety_margin;
        if self.renew_interval >= usable {
            return Err(Error::invalid(
                "renew_interval",
                format!(
                    "must be smaller than ttl - safety_margin = {usable:?} (got {:?}), or the lease runs out before the first renewal",
                    self.renew_interval
                ),
            ));
        }
        Ok(())
    }
}

/// Rejects a duration knob over [`MAX_KNOB`].
pub(crate) fn check_max(param: &str, value: Duration) -> Result<()> {
    if value > MAX_KNOB {
        return Err(Error::invalid(
            param,
            format!(
                "must be at most {} seconds (got {value:?})",
                MAX_KNOB.as_secs()
            ),
        ));
    }
    Ok(())
}

/// Timing overrides collected by the builder; `None` means "derive from the TTL".
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct TimingOverrides {
    pub(crate) renew_interval: Option<Duration>,
    pub(crate) retry_period: Option<Duration>,
    pub(crate) rpc_timeout: Option<Duration>,
    pub(crate) safety_margin: Option<Duration>,
}

impl TimingOverrides {
    pub(crate) fn resolve(&self, ttl: Duration) -> Result<Timing> {
        let d = Timing::for_ttl(ttl);
        let t = Timing {
            renew_interval: self.renew_interval.unwrap_or(d.renew_interval),
            retry_period: self.retry_period.unwrap_or(d.retry_period),
            rpc_timeout: self.rpc_timeout.unwrap_or(d.rpc_timeout),
            safety_margin: self.safety_margin.unwrap_or(d.safety_margin),
        };
        t.validate(ttl)?;
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(r: Result<impl std::fmt::Debug>) -> String {
        match r {
            Err(Error::InvalidParameter(m)) => m,
            other => panic!("expected InvalidParameter, got {other:?}"),
        }
    }

    #[test]
    fn ttl_must_be_whole_positive_seconds_within_i32() {
        assert_eq!(validate_ttl(Duration::from_secs(15)).ok(), Some(15));
        assert!(msg(validate_ttl(Duration::ZERO)).starts_with("ttl:"));
        assert!(msg(validate_ttl(Duration::from_millis(500))).contains("whole number"));
        assert!(msg(validate_ttl(Duration::from_millis(1500))).contains("whole number"));
        assert_eq!(
            validate_ttl(Duration::from_secs(i32::MAX as u64)).ok(),
            Some(i32::MAX)
        );
        assert!(msg(validate_ttl(Duration::from_secs(i32::MAX as u64 + 1))).contains("at most"));
    }

    #[test]
    fn default_timing_is_valid_for_every_small_ttl() {
        for s in 1..=120 {
            let ttl = Duration::from_secs(s);
            Timing::for_ttl(ttl).validate(ttl).unwrap();
        }
    }

    #[test]
    fn impossible_timing_is_rejected_naming_the_knob() {
        let ttl = Duration::from_secs(3);
        let o = TimingOverrides {
            safety_margin: Some(Duration::from_secs(3)),
            ..Default::default()
        };
        assert!(msg(o.resolve(ttl)).starts_with("safety_margin:"));
        let o = TimingOverrides {
            renew_interval: Some(Duration::from_millis(2700)),
            ..Default::default()
        };
        assert!(msg(o.resolve(ttl)).starts_with("renew_interval:"));
        let o = TimingOverrides {
            retry_period: Some(Duration::ZERO),
            ..Default::default()
        };
        assert!(msg(o.resolve(ttl)).starts_with("retry_period:"));
        let o = TimingOverrides {
            rpc_timeout: Some(Duration::ZERO),
            ..Default::default()
        };
        assert!(msg(o.resolve(ttl)).starts_with("rpc_timeout:"));
        for o in [
            TimingOverrides {
                rpc_timeout: Some(Duration::MAX),
                ..Default::default()
            },
            TimingOverrides {
                retry_period: Some(Duration::MAX),
                ..Default::default()
            },
        ] {
            assert!(msg(o.resolve(ttl)).contains("at most"));
        }
    }

    #[test]
    fn scope_rejects_empty_names_and_generates_ids() {
        let ttl = Duration::from_secs(5);
        assert!(msg(Scope::new("".into(), "d".into(), None, ttl)).starts_with("service:"));
        assert!(msg(Scope::new("s".into(), "  ".into(), None, ttl)).starts_with("domain:"));
        assert!(
            msg(Scope::new("s".into(), "d".into(), Some(String::new()), ttl))
                .starts_with("client_id:")
        );
        let a = Scope::new("s".into(), "d".into(), None, ttl).unwrap();
        let b = Scope::new("s".into(), "d".into(), None, ttl).unwrap();
        assert_ne!(a.client_id, b.client_id);
        assert_eq!(a.ttl(), ttl);
    }

    #[test]
    fn a_sibling_scope_shares_the_identity_and_validates_its_names() {
        let ttl = Duration::from_secs(7);
        let a = Scope::new("s".into(), "d".into(), Some("node".into()), ttl).unwrap();
        let b = a.sibling("s".into(), "shard-1".into()).unwrap();
        assert!(Arc::ptr_eq(&a.client_id, &b.client_id));
        assert!(Arc::ptr_eq(&a.service, &b.service));
        assert_eq!(&*b.domain, "shard-1");
        assert_eq!(b.ttl(), ttl);
        assert_eq!(b.wire_id(0), "node");
        assert!(b.wire_id(1).starts_with("node#1."));
        let c = a.sibling("other".into(), "d".into()).unwrap();
        assert_eq!(&*c.service, "other");
        assert!(msg(a.sibling("".into(), "d".into())).starts_with("service:"));
        assert!(msg(a.sibling("s".into(), "\n".into())).starts_with("domain:"));
    }
}
