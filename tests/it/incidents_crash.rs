//! Promise 2, "effects happen once": 5,000 alerts while the incidents
//! service is killed (its task dropped, no draining) at arbitrary points six
//! times and nats-server is restarted once. Afterwards the INCIDENTS log is
//! exactly that of an uninterrupted run over the same input: the same
//! entries in the same order, none twice, and the same incidents. About
//! half the alerts come several to a message (as ingest stores a request of
//! several), so kills also land in the middle of a message's alerts.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use async_nats::jetstream;
use jiff::{SignedDuration, Timestamp};
use tocsin_incidents::{clock::ManualClock, core::Projection, IncidentsConfig};
use tocsin_proto::{
    incident::{IncidentSummary, LogEntry},
    query::ListIncidents,
    silence::{MatchOp, Matcher},
    subjects::{STREAM_ALERTS, STREAM_DEADLETTER, STREAM_INCIDENTS},
    Alert, AlertStatus,
};
use tocsin_runtime::{
    admin::Metrics,
    config::{ConfigPath, HumanDuration},
    nats::NatsConfig,
    streams::{ensure_streams, JetStreamConfig},
    CancellationToken,
};
use tocsin_tests::{
    bus, eventually_within,
    faults::NatsProxy,
    incidents::{alert, list, log, try_publish_alerts},
    NatsServer,
};
use tokio::task::JoinHandle;

const N: usize = 5_000;
const GROUPS: u64 = 150;

/// A small deterministic generator (xorshift), so both runs see the same input.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Mixed groups, fires, repeats, resolves and re-fires, with long gaps so
/// both "reopen within the window" and "new incident after it" happen.
fn inputs() -> Vec<(Alert, Timestamp)> {
    let mut rng = Rng(0x5eed_1234_abcd_0042);
    let mut at: Timestamp = "2026-03-01T00:00:00Z".parse().unwrap();
    let mut firing: BTreeMap<(u64, u64), Timestamp> = BTreeMap::new();
    let mut out = Vec::with_capacity(N);
    for i in 0..N - 1 {
        at += SignedDuration::from_secs(10);
        if i % 1000 == 999 {
            at += SignedDuration::from_hours(2);
        }
        let (g, k) = (rng.next() % GROUPS, rng.next() % 4);
        let (group, inst) = (format!("g{g:03}"), format!("i{k}"));
        let sev = ["critical", "warning", "info"][(g % 3) as usize];
        let pairs = [
            ("alertname", "Crash"),
            ("group", group.as_str()),
            ("instance", inst.as_str()),
            ("severity", sev),
        ];
        let a = match firing.get(&(g, k)).copied() {
            Some(since) if rng.next().is_multiple_of(2) => {
                firing.remove(&(g, k));
                alert(
                    &pairs,
                    &["alertname", "group"],
                    AlertStatus::Resolved,
                    since,
                )
            }
            Some(since) => alert(&pairs, &["alertname", "group"], AlertStatus::Firing, since),
            None => {
                firing.insert((g, k), at);
                alert(&pairs, &["alertname", "group"], AlertStatus::Firing, at)
            }
        };
        out.push((a, at));
    }
    at += SignedDuration::from_secs(10);
    out.push((
        alert(
            &[("alertname", "Sentinel")],
            &["alertname"],
            AlertStatus::Firing,
            at,
        ),
        at,
    ));
    out
}

fn config(dir: &std::path::Path) -> IncidentsConfig {
    IncidentsConfig {
        data_dir: Some(ConfigPath(dir.to_path_buf())),
        reopen_window: HumanDuration(Duration::from_secs(3600)),
        ..Default::default()
    }
}

/// Starts the service in-process with its own NATS connection (returned
/// too: a crashed process's sockets close, so the test closes it after a kill).
async fn start(
    url: &str,
    dir: &std::path::Path,
) -> (JoinHandle<()>, CancellationToken, async_nats::Client) {
    start_observed(url, dir, Metrics::new()).await
}

/// [`start`], its metrics registered on `metrics`.
async fn start_observed(
    url: &str,
    dir: &std::path::Path,
    metrics: Metrics,
) -> (JoinHandle<()>, CancellationToken, async_nats::Client) {
    let at = "2026-03-01T00:00:00Z".parse().unwrap();
    start_as(url, dir, at, config(dir).lease_ttl.get(), metrics).await
}

