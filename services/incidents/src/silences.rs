//! Silences and recurring maintenance windows, compiled for matching.
//!
//! A silence is active from `starts_at` (inclusive) to `ends_at`
//! (exclusive), as in Alertmanager, and, when it has a [`Recurrence`], only
//! inside that weekly window. It mutes the alerts all of its matchers match.

use std::collections::BTreeMap;

use jiff::Timestamp;
use tocsin_proto::{
    silence::{Recurrence, Silence},
    Labels,
};
use tocsin_rules::{time::timezone, window::WeeklyWindow};

use crate::matchers::MatcherSet;

/// A [`Recurrence`] ready to evaluate: a [`WeeklyWindow`] in the
/// recurrence's time zone, so maintenance windows follow the same DST rule
/// as on-call schedules (a skipped local time moves forward by the gap, a
/// repeated one is its first occurrence). In Europe/Berlin a daily
/// 01:00–04:00 window lasts 2 real hours on 2025-03-30 and 4 on 2025-10-26.
#[derive(Clone, Debug)]
pub struct CompiledRecurrence(WeeklyWindow);

impl CompiledRecurrence {
    pub fn new(r: &Recurrence) -> Result<Self, String> {
        let tz = timezone(&r.timezone).map_err(|e| format!("recurrence timezone {e}"))?;
        WeeklyWindow::new(&r.weekdays, &r.start, &r.end, tz)
            .map(CompiledRecurrence)
            .map_err(|e| format!("recurrence {e}"))
    }

    /// Whether `at` is inside the window.
    pub fn contains(&self, at: Timestamp) -> bool {
        self.0.contains(at)
    }
}

/// A validated silence with its matchers and recurrence compiled.
#[derive(Clone, Debug)]
struct Entry {
    silence: Silence,
    matchers: MatcherSet,
    recurrence: Option<CompiledRecurrence>,
}

impl Entry {
    fn compile(s: Silence) -> Result<Self, String> {
        let invalid = |problem: String| format!("invalid silence {:?}: {problem}", s.id);
        if s.id.is_empty() {
            return Err(invalid("empty id".to_string()));
        }
        if s.matchers.is_empty() {
            return Err(invalid("at least one matcher is required".to_string()));
        }
        let matchers = MatcherSet::new(&s.matchers).map_err(invalid)?;
        // Alertmanager's rule: a silence whose matchers all match the empty
        // string would match (nearly) every alert, which is never meant.
        if matchers.iter().all(|m| m.matches_value("")) {
            return Err(invalid(
                "at least one matcher must not match the empty string (it would silence every alert)"
                    .to_string(),
            ));
        }
        if s.ends_at <= s.starts_at {
            return Err(invalid(format!(
                "ends_at {} must be after starts_at {}",
                s.ends_at, s.starts_at
            )));
        }
        let recurrence = s
            .recurrence
            .as_ref()
            .map(CompiledRecurrence::new)
            .transpose()
            .map_err(invalid)?;
        Ok(Entry {
            silence: s,
            matchers,
            recurrence,
        })
    }

    /// `starts_at <= at < ends_at`, and inside the recurring window if any.
    fn active_at(&self, at: Timestamp) -> bool {
        self.silence.starts_at <= at
            && at < self.silence.ends_at
            && self.recurrence.as_ref().is_none_or(|r| r.contains(at))
    }
}

/// Checks a silence as [`SilenceIndex::insert`] would, without inserting it.
pub fn validate_silence(s: &Silence) -> Result<(), String> {
    Entry::compile(s.clone()).map(drop)
}

/// The known silences by id, compiled. Iteration is in id order, so "the
/// first silence that matches" is deterministic.
#[derive(Clone, Debug, Default)]
pub struct SilenceIndex {
    silences: BTreeMap<String, Entry>,
}

impl SilenceIndex {
    pub fn new() -> Self {
        Self::default()
    }

