//! Operator commands: `tocsin ack 42`, `resolve`, `snooze`, `note`, `list`,
//! `show`. They send commands on the COMMANDS stream and wait for the
//! incidents service's answer, or ask it a query; they need only the `nats:`
//! section of the config.

use std::time::Duration;

use anyhow::{bail, Context as _};
use async_nats::{Client, HeaderMap};
use futures::StreamExt;
use jiff::Timestamp;
use tocsin_proto::{
    codec,
    command::{Action, Command, CommandReply, IncidentRef},
    incident::{Actor, IncidentStatus},
    query::{GetIncident, ListIncidents, QueryReply},
    subjects::{headers, query},
    Envelope,
};
use tocsin_runtime::admin::Metrics;

use crate::config::OperatorConfig as Config;

/// How long to wait for NATS and for the incidents service.
const PATIENCE: Duration = Duration::from_secs(10);

async fn connect(config: &Config) -> anyhow::Result<Client> {
    let client = tocsin_runtime::nats::connect_as(
        &config.nats,
        Config::IDENTITY,
        "tocsin-cli",
        &Metrics::new(),
    )
    .await?;
    tokio::time::timeout(PATIENCE, client.flush())
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "cannot reach NATS at {} within {PATIENCE:?}",
                config.nats.url
            )
        })?
        .with_context(|| format!("cannot reach NATS at {}", config.nats.url))?;
    Ok(client)
}

/// Parses `42`, `#42` or an incident UUID.
pub fn incident_ref(s: &str) -> Result<IncidentRef, String> {
    let t = s.trim().trim_start_matches('#');
    if let Ok(n) = t.parse::<u64>() {
        return Ok(IncidentRef::Number(n));
    }
    t.parse::<uuid::Uuid>()
        .map(IncidentRef::Id)
        .map_err(|_| format!("{s:?} is neither an incident number (42, #42) nor an incident id"))
}

/// Sends `action` as `actor` and waits for the answer. Returns whether it
/// was accepted, and the message to print.
pub async fn command(
    config: &Config,
    actor: &str,
    action: Action,
) -> anyhow::Result<(bool, String)> {
    let client = connect(config).await?;
    let js = config.jetstream.context(client.clone());
    let cmd = Command::new(Actor::new(actor, "cli"), action);
    let inbox = client.new_inbox();
    let mut replies = client.subscribe(inbox.clone()).await?;
    let mut h = HeaderMap::new();
    h.insert(headers::REPLY_TO, inbox.as_str());
    h.insert(headers::MSG_ID, cmd.id.as_str());
    let env = Envelope::new("cli", Timestamp::now(), cmd.clone());
    js.publish_with_headers(cmd.subject(), h, codec::encode(&env)?.into())
        .await
        .context("cannot send the command")?
        .await
        .context("JetStream did not store the command")?;
    let msg = tokio::time::timeout(PATIENCE, replies.next())
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "the command is stored but no answer came within {PATIENCE:?}; \
                 is the incidents service running? It will apply the command when it runs"
            )
        })?
        .context("reply subscription closed")?;
    Ok(match codec::decode::<CommandReply>(&msg.payload)? {
        CommandReply::Accepted { message, .. } => (true, message),
        CommandReply::Rejected { reason, .. } => (false, reason),
    })
}

async fn ask<Q: serde::Serialize>(
    client: &Client,
    subject: &'static str,
    q: &Q,
) -> anyhow::Result<QueryReply> {
    let resp = tokio::time::timeout(PATIENCE, client.request(subject, codec::encode(q)?.into()))
        .await
        .map_err(|_| {
            anyhow::anyhow!("no answer within {PATIENCE:?}; is the incidents service running?")
        })?
        .map_err(|e| anyhow::anyhow!("query failed ({e}); is the incidents service running?"))?;
    Ok(codec::decode(&resp.payload)?)
}

/// `tocsin list`: one line per incident, most recent first.
pub async fn list(config: &Config, all: bool, limit: usize) -> anyhow::Result<String> {
    let client = connect(config).await?;
    let q = ListIncidents {
        status: if all {
            vec![]
        } else {
            vec![IncidentStatus::Triggered, IncidentStatus::Acknowledged]
        },
        limit: Some(limit),
        ..Default::default()
    };
    let QueryReply::Incidents { incidents } = ask(&client, query::LIST_INCIDENTS, &q).await? else {
        bail!("unexpected answer to a list query");
    };
    let mut out = format!(
        "{:<7} {:<13} {:<9} {:<7} {:<20} TITLE\n",
        "#", "STATUS", "SEVERITY", "ALERTS", "OPENED"
    );
    for i in &incidents {
        let status = if i.suppressed.is_some() {
            format!("{}*", i.status.as_str())
        } else {
            i.status.as_str().to_string()
        };
        out.push_str(&format!(
            "{:<7} {:<13} {:<9} {:<7} {:<20} {}\n",
            format!("#{}", i.number),
            status,
            i.severity.as_str(),
            format!("{}/{}", i.alerts_firing, i.alerts_total),
            i.opened_at.strftime("%Y-%m-%d %H:%M:%S").to_string(),
            i.title
        ));
    }
    if incidents.is_empty() {
        out.push_str(if all {
            "(no incidents)\n"
        } else {
            "(no open incidents; --all shows resolved ones)\n"
        });
    }
    if incidents.iter().any(|i| i.suppressed.is_some()) {
        out.push_str("* silenced, inhibited or in a maintenance window: pages nobody\n");
    }
    Ok(out)
}

