//! Command-line flags, their defaults and the exit codes (`--help` shows all).

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use quorum_quest_client::{Timing, DEFAULT_ADDRESS};

/// Bad flags or values (clap's own code for usage errors).
pub const EXIT_USAGE: i32 = 2;
/// Leadership was lost (or could no longer be guaranteed) while the command
/// ran: the command was stopped. Not used with `--restart`.
pub const EXIT_LOST: i32 = 124;
/// The tool itself failed: the server could not be reached at start or
/// rejected its credentials, a port could not be bound, an internal error.
pub const EXIT_TOOL: i32 = 125;
/// The command was found but could not be started.
pub const EXIT_CANNOT_EXECUTE: i32 = 126;
/// The command was not found.
pub const EXIT_NOT_FOUND: i32 = 127;

const EXIT_CODES: &str = "\
Exit codes of `run`:
  N        the command ended by itself: its exit code, or 128+S if signal S killed it
  2        bad flags or values
  124      leadership was lost (or could no longer be guaranteed) while the command ran;
           the command was stopped (not with --restart, which campaigns again)
  125      the server could not be reached at start, or it rejected the credentials
           (UNAUTHENTICATED / PERMISSION_DENIED while campaigning: the tool does not retry them),
           or another failure of the tool
  126/127  the command could not be executed / was not found
  128+S    the tool got signal S (130 for SIGINT, 143 for SIGTERM, 129 for SIGHUP): it forwarded
           it to the command's process group, waited up to --kill-grace, sent SIGKILL, released
           the lock
Exit codes of `server`: 0 after SIGINT/SIGTERM, 125 if it cannot listen.";

const RUN_AFTER: &str = "\
The command runs only while this process leads, in its own process group, with
QUORUM_QUEST_TERM, QUORUM_QUEST_CLIENT_ID, QUORUM_QUEST_SERVICE and QUORUM_QUEST_DOMAIN in its
environment. When leadership can no longer be guaranteed (renewals failing as the safe deadline
approaches, the server rejecting the lease, a release) the whole process group gets SIGTERM no
later than (safe deadline - kill grace) and SIGKILL at the safe deadline, which is before the
server can expire the lock: it is dead before another node can be elected. When the command
exits by itself, anything left in its process group is killed, the lock is released and the tool
exits with the command's code (with --restart: campaigns again and reruns it at the next
election, never two copies at once).

TLS and auth: --ca-cert, --client-cert/--client-key and --tls-domain turn TLS on (a bare
host:port then means https; an http:// server with them is an error). Give the token with
--token-file (or --token-env), not in a flag, so that it does not show in `ps`; it is sent as
`authorization: Bearer <token>` and never printed. A token or header the server rejects
(UNAUTHENTICATED or PERMISSION_DENIED) while campaigning ends the tool with exit code 125 after
that first rejection, like `consul lock` on a denied ACL: the token is read once, so retrying
could not help; let a supervisor restart the tool with a fresh one. A rejected renewal while the
command runs is renewal trouble like any other: the command is stopped by the safe deadline.

Examples:
  quorum-quest run --service billing --domain eu-west --ttl 15 -- ./migrate.sh --all
  quorum-quest run --service billing --domain eu-west --server https://quorum.internal:443 \\
      --ca-cert /etc/quorum/ca.pem --token-file /run/secrets/quorum-token -- ./migrate.sh";

/// Runs a command only while this process leads a Quorum Quest election, and
/// kills it before anyone else can be elected.
#[derive(Debug, Parser)]
#[command(name = "quorum-quest", version, after_help = EXIT_CODES)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Campaign for a lock; run CMD while leading, kill it before the lease can expire.
    #[command(after_help = RUN_AFTER)]
    Run(Box<RunArgs>),
    /// An in-memory Quorum Quest server on 127.0.0.1, for trying things locally.
    Server(ServerArgs),
}

