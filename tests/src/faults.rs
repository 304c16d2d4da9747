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
//! It can also hold a client's publishes back ([`NatsProxy::hold`]) and
//! let them go later, in order ([`NatsProxy::release`]): what a client
//! does with publishes made while its connection was away, sending them
//! when it is back, long after they were made.
//!
//! And it can delay some of a client's publishes to some subjects
//! ([`NatsProxy::delay`]): a bus that stalls now and then (a loaded disk,
//! a busy server) and answers them late. The connection waits, as a
//! client's would behind them.
//!
//! Of the client's side only `PUB`/`HPUB` frames are looked at (subject,
//! reply subject, size), the rest is passed through as it comes; of the
//! server's side, only the answers to publishes let go are noted.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
};

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
    /// Publishes to subjects starting with one of these are held back,
    /// after the first `pass` of them.
    hold: Mutex<Hold>,
    /// Bumped by each release: every connection sends what it held.
    release: tokio::sync::watch::Sender<u64>,
    /// The reply subjects of the publishes let go whose answer has not
    /// come back from the server yet.
    awaiting: Mutex<HashSet<Vec<u8>>>,
    /// Every so many publishes to subjects starting with one of these,
    /// one reaches the server later (and what follows it on its
    /// connection too).
    delay: Mutex<Delay>,
}

#[derive(Default)]
struct Delay {
    prefixes: Vec<String>,
    by: std::time::Duration,
    every: usize,
    seen: usize,
}

#[derive(Default)]
struct Hold {
    prefixes: Vec<String>,
    pass: usize,
    subjects: Vec<String>,
}

impl Hold {
    /// Whether a publish to `subject` is to be held (counting it).
    fn takes(&mut self, subject: &[u8]) -> bool {
        if !self
            .prefixes
            .iter()
            .any(|p| subject.starts_with(p.as_bytes()))
        {
            return false;
        }
        if self.pass > 0 {
            self.pass -= 1;
            return false;
        }
        self.subjects
            .push(String::from_utf8_lossy(subject).into_owned());
        true
    }
}

impl Rules {
    /// How long a publish to `subject` is delayed, if it is (counting it).
    fn delays(&self, subject: &[u8]) -> Option<std::time::Duration> {
        let mut d = self.delay.lock().unwrap();
        if !d.prefixes.iter().any(|p| subject.starts_with(p.as_bytes())) {
            return None;
        }
        d.seen += 1;
        d.seen.is_multiple_of(d.every.max(1)).then_some(d.by)
    }

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

    /// From now on, publishes to subjects starting with any of `prefixes`
    /// are held back (on every connection through the proxy), once `pass`
    /// of them went through: the server sees none of them until
    /// [`NatsProxy::release`].
    pub fn hold(&self, prefixes: &[&str], pass: usize) {
        *self.rules.hold.lock().unwrap() = Hold {
            prefixes: prefixes.iter().map(|p| p.to_string()).collect(),
            pass,
            subjects: Vec::new(),
        };
    }

    /// The subjects of the publishes held back since [`NatsProxy::hold`],
    /// in order.
    pub fn held_subjects(&self) -> Vec<String> {
        self.rules.hold.lock().unwrap().subjects.clone()
    }

    /// From now on, of the publishes to subjects starting with any of
    /// `prefixes` (on every connection through the proxy), every
    /// `every`-th reaches the server `by` later (the first is the
    /// `every`-th from now); what a connection sends after it waits behind
    /// it.
    pub fn delay(&self, prefixes: &[&str], by: std::time::Duration, every: usize) {
        *self.rules.delay.lock().unwrap() = Delay {
            prefixes: prefixes.iter().map(|p| p.to_string()).collect(),
            by,
            every,
            seen: 0,
        };
    }

    /// Stops holding, and sends what each connection held back, in the
    /// order it was published, before anything newer.
    pub fn release(&self) {
        self.rules.hold.lock().unwrap().prefixes.clear();
        self.rules.release.send_modify(|n| *n += 1);
    }

