//! `bench all`'s recovery scenario: every service a separate process (the
//! [`TocsinStack`] of alert→page, the same config), N alerts each opening
//! an incident (and paging it) through ingest's generic endpoint; once the
//! engine is quiet, the incidents and escalation processes are SIGKILLed,
//! a sentinel alert is sent while they are down, and both are started again:
//! the time from the restart until each has taken its role's lease (the
//! restarted process takes its killed predecessor's lease back at once: it
//! holds the lock on the same data directory), until each
//! is active and caught up with INCIDENTS (its `/readyz` check `ok`; a
//! standby answers 200 too, with `standby: ...`), and until the sentinel's
//! page arrives (incidents has handled ALERTS to its last sequence,
//! escalation has applied the sentinel's INCIDENTS entry). Then the open
//! incidents are listed: all N must be there, and no page may come again.
//! A standby of each of the two (its own data directory) runs from the
//! start. If one took its role's lease during the load (a renewal answered
//! later than the lease TTL on a slow machine), it is stopped before the
//! kill until the instance holds the lease again, then started again, so
//! the restart measures an instance taking its own lease back. Once it
//! has followed INCIDENTS to its end
//! (`tocsin_standby_followed_sequence`), the restarted pair is SIGKILLed
//! for good and a second sentinel sent: the time from that kill until each
//! standby is active and caught up, and until the second sentinel's page
//! arrives, with the INCIDENTS entries the incidents standby replayed when
//! it took over (an engine whose standbys do not follow replays the whole
//! log) and the standbys' peak RSS.
//! Memory with the N open is read twice before the kill: once quiet, and
//! once settled (the RSS no longer falling as the allocator hands the
//! load's freed memory back), RSS and PSS. There is no peer.

use std::{
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context as _};
use bytes::Bytes;
use futures::TryStreamExt as _;
use tocsin_proto::{
    codec,
    incident::IncidentStatus,
    query::{ListIncidents, QueryReply},
    subjects::{query, STREAM_ALERTS, STREAM_COMMANDS, STREAM_INCIDENTS, STREAM_NOTIFY},
};

use super::{
    all::{Figure, Outcome, NO_PEER},
    page_path::{ids_in, post_all, tocsin_peer, TocsinStack, ID_LABEL},
    peer::{self, Receiver},
    PROGRESS_EVERY,
};

/// Alerts per request, and connections, while opening the incidents.
const PER_REQUEST: usize = 100;
const CONNECTIONS: usize = 8;

/// The engine counts as quiet once no stream has grown for this long and
/// no durable consumer has anything pending or unacknowledged.
const QUIET: Duration = Duration::from_secs(2);

/// How long the two restarted services may take to be ready and caught up.
const RECOVERY_LIMIT: Duration = Duration::from_secs(600);

/// The two services killed and restarted.
const KILLED: [&str; 2] = ["incidents", "escalation"];

/// What one repetition measured.
struct RecoveryResult {
    /// Incidents opened and paged per second while loading.
    opened_per_s: f64,
    /// From the restart, each of [`KILLED`]: lease taken, and active and
    /// caught up with INCIDENTS.
    lease: [Duration; 2],
    ready: [Duration; 2],
    /// From the restart: the sentinel's page at the receiver.
    caught_up: Duration,
    /// Peak RSS of every process with N incidents open, before the kill.
    loaded_rss: Vec<(String, Option<f64>)>,
    /// RSS of every process once quiet with N incidents open, before the
    /// kill (what N open incidents cost, without the load's peaks).
    quiet_rss: Vec<(String, Option<f64>)>,
    /// The same once settled ([`settle`]), and PSS then.
    settled: Settled,
    /// Peak RSS of the restarted processes, after listing every incident.
    restarted_rss: Vec<(String, Option<f64>)>,
    problems: Vec<String>,
}

