//! The whole config file: runtime sections plus one section per service.

use std::path::Path;

use serde::Deserialize;
use tocsin_chatops::ChatopsConfig;
use tocsin_escalation::EscalationConfig;
use tocsin_incidents::IncidentsConfig;
use tocsin_ingest::IngestConfig;
use tocsin_notifier::NotifierConfig;
use tocsin_remediation::RemediationConfig;
use tocsin_runtime::{
    config::{self, ConfigError},
    nats::{self, NatsConfig},
    streams::JetStreamConfig,
};

/// `config/tocsin.yaml`. Unknown keys are errors.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// How to reach NATS and as whom (`nats.credentials.<service>`).
    /// Default `nats://127.0.0.1:4222`, no auth.
    #[serde(default)]
    pub nats: NatsConfig,
    /// Stream settings (replicas, retention, duplicate window).
    #[serde(default)]
    pub jetstream: JetStreamConfig,
    /// The ingest service; required to run it.
    #[serde(default, deserialize_with = "section_ingest")]
    pub ingest: Option<IngestConfig>,
    /// The incidents service; every key has a default.
    #[serde(default)]
    pub incidents: IncidentsConfig,
    /// The escalation service: routes, policies, schedules, users.
    #[serde(default)]
    pub escalation: EscalationConfig,
    /// The notifier: providers, templates, retries. Without this section
    /// `tocsin up` runs no notifier and pages wait on the NOTIFY stream.
    #[serde(default, deserialize_with = "section_notifier")]
    pub notifier: Option<NotifierConfig>,
    /// Chat-ops and the HTTP API: Slack, SMS replies, `/api/v1`,
    /// `/status.json`, reports. Without this section `tocsin up` runs no
    /// chat-ops service.
    #[serde(default, deserialize_with = "section_chatops")]
    pub chatops: Option<ChatopsConfig>,
    /// Runbooks that act on incidents. Without this section `tocsin up`
    /// runs no remediation service.
    #[serde(default, deserialize_with = "section_remediation")]
    pub remediation: Option<RemediationConfig>,
    /// Problems that do not stop start-up (a channel only the console
    /// takes), located like errors; `check-config` prints them.
    #[serde(skip)]
    pub warnings: Vec<String>,
}

// The sections that hold secrets (ingest tokens, provider credentials,
// signing secrets) are read through `config::section`, so a process reads
// only those of the services it runs (`Config::load`). `incidents` and
// `escalation` hold none and are always read: other services use them
// (heartbeat names, users).
macro_rules! section_fn {
    ($name:ident, $section:literal, $ty:ty) => {
        fn $name<'de, D: serde::Deserializer<'de>>(d: D) -> Result<$ty, D::Error> {
            tocsin_runtime::config::section($section, d)
        }
    };
}
section_fn!(section_ingest, "ingest", Option<IngestConfig>);
section_fn!(section_notifier, "notifier", Option<NotifierConfig>);
section_fn!(section_chatops, "chatops", Option<ChatopsConfig>);
section_fn!(
    section_remediation,
    "remediation",
    Option<RemediationConfig>
);

/// The part of the config operator commands (`tocsin ack`, `list` ...)
/// need: how to reach NATS, as the `operator` identity. Other sections, and
/// the other identities' `nats.credentials`, are not read, so their secrets
/// need not be set on an operator's machine.
#[derive(Debug, Clone, Deserialize)]
pub struct OperatorConfig {
    #[serde(default)]
    pub nats: NatsConfig,
    #[serde(default)]
    pub jetstream: JetStreamConfig,
    /// How long a command waits for NATS and for the services' answers
    /// (`--timeout`, not from the file).
    #[serde(skip, default = "default_patience")]
    pub patience: std::time::Duration,
}

fn default_patience() -> std::time::Duration {
    std::time::Duration::from_secs(10)
}

impl Default for OperatorConfig {
    fn default() -> Self {
        OperatorConfig {
            nats: NatsConfig::default(),
            jetstream: JetStreamConfig::default(),
            patience: default_patience(),
        }
    }
}

