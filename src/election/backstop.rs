//! The consumers' backstop of the step-down timer (see [`Backstop`]).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;

use super::Session;
use crate::state::Observation;

/// The furthest a backstop timer is armed ahead (a tokio timer panics
/// beyond about two years).
const BACKSTOP_HORIZON: Duration = Duration::from_secs(365 * 24 * 3600);

/// A consumer's own timer at the published deadline, on the runtime that
/// polls the consumer (the callbacks adapter, a [`Leadership`] stream).
///
/// The driver that keeps the election's step-down timer may sit on a
/// runtime that is alive but no longer run (a current-thread runtime
/// between two `block_on`s, where the keep-alive was started or stopped):
/// nothing tells a live driver to take over then, and without this the
/// term would run out with no `Lost` to the consumers. A tick at a deadline
/// the driver already settled changes nothing: the loss is reported once.
///
/// Cheap on purpose (a process may hold 100,000 streams): none while the
/// driver that keeps the timer runs on the consumer's own runtime (which
/// runs, since it polls the consumer), and a renewal (a later deadline)
/// does not re-arm it: it wakes at the deadline it was armed for, then
/// sleeps on to the current one.
///
/// It is looked at only when its consumer is polled, and a consumer that
/// leaves `Renewed` out (the callbacks, a `without_renewals()` stream) is
/// not woken by a renewal. So the session wakes every subscriber, without
/// an event, whenever what the backstop decided on may have changed with
/// no transition to tell of it: the running term's deadline came closer (a
/// shorter lease answered), a campaign started (perhaps on another runtime
/// than the driver that kept the timer), or that driver died.
#[derive(Debug, Default)]
pub(crate) struct Backstop {
    /// The instant it is armed for, the runtime its sleep belongs to (a
    /// sleep must not be polled after its runtime shut down), the sleep.
    timer: Option<(Instant, tokio::runtime::Id, Pin<Box<tokio::time::Sleep>>)>,
    /// A runtime found without usable timers (built without `enable_time`,
    /// or shut down: polled through a handle kept from it): no backstop is
    /// armed while polled there.
    no_timers: Option<tokio::runtime::Id>,
}

impl Backstop {
    /// `Pending` (woken by the deadline at the latest) while the published
    /// deadline is ahead, or none, or outside a runtime; `Ready` once a
    /// passed deadline was settled: the loss is queued for the caller,
    /// which reads its queue again.
    pub(crate) fn poll(&mut self, session: &Session, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            let Some(deadline) = session.published_deadline() else {
                self.timer = None;
                return Poll::Pending;
            };
            let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                self.timer = None;
                return Poll::Pending;
            };
            let here = runtime.id();
            if session.timer_driver_runs_on(here) {
                self.timer = None;
                return Poll::Pending;
            }
            if self.no_timers == Some(here) {
                return Poll::Pending;
            }
            // A far deadline is slept towards from the horizon on (a tokio
            // timer panics beyond about two years).
            let when = deadline.min(crate::time::after(Instant::now(), BACKSTOP_HORIZON));
            let (armed, sleep) = match &mut self.timer {
                Some((armed, id, sleep)) if *id == here => {
                    if when < *armed {
                        // Moved earlier: re-armed (a later one is not).
                        sleep.as_mut().reset(when);
                        *armed = when;
                    }
                    (armed, sleep)
                }
                _ => {
                    let Some(sleep) = sleep_until(when) else {
                        tracing::warn!(
                            "a leadership stream or the callbacks run on a runtime without \
                             timers (`enable_time`): the loss at the deadline is reported \
                             only by the campaign's runtime"
                        );
                        self.timer = None;
                        self.no_timers = Some(here);
                        return Poll::Pending;
                    };
                    let (armed, _, sleep) = self.timer.insert((when, here, sleep));
                    (armed, sleep)
                }
            };
            match poll_sleep(sleep, cx) {
                Some(Poll::Pending) => return Poll::Pending,
                Some(Poll::Ready(())) => {}
                None => {
                    tracing::warn!(
                        "a leadership stream or the callbacks are polled on a runtime that \
                         shut down (its timers no longer run): the loss at the deadline is \
                         reported only by the campaign's runtime"
                    );
                    self.timer = None;
                    self.no_timers = Some(here);
                    return Poll::Pending;
                }
            }
            if Instant::now() < deadline {
                // Woken at an earlier deadline (renewed since) or at the
                // horizon: sleep on to the current one.
                sleep.as_mut().reset(when);
                *armed = when;
                continue;
            }
            self.timer = None;
            session.observe(Observation::Tick).deliver();
            if session.published_deadline() == Some(deadline) {
                // A passed deadline a tick left in place would be a bug:
                // no spin.
                return Poll::Pending;
            }
            return Poll::Ready(());
        }
    }
}

/// A sleep until `when`, or `None` on a runtime without timers (where tokio
/// panics instead: caught here, so that reading a stream never panics).
fn sleep_until(when: Instant) -> Option<Pin<Box<tokio::time::Sleep>>> {
    std::panic::catch_unwind(|| Box::pin(tokio::time::sleep_until(when))).ok()
}

/// Polls `sleep`; `None` if its runtime's timers shut down (tokio panics
/// then: caught here, so that reading a stream through the handle of a
/// runtime that shut down never panics).
fn poll_sleep(sleep: &mut Pin<Box<tokio::time::Sleep>>, cx: &mut Context<'_>) -> Option<Poll<()>> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sleep.as_mut().poll(cx))).ok()
}
