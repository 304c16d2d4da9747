//! A real SMTP server per test: Python's aiosmtpd (installed into
//! `.tocsin/venv` by `./deploy/dev.sh deps`), storing every message it
//! accepts in a temp dir, plus a small MIME parser for what lettre sends.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use base64::Engine as _;
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const INSTALL_HINT: &str = "install aiosmtpd with `./deploy/dev.sh deps` \
    (pip installs it into .tocsin/venv)";

/// Exit code of the sink script when aiosmtpd cannot be imported.
const NO_AIOSMTPD: i32 = 97;

/// The sink: an aiosmtpd Controller whose handler writes `<n>.eml` (the raw
/// message) and then `<n>.json` (the envelope), each through a rename, so a
/// reader that sees `<n>.json` sees the whole message. It exits when the
/// process that started it goes away.
const SINK_PY: &str = r#"
import json, os, sys, time
try:
    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import AuthResult, LoginPassword
except ImportError as e:
    print(f"cannot import aiosmtpd: {e}", file=sys.stderr, flush=True)
    sys.exit(97)

out_dir, port = sys.argv[1], int(sys.argv[2])
user, password = os.environ.get("SINK_USER"), os.environ.get("SINK_PASS")
parent = os.getppid()


def put(name, data):
    tmp = os.path.join(out_dir, name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, os.path.join(out_dir, name))


class Sink:
    def __init__(self):
        self.n = 0

    async def handle_DATA(self, server, session, envelope):
        self.n += 1
        raw = envelope.original_content or envelope.content or b""
        if isinstance(raw, str):
            raw = raw.encode("utf-8", "surrogateescape")
        put(f"{self.n}.eml", raw)
        meta = {"mail_from": envelope.mail_from, "rcpt_tos": list(envelope.rcpt_tos)}
        put(f"{self.n}.json", json.dumps(meta).encode())
        return "250 Message accepted for delivery"


def authenticate(server, session, envelope, mechanism, auth_data):
    ok = (
        isinstance(auth_data, LoginPassword)
        and auth_data.login == user.encode()
        and auth_data.password == password.encode()
    )
    return AuthResult(success=ok, handled=False)


options = dict(hostname="127.0.0.1", port=port, decode_data=False, enable_SMTPUTF8=True)
tls_mode = os.environ.get("SINK_TLS")
if user is not None:
    # With implicit TLS the whole session is encrypted, but aiosmtpd only
    # counts STARTTLS as TLS: require TLS for logins in starttls mode only.
    options.update(authenticator=authenticate, auth_required=True, auth_require_tls=(tls_mode == "starttls"))
if tls_mode:
    import ssl
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(os.environ["SINK_CERT"], os.environ["SINK_KEY"])
    if tls_mode == "starttls":
        options.update(tls_context=ctx, require_starttls=True)
    else:
        options.update(ssl_context=ctx)
controller = Controller(Sink(), **options)
controller.start()
print(f"listening on 127.0.0.1:{port}", file=sys.stderr, flush=True)
try:
    while os.getppid() == parent:
        time.sleep(0.2)
finally:
    controller.stop()
"#;

/// How a TLS sink secures connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SinkTls {
    /// Plain connection, `STARTTLS` required before mail (port 587 style).
    Starttls,
    /// TLS from the first byte (port 465 style).
    Implicit,
}

/// A message the sink accepted, with the parts a test asserts on.
#[derive(Clone, Debug)]
pub struct Mail {
    /// Envelope sender (`MAIL FROM`).
    pub mail_from: String,
    /// Envelope recipients (`RCPT TO`), in order.
    pub rcpt_tos: Vec<String>,
    /// The raw message as received (CRLF line ends).
    pub raw: String,
    /// `Subject`, unfolded and RFC 2047-decoded.
    pub subject: String,
    /// `Message-ID` as written (with angle brackets).
    pub message_id: String,
    /// Top-level MIME type, lowercased, without parameters (`text/plain` if absent).
    pub content_type: String,
    /// First `text/plain` part, transfer-decoded, line ends as `\n` (`""` if none).
    pub text: String,
    /// First `text/html` part, transfer-decoded, line ends as `\n` (`""` if none).
    pub html: String,
}

