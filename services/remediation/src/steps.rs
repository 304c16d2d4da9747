//! Running one attempt of an `http`, `exec` or `check` step. Outputs are
//! bounded (`max_output_bytes`) and shaped like `steps.<id>`.

use std::{process::Stdio, time::Duration};

use serde_json::{json, Map, Value};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::{
    runbook::{CheckStep, ExecStep, HttpStep, NatsStep},
    template,
};

/// What one attempt gave: success, and the output object.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub ok: bool,
    /// Why it failed (or what it did), one line.
    pub summary: String,
    pub output: Value,
}

/// The shape of a step's output before it ran (so templates never miss a
/// field in strict mode).
pub fn empty_output(status: &str) -> Value {
    json!({
        "status": status,
        "exit_code": null,
        "stdout": "",
        "stderr": "",
        "http_status": null,
        "body": "",
        "json": null,
        "captures": {},
        "duration_ms": 0,
        "attempts": 0,
    })
}

/// Cuts `s` to at most `max` bytes on a character boundary, saying how much went.
pub fn cut(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…[truncated {} bytes]", &s[..end], s.len() - end)
}

/// Limits of one attempt.
#[derive(Clone)]
pub struct Limits {
    pub max_output: usize,
    pub path: String,
}

/// Runs an `exec`: argv only (no shell), each element rendered on its own;
/// a cleared environment with `PATH` and the step's `env`; its own process
/// group, killed as a whole on timeout.
pub async fn exec(e: &ExecStep, ctx: &Value, timeout: Duration, limits: &Limits) -> Outcome {
    let fail = |summary: String| Outcome {
        ok: false,
        summary,
        output: empty_output("failed"),
    };
    let mut argv = Vec::with_capacity(e.argv.len());
    for a in &e.argv {
        match template::render(a, ctx) {
            Ok(v) => argv.push(v),
            Err(m) => return fail(m),
        }
    }
    let Some(program) = argv.first() else {
        return fail("exec.argv is empty".into());
    };
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(&argv[1..])
        .env_clear()
        .env("PATH", &limits.path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .process_group(0);
    for (k, v) in &e.env {
        match template::render(v, ctx) {
            Ok(v) => {
                cmd.env(k, v);
            }
            Err(m) => return fail(m),
        }
    }
    if let Some(c) = &e.cwd {
        match template::render(c, ctx) {
            Ok(c) => {
                cmd.current_dir(c);
            }
            Err(m) => return fail(m),
        }
    }
    let started = std::time::Instant::now();
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(err) => return fail(format!("cannot start {program:?}: {err}")),
    };
    let pid = child.id();
    // Whatever ends this attempt (timeout, shutdown, the run's own
    // timeout dropping it), the whole group goes with it.
    let mut group = Group(pid);
    let out = child
        .stdout
        .take()
        .map(|o| tokio::spawn(read_bounded(o, limits.max_output)));
    let err = child
        .stderr
        .take()
        .map(|o| tokio::spawn(read_bounded(o, limits.max_output)));
    let status = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(s) => s.ok(),
        Err(_) => {
            kill_group(pid);
            let _ = child.wait().await;
            None
        }
    };
    // Reaped: its pid (the group id) may be reused, so no signal after this.
    group.0 = None;
    let collect = |h: Option<tokio::task::JoinHandle<String>>| async move {
        match h {
            // The group is dead or done; a grandchild holding the pipe open
            // does not keep us waiting.
            Some(h) => tokio::time::timeout(Duration::from_secs(2), h)
                .await
                .ok()
                .and_then(|r| r.ok())
                .unwrap_or_default(),
            None => String::new(),
        }
    };
    let (stdout, stderr) = (collect(out).await, collect(err).await);
    let ms = started.elapsed().as_millis() as u64;
    let code = status.and_then(|s| s.code());
    let expected = if e.expect_exit.is_empty() {
        vec![0]
    } else {
        e.expect_exit.clone()
    };
    let ok = code.is_some_and(|c| expected.contains(&c));
    let summary = match (status, code) {
        (None, _) => format!("timed out after {timeout:?}; its process group was killed"),
        (Some(_), Some(c)) if ok => format!("exit {c}"),
        (Some(_), Some(c)) => format!("exit {c} (expected {expected:?})"),
        (Some(s), None) => format!("ended by a signal ({s})"),
    };
    Outcome {
        ok,
        summary,
        output: json!({
            "status": if ok { "succeeded" } else { "failed" },
            "exit_code": code,
            "stdout": stdout,
            "stderr": stderr,
            "http_status": null,
            "body": "",
            "json": null,
            "captures": {},
            "duration_ms": ms,
            "attempts": 1,
        }),
    }
}

/// Kills the process group when dropped (unless disarmed).
struct Group(Option<u32>);

impl Drop for Group {
    fn drop(&mut self) {
        kill_group(self.0);
    }
}

fn kill_group(pid: Option<u32>) {
    if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
        // SAFETY: killpg only sends a signal; the group is the child's own
        // (process_group(0) made it its leader), never ours.
        unsafe {
            libc::killpg(pid, libc::SIGKILL);
        }
    }
}

