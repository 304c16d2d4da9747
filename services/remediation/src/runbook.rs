//! The runbook format (pure): one YAML file per runbook, parsed with
//! `deny_unknown_fields` so a misspelt key or an unknown step type is an
//! error with file and line, then checked (one step type per step, unique
//! step ids, programs on the allowlist, templates that name only known
//! fields).
//!
//! A step names its type by its one type key:
//!
//! ```yaml
//! - id: restart
//!   exec: {argv: [systemctl, restart, "{{labels.unit}}"]}
//!   timeout: 30s
//!   on_failure: rollback
//! ```

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;
use tocsin_proto::{
    incident::{EventKind, IncidentStatus, IncidentSummary, Severity},
    silence::Matcher,
};
use tocsin_rules::matchers::{deserialize_matchers, MatcherSet};
use tocsin_runtime::config::{ConfigError, HumanDuration};

use crate::template;

/// Limits on what a runbook may ask for.
pub const MAX_STEPS: usize = 50;
pub const MAX_ARGV: usize = 64;
pub const MAX_RETRIES: u32 = 10;
/// The longest a single step may be given.
pub const MAX_STEP_TIMEOUT: Duration = Duration::from_secs(3600);
/// The largest runbook file read.
pub const MAX_FILE_BYTES: u64 = 256 * 1024;

/// One runbook.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Runbook {
    /// Unique among the loaded runbooks; letters, digits, `-` and `_`.
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Which incidents it acts on.
    #[serde(rename = "match")]
    pub matches: MatchSpec,
    /// On which incident events it starts (default: opened).
    #[serde(default = "default_on")]
    pub on: Vec<Trigger>,
    /// Template parameters with their defaults (`{{params.name}}`).
    #[serde(default)]
    pub params: BTreeMap<String, serde_json::Value>,
    /// Log and record what would run, run nothing.
    #[serde(default)]
    pub dry_run: bool,
    /// `immediately` (default): escalation pages as usual while the runbook
    /// works. `on_failure`: the first level waits for the run, at most
    /// `hold_at_most`.
    #[serde(default)]
    pub page: PageMode,
    /// How long a held page waits at most (default 10m).
    #[serde(default)]
    pub hold_at_most: Option<HumanDuration>,
    #[serde(default)]
    pub guardrails: Guardrails,
    pub steps: Vec<Step>,
    /// Run (in order) when a step with `on_failure: rollback` fails, or when
    /// a run is found broken off in a step that must not repeat.
    #[serde(default)]
    pub rollback: Vec<Step>,
}

