//! The pure escalation planner: which policy an incident follows, who a
//! level pages on which channels, and when the next level comes.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use jiff::Timestamp;
use tocsin_proto::{
    incident::{IncidentSummary, Severity},
    notify::{Channel, PageTarget},
    silence::MatchOp,
    Labels,
};
use tocsin_rules::{matchers::MatcherSet, time::timezone, window::WeeklyWindow};

use crate::{
    config::{EscalationConfig, LevelConfig, RouteConfig, RuleStep, TargetConfig, UserConfig},
    schedule::Schedule,
};

/// The reference practice's channels per severity, used for users without
/// rules of their own: critical pages everywhere at once and by SMS again
/// after 5 minutes; high by SMS and email; medium and low by email and
/// Slack; info by email.
pub fn default_rules(severity: Severity) -> Vec<RuleStep> {
    let step = |channels: &[Channel], after_secs: u64| RuleStep {
        channels: channels.to_vec(),
        after: tocsin_runtime::config::HumanDuration::secs(after_secs),
    };
    match severity {
        Severity::Critical => vec![
            step(&[Channel::Sms, Channel::Email, Channel::Slack], 0),
            step(&[Channel::Sms], 300),
        ],
        Severity::High => vec![step(&[Channel::Sms, Channel::Email], 0)],
        Severity::Medium | Severity::Low => vec![step(&[Channel::Email, Channel::Slack], 0)],
        Severity::Info => vec![step(&[Channel::Email], 0)],
    }
}

struct Route {
    matchers: MatcherSet,
    policy: Option<String>,
    continue_matching: bool,
    routes: Vec<Route>,
}

struct Level {
    targets: Vec<TargetConfig>,
    delay: Duration,
    delay_by_severity: BTreeMap<Severity, Duration>,
    active: Option<WeeklyWindow>,
}

struct Policy {
    levels: Vec<Level>,
    repeat: u32,
    skip_empty_levels: bool,
    renotify_acknowledged_after: Option<Duration>,
}

/// One notification a level asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedPage {
    pub target: PageTarget,
    pub channel: Channel,
    pub address: String,
    /// After the level fires (from the user's notification rules).
    pub after: Duration,
    /// Index of the rule step, part of the page id.
    pub step: u32,
}

/// What firing a level produces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LevelPlan {
    pub pages: Vec<PlannedPage>,
    /// Set when the level pages nobody (and why), so it can be skipped.
    pub empty: Option<String>,
}

/// Where escalation goes after a level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    Level {
        level: u32,
        repeat: u32,
        after: Duration,
    },
    /// Every level and repeat has run.
    Exhausted,
}

/// The compiled `escalation:` config.
pub struct Planner {
    route: Route,
    policies: BTreeMap<String, Policy>,
    schedules: BTreeMap<String, Schedule>,
    users: BTreeMap<String, UserConfig>,
}

fn has_contact(u: &UserConfig, c: Channel) -> bool {
    match c {
        Channel::Sms => u.phone.is_some(),
        Channel::Email => u.email.is_some(),
        Channel::Slack => u.slack.is_some(),
        Channel::Pagerduty | Channel::Webhook => false,
    }
}

fn contact(u: &UserConfig, c: Channel) -> String {
    match c {
        Channel::Sms => u.phone.clone(),
        Channel::Email => u.email.clone(),
        Channel::Slack => u.slack.clone(),
        Channel::Pagerduty | Channel::Webhook => None,
    }
    .unwrap_or_default()
}

