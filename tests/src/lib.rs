//! # tocsin-tests
//!
//! The test kit every Tocsin test uses, the end-to-end tests (`tests/`), and
//! the benchmark harness (`src/bin/bench/main.rs` and its modules).
//!
//! # Layout
//! - [`nats`]: [`NatsServer`], a real `nats-server` per test: random port,
//!   JetStream in a temp dir with `sync_interval: always`, ready when a
//!   client connects and JetStream answers, `stop()`/`restart()` for fault
//!   tests, killed and cleaned up on drop.
//! - [`tocsin`]: [`TocsinHarness`], Tocsin's services started in-process
//!   through the same start-up path as `tocsin up`, on port-0 listeners.
//! - [`bus`]: reading what landed on a stream.
//! - [`http`]: small HTTP helpers.
//! - [`fakes`]: [`fakes::FakeProviders`], one local HTTP server standing in
//!   for Slack, PagerDuty, Twilio and Standard Webhooks receivers (one
//!   module per provider): checks requests as the real services do,
//!   answers with their real shapes, pages lists as they do (Slack cursors,
//!   Twilio page URIs), records what it accepted and a timeline of every
//!   request, can inject failures, and can enforce production-like rate
//!   limits (off by default).
//! - [`notifier`]: a notifier config aimed at the fakes, an escalation
//!   config paging on every channel, and pages made by hand.
//! - [`chatops`]: Slack- and Twilio-signed requests to the chat-ops
//!   service (signed here independently of the service's own code), and a
//!   chat-ops config aimed at the fakes.
//! - [`remediation`]: a config with runbooks in a temp folder, a recording
//!   program, the demo target, and reading runbook steps off a timeline.
//! - [`faults`]: [`faults::NatsProxy`], a proxy in front of a test
//!   nats-server that can swallow a client's publishes to some subjects
//!   (written, never stored, never acknowledged).
//! - [`smtp`]: [`smtp::SmtpSink`], a real SMTP server (aiosmtpd) per test,
//!   with the messages it received parsed into [`smtp::Mail`].

pub mod bus;
pub mod chatops;
pub mod escalation;
pub mod fakes;
pub mod faults;
pub mod http;
pub mod incidents;
pub mod nats;
pub mod notifier;
pub mod ports;
pub mod remediation;
pub mod smtp;
pub mod tocsin;

pub use nats::{NatsCluster, NatsDomain, NatsServer};
pub use tocsin::TocsinHarness;

/// Token the harness configures for ingest.
pub const TEST_TOKEN: &str = "test-token-0123456789abcdef";

/// The value of the metric line `name` (with its labels, as
/// `/metrics` prints them: `foo_total{stage="save"}`) in `/metrics` text.
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Asserts that each of `stages` of a service's busy metric (`metric`, as
/// `<metric>{stage="<stage>"}` in the `/metrics` text `m`) counted some
/// time, and less than a minute; `during` says what ran, for the message.
pub fn assert_busy_stages_counted(m: &str, metric: &str, stages: &[&str], during: &str) {
    for stage in stages {
        let name = format!("{metric}{{stage=\"{stage}\"}}");
        let seconds =
            metric_value(m, &name).unwrap_or_else(|| panic!("no {name} in /metrics:\n{m}"));
        assert!(
            seconds > 0.0 && seconds < 60.0,
            "{stage}: {seconds} s for {during}"
        );
    }
}

/// SIGTERM to `child` (a process's clean shutdown), then waits for it to exit.
pub fn terminate(mut child: std::process::Child) {
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
}

/// Installs a test log subscriber once (`TOCSIN_TEST_LOG=debug` to see logs).
pub fn init_logs() {
    tocsin_runtime::install_crypto();
    let filter = std::env::var("TOCSIN_TEST_LOG").unwrap_or_else(|_| "warn".into());
    tocsin_runtime::telemetry::init_tracing(tocsin_runtime::telemetry::LogFormat::Human, &filter);
}

/// Reads `s` until the server closes it (EOF or reset), then adds one to
/// `closed`: how the connection tests see a server let go of a client.
pub fn count_when_closed(
    mut s: tokio::net::TcpStream,
    closed: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use tokio::io::AsyncReadExt;
    tokio::spawn(async move {
        let mut buf = [0u8; 512];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        closed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    });
}

