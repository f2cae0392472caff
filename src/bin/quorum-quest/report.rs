//! The tool's own lines on stderr: one per transition, prefixed with the UTC
//! time of day (milliseconds) and the tool's pid.
//!
//! Lines go through a channel to one writer thread, so no caller ever blocks
//! on stderr: not the async main loop, and above all not the kill path (a
//! full or stuck stderr pipe must never delay a SIGKILL).

use std::io::Write;
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

enum Msg {
    Line(String),
    Flush(mpsc::SyncSender<()>),
}

struct Reporter {
    tx: mpsc::Sender<Msg>,
    quiet: bool,
}

static REPORTER: OnceLock<Reporter> = OnceLock::new();

/// Starts the writer thread. `quiet` silences [`say`] (not [`fatal`]).
pub fn init(quiet: bool) {
    let (tx, rx) = mpsc::channel::<Msg>();
    let spawned = std::thread::Builder::new()
        .name("qq-stderr".into())
        .spawn(move || {
            let mut err = std::io::stderr();
            for msg in rx {
                match msg {
                    // A failed write to stderr has nowhere to be reported.
                    Msg::Line(line) => {
                        let _ = err.write_all(line.as_bytes());
                    }
                    Msg::Flush(ack) => {
                        let _ = err.flush();
                        let _ = ack.send(());
                    }
                }
            }
        });
    if spawned.is_ok() {
        let _ = REPORTER.set(Reporter { tx, quiet });
    }
}

fn send(line: &str, always: bool) {
    let stamped = format!(
        "{} quorum-quest[{}]: {line}\n",
        time_of_day(),
        std::process::id()
    );
    match REPORTER.get() {
        Some(r) if r.quiet && !always => {}
        Some(r) => {
            let _ = r.tx.send(Msg::Line(stamped));
        }
        // Not initialised (or the thread could not start): write directly.
        None => {
            let _ = std::io::stderr().write_all(stamped.as_bytes());
        }
    }
}

/// One transition line (silenced by `--quiet`).
pub fn say(line: impl AsRef<str>) {
    send(line.as_ref(), false);
}

/// An error that ends the tool: printed even with `--quiet`.
pub fn fatal(line: impl AsRef<str>) {
    send(&format!("error: {}", line.as_ref()), true);
}

/// Waits (at most `within`) until every line sent so far is written.
pub fn flush(within: Duration) {
    if let Some(r) = REPORTER.get() {
        let (ack_tx, ack_rx) = mpsc::sync_channel(1);
        if r.tx.send(Msg::Flush(ack_tx)).is_ok() {
            let _ = ack_rx.recv_timeout(within);
        }
    }
}

/// `HH:MM:SS.mmm` (UTC).
fn time_of_day() -> String {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since.as_secs() % 86_400;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60,
        since.subsec_millis()
    )
}

/// A duration for humans: `850ms`, `2.70s`, `1.2ms`.
pub fn dur(d: Duration) -> String {
    if d >= Duration::from_secs(1) {
        format!("{:.2}s", d.as_secs_f64())
    } else if d >= Duration::from_millis(10) {
        format!("{}ms", d.as_millis())
    } else {
        format!("{:.1}ms", d.as_secs_f64() * 1000.0)
    }
}

/// A signal's name for messages.
pub fn signal_name(sig: i32) -> String {
    match sig {
        libc::SIGTERM => "SIGTERM".into(),
        libc::SIGKILL => "SIGKILL".into(),
        libc::SIGINT => "SIGINT".into(),
        libc::SIGHUP => "SIGHUP".into(),
        libc::SIGQUIT => "SIGQUIT".into(),
        libc::SIGABRT => "SIGABRT".into(),
        libc::SIGSEGV => "SIGSEGV".into(),
        libc::SIGPIPE => "SIGPIPE".into(),
        other => format!("signal {other}"),
    }
}
