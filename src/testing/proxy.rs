//! [`FaultProxy`]: a TCP proxy that can partition or reset the network between
//! a client and a server.

use std::fmt;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::accept::accept_until;

/// How long `shutdown` waits for the proxy's tasks before aborting them.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(5);

/// What a [`FaultProxy`] does with traffic.
///
/// ```
/// use quorum_quest_client::testing::ProxyMode;
///
/// assert_ne!(ProxyMode::Pass, ProxyMode::Blackhole);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ProxyMode {
    /// Bytes flow both ways.
    Pass,
    /// A network partition: nothing flows either way, but sockets stay open and
    /// new connections are accepted (the proxy opens their upstream connection
    /// only once the mode is [`Pass`](ProxyMode::Pass) again, so the server
    /// sees nothing). Bytes are not lost: they wait (in the proxy and in the
    /// kernel's socket buffers, as TCP would keep retransmitting them) and are
    /// delivered when the mode goes back to `Pass`. A peer that gives up and
    /// closes meanwhile is noticed only then (or on `Reset` / shutdown), as
    /// across a real partition.
    Blackhole,
    /// Every live connection is cut (with `SO_LINGER 0`, so the peers see a TCP
    /// RST), and new connections are accepted and cut at once, until the mode
    /// changes.
    Reset,
}

struct ProxyInner {
    addr: SocketAddr,
    mode: watch::Sender<ProxyMode>,
    accepted: Arc<AtomicU64>,
    stop: CancellationToken,
    task: tokio::sync::Mutex<Option<JoinHandle<()>>>,
}

impl Drop for ProxyInner {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A TCP proxy on `127.0.0.1` in front of a server, whose
/// [mode](ProxyMode) a test switches to simulate partitions and resets.
/// Mode switches apply to live connections at once.
///
/// `FaultProxy` is a cheap handle: clone it freely. When the last handle is
/// dropped the proxy stops (calling [`FaultProxy::shutdown`] first waits for
/// its tasks to end).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use quorum_quest_client::proto::leader_election_service_client::LeaderElectionServiceClient;
/// use quorum_quest_client::proto::ReleaseLockRequest;
/// use quorum_quest_client::testing::{FaultProxy, ProxyMode, TestServer};
///
/// let server = TestServer::start().await?;
/// let proxy = FaultProxy::start(server.addr()).await?;
/// let mut client = LeaderElectionServiceClient::connect(proxy.url()).await?;
/// client.release_lock(ReleaseLockRequest::default()).await?;
///
/// proxy.set_mode(ProxyMode::Reset);
/// assert!(client.release_lock(ReleaseLockRequest::default()).await.is_err());
/// proxy.set_mode(ProxyMode::Pass);
/// # proxy.shutdown().await;
/// # server.shutdown().await;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct FaultProxy {
    inner: Arc<ProxyInner>,
}

impl fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultProxy")
            .field("addr", &self.inner.addr)
            .field("mode", &self.mode())
            .finish_non_exhaustive()
    }
}

impl FaultProxy {
    /// Starts a proxy on `127.0.0.1` (a free port) forwarding to `target`,
    /// in [`ProxyMode::Pass`].
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> std::io::Result<()> {
    /// use quorum_quest_client::testing::{FaultProxy, TestServer};
    ///
    /// let server = TestServer::start().await?;
    /// let proxy = FaultProxy::start(server.addr()).await?;
    /// assert_ne!(proxy.addr(), server.addr());
    /// # proxy.shutdown().await;
    /// # server.shutdown().await;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn start(target: SocketAddr) -> io::Result<FaultProxy> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let (mode, _) = watch::channel(ProxyMode::Pass);
        let accepted = Arc::new(AtomicU64::new(0));
        let stop = CancellationToken::new();
        let task = tokio::spawn(accept_loop(
            listener,
            target,
            mode.subscribe(),
            Arc::clone(&accepted),
            stop.clone(),
        ));
        tracing::info!(%addr, %target, "fault proxy listening");
        Ok(FaultProxy {
            inner: Arc::new(ProxyInner {
                addr,
                mode,
                accepted,
                stop,
                task: tokio::sync::Mutex::new(Some(task)),
            }),
        })
    }

