//! Size limits on what the service decides and writes.
//!
//! Every INCIDENTS entry carries an alert and the incident's summary, so an
//! alert with a huge label (ALERTS accepts anything under NATS's 1 MiB
//! `max_payload`) would make an entry JetStream cannot take, and the input
//! would be retried for ever. Two cuts prevent that, both pure functions of
//! their input, so deciding the same input again after a crash yields the
//! same bytes and the same `Nats-Msg-Id`:
//!
//! - [`Limits::bound_alert`], before an alert is decided: over a quarter of
//!   the entry budget, it keeps `max_annotations` annotations and cuts its
//!   longest label and annotation keys and values. The projection then
//!   holds the cut alert, so a repeat of the same alert compares equal and
//!   writes nothing.
//! - [`Limits::fit_entry`], before an entry is published: an entry still
//!   over the budget (a command with long texts, an incident from an older
//!   log) has its longest free texts cut. Identities (ids, dedup key,
//!   fingerprints, causes) and silence matchers are never cut: an entry
//!   that cannot fit without cutting them is [`TooLarge`].
//!
//! A cut text keeps its first bytes (on a character boundary) and ends with
//! a visible marker: `…[truncated 599,872 bytes]`.

use tocsin_proto::{
    codec,
    incident::{AlertInfo, EventKind, LogEntry, SilenceChange},
    Alert, Labels,
};

/// Room counted for the envelope around an entry (schema, source, time,
/// traceparent) on top of the entry itself.
const ENVELOPE_ROOM: usize = 256;

/// The shortest a text is cut to (before its marker).
const MIN_CAP: usize = 32;

/// A text is cut only when longer than the cap by more than this, so a text
/// cut before (cap plus its marker) is not cut again at the same cap.
const MARKER_ROOM: usize = 40;

/// Annotation key noting how many annotations were dropped.
pub const DROPPED_ANNOTATIONS: &str = "tocsin_dropped_annotations";

/// Something that cannot be made small enough.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TooLarge(pub String);

impl std::fmt::Display for TooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The limits in force (from `incidents.max_entry_bytes` and
/// `incidents.max_annotations`).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_entry_bytes: usize,
    pub max_annotations: usize,
}

impl Limits {
    /// The most an alert may take once encoded: a quarter of an entry, which
    /// also holds the summary's labels, the dedup key and the title.
    pub fn max_alert_bytes(&self) -> usize {
        self.max_entry_bytes / 4
    }

    /// Cuts `alert` to [`Self::max_alert_bytes`] if it is larger. Returns
    /// whether it was cut.
    pub fn bound_alert(&self, alert: &mut Alert) -> Result<bool, TooLarge> {
        let budget = self.max_alert_bytes();
        let size = |a: &Alert| codec::encoded_len(a).unwrap_or(usize::MAX);
        let before = size(alert);
        if before <= budget {
            return Ok(false);
        }
        drop_annotations(&mut alert.annotations, self.max_annotations);
        let cut = fit(alert, budget, size, |a, cap| {
            cut_map(&mut a.labels, cap);
            cut_map(&mut a.annotations, cap);
            if let Some(u) = &mut a.generator_url {
                cut_text(u, cap);
            }
        })
        .ok_or_else(|| {
            TooLarge(format!(
                "the alert is {before} bytes and cannot be cut to {budget} \
                 (a quarter of incidents.max_entry_bytes) without cutting its \
                 dedup key or fingerprint, or it has too many labels"
            ))
        })?;
        *alert = cut;
        Ok(true)
    }

