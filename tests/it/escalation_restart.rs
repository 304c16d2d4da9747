//! Promise 3, "timers survive": 2,500 incidents with pending escalation
//! steps; the escalation service is killed (no drain) at arbitrary moments
//! while the clock advances, and restarted. A minute's steps are more than
//! two of the service's chunks of 1,024, so kills land while one chunk's
//! messages wait for their acks and the next is fired. Afterwards every expected page
//! was published (once alone at most; a burst's pages go several to a
//! message, and a page fired again after a kill in another grouping may
//! come twice, which the notifier's delivery records make one delivery),
//! and none for an incident acknowledged before its step was due.

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use async_nats::{jetstream, HeaderMap};
use jiff::{SignedDuration, Timestamp};
use tocsin_escalation::EscalationConfig;
use tocsin_proto::{
    codec,
    incident::{
        Actor, Cause, EventKind, IncidentEvent, IncidentStatus, IncidentSummary, LogEntry, Severity,
    },
    notify::Page,
    subjects::{headers, is_notify_batch, STREAM_INCIDENTS, STREAM_NOTIFY},
    Envelope, Labels,
};
use tocsin_runtime::clock::{Clock, ManualClock};
use tocsin_runtime::{
    admin::{Health, Metrics},
    config::ConfigPath,
    nats::NatsConfig,
    progress::Progress,
    streams::{ensure_streams, JetStreamConfig},
    CancellationToken,
};
use tocsin_tests::{bus, eventually_within, faults::NatsProxy, NatsServer};

const N: u32 = 2_500;

const POLICY: &str = "
route: {policy: p}
policies:
  - name: p
    levels:
      - {targets: [{user: a}], delay: 5m}
      - {targets: [{user: b}], delay: 10m}
      - {targets: [{user: c}]}
users:
  - {name: a, email: a@example.com}
  - {name: b, email: b@example.com}
  - {name: c, email: c@example.com}
";

fn t0() -> Timestamp {
    "2026-05-04T08:00:00Z".parse().unwrap()
}

fn summary(i: u32, status: IncidentStatus) -> IncidentSummary {
    IncidentSummary {
        severity: Severity::Medium,
        status,
        labels: Labels::from([("alertname".to_string(), "R".to_string())]),
        alerts_firing: 1,
        alerts_total: 1,
        ..IncidentSummary::new(
            uuid::Uuid::from_u128(0x1000_0000 + i as u128),
            i as u64 + 1,
            format!("k{i}"),
            format!("incident {i}"),
            t0(),
        )
    }
}

async fn publish_event(
    js: &jetstream::Context,
    i: u32,
    kind: EventKind,
    status: IncidentStatus,
    at: Timestamp,
) {
    let cause = format!("test-{i}-{}", status.as_str());
    let (subject, h, bytes) = message(i, kind, status, at, cause);
    js.publish_with_headers(subject, h, bytes)
        .await
        .unwrap()
        .await
        .unwrap();
}

/// Incident `i` opens at t0.
async fn publish_opened(js: &jetstream::Context, i: u32) {
    let opened = EventKind::opened(dummy_alert());
    publish_event(js, i, opened, IncidentStatus::Triggered, t0()).await;
}

/// An INCIDENTS entry about incident `i` caused by timer `cause` (its
/// message id), as published: subject, headers, payload.
fn message(
    i: u32,
    kind: EventKind,
    status: IncidentStatus,
    at: Timestamp,
    cause: String,
) -> (String, HeaderMap, bytes::Bytes) {
    let entry = LogEntry::Incident(IncidentEvent {
        kind,
        at,
        actor: Some(Actor::new("test", "test")),
        cause: Cause::Timer { id: cause },
        incident: summary(i, status),
    });
    let mut h = HeaderMap::new();
    h.insert(headers::MSG_ID, entry.msg_id().as_str());
    let bytes = codec::encode(&Envelope::new("test", at, entry.clone())).unwrap();
    (entry.subject(), h, bytes.into())
}

/// An admin JetStream context on `nats`, with Tocsin's streams made.
async fn streams_on(nats: &NatsServer) -> jetstream::Context {
    let js = jetstream::new(nats.client().await);
    ensure_streams(&js, &JetStreamConfig::default())
        .await
        .unwrap();
    js
}

async fn start(
    url: &str,
    dir: &std::path::Path,
    clock: Arc<ManualClock>,
    progress: &Progress,
) -> (tokio::task::JoinHandle<()>, async_nats::Client) {
    start_with(url, dir, clock, progress, POLICY).await
}

