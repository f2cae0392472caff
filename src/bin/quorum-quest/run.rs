//! `quorum-quest run`: the main loop over the client's leadership stream.
//!
//! Wait for `Elected`, start the command bound to that term (the supervisor
//! kills it by the term's safe deadline on its own threads), follow the
//! stream (renewals re-arm the deadline, a loss stops the command), then
//! release and exit with the documented code, or campaign again with
//! `--restart`. Every exit goes through [`QuorumQuestClient::shutdown`]
//! (capped by the tool); a `--restart` re-campaign only resigns the stream.
//! This loop only decides *what* happens; *when* a signal must be sent is
//! the supervisor's business, so a slow loop cannot make a kill late.

use std::io;
use std::time::Duration;

use futures::StreamExt;
use quorum_quest_client::tonic::Code;
use quorum_quest_client::{
    Error, LeaderTerm, Leadership, LeadershipEvent, QuorumQuestClient, Timing,
};
use tokio::signal::unix::{signal, Signal, SignalKind};

use crate::args::{RunArgs, EXIT_CANNOT_EXECUTE, EXIT_LOST, EXIT_NOT_FOUND, EXIT_TOOL, EXIT_USAGE};
use crate::report::{dur, fatal, say, signal_name};
use crate::supervise::{adopt_orphans, ChildEnd, Spec, StartError, Status, Supervisor};

/// SIGINT, SIGTERM and SIGHUP to the tool; SIGTSTP, SIGTTIN and SIGTTOU are
/// caught and ignored, because a stopped tool could not kill its command on
/// time (Ctrl+Z must not suspend the tool while the command runs on).
pub struct Signals {
    int: Signal,
    term: Signal,
    hup: Signal,
    tstp: Signal,
    ttin: Signal,
    ttou: Signal,
}

impl Signals {
    /// Installs the handlers (from then on these signals no longer kill or
    /// stop the tool outright).
    pub fn new() -> io::Result<Signals> {
        Ok(Signals {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
            hup: signal(SignalKind::hangup())?,
            tstp: signal(SignalKind::from_raw(libc::SIGTSTP))?,
            ttin: signal(SignalKind::from_raw(libc::SIGTTIN))?,
            ttou: signal(SignalKind::from_raw(libc::SIGTTOU))?,
        })
    }

    /// The next SIGINT, SIGTERM or SIGHUP received (cancel-safe).
    pub async fn next(&mut self) -> i32 {
        loop {
            tokio::select! {
                Some(()) = self.int.recv() => return libc::SIGINT,
                Some(()) = self.term.recv() => return libc::SIGTERM,
                Some(()) = self.hup.recv() => return libc::SIGHUP,
                Some(()) = self.tstp.recv() => {
                    say("ignoring SIGTSTP: a stopped tool could not stop its command in time");
                }
                Some(()) = self.ttin.recv() => {}
                Some(()) = self.ttou.recv() => {}
                else => std::future::pending::<()>().await,
            }
        }
    }
}

/// Runs `quorum-quest run`; returns the exit code.
pub async fn run(args: RunArgs) -> i32 {
    if let Err(message) = args.check_kill_grace() {
        fatal(message);
        return EXIT_USAGE;
    }
    let mut signals = match Signals::new() {
        Ok(s) => s,
        Err(e) => {
            fatal(format!("cannot handle signals: {e}"));
            return EXIT_TOOL;
        }
    };
    let mut builder = QuorumQuestClient::builder(args.service.clone(), args.domain.clone())
        .address(args.server.clone())
        .ttl(Duration::from_secs(args.ttl));
    if let Some(id) = &args.client_id {
        builder = builder.client_id(id.clone());
    }
    builder = match crate::auth::apply(builder, &args) {
        Ok(builder) => builder,
        Err(message) => {
            fatal(message);
            return EXIT_USAGE;
        }
    };
    let client = match builder.build().await {
        Ok(client) => client,
        Err(Error::InvalidParameter(message)) => {
            fatal(format!("invalid value: {}", name_flag(&message)));
            return EXIT_USAGE;
        }
        Err(e @ (Error::Connection(_) | Error::ConnectTimeout(_))) => {
            fatal(format!(
                "cannot reach the server at {}: {}",
                args.server,
                chain(&e)
            ));
            return EXIT_TOOL;
        }
        Err(e) => {
            fatal(chain(&e));
            return EXIT_TOOL;
        }
    };
    let timing = client.timing();
    if (args.token_file.is_some() || args.token_env.is_some())
        && args.server.to_ascii_lowercase().starts_with("http://")
    {
        say(
            "warning: the bearer token travels in clear over http://; use https:// unless the \
             server is a sidecar on this host",
        );
    }
    adopt_orphans();
    say(format!(
        "campaigning for {}/{} on {} as {} (ttl {}s, renew every {}, safety margin {}, kill grace {})",
        args.service,
        args.domain,
        args.server,
        client.client_id(),
        args.ttl,
        dur(timing.renew_interval),
        dur(timing.safety_margin),
        dur(args.kill_grace)
    ));

    let mut runner = Runner {
        args: &args,
        client: &client,
        timing,
        trouble: false,
    };
    // The stream lives until the shutdown is over: dropping it while leading
    // would release on its own, outside the tool's cap.
    let mut leadership = client.leadership();
    let code = runner.main_loop(&mut leadership, &mut signals).await;
    shut_down(&client, timing).await;
    drop(leadership);
    code
}

