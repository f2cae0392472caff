//! [`CutIo`]: a connection that fails every operation once it must be cut,
//! shared by the [`TestServer`](super::TestServer) and the chaos relay.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

/// A server-side connection that works like `inner` until `cut` completes,
/// then fails every read, write and flush with
/// [`ConnectionAborted`](io::ErrorKind::ConnectionAborted) (and treats a
/// shutdown as done), so the peer sees the connection die at once.
pub(crate) struct CutIo<T> {
    inner: T,
    /// Completes when the connection must be cut; never polled after that.
    cut: Pin<Box<dyn Future<Output = ()> + Send>>,
    /// The message of the error a cut connection answers.
    reason: &'static str,
    dead: bool,
}

impl<T> CutIo<T> {
    /// Wraps `inner`, to be cut when `cut` completes; `reason` is the message
    /// of the errors the cut connection answers.
    pub(crate) fn new(
        inner: T,
        cut: impl Future<Output = ()> + Send + 'static,
        reason: &'static str,
    ) -> Self {
        CutIo {
            inner,
            cut: Box::pin(cut),
            reason,
            dead: false,
        }
    }

    /// True once the connection must be cut; registers for the wake-up
    /// otherwise.
    fn is_dead(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.dead && self.cut.as_mut().poll(cx).is_ready() {
            self.dead = true;
        }
        self.dead
    }

    fn cut_error(&self) -> io::Error {
        io::Error::new(io::ErrorKind::ConnectionAborted, self.reason)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for CutIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.is_dead(cx) {
            return Poll::Ready(Err(this.cut_error()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for CutIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.is_dead(cx) {
            return Poll::Ready(Err(this.cut_error()));
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.is_dead(cx) {
            return Poll::Ready(Err(this.cut_error()));
        }
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.is_dead(cx) {
            return Poll::Ready(Err(this.cut_error()));
        }
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.dead {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

impl<T: Connected> Connected for CutIo<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}
