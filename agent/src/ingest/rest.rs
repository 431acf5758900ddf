//! Resting sockets: how a connection that streams readings steadily is read
//! many messages per wake-up instead of one.
//!
//! A device (or the external broker) publishing at a steady rate sends a few
//! messages per TCP segment. Read as it arrives, every segment costs a
//! wake-up, a hand-over to the pipeline and a journal marker. So after a
//! read smaller than [`COALESCE_BELOW`] the connection *rests* for
//! [`COALESCE`] and reads what arrived meanwhile in one go; a burst fills
//! its reads and never rests. Acknowledgements and keep-alives are not held
//! by a rest (only reading is), and a message waits at most [`COALESCE`]
//! more — its acknowledgement waits for the journal's group commit anyway.
//!
//! Not reading is not enough on its own: the kernel still signals the
//! socket's epoll entry for every segment that arrives while it rests, and
//! each of those wakes the runtime's worker for nothing (a context switch,
//! ~9 µs on a small VM: at 20 000 readings/s from one device it was a
//! quarter of the agent's CPU). So a resting socket raises its receive low
//! water mark (`SO_RCVLOWAT`) to [`COALESCE_BELOW`]: Linux (≥ 4.20) then
//! does not signal readability until that much is queued. Lowering it back
//! to 1 when the rest ends makes the kernel signal at once if anything is
//! queued (`tcp_set_rcvlowat` → `tcp_data_ready`), which wakes the read.

use std::time::Duration;

/// A read smaller than this is followed by a rest.
pub(crate) const COALESCE_BELOW: usize = 16 * 1024;
/// How long a connection rests after a small read. 10 ms rather than 2 ms:
/// QoS 1 at 20 000 readings/s from one connection 3.5 → 2.6 CPU-s per 1M
/// readings (`benches` `ingest_load`).
pub(crate) const COALESCE: Duration = Duration::from_millis(10);

/// The low-water-mark handle of one connection's TCP socket (also under
/// TLS: the mark counts ciphertext bytes, which is as good a measure).
#[derive(Debug, Clone, Copy)]
pub(crate) struct LowWater {
    #[cfg(target_os = "linux")]
    fd: Option<std::os::fd::RawFd>,
}

impl LowWater {
    /// For the socket of `tcp`, which must outlive every use of the handle
    /// (the connection owns both).
    #[cfg(target_os = "linux")]
    pub fn of(tcp: &tokio::net::TcpStream) -> Self {
        use std::os::fd::AsRawFd;
        Self {
            fd: Some(tcp.as_raw_fd()),
        }
    }

    #[cfg(not(target_os = "linux"))]
    pub fn of(_tcp: &tokio::net::TcpStream) -> Self {
        Self {}
    }

    /// The connection starts resting: no readability signal below
    /// [`COALESCE_BELOW`] bytes.
    pub fn rest(&mut self) {
        self.set(COALESCE_BELOW);
    }

    /// The rest is over: signal readability for any byte again (at once if
    /// some are queued).
    pub fn wake(&mut self) {
        self.set(1);
    }

    #[cfg(target_os = "linux")]
    fn set(&mut self, bytes: usize) {
        let Some(fd) = self.fd else { return };
        if let Err(error) = set_rcvlowat(fd, bytes) {
            // Never stranded below the mark: a failed `wake` would leave
            // queued bytes unsignalled, so try it once more, and stop using
            // the mark for this connection either way (it then only costs
            // the wake-ups it was there to save).
            tracing::warn!(%error, bytes, "SO_RCVLOWAT could not be set; this connection reads without it");
            if bytes != 1 {
                let _ = set_rcvlowat(fd, 1);
            }
            self.fd = None;
        }
    }

    #[cfg(not(target_os = "linux"))]
    fn set(&mut self, _bytes: usize) {}
}

#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn set_rcvlowat(fd: std::os::fd::RawFd, bytes: usize) -> std::io::Result<()> {
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: `setsockopt` reads `size_of::<c_int>()` bytes from a pointer
    // to a live local `c_int`; it does not retain the pointer. A stale or
    // wrong `fd` can only make the call fail (EBADF/ENOTSOCK), never touch
    // memory of ours.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            std::ptr::from_ref(&value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A resting socket is not readable below the mark; waking it makes
    /// the queued bytes readable at once.
    #[tokio::test]
    async fn a_rest_holds_readability_until_the_wake() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        let mut mark = LowWater::of(&server);
        // A connection rests after a read: its readiness is spent.
        let mut buf = [0u8; 16];
        client.write_all(b"connect").await.unwrap();
        assert_eq!(server.read(&mut buf).await.unwrap(), 7);
        assert_eq!(
            server.try_read(&mut buf).map_err(|e| e.kind()),
            Err(std::io::ErrorKind::WouldBlock)
        );
        mark.rest();
        client.write_all(b"hello").await.unwrap();
        let early = tokio::time::timeout(
            Duration::from_millis(200),
            server.ready(tokio::io::Interest::READABLE),
        )
        .await;
        assert!(early.is_err(), "readable below the low water mark");
        mark.wake();
        let n = tokio::time::timeout(Duration::from_secs(5), server.read(&mut buf))
            .await
            .expect("the wake signals the queued bytes")
            .unwrap();
        assert_eq!(&buf[..n], b"hello");
        assert!(mark.fd.is_some());
    }
}
