//! `tocsin report`: MTTA, MTTR and on-call load, computed (purely, in
//! [`compute`]) from the incidents opened in a window and their timelines.
//!
//! Time to acknowledge is from an incident's opening to its first
//! `acknowledged` entry; time to resolve from its opening to its first
//! `resolved` entry (so a reopen does not stretch it). Percentiles are
//! nearest-rank; the mean is rounded to whole seconds. A page goes to a
//! person once per `paged` entry naming them, however many channels; a
//! night is woken when a page arrives between `night_starts` and
//! `night_ends` local time (a night is named by its evening's date).

use std::collections::{BTreeMap, BTreeSet};

use jiff::{tz::TimeZone, Timestamp};
use tocsin_proto::{
    command::IncidentRef,
    incident::{EventKind, Severity},
    query::{
        AlertCount, DurationStats, IncidentDetail, ListIncidents, PersonLoad, Report, ReportQuery,
        ReportReply, ServiceFigures, SeverityCount,
    },
};

use crate::{config::ReportConfig, http::App, ops};

/// Nearest-rank statistics of `v` (seconds).
pub fn stats(mut v: Vec<u64>) -> DurationStats {
    if v.is_empty() {
        return DurationStats::default();
    }
    v.sort_unstable();
    let n = v.len();
    let rank = |p: f64| v[((p * n as f64).ceil() as usize).clamp(1, n) - 1];
    let sum: u128 = v.iter().map(|x| *x as u128).sum();
    DurationStats {
        count: n as u64,
        mean_seconds: Some(((sum + n as u128 / 2) / n as u128) as u64),
        p50_seconds: Some(rank(0.5)),
        p90_seconds: Some(rank(0.9)),
    }
}

/// The person a timeline page names (`alice (on call for primary) via
/// sms` -> alice), or None for channels, PagerDuty services and webhooks.
pub fn paged_person(page: &str) -> Option<&str> {
    let who = page.split(" via ").next()?;
    let who = who.split(" (on call for ").next()?.trim();
    if who.is_empty()
        || who.starts_with('#')
        || who.starts_with("PagerDuty service ")
        || who.starts_with("webhook ")
    {
        return None;
    }
    Some(who)
}

fn secs_between(from: Timestamp, to: Timestamp) -> u64 {
    to.duration_since(from).as_secs().max(0) as u64
}

/// The report over `details` (incidents with their timelines and alerts),
/// counting those opened in `[since, until]`.
pub fn compute(
    details: &[IncidentDetail],
    since: Timestamp,
    until: Timestamp,
    cfg: &ReportConfig,
    truncated: bool,
) -> Report {
    let tz = TimeZone::get(&cfg.timezone).unwrap_or(TimeZone::UTC);
    let mut by_sev: BTreeMap<Severity, u64> = BTreeMap::new();
    let (mut tta, mut ttr) = (Vec::new(), Vec::new());
    let mut services: BTreeMap<String, (u64, Vec<u64>, Vec<u64>)> = BTreeMap::new();
    let (mut resolved, mut by_runbook) = (0u64, 0u64);
    let mut alerts: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    let mut load: BTreeMap<String, (u64, BTreeSet<jiff::civil::Date>)> = BTreeMap::new();
    let mut count = 0u64;
    for d in details {
        let i = &d.incident;
        if i.opened_at < since || i.opened_at > until {
            continue;
        }
        count += 1;
        *by_sev.entry(i.severity).or_default() += 1;
        let service = i
            .labels
            .get("service")
            .cloned()
            .unwrap_or_else(|| "(none)".into());
        let s = services.entry(service).or_default();
        s.0 += 1;
        if let Some(a) = d
            .timeline
            .iter()
            .find(|e| matches!(e.kind, EventKind::Acknowledged))
        {
            let t = secs_between(i.opened_at, a.at);
            tta.push(t);
            s.1.push(t);
        }
        if let Some(r) = d
            .timeline
            .iter()
            .find(|e| matches!(e.kind, EventKind::Resolved { .. }))
        {
            let t = secs_between(i.opened_at, r.at);
            ttr.push(t);
            s.2.push(t);
            resolved += 1;
            if r.actor.as_ref().is_some_and(|a| a.via == "runbook") {
                by_runbook += 1;
            }
        }
        let mut names: BTreeMap<&str, u64> = BTreeMap::new();
        for a in &d.alerts {
            if let Some(n) = a.labels.get("alertname") {
                *names.entry(n.as_str()).or_default() += 1;
            }
        }
        for (n, k) in names {
            let e = alerts.entry(n.to_string()).or_default();
            e.0 += 1;
            e.1 += k;
        }
        for e in &d.timeline {
            let EventKind::Paged { pages, .. } = &e.kind else {
                continue;
            };
            let people: BTreeSet<&str> = pages.iter().filter_map(|p| paged_person(p)).collect();
            let local = e.at.to_zoned_datetime(tz.clone());
            let hour = local.hour() as u8;
            let at_night = if cfg.night_starts > cfg.night_ends {
                hour >= cfg.night_starts || hour < cfg.night_ends
            } else {
                hour >= cfg.night_starts && hour < cfg.night_ends
            };
            let night = if cfg.night_starts > cfg.night_ends && hour < cfg.night_ends {
                local.date().yesterday().unwrap_or(local.date())
            } else {
                local.date()
            };
            for p in people {
                let l = load.entry(p.to_string()).or_default();
                l.0 += 1;
                if at_night {
                    l.1.insert(night);
                }
            }
        }
    }
    let mut noisiest: Vec<AlertCount> = alerts
        .into_iter()
        .map(|(alertname, (incidents, alerts))| AlertCount {
            alertname,
            incidents,
            alerts,
        })
        .collect();
    noisiest.sort_by(|a, b| {
        (b.incidents, b.alerts)
            .cmp(&(a.incidents, a.alerts))
            .then(a.alertname.cmp(&b.alertname))
    });
    noisiest.truncate(cfg.top_alerts);
    let mut oncall_load: Vec<PersonLoad> = load
        .into_iter()
        .map(|(user, (pages, nights))| PersonLoad {
            user,
            pages,
            nights_woken: nights.len() as u64,
        })
        .collect();
    oncall_load.sort_by(|a, b| b.pages.cmp(&a.pages).then(a.user.cmp(&b.user)));
    Report {
        since,
        until,
        incidents: count,
        truncated,
        by_severity: by_sev
            .into_iter()
            .rev()
            .map(|(severity, incidents)| SeverityCount {
                severity,
                incidents,
            })
            .collect(),
        mtta: stats(tta),
        mttr: stats(ttr),
        by_service: services
            .into_iter()
            .map(|(service, (incidents, a, r))| ServiceFigures {
                service,
                incidents,
                mtta: stats(a),
                mttr: stats(r),
            })
            .collect(),
        resolved,
        resolved_by_runbook: by_runbook,
        runbook_share_permille: (by_runbook * 1000).checked_div(resolved).unwrap_or(0),
        noisiest_alerts: noisiest,
        oncall_load,
    }
}