/// `quorum-quest run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The service name of the lock.
    #[arg(long)]
    pub service: String,

    /// The domain of the lock.
    #[arg(long)]
    pub domain: String,

    /// The server: http://host:port, https://host:port or host:port.
    #[arg(long, default_value = DEFAULT_ADDRESS)]
    pub server: String,

    /// The lock's time to live, in whole seconds. The safe deadline is the last
    /// renewal's send instant + ttl - max(ttl/10, 100ms); renewals every ttl/3.
    #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..=i32::MAX as u64))]
    pub ttl: u64,

    /// This node's identity, unique per node (default: a random UUID).
    #[arg(long)]
    pub client_id: Option<String>,

    /// How long before the safe deadline the command gets SIGTERM (SIGKILL
    /// follows at the deadline); also how long a forwarded SIGINT/SIGTERM
    /// waits. Like 2s, 500ms, 1.5s (a bare number is seconds). Must be less
    /// than ttl - margin - ttl/3, so that a healthy lease never triggers it.
    #[arg(long, default_value = "2s", value_parser = parse_duration, value_name = "DURATION")]
    pub kill_grace: Duration,

    /// Keep campaigning after the command ends or is stopped, and run it again
    /// at the next election.
    #[arg(long)]
    pub restart: bool,

    /// No transition lines on stderr (errors are still printed). RUST_LOG=debug
    /// shows the client's own logs.
    #[arg(long, short)]
    pub quiet: bool,

    /// Trust the CA certificate(s) in this PEM file instead of the public
    /// roots (TLS; repeatable).
    #[arg(long, value_name = "PATH", help_heading = "TLS and auth")]
    pub ca_cert: Vec<PathBuf>,

    /// Present this client certificate (PEM) for mutual TLS; needs
    /// --client-key.
    #[arg(
        long,
        value_name = "PATH",
        requires = "client_key",
        help_heading = "TLS and auth"
    )]
    pub client_cert: Option<PathBuf>,

    /// The private key (PEM) of --client-cert.
    #[arg(
        long,
        value_name = "PATH",
        requires = "client_cert",
        help_heading = "TLS and auth"
    )]
    pub client_key: Option<PathBuf>,

    /// Verify the server's certificate against this name instead of the
    /// --server host (an IP address, a tunnel).
    #[arg(long, value_name = "NAME", help_heading = "TLS and auth")]
    pub tls_domain: Option<String>,

    /// Read a bearer token from this file (surrounding whitespace and the
    /// trailing newline are trimmed) and send `authorization: Bearer
    /// <token>` with every call. Never printed.
    #[arg(long, value_name = "PATH", help_heading = "TLS and auth")]
    pub token_file: Option<PathBuf>,

    /// Read the bearer token from this environment variable instead.
    #[arg(
        long,
        value_name = "VAR",
        conflicts_with = "token_file",
        help_heading = "TLS and auth"
    )]
    pub token_env: Option<String>,

    /// Send this header with every call (repeatable). Visible in `ps`: put
    /// secrets in --token-file.
    #[arg(long = "header", value_name = "KEY=VALUE", value_parser = parse_header, help_heading = "TLS and auth")]
    pub headers: Vec<(String, String)>,

    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<OsString>,
}

impl RunArgs {
    /// Checks what clap cannot: the grace must leave a healthy lease alone.
    pub fn check_kill_grace(&self) -> Result<(), String> {
        let ttl = Duration::from_secs(self.ttl);
        let timing = Timing::for_ttl(ttl);
        let valid_after_renewal = ttl.saturating_sub(timing.safety_margin);
        let limit = valid_after_renewal.saturating_sub(timing.renew_interval);
        if self.kill_grace >= limit {
            return Err(format!(
                "--kill-grace {:?} is too long for --ttl {}: a lease is renewed every {:?} and is \
                 safe for {:?} after each renewal is sent, so SIGTERM would be due before the \
                 next renewal even when all is well; use a grace under {:?} or a longer --ttl",
                self.kill_grace, self.ttl, timing.renew_interval, valid_after_renewal, limit
            ));
        }
        Ok(())
    }
}

/// `quorum-quest server`.
#[derive(Debug, Args)]
pub struct ServerArgs {
    /// TCP port on 127.0.0.1 (0: any free port; the URL is printed on stdout).
    #[arg(long, default_value_t = 5050)]
    pub port: u16,

    /// Lease in seconds granted when a request carries ttl <= 0.
    #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..=i32::MAX as u64))]
    pub default_ttl: u64,
}

/// `KEY=VALUE` (split at the first `=`; the key must not be empty).
pub fn parse_header(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((key, value)) if !key.trim().is_empty() => {
            Ok((key.trim().to_string(), value.to_string()))
        }
        Some(_) => Err("the header has no name (expected KEY=VALUE)".into()),
        None => Err("expected KEY=VALUE, like x-tenant=blue".into()),
    }
}

/// `2s`, `500ms`, `1.5s`, `1m`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (like 2s, 500ms, 1.5s)"))?;
    let scale = match unit.trim() {
        "" | "s" => 1.0,
        "ms" => 0.001,
        "m" => 60.0,
        other => return Err(format!("unknown unit `{other}` in `{s}` (use ms, s or m)")),
    };
    Duration::try_from_secs_f64(value * scale).map_err(|e| format!("`{s}`: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units_and_bad_ones_are_errors() {
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert!(parse_duration("2h").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("1e999s").is_err());
    }

    #[test]
    fn headers_split_at_the_first_equals_sign() {
        assert_eq!(
            parse_header("x-tenant=blue"),
            Ok(("x-tenant".into(), "blue".into()))
        );
        assert_eq!(parse_header("k=a=b"), Ok(("k".into(), "a=b".into())));
        assert_eq!(parse_header("k="), Ok(("k".into(), String::new())));
        assert!(parse_header("=v").is_err());
        assert!(parse_header("novalue").is_err());
    }
}
