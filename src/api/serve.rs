//! The HTTP server loop: hyper under the router, with what `axum::serve` does not bound.
//!
//! - **Headers have a deadline.** A request's headers must arrive within
//!   `MODELPRESS_HEADER_READ_TIMEOUT_SECS` (hyper's `header_read_timeout`, which also closes
//!   an idle keep-alive connection after that long); a client that sends them a byte at a
//!   time is dropped instead of holding its connection for ever.
//! - **Connections are counted.** At most [`Limits::connections`] at once, below the
//!   open-files limit (raised to its hard limit at start-up where allowed), so a flood of
//!   connections cannot take the file descriptors the database, the blobs and the workers
//!   need. Past that, a small reserve takes new connections with a one-second header
//!   deadline: a health probe (or any client that sends its request at once) is still
//!   answered, a slow one is soon dropped. With the reserve full too, a new connection is
//!   closed at once.
//! - **Shutdown is graceful:** on `stop`, no new connection is accepted, and each open one
//!   finishes its request in flight and closes.

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// Connections in the reserve past [`Limits::connections`].
pub const RESERVE: usize = 64;
/// The header deadline of a connection in the reserve.
pub const RESERVE_HEADER_TIMEOUT: Duration = Duration::from_secs(1);
/// File descriptors kept for everything but connections (database, blobs, jobs' files).
const FDS_KEPT: u64 = 256;

/// What the server loop bounds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    pub connections: usize,
    pub reserve: usize,
    pub header_timeout: Duration,
}

impl Limits {
    /// `max_connections` (0: from the open-files limit, after raising it) and the header
    /// deadline in seconds.
    pub fn new(max_connections: usize, header_timeout_secs: u64) -> Limits {
        let connections = if max_connections > 0 {
            max_connections.min(1 << 20)
        } else {
            let files = raise_open_files_limit();
            files
                .saturating_sub(FDS_KEPT + RESERVE as u64)
                .clamp(64, 1 << 16) as usize
        };
        Limits {
            connections,
            reserve: RESERVE,
            header_timeout: Duration::from_secs(header_timeout_secs.max(1)),
        }
    }
}

/// Raises the soft open-files limit to the hard one; returns the soft limit in force.
fn raise_open_files_limit() -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        let raised = rustix::process::Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => limit = getrlimit(Resource::Nofile),
            Err(e) => tracing::warn!(error = %e, "could not raise the open-files limit"),
        }
    }
    limit.current.unwrap_or(1 << 20)
}

/// Serves `app` on `listener` until `stop` is cancelled, then waits for the open
/// connections to finish their requests.
pub async fn serve(listener: TcpListener, app: Router, limits: Limits, stop: CancellationToken) {
    tracing::info!(
        connections = limits.connections,
        reserve = limits.reserve,
        header_timeout_secs = limits.header_timeout.as_secs(),
        "serving HTTP"
    );
    let main = Arc::new(Semaphore::new(limits.connections));
    let reserve = Arc::new(Semaphore::new(limits.reserve));
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors (or another transient error): wait a moment
                    // rather than spin on a listener that stays readable.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                        _ = stop.cancelled() => break,
                    }
                }
            },
            _ = stop.cancelled() => break,
        };
        let (permit, header_timeout) = match main.clone().try_acquire_owned() {
            Ok(p) => (p, limits.header_timeout),
            Err(_) => match reserve.clone().try_acquire_owned() {
                Ok(p) => (p, RESERVE_HEADER_TIMEOUT.min(limits.header_timeout)),
                Err(_) => {
                    metrics::counter!("modelpress_connections_refused_total").increment(1);
                    continue;
                }
            },
        };
        let service = TowerToHyperService::new(app.clone());
        let stop = stop.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut builder = Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout);
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                done = conn.as_mut() => {
                    if let Err(e) = done {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                }
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
    drop(listener);
    // Every permit back: every connection has closed.
    let _ = main.acquire_many(limits.connections as u32).await;
    let _ = reserve.acquire_many(limits.reserve as u32).await;
}