/// [`start`] with the escalation section `policy`.
async fn start_with(
    url: &str,
    dir: &std::path::Path,
    clock: Arc<ManualClock>,
    progress: &Progress,
    policy: &str,
) -> (tokio::task::JoinHandle<()>, async_nats::Client) {
    let metrics = Metrics::new();
    let client = tocsin_runtime::nats::connect(&NatsConfig::for_url(url), "esc-restart", &metrics)
        .await
        .unwrap();
    let js = jetstream::new(client.clone());
    let mut cfg: EscalationConfig = serde_yaml_ng::from_str(policy).unwrap();
    cfg.data_dir = Some(ConfigPath(dir.to_path_buf()));
    let watermark = progress.of("escalation");
    let handle = tokio::spawn(async move {
        let ctx = tocsin_runtime::context::ServiceContext {
            metrics,
            watermark,
            ..tocsin_runtime::context::ServiceContext::standalone(js, clock)
        };
        tocsin_escalation::run(cfg, &ctx, None).await.unwrap();
    });
    (handle, client)
}

/// The pages the policy calls for: level 0 at once, level 1 at 5m, level 2
/// at 15m; incidents acknowledged at 2m get level 0 only, at 7m levels 0-1.
fn expected() -> BTreeSet<(u32, u32)> {
    let mut out = BTreeSet::new();
    for i in 0..N {
        let levels = match i % 3 {
            0 => 2,
            1 => 1,
            _ => 3,
        };
        for l in 0..levels {
            out.insert((i, l));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_are_exactly_those_due_across_kills_and_restarts() {
    tocsin_tests::init_logs();
    let nats = NatsServer::start().await;
    let js = streams_on(&nats).await;
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(t0()));
    for i in 0..N {
        publish_opened(&js, i).await;
    }

    let progress = Progress::new();
    let mut rng = tocsin_tests::TestRng::new("escalation_restart: kill points");
    let mut next = move || rng.next_u64();
    let (mut svc, mut conn) = start(&nats.url(), dir.path(), clock.clone(), &progress).await;
    for minute in 0..=20i64 {
        let now = t0() + SignedDuration::from_mins(minute);
        // Acknowledgements, published before the clock passes them.
        for (ack_minute, residue) in [(2, 1), (7, 0)] {
            if minute == ack_minute {
                for i in (0..N).filter(|i| i % 3 == residue) {
                    publish_event(
                        &js,
                        i,
                        EventKind::Acknowledged,
                        IncidentStatus::Acknowledged,
                        now,
                    )
                    .await;
                }
            }
        }
        clock.set(now);
        // The service keeps up with the clock before it moves on (a real
        // minute is long); kills land mid-firing and are caught up after.
        let due_so_far = expected_by(minute);
        if [0, 5, 6, 15, 16].contains(&minute) {
            // Kill it somewhere in the middle of firing (or just after).
            tokio::time::sleep(Duration::from_millis(next() % 250)).await;
            svc.abort();
            let _ = svc.await;
            let _ = tokio::time::timeout(Duration::from_secs(2), conn.drain()).await;
            (svc, conn) = start(&nats.url(), dir.path(), clock.clone(), &progress).await;
        }
        for _ in 0..1200 {
            if distinct_pages(&js).await >= due_so_far {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            distinct_pages(&js).await >= due_so_far,
            "minute {minute}: the due pages never came"
        );
    }

    let want = expected();
    for _ in 0..600 {
        if distinct_pages(&js).await >= want.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Settled: every INCIDENTS entry applied and every step due by now
    // fired (its page acknowledged by JetStream), so none is still to come.
    let last = tocsin_runtime::streams::last_sequence(&js, STREAM_INCIDENTS)
        .await
        .unwrap();
    let now = clock.now();
    progress
        .wait_until("escalation", Duration::from_secs(30), |m| {
            m.read(STREAM_INCIDENTS) >= last && m.timers_reached(now)
        })
        .await
        .expect("escalation settles");
    let stored = bus::read_pages(&js).await;
    svc.abort();

    // A page on its own has its id as the message id, so JetStream drops
    // it a second time; only a copy in a message of several may repeat it.
    let mut alone: BTreeSet<&str> = BTreeSet::new();
    for p in &stored {
        if !is_notify_batch(&p.subject) {
            assert!(
                alone.insert(p.envelope.body.id.as_str()),
                "page {} published alone twice",
                p.envelope.body.id
            );
        }
    }
    let mut seen: BTreeSet<&str> = BTreeSet::new();
    let got: Vec<&Page> = stored
        .iter()
        .map(|p| &p.envelope.body)
        .filter(|p| seen.insert(p.id.as_str()))
        .collect();
    let pages: BTreeSet<(u32, u32)> = got
        .iter()
        .map(|p| ((p.incident.number - 1) as u32, p.level))
        .collect();
    let missing: Vec<_> = want.difference(&pages).take(10).collect();
    let extra: Vec<_> = pages.difference(&want).take(10).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "missing {missing:?} extra {extra:?} (of {} expected, {} published)",
        want.len(),
        got.len()
    );
    // Each level fired when it was due (to the minute of the clock).
    for p in &got {
        let due = t0() + SignedDuration::from_mins([0, 5, 15][p.level as usize]);
        assert_eq!(p.due_at, due, "{}", p.id);
    }
    // Each page's timeline record is on COMMANDS (records go several to a
    // message; one fired again after a kill may come twice, in another
    // message, with its id: the incidents service applies it once).
    let recorded: BTreeSet<(u32, u32)> = bus::read_commands(&js)
        .await
        .into_iter()
        .map(|r| match r.envelope.body.action {
            tocsin_proto::command::Action::Paged {
                incident: tocsin_proto::command::IncidentRef::Id(id),
                level,
                ..
            } => ((id.as_u128() - 0x1000_0000) as u32, level),
            other => panic!("not a paged record: {other:?}"),
        })
        .collect();
    assert_eq!(
        recorded, want,
        "a page without its record, or a record without its page"
    );
}

/// How many pages are due by `minute`: level 0 at 0 for all, level 1 at 5
/// for those not acknowledged at 2, level 2 at 15 for those never acknowledged.
fn expected_by(minute: i64) -> usize {
    expected()
        .iter()
        .filter(|(_, level)| [0, 5, 15][*level as usize] <= minute)
        .count()
}

fn dummy_alert() -> tocsin_proto::incident::AlertInfo {
    let labels = Labels::from([("alertname".to_string(), "R".to_string())]);
    tocsin_proto::incident::AlertInfo {
        fingerprint: tocsin_proto::Fingerprint::from_labels(&labels),
        status: tocsin_proto::AlertStatus::Firing,
        labels,
        annotations: Labels::new(),
        starts_at: t0(),
        ends_at: None,
        generator_url: None,
        suppressed: None,
    }
}

/// Tracks in the store of the slow-load test: enough that reading them
/// takes longer than the lease TTL (1 s) in a test build.
const SLOW_TRACKS: u32 = 100_000;

/// Promise 3 at scale: a store that takes longer than the lease TTL to read
/// (a million pending timers take seconds) must not cost the instance its
/// lease. On one runtime thread a load done on it stops the lease's renewal
/// too: the instance lost the lease while it loaded, took it back, loaded
/// again, and never became ready. Read off the async runtime, the renewal
/// goes on and the instance becomes ready in the term it took.
#[tokio::test(flavor = "current_thread")]
async fn a_store_slower_to_read_than_the_lease_ttl_does_not_cost_the_lease() {
    use tocsin_escalation::{
        store::Store,
        track::{Key, Track, Tracks},
    };
    let nats = NatsServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let next = t0() + SignedDuration::from_hours(24);
    {
        let store = Store::open(dir.path()).unwrap();
        let mut tracks = Tracks::default();
        for i in 0..SLOW_TRACKS {
            let incident = summary(i, IncidentStatus::Triggered);
            let key: Key = (incident.id, "p".to_string());
            tracks.map.insert(
                key,
                Track {
                    incident,
                    policy: "p".into(),
                    level: 1,
                    repeat: 0,
                    next_at: Some(next),
                    pending: Vec::new(),
                    fired: Some((0, 0)),
                    renotify_at: None,
                    renotified: 0,
                    generation: 0,
                    held_from: None,
                    cause: None,
                    last_fired: Some((0, 0, 0)),
                    before: None,
                },
            );
        }
        let keys: Vec<Key> = tracks.map.keys().cloned().collect();
        store.save(&tracks, &keys, 0).unwrap();
        store.flush().await;
        let started = std::time::Instant::now();
        let (loaded, _) = store.load().unwrap();
        assert_eq!(loaded.count(), SLOW_TRACKS as usize);
        eprintln!(
            "reading the store of {SLOW_TRACKS} tracks took {:.2}s here (lease TTL 1s)",
            started.elapsed().as_secs_f64()
        );
    }

    let metrics = Metrics::new();
    let client =
        tocsin_runtime::nats::connect(&NatsConfig::for_url(nats.url()), "esc-slow", &metrics)
            .await
            .unwrap();
    let js = jetstream::new(client.clone());
    ensure_streams(&js, &JetStreamConfig::default())
        .await
        .unwrap();
    let mut cfg: EscalationConfig = serde_yaml_ng::from_str(POLICY).unwrap();
    cfg.data_dir = Some(ConfigPath(dir.path().to_path_buf()));
    cfg.lease_ttl = Some(tocsin_runtime::config::HumanDuration::secs(1));
    let (health, shutdown) = (Health::new(), CancellationToken::new());
    let service = {
        let (health, shutdown, metrics) = (health.clone(), shutdown.clone(), metrics.clone());
        tokio::spawn(async move {
            let ctx = tocsin_runtime::context::ServiceContext {
                metrics,
                health,
                shutdown,
                watermark: Progress::new().of("escalation"),
                ..tocsin_runtime::context::ServiceContext::standalone(
                    js,
                    Arc::new(ManualClock::new(t0())),
                )
            };
            tocsin_escalation::run(cfg, &ctx, None).await
        })
    };
    // Ready: active, its store read, caught up with INCIDENTS.
    let ready = tocsin_tests::eventually_within(Duration::from_secs(60), || {
        let (_, checks) = health.report();
        let ok = checks.get("escalation").map(String::as_str) == Some("ok");
        std::future::ready(if ok { Ok(()) } else { Err(checks) })
    })
    .await;
    if let Err(checks) = ready {
        panic!("escalation not ready within 60s: {checks:?}");
    }
    assert!(
        metrics
            .encode()
            .contains("tocsin_leader{role=\"escalation\"} 1"),
        "the active instance reports itself leader"
    );
    shutdown.cancel();
    service.await.unwrap().unwrap();
}

/// Entries that change no track (receipts, notes) write nothing, but the
/// stored cursor may not fall far behind because of them: a backlog of
/// receipts once left it 150,000 entries behind, which a restart after a
/// kill then read again (5 s). After 3,000 notes on an incident whose
/// track they do not change, a killed instance's store has its cursor
/// within 1,024 entries of the stream's end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_that_change_no_track_still_move_the_stored_cursor_along() {
    const NOTES: u32 = 3_000;
    let nats = NatsServer::start().await;
    let js = streams_on(&nats).await;
    let dir = tempfile::tempdir().unwrap();
    let progress = Progress::new();
    let clock = Arc::new(ManualClock::new(t0()));
    let (service, conn) = start(&nats.url(), dir.path(), clock, &progress).await;
    publish_opened(&js, 0).await;
    // Its first level pages at once; after that nothing is due for 5m.
    progress
        .wait_until("escalation", Duration::from_secs(30), |m| {
            m.read(STREAM_INCIDENTS) >= 1 && m.timers_reached(t0())
        })
        .await
        .expect("the first level fires");
    // Notes leave the incident as it was (its summary is the same).
    let mut acks = Vec::new();
    for n in 0..NOTES {
        let note = EventKind::NoteAdded {
            text: format!("note {n}"),
        };
        let (subject, h, bytes) = message(
            0,
            note,
            IncidentStatus::Triggered,
            t0(),
            format!("note-{n}"),
        );
        acks.push(js.publish_with_headers(subject, h, bytes).await.unwrap());
    }
    let mut last = 0;
    for a in acks {
        last = a.await.unwrap().sequence;
    }
    // Applied up to the last note, then killed (no clean stop).
    progress
        .wait_until("escalation", Duration::from_secs(60), |m| {
            m.read(STREAM_INCIDENTS) >= last
        })
        .await
        .expect("escalation applies every note");
    service.abort();
    let _ = service.await;
    let _ = tokio::time::timeout(Duration::from_secs(2), conn.drain()).await;
    let stored = tocsin_tests::eventually_within(Duration::from_secs(10), || {
        // The killed instance's tasks let the store go as they are dropped.
        std::future::ready(
            tocsin_escalation::store::Store::open(dir.path())
                .and_then(|s| s.load())
                .map(|(_, seq)| seq)
                .map_err(|e| e.to_string()),
        )
    })
    .await
    .expect("the store opens once the killed instance let it go");
    assert!(
        stored + 1024 >= last,
        "stored cursor {stored}, stream end {last}: a restart would read {} entries again",
        last - stored
    );
}

/// A burst of due steps sends its pages and its timeline records several
/// to a message: each message on NOTIFY and COMMANDS is a synced write,
/// and a message each made a burst cost two synced writes a page. Every
/// page and every record is there once, one record per page. The burst
/// is larger than the service's chunk of 1,024 due steps, whose tracks it
/// reads from its store on several threads at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_due_steps_sends_its_pages_and_timeline_records_together() {
    const BURST: u32 = 2_500;
    let nats = NatsServer::start().await;
    let js = streams_on(&nats).await;
    for i in 0..BURST {
        publish_opened(&js, i).await;
    }
    let last = tocsin_runtime::streams::last_sequence(&js, STREAM_INCIDENTS)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let progress = Progress::new();
    let clock = Arc::new(ManualClock::new(t0()));
    let (service, _conn) = start(&nats.url(), dir.path(), clock, &progress).await;
    progress
        .wait_until("escalation", Duration::from_secs(60), |m| {
            m.read(STREAM_INCIDENTS) >= last && m.timers_reached(t0())
        })
        .await
        .expect("every first level fires");
    service.abort();
    let pages = bus::read_pages(&js).await;
    let ids: BTreeSet<&str> = pages.iter().map(|p| p.envelope.body.id.as_str()).collect();
    assert_eq!(pages.len(), BURST as usize, "one page per due step");
    assert_eq!(ids.len(), BURST as usize, "each page once");
    let messages = bus::count_without_markers(&js, STREAM_NOTIFY).await;
    // Up to 16 pages a message; at most one part-full message a chunk.
    assert!(
        messages <= (BURST / 16 + 3) as u64,
        "{messages} messages on NOTIFY for {BURST} pages"
    );
    let records = bus::read_commands(&js).await;
    let incidents: BTreeSet<String> = records
        .iter()
        .map(|r| match &r.envelope.body.action {
            tocsin_proto::command::Action::Paged {
                incident, level: 0, ..
            } => incident.to_string(),
            other => panic!("not a first-level paged record: {other:?}"),
        })
        .collect();
    assert_eq!(records.len(), BURST as usize, "one record per page");
    assert_eq!(incidents.len(), BURST as usize, "one per incident");
    let messages = bus::count(&js, tocsin_proto::subjects::STREAM_COMMANDS).await;
    assert!(
        messages <= (BURST / 64) as u64,
        "{messages} messages on COMMANDS for {BURST} records"
    );
}

/// A chunk of fired steps is saved only once NOTIFY stored its pages, and
/// its timeline records are sent only then too: an instance that follows
/// INCIDENTS (a standby, or this one after a restart) takes a `paged`
/// record as "these pages were sent" and will not send them. The service
/// reaches NATS through a proxy that swallows its publishes to NOTIFY once
/// the first level has paged: the second level's pages are written and
/// never stored or acknowledged. Once the service sends one of them again
/// on its own (their acks timed out: it awaited them), no second-level
/// record is on COMMANDS. The service is killed then, and restarted
/// straight on the server: every second-level page comes. A service that
/// saved a chunk as fired before its pages were acknowledged would have
/// lost them; one that sent the records with the pages would have stored
/// records of pages that never were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steps_whose_pages_were_never_stored_fire_after_a_crash() {
    const BURST: u32 = 1_500;
    tocsin_tests::init_logs();
    let nats = NatsServer::start().await;
    let js = streams_on(&nats).await;
    for i in 0..BURST {
        publish_opened(&js, i).await;
    }
    let proxy = NatsProxy::start(nats.port()).await;
    let dir = tempfile::tempdir().unwrap();
    let progress = Progress::new();
    let clock = Arc::new(ManualClock::new(t0()));
    let (service, conn) = start(
        &proxy.url_for(&nats.url()),
        dir.path(),
        clock.clone(),
        &progress,
    )
    .await;
    wait_for("the first level's pages", || async {
        distinct_pages(&js).await >= BURST as usize
    })
    .await;

    proxy.swallow(&["tocsin.notify."]);
    clock.set(t0() + SignedDuration::from_mins(5));
    wait_for("a second-level page sent again on its own", || async {
        proxy
            .swallowed_subjects()
            .iter()
            .any(|s| !s.ends_with(".batch"))
    })
    .await;
    assert_eq!(distinct_pages(&js).await, BURST as usize, "none stored");
    assert_eq!(
        level_records(&js, 1).await,
        0,
        "timeline records stored for pages that were not"
    );
    service.abort();
    let _ = service.await;
    drop(conn);

    let (service, _conn) = start(&nats.url(), dir.path(), clock.clone(), &progress).await;
    wait_for("the second level's pages after the restart", || async {
        distinct_pages(&js).await >= 2 * BURST as usize
    })
    .await;
    service.abort();
    let pages: BTreeSet<(u32, u32)> = bus::read_pages(&js)
        .await
        .iter()
        .map(|p| {
            let p = &p.envelope.body;
            ((p.incident.number - 1) as u32, p.level)
        })
        .collect();
    let want: BTreeSet<(u32, u32)> = (0..BURST).flat_map(|i| [(i, 0), (i, 1)]).collect();
    assert_eq!(pages, want, "each incident paged at levels 0 and 1");
}

