//! What an operator sees: log levels, tracing spans (a capturing `tracing`
//! layer records every span and event of the client), and the health check
//! for a liveness probe.
#![cfg(feature = "testing")]

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use quorum_quest_client::testing::TestServer;
use quorum_quest_client::{Leadership, LeadershipEvent, QuorumQuestClient, RpcKind, Unhealthy};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

// ----- a layer that records spans and events -----

#[derive(Debug, Clone)]
struct SpanRec {
    name: &'static str,
    fields: HashMap<String, String>,
    /// Index of the parent span in `Captured::spans`.
    parent: Option<usize>,
}

#[derive(Debug, Clone)]
struct EventRec {
    level: Level,
    target: String,
    message: String,
    fields: HashMap<String, String>,
    /// Index of the span the event belongs to (its explicit or current parent).
    span: Option<usize>,
}

#[derive(Debug, Default)]
struct Captured {
    spans: Vec<SpanRec>,
    /// Live span id -> index in `spans` (ids are reused after close).
    live: HashMap<u64, usize>,
    events: Vec<EventRec>,
}

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Captured>>);

struct Fields<'a>(&'a mut HashMap<String, String>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().to_string(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_string(), value.to_string());
    }
}

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Capture {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut fields = HashMap::new();
        attrs.record(&mut Fields(&mut fields));
        let mut c = self.0.lock().unwrap();
        let parent = ctx
            .span(id)
            .and_then(|s| s.parent())
            .and_then(|p| c.live.get(&p.id().into_u64()).copied());
        c.spans.push(SpanRec {
            name: attrs.metadata().name(),
            fields,
            parent,
        });
        let index = c.spans.len() - 1;
        c.live.insert(id.into_u64(), index);
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, _ctx: Context<'_, S>) {
        let mut c = self.0.lock().unwrap();
        if let Some(&i) = c.live.get(&id.into_u64()) {
            values.record(&mut Fields(&mut c.spans[i].fields));
        }
    }

    fn on_close(&self, id: Id, _ctx: Context<'_, S>) {
        self.0.lock().unwrap().live.remove(&id.into_u64());
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut fields = HashMap::new();
        event.record(&mut Fields(&mut fields));
        let message = fields.remove("message").unwrap_or_default();
        let mut c = self.0.lock().unwrap();
        let span = ctx
            .event_span(event)
            .and_then(|s| c.live.get(&s.id().into_u64()).copied());
        c.events.push(EventRec {
            level: *event.metadata().level(),
            target: event.metadata().target().to_string(),
            message,
            fields,
            span,
        });
    }
}

impl Capture {
    /// Installs the layer for this thread (the tests run on a current-thread
    /// runtime, so every task of the client runs here).
    fn install(&self) -> tracing::subscriber::DefaultGuard {
        tracing::subscriber::set_default(tracing_subscriber::registry().with(self.clone()))
    }

    fn snapshot(&self) -> (Vec<SpanRec>, Vec<EventRec>) {
        let c = self.0.lock().unwrap();
        (c.spans.clone(), c.events.clone())
    }
}

/// Events of the client itself (not of the in-process test server).
fn client_events(events: &[EventRec]) -> Vec<&EventRec> {
    events
        .iter()
        .filter(|e| {
            e.target.starts_with("quorum_quest_client")
                && !e.target.starts_with("quorum_quest_client::testing")
        })
        .collect()
}

// ----- spans -----