impl OperatorConfig {
    /// The NATS identity operator commands connect as.
    pub const IDENTITY: &'static str = "operator";

    pub fn load(path: &Path) -> Result<OperatorConfig, ConfigError> {
        nats::reading_credentials_of(&[Self::IDENTITY], || config::load(path))
    }
}

/// Which services a process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    Ingest,
    Incidents,
    Escalation,
    Notifier,
    Chatops,
    Remediation,
}

impl Service {
    /// What `tocsin up` runs (the notifier, chat-ops and remediation only
    /// with their sections).
    pub const ALL: [Service; 6] = [
        Service::Ingest,
        Service::Incidents,
        Service::Escalation,
        Service::Notifier,
        Service::Chatops,
        Service::Remediation,
    ];

    /// Its name, which is also its NATS identity (`nats.credentials.<name>`,
    /// the NATS user of the shipped configs).
    pub fn name(self) -> &'static str {
        match self {
            Service::Ingest => "ingest",
            Service::Incidents => "incidents",
            Service::Escalation => "escalation",
            Service::Notifier => "notifier",
            Service::Chatops => "chatops",
            Service::Remediation => "remediation",
        }
    }
}

impl Config {
    /// Gives chat-ops who is who (names, Slack ids, phone numbers) from
    /// `escalation.users`: one list of people, kept in one place.
    pub fn compose_chatops_users(&mut self) {
        let users = self
            .escalation
            .users
            .iter()
            .map(|u| tocsin_chatops::config::ChatUser {
                name: u.name.clone(),
                slack: u.slack.clone(),
                phone: u.phone.clone(),
            })
            .collect();
        if let Some(c) = self.chatops.as_mut() {
            c.users = users;
        }
    }

    /// The NATS identity that sets up the streams when it has credentials
    /// (`nats.credentials.admin`); see `app::run`.
    pub const ADMIN: &'static str = "admin";