/// A policy renamed in the config while its incidents are open (the
/// route now names the new one) must not end their paging: before, each
/// such incident's track kept the old name, found no level to fire when
/// its next level came due ("policy p has no level 2"), and stopped for
/// good, so nobody more was paged for an incident nobody had acknowledged.
/// Now, when that level is due, the incident follows the policies its
/// route gives now, from their first level, saying why on the page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_incident_whose_policy_was_renamed_follows_the_route_s_policy_now() {
    const RENAMED: &str = "
route: {policy: q}
policies:
  - name: q
    levels:
      - {targets: [{user: d}], delay: 5m}
      - {targets: [{user: b}]}
users:
  - {name: b, email: b@example.com}
  - {name: d, email: d@example.com}
";
    tocsin_tests::init_logs();
    let nats = NatsServer::start().await;
    let js = streams_on(&nats).await;
    publish_opened(&js, 0).await;
    let dir = tempfile::tempdir().unwrap();
    let progress = Progress::new();
    let clock = Arc::new(ManualClock::new(t0()));
    let (service, conn) = start(&nats.url(), dir.path(), clock.clone(), &progress).await;
    wait_for("level 1 of policy p", || async {
        distinct_pages(&js).await == 1
    })
    .await;
    service.abort();
    let _ = service.await;
    drop(conn);

    // The config changed: policy p is now q, with other people.
    let (service, _conn) =
        start_with(&nats.url(), dir.path(), clock.clone(), &progress, RENAMED).await;
    clock.set(t0() + SignedDuration::from_mins(5));
    wait_for("a page after level 2 of p came due", || async {
        distinct_pages(&js).await >= 2
    })
    .await;
    let pages: Vec<Page> = bus::read_pages(&js)
        .await
        .into_iter()
        .map(|p| p.envelope.body)
        .collect();
    let to_d = pages
        .iter()
        .find(|p| p.address == "d@example.com")
        .unwrap_or_else(|| panic!("no page for d, the first level of q: {pages:#?}"));
    assert_eq!(to_d.level, 0);
    assert!(
        to_d.reason
            .contains("level 1 of policy q: policy p is no longer configured"),
        "{}",
        to_d.reason
    );
    // And q goes on from there: its level 2 when due.
    clock.set(t0() + SignedDuration::from_mins(10));
    wait_for("level 2 of policy q", || async {
        bus::read_pages(&js)
            .await
            .iter()
            .any(|p| p.envelope.body.address == "b@example.com")
    })
    .await;
    service.abort();
}

