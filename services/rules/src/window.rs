//! The weekly window: listed weekdays, a local time-of-day range, a time
//! zone. Maintenance windows (silence recurrences), the active hours of an
//! escalation level and on-call restrictions are all this one type.
//!
//! Each listed day's window opens at `start` and closes at `end` local time
//! (the next day when `end <= start`, or `end` is `24:00`); both are turned
//! into instants by the DST rule of [`crate::time`]: a skipped local time
//! moves forward by the gap, a repeated one is its first occurrence. So in
//! Europe/Berlin a daily 01:00–04:00 window lasts 2 real hours on
//! 2025-03-30 and 4 on 2025-10-26, and 02:15–02:45 happens at 03:15–03:45
//! CEST on 2025-03-30 and once (the first 02:15–02:45) on 2025-10-26.
//! Windows that touch (Mon–Fri 00:00–24:00) count as one.

use jiff::{civil::Date, tz::TimeZone, Span, Timestamp};

use crate::time::{parse_hhmm, parse_weekday, resolve, secs_to_time, SECS_PER_DAY};

/// A weekly window in a time zone, ready to evaluate.
#[derive(Clone, Debug)]
pub struct WeeklyWindow {
    /// Indexed by `Weekday::to_monday_zero_offset`.
    weekdays: [bool; 7],
    /// Seconds since local midnight, `0..SECS_PER_DAY`.
    start: u32,
    /// Seconds since local midnight, `0..=SECS_PER_DAY` (`24:00`).
    end: u32,
    tz: TimeZone,
}

impl WeeklyWindow {
    /// `weekdays` empty means every day; `start` is `HH:MM` from 00:00 to
    /// 23:59, `end` from 00:00 to 24:00 (`end == start`: 24 hours).
    pub fn new(
        weekdays: &[String],
        start: &str,
        end: &str,
        tz: TimeZone,
    ) -> Result<WeeklyWindow, String> {
        let mut days = [weekdays.is_empty(); 7];
        for name in weekdays {
            days[parse_weekday(name)?.to_monday_zero_offset() as usize] = true;
        }
        let start_secs = parse_hhmm(start)
            .filter(|&s| s < SECS_PER_DAY)
            .ok_or_else(|| format!("start {start:?} is not a time HH:MM from 00:00 to 23:59"))?;
        let end_secs = parse_hhmm(end)
            .ok_or_else(|| format!("end {end:?} is not a time HH:MM from 00:00 to 24:00"))?;
        Ok(WeeklyWindow {
            weekdays: days,
            start: start_secs,
            end: end_secs,
            tz,
        })
    }

    /// The time zone the window is read in.
    pub fn timezone(&self) -> &TimeZone {
        &self.tz
    }

    /// Every day, all day: no restriction at all.
    pub fn always(&self) -> bool {
        self.weekdays.iter().all(|&d| d)
            && (self.start == self.end || (self.start == 0 && self.end == SECS_PER_DAY))
    }

    /// The window that opens on local date `day`, if `day` is listed.
    fn opening_on(&self, day: Date) -> Option<(Timestamp, Timestamp)> {
        if !self.weekdays[day.weekday().to_monday_zero_offset() as usize] {
            return None;
        }
        let open = resolve(&self.tz, day, secs_to_time(self.start))?;
        let (end_day, end) = if self.end == SECS_PER_DAY || self.end <= self.start {
            (day.tomorrow().ok()?, self.end % SECS_PER_DAY)
        } else {
            (day, self.end)
        };
        let close = resolve(&self.tz, end_day, secs_to_time(end))?;
        // Both ends inside one DST gap move together; a window can still
        // collapse if only its end is pulled back by a fold.
        (open < close).then_some((open, close))
    }

    /// Whether `at` is inside the window.
    pub fn contains(&self, at: Timestamp) -> bool {
        self.always() || self.state(at).0
    }

