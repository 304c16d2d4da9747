//! Message templates (handlebars, strict mode).
//!
//! Every template has a shipped default (the files under config/templates/,
//! compiled in) that a file of the same name in `notifier.templates`
//! overrides. Strict mode turns a name that does not exist in the context
//! into an error; [`Templates::load`] renders every template against a
//! complete sample context, so such a mistake stops `tocsin check-config`
//! and start-up with the template's file and line, not a page at 3 a.m.

use std::{collections::BTreeMap, path::Path};

use handlebars::Handlebars;
use serde::Serialize;
use tocsin_proto::{
    incident::{AlertInfo, IncidentStatus, IncidentSummary, Severity},
    notify::MessageKind,
    AlertStatus,
};

/// How a template's output is escaped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Escape {
    /// Plain text (SMS, email text, subjects, PagerDuty summaries, webhooks).
    None,
    /// HTML email.
    Html,
    /// Slack mrkdwn: only `&`, `<` and `>` are special.
    Slack,
}

macro_rules! shipped {
    ($($name:literal => $escape:expr),* $(,)?) => {
        /// (name, escape, default text) of every template.
        const SHIPPED: &[(&str, Escape, &str)] = &[
            $(($name, $escape, include_str!(concat!("../../../config/templates/", $name, ".hbs"))),)*
        ];
    };
}

shipped! {
    "slack/page" => Escape::Slack,
    "slack/reminder" => Escape::Slack,
    "slack/acknowledged" => Escape::Slack,
    "slack/resolved" => Escape::Slack,
    "slack/status_update" => Escape::Slack,
    "pagerduty/page" => Escape::None,
    "sms/page" => Escape::None,
    "sms/reminder" => Escape::None,
    "email/page.subject" => Escape::None,
    "email/page.txt" => Escape::None,
    "email/page.html" => Escape::Html,
    "email/reminder.subject" => Escape::None,
    "email/reminder.txt" => Escape::None,
    "email/reminder.html" => Escape::Html,
    "email/status_update.txt" => Escape::None,
    "email/status_update.html" => Escape::Html,
    "webhook/page" => Escape::None,
    "webhook/reminder" => Escape::None,
    "webhook/acknowledged" => Escape::None,
    "webhook/resolved" => Escape::None,
    "webhook/status_update" => Escape::None,
}

/// The compiled templates.
pub struct Templates {
    plain: Handlebars<'static>,
    html: Handlebars<'static>,
    slack: Handlebars<'static>,
    escapes: BTreeMap<&'static str, Escape>,
}

impl std::fmt::Debug for Templates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Templates")
            .field("names", &self.escapes.keys().collect::<Vec<_>>())
            .finish()
    }
}

fn slack_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn registry(escape: Escape) -> Handlebars<'static> {
    let mut h = Handlebars::new();
    h.set_strict_mode(true);
    h.set_dev_mode(false);
    match escape {
        Escape::None => h.register_escape_fn(handlebars::no_escape),
        Escape::Html => h.register_escape_fn(handlebars::html_escape),
        Escape::Slack => h.register_escape_fn(slack_escape),
    }
    handlebars::handlebars_helper!(upper: |s: str| s.to_uppercase());
    handlebars::handlebars_helper!(truncate: |s: str, n: u64| {
        let n = n as usize;
        if s.chars().count() <= n { s.to_string() } else {
            let mut t: String = s.chars().take(n.saturating_sub(1)).collect();
            t.push('…');
            t
        }
    });
    h.register_helper("upper", Box::new(upper));
    h.register_helper("truncate", Box::new(truncate));
    h
}