impl Planner {
    /// Compiles and checks the config. Every problem is reported, each
    /// naming what is wrong and how to fix it.
    pub fn new(cfg: &EscalationConfig) -> Result<Planner, Vec<String>> {
        let mut errors = Vec::new();
        let mut users = BTreeMap::new();
        for u in &cfg.users {
            // The first definition counts: checking the others too would
            // report their mistakes as the user's.
            if users.contains_key(&u.name) {
                errors.push(format!(
                    "user {:?} is defined twice; keep one definition",
                    u.name
                ));
                continue;
            }
            users.insert(u.name.clone(), u.clone());
            if let Some(phone) = &u.phone {
                if !is_e164(phone) {
                    errors.push(format!(
                        "user {:?}: phone {phone:?} is not an E.164 number; write + then the country code and number, 8 to 15 digits, e.g. \"+14155550100\"",
                        u.name
                    ));
                }
            }
            if let Some(id) = &u.slack {
                if !is_slack_member_id(id) {
                    errors.push(format!(
                        "user {:?}: slack {id:?} is not a Slack member ID; write the member ID \
                         from their Slack profile (\"Copy member ID\"), e.g. \"U0123ABCDEF\": a channel \
                         or a name there would send their pages elsewhere",
                        u.name
                    ));
                }
            }
            if let Some(email) = &u.email {
                if !is_email(email) {
                    errors.push(format!(
                        "user {:?}: email {email:?} is not an email address; write e.g. alice@example.com",
                        u.name
                    ));
                }
            }
            for (sev, steps) in &u.rules {
                for s in steps {
                    for c in &s.channels {
                        if matches!(c, Channel::Pagerduty | Channel::Webhook) {
                            errors.push(format!("user {:?}: rule for {} uses {}, which pages services, not people; use sms, email or slack", u.name, sev.as_str(), c.as_str()));
                        } else if !has_contact(u, *c) {
                            errors.push(format!(
                                "user {:?}: rule for {} uses {} but the user has no {}",
                                u.name,
                                sev.as_str(),
                                c.as_str(),
                                match c {
                                    Channel::Sms => "phone",
                                    Channel::Email => "email",
                                    _ => "slack id",
                                }
                            ));
                        }
                    }
                }
            }
        }
        let mut schedules = BTreeMap::new();
        for s in &cfg.schedules {
            match Schedule::new(s) {
                Ok(c) => {
                    for p in c.participants() {
                        match users.get(p) {
                            None => errors.push(format!("schedule {:?} names user {p:?}, who is not defined under escalation.users", s.name)),
                            Some(u) if u.email.is_none() && u.phone.is_none() && u.slack.is_none() => errors.push(format!(
                                "schedule {:?}: user {p:?} has no contact method; give them an email, phone or slack id",
                                s.name
                            )),
                            Some(_) => {}
                        }
                    }
                    if schedules.insert(s.name.clone(), c).is_some() {
                        errors.push(format!("schedule {:?} is defined twice", s.name));
                    }
                }
                Err(e) => errors.push(e),
            }
        }
        let mut policies = BTreeMap::new();
        for p in &cfg.policies {
            if p.levels.is_empty() {
                errors.push(format!(
                    "policy {:?} has no levels; add at least one",
                    p.name
                ));
            }
            let mut levels = Vec::new();
            for (i, l) in p.levels.iter().enumerate() {
                if l.targets.is_empty() {
                    errors.push(format!("policy {:?} level {i} has no targets", p.name));
                }
                for t in &l.targets {
                    match t {
                        TargetConfig::User(name) => match users.get(name) {
                            None => errors.push(format!(
                                "policy {:?} level {i} pages user {name:?}, who is not defined (defined: {})",
                                p.name,
                                names(users.keys())
                            )),
                            Some(u) if u.email.is_none() && u.phone.is_none() && u.slack.is_none() => errors.push(format!(
                                "policy {:?} level {i} pages user {name:?}, who has no contact method; give them an email, phone or slack id",
                                p.name
                            )),
                            Some(_) => {}
                        },
                        TargetConfig::Schedule(name) if !cfg.schedules.iter().any(|s| &s.name == name) => errors.push(format!(
                            "policy {:?} level {i} names schedule {name:?}, which is not defined (defined: {})",
                            p.name,
                            names(cfg.schedules.iter().map(|s| &s.name))
                        )),
                        _ => {}
                    }
                }
                levels.push(compile_level(&p.name, i, l, &mut errors));
            }
            // Nothing that would page in a loop with no pause.
            if let Some(d) = p.renotify_acknowledged_after {
                if d.get() < MIN_PAUSE {
                    errors.push(format!(
                        "policy {:?}: renotify_acknowledged_after is {d}; use at least 1m \
                         (whoever acknowledged is reminded that often while the incident stays open)",
                        p.name
                    ));
                }
            }
            if p.repeat > 0 {
                if let Some((severity, round)) = shortest_round(&levels) {
                    if round < MIN_PAUSE {
                        errors.push(format!(
                            "policy {:?} repeats {} times, but a round of its levels takes {} for {} incidents; \
                             give its levels delays of at least 1m in all, or repeat: 0",
                            p.name,
                            p.repeat,
                            tocsin_runtime::config::HumanDuration(round),
                            severity.as_str()
                        ));
                    }
                }
            }
            let policy = Policy {
                levels,
                repeat: p.repeat,
                skip_empty_levels: p.skip_empty_levels,
                renotify_acknowledged_after: p.renotify_acknowledged_after.map(|d| d.get()),
            };
            if policies.insert(p.name.clone(), policy).is_some() {
                errors.push(format!("policy {:?} is defined twice", p.name));
            }
        }
        let route = compile_route(&cfg.route, "route", &policies, &mut errors);
        if !policies.is_empty() && cfg.route.policy.is_none() {
            errors.push(format!(
                "route (the root) has no policy, so unmatched incidents would page nobody; set route.policy to one of: {}",
                names(policies.keys())
            ));
        }
        if errors.is_empty() {
            Ok(Planner {
                route,
                policies,
                schedules,
                users,
            })
        } else {
            Err(errors)
        }
    }