/// `tocsin show 42`: the incident, its alerts and its timeline.
pub async fn show(config: &Config, incident: IncidentRef) -> anyhow::Result<String> {
    let client = connect(config).await?;
    let d = match ask(
        &client,
        query::GET_INCIDENT,
        &GetIncident {
            incident,
            timeline: true,
        },
    )
    .await?
    {
        QueryReply::Incident(d) => d,
        QueryReply::Error { reason } => bail!("{reason}"),
        _ => bail!("unexpected answer to a get query"),
    };
    let i = &d.incident;
    let mut out = format!("#{} {}\n", i.number, i.title);
    out.push_str(&format!(
        "  id:        {}\n  status:    {}",
        i.id,
        i.status.as_str()
    ));
    if let Some(a) = &i.acknowledged_by {
        out.push_str(&format!(" (acknowledged by {} via {})", a.name, a.via));
    }
    out.push_str(&format!(
        "\n  severity:  {}\n  opened:    {}\n",
        i.severity.as_str(),
        i.opened_at
    ));
    if let Some(r) = i.resolved_at {
        out.push_str(&format!("  resolved:  {r}\n"));
    }
    if let Some(s) = &i.suppressed {
        out.push_str(&format!("  suppressed: {s}\n"));
    }
    out.push_str(&format!(
        "  alerts ({} firing of {}):\n",
        i.alerts_firing, i.alerts_total
    ));
    for a in &d.alerts {
        let labels: Vec<String> = a.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        out.push_str(&format!(
            "    {} {:<8} {}\n",
            a.fingerprint,
            a.status.as_str(),
            labels.join(" ")
        ));
    }
    out.push_str("  timeline:\n");
    for e in &d.timeline {
        let who = e
            .actor
            .as_ref()
            .map(|a| format!(" by {} ({})", a.name, a.via))
            .unwrap_or_default();
        let what = match &e.kind {
            tocsin_proto::incident::EventKind::Delivery { delivery } => {
                format!("delivery: {}", delivery.describe())
            }
            tocsin_proto::incident::EventKind::NoteAdded { text } => format!("note: {text}"),
            tocsin_proto::incident::EventKind::Remediation {
                runbook,
                step,
                status,
                detail,
                ..
            } => {
                // Step output is multi-line: indent it under the entry.
                let detail = detail.replace('\n', "\n        ");
                format!("remediation {runbook}/{step} {status}: {detail}")
            }
            other => other.name().to_string(),
        };
        out.push_str(&format!("    {}  {}{}\n", e.at, what, who));
    }
    Ok(out)
}

/// `tocsin oncall [SCHEDULE] [--at T]`: who is on call (for every schedule
/// when none is named), until when, and who is next.
pub async fn oncall(
    config: &Config,
    schedule: Option<String>,
    at: Option<Timestamp>,
) -> anyhow::Result<String> {
    use tocsin_proto::query::{ListSchedules, OnCallQuery, OnCallReply, ScheduleList};
    let client = connect(config).await?;
    let names = match schedule {
        Some(s) => vec![s],
        None => {
            let resp = tokio::time::timeout(
                PATIENCE,
                client.request(
                    query::ESCALATION_SCHEDULES,
                    codec::encode(&ListSchedules {})?.into(),
                ),
            )
            .await
            .map_err(|_| {
                anyhow::anyhow!("no answer within {PATIENCE:?}; is the escalation service running?")
            })?
            .map_err(|e| {
                anyhow::anyhow!("query failed ({e}); is the escalation service running?")
            })?;
            codec::decode::<ScheduleList>(&resp.payload)?.schedules
        }
    };
    if names.is_empty() {
        return Ok("(no schedules configured under escalation.schedules)\n".into());
    }
    let mut out = String::new();
    for name in names {
        let q = OnCallQuery {
            schedule: name.clone(),
            at,
        };
        let resp = tokio::time::timeout(
            PATIENCE,
            client.request(query::ESCALATION_ONCALL, codec::encode(&q)?.into()),
        )
        .await
        .map_err(|_| {
            anyhow::anyhow!("no answer within {PATIENCE:?}; is the escalation service running?")
        })?
        .map_err(|e| anyhow::anyhow!("query failed ({e}); is the escalation service running?"))?;
        match codec::decode::<OnCallReply>(&resp.payload)? {
            OnCallReply::OnCall(v) => {
                let who = v.user.clone().unwrap_or_else(|| "nobody".into());
                let until = v
                    .shift_end
                    .map(|t| format!(" until {t}"))
                    .unwrap_or_default();
                out.push_str(&format!("{name}: {who}{until}\n"));
                for s in v.next.iter().take(3) {
                    out.push_str(&format!(
                        "  then {} from {} to {}\n",
                        s.user, s.start, s.end
                    ));
                }
            }
            OnCallReply::Error { reason } => bail!("{reason}"),
        }
    }
    Ok(out)
}

