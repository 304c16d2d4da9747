//! Promise 2: sled is a cache of the INCIDENTS stream. A missing or corrupt
//! store is rebuilt from the stream at start, never fatal, and the service
//! then goes on exactly where the log says.

use std::sync::Arc;

use async_nats::jetstream;
use jiff::{SignedDuration, Timestamp};
use tocsin_incidents::{clock::ManualClock, IncidentsConfig};
use tocsin_proto::{
    incident::{IncidentSummary, LogEntry},
    query::ListIncidents,
    subjects::{STREAM_ALERTS, STREAM_DEADLETTER, STREAM_INCIDENTS},
    AlertStatus,
};
use tocsin_runtime::{
    admin::Metrics,
    config::ConfigPath,
    nats::NatsConfig,
    progress::Progress,
    streams::{ensure_streams, JetStreamConfig},
    CancellationToken,
};
use tocsin_tests::{
    eventually_within,
    incidents::{alert, list, log, publish_alert, try_publish_alerts, wait_for},
    NatsServer,
};

async fn run_until_stopped(
    url: &str,
    dir: &std::path::Path,
) -> (tokio::task::JoinHandle<()>, CancellationToken, Progress) {
    let metrics = Metrics::new();
    let progress = Progress::new();
    let watermark = progress.of("incidents");
    let client = tocsin_runtime::nats::connect(&NatsConfig::for_url(url), "rebuild-test", &metrics)
        .await
        .unwrap();
    let js = jetstream::new(client.clone());
    let stop = CancellationToken::new();
    let cfg = IncidentsConfig {
        data_dir: Some(ConfigPath(dir.to_path_buf())),
        ..Default::default()
    };
    let token = stop.clone();
    let handle = tokio::spawn(async move {
        let clock = Arc::new(ManualClock::new(Timestamp::now()));
        let _ = client;
        let ctx = tocsin_runtime::context::ServiceContext {
            metrics,
            shutdown: token,
            watermark,
            ..tocsin_runtime::context::ServiceContext::standalone(js, clock)
        };
        tocsin_incidents::run(cfg, &ctx, None)
            .await
            .expect("service ran");
    });
    (handle, stop, progress)
}

/// Waits until this run of the service has handled every alert on ALERTS
/// (its decisions written), so anything it would decide twice is on the
/// log by now.
async fn handled_every_alert(js: &jetstream::Context, progress: &Progress) {
    let last = tocsin_runtime::streams::last_sequence(js, STREAM_ALERTS)
        .await
        .unwrap();
    progress
        .wait_until("incidents", std::time::Duration::from_secs(30), |m| {
            m.read(STREAM_ALERTS) >= last
        })
        .await
        .expect("the incidents service handles every alert");
}

fn t(s: i64) -> Timestamp {
    "2026-04-01T12:00:00Z".parse::<Timestamp>().unwrap() + SignedDuration::from_secs(s)
}

/// A JetStream context on `client`, Tocsin's streams made.
async fn streams_on(client: &async_nats::Client) -> jetstream::Context {
    let js = jetstream::new(client.clone());
    ensure_streams(&js, &JetStreamConfig::default())
        .await
        .unwrap();
    js
}

/// Every incident listed, most recent first.
async fn all_listed(client: &async_nats::Client) -> Vec<IncidentSummary> {
    list(
        client,
        ListIncidents {
            limit: Some(1000),
            ..Default::default()
        },
    )
    .await
}

/// Each incident's number and `group` label, in the order given.
fn numbered(incidents: &[IncidentSummary]) -> Vec<(u64, String)> {
    incidents
        .iter()
        .map(|i| (i.number, i.labels["group"].clone()))
        .collect()
}

/// The service running on NATS whose stream holds `n` incidents
/// (`old0`...), listed; its store in a temporary folder, `js` on the
/// streams NATS has now.
struct Running {
    _data: tempfile::TempDir,
    nats: NatsServer,
    js: jetstream::Context,
    svc: tokio::task::JoinHandle<()>,
    stop: CancellationToken,
}

impl Running {
    async fn with_old(n: i64) -> Running {
        let data = tempfile::tempdir().unwrap();
        let dir = data.path().join("incidents");
        let nats = NatsServer::start().await;
        let client = nats.client().await;
        let js = streams_on(&client).await;
        for g in 0..n {
            publish_in_group(&js, "Lost", &format!("old{g}"), g).await;
        }
        let (svc, stop, _) = run_until_stopped(&nats.url(), &dir).await;
        wait_for(&client, &format!("{n} incidents"), |all| {
            all.len() == n as usize
        })
        .await;
        Running {
            _data: data,
            nats,
            js,
            svc,
            stop,
        }
    }

    /// NATS loses its storage while the service runs (stopped, its store
    /// folder removed, restarted); a client and Tocsin's new streams.
    async fn lose_the_stream(&mut self) -> (async_nats::Client, jetstream::Context) {
        self.nats.stop();
        std::fs::remove_dir_all(self.nats.store_dir()).unwrap();
        self.nats.restart().await;
        let client = self.nats.client().await;
        let js = streams_on(&client).await;
        (client, js)
    }