    /// Whether a policy of this name is configured.
    pub fn has_policy(&self, name: &str) -> bool {
        self.policies.contains_key(name)
    }

    /// The policies an incident follows (usually one; more with `continue`).
    pub fn route(&self, incident: &IncidentSummary) -> Vec<String> {
        let mut labels: Labels = incident.labels.clone();
        labels.insert(SEVERITY_LABEL.into(), incident.severity.as_str().into());
        let mut out = Vec::new();
        walk(&self.route, &labels, None, &mut out);
        out.dedup();
        out
    }

    pub fn schedule(&self, name: &str) -> Option<&Schedule> {
        self.schedules.get(name)
    }

    /// Every schedule's name, sorted.
    pub fn schedule_names(&self) -> Vec<String> {
        self.schedules.keys().cloned().collect()
    }

    pub fn levels(&self, policy: &str) -> usize {
        self.policies.get(policy).map_or(0, |p| p.levels.len())
    }

    pub fn skip_empty_levels(&self, policy: &str) -> bool {
        self.policies
            .get(policy)
            .is_some_and(|p| p.skip_empty_levels)
    }

    pub fn renotify_acknowledged_after(&self, policy: &str) -> Option<Duration> {
        self.policies
            .get(policy)
            .and_then(|p| p.renotify_acknowledged_after)
    }

    /// How long after an acknowledgement (or the last reminder) the
    /// incident of a track on `policy` is reminded: the policy's
    /// `renotify_acknowledged_after`, or, when no policy of that name is
    /// configured any more (renamed or removed while the incident was
    /// open), the shortest of the policies its route names now that the
    /// incident does not already follow (`followed`: the policies of its
    /// tracks), as an unacknowledged incident then follows them; a policy
    /// it follows reminds through its own track.
    pub fn reminder_interval(
        &self,
        policy: &str,
        incident: &IncidentSummary,
        followed: &[String],
    ) -> Option<Duration> {
        if self.has_policy(policy) {
            return self.renotify_acknowledged_after(policy);
        }
        self.route(incident)
            .iter()
            .filter(|p| !followed.contains(p))
            .filter_map(|p| self.renotify_acknowledged_after(p))
            .min()
    }

    /// The channels to page `user` on for `severity`, with their delays.
    pub fn user_pages(
        &self,
        user: &str,
        severity: Severity,
        schedule: Option<&str>,
    ) -> Vec<PlannedPage> {
        let Some(u) = self.users.get(user) else {
            return Vec::new();
        };
        let steps = u
            .rules
            .get(&severity)
            .cloned()
            .unwrap_or_else(|| default_rules(severity));
        let target = PageTarget::User {
            name: user.to_string(),
            schedule: schedule.map(str::to_string),
        };
        let mut out = Vec::new();
        for (i, step) in steps.iter().enumerate() {
            for c in &step.channels {
                if has_contact(u, *c) {
                    out.push(PlannedPage {
                        target: target.clone(),
                        channel: *c,
                        address: contact(u, *c),
                        after: step.after.get(),
                        step: i as u32,
                    });
                }
            }
        }
        out
    }