    /// The address the proxy listens on.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> std::io::Result<()> {
    /// use quorum_quest_client::testing::{FaultProxy, TestServer};
    ///
    /// let server = TestServer::start().await?;
    /// let proxy = FaultProxy::start(server.addr()).await?;
    /// assert!(proxy.addr().ip().is_loopback());
    /// # proxy.shutdown().await;
    /// # server.shutdown().await;
    /// # Ok(())
    /// # }
    /// ```
    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// The address to give a client: `http://127.0.0.1:PORT`.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> std::io::Result<()> {
    /// use quorum_quest_client::testing::{FaultProxy, TestServer};
    ///
    /// let server = TestServer::start().await?;
    /// let proxy = FaultProxy::start(server.addr()).await?;
    /// assert_eq!(proxy.url(), format!("http://{}", proxy.addr()));
    /// # proxy.shutdown().await;
    /// # server.shutdown().await;
    /// # Ok(())
    /// # }
    /// ```
    pub fn url(&self) -> String {
        format!("http://{}", self.inner.addr)
    }

    /// Switches the mode; live connections follow at once.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> std::io::Result<()> {
    /// use quorum_quest_client::testing::{FaultProxy, ProxyMode, TestServer};
    ///
    /// let server = TestServer::start().await?;
    /// let proxy = FaultProxy::start(server.addr()).await?;
    /// proxy.set_mode(ProxyMode::Blackhole);
    /// assert_eq!(proxy.mode(), ProxyMode::Blackhole);
    /// # proxy.shutdown().await;
    /// # server.shutdown().await;
    /// # Ok(())
    /// # }
    /// ```
    pub fn set_mode(&self, mode: ProxyMode) {
        let old = self.inner.mode.send_replace(mode);
        tracing::info!(addr = %self.inner.addr, ?old, new = ?mode, "fault proxy mode");
    }

    /// The current mode.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> std::io::Result<()> {
    /// use quorum_quest_client::testing::{FaultProxy, ProxyMode, TestServer};
    ///
    /// let server = TestServer::start().await?;
    /// let proxy = FaultProxy::start(server.addr()).await?;
    /// assert_eq!(proxy.mode(), ProxyMode::Pass);
    /// # proxy.shutdown().await;
    /// # server.shutdown().await;
    /// # Ok(())
    /// # }
    /// ```
    pub fn mode(&self) -> ProxyMode {
        *self.inner.mode.borrow()
    }

    /// How many client connections the proxy has accepted (in any mode).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> std::io::Result<()> {
    /// use quorum_quest_client::testing::{FaultProxy, TestServer};
    ///
    /// let server = TestServer::start().await?;
    /// let proxy = FaultProxy::start(server.addr()).await?;
    /// assert_eq!(proxy.connections_accepted(), 0);
    /// # proxy.shutdown().await;
    /// # server.shutdown().await;
    /// # Ok(())
    /// # }
    /// ```
    pub fn connections_accepted(&self) -> u64 {
        self.inner.accepted.load(Ordering::Relaxed)
    }

    /// Stops the proxy: closes the listener and cuts every connection, then
    /// waits for its tasks to end. Idempotent.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> std::io::Result<()> {
    /// use quorum_quest_client::testing::{FaultProxy, TestServer};
    ///
    /// let server = TestServer::start().await?;
    /// let proxy = FaultProxy::start(server.addr()).await?;
    /// proxy.shutdown().await;
    /// assert!(tokio::net::TcpStream::connect(proxy.addr()).await.is_err());
    /// # server.shutdown().await;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn shutdown(&self) {
        self.inner.stop.cancel();
        let task = self.inner.task.lock().await.take();
        if let Some(mut task) = task {
            if tokio::time::timeout(SHUTDOWN_WAIT, &mut task)
                .await
                .is_err()
            {
                tracing::warn!("fault proxy did not stop in time; aborting it");
                task.abort();
                // Resolves at once; after it the task's sockets are closed.
                let _ = task.await;
            }
        }
    }
}