/// Waits (the kit's [`eventually_within`], up to a minute) until `done`
/// holds; panics naming `what` if it never does.
async fn wait_for<F, Fut>(what: &str, done: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let came = eventually_within(Duration::from_secs(60), || async {
        if done().await {
            Ok(())
        } else {
            Err(())
        }
    })
    .await;
    assert!(came.is_ok(), "{what} never came");
}

/// Incidents with a `paged` timeline record of `level` on COMMANDS.
async fn level_records(js: &jetstream::Context, level: u32) -> usize {
    bus::read_commands(js)
        .await
        .into_iter()
        .filter_map(|r| match r.envelope.body.action {
            tocsin_proto::command::Action::Paged {
                incident, level: l, ..
            } if l == level => Some(incident.to_string()),
            _ => None,
        })
        .collect::<BTreeSet<_>>()
        .len()
}

/// Distinct pages on NOTIFY (a page fired again after a kill may be there
/// twice, see the module's docs).
async fn distinct_pages(js: &jetstream::Context) -> usize {
    bus::read_pages(js)
        .await
        .into_iter()
        .map(|p| p.envelope.body.id)
        .collect::<BTreeSet<_>>()
        .len()
}

/// An escalation instance through `url` with the lease TTL `ttl`, its own
/// progress and shutdown (several run side by side).
async fn start_instance(
    url: &str,
    dir: &std::path::Path,
    clock: Arc<ManualClock>,
    ttl: Duration,
) -> (
    tokio::task::JoinHandle<()>,
    CancellationToken,
    async_nats::Client,
) {
    let metrics = Metrics::new();
    let client = tocsin_runtime::nats::connect(&NatsConfig::for_url(url), "esc-fence", &metrics)
        .await
        .unwrap();
    let js = jetstream::new(client.clone());
    let mut cfg: EscalationConfig = serde_yaml_ng::from_str(POLICY).unwrap();
    cfg.data_dir = Some(ConfigPath(dir.to_path_buf()));
    cfg.lease_ttl = Some(tocsin_runtime::config::HumanDuration(ttl));
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    let handle = tokio::spawn(async move {
        let ctx = tocsin_runtime::context::ServiceContext {
            metrics,
            shutdown,
            watermark: Progress::new().of("escalation"),
            ..tocsin_runtime::context::ServiceContext::standalone(js, clock)
        };
        tocsin_escalation::run(cfg, &ctx, None).await.unwrap();
    });
    (handle, stop, client)
}