    /// What firing `level` of `policy` for `incident` at `at` pages.
    pub fn level(
        &self,
        policy: &str,
        level: u32,
        incident: &IncidentSummary,
        at: Timestamp,
    ) -> LevelPlan {
        let Some(l) = self
            .policies
            .get(policy)
            .and_then(|p| p.levels.get(level as usize))
        else {
            return LevelPlan {
                pages: vec![],
                empty: Some(format!("policy {policy} has no level {}", level + 1)),
            };
        };
        if let Some(active) = &l.active {
            if !active.contains(at) {
                return LevelPlan {
                    pages: vec![],
                    empty: Some(format!("level {} is outside its active hours", level + 1)),
                };
            }
        }
        let mut pages = Vec::new();
        let mut nobody = Vec::new();
        for t in &l.targets {
            match t {
                TargetConfig::User(name) => {
                    pages.extend(self.user_pages(name, incident.severity, None))
                }
                TargetConfig::Schedule(name) => {
                    match self.schedules.get(name).and_then(|s| s.on_call(at)) {
                        Some(oc) => {
                            pages.extend(self.user_pages(&oc.user, incident.severity, Some(name)))
                        }
                        None => nobody.push(format!("nobody is on call for schedule {name}")),
                    }
                }
                TargetConfig::SlackChannel(channel) => pages.push(PlannedPage {
                    target: PageTarget::SlackChannel {
                        channel: channel.clone(),
                    },
                    channel: Channel::Slack,
                    address: channel.clone(),
                    after: Duration::ZERO,
                    step: 0,
                }),
                TargetConfig::PagerdutyService(service) => pages.push(PlannedPage {
                    target: PageTarget::PagerdutyService {
                        service: service.clone(),
                    },
                    channel: Channel::Pagerduty,
                    address: String::new(),
                    after: Duration::ZERO,
                    step: 0,
                }),
                TargetConfig::Webhook(name) => pages.push(PlannedPage {
                    target: PageTarget::Webhook { name: name.clone() },
                    channel: Channel::Webhook,
                    address: String::new(),
                    after: Duration::ZERO,
                    step: 0,
                }),
            }
        }
        pages.sort_by(|a, b| {
            (a.after, a.target.key(), a.channel).cmp(&(b.after, b.target.key(), b.channel))
        });
        pages.dedup_by(|a, b| a.target == b.target && a.channel == b.channel && a.step == b.step);
        let empty = pages.is_empty().then(|| {
            if nobody.is_empty() {
                "nobody to page".to_string()
            } else {
                nobody.join("; ")
            }
        });
        LevelPlan { pages, empty }
    }

    /// After `level` (in round `repeat`), what comes next and how long after.
    pub fn next(&self, policy: &str, level: u32, repeat: u32, severity: Severity) -> Next {
        let Some(p) = self.policies.get(policy) else {
            return Next::Exhausted;
        };
        let Some(l) = p.levels.get(level as usize) else {
            return Next::Exhausted;
        };
        let after = l
            .delay_by_severity
            .get(&severity)
            .copied()
            .unwrap_or(l.delay);
        if (level as usize) + 1 < p.levels.len() {
            Next::Level {
                level: level + 1,
                repeat,
                after,
            }
        } else if repeat < p.repeat {
            Next::Level {
                level: 0,
                repeat: repeat + 1,
                after,
            }
        } else {
            Next::Exhausted
        }
    }
}

/// A Slack member ID: `U` (or `W`, Enterprise Grid) then capitals and
/// digits.
fn is_slack_member_id(s: &str) -> bool {
    (3..=32).contains(&s.len())
        && (s.starts_with('U') || s.starts_with('W'))
        && s.chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit())
}

/// The least time between two reminders of an acknowledged incident, and
/// the least time one round of a repeating policy may take.
const MIN_PAUSE: Duration = Duration::from_secs(60);

/// The severity whose round through `levels` is shortest, and its length
/// (each level's delay for that severity, summed).
fn shortest_round(levels: &[Level]) -> Option<(Severity, Duration)> {
    use Severity::*;
    [Critical, High, Medium, Low, Info]
        .into_iter()
        .map(|sev| {
            let round = levels
                .iter()
                .map(|l| l.delay_by_severity.get(&sev).copied().unwrap_or(l.delay))
                .sum();
            (sev, round)
        })
        .min_by_key(|(_, round)| *round)
}

