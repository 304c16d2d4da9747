//! The connection layer under every HTTP server of Tocsin's (ingest,
//! chat-ops, the admin server, escalation's calendars):
//! hyper's HTTP/1 server with a header read timeout and a bounded header
//! buffer, an idle timeout, and a cap on open connections. What happens to
//! connections is reported to the service through [`ConnectionEvents`], so
//! each service logs and counts under its own names.
//!
//! Why not `axum::serve`: it has no header timeout, no connection cap and
//! no way to close one connection, so a few thousand idle or slowloris
//! connections held file descriptors until the process (and with it the
//! admin server's `/readyz`) could accept nothing, without a word logged.
//!
//! At the cap a new connection closes the oldest one that has no request in
//! progress (idle, or still sending its headers) instead of being refused:
//! an attacker's held-open connections then make room for real senders
//! rather than lock them out. Only when every open connection is in a
//! request is the new one refused (with a 503 written straight to it).

use std::{
    collections::BTreeMap,
    future::Future,
    io,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll},
    time::Duration,
};

use axum::{body::Body, Router};
use hyper::{body::Incoming, server::conn::http1, Request};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    time::{Instant, Sleep},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::telemetry::RateLimitedWarn;

/// Largest request head (request line plus headers) buffered; a larger one
/// gets 431. Alertmanager's and PagerDuty senders' heads are well under
/// 1 KiB. hyper's own default (about 400 KiB) would let each slowloris
/// connection hold that much.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;

/// File descriptors kept for everything but a server's connections: NATS,
/// the admin and calendar servers, sled's files, outbound HTTP of the notifier.
const FD_RESERVE: u64 = 1024;

/// Connection settings, from the service's section.
#[derive(Debug, Clone)]
pub struct Settings {
    pub max_connections: usize,
    pub idle_timeout: Duration,
    pub header_read_timeout: Duration,
    /// The JSON body of the 503 written to a connection refused at the cap
    /// (names the service and its `max_connections` key).
    pub refusal: &'static str,
}

/// What a server reports about its connections; each service logs and
/// counts these under its own metric names.
pub trait ConnectionEvents: Clone + Send + Sync + 'static {
    /// `accept` failed (EMFILE and the like).
    fn accept_failed(&self, error: &io::Error);
    /// A new connection arrived at `max`: the oldest idle one was closed
    /// for it (`evicted`), or it was refused.
    fn limit_reached(&self, max: usize, evicted: bool);
    /// A connection was accepted.
    fn opened(&self);
    /// A connection ended.
    fn closed(&self, reason: Closed);
}

/// Settings for a small server that is scraped, probed or fetched now and
/// then (the admin server, escalation's calendars) rather than posted to:
/// at most `max_connections` open, a request head due within 10 s of
/// waiting for it, so a connection idle for 10 s is closed (hyper's head
/// timeout runs between a connection's requests too). `refusal` is the
/// 503's JSON body.
pub fn small_server(max_connections: usize, refusal: &'static str) -> Settings {
    Settings {
        max_connections,
        idle_timeout: Duration::from_secs(10),
        header_read_timeout: Duration::from_secs(10),
        refusal,
    }
}

/// [`ConnectionEvents`] for a server without metrics of its own: failures
/// to accept and a full table are logged (at most once a minute each),
/// naming `server`.
#[derive(Clone)]
pub struct Logged {
    server: &'static str,
    accept_warn: Arc<RateLimitedWarn>,
    limit_warn: Arc<RateLimitedWarn>,
}

impl Logged {
    pub fn new(server: &'static str) -> Self {
        let minute = || Arc::new(RateLimitedWarn::every(Duration::from_secs(60)));
        Logged {
            server,
            accept_warn: minute(),
            limit_warn: minute(),
        }
    }
}

impl ConnectionEvents for Logged {
    fn accept_failed(&self, error: &io::Error) {
        if let Some(suppressed) = self.accept_warn.admit() {
            tracing::warn!(%error, server = self.server, similar_since_last_warning = suppressed, "cannot accept a connection; if out of file descriptors, raise the open-file limit");
        }
    }
    fn limit_reached(&self, max: usize, evicted: bool) {
        if let Some(suppressed) = self.limit_warn.admit() {
            tracing::warn!(
                server = self.server,
                max_connections = max,
                similar_since_last_warning = suppressed,
                "{max} connections open at once; {} (more than its clients need: look for who holds them)",
                if evicted { "closing the oldest idle one for each new one" } else { "refusing new ones" }
            );
        }
    }
    fn opened(&self) {}
    fn closed(&self, _: Closed) {}
}

/// One open connection as the accept loop sees it.
struct Entry {
    /// A request is being handled on it (headers read, answer not yet given).
    busy: Arc<AtomicBool>,
    /// Asks the connection's task to close it.
    close: CancellationToken,
}

#[derive(Default)]
struct Table {
    next_id: u64,
    /// By id, so the first entry is the oldest connection.
    entries: BTreeMap<u64, Entry>,
}