impl Templates {
    /// The shipped defaults, overridden by files in `dir` (if given). Every
    /// template is rendered against a sample context, so a field that does
    /// not exist is reported now. Errors name the file and line.
    pub fn load(dir: Option<&Path>) -> Result<Templates, Vec<String>> {
        let mut t = Templates {
            plain: registry(Escape::None),
            html: registry(Escape::Html),
            slack: registry(Escape::Slack),
            escapes: BTreeMap::new(),
        };
        let mut errors = Vec::new();
        let mut known = Vec::new();
        for (name, escape, default) in SHIPPED {
            known.push(format!("{name}.hbs"));
            let (source, origin) = match dir.map(|d| d.join(format!("{name}.hbs"))) {
                Some(p) if p.exists() => match std::fs::read_to_string(&p) {
                    Ok(s) => (s, p.display().to_string()),
                    Err(e) => {
                        errors.push(format!("{}: cannot read: {e}", p.display()));
                        continue;
                    }
                },
                _ => (
                    default.to_string(),
                    format!("config/templates/{name}.hbs (shipped)"),
                ),
            };
            let reg = t.registry_mut(*escape);
            if let Err(e) = reg.register_template_string(name, &source) {
                errors.push(format!("{origin}: {}", describe_template_error(&e)));
                continue;
            }
            t.escapes.insert(name, *escape);
            if let Err(e) = t.render(name, &Context::sample()) {
                errors.push(format!("{origin}: {e}"));
            }
        }
        if let Some(d) = dir {
            // A misspelt override would silently not apply.
            for file in files_under(d) {
                let rel = file
                    .strip_prefix(d)
                    .unwrap_or(&file)
                    .to_string_lossy()
                    .replace('\\', "/");
                if rel.ends_with(".hbs") && !known.contains(&rel) {
                    errors.push(format!(
                        "{}: no template is called {rel:?}; overridable templates are {}",
                        file.display(),
                        known.join(", ")
                    ));
                }
            }
        }
        if errors.is_empty() {
            Ok(t)
        } else {
            Err(errors)
        }
    }

    fn registry_mut(&mut self, e: Escape) -> &mut Handlebars<'static> {
        match e {
            Escape::None => &mut self.plain,
            Escape::Html => &mut self.html,
            Escape::Slack => &mut self.slack,
        }
    }

    /// Whether a template exists (e.g. `email/acknowledged.subject` does not).
    pub fn has(&self, name: &str) -> bool {
        self.escapes.contains_key(name)
    }

    /// Renders `name` (e.g. `slack/page`); trims surrounding white space.
    pub fn render(&self, name: &str, ctx: &Context) -> Result<String, String> {
        let escape = *self
            .escapes
            .get(name)
            .ok_or_else(|| format!("no template {name:?}"))?;
        let reg = match escape {
            Escape::None => &self.plain,
            Escape::Html => &self.html,
            Escape::Slack => &self.slack,
        };
        reg.render(name, ctx)
            .map(|s| s.trim().to_string())
            .map_err(|e| describe_render_error(&e))
    }
}

fn files_under(d: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![d.to_path_buf()];
    while let Some(p) = stack.pop() {
        if let Ok(rd) = std::fs::read_dir(&p) {
            for e in rd.flatten() {
                let path = e.path();
                if path.is_dir() {
                    stack.push(path);
                } else {
                    out.push(path);
                }
            }
        }
    }
    out.sort();
    out
}

fn describe_template_error(e: &handlebars::TemplateError) -> String {
    match e.pos() {
        Some((l, c)) => format!("line {l}, column {c}: {}", e.reason()),
        None => e.reason().to_string(),
    }
}

fn describe_render_error(e: &handlebars::RenderError) -> String {
    let mut reason = e.reason().to_string();
    if reason.contains("doesn't exist in strict mode") || reason.contains("strict mode") {
        reason.push_str(" (see config/templates/README.md for the fields a template can use)");
    }
    match (e.line_no, e.column_no) {
        (Some(l), Some(c)) => format!("line {l}, column {c}: {reason}"),
        (Some(l), None) => format!("line {l}: {reason}"),
        _ => reason,
    }
}

/// What a template sees. Every field is always present (null when unknown),
/// so strict mode only rejects names that do not exist.
#[derive(Debug, Clone, Serialize)]
pub struct Context {
    pub incident: IncidentView,
    pub page: PageView,
    pub event: EventView,
    pub tocsin: TocsinView,
}