fn names<'a>(it: impl Iterator<Item = &'a String>) -> String {
    let v: Vec<&str> = it.map(String::as_str).collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

fn compile_level(policy: &str, i: usize, l: &LevelConfig, errors: &mut Vec<String>) -> Level {
    let active = l.active.as_ref().and_then(|r| {
        match timezone(&r.timezone)
            .map_err(|e| format!("timezone {e}"))
            .and_then(|tz| WeeklyWindow::new(&r.weekdays, &r.start, &r.end, tz))
        {
            Ok(c) => Some(c),
            Err(e) => {
                errors.push(format!("policy {policy:?} level {i} active: {e}"));
                None
            }
        }
    });
    Level {
        targets: l.targets.clone(),
        delay: l.delay.get(),
        delay_by_severity: l
            .delay_by_severity
            .iter()
            .map(|(k, v)| (*k, v.get()))
            .collect(),
        active,
    }
}

fn compile_route(
    r: &RouteConfig,
    path: &str,
    policies: &BTreeMap<String, Policy>,
    errors: &mut Vec<String>,
) -> Route {
    if let Some(p) = &r.policy {
        if !policies.contains_key(p) {
            errors.push(format!(
                "{path} names policy {p:?}, which is not defined (defined: {})",
                names(policies.keys())
            ));
        }
    }
    let matchers = MatcherSet::new(&r.matchers).unwrap_or_else(|e| {
        errors.push(format!("{path}: {e}"));
        MatcherSet::default()
    });
    for m in r.matchers.iter().filter(|m| m.name == SEVERITY_LABEL) {
        let Ok(one) = MatcherSet::new(std::slice::from_ref(m)) else {
            continue;
        };
        let matched = SEVERITIES
            .iter()
            .filter(|s| {
                let labels: Labels = [(SEVERITY_LABEL.to_string(), s.to_string())].into();
                one.matches(&labels)
            })
            .count();
        let useless = match m.op {
            // Must name (or match) one of the severities...
            MatchOp::Eq | MatchOp::Re => matched == 0,
            // ... or exclude one.
            MatchOp::NotEq | MatchOp::NotRe => matched == SEVERITIES.len(),
        };
        if useless {
            errors.push(format!(
                "{path}: matcher {SEVERITY_LABEL}{}\"{}\" names no severity; {SEVERITY_LABEL} is one of {}",
                m.op.as_str(),
                m.value,
                SEVERITIES.join(", ")
            ));
        }
    }
    let routes = r
        .routes
        .iter()
        .enumerate()
        .map(|(i, c)| compile_route(c, &format!("{path}.routes[{i}]"), policies, errors))
        .collect();
    Route {
        matchers,
        policy: r.policy.clone(),
        continue_matching: r.continue_matching,
        routes,
    }
}

/// The label routes see the incident's severity under.
const SEVERITY_LABEL: &str = "tocsin_severity";

/// Every value `tocsin_severity` takes.
const SEVERITIES: [&str; 5] = ["critical", "high", "medium", "low", "info"];

/// E.164: `+`, then 8 to 15 digits, the first not 0.
fn is_e164(phone: &str) -> bool {
    let Some(digits) = phone.strip_prefix('+') else {
        return false;
    };
    (8..=15).contains(&digits.len())
        && digits.bytes().all(|b| b.is_ascii_digit())
        && !digits.starts_with('0')
}

/// Something `@` a domain (`root@localhost` too), without spaces, at most
/// 254 characters; the mail server is the judge of the rest.
fn is_email(email: &str) -> bool {
    let Some((local, domain)) = email.rsplit_once('@') else {
        return false;
    };
    email.len() <= 254
        && !local.is_empty()
        && !domain.is_empty()
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !email.chars().any(|c| c.is_whitespace() || c.is_control())
}

/// Alertmanager's route matching: depth first; the first matching child
/// wins unless it continues; a node whose children all miss decides itself.
fn walk(r: &Route, labels: &Labels, inherited: Option<&str>, out: &mut Vec<String>) -> bool {
    if !r.matchers.matches(labels) {
        return false;
    }
    let policy = r.policy.as_deref().or(inherited);
    let mut matched_child = false;
    for c in &r.routes {
        if walk(c, labels, policy, out) {
            matched_child = true;
            if !c.continue_matching {
                break;
            }
        }
    }
    if !matched_child {
        if let Some(p) = policy {
            out.push(p.to_string());
        }
    }
    true
}

/// Every user a config can page (for checks and queries).
pub fn pageable_users(cfg: &EscalationConfig) -> BTreeSet<String> {
    cfg.users.iter().map(|u| u.name.clone()).collect()
}
