//! [`LeadershipStreamExt`]: combinators for the pipelines users build on a
//! leadership stream, and the streams they return.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use futures::stream::FusedStream;
use futures::Stream;
use pin_project_lite::pin_project;

use crate::callbacks::{drive_callbacks, Callbacks};
use crate::event::LeadershipEvent;

/// Combinators for any `Stream<Item = LeadershipEvent>`.
///
/// Each returns a named stream type that is `Send` when the input is, `Unpin`
/// when the input is, and needs no `'static` input.
///
/// ```no_run
/// use futures::StreamExt;
/// use quorum_quest_client::{LeadershipStreamExt, QuorumQuestClient};
///
/// # async fn demo(client: QuorumQuestClient) {
/// // A stream of "am I leader now?" answers, one per change.
/// let mut changes = client.leadership().leader_changes();
/// while let Some(is_leader) = changes.next().await {
///     println!("leader: {is_leader}");
/// }
/// # }
/// ```
pub trait LeadershipStreamExt: Stream<Item = LeadershipEvent> + Sized {
    /// Only the state changes: `Elected`, `Lost` and `Follower` (drops
    /// `Renewed` and `RpcFailed`).
    fn transitions(self) -> Transitions<Self> {
        Transitions { stream: self }
    }

    /// `true` when this client becomes leader, `false` when it stops being
    /// leader or first learns it is a follower; never the same value twice in
    /// a row.
    fn leader_changes(self) -> LeaderChanges<Self> {
        LeaderChanges {
            stream: self,
            last: None,
        }
    }

    /// Ends after the first `Lost` (which is yielded): one term's worth of
    /// events, for code that should not re-contend by itself.
    fn until_lost(self) -> UntilLost<Self> {
        UntilLost {
            stream: self,
            done: false,
        }
    }

    /// Runs [`Callbacks`] for this stream (see [`drive_callbacks`]).
    fn drive_callbacks(self, callbacks: Arc<dyn Callbacks>) -> impl Future<Output = ()> {
        drive_callbacks(self, callbacks)
    }
}

impl<S: Stream<Item = LeadershipEvent>> LeadershipStreamExt for S {}

pin_project! {
    /// The stream returned by [`LeadershipStreamExt::transitions`]: only
    /// `Elected`, `Lost` and `Follower`.
    #[derive(Debug)]
    #[must_use = "streams do nothing unless polled"]
    pub struct Transitions<S> {
        #[pin]
        stream: S,
    }
}