#[derive(Debug, Clone, Serialize)]
pub struct IncidentView {
    pub id: String,
    pub number: u64,
    /// `INC-42`.
    pub reference: String,
    pub title: String,
    pub severity: String,
    /// `CRITICAL`.
    pub severity_upper: String,
    pub status: String,
    pub is_triggered: bool,
    pub is_acknowledged: bool,
    pub is_resolved: bool,
    /// Labels shared by every alert of the incident.
    pub labels: BTreeMap<String, String>,
    /// `2024-01-01 14:30 UTC` (in `notifier.timezone`).
    pub opened_at: String,
    /// `14:30 UTC`.
    pub opened_at_short: String,
    /// `2024-01-01T14:30:00Z`, for machines.
    pub opened_at_rfc3339: String,
    pub acknowledged_at: Option<String>,
    pub acknowledged_by: Option<String>,
    pub resolved_at: Option<String>,
    pub snoozed_until: Option<String>,
    pub assignee: Option<String>,
    pub alerts_firing: u32,
    pub alerts_total: u32,
    /// The firing alerts (at most [`ALERTS_SHOWN`]), each with what sets it
    /// apart from the others.
    pub alerts: Vec<AlertView>,
    /// Firing alerts not listed in `alerts`.
    pub alerts_more: u32,
    /// `db1, db2 +3`: what the firing alerts are about, in a few words.
    pub instances: String,
    /// The first firing alert's `summary` annotation.
    pub summary: Option<String>,
    /// The first `runbook_url` annotation of the firing alerts.
    pub runbook_url: Option<String>,
    /// The first firing alert's `generatorURL`.
    pub generator_url: Option<String>,
    /// `incident_url` rendered for this incident, or null.
    pub url: Option<String>,
}

/// At most this many alerts are listed in a message.
pub const ALERTS_SHOWN: usize = 10;