fn default_on() -> Vec<Trigger> {
    vec![Trigger::Opened]
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatchSpec {
    /// Alertmanager matchers on the incident's labels, all of which must hold.
    #[serde(default, deserialize_with = "deserialize_matchers")]
    pub labels: Vec<Matcher>,
    /// The incident's severity must be one of these (empty: any).
    #[serde(default)]
    pub severities: Vec<Severity>,
}

/// The incident events a run can start on: `opened`, `reopened`,
/// `escalated` (someone, or a runbook, asked to escalate now),
/// `acknowledged`, or `{escalated_to: N}`: escalation level N (counted
/// from 1, as `tocsin show` does) fired its pages, the first round only,
/// while the incident is unacknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "TriggerText")]
pub enum Trigger {
    Opened,
    Reopened,
    Escalated,
    Acknowledged,
    EscalatedTo(u32),
}

/// A trigger as written: a name, or `{escalated_to: N}`.
#[derive(Deserialize)]
#[serde(untagged)]
enum TriggerText {
    Name(String),
    Level(LevelTrigger),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LevelTrigger {
    escalated_to: u32,
}

impl TryFrom<TriggerText> for Trigger {
    type Error = String;
    fn try_from(t: TriggerText) -> Result<Self, String> {
        match t {
            TriggerText::Level(l) => Ok(Trigger::EscalatedTo(l.escalated_to)),
            TriggerText::Name(n) => match n.as_str() {
                "opened" => Ok(Trigger::Opened),
                "reopened" => Ok(Trigger::Reopened),
                "escalated" => Ok(Trigger::Escalated),
                "acknowledged" => Ok(Trigger::Acknowledged),
                other => Err(format!(
                    "unknown trigger {other:?}; expected opened, reopened, escalated, acknowledged or {{escalated_to: N}}"
                )),
            },
        }
    }
}

impl Trigger {
    /// Whether incident event `ev` (of `incident`) is this trigger.
    pub fn fits(self, ev: &EventKind, incident: &IncidentSummary) -> bool {
        match (self, ev) {
            (Trigger::Opened, EventKind::Opened { .. })
            | (Trigger::Reopened, EventKind::Reopened)
            | (Trigger::Escalated, EventKind::Escalated { .. })
            | (Trigger::Acknowledged, EventKind::Acknowledged) => true,
            // Level numbers on the wire count from 0. Reminders to whoever
            // acknowledged record the same level: not a new escalation.
            (Trigger::EscalatedTo(n), EventKind::Paged { level, repeat, .. }) => {
                *repeat == 0
                    && level.checked_add(1) == Some(n)
                    && incident.status == IncidentStatus::Triggered
            }
            _ => false,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PageMode {
    #[default]
    Immediately,
    OnFailure,
}

/// Guardrails; every one holds across replicas (its state is on the bus).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Guardrails {
    /// Runs of this runbook at once, over every replica (default 1).
    #[serde(default = "one")]
    pub max_concurrent: u32,
    /// A template (e.g. `"{{labels.service}}"`): one run at a time per value.
    #[serde(default)]
    pub concurrency_key: Option<String>,
    /// No new run for the same incident dedup key within this time of the
    /// last one's start (default 0: none).
    #[serde(default)]
    pub cooldown: HumanDuration,
    /// Runs started per clock hour at most (default: no limit).
    #[serde(default)]
    pub max_runs_per_hour: Option<u32>,
    /// Consecutive failed runs that open the breaker (default 5); an open
    /// breaker skips runs and pages a human about it.
    #[serde(default = "five")]
    pub breaker_after: u32,
    /// How long an open breaker stays open before one trial run (default 1h).
    #[serde(default = "hour")]
    pub breaker_reset: HumanDuration,
    /// A run taking longer fails (default 30m).
    #[serde(default = "half_hour")]
    pub run_timeout: HumanDuration,
    /// A run waits for a person's decision before it starts
    /// (`tocsin runbook approve|deny <run>`); no decision within
    /// `timeout` escalates the incident.
    #[serde(default)]
    pub require_approval: Option<Approval>,
}

/// `require_approval: {timeout: 15m}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Approval {
    /// How long a run waits for approve or deny (default 15m; 1s to 7d).
    #[serde(default = "quarter_hour")]
    pub timeout: HumanDuration,
}

fn quarter_hour() -> HumanDuration {
    HumanDuration::secs(900)
}

fn one() -> u32 {
    1
}
fn five() -> u32 {
    5
}
fn hour() -> HumanDuration {
    HumanDuration::secs(3600)
}
fn half_hour() -> HumanDuration {
    HumanDuration::secs(1800)
}

impl Default for Guardrails {
    fn default() -> Self {
        Guardrails {
            max_concurrent: 1,
            concurrency_key: None,
            cooldown: HumanDuration::default(),
            max_runs_per_hour: None,
            breaker_after: 5,
            breaker_reset: hour(),
            run_timeout: half_hour(),
            require_approval: None,
        }
    }
}

/// What to do when a step fails (after its retries).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// Stop the run; it failed (escalates).
    #[default]
    Abort,
    /// Go on with the next step.
    Continue,
    /// Run the rollback steps, then fail (escalates).
    Rollback,
}

/// One step: common settings and exactly one type key.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// Unique in the runbook; `{{steps.<id>.*}}` reads its output.
    pub id: String,
    #[serde(default)]
    pub http: Option<HttpStep>,
    #[serde(default)]
    pub exec: Option<ExecStep>,
    /// Waits this long.
    #[serde(default)]
    pub wait: Option<HumanDuration>,
    #[serde(default)]
    pub check: Option<CheckStep>,
    /// Adds a note (the template's text) to the incident's timeline.
    #[serde(default)]
    pub annotate: Option<String>,
    /// `ack: true` acknowledges the incident.
    #[serde(default)]
    pub ack: Option<bool>,
    /// `resolve: true` resolves the incident.
    #[serde(default)]
    pub resolve: Option<bool>,
    /// Escalates now, with this reason (a template).
    #[serde(default)]
    pub escalate: Option<String>,
    /// A NATS request: a subject, a payload, the reply expected.
    #[serde(default)]
    pub nats: Option<NatsStep>,
    /// Posts a message to a Slack channel or a webhook through the notifier.
    #[serde(default)]
    pub notify: Option<NotifyStep>,
    /// Time for one attempt (default 60s; at most 1h).
    #[serde(default)]
    pub timeout: Option<HumanDuration>,
    /// Attempts after the first (default 0; at most 10).
    #[serde(default)]
    pub retries: u32,
    /// Wait before the first retry; doubled each time (default 1s).
    #[serde(default)]
    pub backoff: Option<HumanDuration>,
    /// A template condition: the step runs only when it renders `true`.
    #[serde(default)]
    pub when: Option<String>,
    #[serde(default)]
    pub on_failure: OnFailure,
    /// May run again after a crash broke it off (default false: a broken-off
    /// step fails the run safe instead).
    #[serde(default)]
    pub idempotent: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpStep {
    #[serde(default = "get")]
    pub method: String,
    /// A template; `{{x}}` is URL-encoded as one component, `{{{x}}}` is
    /// inserted as is (for base URLs from params).
    pub url: String,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// JSON body; every string in it is a template, sent as a JSON string.
    #[serde(default)]
    pub body: Option<serde_json::Value>,
    /// Statuses that count as success (default: any 2xx).
    #[serde(default)]
    pub expect_status: Vec<u16>,
    /// `name: /json/pointer` into the JSON answer, read as
    /// `{{steps.<id>.captures.name}}`.
    #[serde(default)]
    pub captures: BTreeMap<String, String>,
}

fn get() -> String {
    "GET".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecStep {
    /// Program and arguments, each a template rendered to exactly one
    /// argument; the program (first element) must be on
    /// `remediation.allowed_programs` and cannot be a template. No shell.
    pub argv: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub cwd: Option<String>,
    /// Exit codes that count as success (default [0]).
    #[serde(default)]
    pub expect_exit: Vec<i32>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckStep {
    #[serde(default)]
    pub http: Option<HttpStep>,
    #[serde(default)]
    pub exec: Option<ExecStep>,
    /// A template condition over `result` (`result.status`, `result.json`,
    /// `result.exit_code`, `result.stdout`); default: the probe succeeded.
    #[serde(default)]
    pub until: Option<String>,
    /// Between probes (default 5s).
    #[serde(default)]
    pub interval: Option<HumanDuration>,
}

/// `nats: {subject, payload, expect}`: a request; the step succeeds on a
/// reply for which `expect` holds.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsStep {
    /// A template; rendered, every token must be plain (no `*`, `>`,
    /// spaces or empty tokens). The remediation NATS user may publish to
    /// `remediation.>` as shipped.
    pub subject: String,
    /// JSON whose strings are templates (sent as JSON), or a string
    /// template (sent as text). Default: empty.
    #[serde(default)]
    pub payload: Option<serde_json::Value>,
    /// A template condition over `result` (`result.body`, `result.json`);
    /// default: any reply.
    #[serde(default)]
    pub expect: Option<String>,
}

/// `notify: {slack: "#ops", message: ...}` or `{webhook: name, message: ...}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifyStep {
    /// A Slack channel (`"#ops"`, or its id).
    #[serde(default)]
    pub slack: Option<String>,
    /// A webhook by its name under `notifier.webhooks`.
    #[serde(default)]
    pub webhook: Option<String>,
    /// The message (a template).
    pub message: String,
}

/// A step's type, for dispatch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Http,
    Exec,
    Wait,
    Check,
    Annotate,
    Ack,
    Resolve,
    Escalate,
    Nats,
    Notify,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Http => "http",
            Kind::Exec => "exec",
            Kind::Wait => "wait",
            Kind::Check => "check",
            Kind::Annotate => "annotate",
            Kind::Ack => "ack",
            Kind::Resolve => "resolve",
            Kind::Escalate => "escalate",
            Kind::Nats => "nats",
            Kind::Notify => "notify",
        }
    }
}

