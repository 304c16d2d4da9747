//! The servers besides ingest and chat-ops also take connections from
//! outside: every process's admin server (`/readyz`, `/metrics`, scraped
//! and probed over the network) and escalation's calendar server (fetched
//! by calendar apps). Connections an outsider opens and leaves idle must
//! neither stay open for good nor use up the process's file descriptors:
//! when they did, `/readyz` could accept nothing (a probe then restarts the
//! pod) and the calendar answered no one.

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use tocsin_tests::{eventually_within, NatsServer};
use tokio::net::TcpStream;

use crate::support::{free_port, Proc};

/// The escalation process's open-file limit (soft and hard).
const OPEN_FILES: u64 = 1_024;
/// Idle connections opened to the calendar server: more than the process
/// may hold files.
const CALENDAR_FLOOD: usize = 1_500;
/// Idle connections opened to the admin server.
const ADMIN_FLOOD: usize = 300;
/// The calendars' secret (`escalation.calendar_token`).
const CALENDAR_TOKEN: &str = "calendar-test-token-0123";

/// Opens up to `n` connections to `port` that never send a byte; each is
/// counted in `closed` once the server closes it. Returns how many
/// connected (it stops at the first that does not within a second: the
/// server's backlog is full).
async fn flood(port: u16, n: usize, closed: &Arc<AtomicUsize>) -> usize {
    let mut connected = 0;
    for _ in 0..n {
        let Ok(Ok(s)) = tokio::time::timeout(
            Duration::from_secs(1),
            TcpStream::connect(("127.0.0.1", port)),
        )
        .await
        else {
            break;
        };
        connected += 1;
        tocsin_tests::count_when_closed(s, closed.clone());
    }
    connected
}

/// Status of `GET url`, or why there was none within 3 s.
async fn status(client: &reqwest::Client, url: &str) -> Result<u16, String> {
    match tokio::time::timeout(Duration::from_secs(3), client.get(url).send()).await {
        Ok(Ok(r)) => Ok(r.status().as_u16()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer within 3 s".into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_to_the_admin_and_calendar_servers_are_capped_and_closed() {
    // This end holds every flood connection too.
    let needed = 2 * (CALENDAR_FLOOD + ADMIN_FLOOD) as u64 + 1_000;
    let got = rlimit::increase_nofile_limit(needed).expect("raise RLIMIT_NOFILE");
    assert!(
        got >= needed,
        "RLIMIT_NOFILE is {got}, this test needs {needed}"
    );

    let nats = NatsServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let calendar = free_port();
    let config = dir.path().join("tocsin.yaml");
    std::fs::write(
        &config,
        format!(
            "nats:\n  url: {url}\n\
             escalation:\n  data_dir: {data}/escalation\n  calendar_listen: 127.0.0.1:{calendar}\n  calendar_token: {CALENDAR_TOKEN}\n\
             \x20 route: {{policy: primary}}\n\
             \x20 policies:\n    - name: primary\n      levels:\n        - targets: [{{schedule: primary}}]\n\
             \x20 schedules:\n    - name: primary\n      timezone: UTC\n      layers:\n\
             \x20       - {{name: weekly, participants: [alice, bob], rotation: weekly, handoff: '09:00', start: 2026-01-05}}\n\
             \x20 users:\n    - {{name: alice, email: alice@example.com}}\n    - {{name: bob, email: bob@example.com}}\n",
            url = nats.url(),
            data = dir.path().display(),
        ),
    )
    .unwrap();
    let mut escalation =
        Proc::start_with_open_files(&config, dir.path(), &["escalation"], OPEN_FILES);
    escalation.ready().await;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let readyz = format!("http://127.0.0.1:{}/readyz", escalation.admin);
    let feed = format!("http://127.0.0.1:{calendar}/calendars/primary.ics?token={CALENDAR_TOKEN}");
    assert_eq!(
        status(&client, &feed).await,
        Ok(200),
        "{}",
        escalation.log_text()
    );
    let no_token = format!("http://127.0.0.1:{calendar}/calendars/primary.ics");
    assert_eq!(status(&client, &no_token).await, Ok(401));

    let closed = Arc::new(AtomicUsize::new(0));
    let opened = flood(calendar, CALENDAR_FLOOD, &closed).await
        + flood(escalation.admin, ADMIN_FLOOD, &closed).await;
    println!("{opened} idle connections open or queued");

    // While the flood is open, both servers still answer.
    for url in [&readyz, &feed] {
        let got = eventually_within(Duration::from_secs(10), || async {
            match status(&client, url).await {
                Ok(200) => Ok(200),
                other => Err(other),
            }
        })
        .await;
        assert_eq!(
            got,
            Ok(200),
            "GET {url} with {opened} idle connections open:\n{}",
            escalation.log_text()
        );
    }

    // And the server closes every one of them: the ones over the cap at
    // once, the rest when they have been idle too long.
    let all_closed = eventually_within(Duration::from_secs(60), || async {
        let n = closed.load(Ordering::Relaxed);
        if n >= opened {
            Ok(n)
        } else {
            Err(n)
        }
    })
    .await;
    assert_eq!(
        all_closed,
        Ok(opened),
        "idle connections closed by the server, of {opened}"
    );
    assert_eq!(status(&client, &readyz).await, Ok(200));
    // Whoever runs it is told, once, naming each server.
    let log = escalation.log_text();
    for server in ["admin", "calendar"] {
        let warned = format!("server=\"{server}\"");
        assert_eq!(
            log.lines()
                .filter(|l| l.contains("WARN") && l.contains(&warned))
                .count(),
            1,
            "one WARN naming {server}:\n{log}"
        );
    }
}