    async fn stop(self) {
        self.stop.cancel();
        self.svc.await.unwrap();
    }
}

/// A firing alert `alertname` of group `group` (both grouped on), at t(s).
async fn publish_in_group(js: &jetstream::Context, alertname: &str, group: &str, s: i64) {
    publish_alert(
        js,
        alert(
            &[("alertname", alertname), ("group", group)],
            &["alertname", "group"],
            AlertStatus::Firing,
            t(s),
        ),
        t(s),
    )
    .await;
}

#[tokio::test]
async fn a_missing_or_corrupt_store_is_rebuilt_from_the_stream() {
    let nats = NatsServer::start().await;
    let client = nats.client().await;
    let js = streams_on(&client).await;
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().join("incidents");

    for g in 0..20 {
        publish_in_group(&js, "Rebuild", &format!("g{g}"), g).await;
    }
    let (svc, stop, _) = run_until_stopped(&nats.url(), &dir).await;
    let before = wait_for(&client, "20 incidents", |all| all.len() == 20).await;
    stop.cancel();
    svc.await.unwrap();

    // 1. Corrupt every file of the store.
    let mut corrupted = 0;
    for entry in walk(&dir) {
        std::fs::write(&entry, b"\xde\xad\xbe\xef not a sled file").unwrap();
        corrupted += 1;
    }
    assert!(corrupted > 0);
    let (svc, stop, _) = run_until_stopped(&nats.url(), &dir).await;
    let after = wait_for(&client, "20 incidents again", |all| all.len() == 20).await;
    assert_eq!(after, before, "rebuilt from the stream");
    // It goes on where the log says: a new group gets the next number, and
    // old alerts are not decided again (no new entries for them).
    let entries = log(&js).await.len();
    publish_in_group(&js, "Rebuild", "new", 100).await;
    let all = wait_for(&client, "21 incidents", |all| all.len() == 21).await;
    assert_eq!(all[0].number, 21);
    assert_eq!(log(&js).await.len(), entries + 1);
    stop.cancel();
    svc.await.unwrap();

    // 2. Remove the store altogether.
    std::fs::remove_dir_all(&dir).unwrap();
    let (svc, stop, progress) = run_until_stopped(&nats.url(), &dir).await;
    wait_for(&client, "21 incidents after losing the store", |all| {
        all.len() == 21
    })
    .await;
    handled_every_alert(&js, &progress).await;
    assert_eq!(log(&js).await.len(), entries + 1, "nothing decided twice");
    let listed = all_listed(&client).await;
    assert_eq!(&listed[1..], &after[..], "the same 20 old incidents");
    stop.cancel();
    svc.await.unwrap();

    // 3. A store sled refuses to open (a file where its folder should be).
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::write(&dir, b"in the way").unwrap();
    let (svc, stop, _) = run_until_stopped(&nats.url(), &dir).await;
    let again = wait_for(&client, "21 incidents after an unopenable store", |all| {
        all.len() == 21
    })
    .await;
    assert_eq!(again, listed);
    assert!(dir.is_dir(), "the store was recreated");
    stop.cancel();
    svc.await.unwrap();
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// The stream is the record: a store saved against another NATS (a new
/// server, or one whose streams were reset) holds incidents and silences
/// the stream does not. The service starts over from the stream, and what
/// it keeps in the store from then on is the stream's alone: no incident or
/// silence of the old store comes back at the next start, and numbers go
/// on from the stream's.
#[tokio::test]
async fn a_store_ahead_of_a_new_stream_keeps_nothing_the_stream_does_not_hold() {
    use tocsin_proto::{
        command::Action,
        query::QueryReply,
        silence::{MatchOp, Matcher, Silence},
        subjects::query,
    };
    use tocsin_tests::incidents::{ask, command};

    let data = tempfile::tempdir().unwrap();
    let dir = data.path().join("incidents");
    let silences = |client: async_nats::Client| async move {
        match ask::<_, QueryReply>(&client, query::LIST_SILENCES, &serde_json::Map::new()).await {
            QueryReply::Silences { silences, .. } => {
                silences.into_iter().map(|s| s.id).collect::<Vec<String>>()
            }
            other => panic!("unexpected answer {other:?}"),
        }
    };

    // The first NATS: five incidents and a silence, all in the store.
    {
        let nats = NatsServer::start().await;
        let client = nats.client().await;
        let js = streams_on(&client).await;
        for g in 0..5 {
            publish_in_group(&js, "Moved", &format!("old{g}"), g).await;
        }
        let (svc, stop, _) = run_until_stopped(&nats.url(), &dir).await;
        wait_for(&client, "5 incidents", |all| all.len() == 5).await;
        let silence = Silence {
            id: "old-window".into(),
            matchers: vec![Matcher {
                name: "group".into(),
                op: MatchOp::Eq,
                value: "new9".into(),
            }],
            starts_at: t(0),
            ends_at: t(86_400),
            created_by: "alice".into(),
            comment: "made against the first NATS".into(),
            recurrence: None,
        };
        command(
            &client,
            &js,
            "alice",
            Action::CreateSilence { silence },
            t(10),
        )
        .await;
        assert_eq!(silences(client.clone()).await, ["old-window"]);
        stop.cancel();
        svc.await.unwrap();
    }

    // A new NATS with two alerts of its own: its INCIDENTS stream is behind
    // the store.
    let nats = NatsServer::start().await;
    let client = nats.client().await;
    let js = streams_on(&client).await;
    let publish = |g: i64| {
        let js = js.clone();
        async move { publish_in_group(&js, "Moved", &format!("new{g}"), 100 + g).await }
    };
    publish(0).await;
    publish(1).await;
    let (svc, stop, progress) = run_until_stopped(&nats.url(), &dir).await;
    wait_for(&client, "the new stream's 2 incidents", |all| {
        all.len() == 2
    })
    .await;
    handled_every_alert(&js, &progress).await;
    stop.cancel();
    svc.await.unwrap();

    // Started again against it: only what the new stream holds.
    let (svc, stop, progress) = run_until_stopped(&nats.url(), &dir).await;
    handled_every_alert(&js, &progress).await;
    let listed = all_listed(&client).await;
    let seen = numbered(&listed);
    assert_eq!(
        seen,
        [(2, "new1".to_string()), (1, "new0".to_string())],
        "the new stream's incidents, none of the old store's"
    );
    assert_eq!(
        silences(client.clone()).await,
        Vec::<String>::new(),
        "no silence of the old store"
    );
    // The next incident takes the next number of the stream's, and no
    // other incident bears it.
    publish(2).await;
    let all = wait_for(&client, "3 incidents", |all| all.len() == 3).await;
    let seen = numbered(&all);
    assert_eq!(
        seen,
        [
            (3, "new2".to_string()),
            (2, "new1".to_string()),
            (1, "new0".to_string())
        ]
    );
    stop.cancel();
    svc.await.unwrap();
}

/// The same while the service runs: NATS comes back with its storage lost
/// (a server without a persistent volume, restarted). The service starts
/// over from the new stream without a restart of its own: it lists only
/// the new stream's incidents, numbered from 1.
#[tokio::test]
async fn a_stream_lost_while_running_is_followed_from_its_start() {
    let mut run = Running::with_old(5).await;
    let (client, js) = run.lose_the_stream().await;
    publish_in_group(&js, "Lost", "new0", 100).await;
    publish_in_group(&js, "Lost", "new1", 101).await;
    let all = wait_for(&client, "the new stream's 2 incidents", |all| {
        all.len() == 2
    })
    .await;
    let seen = numbered(&all);
    assert_eq!(
        seen,
        [(2, "new1".to_string()), (1, "new0".to_string())],
        "the new stream's incidents, none of the old"
    );
    run.stop().await;
}

/// A batch that failed on the old stream made the service take the alerts
/// up to its ALERTS sequence one at a time (the careful way). On a new
/// stream those sequences are new alerts: they must go the usual way, a
/// request's alerts that join one incident written as one entry, not one
/// entry each.
#[tokio::test]
async fn a_failed_batch_on_a_lost_stream_does_not_slow_the_new_one() {
    let mut run = Running::with_old(10).await;
    let js = run.js.clone();

    // A real refusal: INCIDENTS takes no entry now, so the next alert's
    // batch fails and it is dead-lettered the careful way.
    let mut cfg = tocsin_tests::bus::stream_config(&js, STREAM_INCIDENTS).await;
    cfg.max_message_size = 64;
    js.update_stream(cfg).await.unwrap();
    publish_in_group(&js, "Lost", "refused", 10).await;
    eventually_within(std::time::Duration::from_secs(60), || async {
        match tocsin_tests::bus::count(&js, STREAM_DEADLETTER).await {
            0 => Err(()),
            _ => Ok(()),
        }
    })
    .await
    .expect("the refused alert is dead-lettered");

    let (client, js) = run.lose_the_stream().await;
    let three: Vec<_> = (0..3)
        .map(|i| {
            alert(
                &[
                    ("alertname", "Lost"),
                    ("group", "new"),
                    ("host", &format!("h{i}")),
                ],
                &["alertname", "group"],
                AlertStatus::Firing,
                t(100),
            )
        })
        .collect();
    let seq = try_publish_alerts(&js, three, t(100)).await.unwrap();
    assert_eq!(seq, 1, "the new stream's first message");
    let all = wait_for(
        &client,
        "the new stream's incident with its 3 alerts",
        |all| all.len() == 1 && all[0].alerts_total == 3,
    )
    .await;
    assert_eq!(numbered(&all), [(1, "new".to_string())]);
    let kinds: Vec<&str> = log(&js)
        .await
        .iter()
        .map(|(_, e)| match e {
            LogEntry::Incident(ev) => ev.kind.name(),
            LogEntry::Silence { .. } => "silence",
        })
        .collect();
    assert_eq!(
        kinds,
        ["opened"],
        "the request's 3 alerts joining one incident are one entry"
    );
    run.stop().await;
}