impl Step {
    /// The step's type keys that are set.
    fn kinds(&self) -> Vec<Kind> {
        let mut k = Vec::new();
        if self.http.is_some() {
            k.push(Kind::Http);
        }
        if self.exec.is_some() {
            k.push(Kind::Exec);
        }
        if self.wait.is_some() {
            k.push(Kind::Wait);
        }
        if self.check.is_some() {
            k.push(Kind::Check);
        }
        if self.annotate.is_some() {
            k.push(Kind::Annotate);
        }
        if self.ack == Some(true) {
            k.push(Kind::Ack);
        }
        if self.resolve == Some(true) {
            k.push(Kind::Resolve);
        }
        if self.escalate.is_some() {
            k.push(Kind::Escalate);
        }
        if self.nats.is_some() {
            k.push(Kind::Nats);
        }
        if self.notify.is_some() {
            k.push(Kind::Notify);
        }
        k
    }

    /// The one type (checked at load).
    pub fn kind(&self) -> Kind {
        self.kinds().first().copied().unwrap_or(Kind::Annotate)
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
            .map(|t| t.0)
            .filter(|t| !t.is_zero())
            .unwrap_or(Duration::from_secs(60))
            .min(MAX_STEP_TIMEOUT)
    }

    pub fn backoff(&self) -> Duration {
        self.backoff.map(|t| t.0).unwrap_or(Duration::from_secs(1))
    }
}