    /// Loads and validates `path` for running `services`. Of
    /// `nats.credentials`, only the entries of those services (and of the
    /// admin) are read, and of the `ingest`, `notifier`, `chatops` and
    /// `remediation` sections only those of `services`: a host needs the
    /// secrets of what it runs only.
    pub fn load(path: &Path, services: &[Service]) -> Result<Config, ConfigError> {
        let mut identities: Vec<&str> = services.iter().map(|s| s.name()).collect();
        identities.push(Self::ADMIN);
        let sections: Vec<&str> = services.iter().map(|s| s.name()).collect();
        let mut cfg: Config = nats::reading_credentials_of(&identities, || {
            config::reading_sections(&sections, || config::load(path))
        })?;
        cfg.compose_chatops_users();
        for s in services {
            match s {
                Service::Ingest if cfg.ingest.is_none() => {
                    return Err(ConfigError::whole_file(
                        path,
                        "no `ingest:` section; add one with at least one token \
                         (see config/tocsin.yaml in the Tocsin repository)",
                    ))
                }
                Service::Ingest => {}
                Service::Incidents => {
                    if let Err(e) = tocsin_incidents::compile(&cfg.incidents) {
                        let msg = match e {
                            tocsin_incidents::IncidentsError::Config(m) => m,
                            other => other.to_string(),
                        };
                        return Err(located(
                            path,
                            "incidents",
                            vec![format!("incidents: {msg}")],
                        ));
                    }
                }
                Service::Notifier => match &cfg.notifier.clone() {
                    None if services.len() == 1 => {
                        return Err(ConfigError::whole_file(
                            path,
                            "no `notifier:` section; add one with at least one channel \
                             (see config/tocsin.yaml in the Tocsin repository)",
                        ))
                    }
                    None => {}
                    Some(n) => match tocsin_notifier::check(n) {
                        Err(tocsin_notifier::NotifierError::Config(errors)) => {
                            let errors = errors
                                .into_iter()
                                .map(|e| format!("notifier: {e}"))
                                .collect();
                            return Err(located(path, "notifier", errors));
                        }
                        Ok(checked) => {
                            let (errors, warnings) = pages_reach(&cfg.escalation, &checked);
                            if !errors.is_empty() {
                                return Err(located_each(path, errors));
                            }
                            cfg.warnings.extend(
                                warnings
                                    .into_iter()
                                    .map(|(m, at)| located_each(path, vec![(m, at)]).to_string()),
                            );
                        }
                    },
                },
                Service::Remediation => match &cfg.remediation {
                    None if services.len() == 1 => {
                        return Err(ConfigError::whole_file(
                            path,
                            "no `remediation:` section; add one with runbook_dirs \
                             (see config/tocsin.yaml in the Tocsin repository)",
                        ))
                    }
                    None => {}
                    Some(r) => {
                        let errors = r.check();
                        if !errors.is_empty() {
                            let errors = errors
                                .into_iter()
                                .map(|e| format!("remediation: {e}"))
                                .collect();
                            return Err(located(path, "remediation", errors));
                        }
                        // A bad runbook is refused and the others run: it
                        // is reported, not a reason to stop.
                        let (loaded, errors) = tocsin_remediation::load_runbooks(r);
                        cfg.warnings.extend(
                            errors
                                .into_iter()
                                .map(|e| format!("runbook refused (the others run): {e}")),
                        );
                        cfg.warnings.extend(holds_need_group_wait(
                            &loaded,
                            cfg.incidents.group_wait.get(),
                        ));
                    }
                },
                Service::Chatops => {
                    if cfg.chatops.is_none() && services.len() == 1 {
                        return Err(ConfigError::whole_file(
                            path,
                            "no `chatops:` section; add one (see config/tocsin.yaml in the Tocsin repository)",
                        ));
                    }
                }
                Service::Escalation => {
                    if let Err(tocsin_escalation::EscalationError::Config(errors)) =
                        tocsin_escalation::check(&cfg.escalation)
                    {
                        let errors = errors
                            .into_iter()
                            .map(|e| format!("escalation: {e}"))
                            .collect();
                        return Err(located(path, "escalation", errors));
                    }
                }
            }
        }
        Ok(cfg)
    }
}

/// The shortest `incidents.group_wait` that lets a runbook's hold land
/// before escalation's first level (the run starts on `opened` and records
/// its hold within milliseconds; this leaves room for a loaded bus).
pub const HOLD_NEEDS_GROUP_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// A runbook that holds pages (`page: on_failure`) only holds them if its
/// hold is recorded before escalation pages the first level, which happens
/// once `incidents.group_wait` has passed: a warning per such runbook when
/// group_wait is shorter than [`HOLD_NEEDS_GROUP_WAIT`].
fn holds_need_group_wait(
    loaded: &[tocsin_remediation::runbook::Loaded],
    group_wait: std::time::Duration,
) -> Vec<String> {
    if group_wait >= HOLD_NEEDS_GROUP_WAIT {
        return Vec::new();
    }
    loaded
        .iter()
        .filter(|l| l.runbook.page == tocsin_remediation::runbook::PageMode::OnFailure)
        .map(|l| {
            format!(
                "{}: runbook \"{}\" holds pages (page: on_failure), but incidents.group_wait is {:?}: \
                 escalation may page before the run records its hold; set incidents.group_wait \
                 to at least {}s",
                l.path.display(),
                l.runbook.name,
                group_wait,
                HOLD_NEEDS_GROUP_WAIT.as_secs()
            )
        })
        .collect()
}

