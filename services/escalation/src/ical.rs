//! iCalendar (RFC 5545) export of an on-call timeline, so people can
//! subscribe to "when am I on call" from any calendar app.
//!
//! One `VEVENT` per [`Shift`], times in UTC (`20260105T080000Z`), which every
//! client converts to the viewer's zone and which spares us from emitting
//! `VTIMEZONE` blocks. Output follows RFC 5545 3.1: CRLF line endings and
//! lines folded at 75 octets on UTF-8 character boundaries.

use jiff::{tz::TimeZone, Timestamp};
use sha2::{Digest, Sha256};

use crate::schedule::Shift;

/// The longest content line RFC 5545 3.1 allows, in octets, without CRLF.
const MAX_LINE: usize = 75;

/// A `VCALENDAR` of `shifts` from schedule `schedule_name`, stamped with
/// `generated_at` (the `DTSTAMP` of every event).
///
/// Each event's `UID` is derived from the schedule, the user and the start,
/// so regenerating the feed keeps the UIDs of unchanged shifts and a client
/// updates an event whose end moved instead of duplicating it. (The first
/// shift of a window is clipped to the window's start, so its UID changes as
/// the window slides; subscribed feeds are replaced wholesale on refresh, so
/// that costs nothing.)
pub fn calendar(schedule_name: &str, shifts: &[Shift], generated_at: Timestamp) -> String {
    let mut out = String::new();
    let name = escape_text(schedule_name);
    for line in [
        "BEGIN:VCALENDAR",
        "VERSION:2.0",
        "PRODID:-//Tocsin//On-call//EN",
        "CALSCALE:GREGORIAN",
        "METHOD:PUBLISH",
    ] {
        push_line(&mut out, line);
    }
    push_line(&mut out, &format!("X-WR-CALNAME:{name}"));
    let stamp = utc_basic(generated_at);
    for shift in shifts {
        push_line(&mut out, "BEGIN:VEVENT");
        push_line(&mut out, &format!("UID:{}", uid(schedule_name, shift)));
        push_line(&mut out, &format!("DTSTAMP:{stamp}"));
        push_line(&mut out, &format!("DTSTART:{}", utc_basic(shift.start)));
        push_line(&mut out, &format!("DTEND:{}", utc_basic(shift.end)));
        push_line(
            &mut out,
            &format!("SUMMARY:On call: {} ({name})", escape_text(&shift.user)),
        );
        push_line(&mut out, "END:VEVENT");
    }
    push_line(&mut out, "END:VCALENDAR");
    out
}

/// `<32 hex digits>@tocsin`: SHA-256 of schedule, user and start, separated
/// by NUL so that ("ab", "c") and ("a", "bc") differ.
fn uid(schedule_name: &str, shift: &Shift) -> String {
    let mut h = Sha256::new();
    h.update(schedule_name.as_bytes());
    h.update([0]);
    h.update(shift.user.as_bytes());
    h.update([0]);
    h.update(shift.start.as_nanosecond().to_be_bytes());
    format!("{}@tocsin", hex::encode(&h.finalize()[..16]))
}

/// RFC 5545 3.3.5 "form #2" (UTC): `20260105T080000Z`. Sub-second parts
/// are dropped; shifts start on whole minutes anyway.
fn utc_basic(ts: Timestamp) -> String {
    let dt = TimeZone::UTC.to_datetime(ts);
    format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
        dt.year(),
        dt.month(),
        dt.day(),
        dt.hour(),
        dt.minute(),
        dt.second()
    )
}

/// Escapes a TEXT value (RFC 5545 3.3.11): backslash, `;`, `,` and line
/// breaks. Other control characters are not allowed in TEXT and are dropped
/// (they can only come from a config mistake).
fn escape_text(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.push_str("\\\\"),
            ';' => out.push_str("\\;"),
            ',' => out.push_str("\\,"),
            '\n' => out.push_str("\\n"),
            '\r' => {
                // CRLF is one line break; a lone CR too.
                chars.next_if_eq(&'\n');
                out.push_str("\\n");
            }
            c if c.is_control() && c != '\t' => {}
            c => out.push(c),
        }
    }
    out
}