    /// Cuts `entry` to `max_entry_bytes` if it is larger. Returns whether
    /// it was cut.
    pub fn fit_entry(&self, entry: &mut LogEntry) -> Result<bool, TooLarge> {
        let budget = self.max_entry_bytes;
        let size = |e: &LogEntry| {
            codec::encode(e)
                .map(|b| b.len() + ENVELOPE_ROOM)
                .unwrap_or(usize::MAX)
        };
        let before = size(entry);
        if before <= budget {
            return Ok(false);
        }
        if let LogEntry::Incident(e) = entry {
            if let EventKind::Opened { alert, more } | EventKind::AlertFiring { alert, more } =
                &mut e.kind
            {
                for a in std::iter::once(alert).chain(more) {
                    drop_annotations(&mut a.annotations, self.max_annotations);
                }
            }
        }
        let cut = fit(entry, budget, size, cut_entry).ok_or_else(|| {
            TooLarge(format!(
                "the {} entry is {before} bytes and cannot be cut to \
                 incidents.max_entry_bytes ({budget}) without cutting its \
                 identities (ids, dedup key, silence matchers)",
                entry_kind(entry)
            ))
        })?;
        *entry = cut;
        Ok(true)
    }
}

fn entry_kind(entry: &LogEntry) -> &'static str {
    match entry {
        LogEntry::Incident(e) => e.kind.name(),
        LogEntry::Silence { .. } => "silence",
    }
}

/// The largest cap (from [`MIN_CAP`] up) at which `shrink` makes `value`
/// fit `budget`, found by bisection: the same value always gets the same
/// cap. None if even [`MIN_CAP`] is not enough.
fn fit<T: Clone>(
    value: &T,
    budget: usize,
    size: impl Fn(&T) -> usize,
    shrink: impl Fn(&mut T, usize),
) -> Option<T> {
    let at = |cap: usize| {
        let mut v = value.clone();
        shrink(&mut v, cap);
        let n = size(&v);
        (v, n)
    };
    let (smallest, n) = at(MIN_CAP);
    if n > budget {
        return None;
    }
    // No text is longer than the whole value.
    let (mut lo, mut hi, mut best) = (MIN_CAP, size(value).max(MIN_CAP), smallest);
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        let (v, n) = at(mid);
        if n <= budget {
            lo = mid;
            best = v;
        } else {
            hi = mid - 1;
        }
    }
    Some(best)
}

/// `…[truncated 599,872 bytes]`.
pub fn marker(cut: usize) -> String {
    let digits = cut.to_string();
    let mut grouped = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            grouped.push(',');
        }
        grouped.push(c);
    }
    format!("…[truncated {grouped} bytes]")
}

/// Cuts `s` to at most `cap` bytes (on a character boundary) plus a marker,
/// if it is longer than `cap` by more than [`MARKER_ROOM`].
pub fn cut_text(s: &mut String, cap: usize) -> bool {
    if s.len() <= cap + MARKER_ROOM {
        return false;
    }
    let mut end = cap;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    let cut = s.len() - end;
    s.truncate(end);
    s.push_str(&marker(cut));
    true
}

/// Cuts the keys and values of `map`. Two keys cut to the same text keep
/// the later one (in key order), the same on every run.
fn cut_map(map: &mut Labels, cap: usize) {
    if !map
        .iter()
        .any(|(k, v)| k.len() > cap + MARKER_ROOM || v.len() > cap + MARKER_ROOM)
    {
        return;
    }
    *map = std::mem::take(map)
        .into_iter()
        .map(|(mut k, mut v)| {
            cut_text(&mut k, cap);
            cut_text(&mut v, cap);
            (k, v)
        })
        .collect();
}

/// Keeps the first `max` annotations (in key order) and notes how many
/// were dropped.
fn drop_annotations(annotations: &mut Labels, max: usize) {
    if annotations.len() <= max {
        return;
    }
    let dropped = annotations.len() - max;
    *annotations = std::mem::take(annotations).into_iter().take(max).collect();
    annotations.insert(
        DROPPED_ANNOTATIONS.into(),
        format!("{dropped} annotations dropped (more than {max})"),
    );
}

fn cut_alert_info(a: &mut AlertInfo, cap: usize) {
    cut_map(&mut a.labels, cap);
    cut_map(&mut a.annotations, cap);
    if let Some(u) = &mut a.generator_url {
        cut_text(u, cap);
    }
    if let Some(s) = &mut a.suppressed {
        cut_text(s, cap);
    }
}

