//! `/status.json`: the public status feed. Components come from
//! `chatops.status.components` (each a set of matchers on an incident's
//! labels); a component's state is the worst of its open, unsuppressed
//! incidents (critical: major outage, high: partial outage, medium and
//! low: degraded). Only what is meant for the public leaves: component
//! names, a public title, public notes and times; never labels, alert
//! texts or people.

use std::{sync::Arc, time::Instant};

use axum::{
    body::Bytes,
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
};
use jiff::Timestamp;
use serde::Serialize;
use tocsin_proto::{
    command::IncidentRef,
    incident::{EventKind, IncidentStatus, IncidentSummary, Severity},
    query::{IncidentDetail, ListIncidents},
};

use crate::{
    config::StatusConfig,
    http::{error, App},
    ops,
    parse::{self, CompiledMatcher},
};

/// Open incidents looked at (the newest); resolved ones likewise.
const SCAN: usize = 500;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ComponentState {
    Operational,
    Degraded,
    PartialOutage,
    MajorOutage,
}

impl ComponentState {
    pub fn of(severity: Severity) -> ComponentState {
        match severity {
            Severity::Critical => ComponentState::MajorOutage,
            Severity::High => ComponentState::PartialOutage,
            Severity::Medium | Severity::Low => ComponentState::Degraded,
            Severity::Info => ComponentState::Operational,
        }
    }