/// Closes a socket so that the peer sees a reset rather than an orderly close.
fn reset(stream: TcpStream) {
    // SO_LINGER 0 makes close() send RST without blocking, which is exactly
    // what the deprecation warning is about not doing.
    #[allow(deprecated)]
    let _ = stream.set_linger(Some(Duration::ZERO));
    drop(stream);
}

async fn accept_loop(
    listener: TcpListener,
    target: SocketAddr,
    mode: watch::Receiver<ProxyMode>,
    accepted: Arc<AtomicU64>,
    stop: CancellationToken,
) {
    let serve_stop = stop.clone();
    accept_until(listener, stop, "fault proxy", |client, peer| {
        accepted.fetch_add(1, Ordering::Relaxed);
        if *mode.borrow() == ProxyMode::Reset {
            tracing::debug!(%peer, "fault proxy: reset new connection");
            reset(client);
            return None;
        }
        Some(connection(client, target, mode.clone(), serve_stop.clone()))
    })
    .await;
}

/// Why a connection's forwarding stopped abnormally.
enum Cut {
    /// Reset mode or proxy shutdown: reset both ends.
    Reset,
    /// An I/O error on one side: close both.
    Io,
}

/// Waits until the mode is `Pass`; `Err` when it is (or becomes) `Reset`.
async fn wait_pass(mode: &mut watch::Receiver<ProxyMode>) -> Result<(), Cut> {
    loop {
        match *mode.borrow_and_update() {
            ProxyMode::Pass => return Ok(()),
            ProxyMode::Reset => return Err(Cut::Reset),
            ProxyMode::Blackhole => {}
        }
        if mode.changed().await.is_err() {
            return Err(Cut::Reset);
        }
    }
}

/// Copies one direction, honouring the mode between every read and write.
async fn pump(
    mut from: ReadHalf<'_>,
    mut to: WriteHalf<'_>,
    mut mode: watch::Receiver<ProxyMode>,
) -> Result<(), Cut> {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        wait_pass(&mut mode).await?;
        let n = tokio::select! {
            r = from.read(&mut buf) => r.map_err(|_| Cut::Io)?,
            _ = mode.changed() => continue,
        };
        if n == 0 {
            // Orderly half-close: pass it on, keep the other direction going.
            let _ = to.shutdown().await;
            return Ok(());
        }
        let mut written = 0;
        while written < n {
            wait_pass(&mut mode).await?;
            tokio::select! {
                w = to.write(&buf[written..n]) => match w {
                    Ok(0) | Err(_) => return Err(Cut::Io),
                    Ok(k) => written += k,
                },
                _ = mode.changed() => {}
            }
        }
    }
}

async fn connection(
    mut client: TcpStream,
    target: SocketAddr,
    mut mode: watch::Receiver<ProxyMode>,
    stop: CancellationToken,
) {
    // A partitioned network does not reach the server: connect only in Pass.
    let ready = tokio::select! {
        r = wait_pass(&mut mode) => r.is_ok(),
        _ = stop.cancelled() => false,
    };
    if !ready {
        reset(client);
        return;
    }
    let mut server = match TcpStream::connect(target).await {
        Ok(server) => server,
        Err(err) => {
            tracing::debug!(%err, %target, "fault proxy: upstream connect failed");
            reset(client);
            return;
        }
    };
    let _ = server.set_nodelay(true);

    let outcome = {
        let (client_read, client_write) = client.split();
        let (server_read, server_write) = server.split();
        let up = pump(client_read, server_write, mode.clone());
        let down = pump(server_read, client_write, mode.clone());
        tokio::select! {
            r = async { tokio::try_join!(up, down) } => r.map(|_| ()),
            _ = stop.cancelled() => Err(Cut::Reset),
        }
    };
    if outcome.is_err() {
        // Reset mode, shutdown, or one side failed: make sure both ends
        // notice promptly.
        reset(client);
        reset(server);
    }
}