/// What the standbys' takeover measured ([`takeover`]).
struct Takeover {
    /// From the kill, each of [`KILLED`]: its standby active and caught up.
    ready: [Duration; 2],
    /// From the kill: the second sentinel's page at the receiver.
    paged: Duration,
    /// Pages the escalation standby sent (stored on NOTIFY, not dropped
    /// as duplicates) up to the sentinel's page, the sentinel's included:
    /// more than the sentinel's means it paged again what the killed one had.
    sent: f64,
    /// INCIDENTS entries the incidents standby replayed taking over.
    replayed: f64,
    /// Peak RSS of the standbys.
    rss: Vec<(String, Option<f64>)>,
}

pub async fn recovery(n: u32, reps: u32) -> anyhow::Result<Outcome> {
    let n = n as usize;
    let load_limit = load_limit(n);
    println!(
        "{n} alerts, each opening an incident and paging it ({PER_REQUEST} per request, {CONNECTIONS} connections, \
         ingest's generic endpoint; within {load_limit:?}); once quiet (no stream grew for {QUIET:?}, no durable \
         consumer busy) SIGKILL incidents and escalation, send a sentinel alert, start both again"
    );
    println!(
        "from the restart: lease = the service's /readyz check leaves `standby: ...` (taken back at once: the \
         restarted process holds the killed one's data-directory lock); ready = the check is `ok` (active, caught up with {STREAM_INCIDENTS}); caught up = the sentinel's \
         page arrived (incidents handled {STREAM_ALERTS} to its last sequence, escalation applied the sentinel's \
         entry); all within {RECOVERY_LIMIT:?}"
    );
    let nonce = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default();
    let scenario = format!("recovery, {n} open");
    let side =
        "separate processes (as alert→page); incidents and escalation SIGKILLed and restarted";
    let figure = |metric: &str, unit: &str, better: &str| {
        Figure::new(&scenario, metric, unit, better, NO_PEER).side(side)
    };
    let mut figures = vec![
        figure(
            "incidents opened and paged per s (load)",
            "incidents/s",
            "higher",
        ),
        figure("incidents: restart to lease", "s", "lower"),
        figure(
            "incidents: restart to ready (active, caught up)",
            "s",
            "lower",
        ),
        figure("escalation: restart to lease", "s", "lower"),
        figure(
            "escalation: restart to ready (active, caught up)",
            "s",
            "lower",
        ),
        figure("both ready and caught up (sentinel paged)", "s", "lower"),
        figure("peak RSS, all processes, before the kill", "MiB", "lower"),
        figure(
            "RSS once quiet with all open, the Tocsin processes",
            "MiB",
            "lower",
        ),
        figure("RSS once quiet with all open, nats-server", "MiB", "lower"),
        figure(
            "RSS settled with all open, the Tocsin processes",
            "MiB",
            "lower",
        ),
        figure(
            "PSS settled with all open, the Tocsin processes (shared pages counted once)",
            "MiB",
            "lower",
        ),
        figure(
            "standby takeover: kill to incidents standby ready",
            "s",
            "lower",
        ),
        figure(
            "standby takeover: kill to escalation standby ready",
            "s",
            "lower",
        ),
        figure("standby takeover: kill to sentinel paged", "s", "lower"),
        figure(
            "standby takeover: pages the escalation standby sent up to the sentinel's",
            "pages",
            "lower",
        ),
        figure(
            "standby takeover: INCIDENTS entries replayed",
            "entries",
            "lower",
        ),
    ];
    let mut outcome = Outcome::default();
    for rep in 0..reps as usize {
        let run = format!("{nonce:x}v{rep}");
        let (r, t) = once(n, &run, load_limit).await?;
        let both = r.ready[0].max(r.ready[1]).max(r.caught_up);
        println!(
            "{:>5}  opened {:.0}/s; from the restart: incidents lease {:.2}s, ready {:.2}s; escalation lease {:.2}s, \
             ready {:.2}s; sentinel paged {:.2}s",
            rep + 1,
            r.opened_per_s,
            r.lease[0].as_secs_f64(),
            r.ready[0].as_secs_f64(),
            r.lease[1].as_secs_f64(),
            r.ready[1].as_secs_f64(),
            r.caught_up.as_secs_f64(),
        );
        println!(
            "       standbys: from the kill, incidents ready {:.2}s, escalation ready {:.2}s; sentinel paged {:.2}s \
             ({:.0} pages sent by the escalation standby up to then); {:.0} INCIDENTS entries replayed; standbys' \
             peak RSS {}",
            t.ready[0].as_secs_f64(),
            t.ready[1].as_secs_f64(),
            t.paged.as_secs_f64(),
            t.sent,
            t.replayed,
            super::peer::describe_rss(&t.rss),
        );
        let loaded: f64 = r.loaded_rss.iter().filter_map(|(_, m)| *m).sum();
        let nats_quiet: f64 = r
            .quiet_rss
            .iter()
            .filter(|(name, _)| name == "nats-server")
            .filter_map(|(_, m)| *m)
            .sum();
        let values = [
            r.opened_per_s,
            r.lease[0].as_secs_f64(),
            r.ready[0].as_secs_f64(),
            r.lease[1].as_secs_f64(),
            r.ready[1].as_secs_f64(),
            both.as_secs_f64(),
            loaded,
            tocsin_sum(&r.quiet_rss),
            nats_quiet,
            tocsin_sum(&r.settled.rss),
            tocsin_sum(&r.settled.pss),
            t.ready[0].as_secs_f64(),
            t.ready[1].as_secs_f64(),
            t.paged.as_secs_f64(),
            t.sent,
            t.replayed,
        ];
        for (f, v) in figures.iter_mut().zip(values) {
            f.push(true, v);
        }
        for (name, mib) in &r.loaded_rss {
            outcome.rss(format!("{scenario}: {name}"), *mib);
        }
        for (name, mib) in &r.restarted_rss {
            outcome.rss(format!("{scenario}: {name}, restarted"), *mib);
        }
        for (name, mib) in &t.rss {
            outcome.rss(format!("{scenario}: {name}, standby"), *mib);
        }
        outcome.problems.extend(
            r.problems
                .into_iter()
                .map(|p| format!("recovery, repetition {}: {p}", rep + 1)),
        );
    }
    outcome.figures = figures;
    Ok(outcome)
}