#[derive(Debug, Clone, Serialize)]
pub struct AlertView {
    /// The labels that differ from the incident's common labels.
    pub labels: BTreeMap<String, String>,
    /// The same as `k=v k=v`.
    pub labels_text: String,
    pub summary: Option<String>,
    pub description: Option<String>,
    pub runbook_url: Option<String>,
    pub generator_url: Option<String>,
    /// `2024-01-01 14:29 UTC`.
    pub starts_at: String,
    pub status: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct PageView {
    /// 1-based for people: level 1 is the first.
    pub level: u32,
    pub repeat: u32,
    pub reason: String,
    /// `alice`, `#ops`, `payments`.
    pub target: String,
    pub address: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct EventView {
    /// `page`, `reminder`, `acknowledged`, `resolved`, `status_update`.
    pub kind: String,
    /// Who acknowledged, resolved or wrote the note.
    pub actor: Option<String>,
    /// `2024-01-01 14:32 UTC`.
    pub at: String,
    /// The note of a status update; null otherwise.
    pub note: Option<String>,
    /// When the next status update is due (`15:00 UTC`), for status updates.
    pub next_update: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TocsinView {
    pub status_page: Option<String>,
    /// The number SMS replies go to.
    pub reply_to: Option<String>,
}

/// How times are written in messages: in one zone, to the minute.
#[derive(Debug, Clone)]
pub struct Times {
    pub zone: jiff::tz::TimeZone,
}

impl Default for Times {
    fn default() -> Self {
        Times {
            zone: jiff::tz::TimeZone::UTC,
        }
    }
}

impl Times {
    /// `2024-01-01 14:30 UTC`.
    pub fn long(&self, t: jiff::Timestamp) -> String {
        t.to_zoned_datetime(self.zone.clone())
            .strftime("%Y-%m-%d %H:%M %Z")
            .to_string()
    }
    /// `14:30 UTC`.
    pub fn short(&self, t: jiff::Timestamp) -> String {
        t.to_zoned_datetime(self.zone.clone())
            .strftime("%H:%M %Z")
            .to_string()
    }
}

impl IncidentView {
    /// The incident as a message shows it; `alerts` are its alerts (all
    /// of them, or none when they could not be read).
    pub fn new(
        s: &IncidentSummary,
        alerts: &[AlertInfo],
        url_template: Option<&str>,
        times: &Times,
    ) -> IncidentView {
        let url = url_template.map(|u| {
            u.replace("{{number}}", &s.number.to_string())
                .replace("{{id}}", &s.id.to_string())
        });
        let firing: Vec<&AlertInfo> = alerts
            .iter()
            .filter(|a| a.status == AlertStatus::Firing)
            .collect();
        // What sets each firing alert apart: the labels it does not share
        // with the others; for a lone alert (everything shared), the
        // labels that say where it is.
        const WHERE: [&str; 6] = ["instance", "host", "pod", "node", "job", "service"];
        let apart = |a: &AlertInfo| -> BTreeMap<String, String> {
            let own: BTreeMap<String, String> = a
                .labels
                .iter()
                .filter(|(k, v)| s.labels.get(*k) != Some(*v))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            if !own.is_empty() {
                return own;
            }
            WHERE
                .iter()
                .filter_map(|k| a.labels.get(*k).map(|v| (k.to_string(), v.clone())))
                .take(2)
                .collect()
        };
        let views: Vec<AlertView> = firing
            .iter()
            .take(ALERTS_SHOWN)
            .map(|a| {
                let labels = apart(a);
                AlertView {
                    labels_text: labels
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(" "),
                    labels,
                    summary: a.annotations.get("summary").cloned(),
                    description: a.annotations.get("description").cloned(),
                    runbook_url: a.annotations.get("runbook_url").cloned(),
                    generator_url: a.generator_url.clone(),
                    starts_at: times.long(a.starts_at),
                    status: a.status.as_str().to_string(),
                }
            })
            .collect();
        // What each firing alert is about, in a word: where it is.
        let names: Vec<String> = firing
            .iter()
            .filter_map(|a| {
                let l = apart(a);
                WHERE
                    .iter()
                    .find_map(|k| l.get(*k))
                    .or_else(|| l.values().next())
                    .cloned()
            })
            .collect();
        let instances = match names.len() {
            0 => String::new(),
            1..=2 => names.join(", "),
            n => format!("{}, {} +{}", names[0], names[1], n - 2),
        };
        let first = firing.first();
        IncidentView {
            id: s.id.to_string(),
            number: s.number,
            reference: format!("INC-{}", s.number),
            title: s.title.clone(),
            severity: s.severity.as_str().to_string(),
            severity_upper: s.severity.as_str().to_uppercase(),
            status: s.status.as_str().to_string(),
            is_triggered: s.status == IncidentStatus::Triggered,
            is_acknowledged: s.status == IncidentStatus::Acknowledged,
            is_resolved: s.status == IncidentStatus::Resolved,
            labels: s
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            opened_at: times.long(s.opened_at),
            opened_at_short: times.short(s.opened_at),
            opened_at_rfc3339: s.opened_at.to_string(),
            acknowledged_at: s.acknowledged_at.map(|t| times.long(t)),
            acknowledged_by: s.acknowledged_by.as_ref().map(|a| a.name.clone()),
            resolved_at: s.resolved_at.map(|t| times.long(t)),
            snoozed_until: s.snoozed_until.map(|t| times.long(t)),
            assignee: s.assignee.clone(),
            alerts_firing: s.alerts_firing,
            alerts_total: s.alerts_total,
            alerts_more: (firing.len().saturating_sub(ALERTS_SHOWN)) as u32,
            alerts: views,
            instances,
            summary: first.and_then(|a| a.annotations.get("summary").cloned()),
            runbook_url: firing
                .iter()
                .find_map(|a| a.annotations.get("runbook_url").cloned()),
            generator_url: first.and_then(|a| a.generator_url.clone()),
            url,
        }
    }
}

impl Context {
    /// A context with every field set, for checking templates.
    pub fn sample() -> Context {
        let mut s = IncidentSummary::new(
            uuid::Uuid::nil(),
            42,
            "alertname=HighLatency",
            "API Service Degradation",
            "2024-01-01T14:30:00Z".parse().expect("valid"),
        );
        s.severity = Severity::Critical;
        s.labels.insert("alertname".into(), "HighLatency".into());
        s.labels.insert("service".into(), "api".into());
        s.acknowledged_at = Some("2024-01-01T14:32:00Z".parse().expect("valid"));
        s.alerts_firing = 2;
        s.alerts_total = 2;
        let alert = |instance: &str| {
            let mut labels = s.labels.clone();
            labels.insert("instance".into(), instance.into());
            let mut annotations = tocsin_proto::alert::Labels::new();
            annotations.insert("summary".into(), "p99 latency above 2s".into());
            annotations.insert(
                "description".into(),
                "p99 latency has been above 2s for 10m".into(),
            );
            annotations.insert(
                "runbook_url".into(),
                "https://runbooks.example.com/high-latency".into(),
            );
            AlertInfo {
                fingerprint: tocsin_proto::fingerprint::Fingerprint::from_labels(&labels),
                status: AlertStatus::Firing,
                labels,
                annotations,
                starts_at: "2024-01-01T14:29:00Z".parse().expect("valid"),
                ends_at: None,
                generator_url: Some("https://prometheus.example.com/graph?g0.expr=latency".into()),
                suppressed: None,
            }
        };
        let alerts = [alert("api-1:9090"), alert("api-2:9090")];
        Context {
            incident: IncidentView::new(
                &s,
                &alerts,
                Some("https://tocsin.example.com/incidents/{{number}}"),
                &Times::default(),
            ),
            page: PageView {
                level: 1,
                repeat: 0,
                reason: "level 1 of policy standard".into(),
                target: "alice".into(),
                address: "+15555550101".into(),
            },
            event: EventView {
                kind: MessageKind::Page.as_str().into(),
                actor: Some("alice".into()),
                at: "2024-01-01 14:32 UTC".into(),
                note: Some("Impact: 15% of API requests failing".into()),
                next_update: Some("15:00 UTC".into()),
            },
            tocsin: TocsinView {
                status_page: Some("https://status.example.com".into()),
                reply_to: Some("+15005550006".into()),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_templates_compile_and_render() {
        let t = Templates::load(None).expect("shipped templates are valid");
        let ctx = Context::sample();
        let sms = t.render("sms/page", &ctx).unwrap();
        assert!(sms.chars().count() <= 160, "{} chars: {sms}", sms.len());
        assert!(sms.contains("42"), "{sms}");
        let subject = t.render("email/page.subject", &ctx).unwrap();
        assert!(subject.contains("API Service Degradation"), "{subject}");
    }

    #[test]
    fn unknown_field_names_the_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("sms")).unwrap();
        std::fs::write(
            dir.path().join("sms/page.hbs"),
            "Tocsin #{{incident.number}}\n{{incident.titel}}\n",
        )
        .unwrap();
        let errors = Templates::load(Some(dir.path())).unwrap_err();
        let all = errors.join("\n");
        assert!(all.contains("sms/page.hbs"), "{all}");
        assert!(all.contains("line 2"), "{all}");
        assert!(all.contains("incident.titel"), "{all}");
    }

    #[test]
    fn misspelt_override_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("slack")).unwrap();
        std::fs::write(dir.path().join("slack/pgae.hbs"), "x").unwrap();
        let all = Templates::load(Some(dir.path())).unwrap_err().join("\n");
        assert!(all.contains("slack/pgae.hbs"), "{all}");
    }

    #[test]
    fn a_resolved_incident_s_status_update_neither_alarms_nor_promises_more() {
        let t = Templates::load(None).unwrap();
        let mut ctx = Context::sample();
        ctx.event.kind = "status_update".into();
        ctx.incident.status = "resolved".into();
        ctx.incident.is_resolved = true;
        ctx.incident.is_triggered = false;
        // (The deliverer leaves next_update out for a resolved incident.)
        ctx.event.next_update = None;
        for name in [
            "email/status_update.txt",
            "email/status_update.html",
            "slack/status_update",
            "webhook/status_update",
        ] {
            let text = t.render(name, &ctx).unwrap();
            assert!(!text.contains('🚨'), "{name}: {text}");
            assert!(!text.contains(":rotating_light:"), "{name}: {text}");
            assert!(!text.contains("Next Update"), "{name}: {text}");
            assert!(text.contains("RESOLVED"), "{name}: {text}");
        }
        // While open it still follows the reference format.
        let open = t
            .render("email/status_update.txt", &Context::sample())
            .unwrap();
        assert!(open.starts_with("🚨 [CRITICAL] Incident: "), "{open}");
        assert!(open.contains("Next Update: 15:00 UTC"), "{open}");
    }

    #[test]
    fn times_are_to_the_minute_in_the_configured_zone() {
        let t: jiff::Timestamp = "2026-01-15T13:30:42.123456789Z".parse().unwrap();
        let utc = Times::default();
        assert_eq!(utc.long(t), "2026-01-15 13:30 UTC");
        assert_eq!(utc.short(t), "13:30 UTC");
        let berlin = Times {
            zone: jiff::tz::TimeZone::get("Europe/Berlin").unwrap(),
        };
        assert_eq!(berlin.long(t), "2026-01-15 14:30 CET");
        let summer: jiff::Timestamp = "2026-07-15T13:30:00Z".parse().unwrap();
        assert_eq!(berlin.short(summer), "15:30 CEST");
    }

    #[test]
    fn pages_name_the_alerts_that_fire_and_their_sources() {
        let t = Templates::load(None).unwrap();
        let ctx = Context::sample();
        // Two firing alerts that differ by instance.
        assert_eq!(ctx.incident.instances, "api-1:9090, api-2:9090");
        assert_eq!(ctx.incident.alerts.len(), 2);
        assert_eq!(ctx.incident.alerts[0].labels_text, "instance=api-1:9090");
        let slack = t.render("slack/page", &ctx).unwrap();
        for want in [
            "instance=api-1:9090",
            "instance=api-2:9090",
            "https://prometheus.example.com/graph",
            "Runbook: <https://runbooks.example.com/high-latency>",
            "2024-01-01 14:30 UTC",
        ] {
            assert!(slack.contains(want), "{want:?} missing: {slack}");
        }
        let mail = t.render("email/page.txt", &ctx).unwrap();
        assert!(
            mail.contains("Runbook:   https://runbooks.example.com/high-latency"),
            "{mail}"
        );
        assert!(mail.contains("p99 latency above 2s"), "{mail}");
        assert!(
            !mail.contains("T14:30:00Z"),
            "no machine times for people: {mail}"
        );
    }

    #[test]
    fn an_sms_page_fits_one_segment_even_with_emoji_and_accents() {
        let t = Templates::load(None).unwrap();
        let mut ctx = Context::sample();
        ctx.incident.title = "🔥 Base de données surchargée — réplica “eu-west” 🚀".into();
        ctx.incident.instances = "db-prod-ünïcødé-1.example.com:5432, db-2 +3".into();
        let rendered = t.render("sms/page", &ctx).unwrap();
        let body = crate::providers::gsm::fit(&rendered, crate::providers::gsm::Encoding::Gsm7, 1);
        assert!(crate::providers::gsm::is_gsm7(&body), "{body}");
        assert_eq!(crate::providers::gsm::segments(&body), 1, "{body}");
        assert!(body.contains("Reply ACK 42 to +15005550006"), "{body}");
        assert!(body.contains("Base de données surchargée"), "{body}");
    }

    #[test]
    fn escapes_per_flavour() {
        let mut ctx = Context::sample();
        ctx.incident.title = "a <b> & c".into();
        let t = Templates::load(None).unwrap();
        assert!(t
            .render("slack/page", &ctx)
            .unwrap()
            .contains("a &lt;b&gt; &amp; c"));
        assert!(t.render("sms/page", &ctx).unwrap().contains("a <b> & c"));
        assert!(t
            .render("email/page.html", &ctx)
            .unwrap()
            .contains("a &lt;b&gt; &amp; c"));
    }
}