/// Reads all of `r`, keeping the first `max` bytes.
async fn read_bounded<R: AsyncRead + Unpin>(mut r: R, max: usize) -> String {
    let mut kept = Vec::new();
    let mut dropped = 0usize;
    let mut buf = [0u8; 8192];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let room = max.saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
                dropped += n.saturating_sub(room);
            }
        }
    }
    let mut s = String::from_utf8_lossy(&kept).into_owned();
    if dropped > 0 {
        s.push_str(&format!("…[truncated {dropped} bytes]"));
    }
    s
}

/// Runs an `http` request: URL components percent-encoded, body strings
/// sent as JSON strings, headers checked for line breaks.
pub async fn http(
    client: &reqwest::Client,
    h: &HttpStep,
    ctx: &Value,
    timeout: Duration,
    limits: &Limits,
) -> Outcome {
    let fail = |summary: String| Outcome {
        ok: false,
        summary,
        output: empty_output("failed"),
    };
    let url = match template::render_url(&h.url, ctx) {
        Ok(u) => u,
        Err(m) => return fail(m),
    };
    let url = match reqwest::Url::parse(&url) {
        Ok(u) if u.scheme() == "http" || u.scheme() == "https" => u,
        Ok(u) => return fail(format!("URL scheme {:?} is not http or https", u.scheme())),
        Err(e) => return fail(format!("URL {url:?} does not parse: {e}")),
    };
    let method = match reqwest::Method::from_bytes(h.method.as_bytes()) {
        Ok(m) => m,
        Err(_) => return fail(format!("{:?} is not an HTTP method", h.method)),
    };
    let mut req = client.request(method, url.clone()).timeout(timeout);
    for (k, v) in &h.headers {
        let v = match template::render(v, ctx) {
            Ok(v) => v,
            Err(m) => return fail(m),
        };
        if v.contains(['\r', '\n']) {
            return fail(format!(
                "header {k}: a line break is not allowed in a header"
            ));
        }
        req = req.header(k, v);
    }
    if let Some(b) = &h.body {
        match render_json(b, ctx) {
            Ok(b) => req = req.json(&b),
            Err(m) => return fail(m),
        }
    }
    let started = std::time::Instant::now();
    let resp = match req.send().await {
        Ok(r) => r,
        Err(e) => {
            let what = if e.is_timeout() {
                format!("no answer within {timeout:?}")
            } else {
                format!("request failed: {e}")
            };
            return fail(what);
        }
    };
    let status = resp.status().as_u16();
    let mut body = Vec::new();
    let mut resp = resp;
    let mut dropped = 0usize;
    while let Ok(Ok(Some(c))) = tokio::time::timeout(timeout, resp.chunk()).await {
        let room = limits.max_output.saturating_sub(body.len());
        body.extend_from_slice(&c[..c.len().min(room)]);
        dropped += c.len().saturating_sub(room);
        if dropped > 16 * limits.max_output.max(1024) {
            break;
        }
    }
    let ms = started.elapsed().as_millis() as u64;
    let text = String::from_utf8_lossy(&body).into_owned();
    let parsed: Value = if dropped == 0 {
        serde_json::from_slice(&body).unwrap_or(Value::Null)
    } else {
        Value::Null
    };
    let mut captures = Map::new();
    for (name, ptr) in &h.captures {
        captures.insert(
            name.clone(),
            parsed.pointer(ptr).cloned().unwrap_or(Value::Null),
        );
    }
    let ok = if h.expect_status.is_empty() {
        (200..300).contains(&status)
    } else {
        h.expect_status.contains(&status)
    };
    Outcome {
        ok,
        summary: if ok {
            format!("HTTP {status}")
        } else {
            format!(
                "HTTP {status} (expected {})",
                expected_status(&h.expect_status)
            )
        },
        output: json!({
            "status": if ok { "succeeded" } else { "failed" },
            "exit_code": null,
            "stdout": "",
            "stderr": "",
            "http_status": status,
            "body": if dropped > 0 { format!("{text}…[truncated {dropped} bytes]") } else { text },
            "json": parsed,
            "captures": captures,
            "duration_ms": ms,
            "attempts": 1,
        }),
    }
}

fn expected_status(v: &[u16]) -> String {
    if v.is_empty() {
        "2xx".into()
    } else {
        format!("{v:?}")
    }
}

