//! `bench all`'s storm: many alerts over a few groups, as fast as 8
//! connections of 100-alert requests go, into Tocsin (the separate
//! processes of [`TocsinStack`](super::page_path::TocsinStack), incidents
//! grouped by `storm_group`) and into Alertmanager (grouped the same way):
//! accepted alerts/s, processed alerts/s (until a sentinel alert sent last
//! has its page) and peak RSS; then the fleet recovers: the same alerts
//! again, resolved, and resolved alerts/s processed (until a second
//! sentinel's page), with every group's incident resolved.

use std::{
    collections::{BTreeSet, HashMap},
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use serde_json::{json, Value};

use tocsin_proto::{
    incident::IncidentStatus,
    query::ListIncidents,
    subjects::{STREAM_ALERTS, STREAM_INCIDENTS, STREAM_NOTIFY},
};

use super::{
    all::{Figure, Outcome},
    page_path::{alertmanager_peer, post_all, tocsin_peer, Target},
    peer::{self, Receiver},
};

const GROUP_LABEL: &str = "storm_group";
const PER_REQUEST: usize = 100;
const CONNECTIONS: usize = 8;

/// The groups a receiver's POST pages: Tocsin's page (`incident.labels`) or
/// Alertmanager's notification (its alerts' labels).
fn groups_in(body: &[u8]) -> BTreeSet<String> {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return BTreeSet::new();
    };
    if let Some(g) = v["incident"]["labels"][GROUP_LABEL].as_str() {
        return [g.to_string()].into();
    }
    v["alerts"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x["labels"][GROUP_LABEL].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Request `r`'s body: alerts `r * PER_REQUEST ..`, alert i in group
/// `i mod groups` (or, `grouped`, every alert in group `r mod groups`, as
/// Alertmanager notifies a group's alerts together), each alert unique
/// (its `instance`); firing, or `resolved` (Alertmanager: `endsAt` now).
fn body(
    alertmanager: bool,
    run: &str,
    r: usize,
    groups: usize,
    grouped: bool,
    resolved: bool,
) -> Vec<u8> {
    let now = jiff::Timestamp::now().to_string();
    let alerts: Vec<Value> = (r * PER_REQUEST..(r + 1) * PER_REQUEST)
        .map(|i| {
            let labels = json!({
                "alertname": "BenchStorm",
                GROUP_LABEL: format!("{run}-{}", if grouped { r } else { i } % groups),
                "instance": format!("host-{i}:9100"),
                "severity": "critical",
            });
            let annotations = json!({"summary": "storm"});
            let mut a = json!({"labels": labels, "annotations": annotations});
            if alertmanager {
                a["generatorURL"] = json!("http://prometheus:9090/graph?g0.expr=storm");
                if resolved {
                    a["endsAt"] = json!(now);
                } else {
                    a["startsAt"] = json!(now);
                }
            } else {
                a["status"] = json!(if resolved { "resolved" } else { "firing" });
            }
            a
        })
        .collect();
    serde_json::to_vec(&alerts).expect("JSON encodes")
}

/// How big a storm is, and how long its sentinel may take.
#[derive(Clone, Copy)]
struct Size {
    alerts: usize,
    groups: usize,
    grouped: bool,
    limit: Duration,
}

struct StormResult {
    accepted_per_s: f64,
    processed_per_s: f64,
    /// The recovery: the same alerts resolved, alerts/s processed.
    resolved_per_s: f64,
    rss: Vec<(String, Option<f64>)>,
    problems: Vec<String>,
}

/// Posts a sentinel alert in group `group` of its own, firing, and waits
/// for its page: the time from `started` until it came (`None` past
/// `limit`), and the pages of every group meanwhile.
async fn sentinel(
    side: &str,
    target: &Target,
    receiver: &Receiver,
    group: &str,
    started: Instant,
    limit: Duration,
    check: &mut dyn FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<(Option<Duration>, HashMap<String, usize>)> {
    let mut pages = HashMap::new();
    let mut s = json!({
        "labels": {"alertname": "BenchStorm", GROUP_LABEL: group, "instance": "sentinel:9100", "severity": "critical"},
        "annotations": {"summary": "storm sentinel"},
    });
    if target.alertmanager {
        s["startsAt"] = json!(jiff::Timestamp::now().to_string());
    } else {
        s["status"] = json!("firing");
    }
    target
        .post_one(&json!([s]))
        .await
        .with_context(|| format!("{side}: the sentinel {group}"))?;
    let mut last_progress = Instant::now();
    loop {
        let mut done = None;
        for a in receiver.take() {
            for g in groups_in(&a.body) {
                if g == group {
                    done = Some(a.at);
                }
                *pages.entry(g).or_default() += 1;
            }
        }
        if let Some(at) = done {
            return Ok((Some(at.duration_since(started)), pages));
        }
        if started.elapsed() > limit {
            return Ok((None, pages));
        }
        if last_progress.elapsed() > Duration::from_secs(10) {
            println!("  {side}: waiting for the page of {group}");
            last_progress = Instant::now();
        }
        check()?;
        // Poll interval of a wait with a deadline.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Posts the storm's requests (`resolved`: the same alerts resolved) as
/// fast as they are answered; alerts/s accepted, and the failures.
async fn post_storm(
    side: &str,
    target: &Target,
    run: &str,
    size: Size,
    resolved: bool,
    problems: &mut Vec<String>,
) -> anyhow::Result<f64> {
    let Size {
        alerts,
        groups,
        grouped,
        ..
    } = size;
    let started = Instant::now();
    let am = target.alertmanager;
    let run_owned = run.to_string();
    let failures = post_all(
        target,
        alerts / PER_REQUEST,
        CONNECTIONS,
        Arc::new(move |r| body(am, &run_owned, r, groups, grouped, resolved)),
    )
    .await?;
    if let Some(first) = failures.first() {
        problems.push(format!(
            "{side}: {} failed requests{}, first: {first}",
            failures.len(),
            if resolved { " (resolved)" } else { "" }
        ));
    }
    let accepted = alerts as f64 / started.elapsed().as_secs_f64();
    println!(
        "  {side}: {alerts} alerts{} sent in {:.1}s ({accepted:.0}/s); waiting for the sentinel's page",
        if resolved { " resolved" } else { "" },
        started.elapsed().as_secs_f64()
    );
    Ok(accepted)
}

/// Sends the storm and the sentinel to `target`, waits for the sentinel's
/// page, and checks every group was paged once; then the same alerts
/// resolved and a second sentinel, and waits for its page. Alerts/s
/// accepted, processed, and resolved alerts/s processed.
async fn drive(
    side: &str,
    target: &Target,
    receiver: &Receiver,
    run: &str,
    size: Size,
    check: &mut dyn FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<(f64, f64, f64, Vec<String>)> {
    let Size {
        alerts,
        groups,
        limit,
        ..
    } = size;
    let mut problems = Vec::new();
    let started = Instant::now();
    let accepted = post_storm(side, target, run, size, false, &mut problems).await?;
    let first = format!("{run}-sentinel");
    let (processed, mut pages) =
        sentinel(side, target, receiver, &first, started, limit, check).await?;
    let Some(processed) = processed else {
        problems.push(format!(
            "{side}: the sentinel's page did not come within {limit:?}"
        ));
        return Ok((accepted, f64::NAN, f64::NAN, problems));
    };
    // Every group's page came before the sentinel's (the first alert of
    // every group was sent long before it); a bounded look for repeats (the
    // harness reports what it saw; a repeat later than this goes uncounted).
    tokio::time::sleep(Duration::from_secs(1)).await;
    for a in receiver.take() {
        for g in groups_in(&a.body) {
            *pages.entry(g).or_default() += 1;
        }
    }
    let prefix = format!("{run}-");
    let paged = pages
        .keys()
        .filter(|g| g.starts_with(&prefix) && **g != first)
        .count();
    let twice: usize = pages.values().map(|n| n.saturating_sub(1)).sum();
    if paged != groups {
        problems.push(format!("{side}: {paged} of {groups} groups paged"));
    }
    if twice > 0 && target.alertmanager {
        // Alertmanager re-notifies a group whose alerts changed: with
        // group_wait 0s, alerts that join while its first flush is under
        // way bring a second notification at once. By design, not a
        // duplicate: only counted.
        println!("  {side}: {twice} notifications beyond a group's first (group updates)");
    } else if twice > 0 {
        problems.push(format!("{side}: {twice} pages beyond the first of a group"));
    }
    // The fleet recovers: every alert resolved, then a second sentinel
    // (Tocsin's incidents service has decided every resolved alert before
    // it; Alertmanager has taken each when it answered).
    let started = Instant::now();
    post_storm(side, target, run, size, true, &mut problems).await?;
    let second = format!("{run}-recovered");
    // Pages now (Tocsin's resolve notifications) are not counted.
    let resolved = match sentinel(side, target, receiver, &second, started, limit, check)
        .await?
        .0
    {
        Some(took) => alerts as f64 / took.as_secs_f64(),
        None => {
            problems.push(format!(
                "{side}: the second sentinel's page did not come within {limit:?}"
            ));
            f64::NAN
        }
    };
    Ok((
        accepted,
        alerts as f64 / processed.as_secs_f64(),
        resolved,
        problems,
    ))
}

async fn tocsin_side(run: &str, size: Size) -> anyhow::Result<StormResult> {
    let (receiver, mut stack, target) = tocsin_peer(
        &format!("  group_by: [alertname, {GROUP_LABEL}]\n"),
        // A million alerts outgrow ALERTS' default 512 MiB.
        "jetstream:\n  alerts_max_bytes: 4294967296\n",
        run,
    )
    .await?;
    let (accepted, processed, resolved, mut problems) = {
        let mut check = || stack.check();
        drive("Tocsin", &target, &receiver, run, size, &mut check).await?
    };
    // Every group's incident resolved with its last alert (the sentinels'
    // stay open); asked only once the service has decided every alert.
    let client = stack.nats.client().await;
    let open = if resolved.is_nan() {
        Vec::new()
    } else {
        tocsin_tests::incidents::list(
            &client,
            ListIncidents {
                status: vec![IncidentStatus::Triggered, IncidentStatus::Acknowledged],
                limit: Some(1000),
                ..ListIncidents::default()
            },
        )
        .await
    };
    let prefix = format!("{run}-");
    let still_open = open
        .iter()
        .filter_map(|i| i.labels.get(GROUP_LABEL))
        .filter(|g| g.starts_with(&prefix) && !g.ends_with("sentinel") && !g.ends_with("recovered"))
        .count();
    if still_open > 0 {
        problems.push(format!(
            "Tocsin: {still_open} incidents still open after every alert resolved"
        ));
    }
    // What the storm left on disk, per alert.
    let js = async_nats::jetstream::new(client);
    let mut sizes = Vec::new();
    for name in [STREAM_ALERTS, STREAM_INCIDENTS, STREAM_NOTIFY] {
        let st = super::stream_state(&js, name).await?;
        sizes.push(format!(
            "{name} {} messages, {:.1} MiB ({:.0} B per alert)",
            st.messages,
            st.bytes as f64 / 1048576.0,
            st.bytes as f64 / size.alerts as f64
        ));
    }
    println!("  Tocsin: streams: {}", sizes.join("; "));
    let rss = stack.rss();
    stack.check()?;
    Ok(StormResult {
        accepted_per_s: accepted,
        processed_per_s: processed,
        resolved_per_s: resolved,
        rss,
        problems,
    })
}

async fn alertmanager_side(run: &str, size: Size) -> anyhow::Result<StormResult> {
    let (receiver, mut am, target) = alertmanager_peer(GROUP_LABEL, "1h", run).await?;
    let pid = Some(am.proc.pid());
    let (accepted, processed, resolved, problems) = {
        let proc = &mut am.proc;
        let mut check = || proc.check_running();
        drive("Alertmanager", &target, &receiver, run, size, &mut check).await?
    };
    Ok(StormResult {
        accepted_per_s: accepted,
        processed_per_s: processed,
        resolved_per_s: resolved,
        rss: vec![("alertmanager".into(), peer::peak_rss_mib(pid))],
        problems,
    })
}

/// Item 4: the storm, Tocsin (separate processes) vs Alertmanager.
pub async fn storm(
    quick: bool,
    reps: u32,
    groups: Option<u32>,
    grouped: bool,
) -> anyhow::Result<Outcome> {
    let mut size = if quick {
        Size {
            alerts: 20_000,
            groups: 200,
            grouped,
            limit: Duration::from_secs(300),
        }
    } else {
        Size {
            alerts: 1_000_000,
            groups: 10_000,
            grouped,
            limit: Duration::from_secs(3600),
        }
    };
    if let Some(g) = groups {
        size.groups = g as usize;
    }
    let Size { alerts, groups, .. } = size;
    println!(
        "{alerts} alerts over {groups} groups ({PER_REQUEST} per request{}, {CONNECTIONS} connections, as fast as they go), then a sentinel alert in a group of its own",
        if grouped {
            ", each request one group's alerts (--storm-grouped)"
        } else {
            ", alert i in group i mod groups"
        }
    );
    let nonce = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default();
    let side = "separate processes (as alert→page), incidents group_by [alertname, storm_group]";
    let scenario = if grouped { "storm, grouped" } else { "storm" };
    let mut figures = vec![
        Figure::new(
            scenario,
            "accepted alerts/s",
            "alerts/s",
            "higher",
            "Alertmanager",
        )
        .side(side),
        Figure::new(
            scenario,
            "processed alerts/s (to the sentinel's page)",
            "alerts/s",
            "higher",
            "Alertmanager",
        )
        .side(side),
        Figure::new(
            scenario,
            "resolved alerts/s processed (the same alerts resolved, to a second sentinel's page)",
            "alerts/s",
            "higher",
            "Alertmanager",
        )
        .side(side),
        Figure::new(
            scenario,
            "peak RSS, all processes",
            "MiB",
            "lower",
            "Alertmanager",
        )
        .side(side),
    ];
    let mut outcome = Outcome::default();
    for rep in 0..reps as usize {
        let order = if rep % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for tocsin in order {
            let run = format!("{nonce:x}s{rep}{}", if tocsin { "t" } else { "a" });
            let (name, r) = if tocsin {
                ("Tocsin", tocsin_side(&run, size).await?)
            } else {
                ("Alertmanager", alertmanager_side(&run, size).await?)
            };
            let rss_sum: f64 = r.rss.iter().filter_map(|(_, m)| *m).sum();
            println!(
                "{:>5}  {:<13} accepted {:>8.0} alerts/s, processed {:>8.0} alerts/s, resolved {:>8.0} alerts/s; peak RSS {}",
                rep + 1,
                name,
                r.accepted_per_s,
                r.processed_per_s,
                r.resolved_per_s,
                peer::describe_rss(&r.rss)
            );
            for (i, v) in [
                r.accepted_per_s,
                r.processed_per_s,
                r.resolved_per_s,
                rss_sum,
            ]
            .into_iter()
            .enumerate()
            {
                figures[i].push(tocsin, v);
            }
            for (n, m) in &r.rss {
                outcome.rss(format!("storm: {n}"), *m);
            }
            outcome.problems.extend(r.problems);
        }
    }
    outcome.figures = figures;
    Ok(outcome)
}