struct Runner<'a> {
    args: &'a RunArgs,
    client: &'a QuorumQuestClient,
    timing: Timing,
    /// A streak of failed calls is being reported (one line per streak).
    trouble: bool,
}

/// What ended a term's phase.
enum Next {
    /// Exit with this code.
    Exit(i32),
    /// Campaign again on this stream, maybe with a term already won.
    Continue(Option<LeaderTerm>),
    /// Start a new campaign (after a release) once the retry period passed.
    Recampaign,
}

impl Runner<'_> {
    /// Campaigns and runs the command until the tool must exit; returns
    /// the exit code (the caller shuts the client down).
    async fn main_loop(&mut self, leadership: &mut Leadership, signals: &mut Signals) -> i32 {
        let mut pending: Option<LeaderTerm> = None;
        loop {
            let term = match pending.take().filter(LeaderTerm::is_active) {
                Some(term) => term,
                None => match self.until_elected(leadership, signals).await {
                    Ok(term) => term,
                    Err(code) => return code,
                },
            };
            match self.lead(term, leadership, signals).await {
                Next::Exit(code) => return code,
                Next::Continue(next) => pending = next,
                Next::Recampaign => {
                    // The next stream is not polled (so not campaigning)
                    // until the old one has released.
                    let old = std::mem::replace(leadership, self.client.leadership());
                    release(old, self.timing).await;
                    let wait = self.timing.retry_period;
                    say(format!("campaigning again in {}", dur(wait)));
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        sig = signals.next() => {
                            say(format!("got {}: exiting", signal_name(sig)));
                            return 128 + sig;
                        }
                    }
                }
            }
        }
    }

    /// Follows the stream until this client is elected; `Err(code)` to exit.
    async fn until_elected(
        &mut self,
        leadership: &mut Leadership,
        signals: &mut Signals,
    ) -> Result<LeaderTerm, i32> {
        loop {
            tokio::select! {
                ev = leadership.next() => {
                    let Some(ev) = ev else {
                        fatal("the leadership stream ended unexpectedly");
                        return Err(EXIT_TOOL);
                    };
                    if let LeadershipEvent::Elected { term, lease_remaining } = ev {
                        self.trouble = false;
                        say(format!("elected (term {}, lease {})", term.id(), dur(lease_remaining)));
                        if term.is_active() {
                            return Ok(term);
                        }
                    } else if let Some(line) = rejected_credentials(&ev) {
                        // Not leading, nothing running: a rejected token does
                        // not fix itself (it is read once), so stop here.
                        fatal(line);
                        return Err(EXIT_TOOL);
                    } else {
                        self.describe(&ev);
                    }
                }
                sig = signals.next() => {
                    say(format!("got {}: releasing and exiting", signal_name(sig)));
                    return Err(128 + sig);
                }
            }
        }
    }

    /// Runs the command for `term` until it has ended; decides what next.
    async fn lead(
        &mut self,
        term: LeaderTerm,
        leadership: &mut Leadership,
        signals: &mut Signals,
    ) -> Next {
        let args = self.args;
        let grace = args.kill_grace;
        let spec = Spec {
            argv: args.command.clone(),
            env: vec![
                ("QUORUM_QUEST_TERM".into(), term.id().to_string()),
                (
                    "QUORUM_QUEST_CLIENT_ID".into(),
                    self.client.client_id().to_string(),
                ),
                ("QUORUM_QUEST_SERVICE".into(), args.service.clone()),
                ("QUORUM_QUEST_DOMAIN".into(), args.domain.clone()),
            ],
        };
        let program = args
            .command
            .first()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut sup = match Supervisor::start(&spec, term.clone(), grace).await {
            Ok(sup) => sup,
            Err(StartError::TermOver) => {
                say("the term ended before the command could start");
                return Next::Continue(None);
            }
            Err(StartError::Spawn(e)) => {
                fatal(format!("cannot run `{program}`: {e}"));
                return Next::Exit(if e.kind() == io::ErrorKind::NotFound {
                    EXIT_NOT_FOUND
                } else {
                    EXIT_CANNOT_EXECUTE
                });
            }
        };
        say(format!(
            "started `{program}` (pid {}, its own process group), lease left {}",
            sup.pid(),
            dur(term.remaining())
        ));

        let mut tool_signal: Option<i32> = None;
        let mut stream_open = true;
        let mut pending: Option<LeaderTerm> = None;
        let end = loop {
            tokio::select! {
                end = sup.wait() => break end,
                ev = leadership.next(), if stream_open => match ev {
                    Some(LeadershipEvent::Renewed { .. }) => {
                        self.trouble = false;
                        sup.nudge();
                    }
                    Some(LeadershipEvent::Lost { term: lost, reason }) => {
                        say(format!("lost leadership (term {}): {reason}", lost.id()));
                        if lost.id() == term.id() {
                            sup.stop(libc::SIGTERM, grace);
                        }
                        if pending.as_ref().map(LeaderTerm::id) == Some(lost.id()) {
                            pending = None;
                        }
                    }
                    Some(LeadershipEvent::Elected { term: next, lease_remaining }) => {
                        say(format!(
                            "elected (term {}, lease {}); the previous command is still being stopped",
                            next.id(),
                            dur(lease_remaining)
                        ));
                        pending = Some(next);
                    }
                    Some(other) => self.describe(&other),
                    None => {
                        fatal("the leadership stream ended unexpectedly: stopping the command");
                        stream_open = false;
                        sup.stop(libc::SIGTERM, grace);
                    }
                },
                sig = signals.next() => {
                    if tool_signal.is_none() {
                        tool_signal = Some(sig);
                        say(format!(
                            "got {}: forwarding it to process group {}, SIGKILL in {} at most",
                            signal_name(sig),
                            sup.pid(),
                            dur(grace.min(term.remaining()))
                        ));
                        sup.stop(sig, grace);
                    } else {
                        say(format!("got {} again: SIGKILL now", signal_name(sig)));
                        sup.stop(libc::SIGKILL, Duration::ZERO);
                    }
                }
            }
        };
        let Some(end) = end else {
            fatal("the supervisor thread died; the command's state is unknown");
            return Next::Exit(EXIT_TOOL);
        };
        // Transitions already queued (typically the `Lost` of a term the
        // killer ended at its deadline) get their line before the outcome.
        while let Some(Some(ev)) = futures::FutureExt::now_or_never(leadership.next()) {
            match ev {
                LeadershipEvent::Elected { term: next, .. } => {
                    say(format!("elected (term {})", next.id()));
                    pending = Some(next);
                }
                LeadershipEvent::Lost { term: lost, reason } => {
                    say(format!("lost leadership (term {}): {reason}", lost.id()));
                    if pending.as_ref().map(LeaderTerm::id) == Some(lost.id()) {
                        pending = None;
                    }
                }
                other => self.describe(&other),
            }
        }
        report_end(&program, &end);

        if let Some(sig) = tool_signal {
            return Next::Exit(128 + sig);
        }
        if !stream_open {
            return Next::Exit(EXIT_TOOL);
        }
        if !self.args.restart {
            return Next::Exit(if end.stopped_by_tool() {
                EXIT_LOST
            } else {
                end.status.exit_code()
            });
        }
        if term.is_active() {
            // Still leading (the command ended by itself, or was stopped for
            // renewal trouble that then cleared): give the lock up first.
            return Next::Recampaign;
        }
        Next::Continue(pending)
    }

    /// One line for a transition that needs no action.
    fn describe(&mut self, ev: &LeadershipEvent) {
        match ev {
            LeadershipEvent::Follower => {
                self.trouble = false;
                say("follower: another node holds the lock");
            }
            LeadershipEvent::Renewed { .. } => self.trouble = false,
            LeadershipEvent::Lost { term, reason } => {
                say(format!("lost leadership (term {}): {reason}", term.id()));
            }
            LeadershipEvent::RpcFailed {
                rpc,
                code,
                message,
                lease_remaining,
            } if !self.trouble => {
                self.trouble = true;
                match lease_remaining {
                    Some(left) => say(format!(
                        "renewal trouble: {rpc:?} failed ({code:?}: {message}); lease left {}, \
                         SIGTERM by {} before its end unless a renewal gets through",
                        dur(*left),
                        dur(self.args.kill_grace)
                    )),
                    None => say(format!(
                        "{rpc:?} failed ({code:?}: {message}); retrying every {}",
                        dur(self.timing.retry_period)
                    )),
                }
            }
            _ => {}
        }
    }
}