/// Renders every string of a JSON value as a template (the result stays a
/// JSON string).
pub fn render_json(v: &Value, ctx: &Value) -> Result<Value, String> {
    Ok(match v {
        Value::String(s) => Value::String(template::render(s, ctx)?),
        Value::Array(a) => Value::Array(
            a.iter()
                .map(|x| render_json(x, ctx))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(o) => {
            let mut m = Map::new();
            for (k, x) in o {
                m.insert(k.clone(), render_json(x, ctx)?);
            }
            Value::Object(m)
        }
        other => other.clone(),
    })
}

/// Runs a `nats` request: the subject rendered (every token plain), the
/// payload's strings rendered as data, the reply bounded and checked with
/// `expect` (over `result`).
pub async fn nats(
    client: &async_nats::Client,
    n: &NatsStep,
    ctx: &Value,
    timeout: Duration,
    limits: &Limits,
) -> Outcome {
    let fail = |summary: String| Outcome {
        ok: false,
        summary,
        output: empty_output("failed"),
    };
    let subject = match template::render(&n.subject, ctx) {
        Ok(s) => s,
        Err(m) => return fail(m),
    };
    let plain = |t: &str| {
        !t.is_empty()
            && t != "*"
            && t != ">"
            && !t.chars().any(|c| c.is_whitespace() || c.is_control())
    };
    if subject.len() > 255 || !subject.split('.').all(plain) {
        return fail(format!(
            "subject {subject:?} is not one plain NATS subject (no `*`, `>`, spaces or empty tokens)"
        ));
    }
    let payload: Vec<u8> = match &n.payload {
        None => Vec::new(),
        Some(Value::String(s)) => match template::render(s, ctx) {
            Ok(s) => s.into_bytes(),
            Err(m) => return fail(m),
        },
        Some(v) => match render_json(v, ctx) {
            Ok(v) => serde_json::to_vec(&v).unwrap_or_default(),
            Err(m) => return fail(m),
        },
    };
    let started = std::time::Instant::now();
    let request = async_nats::Request::new()
        .payload(payload.into())
        .timeout(Some(timeout));
    let reply = match client.send_request(subject.clone(), request).await {
        Ok(r) => r,
        Err(e) => {
            let why = match e.kind() {
                async_nats::RequestErrorKind::NoResponders => {
                    format!("nobody answers on {subject}")
                }
                async_nats::RequestErrorKind::TimedOut => {
                    format!("no reply on {subject} within {timeout:?}")
                }
                _ => format!("request on {subject} failed: {e}"),
            };
            return fail(why);
        }
    };
    let ms = started.elapsed().as_millis() as u64;
    let bytes = &reply.payload[..];
    let text = cut(&String::from_utf8_lossy(bytes), limits.max_output);
    let parsed: Value = serde_json::from_slice(bytes).unwrap_or(Value::Null);
    let mut output = json!({
        "status": "succeeded",
        "exit_code": null,
        "stdout": "",
        "stderr": "",
        "http_status": null,
        "body": text,
        "json": parsed,
        "captures": {},
        "duration_ms": ms,
        "attempts": 1,
    });
    let holds = match &n.expect {
        None => Ok(true),
        Some(e) => {
            let mut with = ctx.clone();
            if let Value::Object(m) = &mut with {
                m.insert("result".into(), output.clone());
            }
            template::condition(e, &with)
        }
    };
    let (ok, summary) = match holds {
        Ok(true) => (true, format!("reply on {subject}")),
        Ok(false) => (
            false,
            format!("the reply on {subject} is not what `expect` wants"),
        ),
        Err(m) => (false, format!("expect: {m}")),
    };
    if !ok {
        output["status"] = "failed".into();
    }
    Outcome {
        ok,
        summary,
        output,
    }
}

/// Runs a `check`: the probe every `interval` until `until` holds, for at
/// most `timeout`.
pub async fn check(
    client: &reqwest::Client,
    c: &CheckStep,
    ctx: &Value,
    timeout: Duration,
    limits: &Limits,
) -> Outcome {
    let interval = c
        .interval
        .map(|d| d.0)
        .unwrap_or(Duration::from_secs(5))
        .max(Duration::from_millis(10));
    let deadline = tokio::time::Instant::now() + timeout;
    let mut probes = 0u32;
    loop {
        probes += 1;
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let probe_timeout = left
            .min(Duration::from_secs(30))
            .max(Duration::from_millis(10));
        let o = match (&c.http, &c.exec) {
            (Some(h), _) => http(client, h, ctx, probe_timeout, limits).await,
            (_, Some(e)) => exec(e, ctx, probe_timeout, limits).await,
            _ => {
                return Outcome {
                    ok: false,
                    summary: "a check needs an http or exec probe".into(),
                    output: empty_output("failed"),
                }
            }
        };
        let holds = match &c.until {
            None => Ok(o.ok),
            Some(u) => {
                let mut with = ctx.clone();
                if let Value::Object(m) = &mut with {
                    m.insert("result".into(), o.output.clone());
                }
                template::condition(u, &with)
            }
        };
        match holds {
            Ok(true) => {
                let mut output = o.output;
                output["status"] = "succeeded".into();
                output["attempts"] = probes.into();
                return Outcome {
                    ok: true,
                    summary: format!("holds after {probes} probe(s): {}", o.summary),
                    output,
                };
            }
            Err(m) => {
                return Outcome {
                    ok: false,
                    summary: m,
                    output: o.output,
                }
            }
            Ok(false) => {}
        }
        if tokio::time::Instant::now() + interval >= deadline {
            let mut output = o.output;
            output["status"] = "failed".into();
            output["attempts"] = probes.into();
            return Outcome {
                ok: false,
                summary: format!(
                    "did not hold within {timeout:?} ({probes} probe(s); last: {})",
                    o.summary
                ),
                output,
            };
        }
        tokio::time::sleep(interval).await;
    }
}
