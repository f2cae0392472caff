//! `quorum-quest server`: the crate's in-memory `TestServer` on 127.0.0.1,
//! for trying the tool (or any Quorum Quest client) locally.

use std::time::Duration;

use quorum_quest_client::testing::TestServer;

use crate::args::{ServerArgs, EXIT_TOOL};
use crate::report::{fatal, say, signal_name};
use crate::run::Signals;

/// Serves until SIGINT/SIGTERM; returns the exit code.
pub async fn serve(args: ServerArgs) -> i32 {
    let mut signals = match Signals::new() {
        Ok(s) => s,
        Err(e) => {
            fatal(format!("cannot handle signals: {e}"));
            return EXIT_TOOL;
        }
    };
    let started = TestServer::builder()
        .port(args.port)
        .default_ttl(Duration::from_secs(args.default_ttl))
        .start()
        .await;
    let server = match started {
        Ok(server) => server,
        Err(e) => {
            fatal(format!("cannot listen on 127.0.0.1:{}: {e}", args.port));
            return EXIT_TOOL;
        }
    };
    // The one line on stdout, for scripts (with --port 0 it tells the port).
    println!("listening on {}", server.url());
    say(format!(
        "in-memory Quorum Quest server on {} (default ttl {}s; locks are lost when it stops); \
         every call is logged; Ctrl+C to stop",
        server.url(),
        args.default_ttl
    ));
    let sig = signals.next().await;
    say(format!("got {}: shutting down", signal_name(sig)));
    server.shutdown().await;
    0
}