/// How long opening and paging `n` incidents may take, and then getting
/// quiet (the pages' receipts applied): a minute, plus 10ms an incident
/// (100/s; the page path does a few hundred a second on 2 cores).
fn load_limit(n: usize) -> Duration {
    Duration::from_secs(60) + Duration::from_millis(10) * n as u32
}

async fn once(
    n: usize,
    run: &str,
    load_limit: Duration,
) -> anyhow::Result<(RecoveryResult, Takeover)> {
    let (receiver, mut stack, target) = tocsin_peer("", "", run).await?;
    stack.start_standbys(&KILLED).await?;
    let client = stack.nats.client().await;
    let js = async_nats::jetstream::new(client.clone());
    let mut problems = Vec::new();

    // Load: every alert a new incident, each paged once.
    let prefix = format!("{run}-");
    let index = |id: &str| -> Option<usize> { id.strip_prefix(&prefix)?.parse().ok() };
    // Pages per loaded incident.
    let mut pages = vec![0u32; n];
    let mut paged = 0usize;
    let count = |pages: &mut [u32], body: &[u8]| -> usize {
        let mut new = 0;
        for id in ids_in(body) {
            if let Some(k) = index(&id).filter(|k| *k < n) {
                new += usize::from(pages[k] == 0);
                pages[k] += 1;
            }
        }
        new
    };
    let started = Instant::now();
    let requests = n.div_ceil(PER_REQUEST);
    let body = {
        let (target, run) = (target.clone(), run.to_string());
        Arc::new(move |r: usize| {
            let ids: Vec<String> = (r * PER_REQUEST..((r + 1) * PER_REQUEST).min(n))
                .map(|k| format!("{run}-{k}"))
                .collect();
            let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
            serde_json::to_vec(&target.alerts(&ids)).expect("JSON encodes")
        })
    };
    let failures = post_all(&target, requests, CONNECTIONS, body).await?;
    if let Some(first) = failures.first() {
        bail!(
            "{} of {requests} requests failed while opening the incidents, first: {first}",
            failures.len()
        );
    }
    println!(
        "  {n} alerts accepted in {:.1}s; waiting for their pages",
        started.elapsed().as_secs_f64()
    );
    let mut progress_at = Instant::now() + PROGRESS_EVERY;
    let mut last_page = started;
    while paged < n {
        for a in receiver.take() {
            paged += count(&mut pages, &a.body);
            last_page = a.at;
        }
        if started.elapsed() > load_limit {
            bail!("{paged} of {n} incidents paged within {load_limit:?}");
        }
        if Instant::now() >= progress_at {
            println!(
                "  ... {:.0}s: {paged} of {n} paged",
                started.elapsed().as_secs_f64()
            );
            progress_at += PROGRESS_EVERY;
        }
        stack.check()?;
        // Poll interval of a wait with a deadline.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let opened = last_page.duration_since(started);
    let settled = wait_quiet(&js, &mut stack, load_limit).await?;
    println!(
        "  {n} incidents paged {:.1}s after the first send ({:.0}/s); quiet {:.1}s later",
        opened.as_secs_f64(),
        n as f64 / opened.as_secs_f64(),
        settled.as_secs_f64()
    );
    for a in receiver.take() {
        count(&mut pages, &a.body);
    }
    let twice: usize = pages.iter().map(|p| p.saturating_sub(1) as usize).sum();
    if twice > 0 {
        problems.push(format!(
            "{twice} pages beyond the first of an incident while loading"
        ));
    }
    let loaded_rss = stack.rss();
    let quiet_rss = stack.rss_now();
    println!(
        "  with {n} open: {}; peak RSS {}; RSS now {}",
        gauges(&stack).await,
        super::peer::describe_rss(&loaded_rss),
        super::peer::describe_rss(&quiet_rss)
    );
    let settled = settle(&mut stack).await?;
    println!(
        "  settled {:.1}s later: RSS {}; PSS {}",
        settled.after.as_secs_f64(),
        super::peer::describe_rss(&settled.rss),
        super::peer::describe_rss(&settled.pss)
    );

    // The restart below measures an instance taking its own lease back.
    // Under a load the bus answers too slowly, a standby may have taken
    // a lease (its holder stood down when a renewal came too late); then
    // the restarted instance would rightly stay standby. Such a lease is
    // moved back first: its standby stopped until the instance holds it,
    // then started again to follow.
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()?;
    lease_back_to_instances(&mut stack, &http).await?;

    // The kill, a sentinel while they are down, the restart.
    for s in KILLED {
        stack.proc(s)?.kill();
    }
    let sentinel = format!("{run}-sentinel");
    target
        .post_one(&target.alerts(&[&sentinel]))
        .await
        .context("the sentinel alert")?;
    let alerts_last = super::stream_state(&js, STREAM_ALERTS).await?.last_sequence;
    let restarted = Instant::now();
    for s in KILLED {
        stack.respawn(s, ".restarted")?;
    }
    let urls: Vec<String> = KILLED
        .iter()
        .map(|s| Ok(format!("{}/readyz", stack.admin_url(s)?)))
        .collect::<anyhow::Result<_>>()?;
    let mut lease: [Option<Duration>; 2] = [None, None];
    let mut ready: [Option<Duration>; 2] = [None, None];
    let mut caught_up = None;
    let mut again = 0usize;
    let mut progress_at = restarted + PROGRESS_EVERY;
    let result = loop {
        for (i, url) in urls.iter().enumerate() {
            if ready[i].is_some() {
                continue;
            }
            let Some(check) = role_check(&http, url, KILLED[i]).await else {
                continue;
            };
            let at = restarted.elapsed();
            if !(check.starts_with("standby") || check == "waiting for the lease") {
                lease[i].get_or_insert(at);
            }
            if check == "ok" {
                ready[i] = Some(at);
            }
        }
        for a in receiver.take() {
            for id in ids_in(&a.body) {
                if id == sentinel {
                    caught_up.get_or_insert(a.at.duration_since(restarted));
                } else if index(&id).is_some() {
                    again += 1;
                }
            }
        }
        if let ([Some(il), Some(el)], [Some(i), Some(e)], Some(c)) = (lease, ready, caught_up) {
            break finish(
                &mut stack,
                &client,
                &receiver,
                RecoveryParts {
                    n,
                    run,
                    opened_per_s: n as f64 / opened.as_secs_f64(),
                    lease: [il, el],
                    ready: [i, e],
                    caught_up: c,
                    again,
                    loaded_rss,
                    quiet_rss,
                    settled,
                    problems,
                },
            )
            .await;
        }
        let now = Instant::now();
        if now - restarted > RECOVERY_LIMIT {
            bail!(
                "not recovered within {RECOVERY_LIMIT:?} of the restart: incidents lease {}, ready {}; escalation \
                 lease {}, ready {}; sentinel paged {} (ALERTS last sequence {alerts_last})",
                yes_no(lease[0]),
                yes_no(ready[0]),
                yes_no(lease[1]),
                yes_no(ready[1]),
                yes_no(caught_up),
            );
        }
        if now >= progress_at {
            println!(
                "  ... {:.0}s after the restart: incidents lease {}, ready {}; escalation lease {}, ready {}; \
                 sentinel paged {}",
                (now - restarted).as_secs_f64(),
                yes_no(lease[0]),
                yes_no(ready[0]),
                yes_no(lease[1]),
                yes_no(ready[1]),
                yes_no(caught_up),
            );
            progress_at += PROGRESS_EVERY;
        }
        for s in KILLED {
            stack.proc(s)?.check_running()?;
        }
        // Poll interval of a wait with a deadline.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }?;
    let taken = takeover(&mut stack, &js, &receiver, &target, run).await?;
    Ok((result, taken))
}

/// The standbys take over: once each has followed INCIDENTS to its last
/// sequence, SIGKILL the active incidents and escalation (left down), send
/// a second sentinel, and time from the kill until each standby is active
/// and caught up (`/readyz` `ok`) and until the sentinel's page arrives.
async fn takeover(
    stack: &mut TocsinStack,
    js: &async_nats::jetstream::Context,
    receiver: &Receiver,
    target: &super::page_path::Target,
    run: &str,
) -> anyhow::Result<Takeover> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()?;
    let admin: Vec<(String, String)> = stack
        .standbys
        .iter()
        .map(|(s, _, port)| (s.clone(), format!("http://127.0.0.1:{port}")))
        .collect();
    let metrics = |url: String| {
        let http = http.clone();
        async move {
            match http.get(format!("{url}/metrics")).send().await {
                Ok(r) => r.text().await.unwrap_or_default(),
                Err(_) => String::new(),
            }
        }
    };
    // Followed: every standby's store at the stream's end. An engine
    // whose standbys do not follow has no such gauge: then at once.
    let started = Instant::now();
    loop {
        let last = super::stream_state(js, STREAM_INCIDENTS)
            .await?
            .last_sequence;
        let mut behind = Vec::new();
        let mut reported = 0;
        for (s, url) in &admin {
            let text = metrics(url.clone()).await;
            let seq = super::samples(&text, "tocsin_standby_followed_sequence");
            reported += seq.len();
            let seq = seq.iter().map(|(_, v)| *v as u64).max().unwrap_or(0);
            if seq < last {
                behind.push(format!("{s} at {seq} of {last}"));
            }
        }
        if behind.is_empty() {
            break;
        }
        if reported == 0 && started.elapsed() > Duration::from_secs(5) {
            println!(
                "  the standbys report no tocsin_standby_followed_sequence: they do not follow"
            );
            break;
        }
        if started.elapsed() > RECOVERY_LIMIT {
            bail!(
                "the standbys did not follow {STREAM_INCIDENTS} within {RECOVERY_LIMIT:?}: {}",
                behind.join(", ")
            );
        }
        // Poll interval of a wait with a deadline.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for s in KILLED {
        stack.proc(s)?.kill();
    }
    let killed = Instant::now();
    let sentinel = format!("{run}-takeover");
    target
        .post_one(&target.alerts(&[&sentinel]))
        .await
        .context("the takeover's sentinel alert")?;
    let mut ready: [Option<Duration>; 2] = [None, None];
    let mut paged = None;
    loop {
        for (i, (s, url)) in admin.iter().enumerate() {
            if ready[i].is_none()
                && role_check(&http, &format!("{url}/readyz"), s)
                    .await
                    .as_deref()
                    == Some("ok")
            {
                ready[i] = Some(killed.elapsed());
            }
        }
        for a in receiver.take() {
            if ids_in(&a.body).contains(&sentinel) {
                paged.get_or_insert(a.at.duration_since(killed));
            }
        }
        if let ([Some(i), Some(e)], Some(p)) = (ready, paged) {
            let text = metrics(admin[0].1.clone()).await;
            let replayed = super::samples(&text, "tocsin_incidents_catch_up_entries_total")
                .iter()
                .map(|(_, v)| v)
                .sum();
            let text = metrics(admin[1].1.clone()).await;
            let sent = super::samples(&text, "tocsin_escalation_pages_total")
                .iter()
                .map(|(_, v)| v)
                .sum();
            let rss = stack
                .standbys
                .iter()
                .map(|(s, p, _)| (format!("tocsin {s}"), peer::peak_rss_mib(Some(p.pid()))))
                .collect();
            return Ok(Takeover {
                ready: [i, e],
                paged: p,
                sent,
                replayed,
                rss,
            });
        }
        if killed.elapsed() > RECOVERY_LIMIT {
            bail!(
                "the standbys did not take over within {RECOVERY_LIMIT:?}: incidents ready {}, escalation ready {}, \
                 sentinel paged {}",
                yes_no(ready[0]),
                yes_no(ready[1]),
                yes_no(paged),
            );
        }
        for (_, p, _) in stack.standbys.iter_mut() {
            p.check_running()?;
        }
        // Poll interval of a wait with a deadline.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What [`once`] measured up to the sentinel's page.
struct RecoveryParts<'a> {
    n: usize,
    run: &'a str,
    opened_per_s: f64,
    lease: [Duration; 2],
    ready: [Duration; 2],
    caught_up: Duration,
    /// Pages of the loaded incidents after the restart.
    again: usize,
    loaded_rss: Vec<(String, Option<f64>)>,
    quiet_rss: Vec<(String, Option<f64>)>,
    settled: Settled,
    problems: Vec<String>,
}

/// After the sentinel's page: a bounded look for pages that come again,
/// and every open incident listed.
async fn finish(
    stack: &mut TocsinStack,
    client: &async_nats::Client,
    receiver: &Receiver,
    parts: RecoveryParts<'_>,
) -> anyhow::Result<RecoveryResult> {
    let RecoveryParts {
        n,
        run,
        opened_per_s,
        lease,
        ready,
        caught_up,
        mut again,
        loaded_rss,
        quiet_rss,
        settled,
        mut problems,
    } = parts;
    // A harness that reports what it saw: a page later than this goes
    // uncounted.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let prefix = format!("{run}-");
    for a in receiver.take() {
        again += ids_in(&a.body)
            .iter()
            .filter(|id| id.starts_with(&prefix))
            .count();
    }
    if again > 0 {
        problems.push(format!(
            "{again} pages of incidents paged before the kill came again after the restart"
        ));
    }
    let listed = open_incidents(client, &prefix).await?;
    let (mut loaded, mut sentinel, mut other) = (0usize, 0usize, 0usize);
    for id in &listed {
        match id.strip_prefix(&prefix) {
            Some("sentinel") => sentinel += 1,
            Some("warmup") => {}
            Some(k) if k.parse::<usize>().is_ok_and(|k| k < n) => loaded += 1,
            _ => other += 1,
        }
    }
    println!(
        "  after the restart: {} open incidents of this run listed ({loaded} of the {n} loaded, the warm-up's, \
         sentinel {sentinel}, other {other}); {}",
        listed.len(),
        gauges(stack).await,
    );
    if loaded != n || sentinel != 1 || other != 0 {
        problems.push(format!(
            "after the restart {loaded} of {n} loaded incidents, {sentinel} sentinel(s) and {other} others listed open"
        ));
    }
    let restarted_rss: Vec<(String, Option<f64>)> = KILLED
        .iter()
        .map(|s| {
            let pid = stack.proc(s)?.pid();
            Ok((format!("tocsin {s}"), peer::peak_rss_mib(Some(pid))))
        })
        .collect::<anyhow::Result<_>>()?;
    println!(
        "  restarted processes' peak RSS (recovery and listing): {}",
        super::peer::describe_rss(&restarted_rss)
    );
    stack.check()?;
    Ok(RecoveryResult {
        opened_per_s,
        lease,
        ready,
        caught_up,
        loaded_rss,
        quiet_rss,
        settled,
        restarted_rss,
        problems,
    })
}

/// Makes the instances of [`KILLED`] hold their leases: a lease a standby
/// holds is moved back by stopping that standby until the instance has
/// taken it (after the lease TTL), then starting it again. Says what it
/// moved; an error if an instance does not take its lease within
/// [`RECOVERY_LIMIT`].
async fn lease_back_to_instances(
    stack: &mut TocsinStack,
    http: &reqwest::Client,
) -> anyhow::Result<()> {
    for role in KILLED {
        let url = format!("{}/readyz", stack.admin_url(role)?);
        let Some(check) = role_check(http, &url, role).await else {
            continue;
        };
        if !check.starts_with("standby") || !stack.kill_standby(role) {
            continue;
        }
        println!(
            "  the {role} standby took the lease during the load (`{check}`); it is stopped until the \
             instance takes the lease back, then started again"
        );
        let started = Instant::now();
        loop {
            if role_check(http, &url, role).await.as_deref() == Some("ok") {
                break;
            }
            if started.elapsed() > RECOVERY_LIMIT {
                bail!("the {role} instance did not take its lease back within {RECOVERY_LIMIT:?}");
            }
            stack.proc(role)?.check_running()?;
            // Poll interval of a wait with a deadline.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        println!(
            "  the {role} instance holds the lease again {:.1}s later",
            started.elapsed().as_secs_f64()
        );
        stack.restart_standby(role, ".restarted").await?;
    }
    Ok(())
}

/// The `/readyz` check of `role` (`ok`, `standby: ...`, `catching up ...`),
/// None while the process does not answer.
async fn role_check(http: &reqwest::Client, url: &str, role: &str) -> Option<String> {
    let body: serde_json::Value = http.get(url).send().await.ok()?.json().await.ok()?;
    body["checks"][role].as_str().map(str::to_string)
}

fn yes_no(d: Option<Duration>) -> String {
    d.map_or("not yet".into(), |d| format!("at {:.2}s", d.as_secs_f64()))
}

/// The incidents and escalation gauges that say what they hold.
async fn gauges(stack: &TocsinStack) -> String {
    let mut out = Vec::new();
    for (service, names) in [
        (
            "incidents",
            &["tocsin_incidents_open", "tocsin_incidents_in_memory"][..],
        ),
        ("escalation", &["tocsin_escalation_tracks"][..]),
    ] {
        let Ok(url) = stack.admin_url(service) else {
            continue;
        };
        let text = match reqwest::get(format!("{url}/metrics")).await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        for name in names {
            let v: f64 = super::samples(&text, name).iter().map(|(_, v)| v).sum();
            out.push(format!("{name} {v:.0}"));
        }
    }
    out.join(", ")
}

/// The Tocsin processes' sum of `mib` (nats-server left out).
fn tocsin_sum(mib: &[(String, Option<f64>)]) -> f64 {
    mib.iter()
        .filter(|(name, _)| name != "nats-server")
        .filter_map(|(_, m)| *m)
        .sum()
}

/// Memory once settled: RSS and PSS of every process, and how long after
/// the quiet sample.
struct Settled {
    after: Duration,
    rss: Vec<(String, Option<f64>)>,
    pss: Vec<(String, Option<f64>)>,
}

/// How long the Tocsin processes' RSS must not fall before it counts as
/// settled, and the longest [`settle`] waits.
const SETTLE_STEADY: Duration = Duration::from_secs(5);
const SETTLE_LIMIT: Duration = Duration::from_secs(60);

/// Waits, with the engine quiet, until the Tocsin processes' RSS has not
/// fallen by more than 1 MiB for [`SETTLE_STEADY`] (at most
/// [`SETTLE_LIMIT`]): the allocator hands memory the services freed back
/// to the system over seconds (jemalloc's decay), so RSS right after the
/// load still holds some of the load's garbage. Then RSS and PSS.
async fn settle(stack: &mut TocsinStack) -> anyhow::Result<Settled> {
    let started = Instant::now();
    let mut low = tocsin_sum(&stack.rss_now());
    let mut low_since = started;
    while started.elapsed() < SETTLE_LIMIT && low_since.elapsed() < SETTLE_STEADY {
        // Poll interval of a wait with a deadline: it waits for RSS to stop
        // falling (a measurement), it proves nothing about the engine.
        tokio::time::sleep(Duration::from_millis(500)).await;
        stack.check()?;
        let now = tocsin_sum(&stack.rss_now());
        if now < low - 1.0 {
            low = now;
            low_since = Instant::now();
        }
    }
    Ok(Settled {
        after: started.elapsed(),
        rss: stack.rss_now(),
        pss: stack.pss_now(),
    })
}

/// Waits until no stream has grown for [`QUIET`] and no durable consumer
/// (incidents' on COMMANDS, the notifier's on NOTIFY and INCIDENTS) has
/// anything pending or unacknowledged; how long that took. Fails after
/// `limit` or if a process exited.
async fn wait_quiet(
    js: &async_nats::jetstream::Context,
    stack: &mut TocsinStack,
    limit: Duration,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut last: Option<(Vec<u64>, Instant)> = None;
    let mut progress_at = started + PROGRESS_EVERY;
    loop {
        let mut seqs = Vec::new();
        let mut busy = Vec::new();
        for name in [
            STREAM_ALERTS,
            STREAM_COMMANDS,
            STREAM_INCIDENTS,
            STREAM_NOTIFY,
        ] {
            seqs.push(super::stream_state(js, name).await?.last_sequence);
            let stream = js.get_stream(name).await?;
            let infos: Vec<_> = stream.consumers().try_collect().await?;
            for info in infos {
                if info.config.durable_name.is_some()
                    && (info.num_pending > 0 || info.num_ack_pending > 0)
                {
                    busy.push(format!(
                        "{} on {name}: {} pending, {} unacknowledged",
                        info.name, info.num_pending, info.num_ack_pending
                    ));
                }
            }
        }
        let now = Instant::now();
        match &last {
            Some((prev, since)) if *prev == seqs => {
                if busy.is_empty() && now - *since >= QUIET {
                    return Ok(started.elapsed());
                }
            }
            _ => last = Some((seqs, now)),
        }
        if now - started > limit {
            bail!(
                "the engine was not quiet within {limit:?}: {}",
                busy.join("; ")
            );
        }
        if now >= progress_at {
            println!(
                "  ... {:.0}s: not quiet yet: {}",
                (now - started).as_secs_f64(),
                if busy.is_empty() {
                    "the streams still grow".to_string()
                } else {
                    busy.join("; ")
                }
            );
            progress_at += PROGRESS_EVERY;
        }
        stack.check()?;
        // Poll interval of a wait with a deadline.
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The `ID_LABEL` of every open incident (triggered or acknowledged)
/// whose label starts with `prefix`, listed a page of 500 at a time.
async fn open_incidents(client: &async_nats::Client, prefix: &str) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    let mut q = ListIncidents {
        status: vec![IncidentStatus::Triggered, IncidentStatus::Acknowledged],
        limit: Some(500),
        ..Default::default()
    };
    loop {
        let reply = tokio::time::timeout(
            Duration::from_secs(10),
            client.request(query::LIST_INCIDENTS, Bytes::from(codec::encode(&q)?)),
        )
        .await
        .context("the list query was not answered within 10s")??;
        let (incidents, stopped) = match codec::decode(&reply.payload)? {
            QueryReply::Incidents {
                incidents,
                next_before,
            } => (incidents, next_before),
            other => bail!("the list query answered {other:?}"),
        };
        out.extend(
            incidents
                .iter()
                .filter_map(|i| i.labels.get(ID_LABEL))
                .filter(|id| id.starts_with(prefix))
                .cloned(),
        );
        if !q.walk_on(&incidents, stopped) {
            return Ok(out);
        }
    }
}