    /// Whether `at` is inside the window, and the interval around `at` over
    /// which that holds (`Timestamp::MIN`/`MAX` when it holds for ever).
    pub fn state(&self, at: Timestamp) -> (bool, Timestamp, Timestamp) {
        if self.always() {
            return (true, Timestamp::MIN, Timestamp::MAX);
        }
        let today = self.tz.to_datetime(at).date();
        // A window containing `at` opened at most two local dates ago, and
        // with at least one listed weekday a window opens in every 7 days,
        // so the 8 dates before and after `today` hold both the previous
        // close and the next open, and any run of touching windows around
        // `at` (it spans at most 6 days, or `always` would hold).
        let mut runs = [(Timestamp::MIN, Timestamp::MIN); 17];
        let mut n = 0;
        for offset in -8..=8 {
            let Some((open, close)) = today
                .checked_add(Span::new().days(offset))
                .ok()
                .and_then(|day| self.opening_on(day))
            else {
                continue;
            };
            if n > 0 && open <= runs[n - 1].1 {
                runs[n - 1].1 = runs[n - 1].1.max(close);
            } else {
                runs[n] = (open, close);
                n += 1;
            }
        }
        let (mut before, mut after) = (Timestamp::MIN, Timestamp::MAX);
        for &(open, close) in &runs[..n] {
            if open <= at && at < close {
                return (true, open, close);
            }
            if close <= at {
                before = before.max(close);
            } else {
                after = open;
                break;
            }
        }
        (false, before, after)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::timezone;

    fn window(days: &[&str], start: &str, end: &str, tz: &str) -> WeeklyWindow {
        let days: Vec<String> = days.iter().map(|s| s.to_string()).collect();
        WeeklyWindow::new(&days, start, end, timezone(tz).unwrap()).unwrap()
    }

    fn check(w: &WeeklyWindow, at: &str, expected: bool) {
        assert_eq!(w.contains(at.parse().unwrap()), expected, "{at} in {w:?}");
    }

    #[test]
    fn spring_forward_night() {
        // 2025-03-30, Berlin: 02:00 CET (01:00Z) becomes 03:00 CEST.
        let w = window(&[], "01:00", "04:00", "Europe/Berlin");
        check(&w, "2025-03-29T23:59:59Z", false); // 00:59:59 CET
        check(&w, "2025-03-30T00:00:00Z", true); // 01:00 CET
        check(&w, "2025-03-30T01:59:59Z", true); // 03:59:59 CEST
        check(&w, "2025-03-30T02:00:00Z", false); // 04:00 CEST: 2 real hours
        let (inside, open, close) = w.state("2025-03-30T01:00:00Z".parse().unwrap());
        assert!(inside);
        assert_eq!(close.duration_since(open).as_hours(), 2);

        // A window inside the skipped hour moves forward by the gap.
        let w = window(&[], "02:15", "02:45", "Europe/Berlin");
        check(&w, "2025-03-30T01:14:59Z", false); // 03:14:59 CEST
        check(&w, "2025-03-30T01:15:00Z", true); // 03:15 CEST
        check(&w, "2025-03-30T01:44:59Z", true); // 03:44:59 CEST
        check(&w, "2025-03-30T01:45:00Z", false); // 03:45 CEST
    }

    #[test]
    fn fall_back_night() {
        // 2025-10-26, Berlin: 03:00 CEST (01:00Z) becomes 02:00 CET.
        let w = window(&[], "01:00", "04:00", "Europe/Berlin");
        check(&w, "2025-10-25T22:59:59Z", false); // 00:59:59 CEST
        check(&w, "2025-10-25T23:00:00Z", true); // 01:00 CEST
        check(&w, "2025-10-26T02:59:59Z", true); // 03:59:59 CET
        check(&w, "2025-10-26T03:00:00Z", false); // 04:00 CET: 4 real hours

        // A window inside the repeated hour happens once, the first time.
        let w = window(&[], "02:15", "02:45", "Europe/Berlin");
        check(&w, "2025-10-26T00:15:00Z", true); // 02:15 CEST
        check(&w, "2025-10-26T00:45:00Z", false); // 02:45 CEST
        check(&w, "2025-10-26T01:30:00Z", false); // 02:30 CET, the second time
    }

    #[test]
    fn crossing_midnight_and_touching_days() {
        // 2025-06-06 is a Friday.
        let w = window(&["fri"], "22:00", "06:00", "UTC");
        check(&w, "2025-06-06T21:59:59Z", false);
        check(&w, "2025-06-07T05:59:59Z", true); // Saturday, opened Friday
        check(&w, "2025-06-07T06:00:00Z", false);
        check(&w, "2025-06-07T22:00:00Z", false); // Saturday not listed

        let w = window(
            &["mon", "tue", "wed", "thu", "fri"],
            "00:00",
            "24:00",
            "UTC",
        );
        let (inside, open, close) = w.state("2025-06-04T12:00:00Z".parse().unwrap());
        assert!(inside);
        assert_eq!(open.to_string(), "2025-06-02T00:00:00Z");
        assert_eq!(close.to_string(), "2025-06-07T00:00:00Z");
        assert!(window(&[], "08:00", "08:00", "UTC").always());
    }

    #[test]
    fn invalid_windows_name_the_part() {
        let err = |days: &[&str], s: &str, e: &str| {
            let days: Vec<String> = days.iter().map(|s| s.to_string()).collect();
            WeeklyWindow::new(&days, s, e, TimeZone::UTC).unwrap_err()
        };
        assert!(err(&["funday"], "01:00", "02:00").contains(r#"weekday "funday""#));
        assert!(err(&[], "24:00", "02:00").contains(r#"start "24:00""#));
        assert!(err(&[], "01:00", "24:01").contains(r#"end "24:01""#));
    }
}
