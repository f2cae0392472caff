//! The harness: sets up the server, the contenders and their networks,
//! runs the schedule, heals and settles, stops the contenders, hands the
//! records to the analysis and tears everything down.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::{sleep, sleep_until, timeout, Instant};
use tokio_util::sync::CancellationToken;

use super::analysis::Analysis;
use super::contender::{spawn_contender, ClientPlan, Command, Contender, Go, PairingObserver};
use super::record::{FaultRec, Record, Shared};
use super::{
    dedup, lock, ChaosConfig, ChaosReport, FaultKind, DOMAIN, OVERRUN, SERVICE, SETTLE_WAIT,
};
use crate::testing::{FaultProxy, GoawayRelay, LeasePolicy, ProxyMode, Tenure, TestServer};
use crate::RpcKind;
use crate::Timing;

/// The run's state, shared by the schedule's lanes.
pub(super) struct Harness {
    pub(super) config: ChaosConfig,
    pub(super) timing: Timing,
    pub(super) server: TestServer,
    pub(super) contenders: Vec<Contender>,
    pub(super) record: Shared,
    /// Ends the term watchers.
    pub(super) quit: CancellationToken,
    pub(super) t0: Instant,
}

impl Harness {
    /// Starts the server and every contender (its relay, proxy, thread and
    /// client); the contenders campaign only once [`Harness::run`] begins.
    pub(super) async fn start(config: &ChaosConfig) -> Result<Harness, String> {
        let timing = Timing::for_ttl(config.ttl);
        let server = TestServer::builder()
            .start()
            .await
            .map_err(|e| format!("start the test server: {e}"))?;
        let record: Shared = Arc::new(Mutex::new(Record {
            open: vec![None; config.contenders],
            ..Record::default()
        }));
        let quit = CancellationToken::new();
        let mut contenders = Vec::with_capacity(config.contenders);
        for i in 0..config.contenders {
            let id = format!("contender-{i}");
            let relay = GoawayRelay::start(server.addr())
                .await
                .map_err(|e| format!("{id}: start the relay: {e}"))?;
            let proxy = FaultProxy::start(relay.addr())
                .await
                .map_err(|e| format!("{id}: start the proxy: {e}"))?;
            let observer = Arc::new(PairingObserver::default());
            let (client, thread) = spawn_contender(ClientPlan {
                idx: i,
                id: id.clone(),
                url: proxy.url(),
                ttl: config.ttl,
                jitter_seed: config.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ i as u64,
                observer: observer.clone(),
            })
            .await?;
            let (commands, _) = mpsc::unbounded_channel();
            contenders.push(Contender {
                id,
                client,
                proxy,
                relay,
                observer,
                commands,
                thread,
            });
        }
        Ok(Harness {
            config: config.clone(),
            timing,
            server,
            contenders,
            record,
            quit,
            t0: Instant::now(),
        })
    }

    /// Runs the schedule, heals, settles, stops the contenders and reports.
    pub(super) async fn run(mut self) -> ChaosReport {
        self.t0 = Instant::now();
        let harness = tokio::runtime::Handle::current();
        for c in &mut self.contenders {
            let (tx, rx) = mpsc::unbounded_channel();
            c.commands = tx;
            let go = Go {
                commands: rx,
                record: self.record.clone(),
                quit: self.quit.clone(),
                ttl: self.config.ttl,
                harness: harness.clone(),
            };
            if let Some(start) = c.thread.go.take() {
                if start.send(go).is_err() {
                    let what = format!("{}: its thread is gone", c.id);
                    lock(&self.record).problems.push(what);
                }
            }
        }

        let end = self.t0 + self.config.duration;
        let hard_end = end + OVERRUN;
        let server_kinds: Vec<FaultKind> = dedup(&self.config.faults)
            .into_iter()
            .filter(|k| k.on_server_lane())
            .collect();
        let contender_kinds: Vec<FaultKind> = dedup(&self.config.faults)
            .into_iter()
            .filter(|k| !k.on_server_lane())
            .collect();
        let progress = self.progress(end);
        tokio::join!(
            self.lane(
                server_kinds,
                fastrand::Rng::with_seed(self.config.seed ^ 0x5E4E_5E4E),
                end,
                hard_end
            ),
            self.lane(
                contender_kinds,
                fastrand::Rng::with_seed(self.config.seed ^ 0xC047_E4D5),
                end,
                hard_end
            ),
            progress,
        );
        let schedule_end = Instant::now();
        tracing::info!(
            elapsed = ?schedule_end - self.t0,
            "fault schedule done; healing and settling"
        );
        self.heal_everything();
        // Let the system settle so the end of the run is fault-free.
        sleep(self.config.ttl + self.timing.retry_period * 2).await;
        let stop = Instant::now();
        self.stop_contenders().await;
        self.finish(schedule_end, stop).await
    }