    /// Validates and adds `s`, replacing a silence with the same id. An
    /// invalid silence leaves the index unchanged.
    ///
    /// Rejected: an empty id, no matchers, an invalid matcher, matchers that
    /// all match the empty string (Alertmanager's rule), `ends_at <=
    /// starts_at`, an invalid recurrence.
    pub fn insert(&mut self, s: Silence) -> Result<(), String> {
        let entry = Entry::compile(s)?;
        self.silences.insert(entry.silence.id.clone(), entry);
        Ok(())
    }

    /// Removes a silence; false if there was none with this id.
    pub fn remove(&mut self, id: &str) -> bool {
        self.silences.remove(id).is_some()
    }

    pub fn get(&self, id: &str) -> Option<&Silence> {
        self.silences.get(id).map(|e| &e.silence)
    }

    /// All silences, active or not, in id order.
    pub fn list(&self) -> impl Iterator<Item = &Silence> + '_ {
        self.silences.values().map(|e| &e.silence)
    }

    pub fn len(&self) -> usize {
        self.silences.len()
    }

    pub fn is_empty(&self) -> bool {
        self.silences.is_empty()
    }

    /// The first silence (in id order) active at `at` that mutes `labels`.
    pub fn silenced_by(&self, labels: &Labels, at: Timestamp) -> Option<&str> {
        self.silencing(labels, at).next()
    }

    /// Every silence active at `at` that mutes `labels`, in id order
    /// (Alertmanager reports all of them as `silencedBy`).
    pub fn silencing<'s, 'l>(
        &'s self,
        labels: &'l Labels,
        at: Timestamp,
    ) -> impl Iterator<Item = &'s str> + use<'s, 'l> {
        self.silences
            .values()
            .filter(move |e| e.active_at(at) && e.matchers.matches(labels))
            .map(|e| e.silence.id.as_str())
    }

    /// Whether silence `id` exists and is active at `at` (time range and
    /// recurrence).
    pub fn is_active(&self, id: &str, at: Timestamp) -> bool {
        self.silences.get(id).is_some_and(|e| e.active_at(at))
    }

    /// Ids of the silences that have ended by `at` (`ends_at <= at`), for
    /// garbage collection.
    pub fn expired_before(&self, at: Timestamp) -> Vec<String> {
        self.silences
            .values()
            .filter(|e| e.silence.ends_at <= at)
            .map(|e| e.silence.id.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use tocsin_proto::silence::{MatchOp, Matcher};

    use super::*;
    use crate::matchers::parse_matcher;
    use crate::test_util::ts;

    fn recurrence(weekdays: &[&str], start: &str, end: &str, tz: &str) -> CompiledRecurrence {
        CompiledRecurrence::new(&Recurrence {
            weekdays: weekdays.iter().map(|s| s.to_string()).collect(),
            start: start.into(),
            end: end.into(),
            timezone: tz.into(),
        })
        .unwrap()
    }

    /// Whether `r` contains each UTC instant; the comment on each case gives
    /// the local wall-clock time it maps to.
    fn check(r: &CompiledRecurrence, at: &str, expected: bool) {
        assert_eq!(r.contains(ts(at)), expected, "{at} in {r:?}");
    }

    #[test]
    fn daily_window_across_berlin_dst() {
        let r = recurrence(&[], "02:00", "04:00", "Europe/Berlin");
        // An ordinary day (CET, UTC+1): 02:00–04:00 local = 01:00Z–03:00Z.
        check(&r, "2025-03-29T00:59:59Z", false); // 01:59:59 CET
        check(&r, "2025-03-29T01:00:00Z", true); // 02:00 CET
        check(&r, "2025-03-29T02:59:59Z", true); // 03:59:59 CET
        check(&r, "2025-03-29T03:00:00Z", false); // 04:00 CET

        // Spring forward, 2025-03-30: at 02:00 CET (01:00Z) clocks jump to
        // 03:00 CEST (UTC+2), so 02:00–02:59 never shows on the wall. The
        // window is 03:00–04:00 CEST = 01:00Z–02:00Z: one real hour.
        check(&r, "2025-03-30T00:59:59Z", false); // 01:59:59 CET
        check(&r, "2025-03-30T01:00:00Z", true); // 03:00 CEST
        check(&r, "2025-03-30T01:59:59Z", true); // 03:59:59 CEST
        check(&r, "2025-03-30T02:00:00Z", false); // 04:00 CEST
        check(&r, "2025-03-30T02:30:00Z", false); // 04:30 CEST

        // Fall back, 2025-10-26: at 03:00 CEST (01:00Z) clocks go back to
        // 02:00 CET, so 02:00–02:59 shows twice. The window runs from 02:00
        // CEST (00:00Z) to 04:00 CET (03:00Z): three real hours.
        check(&r, "2025-10-25T23:59:59Z", false); // 01:59:59 CEST
        check(&r, "2025-10-26T00:00:00Z", true); // 02:00 CEST
        check(&r, "2025-10-26T00:59:59Z", true); // 02:59:59 CEST
        check(&r, "2025-10-26T01:00:00Z", true); // 02:00 CET (second time)
        check(&r, "2025-10-26T02:00:00Z", true); // 03:00 CET
        check(&r, "2025-10-26T02:59:59Z", true); // 03:59:59 CET
        check(&r, "2025-10-26T03:00:00Z", false); // 04:00 CET

        // A later ordinary day (CET again): 01:00Z–03:00Z.
        check(&r, "2025-10-27T00:59:59Z", false); // 01:59:59 CET
        check(&r, "2025-10-27T01:00:00Z", true); // 02:00 CET
        check(&r, "2025-10-27T03:00:00Z", false); // 04:00 CET
    }

    #[test]
    fn window_inside_the_skipped_hour_moves_past_the_jump() {
        // 02:15–02:45 does not exist in Berlin on 2025-03-30: it happens at
        // 03:15–03:45 CEST, moved forward by the gap.
        let r = recurrence(&[], "02:15", "02:45", "Europe/Berlin");
        check(&r, "2025-03-30T00:30:00Z", false); // 01:30 CET
        check(&r, "2025-03-30T01:00:00Z", false); // 03:00 CEST
        check(&r, "2025-03-30T01:30:00Z", true); // 03:30 CEST
        check(&r, "2025-03-30T01:45:00Z", false); // 03:45 CEST
                                                  // On 2025-10-26 02:15–02:45 happens twice on the wall; the window is
                                                  // the first one only.
        check(&r, "2025-10-26T00:30:00Z", true); // 02:30 CEST
        check(&r, "2025-10-26T01:00:00Z", false); // 02:00 CET
        check(&r, "2025-10-26T01:30:00Z", false); // 02:30 CET
    }

    #[test]
    fn sunday_window_across_berlin_dst() {
        // 2025-03-30 and 2025-10-26 are both Sundays.
        let r = recurrence(&["sun"], "01:00", "05:00", "Europe/Berlin");
        // Spring forward: 01:00 CET = 00:00Z; 05:00 CEST = 03:00Z. Three
        // real hours for a four-hour wall-clock window.
        check(&r, "2025-03-29T23:59:59Z", false); // Sun 00:59:59 CET
        check(&r, "2025-03-30T00:00:00Z", true); // Sun 01:00 CET
        check(&r, "2025-03-30T00:59:59Z", true); // Sun 01:59:59 CET
        check(&r, "2025-03-30T01:00:00Z", true); // Sun 03:00 CEST
        check(&r, "2025-03-30T02:59:59Z", true); // Sun 04:59:59 CEST
        check(&r, "2025-03-30T03:00:00Z", false); // Sun 05:00 CEST
                                                  // Fall back: 01:00 CEST = Sat 23:00Z; 05:00 CET = 04:00Z. Five real
                                                  // hours, and it starts on Saturday in UTC.
        check(&r, "2025-10-25T22:59:59Z", false); // Sun 00:59:59 CEST
        check(&r, "2025-10-25T23:00:00Z", true); // Sun 01:00 CEST
        check(&r, "2025-10-26T01:30:00Z", true); // Sun 02:30 CET
        check(&r, "2025-10-26T03:59:59Z", true); // Sun 04:59:59 CET
        check(&r, "2025-10-26T04:00:00Z", false); // Sun 05:00 CET
                                                  // The same wall-clock hours on Saturday and Monday are not Sunday.
        check(&r, "2025-03-29T01:00:00Z", false); // Sat 02:00 CET
        check(&r, "2025-10-25T00:00:00Z", false); // Sat 02:00 CEST
        check(&r, "2025-10-27T01:00:00Z", false); // Mon 02:00 CET
                                                  // The next Sunday, an ordinary CET day: 00:00Z–04:00Z.
        check(&r, "2025-11-02T00:00:00Z", true); // Sun 01:00 CET
        check(&r, "2025-11-02T03:59:59Z", true); // Sun 04:59:59 CET
        check(&r, "2025-11-02T04:00:00Z", false); // Sun 05:00 CET
    }

    #[test]
    fn new_york_dst() {
        let r = recurrence(&[], "01:00", "03:00", "America/New_York");
        // Spring forward, Sun 2025-03-09: 02:00 EST (07:00Z) jumps to 03:00
        // EDT. 01:00 EST = 06:00Z; the window ends at 07:00Z. One real hour.
        check(&r, "2025-03-09T05:59:59Z", false); // 00:59:59 EST
        check(&r, "2025-03-09T06:00:00Z", true); // 01:00 EST
        check(&r, "2025-03-09T06:59:59Z", true); // 01:59:59 EST
        check(&r, "2025-03-09T07:00:00Z", false); // 03:00 EDT
                                                  // Fall back, Sun 2025-11-02: 02:00 EDT (06:00Z) falls back to 01:00
                                                  // EST. 01:00 EDT = 05:00Z; 03:00 EST = 08:00Z. Three real hours.
        check(&r, "2025-11-02T04:59:59Z", false); // 00:59:59 EDT
        check(&r, "2025-11-02T05:00:00Z", true); // 01:00 EDT
        check(&r, "2025-11-02T06:30:00Z", true); // 01:30 EST (second time)
        check(&r, "2025-11-02T07:59:59Z", true); // 02:59:59 EST
        check(&r, "2025-11-02T08:00:00Z", false); // 03:00 EST
    }

    #[test]
    fn local_weekday_not_utc_weekday() {
        // Monday all day in New York.
        let r = recurrence(&["Monday"], "00:00", "24:00", "America/New_York");
        check(&r, "2025-06-02T03:59:59Z", false); // Sun 23:59:59 EDT
        check(&r, "2025-06-02T04:00:00Z", true); // Mon 00:00 EDT
        check(&r, "2025-06-03T02:00:00Z", true); // Mon 22:00 EDT (Tue in UTC)
        check(&r, "2025-06-03T03:59:59Z", true); // Mon 23:59:59 EDT
        check(&r, "2025-06-03T04:00:00Z", false); // Tue 00:00 EDT
    }

    #[test]
    fn window_crossing_midnight() {
        // 2025-06-06 is a Friday; UTC keeps the arithmetic obvious.
        let r = recurrence(&["fri"], "22:00", "06:00", "UTC");
        check(&r, "2025-06-06T21:59:59Z", false); // Fri
        check(&r, "2025-06-06T22:00:00Z", true); // Fri
        check(&r, "2025-06-06T23:59:59Z", true); // Fri
        check(&r, "2025-06-07T00:00:00Z", true); // Sat, started Friday
        check(&r, "2025-06-07T05:59:00Z", true); // Sat
        check(&r, "2025-06-07T05:59:59Z", true); // Sat
        check(&r, "2025-06-07T06:00:00Z", false); // Sat
        check(&r, "2025-06-07T22:00:00Z", false); // Sat: not listed
        check(&r, "2025-06-08T01:00:00Z", false); // Sun: Saturday not listed
        check(&r, "2025-06-06T05:00:00Z", false); // Fri: Thursday not listed
        check(&r, "2025-06-05T23:00:00Z", false); // Thu

        // The same in Berlin (CEST, UTC+2): Sat 05:59 local = 03:59Z.
        let r = recurrence(&["FRI"], "22:00", "06:00", "Europe/Berlin");
        check(&r, "2025-06-06T20:00:00Z", true); // Fri 22:00
        check(&r, "2025-06-07T03:59:00Z", true); // Sat 05:59
        check(&r, "2025-06-07T04:00:00Z", false); // Sat 06:00

        // start == end: 24 hours from the start on each listed day.
        let r = recurrence(&["mon"], "08:00", "08:00", "UTC");
        check(&r, "2025-06-02T07:59:59Z", false); // Mon
        check(&r, "2025-06-02T08:00:00Z", true); // Mon
        check(&r, "2025-06-03T07:59:59Z", true); // Tue
        check(&r, "2025-06-03T08:00:00Z", false); // Tue
    }

    #[test]
    fn weekday_filtering() {
        // Weekdays 09:00–17:00 UTC; 2025-06-02 is a Monday.
        let r = recurrence(
            &["mon", "Tue", "WED", "thursday", "Fri"],
            "09:00",
            "17:00",
            "UTC",
        );
        for (day, listed) in [
            ("02", true),  // Mon
            ("03", true),  // Tue
            ("04", true),  // Wed
            ("05", true),  // Thu
            ("06", true),  // Fri
            ("07", false), // Sat
            ("08", false), // Sun
        ] {
            check(&r, &format!("2025-06-{day}T08:59:59Z"), false);
            check(&r, &format!("2025-06-{day}T09:00:00Z"), listed);
            check(&r, &format!("2025-06-{day}T16:59:59Z"), listed);
            check(&r, &format!("2025-06-{day}T17:00:00Z"), false);
        }
        // Empty weekdays: every day.
        let r = recurrence(&[], "09:00", "17:00", "UTC");
        check(&r, "2025-06-07T12:00:00Z", true); // Sat
        check(&r, "2025-06-08T12:00:00Z", true); // Sun
                                                 // 24:00 ends at midnight; 00:00 starts at it.
        let r = recurrence(&["sat"], "20:00", "24:00", "UTC");
        check(&r, "2025-06-07T23:59:59Z", true); // Sat
        check(&r, "2025-06-08T00:00:00Z", false); // Sun
    }

    /// `(weekdays, start, end, timezone)` -> error substring.
    fn check_invalid(r: (&[&str], &str, &str, &str), expected: &str) {
        let rec = Recurrence {
            weekdays: r.0.iter().map(|s| s.to_string()).collect(),
            start: r.1.into(),
            end: r.2.into(),
            timezone: r.3.into(),
        };
        let err = CompiledRecurrence::new(&rec).unwrap_err();
        assert!(
            err.contains(expected),
            "{rec:?}: {err:?} lacks {expected:?}"
        );
    }

    #[test]
    fn invalid_recurrence() {
        let tz = "UTC";
        check_invalid(
            (&[], "01:00", "02:00", "Mars/Olympus_Mons"),
            r#"timezone "Mars/Olympus_Mons" is not a known IANA time zone"#,
        );
        check_invalid((&[], "01:00", "02:00", ""), r#"timezone """#);
        check_invalid((&["funday"], "01:00", "02:00", tz), r#"weekday "funday""#);
        check_invalid((&["mo"], "01:00", "02:00", tz), r#"weekday "mo""#);
        check_invalid((&[], "24:00", "02:00", tz), r#"start "24:00""#);
        check_invalid((&[], "1:00", "02:00", tz), r#"start "1:00""#);
        check_invalid((&[], "01:60", "02:00", tz), r#"start "01:60""#);
        check_invalid((&[], "01:00:00", "02:00", tz), r#"start "01:00:00""#);
        check_invalid((&[], "", "02:00", tz), r#"start """#);
        check_invalid((&[], "01:00", "24:01", tz), r#"end "24:01""#);
        check_invalid((&[], "01:00", "25:00", tz), r#"end "25:00""#);
        check_invalid((&[], "01:00", "２:00", tz), r#"end "２:00""#);
    }

    fn silence(id: &str, matchers: &[&str], starts: &str, ends: &str) -> Silence {
        Silence {
            id: id.into(),
            matchers: matchers.iter().map(|s| parse_matcher(s).unwrap()).collect(),
            starts_at: ts(starts),
            ends_at: ts(ends),
            created_by: "test".into(),
            comment: String::new(),
            recurrence: None,
        }
    }

    /// Which silence (if any) mutes `pairs` at `at`.
    fn check_silenced(
        idx: &SilenceIndex,
        pairs: &[(&str, &str)],
        at: &str,
        expected: Option<&str>,
    ) {
        assert_eq!(
            idx.silenced_by(&Labels::from_strs(pairs), ts(at)),
            expected,
            "{pairs:?} at {at}"
        );
    }

    #[test]
    fn active_range_is_start_inclusive_end_exclusive() {
        let mut idx = SilenceIndex::new();
        idx.insert(silence(
            "s1",
            &[r#"alertname="NodeDown""#],
            "2025-06-01T10:00:00Z",
            "2025-06-01T12:00:00Z",
        ))
        .unwrap();
        let node_down = &[("alertname", "NodeDown"), ("instance", "a")][..];
        check_silenced(&idx, node_down, "2025-06-01T09:59:59.999999999Z", None);
        check_silenced(&idx, node_down, "2025-06-01T10:00:00Z", Some("s1"));
        check_silenced(
            &idx,
            node_down,
            "2025-06-01T11:59:59.999999999Z",
            Some("s1"),
        );
        check_silenced(&idx, node_down, "2025-06-01T12:00:00Z", None);
        check_silenced(
            &idx,
            &[("alertname", "Other")],
            "2025-06-01T11:00:00Z",
            None,
        );
        check_silenced(&idx, &[], "2025-06-01T11:00:00Z", None);

        assert!(!idx.is_active("s1", ts("2025-06-01T09:59:59Z")));
        assert!(idx.is_active("s1", ts("2025-06-01T10:00:00Z")));
        assert!(!idx.is_active("s1", ts("2025-06-01T12:00:00Z")));
        assert!(!idx.is_active("nope", ts("2025-06-01T11:00:00Z")));

        assert!(idx.expired_before(ts("2025-06-01T11:59:59Z")).is_empty());
        assert_eq!(idx.expired_before(ts("2025-06-01T12:00:00Z")), ["s1"]);
    }

    #[test]
    fn recurrence_inside_range() {
        let mut s = silence(
            "nightly",
            &[r#"job="backup""#],
            "2025-06-02T00:00:00Z",
            "2025-06-09T00:00:00Z",
        );
        s.recurrence = Some(Recurrence {
            weekdays: vec![],
            start: "02:00".into(),
            end: "04:00".into(),
            timezone: "Europe/Berlin".into(),
        });
        let mut idx = SilenceIndex::new();
        idx.insert(s).unwrap();
        let backup = &[("job", "backup")][..];
        // CEST (UTC+2): the window is 00:00Z–02:00Z each day.
        check_silenced(&idx, backup, "2025-06-01T00:30:00Z", None); // window, before range
        check_silenced(&idx, backup, "2025-06-02T00:00:00Z", Some("nightly")); // 02:00 local
        check_silenced(&idx, backup, "2025-06-02T02:00:00Z", None); // 04:00 local
        check_silenced(&idx, backup, "2025-06-05T12:00:00Z", None); // in range, out of window
        check_silenced(&idx, backup, "2025-06-08T01:59:59Z", Some("nightly"));
        check_silenced(&idx, backup, "2025-06-09T00:30:00Z", None); // window, after range
        assert!(!idx.is_active("nightly", ts("2025-06-05T12:00:00Z")));
        assert!(idx.is_active("nightly", ts("2025-06-05T01:00:00Z")));
    }

    #[test]
    fn first_match_by_id_and_remove() {
        let (from, to) = ("2025-06-01T00:00:00Z", "2025-06-02T00:00:00Z");
        let mut idx = SilenceIndex::new();
        // Inserted out of order; ids decide.
        idx.insert(silence("c", &[r#"severity="warning""#], from, to))
            .unwrap();
        idx.insert(silence("b", &[r#"alertname=~"Node.*""#], from, to))
            .unwrap();
        idx.insert(silence("a", &[r#"alertname="Disk""#], from, to))
            .unwrap();
        assert_eq!(
            idx.list().map(|s| s.id.as_str()).collect::<Vec<_>>(),
            ["a", "b", "c"]
        );
        assert_eq!(idx.len(), 3);

        let at = "2025-06-01T12:00:00Z";
        let warn_node = &[("alertname", "NodeDown"), ("severity", "warning")][..];
        check_silenced(&idx, warn_node, at, Some("b"));
        assert_eq!(
            idx.silencing(&Labels::from_strs(warn_node), ts(at))
                .collect::<Vec<_>>(),
            ["b", "c"]
        );
        check_silenced(
            &idx,
            &[("alertname", "Disk"), ("severity", "warning")],
            at,
            Some("a"),
        );

        assert!(idx.remove("b"));
        assert!(!idx.remove("b"));
        assert!(idx.get("b").is_none());
        check_silenced(&idx, warn_node, at, Some("c"));
        assert!(idx.remove("c"));
        check_silenced(&idx, warn_node, at, None);
        assert_eq!(idx.get("a").map(|s| s.id.as_str()), Some("a"));
        assert!(!idx.is_empty());
    }

    #[test]
    fn insert_replaces_same_id() {
        let (from, to) = ("2025-06-01T00:00:00Z", "2025-06-02T00:00:00Z");
        let at = "2025-06-01T12:00:00Z";
        let mut idx = SilenceIndex::new();
        idx.insert(silence("s", &["a=1"], from, to)).unwrap();
        idx.insert(silence("s", &["a=2"], from, to)).unwrap();
        assert_eq!(idx.len(), 1);
        check_silenced(&idx, &[("a", "1")], at, None);
        check_silenced(&idx, &[("a", "2")], at, Some("s"));
        // A rejected replacement keeps the old silence.
        assert!(idx.insert(silence("s", &[], from, to)).is_err());
        check_silenced(&idx, &[("a", "2")], at, Some("s"));
    }

    /// Error substring `expected` for inserting `s`.
    fn check_rejected(s: Silence, expected: &str) {
        let mut idx = SilenceIndex::new();
        let err = idx.insert(s.clone()).unwrap_err();
        assert!(err.contains(expected), "{s:?}: {err:?} lacks {expected:?}");
        assert_eq!(validate_silence(&s), Err(err));
        assert!(idx.is_empty());
    }

    #[test]
    fn invalid_silences() {
        let (from, to) = ("2025-06-01T00:00:00Z", "2025-06-02T00:00:00Z");
        check_rejected(silence("", &["a=1"], from, to), "empty id");
        check_rejected(
            silence("s", &[], from, to),
            r#"invalid silence "s": at least one matcher"#,
        );
        check_rejected(
            silence("s", &[r#"a="""#], from, to),
            "must not match the empty string",
        );
        check_rejected(
            silence("s", &[r#"a=~".*""#, r#"b!="x""#], from, to),
            "must not match the empty string",
        );
        check_rejected(
            silence("s", &["a=1"], to, from),
            "ends_at 2025-06-01T00:00:00Z must be after starts_at 2025-06-02T00:00:00Z",
        );
        check_rejected(silence("s", &["a=1"], from, from), "must be after");

        let mut s = silence("s", &["a=1"], from, to);
        s.matchers.push(Matcher {
            name: "sev".into(),
            op: MatchOp::Re,
            value: "(".into(),
        });
        check_rejected(s, r#"invalid matcher sev=~"(": regex parse error"#);

        let mut s = silence("s", &["a=1"], from, to);
        s.recurrence = Some(Recurrence {
            weekdays: vec![],
            start: "01:00".into(),
            end: "02:00".into(),
            timezone: "Europe/Berlln".into(),
        });
        check_rejected(s, r#"timezone "Europe/Berlln""#);

        // Valid: one matcher that needs a value is enough.
        assert_eq!(
            validate_silence(&silence("s", &[r#"a=~".*""#, "b=1"], from, to)),
            Ok(())
        );
    }
}