impl Runbook {
    pub fn hold_at_most(&self) -> Duration {
        self.hold_at_most
            .map(|d| d.0)
            .unwrap_or(Duration::from_secs(600))
    }

    /// Whether the runbook acts on `incident` after event `ev`.
    pub fn applies(&self, ev: &EventKind, incident: &IncidentSummary) -> bool {
        if !self.on.iter().any(|t| t.fits(ev, incident)) {
            return false;
        }
        if !self.matches.severities.is_empty()
            && !self.matches.severities.contains(&incident.severity)
        {
            return false;
        }
        MatcherSet::new(&self.matches.labels)
            .map(|m| m.matches(&incident.labels))
            .unwrap_or(false)
    }
}

/// Where a runbook came from, with the runbook.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub path: PathBuf,
    pub runbook: Runbook,
}

/// Reads, parses and checks one runbook file against the allowlist.
pub fn load_file(path: &Path, allowed: &[String]) -> Result<Runbook, ConfigError> {
    let size = std::fs::metadata(path)
        .map_err(|e| ConfigError::whole_file(path, format!("cannot read runbook: {e}")))?
        .len();
    if size > MAX_FILE_BYTES {
        return Err(ConfigError::whole_file(
            path,
            format!("runbook is {size} bytes; at most {MAX_FILE_BYTES} are read"),
        ));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::whole_file(path, format!("cannot read runbook: {e}")))?;
    parse(path, &text, allowed)
}

/// Parses and checks runbook `text` as if read from `path`.
pub fn parse(path: &Path, text: &str, allowed: &[String]) -> Result<Runbook, ConfigError> {
    let rb: Runbook = tocsin_runtime::config::from_str(path, text)?;
    let problems = check(&rb, allowed);
    if problems.is_empty() {
        return Ok(rb);
    }
    let lines: Vec<&str> = text.lines().collect();
    let mut errors = problems.into_iter().map(|(msg, needle)| {
        let line = needle.and_then(|n| {
            lines
                .iter()
                .position(|l| l.contains(n.as_str()))
                .map(|i| i + 1)
        });
        ConfigError {
            file: path.to_path_buf(),
            line: line.or(Some(1)),
            column: None,
            message: msg,
        }
    });
    let mut first = errors.next().expect("one problem at least");
    for e in errors {
        first.message.push('\n');
        first.message.push_str(&e.to_string());
    }
    Err(first)
}

/// A problem and the text to find its line by.
type Problem = (String, Option<String>);

