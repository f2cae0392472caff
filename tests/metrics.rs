//! The `metrics` feature, scraped as Prometheus would: a real recorder
//! (`metrics-exporter-prometheus`) installed for this test binary, an
//! election against a TestServer over loopback, and the text format parsed.
#![cfg(all(feature = "testing", feature = "metrics"))]

mod common;

use std::collections::BTreeMap;
use std::sync::OnceLock;

use common::*;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use quorum_quest_client::metrics::{
    LEADER, LEASE_REMAINING, RENEWAL_FAILURES, RPC_DURATION, TRANSITIONS,
};
use quorum_quest_client::{LeadershipEvent, QuorumQuestClient, RpcKind};

/// The recorder of this test binary (one per process), with buckets as a
/// user would configure them.
fn recorder() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full(RPC_DURATION.into()),
                &[0.001, 0.01, 0.1, 1.0, 10.0],
            )
            .unwrap()
            .set_buckets_for_metric(Matcher::Full(LEASE_REMAINING.into()), &[0.5, 1.0, 2.0, 5.0])
            .unwrap()
            .install_recorder()
            .expect("the only recorder of this test binary")
    })
}

/// One sample line: name, labels, value.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses the Prometheus text format (enough of it for these metrics).
fn scrape() -> Vec<Sample> {
    let handle = recorder();
    handle.run_upkeep();
    handle
        .render()
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').expect("name value");
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = labels
                .split("\",")
                .filter(|p| !p.is_empty())
                .map(|p| {
                    let (k, v) = p.split_once("=\"").expect("label=\"value\"");
                    (k.to_string(), v.trim_end_matches('"').to_string())
                })
                .collect();
            Sample {
                name: name.to_string(),
                labels,
                value: value.parse().expect("a number"),
            }
        })
        .collect()
}

/// The value of the series `name` whose labels include `labels`; `None` if
/// there is no such series.
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let matching: Vec<f64> = samples
        .iter()
        .filter(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .collect();
    assert!(matching.len() <= 1, "{name} {labels:?}: {matching:?}");
    matching.first().copied()
}

async fn contender(url: &str, domain: &str, id: &str) -> QuorumQuestClient {
    QuorumQuestClient::builder(SERVICE, domain)
        .address(url)
        .client_id(id)
        .ttl(3 * SEC)
        .build()
        .await
        .unwrap()
}

#[tokio::test]
async fn an_election_is_scraped_leader_gauge_transitions_and_rpc_latency() {
    recorder();
    let server = server().await;
    let domain = "scraped-election";
    let lock = [("service", SERVICE), ("domain", domain)];
    let alpha = contender(&server.url(), domain, "alpha").await;
    let bravo = contender(&server.url(), domain, "bravo").await;
    // Registered at 0 as soon as a client exists.
    assert_eq!(value(&scrape(), LEADER, &lock), Some(0.0));

    let mut alpha_events = alpha.leadership();
    until(&mut alpha_events, 10 * SEC, "alpha Elected", |e| {
        e.is_elected()
    })
    .await;
    let mut bravo_events = bravo.leadership();
    until(&mut bravo_events, 10 * SEC, "bravo Follower", |e| {
        matches!(e, LeadershipEvent::Follower)
    })
    .await;
    assert_eq!(value(&scrape(), LEADER, &lock), Some(1.0));

    // A failed renewal is counted; the next one gets through.
    server.fail_next(
        1,
        Some(RpcKind::KeepAlive),
        tonic::Status::resource_exhausted("shedding"),
    );
    until(&mut alpha_events, 10 * SEC, "RpcFailed", |e| {
        matches!(e, LeadershipEvent::RpcFailed { .. })
    })
    .await;
    until(&mut alpha_events, 10 * SEC, "Renewed", |e| {
        matches!(e, LeadershipEvent::Renewed { .. })
    })
    .await;

    // Handover: still one leader in this process.
    alpha_events.resign().await.unwrap();
    until(&mut bravo_events, 10 * SEC, "bravo Elected", |e| {
        e.is_elected()
    })
    .await;
    assert_eq!(value(&scrape(), LEADER, &lock), Some(1.0));
    bravo_events.resign().await.unwrap();

    let s = scrape();
    assert_eq!(
        value(&s, LEADER, &lock),
        Some(0.0),
        "nobody leads after release"
    );
    let transitions = |kind, reason| {
        let labels = [lock[0], lock[1], ("kind", kind), ("reason", reason)];
        value(&s, TRANSITIONS, &labels).unwrap_or(0.0)
    };
    assert_eq!(transitions("elected", "none"), 2.0);
    assert_eq!(transitions("lost", "released"), 2.0);
    assert_eq!(transitions("follower", "none"), 1.0);
    assert_eq!(transitions("lost", "expired"), 0.0);
    assert_eq!(value(&s, RENEWAL_FAILURES, &lock), Some(1.0));

    // The RPC histogram, by rpc and code (no lock labels).
    let count = |rpc, code| {
        let name = format!("{RPC_DURATION}_count");
        value(&s, &name, &[("rpc", rpc), ("code", code)]).unwrap_or(0.0)
    };
    assert!(count("TryAcquireLock", "OK") >= 2.0);
    assert!(count("KeepAlive", "OK") >= 3.0);
    assert!(count("KeepAlive", "RESOURCE_EXHAUSTED") >= 1.0);
    assert!(count("ReleaseLock", "OK") >= 2.0);
    let bucket = format!("{RPC_DURATION}_bucket");
    assert!(s
        .iter()
        .any(|x| x.name == bucket && x.labels.get("le").map(String::as_str) == Some("+Inf")));
    assert!(s
        .iter()
        .filter(|x| x.name.starts_with(RPC_DURATION))
        .all(|x| !x.labels.contains_key("service") && !x.labels.contains_key("client_id")));

    // The lease left at each election and renewal: at most ttl - margin.
    let name = format!("{LEASE_REMAINING}_count");
    let renewals = value(&s, &name, &lock).unwrap();
    assert!(renewals >= 3.0, "{renewals}");
    let le = |b| {
        let labels = [lock[0], lock[1], ("le", b)];
        value(&s, &format!("{LEASE_REMAINING}_bucket"), &labels).unwrap()
    };
    assert_eq!(
        le("5"),
        renewals,
        "a 3 s lease never has more than 2.7 s left"
    );
}

#[tokio::test]
async fn the_leader_gauge_follows_the_imperative_api_turn_by_turn() {
    recorder();
    let server = server().await;
    let domain = "gauge-in-turn";
    let lock = [("service", SERVICE), ("domain", domain)];
    let first = contender(&server.url(), domain, "first").await;
    let second = contender(&server.url(), domain, "second").await;
    for round in 0..3 {
        let (a, b) = if round % 2 == 0 {
            (&first, &second)
        } else {
            (&second, &first)
        };
        assert!(a.try_acquire_lock().await.unwrap(), "round {round}");
        assert!(!b.try_acquire_lock().await.unwrap(), "round {round}");
        assert_eq!(value(&scrape(), LEADER, &lock), Some(1.0), "round {round}");
        a.release_lock().await.unwrap();
        assert_eq!(value(&scrape(), LEADER, &lock), Some(0.0), "round {round}");
    }
}