impl Table {
    /// Removes the oldest connection with no request in progress and asks
    /// it to close; false when every connection is in a request.
    fn evict_oldest_idle(&mut self) -> bool {
        let victim = self
            .entries
            .iter()
            .find(|(_, e)| !e.busy.load(Ordering::Acquire))
            .map(|(id, _)| *id);
        match victim.and_then(|id| self.entries.remove(&id)) {
            Some(e) => {
                e.close.cancel();
                true
            }
            None => false,
        }
    }
}

/// Raises the soft open-file limit so `wanted` connections fit next to
/// the rest of the process, or lowers the connection cap to what fits.
/// `key` names the setting in warnings (`ingest.max_connections`).
pub fn fit_open_files(wanted: usize, key: &str) -> usize {
    let need = wanted as u64 + FD_RESERVE;
    match rlimit::increase_nofile_limit(need) {
        Ok(limit) if limit >= need => wanted,
        Ok(limit) => {
            let fits = (limit.saturating_sub(FD_RESERVE).max(limit / 2) as usize).max(16);
            tracing::warn!(
                max_connections = wanted,
                open_file_limit = limit,
                using = fits,
                "the open-file limit (RLIMIT_NOFILE) is too low for {key}; \
                 capping connections lower. Raise LimitNOFILE (systemd) or ulimit -n to at least {need}"
            );
            fits
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot read or raise the open-file limit (RLIMIT_NOFILE)");
            wanted
        }
    }
}

/// Serves `router` on `listener` until `shutdown`, then lets requests in
/// progress finish, closes idle connections and returns.
pub async fn serve<E: ConnectionEvents>(
    listener: TcpListener,
    router: Router,
    settings: Settings,
    metrics: E,
    shutdown: CancellationToken,
) {
    let table = Arc::new(Mutex::new(Table::default()));
    let open = Arc::new(AtomicUsize::new(0));
    let stopping = Arc::new(AtomicBool::new(false));
    let tasks = TaskTracker::new();
    let service = TowerToHyperService::new(router);
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout)
        .max_buf_size(MAX_HEAD_BYTES)
        .keep_alive(true);
    let builder = Arc::new(builder);

    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // EMFILE and the like: logged (rate-limited), and a short
                    // pause so a persistent error does not spin the loop.
                    metrics.accept_failed(&e);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let now_open = open.load(Ordering::Acquire);
        if now_open >= settings.max_connections {
            // An evicted connection counts as open until its task has run;
            // should those pile up (a flood faster than they are dropped),
            // refuse rather than evict more.
            let evicted = now_open < 2 * settings.max_connections
                && table
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .evict_oldest_idle();
            metrics.limit_reached(settings.max_connections, evicted);
            if !evicted {
                refuse(stream, settings.refusal);
                continue;
            }
        }
        let _ = stream.set_nodelay(true);
        let busy = Arc::new(AtomicBool::new(false));
        let close = CancellationToken::new();
        let id = {
            let mut t = table.lock().unwrap_or_else(|e| e.into_inner());
            t.next_id += 1;
            let id = t.next_id;
            t.entries.insert(
                id,
                Entry {
                    busy: busy.clone(),
                    close: close.clone(),
                },
            );
            id
        };
        open.fetch_add(1, Ordering::AcqRel);
        metrics.opened();
        let (table, open, stopping, metrics, builder, service) = (
            table.clone(),
            open.clone(),
            stopping.clone(),
            metrics.clone(),
            builder.clone(),
            service.clone(),
        );
        let idle_timeout = settings.idle_timeout;
        tasks.spawn(async move {
            let busy_now = busy.clone();
            let io = IdleIo::new(stream, idle_timeout, busy.clone());
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let guard = Busy::enter(busy.clone());
                let fut = hyper::service::Service::call(&service, req.map(Body::new));
                async move {
                    let response = fut.await;
                    drop(guard);
                    response
                }
            });
            let conn = builder.serve_connection(TokioIo::new(io), svc);
            tokio::pin!(conn);
            let outcome = tokio::select! {
                r = conn.as_mut() => Closed::from(r),
                _ = close.cancelled() => {
                    let stop = stopping.load(Ordering::Acquire);
                    if !stop && !busy_now.load(Ordering::Acquire) {
                        // Evicted with no request in progress: drop it now.
                        Closed::Evicted
                    } else {
                        // Shutting down, or a request started meanwhile:
                        // answer what is in progress, then close.
                        conn.as_mut().graceful_shutdown();
                        let _ = conn.as_mut().await;
                        if stop { Closed::Shutdown } else { Closed::Evicted }
                    }
                }
            };
            table
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entries
                .remove(&id);
            open.fetch_sub(1, Ordering::AcqRel);
            metrics.closed(outcome);
        });
    }

    // Stop: no new connections; requests in progress finish, idle
    // connections close at once.
    stopping.store(true, Ordering::Release);
    drop(listener);
    for e in table
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entries
        .values()
    {
        e.close.cancel();
    }
    tasks.close();
    tasks.wait().await;
}

/// A new connection over the cap with every open one in a request: told so
/// in one write (no waiting on a client that does not read), then closed.
fn refuse(stream: TcpStream, body: &str) {
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n\
         connection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.try_write(answer.as_bytes());
}