/// For a test that measures its own process (its RSS, its open files):
/// all tests of a binary share one process, so such a test runs itself
/// again alone, in a child process of the test binary. Call it first with
/// the test's path (`module::test_name`, without the binary's name):
/// returns true in the child, which goes on with the test; in the parent it
/// waits for the child, panics if it failed, and returns false.
pub fn in_own_process(test: &str) -> bool {
    if std::env::var_os("TOCSIN_TEST_ALONE").is_some() {
        return true;
    }
    let test = test.split_once("::").map_or(test, |(_, rest)| rest);
    let status = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env("TOCSIN_TEST_ALONE", "1")
        .status()
        .expect("run the test in a process of its own");
    assert!(status.success(), "{test} failed in its own process");
    false
}

/// A process's resident memory, from `/proc/<pid>/status`: `VmRSS`
/// (resident now) and `VmHWM` (the peak, which writing `5` to
/// `/proc/self/clear_refs` resets), in KiB.
#[derive(Clone, Copy, Debug)]
pub struct Memory {
    pub rss_kib: u64,
    pub hwm_kib: u64,
}

impl Memory {
    /// Of this process (None) or `pid`; None where /proc does not say.
    pub fn read(pid: Option<u32>) -> Option<Memory> {
        let path = match pid {
            Some(p) => format!("/proc/{p}/status"),
            None => "/proc/self/status".to_string(),
        };
        let text = std::fs::read_to_string(path).ok()?;
        Some(Memory {
            rss_kib: proc_kib(&text, "VmRSS")?,
            hwm_kib: proc_kib(&text, "VmHWM")?,
        })
    }

    /// Of this process, for tests that measure the memory of what they
    /// run in-process, alone ([`in_own_process`]).
    fn of_this_process() -> Memory {
        Memory::read(None).expect("VmRSS and VmHWM in /proc/self/status")
    }
}

/// The KiB of a `<name>: <n> kB` line of a /proc file (`status`,
/// `smaps_rollup`).
pub fn proc_kib(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        l.strip_prefix(name)?
            .strip_prefix(':')?
            .trim()
            .strip_suffix("kB")?
            .trim()
            .parse()
            .ok()
    })
}

/// This process's resident memory now, in bytes (`VmRSS`).
pub fn rss_bytes() -> u64 {
    Memory::of_this_process().rss_kib * 1024
}

/// This process's peak resident memory, in bytes (`VmHWM`).
pub fn peak_rss_bytes() -> u64 {
    Memory::of_this_process().hwm_kib * 1024
}

/// How long [`eventually`] waits by default: long enough for a loaded CI
/// machine, short enough that a hang fails the test rather than CI.
pub const EVENTUALLY: std::time::Duration = std::time::Duration::from_secs(20);

/// Polls `check` (every 20 ms) until it returns `Ok`, at most `limit`;
/// on timeout returns its last `Err`. The one polling loop of the tests:
/// it waits for something to happen, never to prove that it did not (see
/// [`TocsinHarness::settled`] for that).
pub async fn eventually_within<T, E, F, Fut>(
    limit: std::time::Duration,
    mut check: F,
) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match check().await {
            Ok(v) => return Ok(v),
            Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
        }
    }
}

/// [`eventually_within`] [`EVENTUALLY`], panicking with `what` and the last
/// error.
pub async fn eventually<T, E, F, Fut>(what: &str, check: F) -> T
where
    E: std::fmt::Debug,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    match eventually_within(EVENTUALLY, check).await {
        Ok(v) => v,
        Err(e) => panic!("{what} did not happen within {EVENTUALLY:?}; last seen: {e:?}"),
    }
}

/// The random numbers of a randomized test (kill points, delays): one per
/// test, seeded from `TOCSIN_TEST_SEED` when set, else from the time. The
/// seed is printed first, so a failure can be re-run exactly:
/// `TOCSIN_TEST_SEED=<seed> cargo test <test>`.
pub struct TestRng(u64);

impl TestRng {
    pub fn new(test: &str) -> TestRng {
        let seed = std::env::var("TOCSIN_TEST_SEED")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or_else(|| {
                let t = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default();
                (t.as_nanos() as u64) | 1
            });
        eprintln!("{test}: random seed {seed} (re-run with TOCSIN_TEST_SEED={seed})");
        TestRng(seed.max(1))
    }

    /// The next number (xorshift64*).
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A generator of its own for another task, drawn from this one (so
    /// the whole run still follows from the one printed seed).
    pub fn fork(&mut self) -> TestRng {
        TestRng(self.next_u64() | 1)
    }

    /// A number in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}