/// The command's end, with timings relative to the safe deadline when the
/// tool stopped it.
fn report_end(program: &str, end: &ChildEnd) {
    let how = match end.status {
        Status::Code(c) => format!("exited with code {c}"),
        Status::Signal(s) => format!("was killed by {}", signal_name(s)),
    };
    let mut detail = String::new();
    if end.stopped_by_tool() {
        let ms = if end.exited_at >= end.deadline {
            end.exited_at.duration_since(end.deadline).as_secs_f64() * 1e3
        } else {
            -(end.deadline.duration_since(end.exited_at).as_secs_f64() * 1e3)
        };
        detail = format!(" (dead at safe deadline {ms:+.1}ms");
        if let Some(kill) = end.kill_sent {
            detail += &format!(
                ", {} after SIGKILL",
                dur(end.exited_at.saturating_duration_since(kill))
            );
        } else if let Some((at, sig)) = end.term_sent {
            detail += &format!(
                ", {} after {}",
                dur(end.exited_at.saturating_duration_since(at)),
                signal_name(sig)
            );
        }
        detail += ")";
    }
    if !end.group_empty {
        detail += "; processes of its group were still present 500ms after SIGKILL";
    }
    say(format!("`{program}` {how} after {}{detail}", dur(end.ran)));
}