/// Checks what serde cannot: every problem, each with a text to locate it.
pub fn check(rb: &Runbook, allowed: &[String]) -> Vec<Problem> {
    let mut out: Vec<Problem> = Vec::new();
    if !tocsin_proto::subjects::is_valid_token(&rb.name) {
        out.push((
            format!(
                "runbook name {:?} must be 1 to 64 letters, digits, `-` or `_`",
                rb.name
            ),
            Some("name:".into()),
        ));
    }
    if rb.steps.is_empty() {
        out.push((
            "a runbook needs at least one step".into(),
            Some("steps".into()),
        ));
    }
    if rb.steps.len() + rb.rollback.len() > MAX_STEPS {
        out.push((
            format!(
                "{} steps; at most {MAX_STEPS}",
                rb.steps.len() + rb.rollback.len()
            ),
            Some("steps".into()),
        ));
    }
    if rb.guardrails.max_concurrent == 0 || rb.guardrails.max_concurrent > 1000 {
        out.push((
            "guardrails.max_concurrent must be 1 to 1000".into(),
            Some("max_concurrent".into()),
        ));
    }
    if rb.guardrails.breaker_after == 0 {
        out.push((
            "guardrails.breaker_after must be at least 1".into(),
            Some("breaker_after".into()),
        ));
    }
    if let Some(a) = &rb.guardrails.require_approval {
        if a.timeout.0 < Duration::from_secs(1) || a.timeout.0 > Duration::from_secs(7 * 86400) {
            out.push((
                "guardrails.require_approval.timeout must be 1s to 7d".into(),
                Some("require_approval".into()),
            ));
        }
    }
    for t in &rb.on {
        if let Trigger::EscalatedTo(n) = t {
            if *n == 0 || *n > 100 {
                out.push((
                    format!("on: escalated_to {n}: levels count from 1 (at most 100)"),
                    Some("escalated_to".into()),
                ));
            }
        }
    }
    if let Err(e) = MatcherSet::new(&rb.matches.labels) {
        out.push((format!("match.labels: {e}"), Some("labels".into())));
    }
    let params: BTreeSet<String> = rb.params.keys().cloned().collect();
    let mut ids: Vec<String> = Vec::new();
    if let Some(k) = &rb.guardrails.concurrency_key {
        for p in template::check(k, &params, &ids, false) {
            out.push((
                format!("guardrails.concurrency_key: {p}"),
                Some("concurrency_key".into()),
            ));
        }
    }
    let main_ids: Vec<String> = rb.steps.iter().map(|s| s.id.clone()).collect();
    let mut seen: BTreeSet<String> = BTreeSet::new();
    for (list, steps) in [("steps", &rb.steps), ("rollback", &rb.rollback)] {
        if list == "rollback" {
            // Rollback steps may read every main step (those that did not
            // run read as empty).
            ids = main_ids.clone();
        }
        for s in steps.iter() {
            let at = Some(format!("id: {}", s.id));
            let what = format!("{list}: step {:?}", s.id);
            if !tocsin_proto::subjects::is_valid_token(&s.id) {
                out.push((
                    format!("{what}: an id is 1 to 64 letters, digits, `-` or `_`"),
                    at.clone(),
                ));
            }
            if s.id == crate::engine::RUN {
                out.push((
                    format!("{what}: `run` is reserved for the run's own timeline entries"),
                    at.clone(),
                ));
            }
            if !seen.insert(s.id.clone()) {
                out.push((format!("{what}: the id is used twice"), at.clone()));
            }
            let kinds = s.kinds();
            match kinds.len() {
                0 => out.push((
                    format!(
                        "{what} has no type; give exactly one of http, exec, wait, check, annotate, ack, resolve, escalate, nats, notify"
                    ),
                    at.clone(),
                )),
                1 => {}
                _ => out.push((
                    format!(
                        "{what} has {} types ({}); give exactly one",
                        kinds.len(),
                        kinds.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(", ")
                    ),
                    at.clone(),
                )),
            }
            if s.retries > MAX_RETRIES {
                out.push((
                    format!("{what}: retries {} is more than {MAX_RETRIES}", s.retries),
                    at.clone(),
                ));
            }
            if s.timeout.is_some_and(|t| t.0 > MAX_STEP_TIMEOUT) {
                out.push((format!("{what}: timeout is more than 1h"), at.clone()));
            }
            let mut templates: Vec<(&str, &String, bool)> = Vec::new();
            if let Some(w) = &s.when {
                templates.push(("when", w, false));
            }
            if let Some(a) = &s.annotate {
                templates.push(("annotate", a, false));
            }
            if let Some(e) = &s.escalate {
                templates.push(("escalate", e, false));
            }
            let mut json_templates: Vec<(&str, &serde_json::Value)> = Vec::new();
            if let Some(n) = &s.nats {
                templates.push(("nats.subject", &n.subject, false));
                if n.subject.contains(['*', '>', ' ']) {
                    out.push((
                        format!("{what}: nats.subject {:?} must name one subject (no `*`, `>` or spaces)", n.subject),
                        at.clone(),
                    ));
                }
                if let Some(e) = &n.expect {
                    templates.push(("nats.expect", e, true));
                }
                if let Some(p) = &n.payload {
                    json_templates.push(("nats.payload", p));
                }
            }
            if let Some(n) = &s.notify {
                templates.push(("notify.message", &n.message, false));
                match (&n.slack, &n.webhook) {
                    (Some(c), None) => templates.push(("notify.slack", c, false)),
                    (None, Some(w)) => templates.push(("notify.webhook", w, false)),
                    _ => out.push((
                        format!("{what}: notify needs exactly one of slack (a channel) or webhook (a name)"),
                        at.clone(),
                    )),
                }
            }
            for (field, v) in json_templates {
                let mut strings = Vec::new();
                json_strings(v, &mut strings);
                for p in strings
                    .iter()
                    .flat_map(|t| template::check(t, &params, &ids, false))
                {
                    out.push((format!("{what}: {field}: {p}"), at.clone()));
                }
            }
            let mut execs: Vec<&ExecStep> = Vec::new();
            let mut https: Vec<&HttpStep> = Vec::new();
            if let Some(e) = &s.exec {
                execs.push(e);
            }
            if let Some(h) = &s.http {
                https.push(h);
            }
            if let Some(c) = &s.check {
                match (&c.http, &c.exec) {
                    (Some(h), None) => https.push(h),
                    (None, Some(e)) => execs.push(e),
                    _ => out.push((
                        format!("{what}: a check needs exactly one probe, http or exec"),
                        at.clone(),
                    )),
                }
                if let Some(u) = &c.until {
                    templates.push(("until", u, true));
                }
            }
            for e in execs {
                match e.argv.first() {
                    None => out.push((format!("{what}: exec.argv is empty"), at.clone())),
                    Some(p) if p.contains("{{") => out.push((
                        format!(
                            "{what}: the program {p:?} cannot be a template; name it literally"
                        ),
                        Some(p.clone()),
                    )),
                    Some(p) if !allowed.iter().any(|a| a == p) => out.push((
                        format!(
                            "{what}: program {p:?} is not on remediation.allowed_programs (allowed: {})",
                            if allowed.is_empty() {
                                "none".to_string()
                            } else {
                                allowed.join(", ")
                            }
                        ),
                        Some(p.clone()),
                    )),
                    Some(_) => {}
                }
                if e.argv.len() > MAX_ARGV {
                    out.push((
                        format!("{what}: more than {MAX_ARGV} arguments"),
                        at.clone(),
                    ));
                }
                for a in e.argv.iter().skip(1) {
                    templates.push(("exec.argv", a, false));
                }
                for v in e.env.values() {
                    templates.push(("exec.env", v, false));
                }
                if let Some(c) = &e.cwd {
                    templates.push(("exec.cwd", c, false));
                }
            }
            for h in https {
                if reqwest::Method::from_bytes(h.method.as_bytes()).is_err() {
                    out.push((
                        format!("{what}: {:?} is not an HTTP method", h.method),
                        at.clone(),
                    ));
                }
                templates.push(("http.url", &h.url, false));
                for v in h.headers.values() {
                    templates.push(("http.headers", v, false));
                }
                if let Some(b) = &h.body {
                    let mut strings = Vec::new();
                    json_strings(b, &mut strings);
                    for p in strings
                        .iter()
                        .flat_map(|t| template::check(t, &params, &ids, false))
                    {
                        out.push((format!("{what}: http.body: {p}"), at.clone()));
                    }
                }
                for (name, ptr) in &h.captures {
                    if !(ptr.is_empty() || ptr.starts_with('/')) {
                        out.push((
                            format!(
                                "{what}: capture {name:?} must be a JSON pointer like /data/id"
                            ),
                            at.clone(),
                        ));
                    }
                }
            }
            for (field, t, result) in templates {
                for p in template::check(t, &params, &ids, result) {
                    out.push((format!("{what}: {field}: {p}"), at.clone()));
                }
            }
            if list == "steps" {
                ids.push(s.id.clone());
            }
        }
    }
    out
}

