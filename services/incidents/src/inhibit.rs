//! Alertmanager inhibition rules: a firing source alert mutes target alerts
//! that agree with it on the `equal` labels.
//!
//! The logic is Alertmanager's (inhibit/inhibit.go), including its
//! two-sided rule: when the target also matches the source matchers, only
//! source alerts that do *not* match the target matchers may inhibit it, so
//! an alert never inhibits itself and alerts matching both sides do not
//! inhibit each other.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    sync::Arc,
};

use serde::Deserialize;
use tocsin_proto::{silence::Matcher, Fingerprint, Labels};
use uuid::Uuid;

use crate::matchers::{deserialize_matchers, MatcherSet};

/// One inhibition rule as written in the config file, e.g.
///
/// ```yaml
/// - name: node down hides its warnings
///   source_matchers: ['alertname="NodeDown"']
///   target_matchers: ['severity="warning"']
///   equal: [instance]
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InhibitRuleConfig {
    /// Shown in the inhibition reason. Default: the rule's position (`#0`).
    #[serde(default)]
    pub name: Option<String>,
    /// Alerts that inhibit (Alertmanager matcher strings). Required, non-empty.
    #[serde(deserialize_with = "deserialize_matchers")]
    pub source_matchers: Vec<Matcher>,
    /// Alerts that get inhibited. Required, non-empty.
    #[serde(deserialize_with = "deserialize_matchers")]
    pub target_matchers: Vec<Matcher>,
    /// Labels whose values must be equal on source and target; a missing
    /// label counts as the empty string. Default: none.
    #[serde(default)]
    pub equal: Vec<String>,
}

#[derive(Clone, Debug)]
struct Rule {
    name: Option<String>,
    index: usize,
    source: MatcherSet,
    target: MatcherSet,
    equal: Vec<String>,
}

/// The compiled inhibition rules, evaluated in config order.
#[derive(Clone, Debug, Default)]
pub struct Inhibitor {
    rules: Vec<Rule>,
}

/// Why an alert is inhibited: which rule, and which firing source alert.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Inhibition<'a> {
    /// The rule's `name`, if it has one.
    pub rule_name: Option<&'a str>,
    /// The rule's position in the config (0-based).
    pub rule_index: usize,
    pub source: &'a Fingerprint,
}

impl fmt::Display for Inhibition<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.rule_name {
            Some(name) => write!(f, "inhibited by rule {name:?}")?,
            None => write!(f, "inhibited by rule #{}", self.rule_index)?,
        }
        write!(f, " (source alert {})", self.source)
    }
}

