//! What `bench all` runs beside Tocsin: a real Prometheus Alertmanager
//! (the peer), a webhook receiver inside the bench (where Tocsin's notifier
//! and Alertmanager deliver), child processes killed on drop, and the
//! /proc readings (CPU time, peak RSS) of those processes.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use axum::{extract::State, http::StatusCode, routing::post, Router};
use bytes::Bytes;
use tokio::net::TcpListener;

/// A child process, killed (SIGKILL) and reaped on drop.
pub struct Proc {
    pub name: String,
    child: Child,
    pub log: PathBuf,
}

impl Proc {
    /// Runs `cmd` with stdout and stderr into `log` (created).
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> anyhow::Result<Proc> {
        let out = std::fs::File::create(log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        Ok(Proc {
            name: name.to_string(),
            child,
            log: log.to_path_buf(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails (with the end of its log) if it has exited.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited with {status}:\n{}", self.name, self.log_tail());
        }
        Ok(())
    }

    /// The last 40 lines of its log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Waits until `GET url` answers 200 (it must keep running meanwhile).
    pub async fn wait_http_ok(&mut self, url: &str, within: Duration) -> anyhow::Result<()> {
        let client = reqwest::Client::new();
        let deadline = Instant::now() + within;
        loop {
            if let Ok(r) = client.get(url).send().await {
                if r.status() == 200 {
                    return Ok(());
                }
            }
            self.check_running()?;
            if Instant::now() > deadline {
                bail!(
                    "{} not ready within {within:?}:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            // Poll interval of a wait with a deadline.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILLs it (no chance to flush or stop cleanly) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Clock ticks per second of /proc/<pid>/stat's times (`getconf CLK_TCK`,
/// else 100, Linux's value everywhere it runs).
pub fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// utime + stime of `pid` (None: this process), in clock ticks.
pub fn cpu_ticks(pid: Option<u32>) -> Option<u64> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/stat"),
        None => "/proc/self/stat".to_string(),
    };
    let text = std::fs::read_to_string(path).ok()?;
    // After the command name (which may hold spaces) in parentheses: state
    // is field 3, utime field 14, stime field 15.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// The summed CPU ticks of several processes (None: this process); None
/// if one cannot be read.
pub fn cpu_ticks_of(pids: &[Option<u32>]) -> Option<u64> {
    pids.iter().map(|p| cpu_ticks(*p)).sum()
}

/// VmHWM (peak RSS) of `pid` (None: this process), in MiB.
pub fn peak_rss_mib(pid: Option<u32>) -> Option<f64> {
    super::Memory::read(pid).map(|m| m.hwm_kib as f64 / 1024.0)
}

/// `pid`'s resident memory now (VmRSS), in MiB.
pub fn rss_mib(pid: Option<u32>) -> Option<f64> {
    super::Memory::read(pid).map(|m| m.rss_kib as f64 / 1024.0)
}

/// `pid`'s proportional set size now (`Pss` of /proc/PID/smaps_rollup):
/// its resident memory with each page shared with other processes (the
/// binary's code, mapped by every Tocsin process) counted in shares, so the
/// PSS of several processes adds up to the memory they take together. In
/// MiB; None where /proc does not say.
pub fn pss_mib(pid: Option<u32>) -> Option<f64> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/smaps_rollup"),
        None => "/proc/self/smaps_rollup".to_string(),
    };
    let text = std::fs::read_to_string(path).ok()?;
    Some(tocsin_tests::proc_kib(&text, "Pss")? as f64 / 1024.0)
}

/// Resets this process's VmHWM to its current RSS (`/proc/self/clear_refs`
/// with 5), so a later [`peak_rss_mib`] of it is the peak since; where that
/// cannot be written the peak stays the process's whole life's.
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// One POST the receiver got: when, and its body.
pub struct Arrival {
    pub at: Instant,
    pub body: Bytes,
}

/// An HTTP server in the bench taking `POST /hook` (200, always), keeping
/// each request's arrival time and body. Stops on drop.
pub struct Receiver {
    pub url: String,
    arrivals: Arc<Mutex<Vec<Arrival>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    pub async fn start() -> anyhow::Result<Receiver> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/hook", listener.local_addr()?);
        let arrivals: Arc<Mutex<Vec<Arrival>>> = Arc::default();
        async fn hook(State(a): State<Arc<Mutex<Vec<Arrival>>>>, body: Bytes) -> StatusCode {
            let at = Instant::now();
            a.lock().expect("receiver lock").push(Arrival { at, body });
            StatusCode::OK
        }
        let app = Router::new()
            .route("/hook", post(hook))
            .with_state(arrivals.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Receiver {
            url,
            arrivals,
            task,
        })
    }

    /// How many POSTs came so far.
    pub fn count(&self) -> usize {
        self.arrivals.lock().expect("receiver lock").len()
    }

    /// Everything received so far, taken out.
    pub fn take(&self) -> Vec<Arrival> {
        std::mem::take(&mut *self.arrivals.lock().expect("receiver lock"))
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

const INSTALL_HINT: &str = "install Prometheus Alertmanager (`./deploy/dev.sh deps` as root, \
    `apt-get install prometheus-alertmanager`, or a release binary with ALERTMANAGER_BIN set)";

/// `ALERTMANAGER_BIN`, else `alertmanager` or `prometheus-alertmanager` on
/// the PATH (as the end-to-end test finds it).
pub fn alertmanager_bin() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("ALERTMANAGER_BIN") {
        let p = PathBuf::from(p);
        if !p.is_file() {
            bail!(
                "ALERTMANAGER_BIN={} is not a file; {INSTALL_HINT}",
                p.display()
            );
        }
        return Ok(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for name in ["alertmanager", "prometheus-alertmanager"] {
        if let Some(p) = std::env::split_paths(&path)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
        {
            return Ok(p);
        }
    }
    bail!("Prometheus Alertmanager not found; {INSTALL_HINT}")
}

/// The first line of `<bin> --version` (stdout or stderr), e.g.
/// `alertmanager, version 0.25.0 (...)`.
pub fn version_line(bin: &Path) -> String {
    Command::new(bin)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .ok()
        .and_then(|o| {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            text.lines()
                .find(|l| !l.trim().is_empty())
                .map(|l| l.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// How Alertmanager groups and sends (its `route:` timing).
pub struct Grouping {
    pub group_by: String,
    pub group_wait: String,
    pub group_interval: String,
}

/// A real Alertmanager of the bench's own: a free port, its storage in a
/// temp dir, no cluster (`--cluster.listen-address=`), one webhook receiver.
/// Killed on drop, its temp dir removed.
pub struct Alertmanager {
    pub proc: Proc,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Alertmanager {
    pub async fn start(webhook: &str, grouping: &Grouping) -> anyhow::Result<Alertmanager> {
        let bin = alertmanager_bin()?;
        let dir = tempfile::Builder::new()
            .prefix("tocsin-bench-alertmanager-")
            .tempdir()?;
        let config = dir.path().join("alertmanager.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  resolve_timeout: 1h\n\
                 route:\n  receiver: bench\n  group_by: {group_by}\n  group_wait: {wait}\n  \
                 group_interval: {interval}\n  repeat_interval: 12h\n\
                 receivers:\n  - name: bench\n    webhook_configs:\n      - url: {webhook}\n        \
                 send_resolved: false\n",
                group_by = grouping.group_by,
                wait = grouping.group_wait,
                interval = grouping.group_interval,
            ),
        )?;
        let port = tocsin_tests::ports::free_port();
        let mut cmd = Command::new(&bin);
        cmd.arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--cluster.listen-address=")
            .arg("--log.level=warn");
        let mut proc = Proc::spawn("alertmanager", cmd, &dir.path().join("alertmanager.log"))?;
        proc.wait_http_ok(
            &format!("http://127.0.0.1:{port}/-/ready"),
            Duration::from_secs(60),
        )
        .await?;
        Ok(Alertmanager {
            proc,
            port,
            _dir: dir,
        })
    }

    /// `POST /api/v2/alerts`.
    pub fn alerts_url(&self) -> String {
        format!("http://127.0.0.1:{}/api/v2/alerts", self.port)
    }
}

/// Peak RSS per process as one line: `name 12.3 MiB, other ?`.
pub fn describe_rss(rss: &[(String, Option<f64>)]) -> String {
    rss.iter()
        .map(|(n, m)| {
            format!(
                "{n} {}",
                m.map(|m| format!("{m:.1} MiB"))
                    .unwrap_or_else(|| "?".into())
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}