#[tokio::test]
async fn an_election_runs_in_the_client_span_with_one_span_per_rpc_attempt() {
    let capture = Capture::default();
    let _guard = capture.install();
    let server = server().await;
    let client = over_tcp(&server.url(), 3)
        .client_id("node-a")
        .build()
        .await
        .unwrap();
    let mut stream = client.leadership();
    until(&mut stream, 10 * SEC, "Elected", |e| e.is_elected()).await;
    until(&mut stream, 10 * SEC, "Renewed", |e| {
        matches!(e, LeadershipEvent::Renewed { .. })
    })
    .await;
    stream.resign().await.unwrap();

    let (spans, events) = capture.snapshot();
    let clients: Vec<usize> = (0..spans.len())
        .filter(|&i| spans[i].name == "quorum_quest.client")
        .collect();
    assert_eq!(clients.len(), 1, "one client span: {spans:#?}");
    let client_span = clients[0];
    let f = &spans[client_span].fields;
    assert_eq!(f.get("service").map(String::as_str), Some(SERVICE));
    assert_eq!(f.get("domain").map(String::as_str), Some(DOMAIN));
    assert_eq!(f.get("client_id").map(String::as_str), Some("node-a"));

    let rpcs: Vec<&SpanRec> = spans
        .iter()
        .filter(|s| s.name == "quorum_quest.rpc")
        .collect();
    for (rpc, count) in [("TryAcquireLock", 1), ("KeepAlive", 2), ("ReleaseLock", 1)] {
        let of_rpc: Vec<_> = rpcs
            .iter()
            .filter(|s| s.fields.get("rpc").map(String::as_str) == Some(rpc))
            .collect();
        assert!(of_rpc.len() >= count, "{rpc}: {rpcs:#?}");
        for s in of_rpc {
            assert_eq!(s.parent, Some(client_span), "{s:?}");
            assert_eq!(
                s.fields.get("code").map(String::as_str),
                Some("OK"),
                "{s:?}"
            );
            assert_eq!(
                s.fields.get("attempt").map(String::as_str),
                Some("1"),
                "{s:?}"
            );
            let latency: f64 = s.fields["latency_ms"].parse().unwrap();
            assert!((0.0..10_000.0).contains(&latency), "{s:?}");
        }
    }

    // The leadership timeline, in the client span.
    let timeline: Vec<(Level, &str)> = client_events(&events)
        .into_iter()
        .filter(|e| e.level <= Level::INFO)
        .map(|e| {
            assert_eq!(e.span, Some(client_span), "{e:?}");
            (e.level, e.message.as_str())
        })
        .collect();
    assert_eq!(
        timeline,
        [
            (Level::INFO, "elected leader"),
            (Level::INFO, "lost leadership: released")
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn a_failed_attempt_records_its_code_on_its_span() {
    let capture = Capture::default();
    let _guard = capture.install();
    let server = server().await;
    let client = in_memory(&server, 3).build().await.unwrap();
    server.fail_next(
        1,
        Some(RpcKind::TryAcquireLock),
        tonic::Status::permission_denied("no"),
    );
    let mut stream = client.leadership();
    until(&mut stream, 10 * SEC, "Elected", |e| e.is_elected()).await;
    let (spans, events) = capture.snapshot();
    let failed: Vec<_> = spans
        .iter()
        .filter(|s| {
            s.name == "quorum_quest.rpc"
                && s.fields.get("code").map(String::as_str) == Some("PERMISSION_DENIED")
        })
        .collect();
    assert_eq!(failed.len(), 1, "{spans:#?}");
    assert_eq!(failed[0].fields["rpc"], "TryAcquireLock");
    assert_eq!(failed[0].fields["otel.status_code"], "ERROR");
    // A permanent error is worth a warning even for a follower.
    let warning = client_events(&events)
        .into_iter()
        .find(|e| e.level == Level::WARN)
        .expect("a warning");
    assert_eq!(warning.fields["code"], "PERMISSION_DENIED");
    assert_eq!(warning.fields["rpc"], "TryAcquireLock");
}

// ----- log levels -----

#[tokio::test(start_paused = true)]
async fn a_failing_renewal_warns_with_the_lease_left_and_renewals_stay_at_debug() {
    let capture = Capture::default();
    let _guard = capture.install();
    let server = server().await;
    let client = in_memory(&server, 3).build().await.unwrap();
    let mut stream = client.leadership();
    until(&mut stream, 10 * SEC, "Elected", |e| e.is_elected()).await;
    for _ in 0..3 {
        until(&mut stream, 10 * SEC, "Renewed", |e| {
            matches!(e, LeadershipEvent::Renewed { .. })
        })
        .await;
    }
    server.fail_next(1, Some(RpcKind::KeepAlive), tonic::Status::aborted("busy"));
    until(&mut stream, 10 * SEC, "RpcFailed", |e| {
        matches!(e, LeadershipEvent::RpcFailed { .. })
    })
    .await;
    for _ in 0..3 {
        until(&mut stream, 10 * SEC, "Renewed", |e| {
            matches!(e, LeadershipEvent::Renewed { .. })
        })
        .await;
    }
    stream.resign().await.unwrap();

    let (_, events) = capture.snapshot();
    let events = client_events(&events);
    let loud: Vec<(Level, &str)> = events
        .iter()
        .filter(|e| e.level <= Level::INFO)
        .map(|e| (e.level, e.message.as_str()))
        .collect();
    assert_eq!(
        loud,
        [
            (Level::INFO, "elected leader"),
            (
                Level::WARN,
                "KeepAlive failed while leading; retrying while the lease lasts"
            ),
            (Level::INFO, "lost leadership: released"),
        ],
        "only leadership changes and the failure are logged above debug"
    );
    let warning = events.iter().find(|e| e.level == Level::WARN).unwrap();
    assert_eq!(warning.fields["code"], "ABORTED");
    assert_eq!(warning.fields["rpc"], "KeepAlive");
    assert_eq!(warning.fields["consecutive_failures"], "1");
    assert_eq!(warning.fields["error"], "busy");
    let left = &warning.fields["lease_remaining"];
    assert!(
        left.ends_with('s') && left != "0ns",
        "lease_remaining = {left}"
    );
    let elected = events
        .iter()
        .find(|e| e.message == "elected leader")
        .unwrap();
    assert_eq!(elected.fields["term"], "1");
    let lost = events
        .iter()
        .find(|e| e.message.starts_with("lost"))
        .unwrap();
    assert_eq!(lost.fields["reason"], "released");
    let renewals = events
        .iter()
        .filter(|e| e.message == "lease renewed")
        .inspect(|e| assert_eq!(e.level, Level::DEBUG))
        .count();
    assert!(renewals >= 6, "{renewals} renewals logged at debug");
    // The campaign runs in the client span: its own debug line too.
    let retry = events
        .iter()
        .find(|e| e.message == "next KeepAlive attempt")
        .expect("the campaign's retry line");
    assert!(
        retry.span.is_some() && retry.span == warning.span,
        "{retry:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn callbacks_run_in_the_client_span() {
    struct Logging;
    #[quorum_quest_client::async_trait]
    impl quorum_quest_client::Callbacks for Logging {
        async fn on_leader_elected(&self, is_leader: bool) {
            tracing::info!(is_leader, "user callback");
        }
        async fn on_leader_lost(&self) {}
    }
    let capture = Capture::default();
    let _guard = capture.install();
    let server = server().await;
    let client = in_memory(&server, 3)
        .callbacks(Arc::new(Logging))
        .build()
        .await
        .unwrap();
    client.start_keep_alive().await.unwrap();
    eventually(10 * SEC, "the callback ran", || {
        capture
            .snapshot()
            .1
            .iter()
            .any(|e| e.message == "user callback")
    })
    .await;
    let (spans, events) = capture.snapshot();
    let callback = events
        .iter()
        .find(|e| e.message == "user callback")
        .unwrap();
    let span = &spans[callback.span.expect("in a span")];
    assert_eq!(span.name, "quorum_quest.client");
    assert_eq!(span.fields["service"], SERVICE);
}

/// Two clients of one lock: the first elected, the second told it follows;
/// their streams keep them campaigning.
async fn leader_and_follower(
    server: &TestServer,
    ttl_secs: u64,
) -> (QuorumQuestClient, Leadership, QuorumQuestClient, Leadership) {
    let leader = in_memory(server, ttl_secs).build().await.unwrap();
    let follower = in_memory(server, ttl_secs).build().await.unwrap();
    let mut leading = leader.leadership();
    until(&mut leading, 10 * SEC, "Elected", |e| e.is_elected()).await;
    let mut following = follower.leadership();
    until(&mut following, 10 * SEC, "Follower", |e| {
        matches!(e, LeadershipEvent::Follower)
    })
    .await;
    (leader, leading, follower, following)
}

#[tokio::test(start_paused = true)]
async fn another_node_leading_is_logged_at_info_once() {
    let capture = Capture::default();
    let _guard = capture.install();
    let server = server().await;
    let (_leader, _leading, _follower, _following) = leader_and_follower(&server, 3).await;
    tokio::time::sleep(10 * SEC).await; // many refused attempts
    let (_, events) = capture.snapshot();
    let info: Vec<&str> = client_events(&events)
        .into_iter()
        .filter(|e| e.level <= Level::INFO)
        .map(|e| e.message.as_str())
        .collect();
    assert_eq!(info, ["elected leader", "another node holds the lock"]);
}

// ----- health -----

#[tokio::test(start_paused = true)]
async fn a_renewing_leader_and_a_waiting_follower_are_healthy() {
    let server = server().await;
    let (leader, _leading, follower, _following) = leader_and_follower(&server, 15).await;
    let idle = in_memory(&server, 15).build().await.unwrap();
    for _ in 0..12 {
        tokio::time::sleep(5 * SEC).await;
        let h = leader.health();
        assert!(h.is_healthy(), "{h}");
        assert!(
            h.leading && h.campaign_running && h.campaign_wanted,
            "{h:?}"
        );
        assert!(h.lease_remaining.is_some());
        assert!(h.since_last_renewal.unwrap() <= 6 * SEC, "{h:?}");
        assert_eq!(h.consecutive_failures, 0);
        let h = follower.health();
        assert!(h.is_healthy(), "{h}");
        assert!(!h.leading && h.campaign_running && h.lease_remaining.is_none());
        assert!(h.since_last_call.unwrap() <= 3 * SEC, "{h:?}");
        assert_eq!(h.since_last_renewal, None);
    }
    let h = idle.health();
    assert!(h.is_healthy() && !h.campaign_running && !h.campaign_wanted);
    assert_eq!(h.since_last_call, None);
}

#[tokio::test(start_paused = true)]
async fn a_leader_that_nothing_renews_is_unhealthy_before_its_lease_ends() {
    let server = server().await;
    let client = in_memory(&server, 15).build().await.unwrap();
    assert!(client.try_acquire_lock().await.unwrap());
    client.start_keep_alive().await.unwrap();
    tokio::time::sleep(7 * SEC).await;
    assert!(client.health().is_healthy());
    // The keep-alive stops; the term lasts until its deadline, unrenewed.
    client.stop_keep_alive().await;
    let last_renewal = client.health().since_last_renewal.unwrap();
    // renew interval 5 s + RPC timeout 5 s + safety margin 1.5 s.
    let limit = Duration::from_millis(11_500);
    tokio::time::sleep(limit - last_renewal - ms(10)).await;
    assert!(client.health().is_healthy(), "{}", client.health());
    tokio::time::sleep(ms(20)).await;
    let h = client.health();
    assert!(h.leading && !h.campaign_wanted, "{h:?}");
    match h.check() {
        Err(Unhealthy::LeaderNotRenewing { idle, limit: l }) => {
            assert_eq!(l, limit);
            assert!(idle > limit && idle < limit + ms(50), "{idle:?}");
        }
        other => panic!("{other:?}: {h}"),
    }
    assert!(h.to_string().starts_with("unhealthy (leading"), "{h}");
    // Once the term ends at its deadline, there is nothing left to renew.
    tokio::time::sleep(3 * SEC).await;
    let h = client.health();
    assert!(!h.leading && h.is_healthy(), "{h}");
}

#[tokio::test(start_paused = true)]
async fn failed_calls_in_a_row_are_counted_and_an_answer_resets_the_count() {
    let server = server().await;
    let client = in_memory(&server, 3).build().await.unwrap();
    server.fail_next(
        3,
        Some(RpcKind::TryAcquireLock),
        tonic::Status::aborted("busy"),
    );
    let mut stream = client.leadership();
    for n in 1..=3 {
        until(&mut stream, 10 * SEC, "RpcFailed", |e| {
            matches!(e, LeadershipEvent::RpcFailed { .. })
        })
        .await;
        let h = client.health();
        assert_eq!(h.consecutive_failures, n, "{h:?}");
        assert!(h.is_healthy(), "failing calls are not a wedge: {h}");
    }
    until(&mut stream, 10 * SEC, "Elected", |e| e.is_elected()).await;
    let h = client.health();
    assert_eq!(h.consecutive_failures, 0, "{h:?}");
    assert!(h.leading && h.is_healthy(), "{h}");
}