impl<S: Stream<Item = LeadershipEvent>> Stream for Transitions<S> {
    type Item = LeadershipEvent;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<LeadershipEvent>> {
        let mut this = self.project();
        loop {
            match ready!(this.stream.as_mut().poll_next(cx)) {
                Some(
                    ev @ (LeadershipEvent::Elected { .. }
                    | LeadershipEvent::Lost { .. }
                    | LeadershipEvent::Follower),
                ) => return Poll::Ready(Some(ev)),
                Some(_) => {}
                None => return Poll::Ready(None),
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (0, self.stream.size_hint().1)
    }
}

impl<S: FusedStream<Item = LeadershipEvent>> FusedStream for Transitions<S> {
    fn is_terminated(&self) -> bool {
        self.stream.is_terminated()
    }
}

pin_project! {
    /// The stream returned by [`LeadershipStreamExt::leader_changes`]:
    /// whether this client is leader, once per change.
    #[derive(Debug)]
    #[must_use = "streams do nothing unless polled"]
    pub struct LeaderChanges<S> {
        #[pin]
        stream: S,
        last: Option<bool>,
    }
}

impl<S: Stream<Item = LeadershipEvent>> Stream for LeaderChanges<S> {
    type Item = bool;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<bool>> {
        let mut this = self.project();
        loop {
            let now = match ready!(this.stream.as_mut().poll_next(cx)) {
                Some(LeadershipEvent::Elected { .. }) => true,
                Some(LeadershipEvent::Lost { .. } | LeadershipEvent::Follower) => false,
                Some(_) => continue,
                None => return Poll::Ready(None),
            };
            if *this.last != Some(now) {
                *this.last = Some(now);
                return Poll::Ready(Some(now));
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (0, self.stream.size_hint().1)
    }
}

impl<S: FusedStream<Item = LeadershipEvent>> FusedStream for LeaderChanges<S> {
    fn is_terminated(&self) -> bool {
        self.stream.is_terminated()
    }
}

pin_project! {
    /// The stream returned by [`LeadershipStreamExt::until_lost`]: the events
    /// up to and including the first `Lost`.
    #[derive(Debug)]
    #[must_use = "streams do nothing unless polled"]
    pub struct UntilLost<S> {
        #[pin]
        stream: S,
        done: bool,
    }
}

impl<S: Stream<Item = LeadershipEvent>> Stream for UntilLost<S> {
    type Item = LeadershipEvent;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<LeadershipEvent>> {
        let this = self.project();
        if *this.done {
            return Poll::Ready(None);
        }
        let ev = ready!(this.stream.poll_next(cx));
        match &ev {
            Some(ev) if !ev.is_lost() => {}
            // The first `Lost` is yielded, then the stream ends (it does not
            // poll the input again).
            _ => *this.done = true,
        }
        Poll::Ready(ev)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        if self.done {
            (0, Some(0))
        } else {
            (0, self.stream.size_hint().1)
        }
    }
}

impl<S: Stream<Item = LeadershipEvent>> FusedStream for UntilLost<S> {
    fn is_terminated(&self) -> bool {
        self.done
    }
}

// Compile-time checks (as kube-runtime's `WatchStreamExt` does): the returned
// streams are `Send` when the input is, with no `'static` bound, so they can
// be moved into `tokio::spawn`ed tasks. A regression fails the build.
#[allow(dead_code)]
mod send_checks {
    use futures::Stream;

    use super::LeadershipStreamExt;
    use crate::{Leadership, LeadershipEvent};

    fn assert_send<T: Send>(_: T) {}

    fn any_send_input<S: Stream<Item = LeadershipEvent> + Send>(s: S, t: S, u: S) {
        assert_send(s.transitions());
        assert_send(t.leader_changes());
        assert_send(u.until_lost());
    }

    fn borrowed_input<'a, S: Stream<Item = LeadershipEvent> + Send + 'a>(s: S) {
        assert_send(s.transitions().leader_changes());
    }

    fn the_client_stream(l: Leadership, m: Leadership, n: Leadership) {
        assert_send(l.transitions());
        assert_send(m.leader_changes());
        assert_send(n.until_lost().transitions());
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures::{stream, StreamExt};

    use super::*;
    use crate::event::{LeaderTerm, LossReason};

    fn renewed() -> LeadershipEvent {
        LeadershipEvent::Renewed {
            term_id: 1,
            lease_remaining: Duration::from_secs(1),
        }
    }

    fn lost() -> LeadershipEvent {
        LeadershipEvent::Lost {
            term: LeaderTerm::new(1, Default::default()),
            reason: LossReason::Expired,
        }
    }

    #[tokio::test]
    async fn transitions_drops_renewals() {
        let events = stream::iter(vec![
            renewed(),
            LeadershipEvent::Follower,
            renewed(),
            lost(),
        ]);
        let got: Vec<_> = events.transitions().collect().await;
        assert!(matches!(
            got.as_slice(),
            [LeadershipEvent::Follower, LeadershipEvent::Lost { .. }]
        ));
    }

    #[tokio::test]
    async fn leader_changes_never_repeats_a_value() {
        let events = stream::iter(vec![
            LeadershipEvent::Follower,
            LeadershipEvent::Follower,
            renewed(),
            lost(),
        ]);
        let got: Vec<_> = events.leader_changes().collect().await;
        assert_eq!(got, [false]);
    }

    #[tokio::test]
    async fn until_lost_yields_the_first_lost_then_ends() {
        let events = stream::iter(vec![renewed(), lost(), LeadershipEvent::Follower]);
        let mut s = events.until_lost();
        assert!(matches!(
            s.next().await,
            Some(LeadershipEvent::Renewed { .. })
        ));
        assert!(matches!(s.next().await, Some(LeadershipEvent::Lost { .. })));
        assert!(s.is_terminated());
        assert!(s.next().await.is_none());
    }
}