/// Where a cross-check message points: a value in a section, or a user.
#[derive(Debug, Clone)]
enum At {
    /// The first line of `section` (from its start) holding `value`.
    Value(&'static str, String),
    /// The `name:` line of user `name` under `escalation.users`.
    User(String),
}

/// A message and where it points.
type Located = (String, At);

/// Whether every page the escalation config can make has somewhere to go:
/// PagerDuty services and webhooks that the notifier defines, and
/// channels (for users, those their rules use and they have a contact for)
/// that have a provider. A channel that only the console takes is a
/// warning (fine for development, not for production).
fn pages_reach(
    esc: &EscalationConfig,
    checked: &tocsin_notifier::Checked,
) -> (Vec<Located>, Vec<Located>) {
    use tocsin_escalation::config::TargetConfig;
    use tocsin_proto::{incident::Severity, notify::Channel};
    let (mut errors, mut warnings) = (Vec::new(), Vec::new());
    let list = |v: &[String]| {
        if v.is_empty() {
            "none".to_string()
        } else {
            v.join(", ")
        }
    };
    let channel = |c: Channel, what: String, at: At, errors: &mut Vec<_>, warnings: &mut Vec<_>| {
        if checked.console_takes.contains(&c) {
            warnings.push((
                format!(
                    "{what}: notifier.{} is not configured, so these pages only go to the console (notifier.console)",
                    c.as_str()
                ),
                at,
            ));
        } else if !checked.channels.contains(&c) {
            errors.push((
                format!(
                    "{what}, but notifier.{} is not configured: those pages would fail; configure it, or change the rules",
                    c.as_str()
                ),
                at,
            ));
        }
    };
    for p in &esc.policies {
        for (i, level) in p.levels.iter().enumerate() {
            let n = i + 1;
            for t in &level.targets {
                match t {
                    TargetConfig::PagerdutyService(name) => {
                        if checked.pagerduty_services.contains(name) {
                            continue;
                        }
                        let what = format!(
                            "escalation: policy \"{}\" level {n} pages pagerduty_service \"{name}\"",
                            p.name
                        );
                        if checked.console_takes.contains(&Channel::Pagerduty) {
                            channel(
                                Channel::Pagerduty,
                                what,
                                At::Value("escalation", name.clone()),
                                &mut errors,
                                &mut warnings,
                            );
                        } else {
                            errors.push((
                                format!(
                                    "{what}, which notifier.pagerduty.services does not define (defined: {})",
                                    list(&checked.pagerduty_services)
                                ),
                                At::Value("escalation", name.clone()),
                            ));
                        }
                    }
                    TargetConfig::Webhook(name) if !checked.webhooks.contains(name) => {
                        errors.push((
                            format!(
                                "escalation: policy \"{}\" level {n} pages webhook \"{name}\", which notifier.webhooks does not define (defined: {})",
                                p.name,
                                list(&checked.webhooks)
                            ),
                            At::Value("escalation", name.clone()),
                        ));
                    }
                    TargetConfig::SlackChannel(name) => channel(
                        Channel::Slack,
                        format!(
                            "escalation: policy \"{}\" level {n} pages slack_channel \"{name}\"",
                            p.name
                        ),
                        At::Value("escalation", name.clone()),
                        &mut errors,
                        &mut warnings,
                    ),
                    _ => {}
                }
            }
        }
    }
    let severities = [
        Severity::Critical,
        Severity::High,
        Severity::Medium,
        Severity::Low,
        Severity::Info,
    ];
    // Users: one message per channel, naming every user it concerns.
    let mut by_channel: Vec<(Channel, Vec<String>)> = Vec::new();
    for u in &esc.users {
        for sev in severities {
            let steps = u
                .rules
                .get(&sev)
                .cloned()
                .unwrap_or_else(|| tocsin_escalation::plan::default_rules(sev));
            for step in steps {
                for c in step.channels {
                    let reachable = match c {
                        Channel::Sms => u.phone.is_some(),
                        Channel::Email => u.email.is_some(),
                        Channel::Slack => u.slack.is_some(),
                        _ => true,
                    };
                    if !reachable {
                        continue;
                    }
                    match by_channel.iter_mut().find(|(x, _)| *x == c) {
                        Some((_, users)) if users.contains(&u.name) => {}
                        Some((_, users)) => users.push(u.name.clone()),
                        None => by_channel.push((c, vec![u.name.clone()])),
                    }
                }
            }
        }
    }
    for (c, users) in by_channel {
        let names = users
            .iter()
            .map(|u| format!("\"{u}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let what = format!(
            "escalation: user{} {names} {} paged by {} (by their rules, or the default rules, for some severities; the user has a contact for it)",
            if users.len() == 1 { "" } else { "s" },
            if users.len() == 1 { "is" } else { "are" },
            c.as_str()
        );
        channel(
            c,
            what,
            At::User(users[0].clone()),
            &mut errors,
            &mut warnings,
        );
    }
    (errors, warnings)
}

/// Located cross-check messages, one per line.
fn located_each(path: &Path, messages: Vec<Located>) -> ConfigError {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let section_start = |section: &str| {
        lines
            .iter()
            .position(|l| l.trim_end() == format!("{section}:"))
            .unwrap_or(0)
    };
    let place = |at: &At| -> Option<(usize, usize)> {
        match at {
            At::Value(section, value) => {
                let start = section_start(section);
                lines
                    .iter()
                    .enumerate()
                    .skip(start)
                    .find_map(|(i, l)| find_token(l, value).map(|c| (i + 1, c + 1)))
            }
            At::User(name) => {
                let start = section_start("escalation");
                let users = lines
                    .iter()
                    .enumerate()
                    .skip(start)
                    .find(|(_, l)| l.trim_start().starts_with("users:"))
                    .map(|(i, _)| i)
                    .unwrap_or(start);
                lines.iter().enumerate().skip(users).find_map(|(i, l)| {
                    let code = l.split(" #").next().unwrap_or(l);
                    let at = code.find("name:")?;
                    let rest = code[at + 5..].trim_start();
                    let rest = rest.trim_start_matches(['"', '\'']);
                    (rest.starts_with(name.as_str())
                        && rest[name.len()..]
                            .chars()
                            .next()
                            .is_none_or(|c| !(c.is_alphanumeric() || c == '_' || c == '-')))
                    .then(|| (i + 1, at + 1))
                })
            }
        }
    };
    let mut errors: Vec<ConfigError> = messages
        .iter()
        .map(|(m, at)| {
            let p = place(at);
            ConfigError {
                file: path.to_path_buf(),
                line: p.map(|a| a.0),
                column: p.map(|a| a.1),
                message: m.clone(),
            }
        })
        .collect();
    let mut first = errors.remove(0);
    for e in errors {
        first.message.push('\n');
        first.message.push_str(&e.to_string());
    }
    first
}

/// Turns semantic errors (found after parsing, so without a position) into
/// located ones: each message names the offending value in quotes, and the
/// first line of the section holding that value is where to look. Several
/// errors are reported together, one per line.
fn located(path: &Path, section: &str, messages: Vec<String>) -> ConfigError {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let start = lines
        .iter()
        .position(|l| l.trim_end() == format!("{section}:"))
        .unwrap_or(0);
    // "incidents: max_in_memory is 0", "incidents: incidents.lease_ttl is
    // 0ns": the key named first, when it is written in the section.
    let key = |message: &str| -> Option<(usize, usize)> {
        let rest = message
            .strip_prefix(section)
            .and_then(|r| r.strip_prefix(": "))
            .unwrap_or(message);
        let mut words = rest.split_whitespace();
        let word = words.next()?.trim_end_matches([':', ',', ';']);
        // A path, or a key followed by "is" ("route names policy ..." is
        // about the value it quotes).
        let is_key = (word.contains('.') || words.next() == Some("is"))
            && tocsin_runtime::config::is_key_path(word);
        if !is_key {
            return None;
        }
        let path = match word.strip_prefix(section).and_then(|r| r.strip_prefix('.')) {
            Some(_) => word.to_string(),
            None => format!("{section}.{word}"),
        };
        let k = tocsin_runtime::config::locate_key(&text, &path)?;
        // Only the section itself found: the search below does better.
        (k.line > start + 1).then_some((k.line, k.column))
    };
    let place = |message: &str| -> Option<(usize, usize)> {
        if let Some(at) = key(message) {
            return Some(at);
        }
        // Suggestions ("did you mean \"Europe/Berlin\"?") are not the culprit.
        let head = message.split("did you mean").next().unwrap_or(message);
        let quoted: Vec<&str> = head
            .split('"')
            .skip(1)
            .step_by(2)
            .filter(|q| !q.is_empty())
            .collect();
        // "policy \"p\": ..." about the policy itself: its `name: p`.
        let own = head
            .strip_prefix(section)
            .and_then(|r| r.strip_prefix(": "))
            .unwrap_or(head);
        let about_one = ["policy \"", "schedule \"", "user \""]
            .iter()
            .any(|kind| own.starts_with(kind));
        if about_one && quoted.len() == 1 && !head.contains("is defined twice") {
            let name = quoted[0];
            if let Some(at) = lines
                .iter()
                .enumerate()
                .skip(start)
                .find_map(|(i, l)| name_at(l, name).map(|c| (i + 1, c + 1)))
            {
                return Some(at);
            }
        }
        // "user \"alice\" is defined twice": the second `name: alice`.
        if head.contains("is defined twice") {
            if let Some(name) = quoted.first() {
                let defs: Vec<(usize, usize)> = lines
                    .iter()
                    .enumerate()
                    .skip(start)
                    .filter_map(|(i, l)| name_at(l, name).map(|c| (i + 1, c + 1)))
                    .collect();
                if let Some(second) = defs.get(1) {
                    return Some(*second);
                }
            }
        }
        for needle in quoted.iter().rev() {
            for (i, line) in lines.iter().enumerate().skip(start) {
                if let Some(col) = find_token(line, needle) {
                    return Some((i + 1, col + 1));
                }
            }
        }
        None
    };
    let mut errors: Vec<ConfigError> = messages
        .iter()
        .map(|m| {
            let at = place(m);
            ConfigError {
                file: path.to_path_buf(),
                line: at.map(|a| a.0).or(Some(start + 1)),
                column: at.map(|a| a.1),
                message: m.clone(),
            }
        })
        .collect();
    let mut first = errors.remove(0);
    for e in errors {
        first.message.push('\n');
        first.message.push_str(&e.to_string());
    }
    first
}

/// Where `name: <name>` (quoted or not) stands in `line`: the column of `name:`.
fn name_at(line: &str, name: &str) -> Option<usize> {
    let code = line.split(" #").next().unwrap_or(line);
    let mut from = 0;
    while let Some(i) = code[from..].find("name:") {
        let at = from + i;
        let before = code[..at].chars().next_back();
        let rest = code[at + 5..].trim_start();
        let rest = rest.trim_start_matches(['"', '\'']);
        if before.is_none_or(|c| !(c.is_alphanumeric() || c == '_'))
            && rest.starts_with(name)
            && rest[name.len()..]
                .chars()
                .next()
                .is_none_or(|c| !(c.is_alphanumeric() || c == '_' || c == '-' || c == '.'))
        {
            return Some(at);
        }
        from = at + 5;
    }
    None
}

/// Where `needle` stands in `line` as a whole YAML value (not inside a longer word).
fn find_token(line: &str, needle: &str) -> Option<usize> {
    let code = line.split(" #").next().unwrap_or(line);
    let mut from = 0;
    while let Some(i) = code[from..].find(needle) {
        let at = from + i;
        let before = code[..at].chars().next_back();
        let after = code[at + needle.len()..].chars().next();
        let boundary = |c: Option<char>| {
            c.is_none_or(|c| !(c.is_alphanumeric() || c == '_' || c == '-' || c == '.' || c == '/'))
        };
        if boundary(before) && boundary(after) {
            return Some(at);
        }
        from = at + needle.len();
    }
    None
}