    fn words(self) -> &'static str {
        match self {
            ComponentState::Operational => "operational",
            ComponentState::Degraded => "degraded performance",
            ComponentState::PartialOutage => "partial outage",
            ComponentState::MajorOutage => "major outage",
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Component {
    pub name: String,
    pub state: ComponentState,
}

#[derive(Debug, Serialize)]
pub struct PublicIncident {
    pub id: String,
    pub title: String,
    pub status: &'static str,
    pub impact: ComponentState,
    pub components: Vec<String>,
    pub started_at: Timestamp,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resolved_at: Option<Timestamp>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latest_note: Option<PublicNote>,
}

#[derive(Debug, Serialize)]
pub struct PublicNote {
    pub at: Timestamp,
    pub text: String,
}

#[derive(Debug, Serialize)]
pub struct StatusPage {
    pub title: String,
    /// The worst component state.
    pub state: ComponentState,
    pub updated_at: Timestamp,
    pub components: Vec<Component>,
    pub active_incidents: Vec<PublicIncident>,
    pub recently_resolved: Vec<PublicIncident>,
}

/// The components an incident's labels touch.
fn touched(cs: &[(String, Vec<CompiledMatcher>)], i: &IncidentSummary) -> Vec<String> {
    cs.iter()
        .filter(|(_, ms)| parse::all_match(ms, &i.labels))
        .map(|(n, _)| n.clone())
        .collect()
}

fn public(d: &IncidentDetail, components: Vec<String>, cfg: &StatusConfig) -> PublicIncident {
    let i = &d.incident;
    let impact = ComponentState::of(i.severity);
    // A public title is an alert's `public_title` annotation; without one
    // the page says what is affected and how, never the internal title.
    let title = d
        .alerts
        .iter()
        .find_map(|a| a.annotations.get("public_title").cloned())
        .unwrap_or_else(|| format!("{}: {}", components.join(", "), impact.words()));
    let latest_note = d.timeline.iter().rev().find_map(|e| match &e.kind {
        EventKind::NoteAdded { text } => text
            .trim_start()
            .strip_prefix(cfg.public_note_prefix.as_str())
            .map(|t| PublicNote {
                at: e.at,
                text: t.trim().to_string(),
            }),
        _ => None,
    });
    PublicIncident {
        id: i.id.to_string(),
        title,
        status: if i.status == IncidentStatus::Resolved {
            "resolved"
        } else {
            "investigating"
        },
        impact,
        components,
        started_at: i.opened_at,
        resolved_at: i.resolved_at,
        latest_note,
    }
}

/// Builds the page from open and recently resolved incidents.
pub(crate) async fn build(app: &App) -> Result<StatusPage, String> {
    let cfg = &app.cfg.status;
    let now = app.bus.now();
    let components: Vec<(String, Vec<CompiledMatcher>)> = cfg
        .components
        .iter()
        .map(|c| {
            (
                c.name.clone(),
                c.matchers
                    .iter()
                    .filter_map(|m| parse::compile(m).ok())
                    .collect(),
            )
        })
        .collect();
    let list = |status: Vec<IncidentStatus>| ListIncidents {
        status,
        limit: Some(SCAN),
        ..Default::default()
    };
    let open = ops::list_incidents(
        app,
        &list(vec![
            IncidentStatus::Triggered,
            IncidentStatus::Acknowledged,
        ]),
    )
    .await
    .map_err(|e| e.to_string())??;
    let since = now
        .checked_sub(jiff::SignedDuration::try_from(cfg.resolved_for.get()).unwrap_or_default())
        .unwrap_or(now);
    let resolved = ops::list_incidents(app, &list(vec![IncidentStatus::Resolved]))
        .await
        .map_err(|e| e.to_string())??;
    let mut states: Vec<ComponentState> = vec![ComponentState::Operational; components.len()];
    let mut active = Vec::new();
    for i in open.iter().filter(|i| i.suppressed.is_none()) {
        let touched = touched(&components, i);
        if touched.is_empty() {
            continue;
        }
        for (k, (name, _)) in components.iter().enumerate() {
            if touched.contains(name) {
                states[k] = states[k].max(ComponentState::of(i.severity));
            }
        }
        if let Ok(Ok(d)) = ops::get_incident(app, IncidentRef::Id(i.id), true).await {
            active.push(public(&d, touched, cfg));
        }
    }
    let mut recent = Vec::new();
    for i in resolved
        .iter()
        .filter(|i| i.resolved_at.is_some_and(|r| r >= since))
    {
        if recent.len() >= cfg.resolved_shown {
            break;
        }
        let touched = touched(&components, i);
        if touched.is_empty() {
            continue;
        }
        if let Ok(Ok(d)) = ops::get_incident(app, IncidentRef::Id(i.id), true).await {
            recent.push(public(&d, touched, cfg));
        }
    }
    Ok(StatusPage {
        title: cfg.title.clone(),
        state: states
            .iter()
            .copied()
            .max()
            .unwrap_or(ComponentState::Operational),
        updated_at: now,
        components: components
            .iter()
            .zip(states)
            .map(|((name, _), state)| Component {
                name: name.clone(),
                state,
            })
            .collect(),
        active_incidents: active,
        recently_resolved: recent,
    })
}

/// `GET /status.json` (no authentication; the answer is reused for
/// `chatops.status.cache_for`, so a crowd costs one build per period).
pub(crate) async fn status_json(State(app): State<Arc<App>>) -> Response {
    let r = status_inner(&app).await;
    app.counted("status", r)
}

async fn status_inner(app: &App) -> Response {
    let ttl = app.cfg.status.cache_for.get();
    if let Some((at, body)) = app
        .status_cache
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
    {
        if at.elapsed() < ttl {
            return json_bytes(body);
        }
    }
    match build(app).await {
        Ok(page) => {
            let body = Bytes::from(serde_json::to_vec(&page).unwrap_or_default());
            *app.status_cache.lock().unwrap_or_else(|e| e.into_inner()) =
                Some((Instant::now(), body.clone()));
            json_bytes(body)
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot build /status.json");
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "the status is not available right now; retry shortly",
            )
        }
    }
}

fn json_bytes(body: Bytes) -> Response {
    (
        StatusCode::OK,
        [
            ("content-type", "application/json"),
            ("access-control-allow-origin", "*"),
            ("cache-control", "public, max-age=5"),
        ],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn severity_to_state() {
        assert_eq!(
            ComponentState::of(Severity::Critical),
            ComponentState::MajorOutage
        );
        assert_eq!(
            ComponentState::of(Severity::High),
            ComponentState::PartialOutage
        );
        assert_eq!(
            ComponentState::of(Severity::Medium),
            ComponentState::Degraded
        );
        assert_eq!(ComponentState::of(Severity::Low), ComponentState::Degraded);
        assert_eq!(
            ComponentState::of(Severity::Info),
            ComponentState::Operational
        );
        assert!(ComponentState::MajorOutage > ComponentState::PartialOutage);
    }
}