    /// Whether the server answered every publish let go (each had a reply
    /// subject, as JetStream publishes do): it has decided on each of
    /// them, stored or refused.
    pub fn released_answered(&self) -> bool {
        self.rules.awaiting.lock().unwrap().is_empty()
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
    let down = {
        let rules = rules.clone();
        async move {
            let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
            let mut chunk = vec![0u8; 64 * 1024];
            loop {
                let n = match server_rx.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                if client_tx.write_all(&chunk[..n]).await.is_err() {
                    break;
                }
                // Followed frame by frame to note the answers awaited.
                buf.extend_from_slice(&chunk[..n]);
                let mut at = 0;
                while let Some(len) = frame_len(&buf[at..]) {
                    if let Some(subject) = delivery_subject(&buf[at..at + len]) {
                        let mut awaiting = rules.awaiting.lock().unwrap();
                        if !awaiting.is_empty() {
                            awaiting.remove(subject);
                        }
                    }
                    at += len;
                }
                buf.drain(..at);
                if buf.len() > MAX_FRAME {
                    break;
                }
            }
            let _ = client_tx.shutdown().await;
        }
    };
    let up = async move {
        let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
        let mut chunk = vec![0u8; 64 * 1024];
        let mut held: Vec<u8> = Vec::new();
        let mut releases = rules.release.subscribe();
        loop {
            let n = tokio::select! {
                read = client_rx.read(&mut chunk) => match read {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                },
                changed = releases.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    releases.borrow_and_update();
                    if !send_held(&mut held, &mut server_tx).await {
                        break;
                    }
                    continue;
                }
            };
            // Released meanwhile: what was held goes first.
            if releases.has_changed().unwrap_or(false) {
                releases.borrow_and_update();
                if !send_held(&mut held, &mut server_tx).await {
                    break;
                }
            }
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
                    Some(subject) if rules.hold.lock().unwrap().takes(subject) => {
                        if let Some(reply) = reply_subject(frame) {
                            rules.awaiting.lock().unwrap().insert(reply.to_vec());
                        }
                        held.extend_from_slice(frame);
                    }
                    Some(subject) => match rules.delays(subject) {
                        Some(by) => {
                            // What came before goes now; this one after the delay.
                            if server_tx
                                .write_all(&std::mem::take(&mut out))
                                .await
                                .is_err()
                            {
                                return;
                            }
                            // The fault itself (a bus that stalls), not a
                            // wait for something to happen or not: the
                            // publish is held this long, then let go.
                            tokio::time::sleep(by).await;
                            out.extend_from_slice(frame);
                        }
                        None => out.extend_from_slice(frame),
                    },
                    None => out.extend_from_slice(frame),
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

/// Writes the frames held back to the server; false if it is gone.
async fn send_held(held: &mut Vec<u8>, server: &mut tokio::net::tcp::OwnedWriteHalf) -> bool {
    held.is_empty() || server.write_all(&std::mem::take(held)).await.is_ok()
}

/// The length of the whole client frame at the start of `buf` (its line,
/// and for a publish its payload and the line end after it), if all of it
/// is there.
fn frame_len(buf: &[u8]) -> Option<usize> {
    let eol = buf.windows(2).position(|w| w == b"\r\n")?;
    let line = &buf[..eol];
    let op = line.split(|b| *b == b' ').next().unwrap_or_default();
    let payload = if [&b"PUB"[..], b"HPUB", b"MSG", b"HMSG"]
        .iter()
        .any(|o| op.eq_ignore_ascii_case(o))
    {
        // The last field is the total size (headers included for HPUB and
        // HMSG).
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

/// The reply subject of a `PUB`/`HPUB` frame that has one.
fn reply_subject(frame: &[u8]) -> Option<&[u8]> {
    let line = &frame[..frame.windows(2).position(|w| w == b"\r\n")?];
    let fields: Vec<&[u8]> = line
        .split(|b| *b == b' ')
        .filter(|f| !f.is_empty())
        .collect();
    // PUB subject [reply] size; HPUB subject [reply] header-size size.
    let plain = if fields[0].eq_ignore_ascii_case(b"PUB") {
        3
    } else {
        4
    };
    (fields.len() == plain + 1).then(|| fields[2])
}

/// The subject of a `MSG`/`HMSG` frame from the server; None for any
/// other frame.
fn delivery_subject(frame: &[u8]) -> Option<&[u8]> {
    let mut fields = frame.split(|b| *b == b' ' || *b == b'\r');
    let op = fields.next()?;
    (op.eq_ignore_ascii_case(b"MSG") || op.eq_ignore_ascii_case(b"HMSG"))
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
        assert_eq!(reply_subject(pub_frame), Some(&b"_INBOX.x"[..]));
        assert_eq!(reply_subject(hpub), None);
        let hpub_reply = b"HPUB s _INBOX.y 12 17\r\nNATS/1.0\r\n\r\nhello\r\n";
        assert_eq!(reply_subject(hpub_reply), Some(&b"_INBOX.y"[..]));
        let msg = b"MSG _INBOX.y 3 5\r\nhello\r\n";
        assert_eq!(frame_len(msg), Some(msg.len()));
        assert_eq!(delivery_subject(msg), Some(&b"_INBOX.y"[..]));
    }

    #[test]
    fn every_so_many_publishes_to_the_subjects_are_delayed() {
        let rules = Rules::default();
        assert_eq!(rules.delays(b"$KV.b.k"), None, "nothing delayed at first");
        let by = std::time::Duration::from_millis(800);
        *rules.delay.lock().unwrap() = Delay {
            prefixes: vec!["$KV.b.".into()],
            by,
            every: 4,
            seen: 0,
        };
        let delayed: Vec<bool> = (0..8).map(|_| rules.delays(b"$KV.b.k").is_some()).collect();
        assert_eq!(
            delayed,
            [false, false, false, true, false, false, false, true]
        );
        assert_eq!(rules.delays(b"$KV.other.k"), None);
    }
}
