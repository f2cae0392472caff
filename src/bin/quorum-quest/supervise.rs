//! Running the command and killing it on time.
//!
//! The kill path is deliberately independent of the async runtime: two plain
//! threads per command, a mutex and a condition variable.
//!
//! - The **reaper** thread spawns the command (in its own process group, so
//!   one `kill(-pgid)` reaches its descendants too), waits for it to exit
//!   *without reaping it* (`waitid(WNOWAIT)`: while the zombie exists its pid,
//!   hence its process-group id, cannot be reused), kills whatever is left in
//!   the group, reaps, and reports the end.
//! - The **killer** thread reads the safe deadline straight from the
//!   [`LeaderTerm`] (a lock-free read of what the client publishes; renewals
//!   move it, a shorter lease shortens it) at least every [`POLL`], and sends
//!   SIGTERM to the group at `deadline - grace` and SIGKILL at the deadline.
//!   A stop request (a loss, a signal to the tool) moves both earlier: SIGTERM
//!   now, SIGKILL at `min(now + grace, deadline)`. Once SIGTERM is sent the
//!   SIGKILL is committed (no later than SIGTERM + grace), even if a renewal
//!   then gets through.
//!
//! - A **guard** process in the command's group (see [`start_guard`]) kills
//!   the group if the tool itself dies.
//!
//! Neither thread needs the runtime, writes to stderr (lines go to the
//! reporter's channel) or allocates on the way to a signal beyond a log line,
//! so a busy or stuck runtime cannot delay a kill.

use std::ffi::OsString;
use std::io;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use quorum_quest_client::LeaderTerm;
use tokio::sync::oneshot;

use crate::report::{dur, say, signal_name};

/// How often the killer re-reads the deadline when nothing wakes it.
pub const POLL: Duration = Duration::from_millis(20);

/// Where the killer reads the safe deadline: a [`LeaderTerm`] in the tool.
pub trait DeadlineSource: Send + 'static {
    /// The current safe deadline, or `None` once the term has ended.
    fn deadline(&self) -> Option<Instant>;
}