    /// Logs progress every `progress_every` until the schedule ends.
    async fn progress(&self, end: Instant) {
        let Some(every) = self.config.progress_every else {
            return;
        };
        let mut next = self.t0 + every;
        while next < end {
            sleep_until(next).await;
            let (terms, faults) = {
                let r = lock(&self.record);
                (r.terms.len(), r.faults.len())
            };
            tracing::info!(
                elapsed = format!("{:.0}s", (next - self.t0).as_secs_f64()),
                terms,
                faults,
                "chaos progress"
            );
            next += every;
        }
    }

    fn heal_everything(&self) {
        self.server.resume();
        self.server.set_latency(Duration::ZERO);
        self.server.set_lease_policy(LeasePolicy::AsAsked);
        self.server.set_refusal_delay(Duration::ZERO);
        for c in &self.contenders {
            c.proxy.set_mode(ProxyMode::Pass);
            c.proxy.deliver_held();
        }
    }

    /// The current leader (by the client's own view), if any.
    pub(super) fn leader(&self) -> Option<usize> {
        self.contenders.iter().position(|c| c.client.is_leader())
    }

    /// Waits (bounded) for some contender to lead.
    pub(super) async fn wait_for_leader(&self, within: Duration) -> Option<usize> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(i) = self.leader() {
                return Some(i);
            }
            if Instant::now() >= deadline {
                return None;
            }
            sleep(Duration::from_millis(20)).await;
        }
    }

    pub(super) fn problem(&self, what: String) {
        tracing::warn!(problem = %what, "chaos harness problem");
        lock(&self.record).problems.push(what);
    }

    pub(super) fn recorded(
        &self,
        kind: FaultKind,
        target: Option<usize>,
        start: Instant,
        heal: Instant,
    ) {
        self.recorded_with(kind, target, start, heal, Duration::ZERO);
    }

    pub(super) fn recorded_with(
        &self,
        kind: FaultKind,
        target: Option<usize>,
        start: Instant,
        heal: Instant,
        latency: Duration,
    ) {
        tracing::debug!(%kind, ?target, start = ?start - self.t0, heal = ?heal - self.t0, "fault");
        lock(&self.record).faults.push(FaultRec {
            kind,
            target,
            start,
            heal,
            latency,
        });
    }

    pub(super) fn cut_all_relays(&self) {
        for c in &self.contenders {
            c.relay.cut();
        }
    }

    /// Every contender resigns and its task ends (bounded).
    async fn stop_contenders(&mut self) {
        for c in &self.contenders {
            let _ = c.commands.send(Command::Stop);
        }
        let bound = self.config.ttl * 3 + SETTLE_WAIT;
        for c in &mut self.contenders {
            if let Some(finished) = c.thread.finished.take() {
                match timeout(bound, finished).await {
                    Ok(Ok(None)) => {}
                    Ok(Ok(Some(panic))) => {
                        let what = format!("{}: contender task failed: {panic}", c.id);
                        lock(&self.record).problems.push(what);
                    }
                    Ok(Err(_)) => {
                        let what = format!("{}: contender thread ended abruptly", c.id);
                        lock(&self.record).problems.push(what);
                    }
                    Err(_) => {
                        let what =
                            format!("{}: contender task did not stop within {bound:?}", c.id);
                        lock(&self.record).problems.push(what);
                    }
                }
            }
        }
    }

    /// Waits for the bookkeeping to settle, collects the server's truth,
    /// checks everything, and tears the set-up down.
    async fn finish(self, schedule_end: Instant, stop: Instant) -> ChaosReport {
        // Every term must end (its watcher records when); every callbacks
        // observer must see its last `Lost`. Bounded waits on conditions.
        let deadline = Instant::now() + self.config.ttl + SETTLE_WAIT;
        loop {
            let terms_open = lock(&self.record)
                .terms
                .iter()
                .any(|t| t.cancelled.is_none());
            let callbacks_open = self
                .contenders
                .iter()
                .any(|c| lock(&c.observer.state).leader);
            if (!terms_open && !callbacks_open) || Instant::now() >= deadline {
                break;
            }
            sleep(Duration::from_millis(20)).await;
        }
        self.quit.cancel();

        let tenures: Vec<Tenure> = self
            .server
            .tenures()
            .into_iter()
            .filter(|t| t.service == SERVICE && t.domain == DOMAIN)
            .collect();
        let ids: Vec<String> = self.contenders.iter().map(|c| c.id.clone()).collect();
        let goaway_frames = self.contenders.iter().map(|c| c.relay.goaways_sent()).sum();
        let mut callback_elected = 0;
        let mut callback_lost = 0;
        let mut callback_violations = Vec::new();
        for (i, c) in self.contenders.iter().enumerate() {
            let s = lock(&c.observer.state);
            callback_elected += s.elected;
            callback_lost += s.lost;
            for (at, what) in &s.problems {
                callback_violations.push((i, *at, what.clone()));
            }
            if s.leader {
                callback_violations.push((
                    i,
                    stop,
                    "on_leader_elected(true) never followed by on_leader_lost".to_string(),
                ));
            }
        }
        let record = std::mem::take(&mut *lock(&self.record));
        if record.online_overlaps > 0 {
            tracing::error!(
                count = record.online_overlaps,
                "the online check saw two live terms at once"
            );
        }
        let input = Analysis {
            seed: self.config.seed,
            contenders: self.config.contenders,
            ttl: self.config.ttl,
            timing: self.timing,
            t0: self.t0,
            schedule_end,
            stop,
            ids,
            record,
            tenures,
            callback_violations,
            callback_elected,
            callback_lost,
            goaway_frames,
        };
        let report = input.analyze();

        // Tear down: the clients first (a dropped client releases in the
        // background: wait, bounded, until those calls reached the server),
        // then the network, then the server.
        let releases = self.server.calls(RpcKind::ReleaseLock) + self.contenders.len() as u64;
        let mut network = Vec::with_capacity(self.contenders.len());
        let mut threads = Vec::with_capacity(self.contenders.len());
        for mut c in self.contenders {
            drop(c.client);
            if let Some(teardown) = c.thread.teardown.take() {
                let _ = teardown.send(());
            }
            network.push((c.proxy, c.relay));
            threads.push(c.thread);
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while self.server.calls(RpcKind::ReleaseLock) < releases && Instant::now() < deadline {
            sleep(Duration::from_millis(10)).await;
        }
        for t in &mut threads {
            if let Some(exit) = t.exit.take() {
                let _ = exit.send(());
            }
        }
        for t in &mut threads {
            if let Some(exited) = t.exited.take() {
                // A thread still blocked is left to end by itself.
                let _ = timeout(SETTLE_WAIT, exited).await;
            }
        }
        for (proxy, relay) in &network {
            proxy.shutdown().await;
            relay.shutdown().await;
        }
        self.server.shutdown().await;
        report
    }
}
