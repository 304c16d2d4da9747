//! [`NatsProxy`]: a loopback TCP proxy in front of a [`crate::NatsServer`]
//! that reads the NATS client protocol and can swallow a client's
//! publishes to some subjects. The client sees its publish written and
//! never acknowledged, as when a connection breaks after the write or the
//! stream leader dies before storing it: nothing was stored, and only the
//! missing acknowledgement says so. A service that records an effect as
//! done before its acknowledgement came loses that effect across a crash;
//! a test puts the proxy between the service and the server to show it
//! does not.
//!
//! The server's side is passed through untouched; of the client's side,
//! only `PUB`/`HPUB` frames are looked at (subject, size), the rest is
//! passed through as it comes.

use std::sync::{Arc, Mutex};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// Most bytes of one client frame the proxy holds (a publish of the
/// server's largest `max_payload` with its headers fits).
const MAX_FRAME: usize = 16 * 1024 * 1024;

#[derive(Default)]
struct Rules {
    /// Publishes to subjects starting with one of these are swallowed.
    prefixes: Mutex<Vec<String>>,
    /// The subjects of the publishes swallowed, in order.
    subjects: Mutex<Vec<String>>,
}

impl Rules {
    fn drops(&self, subject: &[u8]) -> bool {
        self.prefixes
            .lock()
            .unwrap()
            .iter()
            .any(|p| subject.starts_with(p.as_bytes()))
    }
}

/// See the module docs. Stops accepting and closes its connections when
/// dropped.
pub struct NatsProxy {
    port: u16,
    rules: Arc<Rules>,
    task: tokio::task::JoinHandle<()>,
}

impl NatsProxy {
    /// A proxy to the server on loopback port `server_port`.
    pub async fn start(server_port: u16) -> NatsProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().unwrap().port();
        let rules = Arc::new(Rules::default());
        let task = tokio::spawn({
            let rules = rules.clone();
            async move {
                let mut conns = tokio::task::JoinSet::new();
                while let Ok((client, _)) = listener.accept().await {
                    let rules = rules.clone();
                    conns.spawn(async move {
                        if let Ok(server) = TcpStream::connect(("127.0.0.1", server_port)).await {
                            pump(client, server, rules).await;
                        }
                    });
                }
            }
        });
        NatsProxy { port, rules, task }
    }

    /// `url` (a `nats://user:password@127.0.0.1:<port>` address) with the
    /// port changed to the proxy's.
    pub fn url_for(&self, url: &str) -> String {
        let (head, _) = url.rsplit_once(':').expect("url with a port");
        format!("{head}:{}", self.port)
    }

    /// From now on, publishes to subjects starting with any of `prefixes`
    /// are swallowed (on every connection through the proxy).
    pub fn swallow(&self, prefixes: &[&str]) {
        *self.rules.prefixes.lock().unwrap() = prefixes.iter().map(|p| p.to_string()).collect();
    }

    /// How many publishes were swallowed so far.
    pub fn swallowed(&self) -> u64 {
        self.rules.subjects.lock().unwrap().len() as u64
    }

    /// The subjects of the publishes swallowed so far, in order.
    pub fn swallowed_subjects(&self) -> Vec<String> {
        self.rules.subjects.lock().unwrap().clone()
    }
}

impl Drop for NatsProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pump(client: TcpStream, server: TcpStream, rules: Arc<Rules>) {
    let (mut client_rx, mut client_tx) = client.into_split();
    let (mut server_rx, mut server_tx) = server.into_split();
    let down = async move {
        let _ = tokio::io::copy(&mut server_rx, &mut client_tx).await;
        let _ = client_tx.shutdown().await;
    };
    let up = async move {
        let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            let n = match client_rx.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            buf.extend_from_slice(&chunk[..n]);
            let mut out = Vec::with_capacity(buf.len());
            let mut at = 0;
            while let Some(len) = frame_len(&buf[at..]) {
                let frame = &buf[at..at + len];
                match publish_subject(frame) {
                    Some(subject) if rules.drops(subject) => {
                        let subject = String::from_utf8_lossy(subject).into_owned();
                        rules.subjects.lock().unwrap().push(subject);
                    }
                    _ => out.extend_from_slice(frame),
                }
                at += len;
            }
            buf.drain(..at);
            if buf.len() > MAX_FRAME || server_tx.write_all(&out).await.is_err() {
                break;
            }
        }
        let _ = server_tx.shutdown().await;
    };
    tokio::join!(down, up);
}

/// The length of the whole client frame at the start of `buf` (its line,
/// and for a publish its payload and the line end after it), if all of it
/// is there.
fn frame_len(buf: &[u8]) -> Option<usize> {
    let eol = buf.windows(2).position(|w| w == b"\r\n")?;
    let line = &buf[..eol];
    let op = line.split(|b| *b == b' ').next().unwrap_or_default();
    let payload = if op.eq_ignore_ascii_case(b"PUB") || op.eq_ignore_ascii_case(b"HPUB") {
        // The last field is the total size (headers included for HPUB).
        let last = line.rsplit(|b| *b == b' ').next()?;
        let n: usize = std::str::from_utf8(last).ok()?.trim().parse().ok()?;
        n + 2
    } else {
        0
    };
    let len = eol + 2 + payload;
    (buf.len() >= len).then_some(len)
}

/// The subject of a `PUB`/`HPUB` frame; None for any other frame.
fn publish_subject(frame: &[u8]) -> Option<&[u8]> {
    let mut fields = frame.split(|b| *b == b' ' || *b == b'\r');
    let op = fields.next()?;
    (op.eq_ignore_ascii_case(b"PUB") || op.eq_ignore_ascii_case(b"HPUB"))
        .then(|| fields.next())
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_cut_at_their_whole_length() {
        let pub_frame = b"PUB a.b _INBOX.x 5\r\nhello\r\n";
        let hpub = b"HPUB tocsin.notify.email 12 17\r\nNATS/1.0\r\n\r\nhello\r\n";
        let mut buf = Vec::new();
        buf.extend_from_slice(b"PING\r\n");
        buf.extend_from_slice(pub_frame);
        buf.extend_from_slice(hpub);
        assert_eq!(frame_len(&buf), Some(6));
        assert_eq!(frame_len(&buf[6..]), Some(pub_frame.len()));
        assert_eq!(frame_len(&buf[6 + pub_frame.len()..]), Some(hpub.len()));
        // A frame not all there yet is not cut.
        assert_eq!(frame_len(&hpub[..hpub.len() - 1]), None);
        assert_eq!(frame_len(b"PIN"), None);
        assert_eq!(publish_subject(pub_frame), Some(&b"a.b"[..]));
        assert_eq!(publish_subject(hpub), Some(&b"tocsin.notify.email"[..]));
        assert_eq!(publish_subject(b"SUB a.b 1\r\n"), None);
    }
}