/// Promises 2 and 3 across a change of tenure: a page an escalation
/// instance sent during a tenure that ended is never stored after the next
/// tenure began, however late it reaches the server. Instance A is active
/// and has paged incident 0's first level; its pages and lease renewals
/// are then held back in its proxy (as a client holds what it published
/// while its connection was away, or a starved machine sends late). The
/// clock reaches the second level: A fires it, held. Incident 0 is
/// acknowledged; A's lease runs out and B takes over, sees the
/// acknowledgement and pages nothing more for incident 0; it pages a new
/// incident 1. Now A's page arrives: stored, it would page someone for an
/// acknowledged incident, after the tenure that knew better had paged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_of_an_ended_tenure_are_never_stored_after_the_next_tenure_began() {
    tocsin_tests::init_logs();
    let nats = NatsServer::start().await;
    let js = streams_on(&nats).await;
    let (proxy_a, proxy_b) = (
        NatsProxy::start(nats.port()).await,
        NatsProxy::start(nats.port()).await,
    );
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let clock = Arc::new(ManualClock::new(t0()));
    // A must still hold the lease when its publishes are held back below.
    // With 3 s, in a CI run of four tests at once, A's second-level page
    // never came (2026-12-05): most likely a renewal was answered late, A
    // stood down first, and B, whose pages are not held, was active.
    let ttl = Duration::from_secs(6);
    let pages_of = |js: jetstream::Context| async move {
        bus::read_pages(&js)
            .await
            .into_iter()
            .map(|p| {
                (
                    (p.envelope.body.incident.number - 1) as u32,
                    p.envelope.body.level,
                )
            })
            .collect::<BTreeSet<(u32, u32)>>()
    };

    publish_opened(&js, 0).await;
    let (_a, stop_a, _conn_a) = start_instance(
        &proxy_a.url_for(&nats.url()),
        dir_a.path(),
        clock.clone(),
        ttl,
    )
    .await;
    wait_for("A's first page", || async {
        pages_of(js.clone()).await.contains(&(0, 0))
    })
    .await;
    let (_b, stop_b, _conn_b) = start_instance(
        &proxy_b.url_for(&nats.url()),
        dir_b.path(),
        clock.clone(),
        ttl,
    )
    .await;

    proxy_a.hold(&["tocsin.notify.", "$KV.tocsin_lease_escalation."], 0);
    clock.set(t0() + SignedDuration::from_mins(5));
    wait_for("A's second-level page, held", || async {
        proxy_a
            .held_subjects()
            .iter()
            .any(|s| s.starts_with("tocsin.notify."))
    })
    .await;
    publish_event(
        &js,
        0,
        EventKind::Acknowledged,
        IncidentStatus::Acknowledged,
        t0() + SignedDuration::from_mins(5),
    )
    .await;
    // B takes over once A's lease ran out, and pages the new incident.
    let opened = EventKind::opened(dummy_alert());
    publish_event(&js, 1, opened, IncidentStatus::Triggered, clock.now()).await;
    wait_for("B's page of incident 1", || async {
        pages_of(js.clone()).await.contains(&(1, 0))
    })
    .await;

    proxy_a.release();
    wait_for("the server's answers to A's late publishes", || async {
        proxy_a.released_answered()
    })
    .await;

    let mut last = (0u64, 0u64);
    for (seq, m) in bus::stored_raw(&js, STREAM_NOTIFY).await {
        let term = m
            .headers
            .get("Tocsin-Lease")
            .and_then(|v| tocsin_runtime::fence::term_of(v.as_str()))
            .unwrap_or_else(|| panic!("NOTIFY seq {seq} has no lease header"));
        assert!(
            term >= last.1,
            "NOTIFY seq {seq} ({}) written by term {term} after term {} wrote seq {}: an \
             ended tenure paged after the next one began",
            m.subject,
            last.1,
            last.0
        );
        last = (seq, term);
    }
    assert_eq!(
        pages_of(js.clone()).await,
        BTreeSet::from([(0, 0), (1, 0)]),
        "incident 0 acknowledged before the tenure that would page its second level"
    );
    stop_a.cancel();
    stop_b.cancel();
}