/// Gathers the incidents opened in the window (newest first, pages of
/// 1,000, at most `report.max_incidents`) with their timelines, and
/// computes the report.
pub(crate) async fn build(app: &App, since_seconds: u64) -> ReportReply {
    let until = app.bus.now();
    let Some(since) = i64::try_from(since_seconds)
        .ok()
        .and_then(|s| until.checked_sub(jiff::SignedDuration::from_secs(s)).ok())
    else {
        return ReportReply::Error {
            reason: format!("since: {since_seconds}s reaches before the year -9999"),
        };
    };
    let max = app.cfg.report.max_incidents;
    let mut details = Vec::new();
    let mut truncated = false;
    let mut q = ListIncidents {
        since: Some(since),
        limit: Some(1000),
        ..Default::default()
    };
    loop {
        let (page, stopped) = match ops::list_page(app, &q).await {
            Ok(Ok(p)) => p,
            Ok(Err(reason)) => return ReportReply::Error { reason },
            Err(e) => {
                return ReportReply::Error {
                    reason: e.to_string(),
                }
            }
        };
        for i in &page {
            if details.len() >= max {
                truncated = true;
                break;
            }
            match ops::get_incident(app, IncidentRef::Id(i.id), true).await {
                Ok(Ok(d)) => details.push(d),
                Ok(Err(_)) => {}
                Err(e) => {
                    return ReportReply::Error {
                        reason: e.to_string(),
                    }
                }
            }
        }
        if truncated || !q.walk_on(&page, stopped) {
            break;
        }
    }
    ReportReply::Report(Box::new(compute(
        &details,
        since,
        until,
        &app.cfg.report,
        truncated,
    )))
}

/// Answers `tocsin.query.report` (queue group: one replica answers).
pub(crate) async fn serve(app: std::sync::Arc<App>, shutdown: tokio_util::sync::CancellationToken) {
    let mut backoff = tocsin_runtime::retry::Backoff::standard();
    let queries = loop {
        match tocsin_runtime::query::Queries::subscribe(
            app.bus.js(),
            "tocsin-chatops",
            &[tocsin_proto::subjects::query::REPORT],
        )
        .await
        {
            Ok(q) => break q,
            Err(e) => {
                tracing::warn!(error = %e, "cannot subscribe to report queries; retrying");
                if !backoff.wait(&shutdown).await {
                    return;
                }
            }
        }
    };
    // Reports are few and slow; one at a time per replica keeps the
    // incidents service's query load bounded.
    queries
        .serve(shutdown, |_, payload| {
            let app = app.clone();
            async move {
                let answer = match tocsin_proto::codec::decode::<ReportQuery>(&payload) {
                    Ok(q) => build(&app, q.since_seconds).await,
                    Err(e) => ReportReply::Error {
                        reason: format!("bad report query: {e}"),
                    },
                };
                tocsin_proto::codec::encode(&answer).map_err(|e| e.to_string())
            }
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_stats() {
        let s = stats(vec![60, 120, 180, 240, 600]);
        assert_eq!(s.count, 5);
        assert_eq!(s.mean_seconds, Some(240));
        assert_eq!(s.p50_seconds, Some(180));
        assert_eq!(s.p90_seconds, Some(600));
        let s = stats(vec![10]);
        assert_eq!((s.p50_seconds, s.p90_seconds), (Some(10), Some(10)));
        assert_eq!(stats(vec![]), DurationStats::default());
    }

    #[test]
    fn people_on_timelines() {
        assert_eq!(paged_person("alice via sms"), Some("alice"));
        assert_eq!(
            paged_person("alice (on call for primary) via sms after 300s"),
            Some("alice")
        );
        assert_eq!(paged_person("#ops via slack"), None);
        assert_eq!(
            paged_person("PagerDuty service payments via pagerduty"),
            None
        );
        assert_eq!(paged_person("webhook ci via webhook"), None);
    }
}