/// Why a connection ended (the label of `tocsin_<service>_connections_closed_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// The client closed it, or it ended normally.
    Normal,
    /// Nothing received for `idle_timeout` with no request in progress.
    IdleTimeout,
    /// The request head did not arrive within `header_read_timeout`.
    HeaderTimeout,
    /// Closed to make room under `max_connections`.
    Evicted,
    /// Closed by the shutdown.
    Shutdown,
    /// A protocol or transport error (malformed request, reset).
    Error,
}

impl Closed {
    pub fn as_str(self) -> &'static str {
        match self {
            Closed::Normal => "normal",
            Closed::IdleTimeout => "idle_timeout",
            Closed::HeaderTimeout => "header_timeout",
            Closed::Evicted => "evicted",
            Closed::Shutdown => "shutdown",
            Closed::Error => "error",
        }
    }
}

impl From<Result<(), hyper::Error>> for Closed {
    fn from(r: Result<(), hyper::Error>) -> Self {
        let Err(e) = r else {
            return Closed::Normal;
        };
        if e.is_timeout() {
            return Closed::HeaderTimeout;
        }
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            if let Some(io) = s.downcast_ref::<io::Error>() {
                if io.kind() == io::ErrorKind::TimedOut {
                    return Closed::IdleTimeout;
                }
            }
            source = s.source();
        }
        Closed::Error
    }
}

/// Marks a connection busy while a request is in the router.
struct Busy(Arc<AtomicBool>);

impl Busy {
    fn enter(flag: Arc<AtomicBool>) -> Self {
        flag.store(true, Ordering::Release);
        Busy(flag)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// A TCP stream whose reads fail with `TimedOut` once nothing has arrived
/// for `idle` while no request is in progress. hyper's own header timeout
/// bounds the whole request head; this one closes silent connections
/// sooner, and never cuts a request whose handler is still working.
struct IdleIo {
    inner: TcpStream,
    idle: Duration,
    busy: Arc<AtomicBool>,
    sleep: Pin<Box<Sleep>>,
    armed: bool,
}

impl IdleIo {
    fn new(inner: TcpStream, idle: Duration, busy: Arc<AtomicBool>) -> Self {
        IdleIo {
            inner,
            idle,
            busy,
            sleep: Box::pin(tokio::time::sleep(idle)),
            armed: false,
        }
    }
}

impl AsyncRead for IdleIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                this.armed = false;
                Poll::Ready(r)
            }
            Poll::Pending => {
                if this.busy.load(Ordering::Acquire) {
                    this.armed = false;
                    return Poll::Pending;
                }
                if !this.armed {
                    let deadline = Instant::now() + this.idle;
                    this.sleep.as_mut().reset(deadline);
                    this.armed = true;
                }
                match this.sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "nothing received within the idle timeout",
                    ))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

impl AsyncWrite for IdleIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(busy: bool) -> (Entry, CancellationToken) {
        let close = CancellationToken::new();
        (
            Entry {
                busy: Arc::new(AtomicBool::new(busy)),
                close: close.clone(),
            },
            close,
        )
    }

    #[test]
    fn the_oldest_connection_without_a_request_is_evicted() {
        let mut t = Table::default();
        let mut tokens = Vec::new();
        for (id, busy) in [(1, true), (2, false), (3, false)] {
            let (e, c) = entry(busy);
            t.entries.insert(id, e);
            tokens.push(c);
        }
        assert!(t.evict_oldest_idle());
        assert!(!tokens[0].is_cancelled(), "busy: kept");
        assert!(tokens[1].is_cancelled(), "oldest idle: closed");
        assert!(!tokens[2].is_cancelled());
        assert_eq!(t.entries.keys().copied().collect::<Vec<_>>(), [1, 3]);
        t.entries[&3].busy.store(true, Ordering::Release);
        assert!(!t.evict_oldest_idle(), "every connection is in a request");
        assert_eq!(t.entries.len(), 2);
    }

    #[tokio::test]
    async fn a_refused_connection_is_told_why() {
        use tokio::io::AsyncReadExt;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server_side, _) = listener.accept().await.unwrap();
        refuse(
            server_side,
            r#"{"status":"error","error":"too_many_connections","reason":"x"}"#,
        );
        let mut answer = String::new();
        client.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        assert!(answer.contains("retry-after: 1"), "{answer}");
        let body = answer.split_once("\r\n\r\n").unwrap().1;
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["error"], "too_many_connections");
    }

    // The clock is paused: time moves only when every task waits, so the
    // request's silence below lasts 4 idle timeouts without wall-clock waits.
    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_times_out_but_not_during_a_request() {
        use tokio::io::AsyncReadExt;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server_side, _) = listener.accept().await.unwrap();
        let busy = Arc::new(AtomicBool::new(true));
        let mut io = IdleIo::new(server_side, Duration::from_millis(50), busy.clone());
        let mut buf = [0u8; 8];
        // In a request: no timeout, however long it is silent.
        let read = tokio::time::timeout(Duration::from_millis(200), io.read(&mut buf)).await;
        assert!(read.is_err(), "still waiting: {read:?}");
        busy.store(false, Ordering::Release);
        let err = io.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }
}