impl Mail {
    /// Parses a raw message received with the given envelope.
    pub fn parse(mail_from: String, rcpt_tos: Vec<String>, raw: String) -> Mail {
        let (headers, body) = split_headers(&raw);
        let subject = decode_words(header(&headers, "subject").unwrap_or(""));
        let message_id = header(&headers, "message-id").unwrap_or("").to_string();
        let (content_type, _) = parse_content_type(header(&headers, "content-type"));
        let (mut text, mut html) = (None, None);
        collect_parts(&headers, body, &mut text, &mut html, 0);
        Mail {
            mail_from,
            rcpt_tos,
            subject,
            message_id,
            content_type,
            text: text.unwrap_or_default(),
            html: html.unwrap_or_default(),
            raw,
        }
    }

    /// The first header named `name` (case-insensitive), unfolded, not decoded.
    pub fn header(&self, name: &str) -> Option<String> {
        let (headers, _) = split_headers(&self.raw);
        header(&headers, name).map(str::to_string)
    }
}

/// An aiosmtpd server private to one test; killed on drop.
pub struct SmtpSink {
    dir: TempDir,
    port: u16,
    child: Option<Child>,
}

impl SmtpSink {
    /// Starts a sink that accepts any message without authentication.
    pub async fn start() -> SmtpSink {
        Self::spawn(None, None).await
    }

    /// Starts a sink that requires `AUTH PLAIN`/`LOGIN` with these credentials (no TLS).
    pub async fn start_with_auth(user: &str, pass: &str) -> SmtpSink {
        Self::spawn(Some((user, pass)), None).await
    }