/// Appends one content line, folded (RFC 5545 3.1): no line longer than 75
/// octets, continuation lines start with a single space, and a fold never
/// splits a UTF-8 character, which would corrupt it for clients that decode
/// each physical line.
fn push_line(out: &mut String, line: &str) {
    let mut rest = line;
    // The first line has 75 octets for content; continuations 74 after the
    // leading space.
    let mut room = MAX_LINE;
    while rest.len() > room {
        let mut cut = room;
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        out.push_str(&rest[..cut]);
        out.push_str("\r\n ");
        rest = &rest[cut..];
        room = MAX_LINE - 1;
    }
    out.push_str(rest);
    out.push_str("\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn shift(user: &str, start: &str, end: &str) -> Shift {
        Shift {
            user: user.into(),
            start: ts(start),
            end: ts(end),
        }
    }

    const GENERATED: &str = "2026-01-01T12:00:00Z";

    /// The calendar for `shifts`, with `\r\n` shown as `\n` so expectations
    /// read like the file (CRLF itself is checked in `crlf_and_folding`).
    fn check(schedule: &str, shifts: &[Shift], expected: &str) {
        let got = calendar(schedule, shifts, ts(GENERATED));
        assert!(
            !got.replace("\r\n", "").contains('\n'),
            "bare LF in {got:?}"
        );
        assert_eq!(got.replace("\r\n", "\n"), expected);
    }

    #[test]
    fn empty_calendar() {
        check(
            "primary",
            &[],
            "BEGIN:VCALENDAR
VERSION:2.0
PRODID:-//Tocsin//On-call//EN
CALSCALE:GREGORIAN
METHOD:PUBLISH
X-WR-CALNAME:primary
END:VCALENDAR
",
        );
    }

    #[test]
    fn one_event_per_shift() {
        let shifts = [
            shift("alice", "2026-01-05T08:00:00Z", "2026-01-12T08:00:00Z"),
            shift("bob", "2026-01-12T08:00:00Z", "2026-01-19T08:00:00Z"),
        ];
        let (a, b) = (uid("primary", &shifts[0]), uid("primary", &shifts[1]));
        check(
            "primary",
            &shifts,
            &format!(
                "BEGIN:VCALENDAR
VERSION:2.0
PRODID:-//Tocsin//On-call//EN
CALSCALE:GREGORIAN
METHOD:PUBLISH
X-WR-CALNAME:primary
BEGIN:VEVENT
UID:{a}
DTSTAMP:20260101T120000Z
DTSTART:20260105T080000Z
DTEND:20260112T080000Z
SUMMARY:On call: alice (primary)
END:VEVENT
BEGIN:VEVENT
UID:{b}
DTSTAMP:20260101T120000Z
DTSTART:20260112T080000Z
DTEND:20260119T080000Z
SUMMARY:On call: bob (primary)
END:VEVENT
END:VCALENDAR
"
            ),
        );
    }

    #[test]
    fn uids_are_stable_and_distinct() {
        let s = shift("alice", "2026-01-05T08:00:00Z", "2026-01-12T08:00:00Z");
        let u = uid("primary", &s);
        assert_eq!(u.len(), 32 + "@tocsin".len(), "{u}");
        assert!(u.ends_with("@tocsin") && u[..32].bytes().all(|b| b.is_ascii_hexdigit()));
        // The end is not part of it: a shift that got longer keeps its UID.
        let longer = shift("alice", "2026-01-05T08:00:00Z", "2026-01-13T08:00:00Z");
        assert_eq!(uid("primary", &longer), u);
        for other in [
            uid("secondary", &s),
            uid(
                "primary",
                &shift("bob", "2026-01-05T08:00:00Z", "2026-01-12T08:00:00Z"),
            ),
            uid(
                "primary",
                &shift("alice", "2026-01-05T09:00:00Z", "2026-01-12T08:00:00Z"),
            ),
            uid(
                "primar",
                &shift("yalice", "2026-01-05T08:00:00Z", "2026-01-12T08:00:00Z"),
            ),
        ] {
            assert_ne!(other, u);
        }
    }

    #[test]
    fn escaping() {
        let check =
            |input: &str, expected: &str| assert_eq!(escape_text(input), expected, "{input:?}");
        check("alice", "alice");
        check("a,b;c", "a\\,b\\;c");
        check("back\\slash", "back\\\\slash");
        check("two\nlines", "two\\nlines");
        check("crlf\r\nline", "crlf\\nline");
        check("cr\rline", "cr\\nline");
        check("tab\tbell\u{7}", "tab\tbell");
        check("Zoë 🚨", "Zoë 🚨");
        check("", "");
    }

    #[test]
    fn escapes_names_in_the_output() {
        let shifts = [shift(
            "o'brien, pat; jr\\",
            "2026-01-05T08:00:00Z",
            "2026-01-05T20:00:00Z",
        )];
        let got = calendar("db, eu;west", &shifts, ts(GENERATED));
        assert!(
            got.contains("\r\nX-WR-CALNAME:db\\, eu\\;west\r\n"),
            "{got}"
        );
        assert!(
            got.contains("\r\nSUMMARY:On call: o'brien\\, pat\\; jr\\\\ (db\\, eu\\;west)\r\n"),
            "{got}"
        );
    }

    /// Splits folded output into `(name, value)` content lines, the way a
    /// client reads it: unfold (CRLF + space), split on CRLF, name before
    /// the first colon.
    fn parse(ics: &str) -> Vec<(String, String)> {
        assert!(ics.ends_with("\r\n"));
        ics.replace("\r\n ", "")
            .trim_end_matches("\r\n")
            .split("\r\n")
            .map(|line| {
                let (name, value) = line.split_once(':').expect("name:value");
                (name.to_string(), value.to_string())
            })
            .collect()
    }

    fn unescape(s: &str) -> String {
        let mut out = String::new();
        let mut chars = s.chars();
        while let Some(c) = chars.next() {
            match (c, c == '\\') {
                (_, true) => match chars.next() {
                    Some('n') => out.push('\n'),
                    Some(c) => out.push(c),
                    None => panic!("dangling backslash in {s:?}"),
                },
                (c, false) => out.push(c),
            }
        }
        out
    }

    #[test]
    fn crlf_and_folding() {
        // 40 three-octet characters: 120 octets, so the SUMMARY folds, and
        // 75 is not a multiple of 3 after "SUMMARY:On call: ", so a naive
        // cut at 75 octets would split a character.
        let long = "日".repeat(40) + ", the 2nd";
        let shifts = [
            shift(&long, "2026-01-05T08:00:00Z", "2026-01-12T08:00:00Z"),
            shift("bob", "2026-01-12T08:00:00Z", "2026-01-19T08:00:00Z"),
        ];
        let schedule = "primary 🚨 on-call rotation for the payments database, europe-west";
        let ics = calendar(schedule, &shifts, ts(GENERATED));

        let physical: Vec<&str> = ics.trim_end_matches("\r\n").split("\r\n").collect();
        assert!(physical
            .iter()
            .all(|l| !l.contains('\r') && !l.contains('\n')));
        for line in &physical {
            assert!(line.len() <= MAX_LINE, "{} octets: {line:?}", line.len());
        }
        let continuations: Vec<&&str> = physical.iter().filter(|l| l.starts_with(' ')).collect();
        assert!(continuations.len() >= 3, "{ics}");
        // Folds pack lines: the SUMMARY's first line is within 2 octets of
        // the limit (a 3-octet character did not fit).
        let first = physical.iter().find(|l| l.starts_with("SUMMARY:")).unwrap();
        assert!(first.len() >= MAX_LINE - 2, "{first:?}");

        // Parses back: one VEVENT per shift with the values put in.
        let lines = parse(&ics);
        let values = |name: &str| -> Vec<String> {
            lines
                .iter()
                .filter(|(n, _)| n == name)
                .map(|(_, v)| unescape(v))
                .collect()
        };
        assert_eq!(values("BEGIN"), ["VCALENDAR", "VEVENT", "VEVENT"]);
        assert_eq!(values("END"), ["VEVENT", "VEVENT", "VCALENDAR"]);
        assert_eq!(values("X-WR-CALNAME"), [schedule]);
        assert_eq!(
            values("SUMMARY"),
            [
                format!("On call: {long} ({schedule})"),
                format!("On call: bob ({schedule})")
            ]
        );
        assert_eq!(values("DTSTART"), ["20260105T080000Z", "20260112T080000Z"]);
        assert_eq!(values("DTEND"), ["20260112T080000Z", "20260119T080000Z"]);
        assert_eq!(values("DTSTAMP"), ["20260101T120000Z"; 2]);
        assert_eq!(values("UID").len(), 2);
    }

    #[test]
    fn fold_boundaries() {
        // (content line, physical lines)
        let check = |line: &str, expected: &[&str]| {
            let mut out = String::new();
            push_line(&mut out, line);
            let got: Vec<&str> = out.trim_end_matches("\r\n").split("\r\n").collect();
            assert_eq!(got, expected, "{line:?}");
        };
        let a75 = "a".repeat(75);
        let a74 = "a".repeat(74);
        check("", &[""]);
        check(&a75, &[&a75]);
        check(&format!("{a75}b"), &[&a75, " b"]);
        check(
            &format!("{a75}{a74}{a74}c"),
            &[&a75, &format!(" {a74}"), &format!(" {a74}"), " c"],
        );
        // A 4-octet character straddling octet 75 moves whole to the next line.
        let a73 = "a".repeat(73);
        check(&format!("{a73}🚨b"), &[&a73, " 🚨b"]);
        check(&format!("{a73}é"), &[&format!("{a73}é")]);
    }

    #[test]
    fn utc_format() {
        assert_eq!(utc_basic(ts("2026-01-05T08:00:00Z")), "20260105T080000Z");
        assert_eq!(
            utc_basic(ts("2026-03-29T09:00:00+02:00")),
            "20260329T070000Z"
        );
        assert_eq!(utc_basic(ts("2026-12-31T23:59:59.9Z")), "20261231T235959Z");
    }
}