impl Inhibitor {
    pub fn new(rules: &[InhibitRuleConfig]) -> Result<Self, String> {
        let rules = rules
            .iter()
            .enumerate()
            .map(|(index, cfg)| {
                let invalid = |problem: String| match &cfg.name {
                    Some(name) => format!("inhibit rule #{index} ({name:?}): {problem}"),
                    None => format!("inhibit rule #{index}: {problem}"),
                };
                // An empty matcher list matches every alert: a rule that
                // inhibits everything (or by everything) is a mistake.
                if cfg.source_matchers.is_empty() {
                    return Err(invalid("source_matchers must not be empty".to_string()));
                }
                if cfg.target_matchers.is_empty() {
                    return Err(invalid("target_matchers must not be empty".to_string()));
                }
                if cfg.equal.iter().any(String::is_empty) {
                    return Err(invalid("equal contains an empty label name".to_string()));
                }
                Ok(Rule {
                    name: cfg.name.clone(),
                    index,
                    source: MatcherSet::new(&cfg.source_matchers).map_err(invalid)?,
                    target: MatcherSet::new(&cfg.target_matchers).map_err(invalid)?,
                    equal: cfg.equal.clone(),
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Inhibitor { rules })
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The reason `target` is inhibited by one of the `firing` alerts, e.g.
    /// `inhibited by rule "node down" (source alert 6a4f37c34a2d1e4b)`.
    /// See [`Inhibitor::inhibition`].
    pub fn inhibited_by<'a, I>(&self, target: &Labels, firing: I) -> Option<String>
    where
        I: IntoIterator<Item = (&'a Fingerprint, &'a Labels)> + Clone,
    {
        self.inhibition(target, firing).map(|i| i.to_string())
    }

    /// The first rule (in config order) and, for it, the first source alert
    /// (in `firing` order) that inhibit `target`.
    ///
    /// `firing` are the currently firing alerts; it may include `target`
    /// itself. Resolved alerts must not be in it: Alertmanager skips
    /// resolved sources too. It is iterated once per rule whose target
    /// matchers match.
    pub fn inhibition<'r, 'a: 'r, I>(&'r self, target: &Labels, firing: I) -> Option<Inhibition<'r>>
    where
        I: IntoIterator<Item = (&'a Fingerprint, &'a Labels)> + Clone,
    {
        let value = |labels: &'_ Labels, name: &str| -> String {
            labels.get(name).cloned().unwrap_or_default()
        };
        for rule in &self.rules {
            if !rule.target.matches(target) {
                continue;
            }
            // If the target matches the source side too, only sources that
            // do not match the target side may inhibit it; otherwise two
            // alerts matching both sides would inhibit each other (and an
            // alert itself).
            let exclude_two_sided = rule.source.matches(target);
            let source = firing.clone().into_iter().find(|(_, labels)| {
                rule.source.matches(labels)
                    && rule
                        .equal
                        .iter()
                        .all(|n| value(labels, n) == value(target, n))
                    && !(exclude_two_sided && rule.target.matches(labels))
            });
            if let Some((fingerprint, _)) = source {
                return Some(Inhibition {
                    rule_name: rule.name.as_deref(),
                    rule_index: rule.index,
                    source: fingerprint,
                });
            }
        }
        None
    }
}

/// The firing alerts of open incidents that can inhibit, indexed per rule
/// by the values of the rule's `equal` labels, so deciding whether an alert
/// is inhibited looks up one entry per rule instead of going through every
/// firing alert (Alertmanager keeps a cache of source alerts per rule for
/// the same reason). Only alerts matching a rule's source matchers are
/// held, so the index is as large as the firing sources, not the alerts.
///
/// The projection keeps it in step as it folds entries in
/// ([`crate::core::Projection::apply`]); it holds the sources of every open
/// incident, in memory or not.
#[derive(Clone, Default)]
pub struct Sources {
    inhibitor: Option<Arc<Inhibitor>>,
    /// Per rule (config order): `equal` label values -> the firing sources
    /// with those values.
    by_rule: Vec<HashMap<Vec<String>, RuleSources>>,
}

/// Firing sources of one rule with the same `equal` values, in fingerprint
/// order (and incident, in case two open incidents hold the same alert):
/// whether each also matches the rule's target matchers (the two-sided
/// case).
type RuleSources = BTreeMap<(Fingerprint, Uuid), bool>;

impl Sources {
    pub fn new(inhibitor: Arc<Inhibitor>) -> Sources {
        Sources {
            by_rule: vec![HashMap::new(); inhibitor.rules.len()],
            inhibitor: Some(inhibitor),
        }
    }

    /// Whether rules were given (a projection built without them, as in
    /// the unit tests of the core, keeps no index).
    pub fn is_set(&self) -> bool {
        self.inhibitor.is_some()
    }

    /// `alert` of open incident `incident` is firing.
    pub fn add(&mut self, incident: Uuid, fingerprint: &Fingerprint, labels: &Labels) {
        let Some(inhibitor) = &self.inhibitor else {
            return;
        };
        for (rule, index) in inhibitor.rules.iter().zip(self.by_rule.iter_mut()) {
            if rule.source.matches(labels) {
                index
                    .entry(rule.equal_values(labels))
                    .or_default()
                    .insert((fingerprint.clone(), incident), rule.target.matches(labels));
            }
        }
    }

    /// `alert` of `incident` no longer inhibits (resolved, or its incident is).
    pub fn remove(&mut self, incident: Uuid, fingerprint: &Fingerprint, labels: &Labels) {
        let Some(inhibitor) = &self.inhibitor else {
            return;
        };
        for (rule, index) in inhibitor.rules.iter().zip(self.by_rule.iter_mut()) {
            if !rule.source.matches(labels) {
                continue;
            }
            let values = rule.equal_values(labels);
            if let Some(sources) = index.get_mut(&values) {
                sources.remove(&(fingerprint.clone(), incident));
                if sources.is_empty() {
                    index.remove(&values);
                }
            }
        }
    }

    /// The reason `target` is inhibited, as [`Inhibitor::inhibited_by`]
    /// gives it for every firing alert of an open incident in fingerprint
    /// order; None if no rules were given.
    pub fn inhibited_by(&self, target: &Labels) -> Option<String> {
        let inhibitor = self.inhibitor.as_ref()?;
        for (rule, index) in inhibitor.rules.iter().zip(&self.by_rule) {
            if !rule.target.matches(target) {
                continue;
            }
            let exclude_two_sided = rule.source.matches(target);
            let found = index
                .get(&rule.equal_values(target))
                .into_iter()
                .flatten()
                .find(|(_, also_target)| !(exclude_two_sided && **also_target));
            if let Some(((fingerprint, _), _)) = found {
                let i = Inhibition {
                    rule_name: rule.name.as_deref(),
                    rule_index: rule.index,
                    source: fingerprint,
                };
                return Some(i.to_string());
            }
        }
        None
    }
}

impl Rule {
    /// The values of the `equal` labels (a missing label is "").
    fn equal_values(&self, labels: &Labels) -> Vec<String> {
        self.equal
            .iter()
            .map(|n| labels.get(n).cloned().unwrap_or_default())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rules from JSON (the same data model as the YAML config).
    fn inhibitor(json: &str) -> Inhibitor {
        let cfg: Vec<InhibitRuleConfig> = serde_json::from_str(json).unwrap();
        Inhibitor::new(&cfg).unwrap()
    }

    const CLASSIC: &str = r#"[{
        "name": "node down",
        "source_matchers": ["alertname=\"NodeDown\""],
        "target_matchers": ["severity=\"warning\""],
        "equal": ["instance"]
    }]"#;

    /// Inhibits `target` given the `firing` alerts? `expected` is the rule
    /// label (`"name"` or `#i`) and the index in `firing` of the source.
    fn check(
        ih: &Inhibitor,
        target: &[(&str, &str)],
        firing: &[&[(&str, &str)]],
        expected: Option<(&str, usize)>,
    ) {
        let firing: Vec<(Fingerprint, Labels)> = firing
            .iter()
            .map(|pairs| {
                let l = Labels::from_strs(pairs);
                (Fingerprint::from_labels(&l), l)
            })
            .collect();
        let got = ih.inhibited_by(
            &Labels::from_strs(target),
            firing.iter().map(|(f, l)| (f, l)),
        );
        let expected = expected
            .map(|(rule, i)| format!("inhibited by rule {rule} (source alert {})", firing[i].0));
        assert_eq!(got, expected, "target {target:?}, firing {firing:?}");
    }

    #[test]
    fn classic_rule() {
        let ih = inhibitor(CLASSIC);
        let rule = r#""node down""#;
        let down_a = &[("alertname", "NodeDown"), ("instance", "a")][..];
        let down_b = &[("alertname", "NodeDown"), ("instance", "b")][..];
        let down = &[("alertname", "NodeDown")][..];
        let warn_a = &[
            ("alertname", "HighLoad"),
            ("severity", "warning"),
            ("instance", "a"),
        ][..];
        let warn = &[("alertname", "HighLoad"), ("severity", "warning")][..];
        let crit_a = &[
            ("alertname", "HighLoad"),
            ("severity", "critical"),
            ("instance", "a"),
        ][..];

        check(&ih, warn_a, &[down_a], Some((rule, 0)));
        check(&ih, warn_a, &[down_b, down_a], Some((rule, 1)));
        check(&ih, warn_a, &[warn_a, down_a], Some((rule, 1)));
        // Other instance.
        check(&ih, warn_a, &[down_b], None);
        // `equal` label missing on both sides: both "" and equal.
        check(&ih, warn, &[down], Some((rule, 0)));
        // Missing on one side only: "" != "a".
        check(&ih, warn, &[down_a], None);
        check(&ih, warn_a, &[down], None);
        // A resolved source is not in the firing list: nothing inhibits.
        check(&ih, warn_a, &[], None);
        check(&ih, warn_a, &[warn_a], None);
        // Not a target.
        check(&ih, crit_a, &[down_a], None);
        // A source is not a target here, so it is never inhibited.
        check(&ih, down_a, &[down_a], None);
    }

    #[test]
    fn two_sided_matches_do_not_inhibit_each_other() {
        let ih = inhibitor(CLASSIC);
        let rule = r#""node down""#;
        // Matches both sides of the rule.
        let both = &[
            ("alertname", "NodeDown"),
            ("severity", "warning"),
            ("instance", "a"),
        ][..];
        let both2 = &[
            ("alertname", "NodeDown"),
            ("severity", "warning"),
            ("instance", "a"),
            ("job", "other"),
        ][..];
        let source_only = &[
            ("alertname", "NodeDown"),
            ("severity", "critical"),
            ("instance", "a"),
        ][..];
        let target_only = &[
            ("alertname", "HighLoad"),
            ("severity", "warning"),
            ("instance", "a"),
        ][..];

        // Not by itself, nor by another two-sided alert...
        check(&ih, both, &[both], None);
        check(&ih, both, &[both, both2], None);
        check(&ih, both2, &[both, both2], None);
        // ...but by a source that is not also a target.
        check(&ih, both, &[both, source_only], Some((rule, 1)));
        // A target that is not a source is inhibited by a two-sided alert.
        check(&ih, target_only, &[both], Some((rule, 0)));
    }

    #[test]
    fn rules_in_order_and_unnamed_rules() {
        let ih = inhibitor(
            r#"[
            {"source_matchers": ["alertname=\"ClusterDown\""],
             "target_matchers": ["alertname!=\"ClusterDown\""],
             "equal": ["cluster"]},
            {"name": "node down",
             "source_matchers": ["alertname=\"NodeDown\""],
             "target_matchers": ["severity=~\"warning|info\""],
             "equal": ["cluster", "instance"]}
        ]"#,
        );
        assert_eq!(ih.len(), 2);
        let cluster_down = &[("alertname", "ClusterDown"), ("cluster", "eu")][..];
        let node_down = &[
            ("alertname", "NodeDown"),
            ("cluster", "eu"),
            ("instance", "a"),
        ][..];
        let info = &[
            ("alertname", "Disk"),
            ("severity", "info"),
            ("cluster", "eu"),
            ("instance", "a"),
        ][..];
        let info_us = &[
            ("alertname", "Disk"),
            ("severity", "info"),
            ("cluster", "us"),
            ("instance", "a"),
        ][..];

        check(&ih, info, &[node_down, cluster_down], Some(("#0", 1)));
        check(&ih, info, &[node_down], Some((r#""node down""#, 0)));
        check(&ih, node_down, &[node_down, cluster_down], Some(("#0", 1)));
        check(&ih, info_us, &[node_down, cluster_down], None);
        check(&ih, cluster_down, &[cluster_down], None);
        // No rules: nothing is inhibited.
        check(&Inhibitor::new(&[]).unwrap(), info, &[node_down], None);
    }

    #[test]
    fn reason_text() {
        let ih = inhibitor(CLASSIC);
        let source = Labels::from_strs(&[("alertname", "NodeDown"), ("instance", "a")]);
        let fp = Fingerprint::from_labels(&source);
        let target = Labels::from_strs(&[("severity", "warning"), ("instance", "a")]);
        assert_eq!(
            ih.inhibited_by(&target, [(&fp, &source)]).unwrap(),
            format!(r#"inhibited by rule "node down" (source alert {fp})"#)
        );
        let i = ih.inhibition(&target, [(&fp, &source)]).unwrap();
        assert_eq!(
            (i.rule_name, i.rule_index, i.source),
            (Some("node down"), 0, &fp)
        );
    }

    /// Config JSON -> error substring, from parsing or from `Inhibitor::new`.
    fn check_invalid(json: &str, expected: &str) {
        let err = match serde_json::from_str::<Vec<InhibitRuleConfig>>(json) {
            Err(e) => e.to_string(),
            Ok(cfg) => Inhibitor::new(&cfg).unwrap_err(),
        };
        assert!(err.contains(expected), "{json}: {err:?} lacks {expected:?}");
    }

    #[test]
    fn invalid_rules() {
        check_invalid(
            r#"[{"source_matchers": [], "target_matchers": ["a=b"]}]"#,
            "inhibit rule #0: source_matchers must not be empty",
        );
        check_invalid(
            r#"[{"source_matchers": ["a=b"], "target_matchers": ["a=c"]},
                {"name": "x", "source_matchers": ["a=b"], "target_matchers": []}]"#,
            r#"inhibit rule #1 ("x"): target_matchers must not be empty"#,
        );
        check_invalid(
            r#"[{"source_matchers": ["a=b"], "target_matchers": ["c=d"], "equal": [""]}]"#,
            "equal contains an empty label name",
        );
        check_invalid(
            r#"[{"source_matchers": ["a=~\"(\""], "target_matchers": ["c=d"]}]"#,
            r#"invalid matcher "a=~\"(\"": regex parse error"#,
        );
        check_invalid(
            r#"[{"target_matchers": ["c=d"]}]"#,
            "missing field `source_matchers`",
        );
        check_invalid(
            r#"[{"source_match": {"a": "b"}, "source_matchers": ["a=b"], "target_matchers": ["c=d"]}]"#,
            "unknown field `source_match`",
        );
    }
}