/// The inputs as ALERTS messages: runs of 1 to 60 alerts (the same in
/// every run), each received when its first alert was, never across one of
/// the input's long gaps.
fn messages(inputs: Vec<(Alert, Timestamp)>) -> Vec<(Vec<Alert>, Timestamp)> {
    const SIZES: [usize; 8] = [1, 1, 7, 1, 23, 3, 1, 60];
    let mut out: Vec<(Vec<Alert>, Timestamp)> = Vec::new();
    let mut want = 0;
    for (a, at) in inputs {
        match out.last_mut() {
            Some((alerts, first))
                if alerts.len() < SIZES[want % SIZES.len()]
                    && at.duration_since(*first) < SignedDuration::from_hours(1) =>
            {
                alerts.push(a)
            }
            _ => {
                want += 1;
                out.push((vec![a], at));
            }
        }
    }
    out
}

async fn publish_all(js: &jetstream::Context, inputs: Vec<(Alert, Timestamp)>) {
    for (alerts, at) in messages(inputs) {
        // Retried through the NATS restart; the message id makes a retry of
        // a publish that did land a no-op.
        loop {
            let publish = tokio::time::timeout(
                Duration::from_secs(5),
                try_publish_alerts(js, alerts.clone(), at),
            )
            .await;
            if matches!(publish, Ok(Ok(_))) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn wait_for_sentinel(client: &async_nats::Client) {
    let q = ListIncidents {
        matchers: vec![Matcher {
            name: "alertname".into(),
            op: MatchOp::Eq,
            value: "Sentinel".into(),
        }],
        ..Default::default()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(240);
    loop {
        let found = tokio::time::timeout(Duration::from_secs(2), async {
            match client.request(tocsin_proto::subjects::query::LIST_INCIDENTS, tocsin_proto::codec::encode(&q).unwrap().into()).await {
                Ok(r) => matches!(tocsin_proto::codec::decode(&r.payload), Ok(tocsin_proto::query::QueryReply::Incidents { incidents, .. }) if !incidents.is_empty()),
                Err(_) => false,
            }
        })
        .await
        .unwrap_or(false);
        if found {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the sentinel alert was never processed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The INCIDENTS log folded into a projection.
fn fold(entries: &[(String, tocsin_proto::incident::LogEntry)]) -> Projection {
    let mut p = Projection::new();
    for (i, (_, e)) in entries.iter().enumerate() {
        p.apply(e, i as u64 + 1);
    }
    p
}

/// The log and the incidents of one uninterrupted run over `input`.
async fn uninterrupted(
    input: Vec<(Alert, Timestamp)>,
) -> (Vec<(String, LogEntry)>, Vec<IncidentSummary>) {
    let nats = NatsServer::start().await;
    let client = nats.client().await;
    let js = jetstream::new(client.clone());
    ensure_streams(&js, &JetStreamConfig::default())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let started = std::time::Instant::now();
    publish_all(&js, input).await;
    let (svc, stop, _) = start(&nats.url(), dir.path()).await;
    wait_for_sentinel(&client).await;
    let reference = log(&js).await;
    let reference_list = list(
        &client,
        ListIncidents {
            limit: Some(1000),
            ..Default::default()
        },
    )
    .await;
    stop.cancel();
    svc.await.unwrap();
    assert!(
        bus::count(&js, STREAM_ALERTS).await < N as u64 * 3 / 4,
        "many messages hold several alerts"
    );
    assert_eq!(
        bus::count(&js, STREAM_DEADLETTER).await,
        0,
        "every alert was decided, none dead-lettered"
    );
    eprintln!(
        "reference run: {} entries in {:?}",
        reference.len(),
        started.elapsed()
    );
    (reference, reference_list)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashes_and_a_nats_restart_change_nothing() {
    tocsin_tests::init_logs();
    let input = inputs();

    let (reference, reference_list) = uninterrupted(input.clone()).await;

    // The same input while the service is killed again and again.
    let mut nats_b = NatsServer::start().await;
    let client_b = nats_b.client().await;
    let js_b = jetstream::new(client_b.clone());
    ensure_streams(&js_b, &JetStreamConfig::default())
        .await
        .unwrap();
    let dir_b = tempfile::tempdir().unwrap();
    let publisher = {
        let js = js_b.clone();
        let input = input.clone();
        tokio::spawn(async move { publish_all(&js, input).await })
    };
    let mut rng = tocsin_tests::TestRng::new("incidents_crash: kill points");
    for round in 0..6 {
        let (svc, _stop, conn) = start(&nats_b.url(), dir_b.path()).await;
        tokio::time::sleep(Duration::from_millis(150 + rng.below(400))).await;
        if round == 3 {
            nats_b.restart().await;
            tokio::time::sleep(Duration::from_millis(100 + rng.below(300))).await;
        }
        svc.abort(); // a crash: no draining, no final save
        let _ = svc.await;
        // ...and, as when a process dies, its connection goes away (the
        // client's background tasks would otherwise keep it open).
        let _ = tokio::time::timeout(Duration::from_secs(2), conn.drain()).await;
    }
    publisher.await.unwrap();
    let (svc, stop, _) = start(&nats_b.url(), dir_b.path()).await;
    let client_b = nats_b.client().await; // the restart closed the old one
    wait_for_sentinel(&client_b).await;
    let js_b = jetstream::new(client_b.clone());
    let crashed = log(&js_b).await;
    let crashed_list = list(
        &client_b,
        ListIncidents {
            limit: Some(1000),
            ..Default::default()
        },
    )
    .await;
    stop.cancel();
    svc.await.unwrap();
    assert_eq!(bus::count(&js_b, STREAM_DEADLETTER).await, 0);

    // No entry twice.
    let mut ids: Vec<&str> = crashed.iter().map(|(id, _)| id.as_str()).collect();
    ids.sort_unstable();
    let before = ids.len();
    ids.dedup();
    assert_eq!(ids.len(), before, "an entry appears twice in INCIDENTS");
    // The same entries, in the same order, as the uninterrupted run.
    let ref_ids: Vec<&str> = reference.iter().map(|(id, _)| id.as_str()).collect();
    let crash_ids: Vec<&str> = crashed.iter().map(|(id, _)| id.as_str()).collect();
    // Which entries differ, for the failure message.
    let missing: Vec<&&str> = ref_ids.iter().filter(|i| !crash_ids.contains(i)).collect();
    let extra: Vec<&&str> = crash_ids.iter().filter(|i| !ref_ids.contains(i)).collect();
    assert_eq!(
        crash_ids.len(),
        ref_ids.len(),
        "entry count differs; missing {missing:?}, extra {extra:?}"
    );
    assert_eq!(crash_ids, ref_ids, "entries differ");
    assert_eq!(crashed, reference, "entry contents differ");
    // The same incidents, and the live service agrees with its log.
    let (a, b) = (fold(&reference), fold(&crashed));
    assert!(
        a.incidents.len() > GROUPS as usize,
        "the input reopens and re-opens incidents"
    );
    assert!(
        a.incidents.values().any(|i| i.summary.reopen_count > 0),
        "some incidents reopened"
    );
    assert_eq!(a.incidents, b.incidents);
    assert_eq!(
        crashed_list.len(),
        reference_list.len(),
        "live incident count differs"
    );
    for (c, r) in crashed_list.iter().zip(&reference_list) {
        assert_eq!(
            c, r,
            "the live service disagrees with the uninterrupted run"
        );
    }
}

/// Promise 1 through the incidents service's pipelined batches: what it
/// decided is saved only once INCIDENTS stored it. The service reaches
/// NATS through a proxy that swallows its publishes to INCIDENTS once the
/// log holds 500 entries: the batch on its way is written and never stored
/// or acknowledged. After 100 swallowed entries (or once the service saw
/// a write fail) it is killed and restarted straight on the server; the log is then exactly the
/// uninterrupted run's. A service that saved its cursor (or an incident)
/// before the acknowledgements came would have skipped those alerts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_never_stored_are_decided_again_after_a_crash() {
    tocsin_tests::init_logs();
    let input = inputs();
    let (reference, _) = uninterrupted(input.clone()).await;

    let nats = NatsServer::start().await;
    let client = nats.client().await;
    let js = jetstream::new(client.clone());
    ensure_streams(&js, &JetStreamConfig::default())
        .await
        .unwrap();
    publish_all(&js, input).await;
    let proxy = NatsProxy::start(nats.port()).await;
    let dir = tempfile::tempdir().unwrap();
    let metrics = Metrics::new();
    let (svc, _stop, conn) =
        start_observed(&proxy.url_for(&nats.url()), dir.path(), metrics.clone()).await;
    let limit = Duration::from_secs(120);
    eventually_within(limit, || async {
        match bus::count(&js, STREAM_INCIDENTS).await {
            n if n >= 500 => Ok(()),
            n => Err(n),
        }
    })
    .await
    .unwrap_or_else(|n| panic!("{n} entries, not 500, within {limit:?}"));
    proxy.swallow(&["tocsin.incidents."]);
    // Killed once 100 entries went unstored, or once the service saw its
    // batch fail (on a busy machine the batch on its way may be small; the
    // service then goes on one input at a time, one entry per ack timeout).
    eventually_within(limit, || async {
        let failed = write_failures(&metrics);
        match proxy.swallowed() {
            n if n >= 100 || (n > 0 && failed > 0) => Ok(()),
            n => Err((n, failed)),
        }
    })
    .await
    .unwrap_or_else(|(n, failed)| {
        panic!("{n} publishes swallowed, not 100, and {failed} failed writes within {limit:?}")
    });
    let stored = bus::read_entries(&js).await.len();
    svc.abort();
    let _ = svc.await;
    drop(conn);
    assert!(
        stored < reference.len(),
        "the crash came before the log was whole"
    );

    let (svc, stop, _) = start(&nats.url(), dir.path()).await;
    wait_for_sentinel(&client).await;
    let after = log(&js).await;
    stop.cancel();
    svc.await.unwrap();
    let ref_ids: Vec<&str> = reference.iter().map(|(id, _)| id.as_str()).collect();
    let ids: Vec<&str> = after.iter().map(|(id, _)| id.as_str()).collect();
    let missing: Vec<&&str> = ref_ids
        .iter()
        .filter(|i| !ids.contains(i))
        .take(10)
        .collect();
    assert_eq!(
        ids, ref_ids,
        "entries differ; missing (first 10) {missing:?}"
    );
    assert_eq!(after, reference, "entry contents differ");
}

/// Starts the service in-process with its own NATS connection (returned
/// too), its clock at `at` and a lease TTL of `ttl`.
async fn start_as(
    url: &str,
    dir: &std::path::Path,
    at: Timestamp,
    ttl: Duration,
    metrics: Metrics,
) -> (JoinHandle<()>, CancellationToken, async_nats::Client) {
    let mut nats = NatsConfig::for_url(url);
    nats.reconnect_max_delay = HumanDuration(Duration::from_millis(100));
    let client = tocsin_runtime::nats::connect(&nats, "incidents-test", &metrics)
        .await
        .unwrap();
    let js = jetstream::new(client.clone());
    let stop = CancellationToken::new();
    let cfg = IncidentsConfig {
        lease_ttl: HumanDuration(ttl),
        ..config(dir)
    };
    let (token, conn) = (stop.clone(), client.clone());
    let clock = Arc::new(ManualClock::new(at));
    let handle = tokio::spawn(async move {
        let _ = client;
        let ctx = tocsin_runtime::context::ServiceContext {
            metrics,
            shutdown: token,
            ..tocsin_runtime::context::ServiceContext::standalone(js, clock)
        };
        let r = tocsin_incidents::run(cfg, &ctx, None).await;
        r.expect("incidents service ran");
    });
    (handle, stop, conn)
}

/// `tocsin_incidents_write_failures_total` in `metrics`.
fn write_failures(metrics: &Metrics) -> u64 {
    metrics
        .encode()
        .lines()
        .find_map(|l| l.strip_prefix("tocsin_incidents_write_failures_total "))
        .map_or(0, |v| v.trim().parse().expect("a counter"))
}

/// Waits (up to `limit`) until `proxy` holds `n` INCIDENTS entries back.
async fn held_entries(proxy: &NatsProxy, n: usize, who: &str, limit: Duration) {
    eventually_within(limit, || async {
        let held = proxy
            .held_subjects()
            .iter()
            .filter(|s| s.starts_with("tocsin.incidents.inc."))
            .count();
        if held >= n {
            Ok(())
        } else {
            Err(held)
        }
    })
    .await
    .unwrap_or_else(|k| panic!("{who}'s proxy held {k} entries, not {n}"));
}

/// Promise 2 across a change of tenure: what an instance sent during a
/// tenure that ended is never stored after the next tenure wrote, however
/// late it reaches the server. Instance A is active; its publishes to
/// INCIDENTS and its lease renewals are then held back in its proxy (as a
/// client holds what it published while its connection was away). A
/// request of five new groups comes: A decides it and sends five entries,
/// all held. A's lease runs out, B takes over and decides the same
/// request; B's proxy lets two of its entries through and holds the rest
/// (B is slow). Now A's five arrive, then B's rest. Each of A's entries
/// named the stream position it must follow, and A's third names exactly
/// where B's second left the stream: without a fence the server stores it
/// and A's tenure writes after B's. The record must show tenures that
/// never go back, and each group in one incident.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_of_an_ended_tenure_are_never_stored_after_the_next_tenure_wrote() {
    tocsin_tests::init_logs();
    let nats = NatsServer::start().await;
    let client = nats.client().await;
    let js = jetstream::new(client.clone());
    ensure_streams(&js, &JetStreamConfig::default())
        .await
        .unwrap();
    let (proxy_a, proxy_b) = (
        NatsProxy::start(nats.port()).await,
        NatsProxy::start(nats.port()).await,
    );
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let t0: Timestamp = "2026-03-01T00:00:00Z".parse().unwrap();
    let ttl = Duration::from_secs(3);
    let limit = Duration::from_secs(60);
    let fire = |group: &str| {
        alert(
            &[("alertname", "Fence"), ("group", group)],
            &["alertname", "group"],
            AlertStatus::Firing,
            t0,
        )
    };
    let groups = |log: &[(String, LogEntry)]| -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for (_, e) in log {
            if let LogEntry::Incident(e) = e {
                if e.kind.name() == "opened" {
                    *out.entry(e.incident.dedup_key.clone()).or_default() += 1;
                }
            }
        }
        out
    };

    // A is active once it has opened a first incident.
    let (_a, stop_a, _conn_a) = start_as(
        &proxy_a.url_for(&nats.url()),
        dir_a.path(),
        t0,
        ttl,
        Metrics::new(),
    )
    .await;
    try_publish_alerts(&js, vec![fire("g0")], t0).await.unwrap();
    eventually_within(limit, || async {
        let n = log(&js).await.len();
        if n >= 1 {
            Ok(())
        } else {
            Err(n)
        }
    })
    .await
    .expect("A opened the first incident");
    let (_b, stop_b, _conn_b) = start_as(
        &proxy_b.url_for(&nats.url()),
        dir_b.path(),
        t0,
        ttl,
        Metrics::new(),
    )
    .await;

    proxy_a.hold(&["tocsin.incidents.inc.", "$KV.tocsin_lease_incidents."], 0);
    proxy_b.hold(&["tocsin.incidents.inc."], 2);
    let five: Vec<Alert> = (1..=5).map(|g| fire(&format!("g{g}"))).collect();
    try_publish_alerts(&js, five, t0).await.unwrap();
    held_entries(&proxy_a, 5, "A", limit).await;
    // B takes over once A's lease expired, decides the request, and is
    // held after two entries.
    held_entries(&proxy_b, 3, "B", limit).await;

    // A's entries arrive, and the server answers each; then B's rest.
    proxy_a.release();
    eventually_within(limit, || async {
        if proxy_a.released_answered() {
            Ok(())
        } else {
            Err(())
        }
    })
    .await
    .expect("the server answered A's late publishes");
    proxy_b.release();
    eventually_within(limit, || async {
        let g = groups(&log(&js).await);
        if g.len() == 6 && proxy_b.released_answered() {
            Ok(())
        } else {
            Err(g)
        }
    })
    .await
    .unwrap_or_else(|g| panic!("incidents opened: {g:?}"));

    // The record: terms never go back, and one incident per group.
    let mut last = (0u64, 0u64);
    for (seq, m) in bus::stored_raw(&js, STREAM_INCIDENTS).await {
        let term: u64 = m
            .headers
            .get("Tocsin-Lease")
            .and_then(|v| tocsin_runtime::fence::term_of(v.as_str()))
            .unwrap_or_else(|| panic!("INCIDENTS seq {seq} has no lease header"));
        assert!(
            term >= last.1,
            "INCIDENTS seq {seq} ({}) written by term {term} after term {} wrote seq {}: an \
             ended tenure wrote after the next one began",
            m.subject,
            last.1,
            last.0
        );
        last = (seq, term);
    }
    let g = groups(&log(&js).await);
    assert!(g.values().all(|n| *n == 1), "incidents per group: {g:?}");
    stop_a.cancel();
    stop_b.cancel();
}
