//! [`FaultProxy`]: a TCP proxy that can partition or reset the network between
//! a client and a server, or hold the connections of the moment (and deliver
//! their bytes late) while new ones pass.

use std::collections::VecDeque;
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
use tokio::time::{sleep, sleep_until, Instant};
use tokio_util::sync::CancellationToken;

use super::accept::accept_until;
use super::background::Background;

/// How many bytes a held connection buffers from its client at most (beyond
/// this, the rest waits in the kernel's socket buffers).
const HOLD_LIMIT: usize = 4 * 1024 * 1024;

/// The longest pause kept between two chunks of held bytes on delivery.
const REPLAY_GAP_MAX: Duration = Duration::from_millis(100);

/// How long the upstream connection of a held connection whose client went
/// away is kept open after its held bytes were delivered, so that the server
/// reads and acts on them before it sees the close.
const HELD_LINGER: Duration = Duration::from_secs(3);

/// What a [`FaultProxy`] does with traffic.
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
    /// While holding: connections whose id is below this are held (see
    /// `hold_live`).
    hold: watch::Sender<Option<u64>>,
    accepted: Arc<AtomicU64>,
    background: Background,
}

/// A TCP proxy on `127.0.0.1` in front of a server, whose
/// [mode](ProxyMode) a test switches to simulate partitions and resets.
/// Mode switches apply to live connections at once.
///
/// Besides the mode, [`hold_live`](FaultProxy::hold_live) stalls only the
/// connections open at that moment, and
/// [`deliver_held`](FaultProxy::deliver_held) later delivers what their
/// clients sent, even if those clients have given up and closed meanwhile: a
/// request that reaches the server late, after the client moved on to a new
/// connection.
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
    pub async fn start(target: SocketAddr) -> io::Result<FaultProxy> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let (mode, _) = watch::channel(ProxyMode::Pass);
        let (hold, _) = watch::channel(None);
        let accepted = Arc::new(AtomicU64::new(0));
        let stop = CancellationToken::new();
        let task = tokio::spawn(accept_loop(
            listener,
            target,
            Gate {
                id: 0,
                mode: mode.subscribe(),
                hold: hold.subscribe(),
            },
            Arc::clone(&accepted),
            stop.clone(),
        ));
        tracing::info!(%addr, %target, "fault proxy listening");
        Ok(FaultProxy {
            inner: Arc::new(ProxyInner {
                addr,
                mode,
                hold,
                accepted,
                background: Background::new(stop, task),
            }),
        })
    }

    /// The address the proxy listens on.
    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// The address to give a client: `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.inner.addr)
    }

    /// Switches the mode; live connections follow at once.
    pub fn set_mode(&self, mode: ProxyMode) {
        let old = self.inner.mode.send_replace(mode);
        tracing::info!(addr = %self.inner.addr, ?old, new = ?mode, "fault proxy mode");
    }

    /// The current mode.
    pub fn mode(&self) -> ProxyMode {
        *self.inner.mode.borrow()
    }

    /// Holds every connection open at this moment: nothing flows either way
    /// on them (the proxy keeps reading what their clients send, into its own
    /// buffer, so no byte is lost even if a client resets its socket), while
    /// connections opened afterwards pass normally (subject to the
    /// [mode](ProxyMode)). Their calls hang, so a client times out and dials
    /// a new connection, which works. Calling it again adds the connections
    /// opened since. [`deliver_held`](Self::deliver_held) ends it.
    pub fn hold_live(&self) {
        let below = self.inner.accepted.load(Ordering::SeqCst);
        self.inner.hold.send_replace(Some(below));
        tracing::info!(addr = %self.inner.addr, connections = below, "fault proxy: holding live connections");
    }

    /// Ends a [`hold_live`](Self::hold_live): the held connections flow
    /// again, and every byte their clients sent is delivered to the server,
    /// in order, keeping (up to 100 ms) the spacing with which it was sent, so
    /// that a request and the cancellation its client sent when it gave up
    /// reach the server apart (as through a slow network: the server acts on
    /// the request first). If a client closed its side (or reset it) while held, its
    /// bytes are delivered all the same and the upstream connection is kept
    /// open for a few seconds more (what the server answers is discarded),
    /// so the server acts on them before it sees the close: the real-world
    /// "request delivered late, after the client gave up and cut the
    /// connection". A [`ProxyMode::Reset`] or a shutdown meanwhile cuts the
    /// held connections instead, losing their bytes.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use quorum_quest_client::proto::leader_election_service_client::LeaderElectionServiceClient;
    /// use quorum_quest_client::proto::ReleaseLockRequest;
    /// use quorum_quest_client::testing::{FaultProxy, TestServer};
    /// use quorum_quest_client::RpcKind;
    ///
    /// let server = TestServer::start().await?;
    /// let proxy = FaultProxy::start(server.addr()).await?;
    /// let mut client = LeaderElectionServiceClient::connect(proxy.url()).await?;
    /// proxy.hold_live();
    /// let mut held = client.clone();
    /// let call = tokio::spawn(async move { held.release_lock(ReleaseLockRequest::default()).await });
    /// tokio::task::yield_now().await;
    /// proxy.deliver_held();
    /// assert!(call.await?.is_ok());
    /// assert_eq!(server.calls(RpcKind::ReleaseLock), 1);
    /// # proxy.shutdown().await;
    /// # server.shutdown().await;
    /// # Ok(())
    /// # }
    /// ```
    pub fn deliver_held(&self) {
        self.inner.hold.send_replace(None);
        tracing::info!(addr = %self.inner.addr, "fault proxy: delivering held connections");
    }

    /// Whether a [`hold_live`](Self::hold_live) is in force.
    pub fn is_holding(&self) -> bool {
        self.inner.hold.borrow().is_some()
    }

    /// How many client connections the proxy has accepted (in any mode).
    pub fn connections_accepted(&self) -> u64 {
        self.inner.accepted.load(Ordering::Relaxed)
    }

    /// Stops the proxy: closes the listener and cuts every connection, then
    /// waits for its tasks to end. Idempotent.
    pub async fn shutdown(&self) {
        self.inner.background.shutdown("fault proxy").await;
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
    gate: Gate,
    accepted: Arc<AtomicU64>,
    stop: CancellationToken,
) {
    let serve_stop = stop.clone();
    accept_until(listener, stop, "fault proxy", |client, peer| {
        // Ids start at 0; `hold_live` holds ids below the count at its call.
        let id = accepted.fetch_add(1, Ordering::SeqCst);
        if *gate.mode.borrow() == ProxyMode::Reset {
            tracing::debug!(%peer, "fault proxy: reset new connection");
            reset(client);
            return None;
        }
        let gate = Gate {
            id,
            mode: gate.mode.clone(),
            hold: gate.hold.clone(),
        };
        Some(connection(client, target, gate, serve_stop.clone()))
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

/// What one connection may do now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flow {
    Pass,
    /// Black-holed: nothing moves.
    Stall,
    /// Held: nothing goes out, but the client's bytes are read into the
    /// proxy's buffer.
    Held,
}

/// One connection's view of the proxy's controls.
struct Gate {
    id: u64,
    mode: watch::Receiver<ProxyMode>,
    hold: watch::Receiver<Option<u64>>,
}

impl Gate {
    fn clone_for(&self) -> Gate {
        Gate {
            id: self.id,
            mode: self.mode.clone(),
            hold: self.hold.clone(),
        }
    }

    /// The current flow; `Err` in Reset mode.
    fn flow(&mut self) -> Result<Flow, Cut> {
        let mode = *self.mode.borrow_and_update();
        let held = self
            .hold
            .borrow_and_update()
            .is_some_and(|below| self.id < below);
        match mode {
            ProxyMode::Reset => Err(Cut::Reset),
            _ if held => Ok(Flow::Held),
            ProxyMode::Blackhole => Ok(Flow::Stall),
            ProxyMode::Pass => Ok(Flow::Pass),
        }
    }

    /// Waits for a change of mode or hold (`Err` if the proxy is gone).
    async fn changed(&mut self) -> Result<(), Cut> {
        let r = tokio::select! {
            r = self.mode.changed() => r,
            r = self.hold.changed() => r,
        };
        r.map_err(|_| Cut::Reset)
    }

    /// Waits until bytes may flow.
    async fn wait_pass(&mut self) -> Result<(), Cut> {
        while self.flow()? != Flow::Pass {
            self.changed().await?;
        }
        Ok(())
    }
}

/// How the client-to-server direction ended without a cut.
#[derive(Debug, PartialEq, Eq)]
enum UpEnd {
    /// The client closed; the close was passed on.
    Closed,
    /// The client went away while held; its bytes were delivered late and
    /// the upstream lingered, then was closed.
    Lingered,
}

/// Bytes read from the client and not yet written to the server.
struct Chunk {
    /// When the proxy read them.
    at: Instant,
    /// Read while the connection was held: replayed with their spacing.
    held: bool,
    data: Vec<u8>,
}

/// The client-to-server queue of one connection.
#[derive(Default)]
struct Pending {
    chunks: VecDeque<Chunk>,
    bytes: usize,
    /// The arrival instant of the last chunk delivered, and when it was
    /// delivered.
    last: Option<(Instant, Instant)>,
}

impl Pending {
    fn push(&mut self, data: &[u8], held: bool) {
        self.bytes += data.len();
        self.chunks.push_back(Chunk {
            at: Instant::now(),
            held,
            data: data.to_vec(),
        });
    }

    /// When the front chunk may go: a held chunk keeps (up to
    /// `REPLAY_GAP_MAX`) the spacing it arrived with after the previous one,
    /// so that a request and the cancellation its client sent later reach
    /// the server apart, as they would through a slow network.
    fn due(&self) -> Option<Instant> {
        let front = self.chunks.front()?;
        match self.last {
            Some((arrived, sent)) if front.held => {
                let gap = front
                    .at
                    .saturating_duration_since(arrived)
                    .min(REPLAY_GAP_MAX);
                Some(sent + gap)
            }
            _ => Some(Instant::now()),
        }
    }

    /// Marks `n` bytes of the front chunk as written.
    fn written(&mut self, n: usize) {
        self.bytes = self.bytes.saturating_sub(n);
        if let Some(front) = self.chunks.front_mut() {
            if n >= front.data.len() {
                let at = front.at;
                self.chunks.pop_front();
                self.last = Some((at, Instant::now()));
            } else {
                front.data.drain(..n);
            }
        }
    }
}

/// Copies client to server: stalls while black-holed, buffers while held,
/// and delivers late bytes even after the client went away. Sets `gone` as
/// soon as the client is seen gone while held.
async fn pump_up(
    mut from: ReadHalf<'_>,
    mut to: WriteHalf<'_>,
    mut gate: Gate,
    gone: CancellationToken,
) -> Result<UpEnd, Cut> {
    let mut buf = vec![0u8; 16 * 1024];
    let mut pending = Pending::default();
    // The client closed (EOF, or an error: then it was reset).
    let mut client_done: Option<bool> = None;
    loop {
        match gate.flow()? {
            Flow::Stall => gate.changed().await?,
            Flow::Held if client_done.is_some() || pending.bytes >= HOLD_LIMIT => {
                gate.changed().await?;
            }
            Flow::Held => {
                tokio::select! {
                    r = from.read(&mut buf) => match r {
                        Ok(0) => client_done = Some(false),
                        Ok(n) => pending.push(&buf[..n], true),
                        Err(_) => client_done = Some(true),
                    },
                    r = gate.changed() => r?,
                }
                if client_done.is_some() {
                    tracing::debug!(
                        id = gate.id,
                        held = pending.bytes,
                        "fault proxy: client went away while held"
                    );
                    gone.cancel();
                }
            }
            Flow::Pass => {
                if let Some(due) = pending.due() {
                    tokio::select! {
                        () = sleep_until(due) => {}
                        r = gate.changed() => { r?; continue }
                    }
                    let Some(front) = pending.chunks.front() else {
                        continue;
                    };
                    tokio::select! {
                        w = to.write(&front.data) => match w {
                            Ok(0) | Err(_) => return Err(Cut::Io),
                            Ok(k) => pending.written(k),
                        },
                        r = gate.changed() => r?,
                    }
                    continue;
                }
                match client_done {
                    Some(_) if gone.is_cancelled() => {
                        // Late delivery done: let the server act on it
                        // before it sees the close.
                        let _ = to.flush().await;
                        sleep(HELD_LINGER).await;
                        let _ = to.shutdown().await;
                        return Ok(UpEnd::Lingered);
                    }
                    Some(true) => return Err(Cut::Io),
                    Some(false) => {
                        // Orderly half-close: pass it on, keep the other
                        // direction going.
                        let _ = to.shutdown().await;
                        return Ok(UpEnd::Closed);
                    }
                    None => {
                        tokio::select! {
                            r = from.read(&mut buf) => match r {
                                Ok(0) => client_done = Some(false),
                                Ok(n) => pending.push(&buf[..n], false),
                                Err(_) => client_done = Some(true),
                            },
                            r = gate.changed() => r?,
                        }
                    }
                }
            }
        }
    }
}

/// Copies server to client, honouring the mode and the hold between every
/// read and write. Once the client is `gone` (it went away while held), what
/// the server sends is read and discarded until the server closes.
async fn pump_down(
    mut from: ReadHalf<'_>,
    mut to: WriteHalf<'_>,
    mut gate: Gate,
    gone: CancellationToken,
) -> Result<(), Cut> {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        gate.wait_pass().await?;
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(n) => n,
                Err(_) if gone.is_cancelled() => return Ok(()),
                Err(_) => return Err(Cut::Io),
            },
            r = gate.changed() => { r?; continue }
        };
        if n == 0 {
            let _ = to.shutdown().await;
            return Ok(());
        }
        if gone.is_cancelled() {
            continue;
        }
        let mut written = 0;
        while written < n {
            gate.wait_pass().await?;
            tokio::select! {
                w = to.write(&buf[written..n]) => match w {
                    Ok(0) | Err(_) if gone.is_cancelled() => break,
                    Ok(0) | Err(_) => return Err(Cut::Io),
                    Ok(k) => written += k,
                },
                r = gate.changed() => r?,
            }
        }
    }
}

async fn connection(
    mut client: TcpStream,
    target: SocketAddr,
    mut gate: Gate,
    stop: CancellationToken,
) {
    // A partitioned network does not reach the server: connect only in Pass.
    let ready = tokio::select! {
        r = gate.wait_pass() => r.is_ok(),
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
        let gone = CancellationToken::new();
        let up = pump_up(client_read, server_write, gate.clone_for(), gone.clone());
        let down = pump_down(server_read, client_write, gate.clone_for(), gone);
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