fn json_strings(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::String(s) => out.push(s.clone()),
        serde_json::Value::Array(a) => a.iter().for_each(|x| json_strings(x, out)),
        serde_json::Value::Object(o) => o.values().for_each(|x| json_strings(x, out)),
        _ => {}
    }
}

/// Loads every `*.yaml`/`*.yml` file of `dirs` (sorted by path). A bad file
/// is refused and reported; the others are kept. Two runbooks with one
/// name: the second is refused.
pub fn load_dirs(dirs: &[PathBuf], allowed: &[String]) -> (Vec<Loaded>, Vec<ConfigError>) {
    let mut files = Vec::new();
    let mut errors = Vec::new();
    for d in dirs {
        match std::fs::read_dir(d) {
            Ok(entries) => {
                for e in entries.flatten() {
                    let p = e.path();
                    let ext = p.extension().and_then(|x| x.to_str()).unwrap_or("");
                    if p.is_file() && (ext == "yaml" || ext == "yml") {
                        files.push(p);
                    }
                }
            }
            Err(e) => errors.push(ConfigError::whole_file(
                d,
                format!("cannot read the runbook folder: {e}"),
            )),
        }
    }
    files.sort();
    let mut loaded: Vec<Loaded> = Vec::new();
    for p in files {
        match load_file(&p, allowed) {
            Ok(rb) => {
                if let Some(other) = loaded.iter().find(|l| l.runbook.name == rb.name) {
                    errors.push(ConfigError::whole_file(
                        &p,
                        format!(
                            "runbook name {:?} is already used by {}",
                            rb.name,
                            other.path.display()
                        ),
                    ));
                } else {
                    loaded.push(Loaded {
                        path: p,
                        runbook: rb,
                    });
                }
            }
            Err(e) => errors.push(e),
        }
    }
    (loaded, errors)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_text(text: &str) -> Result<Runbook, String> {
        parse(
            Path::new("rb.yaml"),
            text,
            &["kubectl".into(), "/bin/echo".into()],
        )
        .map_err(|e| e.to_string())
    }

    const GOOD: &str = r#"
name: api-latency
match:
  labels: ['alertname="HighAPILatency"']
  severities: [high, critical]
params: {replicas: 4}
steps:
  - id: scale
    exec: {argv: [kubectl, scale, "--replicas={{params.replicas}}", "deploy/{{labels.service}}"]}
  - id: probe
    check:
      http: {url: "http://{{{params.host}}}/health"}
      until: "{{eq result.status 200}}"
    when: "{{eq steps.scale.exit_code 0}}"
  - id: done
    resolve: true
"#;

    #[test]
    fn a_good_runbook_loads() {
        let text = GOOD.replace("params: {replicas: 4}", "params: {replicas: 4, host: x}");
        let rb = check_text(&text).unwrap();
        assert_eq!(rb.steps.len(), 3);
        assert_eq!(rb.steps[1].kind(), Kind::Check);
        assert_eq!(rb.guardrails.max_concurrent, 1);
    }

    #[test]
    fn errors_name_the_line() {
        // (text, line, part of the message)
        let cases: &[(&str, usize, &str)] = &[
            (
                "name: a\nmatch: {}\nsteps:\n  - id: x\n    shell: rm -rf /\n",
                5,
                "unknown field `shell`",
            ),
            (
                "name: a\nmatch: {}\nsteps:\n  - id: x\n    exec: {argv: [bash, -c, \"echo\"]}\n",
                5,
                "\"bash\" is not on remediation.allowed_programs",
            ),
            (
                "name: a\nmatch: {}\nsteps:\n  - id: x\n    exec: {argv: [\"{{labels.p}}\"]}\n",
                5,
                "cannot be a template",
            ),
            (
                "name: a\nmatch: {}\nsteps:\n  - id: x\n    annotate: \"{{incident.nope}}\"\n",
                4,
                "unknown field incident.nope",
            ),
            (
                "name: a\nmatch: {}\nsteps:\n  - id: x\n    annotate: \"{{steps.later.stdout}}\"\n  - id: later\n    wait: 1s\n",
                4,
                "no earlier step \"later\"",
            ),
            (
                "name: a\nmatch: {}\nsteps:\n  - id: x\n    wait: 1s\n    ack: true\n",
                4,
                "has 2 types",
            ),
            (
                "name: a\nmatch: {}\nsteps:\n  - id: x\n    wait: 1s\n    on_failure: explode\n",
                6,
                "unknown variant `explode`",
            ),
            (
                "name: a\nmatch: {}\nsteps:\n  - id: x\n    nats: {subject: \"remediation.{{labels.svc}}\", expect: \"{{eq result.nope 1}}\"}\n",
                4,
                "unknown field result.nope",
            ),
            (
                "name: a\nmatch: {}\nsteps:\n  - id: x\n    nats: {subject: \"remediation.>\"}\n",
                4,
                "must name one subject",
            ),
            (
                "name: a\nmatch: {}\nsteps:\n  - id: x\n    nats: {subject: a, payload: {k: \"{{params.nope}}\"}}\n",
                4,
                "nats.payload",
            ),
            (
                "name: a\nmatch: {}\nsteps:\n  - id: x\n    notify: {message: hi}\n",
                4,
                "notify needs exactly one of slack",
            ),
            (
                "name: a\nmatch: {}\nsteps:\n  - id: x\n    notify: {slack: \"#ops\", message: \"{{incident.nope}}\"}\n",
                4,
                "unknown field incident.nope",
            ),
            (
                "name: a\nmatch: {}\nsteps:\n  - id: x\n    notify: {email: a, message: hi}\n",
                5,
                "unknown field `email`",
            ),
            (
                "name: a\nmatch: {}\nguardrails:\n  require_approval: {timeout: 0s}\nsteps:\n  - id: x\n    wait: 1s\n",
                4,
                "require_approval.timeout must be 1s to 7d",
            ),
        ];
        for (text, line, part) in cases {
            let e = check_text(text).unwrap_err();
            assert!(e.contains(&format!("rb.yaml:{line}")), "{text}\n=> {e}");
            assert!(e.contains(part), "{text}\n=> {e}");
        }
    }

    #[test]
    fn applies_by_labels_severity_and_event() {
        let text = GOOD.replace("params: {replicas: 4}", "params: {replicas: 4, host: x}");
        let rb = check_text(&text).unwrap();
        let mut inc =
            IncidentSummary::new(uuid::Uuid::nil(), 1, "k", "t", jiff::Timestamp::UNIX_EPOCH);
        inc.labels
            .insert("alertname".into(), "HighAPILatency".into());
        inc.severity = Severity::High;
        let opened = EventKind::opened(
            serde_json::from_value(serde_json::json!({
                "fingerprint": "0123456789abcdef", "source": "test", "labels": {},
                "starts_at": "2026-01-01T00:00:00Z", "status": "firing"
            }))
            .unwrap_or_else(|e| panic!("alert info: {e}")),
        );
        assert!(rb.applies(&opened, &inc));
        assert!(!rb.applies(&EventKind::Acknowledged, &inc));
        inc.severity = Severity::Low;
        assert!(!rb.applies(&opened, &inc));
    }

    #[test]
    fn escalated_to_a_level_fits_its_first_round_while_unacknowledged() {
        let text = "name: a\nmatch: {}\non: [acknowledged, {escalated_to: 2}]\nsteps:\n  - id: x\n    wait: 1s\n";
        let rb = check_text(text).unwrap();
        let mut inc =
            IncidentSummary::new(uuid::Uuid::nil(), 1, "k", "t", jiff::Timestamp::UNIX_EPOCH);
        let paged = |level, repeat| EventKind::Paged {
            level,
            repeat,
            pages: vec![],
            reason: String::new(),
            fired: None,
        };
        assert!(rb.applies(&paged(1, 0), &inc));
        assert!(!rb.applies(&paged(0, 0), &inc));
        assert!(!rb.applies(&paged(1, 1), &inc));
        assert!(rb.applies(&EventKind::Acknowledged, &inc));
        inc.status = IncidentStatus::Acknowledged;
        assert!(!rb.applies(&paged(1, 0), &inc));
        let e = check_text(&text.replace("escalated_to: 2", "escalated_to: 0")).unwrap_err();
        assert!(
            e.contains("rb.yaml:3") && e.contains("levels count from 1"),
            "{e}"
        );
    }
}