/// The stream is the record, the store a cache of it: tracks saved against
/// another NATS (a new server, or one whose streams were reset) are of
/// incidents the stream does not hold. The service starts over from the
/// stream: the new stream's first incident is paged though the stored
/// cursor is past its entry, and none of the old store's steps fires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tracks_ahead_of_a_new_stream_give_way_to_what_the_stream_holds() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(t0()));
    // The first NATS: five incidents, their first level paged, the second
    // due at 5m, all in the store.
    {
        let nats = NatsServer::start().await;
        let (svc, conn) = five_paged(&nats, dir.path(), &clock, &Progress::new()).await;
        svc.abort();
        let _ = svc.await;
        let _ = tokio::time::timeout(Duration::from_secs(2), conn.drain()).await;
    }

    // A new NATS whose stream holds one incident (number 11), at a
    // sequence the stored cursor is past.
    let nats = NatsServer::start().await;
    let js = streams_on(&nats).await;
    publish_opened(&js, 10).await;
    let progress = Progress::new();
    let (svc, _conn) = start(&nats.url(), dir.path(), clock.clone(), &progress).await;
    only_the_new_stream_is_paged(&js, &clock, &progress).await;
    svc.abort();
    let _ = svc.await;
}

/// The same while escalation runs: NATS comes back with its storage lost
/// (a server without a persistent volume, restarted). Escalation does not
/// wait for a restart of its own or a due step to notice: the new
/// stream's first incident is paged, and none of the old tracks' steps
/// fires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_lost_while_running_is_followed_from_its_start() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(t0()));
    let mut nats = NatsServer::start().await;
    let progress = Progress::new();
    let (svc, _conn) = five_paged(&nats, dir.path(), &clock, &progress).await;

    // NATS restarted with its storage gone; the streams made again (as a
    // deployment's start does) and one new incident on them.
    nats.stop();
    std::fs::remove_dir_all(nats.store_dir()).unwrap();
    nats.restart().await;
    let js = streams_on(&nats).await;
    publish_opened(&js, 10).await;
    only_the_new_stream_is_paged(&js, &clock, &progress).await;
    svc.abort();
    let _ = svc.await;
}

