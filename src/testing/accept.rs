//! The accept loop shared by the fault proxy and the chaos relay.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Accepts connections on `listener` until `stop` is cancelled, running the
/// task `serve` returns for each one (`None`: nothing to run, the connection
/// was dealt with); then closes the listener and waits for those tasks, which
/// must watch `stop` themselves. `what` names the owner in logs.
pub(crate) async fn accept_until<F, Fut>(
    listener: TcpListener,
    stop: CancellationToken,
    what: &'static str,
    mut serve: F,
) where
    F: FnMut(TcpStream, SocketAddr) -> Option<Fut>,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            conn = listener.accept() => match conn {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    if let Some(task) = serve(stream, peer) {
                        connections.spawn(task);
                    }
                }
                Err(err) => {
                    // E.g. out of file descriptors: back off instead of spinning.
                    tracing::warn!(%err, what, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
        }
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}
