//! Severity from labels.

use std::collections::BTreeMap;

use tocsin_proto::{incident::Severity, Labels};

/// Built-in label value -> severity mappings (case-insensitive): the
/// vocabularies of Prometheus rules, PagerDuty (critical/error/warning/info),
/// P0..P4 and SEV1..SEV5.
pub const DEFAULTS: &[(&str, Severity)] = &[
    ("critical", Severity::Critical),
    ("crit", Severity::Critical),
    ("fatal", Severity::Critical),
    ("emergency", Severity::Critical),
    ("page", Severity::Critical),
    ("p0", Severity::Critical),
    ("sev0", Severity::Critical),
    ("sev1", Severity::Critical),
    ("high", Severity::High),
    ("error", Severity::High),
    ("major", Severity::High),
    ("p1", Severity::High),
    ("sev2", Severity::High),
    ("medium", Severity::Medium),
    ("warning", Severity::Medium),
    ("warn", Severity::Medium),
    ("p2", Severity::Medium),
    ("sev3", Severity::Medium),
    ("low", Severity::Low),
    ("minor", Severity::Low),
    ("p3", Severity::Low),
    ("sev4", Severity::Low),
    ("info", Severity::Info),
    ("informational", Severity::Info),
    ("none", Severity::Info),
    ("p4", Severity::Info),
    ("sev5", Severity::Info),
];

/// Maps labels to a severity.
#[derive(Debug, Clone)]
pub struct SeverityMap {
    labels: Vec<String>,
    map: BTreeMap<String, Severity>,
    default: Severity,
}

impl SeverityMap {
    pub fn new(labels: &[String], extra: &BTreeMap<String, Severity>, default: Severity) -> Self {
        let mut map: BTreeMap<String, Severity> =
            DEFAULTS.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        for (k, v) in extra {
            map.insert(k.to_ascii_lowercase(), *v);
        }
        SeverityMap {
            labels: labels.to_vec(),
            map,
            default,
        }
    }

    pub fn of(&self, labels: &Labels) -> Severity {
        for name in &self.labels {
            if let Some(v) = labels.get(name) {
                let v = v.trim().to_ascii_lowercase();
                let compact: String = v.chars().filter(|c| *c != '-' && *c != ' ').collect();
                if let Some(s) = self.map.get(&v).or_else(|| self.map.get(&compact)) {
                    return *s;
                }
            }
        }
        self.default
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapping() {
        let m = SeverityMap::new(
            &["severity".into(), "priority".into()],
            &[("disaster".to_string(), Severity::Critical)].into(),
            Severity::Medium,
        );
        let check = |pairs: &[(&str, &str)], expected: Severity| {
            let labels: Labels = pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            assert_eq!(m.of(&labels), expected, "{pairs:?}");
        };
        check(&[("severity", "critical")], Severity::Critical);
        check(&[("severity", "CRITICAL")], Severity::Critical);
        check(&[("severity", "P0")], Severity::Critical);
        check(&[("severity", "SEV-2")], Severity::High);
        check(&[("severity", "warning")], Severity::Medium);
        check(&[("severity", "P3")], Severity::Low);
        check(&[("severity", "info")], Severity::Info);
        check(&[("severity", "disaster")], Severity::Critical);
        check(&[("priority", "p1")], Severity::High);
        check(&[("severity", "weird"), ("priority", "p1")], Severity::High);
        check(&[("severity", "weird")], Severity::Medium);
        check(&[], Severity::Medium);
    }
}