/// Escalation started on `nats` (streams made) with its store in `dir`
/// after incidents 1-5 opened there; returned once their first levels are
/// paged (the second due at 5m).
async fn five_paged(
    nats: &NatsServer,
    dir: &std::path::Path,
    clock: &Arc<ManualClock>,
    progress: &Progress,
) -> (tokio::task::JoinHandle<()>, async_nats::Client) {
    let js = streams_on(nats).await;
    for i in 0..5 {
        publish_opened(&js, i).await;
    }
    let started = start(&nats.url(), dir, clock.clone(), progress).await;
    progress
        .wait_until("escalation", Duration::from_secs(30), |m| {
            m.read(STREAM_INCIDENTS) >= 5 && m.timers_reached(t0())
        })
        .await
        .expect("the first levels fire");
    assert_eq!(paged_levels(&js).await.len(), 5);
    started
}

/// (incident number, level) of every page on NOTIFY.
async fn paged_levels(js: &jetstream::Context) -> BTreeSet<(u64, u32)> {
    bus::read_pages(js)
        .await
        .into_iter()
        .map(|p| (p.envelope.body.incident.number, p.envelope.body.level))
        .collect()
}

/// After the store's incidents 1-5 were lost with NATS and incident 11
/// opened on the new stream: 11 is paged, and by 6m at levels 0 and 1,
/// no incident of the old store at all.
async fn only_the_new_stream_is_paged(
    js: &jetstream::Context,
    clock: &ManualClock,
    progress: &Progress,
) {
    wait_for("the new stream's incident paged", || async {
        paged_levels(js).await.contains(&(11, 0))
    })
    .await;
    // Past every stored step's time: only the new incident's next level.
    let later = t0() + SignedDuration::from_mins(6);
    clock.set(later);
    progress
        .wait_until("escalation", Duration::from_secs(30), |m| {
            m.timers_reached(later)
        })
        .await
        .expect("the steps due by 6m fire");
    assert_eq!(
        paged_levels(js).await,
        BTreeSet::from([(11, 0), (11, 1)]),
        "the new stream's incident at levels 0 and 1, no incident of the old store"
    );
}