/// Cuts every free text of an entry; identities are left alone.
fn cut_entry(entry: &mut LogEntry, cap: usize) {
    match entry {
        LogEntry::Incident(e) => {
            let s = &mut e.incident;
            cut_text(&mut s.title, cap);
            cut_map(&mut s.labels, cap);
            for t in [&mut s.assignee, &mut s.suppressed].into_iter().flatten() {
                cut_text(t, cap);
            }
            if let Some(a) = &mut s.acknowledged_by {
                cut_text(&mut a.name, cap);
                cut_text(&mut a.via, cap);
            }
            if let Some(a) = &mut e.actor {
                cut_text(&mut a.name, cap);
                cut_text(&mut a.via, cap);
            }
            match &mut e.kind {
                EventKind::Opened { alert, more } | EventKind::AlertFiring { alert, more } => {
                    for a in std::iter::once(alert).chain(more) {
                        cut_alert_info(a, cap)
                    }
                }
                EventKind::Escalated { reason } => {
                    cut_text(reason, cap);
                }
                EventKind::Assigned { user } => {
                    cut_text(user, cap);
                }
                EventKind::NoteAdded { text } => {
                    cut_text(text, cap);
                }
                EventKind::Remediation {
                    runbook,
                    step,
                    status,
                    detail,
                    ..
                } => {
                    for t in [runbook, step, status, detail] {
                        cut_text(t, cap);
                    }
                }
                EventKind::Paged {
                    pages,
                    reason,
                    fired,
                    ..
                } => {
                    for p in pages.iter_mut() {
                        cut_text(p, cap);
                    }
                    cut_text(reason, cap);
                    if let Some(f) = fired {
                        cut_text(&mut f.policy, cap);
                    }
                }
                EventKind::Delivery { delivery } => {
                    cut_text(&mut delivery.target, cap);
                    cut_text(&mut delivery.detail, cap);
                }
                EventKind::AlertResolved { .. }
                | EventKind::Acknowledged
                | EventKind::Unacknowledged
                | EventKind::Snoozed { .. }
                | EventKind::SnoozeEnded
                | EventKind::Resolved { .. }
                | EventKind::Reopened
                // Names checked when the command was accepted (200 bytes at most).
                | EventKind::Runbook { .. } => {}
            }
        }
        LogEntry::Silence { change, actor, .. } => {
            cut_text(&mut actor.name, cap);
            cut_text(&mut actor.via, cap);
            if let SilenceChange::Created { silence } = change {
                cut_text(&mut silence.comment, cap);
                cut_text(&mut silence.created_by, cap);
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use jiff::Timestamp;
    use tocsin_proto::{
        incident::{Actor, Cause, IncidentEvent, IncidentSummary},
        AlertStatus, Fingerprint, Origin,
    };

    use super::*;

    const LIMITS: Limits = Limits {
        max_entry_bytes: 256 * 1024,
        max_annotations: 64,
    };

    /// A firing alert with these labels (also the core's tests').
    pub(crate) fn alert(labels: &[(&str, &str)]) -> Alert {
        let labels: Labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Alert {
            fingerprint: Fingerprint::from_labels(&labels),
            status: AlertStatus::Firing,
            labels,
            annotations: Labels::new(),
            starts_at: Timestamp::UNIX_EPOCH,
            ends_at: None,
            generator_url: None,
            dedup_key: None,
            origin: Origin::default(),
        }
    }

    fn note(text: String) -> LogEntry {
        let at = Timestamp::UNIX_EPOCH;
        LogEntry::Incident(IncidentEvent {
            kind: EventKind::NoteAdded { text },
            at,
            actor: Some(Actor::new("alice", "cli")),
            cause: Cause::Command { id: "c1".into() },
            incident: IncidentSummary::new(uuid::Uuid::nil(), 1, "k", "t", at),
        })
    }

    #[test]
    fn marker_groups_thousands() {
        assert_eq!(marker(599_872), "…[truncated 599,872 bytes]");
        assert_eq!(marker(12), "…[truncated 12 bytes]");
        assert_eq!(marker(1_000_000), "…[truncated 1,000,000 bytes]");
    }

    #[test]
    fn small_alerts_are_left_alone() {
        let mut a = alert(&[("alertname", "X"), ("host", "db1")]);
        let before = a.clone();
        assert_eq!(LIMITS.bound_alert(&mut a), Ok(false));
        assert_eq!(a, before);
    }

    #[test]
    fn a_huge_label_is_cut_with_a_marker_the_same_way_every_time() {
        let blob = "é".repeat(300_000); // 600,000 bytes, 2 per character
        let mut a = alert(&[("alertname", "Poison"), ("blob", &blob)]);
        a.annotations
            .insert("summary".into(), "disk full".to_string());
        let mut again = a.clone();
        assert_eq!(LIMITS.bound_alert(&mut a), Ok(true));
        assert_eq!(LIMITS.bound_alert(&mut again), Ok(true));
        assert_eq!(a, again, "deterministic");
        assert_eq!(
            codec::encode(&a).unwrap(),
            codec::encode(&again).unwrap(),
            "same bytes"
        );
        assert!(codec::encode(&a).unwrap().len() <= LIMITS.max_alert_bytes());
        let v = &a.labels["blob"];
        assert!(v.starts_with("éé"));
        assert!(v.contains("…[truncated ") && v.ends_with(" bytes]"), "{v}");
        assert_eq!(a.labels["alertname"], "Poison", "short values stay");
        assert_eq!(a.annotations["summary"], "disk full");
        // Cutting the cut alert again changes nothing.
        let mut twice = a.clone();
        assert_eq!(LIMITS.bound_alert(&mut twice), Ok(false));
        assert_eq!(twice, a);
    }

    #[test]
    fn too_many_annotations_are_dropped_and_counted() {
        let mut a = alert(&[("alertname", "Chatty")]);
        for i in 0..200 {
            a.annotations
                .insert(format!("note{i:03}"), "y".repeat(1000));
        }
        assert_eq!(LIMITS.bound_alert(&mut a), Ok(true));
        assert_eq!(a.annotations.len(), 65);
        assert_eq!(
            a.annotations[DROPPED_ANNOTATIONS],
            "136 annotations dropped (more than 64)"
        );
        assert!(a.annotations.contains_key("note000"));
        assert!(!a.annotations.contains_key("note199"));
    }

    #[test]
    fn an_alert_whose_identity_is_too_big_is_too_large() {
        let mut a = alert(&[("alertname", "X")]);
        a.dedup_key = Some("k".repeat(100_000));
        let err = LIMITS.bound_alert(&mut a).unwrap_err();
        assert!(err.0.contains("cannot be cut"), "{err}");
    }

    #[test]
    fn a_long_note_entry_is_cut_to_the_budget_deterministically() {
        let small = Limits {
            max_entry_bytes: 16 * 1024,
            max_annotations: 64,
        };
        let mut e = note("n".repeat(50_000));
        let mut again = e.clone();
        assert_eq!(small.fit_entry(&mut e), Ok(true));
        assert_eq!(small.fit_entry(&mut again), Ok(true));
        assert_eq!(codec::encode(&e).unwrap(), codec::encode(&again).unwrap());
        assert!(codec::encode(&e).unwrap().len() + ENVELOPE_ROOM <= 16 * 1024);
        let LogEntry::Incident(ev) = &e else { panic!() };
        let EventKind::NoteAdded { text } = &ev.kind else {
            panic!()
        };
        assert!(
            text.len() > 10_000,
            "cut no more than needed: {}",
            text.len()
        );
        assert!(text.ends_with(" bytes]"));
        // Identities are untouched.
        assert_eq!(e.msg_id(), note(String::new()).msg_id());
        let mut twice = e.clone();
        assert_eq!(small.fit_entry(&mut twice), Ok(false));
    }

    #[test]
    fn an_entry_whose_identities_are_too_big_is_too_large() {
        let small = Limits {
            max_entry_bytes: 16 * 1024,
            max_annotations: 64,
        };
        let mut e = note("short".into());
        if let LogEntry::Incident(ev) = &mut e {
            ev.incident.dedup_key = "k".repeat(20_000);
        }
        let err = small.fit_entry(&mut e).unwrap_err();
        assert!(err.0.contains("note_added entry"), "{err}");
    }
}
