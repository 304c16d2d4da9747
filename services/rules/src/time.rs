//! Times of day, weekdays, local times and time zones.
//!
//! # The DST rule
//! Everything Tocsin schedules on a wall clock (maintenance windows, active
//! hours of an escalation level, on-call handoffs and restrictions) turns a
//! local date and time into an instant with [`resolve`]:
//! - a local time the clocks skip (spring forward) is taken as the same
//!   time after the jump: 02:30 on a night when 02:00 becomes 03:00 is
//!   03:30;
//! - a local time that happens twice (fall back) means its first
//!   occurrence: 02:30 on a night when 03:00 becomes 02:00 is the 02:30
//!   before the change.
//!
//! This is RFC 5545's rule (and Temporal's `compatible`): nothing scheduled
//! is lost or doubled, and a window spanning the change is an hour shorter
//! or longer in real time that night.

use jiff::{
    civil::{Date, Time, Weekday},
    tz::TimeZone,
    Timestamp,
};

/// Seconds in a (wall-clock) day.
pub const SECS_PER_DAY: u32 = 24 * 60 * 60;

/// `mon`..`sun` or `monday`..`sunday`, any case.
pub fn parse_weekday(name: &str) -> Result<Weekday, String> {
    use Weekday::*;
    let day = match name.to_ascii_lowercase().as_str() {
        "mon" | "monday" => Monday,
        "tue" | "tuesday" => Tuesday,
        "wed" | "wednesday" => Wednesday,
        "thu" | "thursday" => Thursday,
        "fri" | "friday" => Friday,
        "sat" | "saturday" => Saturday,
        "sun" | "sunday" => Sunday,
        _ => {
            return Err(format!(
                "weekday {name:?} is not one of mon, tue, wed, thu, fri, sat, sun"
            ))
        }
    };
    Ok(day)
}

/// `HH:MM` (two digits each, as in Alertmanager's time intervals), 00:00 to
/// 24:00, as seconds since midnight.
pub fn parse_hhmm(s: &str) -> Option<u32> {
    let b = s.as_bytes();
    if b.len() != 5 || b[2] != b':' || ![0, 1, 3, 4].iter().all(|&i| b[i].is_ascii_digit()) {
        return None;
    }
    let digit = |i: usize| u32::from(b[i] - b'0');
    let (h, m) = (digit(0) * 10 + digit(1), digit(3) * 10 + digit(4));
    let secs = (h * 60 + m) * 60;
    (m < 60 && secs <= SECS_PER_DAY).then_some(secs)
}

/// Seconds since midnight as a time of day; `SECS_PER_DAY` (24:00) wraps to
/// 00:00, so callers move to the next day first.
pub fn secs_to_time(secs: u32) -> Time {
    let secs = secs % SECS_PER_DAY;
    Time::new(
        (secs / 3600) as i8,
        (secs / 60 % 60) as i8,
        (secs % 60) as i8,
        0,
    )
    .expect("in range")
}

/// The instant local `date` `time` in `tz` means, by the DST rule above
/// (`None` only at the ends of time).
pub fn resolve(tz: &TimeZone, date: Date, time: Time) -> Option<Timestamp> {
    tz.to_ambiguous_timestamp(date.to_datetime(time))
        .compatible()
        .ok()
}

/// The IANA time zone `name`, or an error that names it and, when the
/// mistake looks like a typo, the closest known name.
pub fn timezone(name: &str) -> Result<TimeZone, String> {
    TimeZone::get(name).map_err(|_| unknown_timezone(name))
}

/// "... is not a known IANA time zone", with the closest known name when
/// the mistake looks like a typo.
pub fn unknown_timezone(name: &str) -> String {
    let wanted = name.to_ascii_lowercase();
    let closest = jiff::tz::db()
        .available()
        .map(|n| {
            let n = n.as_str().to_string();
            let full = n.to_ascii_lowercase();
            // A bare city ("berlin") is compared with the last part only.
            let city = match wanted.contains('/') {
                true => &full,
                false => full.rsplit('/').next().unwrap_or(&full),
            };
            let d = edit_distance(&wanted, &full).min(edit_distance(&wanted, city));
            (d, n)
        })
        .min();
    match closest {
        Some((d, n)) if d <= 3 && !wanted.is_empty() => {
            format!("{name:?} is not a known IANA time zone; did you mean {n:?}?")
        }
        _ => format!(
            "{name:?} is not a known IANA time zone; write one like Europe/Berlin, \
             America/New_York or UTC"
        ),
    }
}

/// Levenshtein distance, by chars.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diag = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let next = (diag + usize::from(ca != cb))
                .min(row[j] + 1)
                .min(row[j + 1] + 1);
            diag = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_of_day() {
        assert_eq!(parse_hhmm("00:00"), Some(0));
        assert_eq!(parse_hhmm("09:30"), Some(9 * 3600 + 30 * 60));
        assert_eq!(parse_hhmm("24:00"), Some(SECS_PER_DAY));
        for bad in ["24:01", "9:30", "09:60", "0930", "09:3x", "", "25:00"] {
            assert_eq!(parse_hhmm(bad), None, "{bad}");
        }
        assert_eq!(secs_to_time(SECS_PER_DAY), Time::midnight());
        assert_eq!(secs_to_time(3600 + 61), Time::new(1, 1, 1, 0).unwrap());
    }

    #[test]
    fn weekdays() {
        assert_eq!(parse_weekday("MON").unwrap(), Weekday::Monday);
        assert_eq!(parse_weekday("sunday").unwrap(), Weekday::Sunday);
        assert!(parse_weekday("funday")
            .unwrap_err()
            .contains("not one of mon"));
    }

    #[test]
    fn the_dst_rule_on_both_clock_change_nights() {
        let berlin = timezone("Europe/Berlin").unwrap();
        let at = |d: &str, t: &str| {
            resolve(&berlin, d.parse().unwrap(), t.parse().unwrap())
                .unwrap()
                .to_string()
        };
        // Spring forward, 2025-03-30: 02:00 CET becomes 03:00 CEST. A
        // skipped time moves forward by the gap.
        assert_eq!(at("2025-03-30", "01:59"), "2025-03-30T00:59:00Z");
        assert_eq!(at("2025-03-30", "02:30"), "2025-03-30T01:30:00Z"); // 03:30 CEST
        assert_eq!(at("2025-03-30", "03:00"), "2025-03-30T01:00:00Z");
        // Fall back, 2025-10-26: 03:00 CEST becomes 02:00 CET. A repeated
        // time is its first occurrence (CEST).
        assert_eq!(at("2025-10-26", "02:30"), "2025-10-26T00:30:00Z");
        assert_eq!(at("2025-10-26", "03:00"), "2025-10-26T02:00:00Z"); // CET
    }

    #[test]
    fn timezone_suggestions() {
        assert_eq!(edit_distance("europe/berln", "europe/berlin"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert!(unknown_timezone("Europe/Pairs").contains(r#"did you mean "Europe/Paris"?"#));
        assert!(unknown_timezone("berlin").contains(r#"did you mean "Europe/Berlin"?"#));
        assert!(unknown_timezone("New_Yorck").contains(r#"did you mean "America/New_York"?"#));
        assert!(unknown_timezone("").contains("write one like"));
        assert!(timezone("UTC").is_ok());
    }
}