/// How long a report may take (it reads every incident of the window).
const REPORT_PATIENCE: Duration = Duration::from_secs(120);

/// `tocsin report --since 30d [--output json]`: asks the chat-ops service
/// (`tocsin.query.report`), which computes it from the incidents service's
/// answers with its clock as "now".
pub async fn report(config: &Config, since: Duration, json: bool) -> anyhow::Result<String> {
    use tocsin_proto::query::{ReportQuery, ReportReply};
    let client = connect(config).await?;
    let q = ReportQuery {
        since_seconds: since.as_secs(),
    };
    let resp = tokio::time::timeout(
        REPORT_PATIENCE,
        client.request(query::REPORT, codec::encode(&q)?.into()),
    )
    .await
    .map_err(|_| {
        anyhow::anyhow!("no report within {REPORT_PATIENCE:?}; is the chatops service running?")
    })?
    .map_err(|e| {
        anyhow::anyhow!(
            "report query failed ({e}); is the chatops service running (a `chatops:` section)?"
        )
    })?;
    let report = match codec::decode::<ReportReply>(&resp.payload)? {
        ReportReply::Report(r) => r,
        ReportReply::Error { reason } => bail!("{reason}"),
    };
    if json {
        return Ok(format!("{}\n", serde_json::to_string_pretty(&report)?));
    }
    Ok(report_text(&report))
}

/// Seconds as `1h 05m`, `4m 10s`, `12s`; `-` for none.
fn human(s: Option<u64>) -> String {
    match s {
        None => "-".into(),
        Some(s) if s >= 3600 => format!("{}h {:02}m", s / 3600, (s % 3600) / 60),
        Some(s) if s >= 60 => format!("{}m {:02}s", s / 60, s % 60),
        Some(s) => format!("{s}s"),
    }
}

fn report_text(r: &tocsin_proto::query::Report) -> String {
    let stats = |d: &tocsin_proto::query::DurationStats| {
        format!(
            "mean {:<9} p50 {:<9} p90 {:<9} (n={})",
            human(d.mean_seconds),
            human(d.p50_seconds),
            human(d.p90_seconds),
            d.count
        )
    };
    let mut out = format!("Incidents opened {} .. {}\n", r.since, r.until);
    if r.truncated {
        out.push_str("(only the newest incidents: raise chatops.report.max_incidents for all)\n");
    }
    out.push_str(&format!("  total: {}", r.incidents));
    for s in &r.by_severity {
        out.push_str(&format!("  {}: {}", s.severity.as_str(), s.incidents));
    }
    out.push_str(&format!(
        "\n  MTTA: {}\n  MTTR: {}\n",
        stats(&r.mtta),
        stats(&r.mttr)
    ));
    out.push_str(&format!(
        "  resolved: {}, by a runbook: {} ({}.{}%)\n",
        r.resolved,
        r.resolved_by_runbook,
        r.runbook_share_permille / 10,
        r.runbook_share_permille % 10
    ));
    if !r.by_service.is_empty() {
        out.push_str("\nBy service:\n");
        for s in &r.by_service {
            out.push_str(&format!(
                "  {:<20} {:>5} incidents  MTTA {:<9} MTTR {}\n",
                s.service,
                s.incidents,
                human(s.mtta.mean_seconds),
                human(s.mttr.mean_seconds)
            ));
        }
    }
    if !r.noisiest_alerts.is_empty() {
        out.push_str("\nNoisiest alerts:\n");
        for a in &r.noisiest_alerts {
            out.push_str(&format!(
                "  {:<30} {:>5} incidents {:>6} alerts\n",
                a.alertname, a.incidents, a.alerts
            ));
        }
    }
    if !r.oncall_load.is_empty() {
        out.push_str("\nOn-call load:\n");
        for p in &r.oncall_load {
            out.push_str(&format!(
                "  {:<20} {:>5} pages {:>4} nights woken\n",
                p.user, p.pages, p.nights_woken
            ));
        }
    }
    out
}