impl DeadlineSource for LeaderTerm {
    fn deadline(&self) -> Option<Instant> {
        LeaderTerm::deadline(self).map(|d| d.into_std())
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Spec {
    /// The program and its arguments.
    pub argv: Vec<OsString>,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
}

/// How the command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// It exited with this code.
    Code(i32),
    /// A signal killed it.
    Signal(i32),
}

impl Status {
    /// The shell's convention: the code, or 128 + the signal.
    pub fn exit_code(self) -> i32 {
        match self {
            Status::Code(c) => c,
            Status::Signal(s) => 128 + s,
        }
    }
}

/// What the supervisor saw, for the report and the exit code.
#[derive(Debug, Clone)]
pub struct ChildEnd {
    /// How the command (the group leader) ended.
    pub status: Status,
    /// From spawn to its exit.
    pub ran: Duration,
    /// When it exited (observed by the reaper).
    pub exited_at: Instant,
    /// The first stop signal sent by the tool, and when.
    pub term_sent: Option<(Instant, i32)>,
    /// When SIGKILL was sent by the killer (before the command exited).
    pub kill_sent: Option<Instant>,
    /// The last safe deadline the killer knew.
    pub deadline: Instant,
    /// `true` when nothing was left in the process group afterwards.
    pub group_empty: bool,
}

impl ChildEnd {
    /// `true` if the tool signalled the command before it exited.
    pub fn stopped_by_tool(&self) -> bool {
        self.term_sent.is_some() || self.kill_sent.is_some()
    }
}

/// Why the command could not be started.
#[derive(Debug)]
pub enum StartError {
    /// The term ended before the command could start.
    TermOver,
    /// `exec` failed.
    Spawn(io::Error),
}

#[derive(Debug, Clone, Copy)]
struct StopRequest {
    at: Instant,
    signal: i32,
    grace: Duration,
}

#[derive(Debug)]
struct KillState {
    /// The last deadline read from the source.
    deadline: Instant,
    stop: Option<StopRequest>,
    term_sent: Option<(Instant, i32)>,
    kill_sent: Option<Instant>,
    /// Set by the reaper once the command exited: no more signals by pgid.
    exited: bool,
}

impl KillState {
    /// When SIGTERM (or the stop signal) and SIGKILL are due.
    fn schedule(&self, grace: Duration) -> (Instant, i32, Instant) {
        let mut term_at = self.deadline.checked_sub(grace).unwrap_or(self.deadline);
        let mut signal = libc::SIGTERM;
        let mut kill_at = self.deadline;
        if let Some(stop) = self.stop {
            if stop.at < term_at {
                term_at = stop.at;
                signal = stop.signal;
            }
            kill_at = kill_at.min(stop.at.checked_add(stop.grace).unwrap_or(kill_at));
        }
        if let Some((sent, _)) = self.term_sent {
            kill_at = kill_at.min(sent.checked_add(grace).unwrap_or(kill_at));
        }
        (term_at, signal, kill_at)
    }
}

struct Shared {
    state: Mutex<KillState>,
    wake: Condvar,
    pgid: libc::pid_t,
    grace: Duration,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, KillState> {
        // A poisoned lock only means another thread panicked while holding
        // it; the state is still the best we know, and killing must go on.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Sends `sig` to process group `pgid`.
fn signal_group(pgid: libc::pid_t, sig: i32) -> io::Result<()> {
    // SAFETY: kill(2) takes plain integers; a negative pid names a process
    // group. pgid > 1 always (a spawned child's pid), so this is never
    // kill(-1) or kill(0).
    if pgid <= 1 {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let rc = unsafe { libc::kill(-pgid, sig) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// One running command and its two threads.
pub struct Supervisor {
    shared: Arc<Shared>,
    pid: u32,
    end: oneshot::Receiver<ChildEnd>,
}

impl Supervisor {
    /// Spawns the command while `source` has a deadline, armed to be killed
    /// by it.
    pub async fn start(
        spec: &Spec,
        source: impl DeadlineSource,
        grace: Duration,
    ) -> Result<Supervisor, StartError> {
        let (program, args) = spec
            .argv
            .split_first()
            .ok_or(StartError::Spawn(io::Error::from(
                io::ErrorKind::InvalidInput,
            )))?;
        let mut cmd = Command::new(program);
        cmd.args(args).process_group(0);
        for (k, v) in &spec.env {
            cmd.env(k, v);
        }
        die_with_parent(&mut cmd);

        let (started_tx, started_rx) = oneshot::channel();
        let (end_tx, end_rx) = oneshot::channel();
        std::thread::Builder::new()
            .name("qq-reaper".into())
            .spawn(move || reaper(cmd, source, grace, started_tx, end_tx))
            .map_err(StartError::Spawn)?;
        match started_rx.await {
            Ok(Ok((pid, shared))) => Ok(Supervisor {
                shared,
                pid,
                end: end_rx,
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(StartError::Spawn(io::Error::other(
                "the supervisor thread ended before starting the command",
            ))),
        }
    }

    /// The command's pid (also its process group id).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Makes the killer re-read the deadline now (after a renewal or a loss).
    pub fn nudge(&self) {
        self.shared.wake.notify_all();
    }

    /// Stops the command: `signal` to its group now, SIGKILL after `grace`
    /// or at the safe deadline, whichever is first. A second call only
    /// brings things forward.
    pub fn stop(&self, signal: i32, grace: Duration) {
        let mut st = self.shared.lock();
        let now = Instant::now();
        let earlier = match st.stop {
            None => true,
            Some(s) => match (now.checked_add(grace), s.at.checked_add(s.grace)) {
                (Some(new), Some(old)) => new < old,
                (Some(_), None) => true,
                (None, _) => false,
            },
        };
        if earlier {
            st.stop = Some(StopRequest {
                at: now,
                signal,
                grace,
            });
        }
        drop(st);
        self.shared.wake.notify_all();
    }

    /// Waits for the command to end (cancel-safe). `None` only if the
    /// supervisor thread died.
    pub async fn wait(&mut self) -> Option<ChildEnd> {
        (&mut self.end).await.ok()
    }
}

/// Linux: the kernel sends SIGKILL to the command if the thread that spawned
/// it (the reaper, which lives until the command is reaped) dies, i.e. if
/// the tool itself is killed. Its own children are not covered.
#[cfg(target_os = "linux")]
fn die_with_parent(cmd: &mut Command) {
    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() };
    // SAFETY: the closure runs between fork and exec and only makes
    // async-signal-safe calls (prctl, getppid) and builds an io::Error from
    // a raw code (no allocation).
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                // The tool died between fork and prctl.
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_parent(_cmd: &mut Command) {}

type Started = Result<(u32, Arc<Shared>), StartError>;

/// The reaper thread: spawn, wait, clean the group up, reap, report.
fn reaper(
    mut cmd: Command,
    source: impl DeadlineSource,
    grace: Duration,
    started: oneshot::Sender<Started>,
    end: oneshot::Sender<ChildEnd>,
) {
    let Some(deadline) = source.deadline().filter(|d| *d > Instant::now()) else {
        let _ = started.send(Err(StartError::TermOver));
        return;
    };
    reap_strays();
    let spawned_at = Instant::now();
    let child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => {
            let _ = started.send(Err(StartError::Spawn(e)));
            return;
        }
    };
    let pid = child.id();
    // The child is reaped below with waitpid; std's handle is not used again
    // (dropping it neither waits nor kills).
    drop(child);
    let Ok(pgid) = libc::pid_t::try_from(pid) else {
        let _ = started.send(Err(StartError::Spawn(io::Error::other("pid out of range"))));
        return;
    };
    let shared = Arc::new(Shared {
        state: Mutex::new(KillState {
            deadline,
            stop: None,
            term_sent: None,
            kill_sent: None,
            exited: false,
        }),
        wake: Condvar::new(),
        pgid,
        grace,
    });
    // Held until the group is reaped: if the tool dies, its end closes and
    // the guard kills the whole group.
    let guard = match start_guard(pgid) {
        Ok(guard) => guard,
        Err(e) => {
            // Without a guard the descendants would outlive a killed tool.
            let _ = signal_group(pgid, libc::SIGKILL);
            let status = reap_group(pgid);
            tracing::error!(error = %e, ?status, "cannot start the group guard");
            let _ = started.send(Err(StartError::Spawn(e)));
            return;
        }
    };
    let killer_shared = shared.clone();
    let killer = std::thread::Builder::new()
        .name("qq-killer".into())
        .spawn(move || killer(&killer_shared, &source));
    if let Err(e) = killer {
        // Without a killer the command must not run at all.
        let _ = signal_group(pgid, libc::SIGKILL);
        let status = reap_group(pgid);
        tracing::error!(error = %e, ?status, "cannot start the killer thread");
        let _ = started.send(Err(StartError::Spawn(e)));
        return;
    }
    let _ = started.send(Ok((pid, shared.clone())));

    wait_exited(pgid);
    let exited_at = Instant::now();
    let (term_sent, kill_sent, deadline) = {
        let mut st = shared.lock();
        st.exited = true;
        (st.term_sent, st.kill_sent, st.deadline)
    };
    shared.wake.notify_all();
    // The leader is a zombie, so the group id is still ours: kill what the
    // command left behind before reaping it.
    let _ = signal_group(pgid, libc::SIGKILL);
    let status = reap_group(pgid);
    drop(guard);
    let group_empty = group_gone(pgid, Duration::from_millis(500));
    let _ = end.send(ChildEnd {
        status,
        ran: exited_at.saturating_duration_since(spawned_at),
        exited_at,
        term_sent,
        kill_sent,
        deadline,
        group_empty,
    });
}

/// The guard: a shell in the command's process group that waits for its
/// stdin (a pipe only the tool holds) to close, then SIGKILLs its own group.
/// `PR_SET_PDEATHSIG` kills only the command when the tool dies (SIGKILL,
/// the OOM killer); the guard kills what the command started too, so no
/// descendant goes on past the safe deadline. Being a member of the group,
/// it keeps the group id from being reused while it waits. It ignores the
/// stop signals the tool forwards, and dies with the group's SIGKILL.
fn start_guard(pgid: libc::pid_t) -> io::Result<std::process::ChildStdin> {
    let mut guard = Command::new("/bin/sh")
        .args([
            "-c",
            "trap '' TERM INT HUP QUIT USR1 USR2; read _ ; kill -KILL 0",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .process_group(pgid)
        .spawn()?;
    // Reaped with the group (`reap_group`); the handle is not used again.
    guard
        .stdin
        .take()
        .ok_or_else(|| io::Error::other("the guard has no stdin"))
}

/// Blocks until `pid` has exited, leaving it waitable (a zombie).
fn wait_exited(pid: libc::pid_t) {
    loop {
        // SAFETY: siginfo_t is plain data; waitid writes into it.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: a valid pointer to a siginfo_t we own.
        let rc = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        if rc == 0 {
            return;
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINTR) {
            // ECHILD: already reaped (cannot happen: only this thread reaps).
            tracing::error!(error = %err, pid, "waitid failed");
            return;
        }
    }
}

/// Linux: makes the tool a "child subreaper", so that the command's
/// descendants are re-parented to the tool (not to init) when their parent
/// dies, and [`reap_group`] can wait for every one of them: "dead" then means
/// reaped, not merely signalled. Elsewhere a no-op ([`group_gone`] polls).
pub fn adopt_orphans() {
    #[cfg(target_os = "linux")]
    // SAFETY: prctl with integer arguments; failure only loses the adoption.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1) } == 0 {
        ADOPTING.store(true, Ordering::SeqCst);
    }
}

/// Set by [`adopt_orphans`]: this process runs one command at a time and may
/// reap any child between commands.
static ADOPTING: AtomicBool = AtomicBool::new(false);

/// Reaps every process of group `pgid` that is (or became) our child, the
/// command itself included; returns the command's status.
fn reap_group(pgid: libc::pid_t) -> Status {
    let mut status = None;
    loop {
        let mut raw = 0;
        // SAFETY: a valid pointer to an int we own.
        let rc = unsafe { libc::waitpid(-pgid, &mut raw, 0) };
        if rc > 0 {
            if rc == pgid {
                status = Some(if libc::WIFSIGNALED(raw) {
                    Status::Signal(libc::WTERMSIG(raw))
                } else {
                    Status::Code(libc::WEXITSTATUS(raw))
                });
            }
            continue;
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::ECHILD) => break,
            _ => {
                tracing::error!(error = %err, pgid, "waitpid failed");
                break;
            }
        }
    }
    status.unwrap_or(Status::Code(-1))
}

/// Reaps adopted processes that left the command's group (daemons) and have
/// exited since; called between commands, when no command runs.
fn reap_strays() {
    if !ADOPTING.load(Ordering::SeqCst) {
        return;
    }
    loop {
        let mut raw = 0;
        // SAFETY: a valid pointer to an int we own.
        let rc = unsafe { libc::waitpid(-1, &mut raw, libc::WNOHANG) };
        if rc <= 0 {
            return;
        }
    }
}

/// Polls until no process is left in group `pgid` (killed descendants are
/// reaped by init; a zombie still counts), up to `within`.
fn group_gone(pgid: libc::pid_t, within: Duration) -> bool {
    let until = Instant::now() + within;
    loop {
        if signal_group(pgid, 0).is_err() {
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The killer thread: signals on schedule until the command has exited.
fn killer(shared: &Shared, source: &impl DeadlineSource) {
    let mut st = shared.lock();
    loop {
        if st.exited {
            return;
        }
        let now = Instant::now();
        match source.deadline() {
            Some(d) => st.deadline = d,
            None => {
                // The term ended (reported lost): stop within what is left.
                if st.stop.is_none() {
                    st.stop = Some(StopRequest {
                        at: now,
                        signal: libc::SIGTERM,
                        grace: shared.grace,
                    });
                }
            }
        }
        let (term_at, signal, kill_at) = st.schedule(shared.grace);
        if st.kill_sent.is_none() && now >= kill_at {
            let result = signal_group(shared.pgid, libc::SIGKILL);
            st.kill_sent = Some(now);
            let before = st.deadline.saturating_duration_since(now);
            let after = now.saturating_duration_since(st.deadline);
            say(match result {
                Ok(()) if after.is_zero() => format!(
                    "sent SIGKILL to process group {} ({} before the safe deadline)",
                    shared.pgid,
                    dur(before)
                ),
                Ok(()) => format!(
                    "sent SIGKILL to process group {} (at the safe deadline, +{})",
                    shared.pgid,
                    dur(after)
                ),
                Err(e) => format!("SIGKILL to process group {}: {e}", shared.pgid),
            });
            continue;
        }
        if st.term_sent.is_none() && now >= term_at {
            let result = signal_group(shared.pgid, signal);
            // A stopped process cannot act on SIGTERM until continued.
            let _ = signal_group(shared.pgid, libc::SIGCONT);
            st.term_sent = Some((now, signal));
            let kill_in = st.schedule(shared.grace).2.saturating_duration_since(now);
            say(match result {
                Ok(()) => format!(
                    "sent {} to process group {} ({} before the safe deadline; SIGKILL in {})",
                    signal_name(signal),
                    shared.pgid,
                    dur(st.deadline.saturating_duration_since(now)),
                    dur(kill_in)
                ),
                Err(e) => format!(
                    "{} to process group {}: {e}",
                    signal_name(signal),
                    shared.pgid
                ),
            });
            continue;
        }
        let mut next = now + POLL;
        if st.term_sent.is_none() {
            next = next.min(term_at);
        }
        if st.kill_sent.is_none() {
            next = next.min(kill_at);
        }
        let wait = next.saturating_duration_since(now);
        st = shared
            .wake
            .wait_timeout(st, wait)
            .map(|(g, _)| g)
            .unwrap_or_else(|p| p.into_inner().0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deadline that never moves, or ends when told.
    struct Fixed(Instant, Arc<AtomicBool>);

    impl DeadlineSource for Fixed {
        fn deadline(&self) -> Option<Instant> {
            (!self.1.load(Ordering::SeqCst)).then_some(self.0)
        }
    }

    fn sh(script: &str) -> Spec {
        Spec {
            argv: vec!["sh".into(), "-c".into(), script.into()],
            env: vec![],
        }
    }

    /// The kill path needs no runtime: this test's runtime is blocked (by a
    /// std sleep) from before the deadline until well after it, and the
    /// command that ignores SIGTERM is still dead by SIGKILL at the deadline.
    #[tokio::test(flavor = "current_thread")]
    async fn the_deadline_kills_a_command_that_ignores_sigterm_while_the_runtime_is_blocked() {
        let deadline = Instant::now() + Duration::from_millis(600);
        let src = Fixed(deadline, Arc::new(AtomicBool::new(false)));
        let mut sup = Supervisor::start(
            &sh("trap '' TERM; while :; do sleep 0.05; done"),
            src,
            Duration::from_millis(300),
        )
        .await
        .expect("sh starts");
        std::thread::sleep(Duration::from_millis(1500)); // blocks the runtime
        let end = sup.wait().await.expect("an end is reported");
        assert_eq!(end.status, Status::Signal(libc::SIGKILL));
        let kill = end.kill_sent.expect("SIGKILL was sent");
        let term = end.term_sent.expect("SIGTERM was sent first").0;
        assert!(term < kill && kill >= deadline && end.exited_at >= kill);
        println!(
            "SIGTERM {:?} before the deadline, SIGKILL {:?} after it, dead {:?} after SIGKILL",
            deadline - term,
            kill - deadline,
            end.exited_at - kill
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_term_that_ends_stops_the_command_with_sigterm_first() {
        let ended = Arc::new(AtomicBool::new(false));
        let src = Fixed(Instant::now() + Duration::from_secs(60), ended.clone());
        let mut sup = Supervisor::start(
            &sh("while :; do sleep 0.05; done"),
            src,
            Duration::from_secs(5),
        )
        .await
        .expect("sh starts");
        ended.store(true, Ordering::SeqCst);
        sup.nudge();
        let end = sup.wait().await.expect("an end is reported");
        assert_eq!(end.status, Status::Signal(libc::SIGTERM));
        assert!(end.kill_sent.is_none());
    }
}