    /// Starts a sink that speaks TLS (STARTTLS required, or implicit TLS
    /// from the first byte) with a fresh self-signed certificate for
    /// `localhost` ([`SmtpSink::ca_file`]), optionally requiring a login.
    pub async fn start_tls(mode: SinkTls, auth: Option<(&str, &str)>) -> SmtpSink {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])
            .expect("self-signed certificate");
        let pem = (cert.cert.pem(), cert.key_pair.serialize_pem());
        Self::spawn(auth, Some((mode, pem))).await
    }

    /// The PEM file of the certificate a TLS sink presents (trust it as a CA).
    pub fn ca_file(&self) -> std::path::PathBuf {
        self.dir.path().join("cert.pem")
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The address it listens on (`127.0.0.1`).
    pub fn host(&self) -> &str {
        "127.0.0.1"
    }

    /// Every message accepted so far, in arrival order.
    /// The messages once there are at least `n` (fewer after `timeout`).
    pub async fn wait_for(&self, n: usize, timeout: std::time::Duration) -> Vec<Mail> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let m = self.messages();
            if m.len() >= n || tokio::time::Instant::now() >= deadline {
                return m;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    pub fn messages(&self) -> Vec<Mail> {
        let mut numbered: Vec<(u64, PathBuf)> = std::fs::read_dir(self.mail_dir())
            .map(|entries| {
                entries
                    .flatten()
                    .filter_map(|e| {
                        let name = e.file_name().to_string_lossy().to_string();
                        let n = name.strip_suffix(".json")?.parse().ok()?;
                        Some((n, e.path()))
                    })
                    .collect()
            })
            .unwrap_or_default();
        numbered.sort();
        numbered
            .into_iter()
            .filter_map(|(_, meta_path)| {
                let meta: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(&meta_path).ok()?).ok()?;
                let raw = std::fs::read(meta_path.with_extension("eml")).ok()?;
                let mail_from = meta["mail_from"].as_str().unwrap_or("").to_string();
                let rcpt_tos = meta["rcpt_tos"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|r| r.as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default();
                Some(Mail::parse(
                    mail_from,
                    rcpt_tos,
                    String::from_utf8_lossy(&raw).into_owned(),
                ))
            })
            .collect()
    }

    /// Polls every 20 ms until at least `n` messages arrived or `timeout` passed; returns them all.
    pub async fn wait_for_count(&self, n: usize, timeout: Duration) -> Vec<Mail> {
        let deadline = Instant::now() + timeout;
        loop {
            let mails = self.messages();
            if mails.len() >= n || Instant::now() >= deadline {
                return mails;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// What the server wrote to stderr so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sink.log")).unwrap_or_default()
    }

    fn mail_dir(&self) -> PathBuf {
        self.dir.path().join("mail")
    }

    /// `tls`: the mode with the certificate and key (PEM).
    async fn spawn(
        auth: Option<(&str, &str)>,
        tls: Option<(SinkTls, (String, String))>,
    ) -> SmtpSink {
        let dir = tempfile::Builder::new()
            .prefix("tocsin-smtp-")
            .tempdir()
            .expect("temp dir");
        std::fs::create_dir(dir.path().join("mail")).expect("mail dir");
        let script = dir.path().join("sink.py");
        std::fs::write(&script, SINK_PY).expect("write sink.py");
        let port = crate::ports::free_port();
        let log = std::fs::File::create(dir.path().join("sink.log")).expect("sink.log");
        let (python, pythonpath) = python();
        let mut cmd = Command::new(&python);
        cmd.arg(&script)
            .arg(dir.path().join("mail"))
            .arg(port.to_string())
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log);
        if let Some(p) = pythonpath {
            let joined = match std::env::var_os("PYTHONPATH") {
                Some(old) if !old.is_empty() => {
                    let mut s = p.into_os_string();
                    s.push(":");
                    s.push(old);
                    s
                }
                _ => p.into_os_string(),
            };
            cmd.env("PYTHONPATH", joined);
        }
        if let Some((user, pass)) = auth {
            cmd.env("SINK_USER", user).env("SINK_PASS", pass);
        }
        if let Some((mode, (cert, key))) = &tls {
            let (c, k) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
            std::fs::write(&c, cert).expect("cert.pem");
            std::fs::write(&k, key).expect("key.pem");
            cmd.env("SINK_CERT", &c).env("SINK_KEY", &k).env(
                "SINK_TLS",
                match mode {
                    SinkTls::Starttls => "starttls",
                    SinkTls::Implicit => "implicit",
                },
            );
        }
        let child = cmd.spawn().unwrap_or_else(|e| {
            panic!(
                "cannot start {} for the SMTP sink: {e}; {INSTALL_HINT}",
                python.display()
            )
        });
        let mut sink = SmtpSink {
            dir,
            port,
            child: Some(child),
        };
        sink.wait_ready(matches!(tls, Some((SinkTls::Implicit, _))))
            .await;
        sink
    }

    /// Ready when a TCP client gets the `220` greeting.
    async fn wait_ready(&mut self, implicit_tls: bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            // An implicit-TLS server greets only inside TLS: a connection is enough.
            let up = if implicit_tls {
                tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                    .await
                    .is_ok()
            } else {
                greeting(self.port).await
            };
            if up {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                if status.code() == Some(NO_AIOSMTPD) {
                    panic!(
                        "the SMTP sink cannot import aiosmtpd; {INSTALL_HINT}\n{}",
                        self.log()
                    );
                }
                panic!("the SMTP sink exited with {status}; log:\n{}", self.log());
            }
            if Instant::now() > deadline {
                panic!(
                    "the SMTP sink did not greet within 10s on port {}; log:\n{}",
                    self.port,
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `.tocsin/venv/bin/python` if present, else `python3` with the venv dir on
/// `PYTHONPATH` (where `pip install --target` puts it).
fn python() -> (PathBuf, Option<PathBuf>) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let venv_python = root.join(".tocsin/venv/bin/python");
    if venv_python.exists() {
        (venv_python, None)
    } else {
        (PathBuf::from("python3"), Some(root.join(".tocsin/venv")))
    }
}

async fn greeting(port: u16) -> bool {
    let attempt = async {
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        reader.read_line(&mut line).await.ok()?;
        let _ = reader.get_mut().write_all(b"QUIT\r\n").await;
        line.starts_with("220").then_some(())
    };
    tokio::time::timeout(Duration::from_secs(1), attempt)
        .await
        .ok()
        .flatten()
        .is_some()
}

// ---------------------------------------------------------------------------
// Minimal MIME parsing

type Headers = Vec<(String, String)>;

/// Splits at the first empty line; unfolds continuation lines (RFC 5322
/// unfolding: the line break goes, the leading white space stays).
fn split_headers(raw: &str) -> (Headers, &str) {
    let mut headers: Headers = Vec::new();
    let mut pos = 0;
    let mut body = "";
    while pos < raw.len() {
        let end = raw[pos..].find('\n').map_or(raw.len(), |i| pos + i + 1);
        let line = raw[pos..end].trim_end_matches(['\r', '\n']);
        pos = end;
        if line.is_empty() {
            body = &raw[pos..];
            break;
        }
        if line.starts_with([' ', '\t']) {
            if let Some(last) = headers.last_mut() {
                last.1.push_str(line);
            }
        } else if let Some((k, v)) = line.split_once(':') {
            headers.push((k.trim().to_string(), v.trim_start().to_string()));
        }
    }
    (headers, body)
}

fn header<'a>(headers: &'a Headers, name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim())
}

/// `multipart/alternative; boundary="x"` → ("multipart/alternative", [("boundary","x")]).
fn parse_content_type(value: Option<&str>) -> (String, Vec<(String, String)>) {
    let Some(value) = value else {
        return ("text/plain".into(), vec![]);
    };
    let mut pieces = Vec::new();
    let (mut current, mut quoted) = (String::new(), false);
    for c in value.chars() {
        match c {
            '"' => quoted = !quoted,
            ';' if !quoted => pieces.push(std::mem::take(&mut current)),
            _ => current.push(c),
        }
    }
    pieces.push(current);
    let mime = pieces[0].trim().to_ascii_lowercase();
    let params = pieces[1..]
        .iter()
        .filter_map(|p| {
            let (k, v) = p.split_once('=')?;
            Some((k.trim().to_ascii_lowercase(), v.trim().to_string()))
        })
        .collect();
    (mime, params)
}

fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// The parts between `--boundary` lines, each without the line break that
/// belongs to the following delimiter.
fn split_multipart<'a>(body: &'a str, boundary: &str) -> Vec<&'a str> {
    let delimiter = format!("--{boundary}");
    let mut parts = Vec::new();
    let mut start: Option<usize> = None;
    let mut pos = 0;
    while pos < body.len() {
        let end = body[pos..].find('\n').map_or(body.len(), |i| pos + i + 1);
        let line = body[pos..end].trim_end();
        if let Some(rest) = line.strip_prefix(&delimiter) {
            if rest.is_empty() || rest == "--" {
                if let Some(s) = start {
                    let part = &body[s..pos];
                    let part = part
                        .strip_suffix("\r\n")
                        .or_else(|| part.strip_suffix('\n'))
                        .unwrap_or(part);
                    parts.push(part);
                }
                if rest == "--" {
                    break;
                }
                start = Some(end);
            }
        }
        pos = end;
    }
    parts
}

/// Finds the first text/plain and text/html leaves (attachments skipped).
fn collect_parts(
    headers: &Headers,
    body: &str,
    text: &mut Option<String>,
    html: &mut Option<String>,
    depth: usize,
) {
    let (mime, params) = parse_content_type(header(headers, "content-type"));
    if mime.starts_with("multipart/") {
        if let (Some(boundary), true) = (param(&params, "boundary"), depth < 8) {
            for part in split_multipart(body, boundary) {
                let (h, b) = split_headers(part);
                collect_parts(&h, b, text, html, depth + 1);
            }
        }
        return;
    }
    let attachment = header(headers, "content-disposition")
        .is_some_and(|d| d.to_ascii_lowercase().starts_with("attachment"));
    let slot = match mime.as_str() {
        "text/plain" if text.is_none() => text,
        "text/html" if html.is_none() => html,
        _ => return,
    };
    if attachment {
        return;
    }
    let cte = header(headers, "content-transfer-encoding")
        .unwrap_or("7bit")
        .to_ascii_lowercase();
    let bytes = match cte.as_str() {
        "quoted-printable" => decode_qp(body),
        "base64" => decode_base64(body),
        _ => body.as_bytes().to_vec(),
    };
    let charset = param(&params, "charset").unwrap_or("utf-8");
    let decoded = decode_charset(charset, &bytes);
    let mut decoded = decoded.replace("\r\n", "\n");
    // A single-part body ends with the line break before SMTP's final ".".
    if depth == 0 && decoded.ends_with('\n') && cte != "base64" {
        decoded.pop();
    }
    *slot = Some(decoded);
}

fn decode_charset(charset: &str, bytes: &[u8]) -> String {
    match charset.to_ascii_lowercase().as_str() {
        "iso-8859-1" | "latin1" | "latin-1" => bytes.iter().map(|&b| b as char).collect(),
        _ => String::from_utf8_lossy(bytes).into_owned(),
    }
}

fn hex_byte(pair: &[u8]) -> Option<u8> {
    std::str::from_utf8(pair)
        .ok()
        .and_then(|h| u8::from_str_radix(h, 16).ok())
}

/// Quoted-printable (RFC 2045 §6.7), with soft line breaks.
fn decode_qp(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'=' {
            if b[i + 1..].starts_with(b"\r\n") {
                i += 3;
                continue;
            }
            if b[i + 1..].starts_with(b"\n") {
                i += 2;
                continue;
            }
            if let Some(v) = b.get(i + 1..i + 3).and_then(hex_byte) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

fn decode_base64(s: &str) -> Vec<u8> {
    let compact: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    let lenient = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    lenient
        .decode(compact)
        .unwrap_or_else(|_| s.as_bytes().to_vec())
}

/// `=?charset?B|Q?text?=` → (charset, bytes, length consumed), if `s` starts with one.
fn encoded_word(s: &str) -> Option<(String, Vec<u8>, usize)> {
    let rest = s.strip_prefix("=?")?;
    let q1 = rest.find('?')?;
    let charset = rest[..q1].split('*').next().unwrap_or("").to_string();
    let rest2 = &rest[q1 + 1..];
    let enc = rest2.chars().next()?;
    let rest3 = rest2.get(1..)?.strip_prefix('?')?;
    let end = rest3.find("?=")?;
    let payload = &rest3[..end];
    if payload.contains([' ', '\t', '\r', '\n']) {
        return None;
    }
    let bytes = match enc.to_ascii_uppercase() {
        'B' => decode_base64(payload),
        'Q' => {
            let p = payload.as_bytes();
            let mut out = Vec::with_capacity(p.len());
            let mut i = 0;
            while i < p.len() {
                match p[i] {
                    b'_' => out.push(b' '),
                    b'=' => {
                        if let Some(v) = p.get(i + 1..i + 3).and_then(hex_byte) {
                            out.push(v);
                            i += 2;
                        } else {
                            out.push(b'=');
                        }
                    }
                    c => out.push(c),
                }
                i += 1;
            }
            out
        }
        _ => return None,
    };
    // "=?" + charset + "?" + enc + "?" + payload + "?="
    let consumed = 2 + q1 + 1 + 1 + 1 + end + 2;
    Some((charset, bytes, consumed))
}

/// Decodes RFC 2047 encoded words; white space between adjacent encoded
/// words is dropped, and their bytes are joined before charset decoding.
fn decode_words(s: &str) -> String {
    let mut out = String::new();
    let mut pending: Option<(String, Vec<u8>)> = None;
    let mut rest = s;
    let flush = |out: &mut String, pending: &mut Option<(String, Vec<u8>)>| {
        if let Some((cs, bytes)) = pending.take() {
            out.push_str(&decode_charset(&cs, &bytes));
        }
    };
    while !rest.is_empty() {
        let Some(at) = rest.find("=?") else {
            flush(&mut out, &mut pending);
            out.push_str(rest);
            break;
        };
        let (before, candidate) = rest.split_at(at);
        match encoded_word(candidate) {
            Some((cs, bytes, used)) => {
                let between_words = pending.is_some() && before.trim().is_empty();
                if !between_words {
                    flush(&mut out, &mut pending);
                    out.push_str(before);
                }
                match &mut pending {
                    Some((pcs, pbytes)) if pcs.eq_ignore_ascii_case(&cs) => {
                        pbytes.extend_from_slice(&bytes)
                    }
                    _ => {
                        flush(&mut out, &mut pending);
                        pending = Some((cs, bytes));
                    }
                }
                rest = &candidate[used..];
            }
            None => {
                flush(&mut out, &mut pending);
                out.push_str(before);
                out.push_str("=?");
                rest = &candidate[2..];
            }
        }
    }
    flush(&mut out, &mut pending);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Shaped like lettre's `MultiPart::alternative_plain_html` output.
    const SAMPLE: &str = "From: Incident Bot <bot@example.test>\r\n\
        To: oncall@example.test\r\n\
        Subject: =?utf-8?b?W0ZJUklOR10gSGlnaExhdGVuY3kg4oCUIGFwaSDDqXTDqQ==?=\r\n \
        =?utf-8?q?_=E2=9C=93?=\r\n\
        Message-ID: <1700000000.abc@example.test>\r\n\
        Date: Tue, 14 Nov 2023 22:13:20 +0000\r\n\
        MIME-Version: 1.0\r\n\
        Content-Type: multipart/alternative;\r\n \
        boundary=\"Ak7Zq0Xb1y9PpW3mTnR5sQ8uV2cE6dF4gH0jK\"\r\n\
        \r\n\
        --Ak7Zq0Xb1y9PpW3mTnR5sQ8uV2cE6dF4gH0jK\r\n\
        Content-Type: text/plain; charset=utf-8\r\n\
        Content-Transfer-Encoding: quoted-printable\r\n\
        \r\n\
        p99 latency above 2s =E2=80=94 caf=C3=A9\r\n\
        a very long line that lettre wraps with a soft line break so it stays und=\r\n\
        er 76 chars\r\n\
        --Ak7Zq0Xb1y9PpW3mTnR5sQ8uV2cE6dF4gH0jK\r\n\
        Content-Type: text/html; charset=utf-8\r\n\
        Content-Transfer-Encoding: base64\r\n\
        \r\n\
        PHA+cDk5IGxhdGVuY3kgYWJvdmUgMnMg4oCUIGNhZsOpPC9wPgo8cD5zZWNv\r\n\
        bmQ8L3A+Cg==\r\n\
        --Ak7Zq0Xb1y9PpW3mTnR5sQ8uV2cE6dF4gH0jK--\r\n";

    #[test]
    fn parses_lettre_like_multipart() {
        let m = Mail::parse(
            "bot@example.test".into(),
            vec!["oncall@example.test".into()],
            SAMPLE.into(),
        );
        assert_eq!(m.subject, "[FIRING] HighLatency — api été ✓");
        assert_eq!(m.message_id, "<1700000000.abc@example.test>");
        assert_eq!(m.content_type, "multipart/alternative");
        assert_eq!(
            m.text,
            "p99 latency above 2s — café\n\
             a very long line that lettre wraps with a soft line break so it stays under 76 chars"
        );
        assert_eq!(
            m.html,
            "<p>p99 latency above 2s — café</p>\n<p>second</p>\n"
        );
        assert_eq!(m.header("MIME-Version").as_deref(), Some("1.0"));
    }

    #[test]
    fn parses_single_part() {
        let raw = "Subject: plain\r\nContent-Type: text/plain; charset=utf-8\r\n\
                   Content-Transfer-Encoding: 7bit\r\n\r\nline one\r\nline two\r\n";
        let m = Mail::parse(String::new(), vec![], raw.into());
        assert_eq!(m.subject, "plain");
        assert_eq!(m.content_type, "text/plain");
        assert_eq!(m.text, "line one\nline two");
        assert_eq!(m.html, "");
    }

    #[test]
    fn encoded_words() {
        assert_eq!(decode_words("plain subject"), "plain subject");
        assert_eq!(decode_words("=?UTF-8?Q?caf=C3=A9_ok?="), "café ok");
        assert_eq!(decode_words("a =?utf-8?b?w6k=?= b"), "a é b");
        // A character split across two words is joined before decoding.
        assert_eq!(decode_words("=?utf-8?q?=C3?= =?utf-8?q?=A9?="), "é");
        assert_eq!(decode_words("=?iso-8859-1?q?caf=E9?="), "café");
        assert_eq!(decode_words("not =? a word"), "not =? a word");
    }

    #[test]
    fn quoted_printable() {
        assert_eq!(decode_qp("a=3Db=\r\nc=\nd"), b"a=bcd");
        assert_eq!(decode_qp("end="), b"end=");
    }
}
