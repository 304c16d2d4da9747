//! # tocsin-tests
//!
//! The test kit every Tocsin test uses, the end-to-end tests (`tests/`), and
//! the benchmark harness (`src/bin/bench.rs`).
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
//! - [`smtp`]: [`smtp::SmtpSink`], a real SMTP server (aiosmtpd) per test,
//!   with the messages it received parsed into [`smtp::Mail`].

pub mod bus;
pub mod chatops;
pub mod escalation;
pub mod fakes;
pub mod http;
pub mod incidents;
pub mod nats;
pub mod notifier;
pub mod remediation;
pub mod smtp;
pub mod tocsin;

pub use nats::NatsServer;
pub use tocsin::TocsinHarness;

/// Token the harness configures for ingest.
pub const TEST_TOKEN: &str = "test-token-0123456789abcdef";

/// Installs a test log subscriber once (`TOCSIN_TEST_LOG=debug` to see logs).
pub fn init_logs() {
    tocsin_runtime::install_crypto();
    let filter = std::env::var("TOCSIN_TEST_LOG").unwrap_or_else(|_| "warn".into());
    tocsin_runtime::telemetry::init_tracing(tocsin_runtime::telemetry::LogFormat::Human, &filter);
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