/// The tool's cap on a release: the library bounds it by about one second
/// plus the RPC timeout; a partitioned network must not keep the tool from
/// exiting (the lock then expires by itself).
fn release_bound(timing: Timing) -> Duration {
    timing
        .rpc_timeout
        .saturating_mul(2)
        .saturating_add(Duration::from_secs(1))
}

/// On the way out: stops campaigning for good, ends the term and releases
/// the lock ([`QuorumQuestClient::shutdown`]), within [`release_bound`].
async fn shut_down(client: &QuorumQuestClient, timing: Timing) {
    let bound = release_bound(timing);
    let leading = client.is_leader();
    match tokio::time::timeout(bound, client.shutdown()).await {
        Ok(Ok(())) if leading => say("campaign stopped, lock released"),
        Ok(Ok(())) => say("campaign stopped"),
        Ok(Err(e)) if leading => say(format!(
            "release failed ({}); the lock expires by itself",
            brief(&e)
        )),
        // Not leading: the release only covered an acquire that may have
        // been granted unanswered.
        Ok(Err(e)) => say(format!(
            "campaign stopped (the precautionary release failed: {})",
            brief(&e)
        )),
        Err(_) => say(format!(
            "release did not complete within {}; the lock expires by itself",
            dur(bound)
        )),
    }
}

/// Before a `--restart` re-campaign: resigns this stream (the client stays
/// usable), releasing the lock within [`release_bound`].
async fn release(leadership: Leadership, timing: Timing) {
    let bound = release_bound(timing);
    match tokio::time::timeout(bound, leadership.resign()).await {
        Ok(Ok(())) => say("campaign stopped, lock released"),
        Ok(Err(e)) => say(format!(
            "release failed ({}); the lock expires by itself",
            brief(&e)
        )),
        Err(_) => say(format!(
            "release did not complete within {}; the lock expires by itself",
            dur(bound)
        )),
    }
}

/// The message for a campaign call the server refused for its credentials
/// (`UNAUTHENTICATED`, `PERMISSION_DENIED`) while not leading, if `ev` is one.
fn rejected_credentials(ev: &LeadershipEvent) -> Option<String> {
    let LeadershipEvent::RpcFailed {
        rpc,
        code,
        message,
        lease_remaining: None,
    } = ev
    else {
        return None;
    };
    let name = match code {
        Code::Unauthenticated => "UNAUTHENTICATED",
        Code::PermissionDenied => "PERMISSION_DENIED",
        _ => return None,
    };
    Some(format!(
        "the server refused {rpc:?} with {name} ({message}): check --token-file / --token-env / \
         --header (and --client-cert); exiting, as retrying with the same credentials cannot help"
    ))
}

/// Puts the flag in front of a library `InvalidParameter` message that
/// names a builder knob (`ca_certificate: ...` -> `--ca-cert: ca_certificate: ...`).
fn name_flag(message: &str) -> String {
    const FLAGS: [(&str, &str); 8] = [
        ("address:", "--server"),
        ("ttl:", "--ttl"),
        ("client_id:", "--client-id"),
        ("ca_certificate:", "--ca-cert"),
        ("identity:", "--client-cert/--client-key"),
        ("tls_domain:", "--tls-domain"),
        ("metadata:", "--header"),
        ("bearer_token:", "--token-file/--token-env"),
    ];
    match FLAGS.iter().find(|(knob, _)| message.starts_with(knob)) {
        Some((_, flag)) => format!("{flag}: {message}"),
        None => message.to_string(),
    }
}

/// A failed call as `CODE: message`, other errors with their causes.
fn brief(e: &Error) -> String {
    match e {
        Error::Rpc(status) => format!("{:?}: {}", status.code(), status.message()),
        other => chain(other),
    }
}

/// An error with its causes: `a: b: c`.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out += &format!(": {text}");
        }
        source = s.source();
    }
    out
}
