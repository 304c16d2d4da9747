//! On-call schedules: who is on call at an instant, and the merged timeline.
//!
//! A schedule is a stack of rotation layers plus overrides, read in one time
//! zone. Everything here is pure: the caller passes the instant, nothing
//! reads a clock.
//!
//! - **Rotations.** A layer hands the pager from one participant to the next.
//!   Rotations whose length is a whole number of days (`daily`, `weekly`,
//!   `3d`, `2w`, even `24h`) hand off at the local wall-clock `handoff` time
//!   on calendar days: shift `k` begins on local date `start + k * days` at
//!   `handoff`, so it stays at 09:00 on the wall across DST changes, and the
//!   shift containing a change lasts 23 or 25 real hours (167 or 169 for a
//!   weekly one). Any other length (`12h`, `36h`) advances in absolute time
//!   from the first handoff instant, so its wall-clock handoff time moves by
//!   an hour when the clocks change. Shift `k` belongs to
//!   `participants[k mod n]`.
//! - **Before `start`** the rotation extends backwards (shift -1 belongs to
//!   the last participant), as in PagerDuty and GoAlert: a layer added with a
//!   `start` next Monday covers this week too rather than leaving a hole.
//! - **DST.** A local time that does not exist (the skipped hour) moves
//!   forward by the length of the gap, and one that happens twice means its
//!   first occurrence: jiff's "compatible" disambiguation, as in RFC 5545
//!   and Temporal. This applies to handoffs and restriction boundaries.
//! - **Restrictions.** A layer with `restrict` only counts inside a weekly
//!   window of local time (weekdays + start..end, crossing midnight when
//!   `end <= start`); outside it, lower layers decide.
//! - **Precedence.** Overrides beat every layer (the last listed override
//!   wins where they overlap); among layers, the last listed one that has
//!   someone wins. No layer and no override means nobody is on call.

use std::{collections::BTreeSet, fmt, str::FromStr, time::Duration};

use jiff::{
    civil::{Date, Time},
    tz::TimeZone,
    Span, Timestamp,
};
use serde::{de, Deserialize, Deserializer};
use tocsin_rules::{
    time::{parse_hhmm, resolve, secs_to_time, timezone, SECS_PER_DAY},
    window::WeeklyWindow,
};
use tocsin_runtime::config::{parse_duration, HumanDuration};

/// The most shifts [`Schedule::shifts`] returns; the timeline is cut there.
/// A year of 12h shifts is 730, so only a mistake (a range of centuries)
/// reaches it, and the cap keeps such a mistake from exhausting memory.
pub const MAX_SHIFTS: usize = 10_000;

/// The most decisions [`Schedule::shifts`] evaluates. Every evaluation ends
/// at a handoff, restriction or override boundary, so this bounds the work
/// for a timeline whose boundaries mostly merge away (one participant with
/// many hourly handoffs); like [`MAX_SHIFTS`] it cuts the timeline short.
const MAX_STEPS: usize = 100_000;

/// Rotations shorter than this are rejected: an hour is the shortest
/// rotation PagerDuty and GoAlert offer, and `12m` is far more likely a typo
/// for `12h` than a wish to be paged in turns every twelve minutes.
const MIN_ROTATION: Duration = Duration::from_secs(60 * 60);

const DEFAULT_HANDOFF: &str = "09:00";

// ---------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------

/// One entry under `schedules:`.
///
/// ```yaml
/// - name: primary
///   timezone: Europe/Berlin
///   layers:
///     - name: weekly
///       participants: [alice, bob, carol]
///       rotation: weekly
///       handoff: "09:00"
///       start: 2026-01-05
///   overrides:
///     - user: dave
///       start: 2026-03-28T20:00:00+01:00
///       end: 2026-03-29T08:00:00+02:00
/// ```
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    /// What escalation policies refer to. Required.
    pub name: String,
    /// IANA time zone (`Europe/Berlin`) in which handoffs, start dates and
    /// restrictions are read. Required, with no default: a schedule silently
    /// read in UTC would hand off at the wrong hour for everyone outside it.
    pub timezone: String,
    /// Rotation layers, lowest first: where several have someone on call,
    /// the last one listed wins. Default: none (nobody is on call).
    #[serde(default)]
    pub layers: Vec<LayerConfig>,
    /// Time ranges in which one person replaces the layers. Default: none.
    #[serde(default)]
    pub overrides: Vec<OverrideConfig>,
}

/// One rotation layer of a schedule.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerConfig {
    /// Unique within the schedule; reported in [`OnCall::layer`] so people
    /// can see why they were paged. Required.
    pub name: String,
    /// Users in rotation order. Required, at least one.
    pub participants: Vec<String>,
    /// How long each shift lasts. Required.
    pub rotation: Rotation,
    /// Local wall-clock time of each handoff, `HH:MM` from `00:00` to
    /// `23:59`. Default `09:00`, when people are awake to hand over.
    #[serde(default = "default_handoff")]
    pub handoff: String,
    /// Local date of the first shift, which `participants[0]` has: the
    /// anchor every shift is counted from. Required.
    pub start: Date,
    /// Times of the week the layer covers. Default: none (all the time).
    #[serde(default)]
    pub restrict: Option<RestrictConfig>,
}

fn default_handoff() -> String {
    DEFAULT_HANDOFF.to_string()
}

/// A weekly window of local time, e.g. business hours.
///
/// The window opens on each listed weekday at `start` and closes at `end`
/// the same day, or the next day when `end <= start` (`22:00`–`06:00` is a
/// night that belongs to the weekday it starts on; `start == end` is 24
/// hours).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestrictConfig {
    /// `mon`..`sun` (or `monday`..`sunday`). Default: empty, meaning every
    /// day.
    #[serde(default)]
    pub weekdays: Vec<String>,
    /// `HH:MM`, `00:00` to `23:59`. Default `00:00`.
    #[serde(default = "midnight")]
    pub start: String,
    /// `HH:MM`, `00:00` to `24:00`. Default `24:00`, so `weekdays: [sat,
    /// sun]` alone means whole days.
    #[serde(default = "end_of_day")]
    pub end: String,
}

fn midnight() -> String {
    "00:00".to_string()
}

fn end_of_day() -> String {
    "24:00".to_string()
}

/// One person on call instead of the layers from `start` (inclusive) to
/// `end` (exclusive).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OverrideConfig {
    /// Required.
    pub user: String,
    /// RFC 3339 with an offset, `2026-03-28T20:00:00+01:00`. Required.
    pub start: Timestamp,
    /// RFC 3339 with an offset; after `start`. Required.
    pub end: Timestamp,
}

/// Length of a layer's shifts, written in YAML as one string: `daily`,
/// `weekly`, or a duration such as `12h`, `3d` or `2w`.
///
/// A duration of whole days (`3d`, `2w`, `24h`) rotates on calendar days
/// like `daily` and `weekly`; any other (`12h`) in absolute time. See the
/// module documentation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rotation {
    Daily,
    Weekly,
    Every(HumanDuration),
}

impl Rotation {
    pub fn length(self) -> Duration {
        match self {
            Rotation::Daily => Duration::from_secs(SECS_PER_DAY.into()),
            Rotation::Weekly => Duration::from_secs(7 * u64::from(SECS_PER_DAY)),
            Rotation::Every(d) => d.get(),
        }
    }
}

impl FromStr for Rotation {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "daily" => Ok(Rotation::Daily),
            "weekly" => Ok(Rotation::Weekly),
            d => parse_duration(d)
                .map(|d| Rotation::Every(HumanDuration(d)))
                .map_err(|_| {
                    format!(
                        "invalid rotation {s:?}: write daily, weekly, \
                         or a duration like 12h, 3d or 2w"
                    )
                }),
        }
    }
}

impl<'de> Deserialize<'de> for Rotation {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = Rotation;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("daily, weekly, or a duration like 12h, 3d or 2w")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Rotation, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_str(V)
    }
}

impl fmt::Display for Rotation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rotation::Daily => f.write_str("daily"),
            Rotation::Weekly => f.write_str("weekly"),
            Rotation::Every(d) => {
                // In the largest unit that divides it, as people write it
                // (`2w`, `36h`), and parseable again.
                let d = d.get();
                let units = [("w", 7 * 86_400), ("d", 86_400), ("h", 3600), ("m", 60)];
                match units
                    .iter()
                    .find(|&&(_, secs)| d.subsec_nanos() == 0 && d.as_secs() % secs == 0)
                {
                    _ if d.is_zero() => f.write_str("0"),
                    Some((unit, secs)) => write!(f, "{}{unit}", d.as_secs() / secs),
                    None => write!(f, "{}", HumanDuration(d)),
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Answers
// ---------------------------------------------------------------------------

/// Who is on call at an instant, and for how long the answer holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OnCall {
    pub user: String,
    /// The deciding layer's name; `None` when an override decided.
    pub layer: Option<String>,
    /// When the deciding layer's shift (or the override) took over: the
    /// rotation handoff, clipped to where restrictions, higher layers and
    /// overrides let it decide.
    pub shift_start: Timestamp,
    /// When the answer next changes (a handoff, a restriction window opening
    /// or closing, an override starting or ending): the time to re-check.
    /// The same user may still be on call after it, from another layer.
    pub shift_end: Timestamp,
}

/// One stretch of the final timeline: `user` is on call from `start`
/// (inclusive) to `end` (exclusive).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shift {
    pub user: String,
    pub start: Timestamp,
    pub end: Timestamp,
}

// ---------------------------------------------------------------------------
// Compiled schedule
// ---------------------------------------------------------------------------

/// A validated schedule, ready to answer who is on call.
#[derive(Clone, Debug)]
pub struct Schedule {
    name: String,
    tz: TimeZone,
    layers: Vec<Layer>,
    overrides: Vec<Override>,
}

#[derive(Clone, Debug)]
struct Layer {
    name: String,
    participants: Vec<String>,
    rotation: CompiledRotation,
    restrict: Option<WeeklyWindow>,
}

#[derive(Clone, Debug)]
enum CompiledRotation {
    /// Shift `k` begins on local date `start + k * days` at `handoff`.
    Calendar {
        start: Date,
        days: i64,
        handoff: Time,
    },
    /// Shift `k` begins at `anchor + k * len` (nanoseconds).
    Absolute { anchor: Timestamp, len: i128 },
}

#[derive(Clone, Debug)]
struct Override {
    user: String,
    start: Timestamp,
    end: Timestamp,
}

/// What the schedule says at one instant, and the interval around it over
/// which that stays true.
struct Decision<'a> {
    /// `(user, layer name)`; layer `None` for an override.
    who: Option<(&'a str, Option<&'a str>)>,
    bounds: Bounds,
}

/// `[start, end)`, narrowed as more sources are considered.
#[derive(Clone, Copy, Debug)]
struct Bounds {
    start: Timestamp,
    end: Timestamp,
}

impl Bounds {
    const ALL: Bounds = Bounds {
        start: Timestamp::MIN,
        end: Timestamp::MAX,
    };

    fn clip(&mut self, start: Timestamp, end: Timestamp) {
        self.start = self.start.max(start);
        self.end = self.end.min(end);
    }
}

impl Schedule {
    /// Validates and compiles `c`. Errors name the schedule, the layer or
    /// override, the field and the fix.
    pub fn new(c: &ScheduleConfig) -> Result<Schedule, String> {
        if c.name.trim().is_empty() {
            return Err("a schedule has an empty name; give it a name that \
                        escalation policies can refer to"
                .to_string());
        }
        let here = format!("schedule {:?}", c.name);
        let tz = timezone(&c.timezone).map_err(|e| format!("{here}: timezone {e}"))?;

        let mut layers: Vec<Layer> = Vec::with_capacity(c.layers.len());
        for (i, l) in c.layers.iter().enumerate() {
            let layer = Layer::compile(l, &tz).map_err(|e| {
                if l.name.trim().is_empty() {
                    format!("{here}, layers[{i}]: {e}")
                } else {
                    format!("{here}, layer {:?}: {e}", l.name)
                }
            })?;
            if layers.iter().any(|other| other.name == layer.name) {
                return Err(format!(
                    "{here}: two layers are named {:?}; layer names must be unique \
                     so on-call answers say which one decided",
                    layer.name
                ));
            }
            layers.push(layer);
        }

        let mut overrides = Vec::with_capacity(c.overrides.len());
        for (i, o) in c.overrides.iter().enumerate() {
            let here = format!("{here}, overrides[{i}]");
            if o.user.trim().is_empty() {
                return Err(format!("{here}: user is empty; name who covers"));
            }
            if o.end <= o.start {
                return Err(format!(
                    "{here} ({}): end {} must be after start {}",
                    o.user, o.end, o.start
                ));
            }
            overrides.push(Override {
                user: o.user.clone(),
                start: o.start,
                end: o.end,
            });
        }

        Ok(Schedule {
            name: c.name.clone(),
            tz,
            layers,
            overrides,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The zone its handoffs and windows are local times in.
    pub fn timezone(&self) -> &TimeZone {
        &self.tz
    }

    /// Every user named in a layer or an override, e.g. to check that each
    /// has a contact method.
    pub fn participants(&self) -> BTreeSet<&str> {
        let in_layers = self
            .layers
            .iter()
            .flat_map(|l| l.participants.iter().map(String::as_str));
        let in_overrides = self.overrides.iter().map(|o| o.user.as_str());
        in_layers.chain(in_overrides).collect()
    }

    /// Who is on call at `at`, or `None` if nobody is.
    ///
    /// Costs O(layers + overrides): each layer's shift is computed from its
    /// anchor arithmetically, whatever the distance from `start`.
    pub fn on_call(&self, at: Timestamp) -> Option<OnCall> {
        let d = self.decide(at);
        let (user, layer) = d.who?;
        Some(OnCall {
            user: user.to_string(),
            layer: layer.map(str::to_string),
            shift_start: d.bounds.start,
            shift_end: d.bounds.end,
        })
    }

    /// The final timeline over `[from, to)`, after layers and overrides:
    /// who is on call when, with adjacent stretches of the same user merged
    /// (whichever layer or override they came from) and stretches with
    /// nobody left out. The first and last shifts are clipped to `from` and
    /// `to`.
    ///
    /// At most [`MAX_SHIFTS`] shifts; a longer timeline is cut short, as it
    /// is when it has too many boundaries to evaluate (see `MAX_STEPS`),
    /// which only ranges of years with hourly handoffs come near.
    pub fn shifts(&self, from: Timestamp, to: Timestamp) -> Vec<Shift> {
        let mut out: Vec<Shift> = Vec::new();
        let mut t = from;
        for _ in 0..MAX_STEPS {
            if t >= to {
                break;
            }
            let d = self.decide(t);
            // Every source's interval contains `t`, so this advances.
            debug_assert!(d.bounds.start <= t && t < d.bounds.end);
            let end = d.bounds.end.min(to);
            if let Some((user, _)) = d.who {
                match out.last_mut() {
                    Some(last) if last.user == user && last.end == t => last.end = end,
                    _ => {
                        if out.len() == MAX_SHIFTS {
                            break;
                        }
                        out.push(Shift {
                            user: user.to_string(),
                            start: t,
                            end,
                        });
                    }
                }
            }
            t = end;
        }
        out
    }

    fn decide(&self, at: Timestamp) -> Decision<'_> {
        let mut bounds = Bounds::ALL;
        // The last listed override covering `at` wins. Those listed after it
        // do not cover `at`, but one that starts later takes over then, and
        // one that ended before `at` marks where this answer began.
        for o in self.overrides.iter().rev() {
            if o.start <= at && at < o.end {
                bounds.clip(o.start, o.end);
                return Decision {
                    who: Some((&o.user, None)),
                    bounds,
                };
            }
            if at < o.start {
                bounds.end = bounds.end.min(o.start);
            } else {
                bounds.start = bounds.start.max(o.end);
            }
        }
        // Layers from the top: each one with nobody at `at` still bounds the
        // answer, because the layers below only decide until it has someone.
        for layer in self.layers.iter().rev() {
            let (user, start, end) = layer.at(&self.tz, at);
            bounds.clip(start, end);
            if let Some(user) = user {
                return Decision {
                    who: Some((user, Some(&layer.name))),
                    bounds,
                };
            }
        }
        Decision { who: None, bounds }
    }
}

impl Layer {
    fn compile(c: &LayerConfig, tz: &TimeZone) -> Result<Layer, String> {
        if c.name.trim().is_empty() {
            return Err("name is empty; name the layer (e.g. weekly, weekend-cover)".to_string());
        }
        if c.participants.is_empty() {
            return Err("participants is empty; list at least one user".to_string());
        }
        if let Some(i) = c.participants.iter().position(|p| p.trim().is_empty()) {
            return Err(format!("participants[{i}] is empty; name a user"));
        }
        let handoff = parse_hhmm(&c.handoff)
            .filter(|&s| s < SECS_PER_DAY)
            .map(secs_to_time)
            .ok_or_else(|| {
                format!(
                    "handoff {:?} is not a time HH:MM from 00:00 to 23:59 (default {DEFAULT_HANDOFF})",
                    c.handoff
                )
            })?;
        let len = c.rotation.length();
        if len.is_zero() {
            return Err(format!(
                "rotation {} is zero-length; write daily, weekly, or a duration like 12h",
                c.rotation
            ));
        }
        if len < MIN_ROTATION {
            return Err(format!(
                "rotation {} is shorter than the minimum of 1h; did you mean hours (h)?",
                c.rotation
            ));
        }
        let day = Duration::from_secs(SECS_PER_DAY.into());
        let rotation = if len.as_nanos().is_multiple_of(day.as_nanos()) {
            CompiledRotation::Calendar {
                start: c.start,
                days: (len.as_secs() / day.as_secs()) as i64,
                handoff,
            }
        } else {
            let anchor = resolve(tz, c.start, handoff)
                .ok_or_else(|| format!("start {} is out of range", c.start))?;
            CompiledRotation::Absolute {
                anchor,
                len: len.as_nanos() as i128,
            }
        };
        let restrict = c
            .restrict
            .as_ref()
            .map(|r| WeeklyWindow::new(&r.weekdays, &r.start, &r.end, tz.clone()))
            .transpose()
            .map_err(|e| format!("restrict: {e}"))?
            .filter(|w| !w.always());
        Ok(Layer {
            name: c.name.clone(),
            participants: c.participants.clone(),
            rotation,
            restrict,
        })
    }

    /// Who this layer has on call at `at` (`None` outside its restriction
    /// window), and the interval around `at` over which that holds.
    fn at(&self, tz: &TimeZone, at: Timestamp) -> (Option<&str>, Timestamp, Timestamp) {
        let mut bounds = Bounds::ALL;
        if let Some(w) = &self.restrict {
            let (inside, start, end) = w.state(at);
            if !inside {
                return (None, start, end);
            }
            bounds.clip(start, end);
        }
        let (k, start, end) = self.rotation.shift_at(tz, at);
        bounds.clip(start, end);
        let n = self.participants.len() as i64;
        let user = &self.participants[k.rem_euclid(n) as usize];
        (Some(user), bounds.start, bounds.end)
    }
}

impl CompiledRotation {
    /// The index of the shift containing `at` (negative before the first
    /// one) and its `[start, end)`.
    fn shift_at(&self, tz: &TimeZone, at: Timestamp) -> (i64, Timestamp, Timestamp) {
        match *self {
            CompiledRotation::Absolute { anchor, len } => {
                let base = anchor.as_nanosecond();
                let k = (at.as_nanosecond() - base).div_euclid(len);
                let start = from_nanos(base + k * len);
                let end = from_nanos(base + (k + 1) * len);
                // |k| <= 20_000 years / 1h, far inside i64.
                (k as i64, start, end)
            }
            CompiledRotation::Calendar {
                start: first,
                days,
                handoff,
            } => {
                let shift_start = |k: i64| calendar_start(tz, first, days, handoff, k);
                let local = tz.to_datetime(at).date();
                let elapsed = local.duration_since(first).as_secs() / i64::from(SECS_PER_DAY);
                // A first guess from the local date; it is one shift too far
                // when `at` is before the handoff time that day, and DST gaps
                // (Samoa skipped a whole day in 2011) can move handoffs across
                // dates, so step until the shift really contains `at`.
                let mut k = elapsed.div_euclid(days);
                let mut start = shift_start(k);
                while at < start && start > Timestamp::MIN {
                    k -= 1;
                    start = shift_start(k);
                }
                let mut end = shift_start(k + 1);
                while at >= end && end < Timestamp::MAX {
                    k += 1;
                    start = end;
                    end = shift_start(k + 1);
                }
                (k, start, end)
            }
        }
    }
}

/// When calendar shift `k` begins: local date `first + k * days` at
/// `handoff`, saturating at the ends of time.
fn calendar_start(tz: &TimeZone, first: Date, days: i64, handoff: Time, k: i64) -> Timestamp {
    k.checked_mul(days)
        .and_then(|d| Span::new().try_days(d).ok())
        .and_then(|span| first.checked_add(span).ok())
        .and_then(|date| resolve(tz, date, handoff))
        .unwrap_or(if k < 0 {
            Timestamp::MIN
        } else {
            Timestamp::MAX
        })
}

/// Saturates at the ends of jiff's range instead of failing.
fn from_nanos(n: i128) -> Timestamp {
    Timestamp::from_nanosecond(n).unwrap_or(if n < 0 {
        Timestamp::MIN
    } else {
        Timestamp::MAX
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    /// Compiles one schedule written as it appears under `schedules:`.
    fn schedule(yaml: &str) -> Schedule {
        let config: ScheduleConfig = serde_yaml_ng::from_str(yaml).unwrap();
        Schedule::new(&config).unwrap()
    }

    /// `"user (layer) start..end"`, `override` for the layer of an
    /// override, or `"nobody"`.
    fn describe(on_call: Option<OnCall>) -> String {
        match on_call {
            None => "nobody".to_string(),
            Some(o) => format!(
                "{} ({}) {}..{}",
                o.user,
                o.layer.as_deref().unwrap_or("override"),
                o.shift_start,
                o.shift_end
            ),
        }
    }

    /// Who is on call at each UTC instant; the comment on each case gives
    /// the local wall-clock time.
    fn check(s: &Schedule, at: &str, expected: &str) {
        assert_eq!(describe(s.on_call(ts(at))), expected, "at {at}");
    }

    /// Real length of the shift that decides at `at`.
    fn real_hours(s: &Schedule, at: &str) -> f64 {
        let o = s.on_call(ts(at)).unwrap();
        o.shift_end.duration_since(o.shift_start).as_secs_f64() / 3600.0
    }

    const BERLIN_DAILY: &str = "
name: primary
timezone: Europe/Berlin
layers:
  - name: daily
    participants: [alice, bob, carol]
    rotation: daily
    handoff: '09:00'
    start: 2026-01-05
";

    #[test]
    fn daily_rotation_across_berlin_spring_forward() {
        // 2026-03-29: 02:00 CET (01:00Z) jumps to 03:00 CEST. Shift k starts
        // on 2026-01-05 + k days; 2026-03-28 is day 82 (82 mod 3 = 1, bob).
        let s = schedule(BERLIN_DAILY);
        check(
            &s,
            "2026-03-28T07:59:59Z", // Sat 08:59:59 CET
            "alice (daily) 2026-03-27T08:00:00Z..2026-03-28T08:00:00Z",
        );
        check(
            &s,
            "2026-03-28T08:00:00Z", // Sat 09:00 CET
            "bob (daily) 2026-03-28T08:00:00Z..2026-03-29T07:00:00Z",
        );
        check(
            &s,
            "2026-03-29T06:59:59Z", // Sun 08:59:59 CEST
            "bob (daily) 2026-03-28T08:00:00Z..2026-03-29T07:00:00Z",
        );
        check(
            &s,
            "2026-03-29T07:00:00Z", // Sun 09:00 CEST
            "carol (daily) 2026-03-29T07:00:00Z..2026-03-30T07:00:00Z",
        );
        // 08:00Z was the handoff in winter; now it is 10:00 on the wall.
        check(
            &s,
            "2026-03-29T08:00:00Z", // Sun 10:00 CEST
            "carol (daily) 2026-03-29T07:00:00Z..2026-03-30T07:00:00Z",
        );
        check(
            &s,
            "2026-03-30T06:59:59Z", // Mon 08:59:59 CEST
            "carol (daily) 2026-03-29T07:00:00Z..2026-03-30T07:00:00Z",
        );
        check(
            &s,
            "2026-03-30T07:00:00Z", // Mon 09:00 CEST
            "alice (daily) 2026-03-30T07:00:00Z..2026-03-31T07:00:00Z",
        );
        assert_eq!(real_hours(&s, "2026-03-28T12:00:00Z"), 23.0);
        assert_eq!(real_hours(&s, "2026-03-29T12:00:00Z"), 24.0);
    }

    #[test]
    fn daily_rotation_across_berlin_fall_back() {
        // 2026-10-25: 03:00 CEST (01:00Z) falls back to 02:00 CET.
        // 2026-10-24 is day 292 (292 mod 3 = 1, bob).
        let s = schedule(BERLIN_DAILY);
        check(
            &s,
            "2026-10-24T06:59:59Z", // Sat 08:59:59 CEST
            "alice (daily) 2026-10-23T07:00:00Z..2026-10-24T07:00:00Z",
        );
        check(
            &s,
            "2026-10-24T07:00:00Z", // Sat 09:00 CEST
            "bob (daily) 2026-10-24T07:00:00Z..2026-10-25T08:00:00Z",
        );
        // 07:00Z was the handoff in summer; now it is 08:00 on the wall.
        check(
            &s,
            "2026-10-25T07:00:00Z", // Sun 08:00 CET
            "bob (daily) 2026-10-24T07:00:00Z..2026-10-25T08:00:00Z",
        );
        check(
            &s,
            "2026-10-25T07:59:59Z", // Sun 08:59:59 CET
            "bob (daily) 2026-10-24T07:00:00Z..2026-10-25T08:00:00Z",
        );
        check(
            &s,
            "2026-10-25T08:00:00Z", // Sun 09:00 CET
            "carol (daily) 2026-10-25T08:00:00Z..2026-10-26T08:00:00Z",
        );
        check(
            &s,
            "2026-10-26T08:00:00Z", // Mon 09:00 CET
            "alice (daily) 2026-10-26T08:00:00Z..2026-10-27T08:00:00Z",
        );
        assert_eq!(real_hours(&s, "2026-10-24T12:00:00Z"), 25.0);
        assert_eq!(real_hours(&s, "2026-10-25T12:00:00Z"), 24.0);
    }

    #[test]
    fn rotation_extends_before_start() {
        // Shift -1 belongs to the last participant, shift -5 to
        // participants[-5 mod 3 = 1].
        let s = schedule(BERLIN_DAILY);
        check(
            &s,
            "2026-01-05T07:59:59Z", // Mon 08:59:59 CET, the first shift's day
            "carol (daily) 2026-01-04T08:00:00Z..2026-01-05T08:00:00Z",
        );
        check(
            &s,
            "2026-01-05T08:00:00Z", // Mon 09:00 CET: the first shift
            "alice (daily) 2026-01-05T08:00:00Z..2026-01-06T08:00:00Z",
        );
        check(
            &s,
            "2025-12-31T12:00:00Z",
            "bob (daily) 2025-12-31T08:00:00Z..2026-01-01T08:00:00Z",
        );
    }

    #[test]
    fn weekly_rotation_wraps_around() {
        // 2026-01-05 is a Monday: handoffs are Mondays 09:00 Berlin.
        let s = schedule(
            "
name: primary
timezone: Europe/Berlin
layers:
  - name: weekly
    participants: [alice, bob, carol]
    rotation: weekly
    start: 2026-01-05     # handoff defaults to 09:00
",
        );
        let cases = [
            (
                "2026-01-05T07:59:59Z", // Mon 08:59:59 CET: week -1
                "carol (weekly) 2025-12-29T08:00:00Z..2026-01-05T08:00:00Z",
            ),
            (
                "2026-01-05T08:00:00Z",
                "alice (weekly) 2026-01-05T08:00:00Z..2026-01-12T08:00:00Z",
            ),
            (
                "2026-01-11T12:00:00Z", // Sunday
                "alice (weekly) 2026-01-05T08:00:00Z..2026-01-12T08:00:00Z",
            ),
            (
                "2026-01-12T07:59:59Z",
                "alice (weekly) 2026-01-05T08:00:00Z..2026-01-12T08:00:00Z",
            ),
            (
                "2026-01-12T08:00:00Z",
                "bob (weekly) 2026-01-12T08:00:00Z..2026-01-19T08:00:00Z",
            ),
            (
                "2026-01-19T08:00:00Z",
                "carol (weekly) 2026-01-19T08:00:00Z..2026-01-26T08:00:00Z",
            ),
            (
                "2026-01-26T08:00:00Z", // week 3: back to the first
                "alice (weekly) 2026-01-26T08:00:00Z..2026-02-02T08:00:00Z",
            ),
            (
                "2026-02-02T08:00:00Z",
                "bob (weekly) 2026-02-02T08:00:00Z..2026-02-09T08:00:00Z",
            ),
            (
                // Week 11 (11 mod 3 = 2) contains the spring change: 167h.
                "2026-03-29T12:00:00Z",
                "carol (weekly) 2026-03-23T08:00:00Z..2026-03-30T07:00:00Z",
            ),
            (
                // Week 3861, computed from the anchor, not by iterating.
                "2100-01-04T08:00:00Z",
                "alice (weekly) 2100-01-04T08:00:00Z..2100-01-11T08:00:00Z",
            ),
        ];
        for (at, expected) in cases {
            check(&s, at, expected);
        }
        assert_eq!(real_hours(&s, "2026-03-29T12:00:00Z"), 167.0);
    }

    #[test]
    fn hourly_rotation_runs_in_absolute_time() {
        // The first handoff is 2026-03-28 08:00 CET = 07:00Z; every 12 real
        // hours after that, so after the spring change the handoffs read
        // 09:00 and 21:00 on the wall.
        let s = schedule(
            "
name: follow-the-sun
timezone: Europe/Berlin
layers:
  - name: halves
    participants: [alice, bob]
    rotation: 12h
    handoff: '08:00'
    start: 2026-03-28
",
        );
        let cases = [
            (
                "2026-03-28T06:59:59Z", // before the first shift: bob's, extended back
                "bob (halves) 2026-03-27T19:00:00Z..2026-03-28T07:00:00Z",
            ),
            (
                "2026-03-28T07:00:00Z", // Sat 08:00 CET
                "alice (halves) 2026-03-28T07:00:00Z..2026-03-28T19:00:00Z",
            ),
            (
                "2026-03-28T19:00:00Z", // Sat 20:00 CET; the shift spans the change
                "bob (halves) 2026-03-28T19:00:00Z..2026-03-29T07:00:00Z",
            ),
            (
                "2026-03-29T06:00:00Z", // Sun 08:00 CEST: no handoff now
                "bob (halves) 2026-03-28T19:00:00Z..2026-03-29T07:00:00Z",
            ),
            (
                "2026-03-29T07:00:00Z", // Sun 09:00 CEST
                "alice (halves) 2026-03-29T07:00:00Z..2026-03-29T19:00:00Z",
            ),
            (
                // 65 days later: shift 130.
                "2026-06-01T07:00:00Z",
                "alice (halves) 2026-06-01T07:00:00Z..2026-06-01T19:00:00Z",
            ),
        ];
        for (at, expected) in cases {
            check(&s, at, expected);
        }
        assert_eq!(real_hours(&s, "2026-03-29T00:00:00Z"), 12.0);
    }

    #[test]
    fn rotations_of_whole_days_follow_the_calendar() {
        // 24h is a whole day, so it hands off at 09:00 on the wall like
        // `daily`; 36h is not, so it runs in absolute time.
        let layer = |rotation: &str| {
            schedule(&format!(
                "
name: s
timezone: Europe/Berlin
layers:
  - name: l
    participants: [alice, bob]
    rotation: {rotation}
    start: 2026-03-27
"
            ))
        };
        let at = "2026-03-29T12:00:00Z";
        check(
            &layer("24h"),
            at,
            "alice (l) 2026-03-29T07:00:00Z..2026-03-30T07:00:00Z",
        );
        check(
            &layer("1d"),
            at,
            "alice (l) 2026-03-29T07:00:00Z..2026-03-30T07:00:00Z",
        );
        check(
            &layer("2d"),
            at,
            "bob (l) 2026-03-29T07:00:00Z..2026-03-31T07:00:00Z",
        );
        // 2026-03-27 09:00 CET = 08:00Z, + 36h = 2026-03-28T20:00Z.
        check(
            &layer("36h"),
            at,
            "bob (l) 2026-03-28T20:00:00Z..2026-03-30T08:00:00Z",
        );
    }

    #[test]
    fn new_york_daily_rotation() {
        // 2026-03-08: 02:00 EST (07:00Z) jumps to 03:00 EDT.
        // 2026-11-01: 02:00 EDT (06:00Z) falls back to 01:00 EST.
        // 2026-03-07 is day 61 after 2026-01-05 (bob), 2026-10-31 day 299
        // (carol).
        let s = schedule(
            "
name: us
timezone: America/New_York
layers:
  - name: daily
    participants: [alice, bob, carol]
    rotation: daily
    start: 2026-01-05
",
        );
        let cases = [
            (
                "2026-03-07T14:00:00Z", // Sat 09:00 EST
                "bob (daily) 2026-03-07T14:00:00Z..2026-03-08T13:00:00Z",
            ),
            (
                "2026-03-08T12:59:59Z", // Sun 08:59:59 EDT
                "bob (daily) 2026-03-07T14:00:00Z..2026-03-08T13:00:00Z",
            ),
            (
                "2026-03-08T13:00:00Z", // Sun 09:00 EDT
                "carol (daily) 2026-03-08T13:00:00Z..2026-03-09T13:00:00Z",
            ),
            (
                "2026-10-31T13:00:00Z", // Sat 09:00 EDT
                "carol (daily) 2026-10-31T13:00:00Z..2026-11-01T14:00:00Z",
            ),
            (
                "2026-11-01T13:59:59Z", // Sun 08:59:59 EST
                "carol (daily) 2026-10-31T13:00:00Z..2026-11-01T14:00:00Z",
            ),
            (
                "2026-11-01T14:00:00Z", // Sun 09:00 EST
                "alice (daily) 2026-11-01T14:00:00Z..2026-11-02T14:00:00Z",
            ),
        ];
        for (at, expected) in cases {
            check(&s, at, expected);
        }
        assert_eq!(real_hours(&s, "2026-03-07T20:00:00Z"), 23.0);
        assert_eq!(real_hours(&s, "2026-10-31T20:00:00Z"), 25.0);
    }

    #[test]
    fn handoff_in_a_dst_gap_or_fold() {
        let daily_at = |handoff: &str, start: &str| {
            schedule(&format!(
                "
name: us
timezone: America/New_York
layers:
  - name: daily
    participants: [alice, bob]
    rotation: daily
    handoff: '{handoff}'
    start: {start}
"
            ))
        };
        // 02:30 does not exist on 2026-03-08: it moves forward by the gap
        // to 03:30 EDT (07:30Z), the same instant as the day before.
        let s = daily_at("02:30", "2026-03-07");
        check(
            &s,
            "2026-03-07T07:30:00Z", // Sat 02:30 EST
            "alice (daily) 2026-03-07T07:30:00Z..2026-03-08T07:30:00Z",
        );
        check(
            &s,
            "2026-03-08T07:30:00Z", // Sun 03:30 EDT
            "bob (daily) 2026-03-08T07:30:00Z..2026-03-09T06:30:00Z",
        );
        // 01:30 happens twice on 2026-11-01: the first one (EDT) counts.
        let s = daily_at("01:30", "2026-10-31");
        check(
            &s,
            "2026-11-01T05:30:00Z", // Sun 01:30 EDT
            "bob (daily) 2026-11-01T05:30:00Z..2026-11-02T06:30:00Z",
        );
        check(
            &s,
            "2026-11-01T06:30:00Z", // Sun 01:30 EST, the second time
            "bob (daily) 2026-11-01T05:30:00Z..2026-11-02T06:30:00Z",
        );
    }

    #[test]
    fn a_skipped_calendar_day_has_no_shift() {
        // Samoa skipped 2011-12-30 (UTC-10 to UTC+14). Its 09:00 handoff
        // moves forward by the 24h gap onto 12-31 09:00, so carol's shift is
        // empty and bob hands straight to alice.
        let s = schedule(
            "
name: apia
timezone: Pacific/Apia
layers:
  - name: daily
    participants: [alice, bob, carol]
    rotation: daily
    start: 2011-12-28
",
        );
        check(
            &s,
            "2011-12-30T18:59:59Z", // Thu 12-29 08:59:59 -10
            "bob (daily) 2011-12-29T19:00:00Z..2011-12-30T19:00:00Z",
        );
        check(
            &s,
            "2011-12-30T19:00:00Z", // Sat 12-31 09:00 +14
            "alice (daily) 2011-12-30T19:00:00Z..2011-12-31T19:00:00Z",
        );
        let got = s.shifts(ts("2011-12-28T00:00:00Z"), ts("2012-01-02T00:00:00Z"));
        assert!(got.iter().all(|sh| sh.start < sh.end), "{got:?}");
        assert!(got.windows(2).all(|w| w[0].end == w[1].start));
    }

    /// A 24/7 weekly layer under a business-hours layer, both handing off
    /// Mondays 09:00 Berlin. In the week from 2026-06-01 (week 21, CEST,
    /// UTC+2) bob has the 24/7 layer and dave business hours, 07:00Z–15:00Z.
    const TWO_LAYERS: &str = "
name: primary
timezone: Europe/Berlin
layers:
  - name: around-the-clock
    participants: [alice, bob]
    rotation: weekly
    start: 2026-01-05
  - name: business-hours
    participants: [carol, dave]
    rotation: weekly
    start: 2026-01-05
    restrict:
      weekdays: [mon, tue, wed, thu, fri]
      start: '09:00'
      end: '17:00'
";

    #[test]
    fn upper_layer_wins_inside_its_window() {
        let s = schedule(TWO_LAYERS);
        let cases = [
            (
                // Before Monday's handoff: last week's 24/7 shift, since the
                // business-hours window closed on Friday.
                "2026-06-01T06:59:59Z", // Mon 08:59:59
                "alice (around-the-clock) 2026-05-29T15:00:00Z..2026-06-01T07:00:00Z",
            ),
            (
                "2026-06-01T07:00:00Z", // Mon 09:00
                "dave (business-hours) 2026-06-01T07:00:00Z..2026-06-01T15:00:00Z",
            ),
            (
                "2026-06-01T14:59:59Z", // Mon 16:59:59
                "dave (business-hours) 2026-06-01T07:00:00Z..2026-06-01T15:00:00Z",
            ),
            (
                // Night: the 24/7 layer, until business hours resume.
                "2026-06-01T15:00:00Z", // Mon 17:00
                "bob (around-the-clock) 2026-06-01T15:00:00Z..2026-06-02T07:00:00Z",
            ),
            (
                "2026-06-05T12:00:00Z", // Fri 14:00
                "dave (business-hours) 2026-06-05T07:00:00Z..2026-06-05T15:00:00Z",
            ),
            (
                // Weekend: until both layers hand off on Monday.
                "2026-06-06T10:00:00Z", // Sat 12:00
                "bob (around-the-clock) 2026-06-05T15:00:00Z..2026-06-08T07:00:00Z",
            ),
            (
                "2026-06-08T07:00:00Z", // Mon 09:00, week 22
                "carol (business-hours) 2026-06-08T07:00:00Z..2026-06-08T15:00:00Z",
            ),
        ];
        for (at, expected) in cases {
            check(&s, at, expected);
        }
    }

    #[test]
    fn overrides_beat_layers() {
        let s = schedule(&format!(
            "{TWO_LAYERS}
overrides:
  - user: erin
    start: 2026-06-02T12:00:00+02:00
    end: 2026-06-02T14:00:00+02:00
  - user: frank   # from business hours into the night
    start: 2026-06-02T14:00:00Z
    end: 2026-06-02T16:00:00Z
"
        ));
        let cases = [
            (
                // Before: dave's business hours end where erin starts.
                "2026-06-02T09:59:59Z", // Tue 11:59:59
                "dave (business-hours) 2026-06-02T07:00:00Z..2026-06-02T10:00:00Z",
            ),
            (
                "2026-06-02T10:00:00Z",
                "erin (override) 2026-06-02T10:00:00Z..2026-06-02T12:00:00Z",
            ),
            (
                "2026-06-02T11:59:59Z",
                "erin (override) 2026-06-02T10:00:00Z..2026-06-02T12:00:00Z",
            ),
            (
                // After: dave again, until frank.
                "2026-06-02T12:00:00Z",
                "dave (business-hours) 2026-06-02T12:00:00Z..2026-06-02T14:00:00Z",
            ),
            (
                "2026-06-02T15:30:00Z", // Tue 17:30, past business hours
                "frank (override) 2026-06-02T14:00:00Z..2026-06-02T16:00:00Z",
            ),
            (
                "2026-06-02T16:00:00Z",
                "bob (around-the-clock) 2026-06-02T16:00:00Z..2026-06-03T07:00:00Z",
            ),
        ];
        for (at, expected) in cases {
            check(&s, at, expected);
        }
    }

    #[test]
    fn override_in_the_middle_of_a_weekly_shift() {
        // The override from the documentation, across the spring change:
        // 2026-03-28 20:00 CET to 2026-03-29 08:00 CEST = 19:00Z to 06:00Z.
        let s = schedule(
            "
name: primary
timezone: Europe/Berlin
layers:
  - name: weekly
    participants: [alice, bob, carol]
    rotation: weekly
    start: 2026-01-05
overrides:
  - user: dave
    start: 2026-03-28T20:00:00+01:00
    end: 2026-03-29T08:00:00+02:00
",
        );
        check(
            &s,
            "2026-03-28T18:59:59Z",
            "carol (weekly) 2026-03-23T08:00:00Z..2026-03-28T19:00:00Z",
        );
        check(
            &s,
            "2026-03-29T00:00:00Z",
            "dave (override) 2026-03-28T19:00:00Z..2026-03-29T06:00:00Z",
        );
        check(
            &s,
            "2026-03-29T06:00:00Z",
            "carol (weekly) 2026-03-29T06:00:00Z..2026-03-30T07:00:00Z",
        );
    }

    #[test]
    fn overlapping_overrides_last_listed_wins() {
        let with = |overrides: &str| {
            schedule(&format!(
                "
name: s
timezone: UTC
layers:
  - {{name: l, participants: [alice], rotation: weekly, start: 2026-06-01}}
overrides:
{overrides}"
            ))
        };
        let erin = "  - {user: erin, start: 2026-06-02T10:00:00Z, end: 2026-06-02T12:00:00Z}\n";
        let grace = "  - {user: grace, start: 2026-06-02T11:00:00Z, end: 2026-06-02T13:00:00Z}\n";

        let s = with(&format!("{erin}{grace}"));
        check(
            &s,
            "2026-06-02T10:30:00Z",
            "erin (override) 2026-06-02T10:00:00Z..2026-06-02T11:00:00Z",
        );
        check(
            &s,
            "2026-06-02T11:30:00Z",
            "grace (override) 2026-06-02T11:00:00Z..2026-06-02T13:00:00Z",
        );

        let s = with(&format!("{grace}{erin}"));
        check(
            &s,
            "2026-06-02T11:30:00Z",
            "erin (override) 2026-06-02T10:00:00Z..2026-06-02T12:00:00Z",
        );
        check(
            &s,
            "2026-06-02T12:30:00Z",
            "grace (override) 2026-06-02T12:00:00Z..2026-06-02T13:00:00Z",
        );
        check(
            &s,
            "2026-06-02T13:00:00Z",
            "alice (l) 2026-06-02T13:00:00Z..2026-06-08T09:00:00Z",
        );
    }

    #[test]
    fn nobody_on_call() {
        let empty = schedule("{name: empty, timezone: UTC}");
        check(&empty, "2026-06-01T12:00:00Z", "nobody");
        assert_eq!(
            empty.shifts(ts("2026-06-01T00:00:00Z"), ts("2026-06-08T00:00:00Z")),
            []
        );

        // Only a weekend layer: weekdays have nobody.
        let weekend = "
name: weekend
timezone: Europe/Berlin
layers:
  - name: weekend-cover
    participants: [xavier, yvonne]
    rotation: weekly
    start: 2026-01-05
    restrict:
      weekdays: [sat, sun]     # whole days by default
";
        let s = schedule(weekend);
        check(&s, "2026-06-03T12:00:00Z", "nobody"); // Wed
        check(
            &s,
            "2026-06-06T12:00:00Z", // Sat: Sat 00:00 to Mon 00:00 CEST, one stretch
            "yvonne (weekend-cover) 2026-06-05T22:00:00Z..2026-06-07T22:00:00Z",
        );
        check(&s, "2026-06-07T22:00:00Z", "nobody"); // Mon 00:00

        // Under it, a 24/7 layer covers the weekdays.
        let s = schedule(&format!(
            "{weekend}
  - name: restricted-to-nothing-that-matters
    participants: [zoe]
    rotation: daily
    start: 2026-01-05
    restrict: {{weekdays: [sun], start: '03:00', end: '04:00'}}
"
        ));
        check(&s, "2026-06-03T12:00:00Z", "nobody");
        let s = schedule(&weekend.replace(
            "layers:\n",
            "layers:\n  - {name: base, participants: [alice], rotation: weekly, start: 2026-01-05}\n",
        ));
        check(
            &s,
            "2026-06-03T12:00:00Z",
            "alice (base) 2026-06-01T07:00:00Z..2026-06-05T22:00:00Z",
        );
    }

    #[test]
    fn night_window_across_fall_back() {
        // 22:00–06:00 crosses midnight; the night of Sat 2026-10-24 runs
        // from 22:00 CEST (20:00Z) to 06:00 CET (05:00Z): 9 real hours.
        let s = schedule(
            "
name: nights
timezone: Europe/Berlin
layers:
  - name: night
    participants: [owl]
    rotation: weekly
    handoff: '12:00'
    start: 2026-10-19
    restrict: {start: '22:00', end: '06:00'}
",
        );
        check(&s, "2026-10-24T19:59:59Z", "nobody"); // Sat 21:59:59 CEST
        check(
            &s,
            "2026-10-24T20:00:00Z", // Sat 22:00 CEST
            "owl (night) 2026-10-24T20:00:00Z..2026-10-25T05:00:00Z",
        );
        check(
            &s,
            "2026-10-25T04:59:59Z", // Sun 05:59:59 CET
            "owl (night) 2026-10-24T20:00:00Z..2026-10-25T05:00:00Z",
        );
        check(&s, "2026-10-25T05:00:00Z", "nobody"); // Sun 06:00 CET
    }

    fn shift(user: &str, start: &str, end: &str) -> Shift {
        Shift {
            user: user.into(),
            start: ts(start),
            end: ts(end),
        }
    }

    #[test]
    fn shifts_merge_and_honour_overrides() {
        let s = schedule(&format!(
            "{TWO_LAYERS}
overrides:
  - {{user: bob, start: 2026-06-01T13:00:00Z, end: 2026-06-01T15:00:00Z}}  # then bob's night
  - {{user: erin, start: 2026-06-02T10:00:00Z, end: 2026-06-02T12:00:00Z}}
"
        ));
        let (from, to) = ("2026-06-01T00:00:00Z", "2026-06-08T00:00:00Z");
        let expected = [
            shift("alice", from, "2026-06-01T07:00:00Z"),
            shift("dave", "2026-06-01T07:00:00Z", "2026-06-01T13:00:00Z"),
            // The override and the night after it: one shift.
            shift("bob", "2026-06-01T13:00:00Z", "2026-06-02T07:00:00Z"),
            shift("dave", "2026-06-02T07:00:00Z", "2026-06-02T10:00:00Z"),
            shift("erin", "2026-06-02T10:00:00Z", "2026-06-02T12:00:00Z"),
            shift("dave", "2026-06-02T12:00:00Z", "2026-06-02T15:00:00Z"),
            shift("bob", "2026-06-02T15:00:00Z", "2026-06-03T07:00:00Z"),
            shift("dave", "2026-06-03T07:00:00Z", "2026-06-03T15:00:00Z"),
            shift("bob", "2026-06-03T15:00:00Z", "2026-06-04T07:00:00Z"),
            shift("dave", "2026-06-04T07:00:00Z", "2026-06-04T15:00:00Z"),
            shift("bob", "2026-06-04T15:00:00Z", "2026-06-05T07:00:00Z"),
            shift("dave", "2026-06-05T07:00:00Z", "2026-06-05T15:00:00Z"),
            // Friday night through the weekend, cut at `to`.
            shift("bob", "2026-06-05T15:00:00Z", to),
        ];
        let got = s.shifts(ts(from), ts(to));
        assert_eq!(got, expected);
        // The timeline agrees with `on_call` at both ends of every shift.
        for sh in &got {
            let last = sh
                .end
                .checked_sub(jiff::SignedDuration::from_nanos(1))
                .unwrap();
            for at in [sh.start, last] {
                assert_eq!(s.on_call(at).unwrap().user, sh.user, "at {at}");
            }
        }
        assert_eq!(s.shifts(ts(to), ts(from)), []);
    }

    #[test]
    fn shifts_skip_gaps_and_stop_at_the_cap() {
        let s = schedule(
            "
name: s
timezone: Europe/Berlin
layers:
  - name: business-hours
    participants: [carol, dave]
    rotation: daily
    start: 2026-06-01
    restrict: {weekdays: [mon, fri], start: '09:00', end: '17:00'}
",
        );
        assert_eq!(
            s.shifts(ts("2026-06-01T00:00:00Z"), ts("2026-06-08T00:00:00Z")),
            [
                shift("carol", "2026-06-01T07:00:00Z", "2026-06-01T15:00:00Z"),
                shift("carol", "2026-06-05T07:00:00Z", "2026-06-05T15:00:00Z"),
            ]
        );
        // 100 years of daily alternating shifts: cut at MAX_SHIFTS.
        let s = schedule(BERLIN_DAILY);
        let got = s.shifts(ts("2026-01-01T00:00:00Z"), ts("2126-01-01T00:00:00Z"));
        assert_eq!(got.len(), MAX_SHIFTS);
        assert!(got.windows(2).all(|w| w[0].end == w[1].start));
    }

    #[test]
    fn name_and_participants() {
        let s = schedule(&format!(
            "{TWO_LAYERS}
overrides:
  - {{user: erin, start: 2026-06-02T10:00:00Z, end: 2026-06-02T12:00:00Z}}
  - {{user: alice, start: 2026-06-03T10:00:00Z, end: 2026-06-03T12:00:00Z}}
"
        ));
        assert_eq!(s.name(), "primary");
        assert_eq!(
            s.participants().into_iter().collect::<Vec<_>>(),
            ["alice", "bob", "carol", "dave", "erin"]
        );
    }

    /// Compiling the YAML schedule fails with an error containing `expected`.
    fn check_invalid(yaml: &str, expected: &str) {
        let config: ScheduleConfig = serde_yaml_ng::from_str(yaml).unwrap();
        let err = Schedule::new(&config).unwrap_err();
        assert!(err.contains(expected), "{yaml}\n{err:?} lacks {expected:?}");
    }

    #[test]
    fn invalid_schedules() {
        let layer = |extra: &str| {
            format!(
                "
name: primary
timezone: Europe/Berlin
layers:
  - name: weekly
    participants: [alice]
    rotation: weekly
    start: 2026-01-05
    {extra}
"
            )
        };
        check_invalid(
            "{name: primary, timezone: Europe/Berln}",
            r#"schedule "primary": timezone "Europe/Berln" is not a known IANA time zone; did you mean "Europe/Berlin"?"#,
        );
        check_invalid(
            "{name: primary, timezone: america/new_yrok}",
            r#"did you mean "America/New_York"?"#,
        );
        check_invalid(
            "{name: primary, timezone: Mars/Olympus_Mons}",
            r#"timezone "Mars/Olympus_Mons" is not a known IANA time zone; write one like Europe/Berlin"#,
        );
        check_invalid("{name: ' ', timezone: UTC}", "a schedule has an empty name");
        check_invalid(
            &layer("").replace("[alice]", "[]"),
            r#"schedule "primary", layer "weekly": participants is empty; list at least one user"#,
        );
        check_invalid(
            &layer("").replace("[alice]", "[alice, '']"),
            r#"layer "weekly": participants[1] is empty"#,
        );
        check_invalid(
            &layer("handoff: '25:00'"),
            r#"schedule "primary", layer "weekly": handoff "25:00" is not a time HH:MM from 00:00 to 23:59"#,
        );
        check_invalid(&layer("handoff: '24:00'"), r#"handoff "24:00""#);
        check_invalid(&layer("handoff: '9:00'"), r#"handoff "9:00""#);
        check_invalid(
            &layer("").replace("weekly\n    start", "0\n    start"),
            r#"layer "weekly": rotation 0 is zero-length"#,
        );
        check_invalid(
            &layer("").replace("weekly\n    start", "12m\n    start"),
            "rotation 12m is shorter than the minimum of 1h; did you mean hours (h)?",
        );
        check_invalid(
            &layer("restrict: {weekdays: [funday]}"),
            r#"layer "weekly": restrict: weekday "funday" is not one of mon"#,
        );
        check_invalid(
            &layer("restrict: {start: '09:00', end: '25:00'}"),
            r#"restrict: end "25:00" is not a time HH:MM"#,
        );
        check_invalid(
            &layer("restrict: {start: '24:00'}"),
            r#"restrict: start "24:00""#,
        );
        check_invalid(
            &layer("").replace("- name: weekly", "- name: ''"),
            r#"schedule "primary", layers[0]: name is empty"#,
        );
        check_invalid(
            &format!(
                "{}  - {{name: weekly, participants: [bob], rotation: daily, start: 2026-01-05}}\n",
                layer("")
            ),
            r#"schedule "primary": two layers are named "weekly""#,
        );
        let with_override = |user: &str, start: &str, end: &str| {
            format!(
                "{}overrides:\n  - {{user: '{user}', start: {start}, end: {end}}}\n",
                layer("")
            )
        };
        check_invalid(
            &with_override(
                "dave",
                "2026-03-29T08:00:00+02:00",
                "2026-03-29T07:00:00+01:00", // the same instant
            ),
            r#"schedule "primary", overrides[0] (dave): end 2026-03-29T06:00:00Z must be after start 2026-03-29T06:00:00Z"#,
        );
        check_invalid(
            &with_override("dave", "2026-03-29T08:00:00Z", "2026-03-28T08:00:00Z"),
            "must be after start",
        );
        check_invalid(
            &with_override("", "2026-03-28T08:00:00Z", "2026-03-29T08:00:00Z"),
            r#"schedule "primary", overrides[0]: user is empty"#,
        );
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Config {
        schedules: Vec<ScheduleConfig>,
    }

    #[test]
    fn deserialize_documented_shape() {
        let yaml = "
schedules:
  - name: primary
    timezone: Europe/Berlin
    layers:
      - name: weekly
        participants: [alice, bob, carol]
        rotation: weekly
        handoff: 10:30               # unquoted is a string too
        start: 2026-01-05
      - name: business-hours
        participants: [dave]
        rotation: 12h
        start: 2026-01-05
        restrict:
          weekdays: [mon, tue, wed, thu, fri]
          start: '09:00'
          end: '17:00'
      - name: weekend-cover
        participants: [erin]
        rotation: 2w
        start: 2026-01-03
        restrict: {weekdays: [sat, sun]}
    overrides:
      - user: dave
        start: 2026-03-28T20:00:00+01:00
        end: 2026-03-29T08:00:00+02:00
  - name: empty
    timezone: UTC
";
        let config: Config = serde_yaml_ng::from_str(yaml).unwrap();
        let weekly = LayerConfig {
            name: "weekly".into(),
            participants: vec!["alice".into(), "bob".into(), "carol".into()],
            rotation: Rotation::Weekly,
            handoff: "10:30".into(),
            start: jiff::civil::date(2026, 1, 5),
            restrict: None,
        };
        let business = LayerConfig {
            name: "business-hours".into(),
            participants: vec!["dave".into()],
            rotation: Rotation::Every(HumanDuration::secs(12 * 3600)),
            handoff: "09:00".into(),
            start: jiff::civil::date(2026, 1, 5),
            restrict: Some(RestrictConfig {
                weekdays: ["mon", "tue", "wed", "thu", "fri"]
                    .map(String::from)
                    .to_vec(),
                start: "09:00".into(),
                end: "17:00".into(),
            }),
        };
        let weekend = LayerConfig {
            name: "weekend-cover".into(),
            participants: vec!["erin".into()],
            rotation: Rotation::Every(HumanDuration::secs(14 * 86_400)),
            handoff: "09:00".into(),
            start: jiff::civil::date(2026, 1, 3),
            restrict: Some(RestrictConfig {
                weekdays: vec!["sat".into(), "sun".into()],
                start: "00:00".into(),
                end: "24:00".into(),
            }),
        };
        assert_eq!(
            config.schedules,
            [
                ScheduleConfig {
                    name: "primary".into(),
                    timezone: "Europe/Berlin".into(),
                    layers: vec![weekly, business, weekend],
                    overrides: vec![OverrideConfig {
                        user: "dave".into(),
                        start: ts("2026-03-28T19:00:00Z"),
                        end: ts("2026-03-29T06:00:00Z"),
                    }],
                },
                ScheduleConfig {
                    name: "empty".into(),
                    timezone: "UTC".into(),
                    layers: vec![],
                    overrides: vec![],
                },
            ]
        );
        for c in &config.schedules {
            Schedule::new(c).unwrap();
        }
    }

    /// Deserializing fails with an error containing `expected`.
    fn check_yaml_error(yaml: &str, expected: &str) {
        let err = serde_yaml_ng::from_str::<ScheduleConfig>(yaml)
            .unwrap_err()
            .to_string();
        assert!(err.contains(expected), "{yaml}\n{err:?} lacks {expected:?}");
    }

    #[test]
    fn yaml_errors() {
        let layer = |fields: &str| {
            format!(
                "{{name: s, timezone: UTC, layers: [{{name: l, participants: [a], {fields}}}]}}"
            )
        };
        check_yaml_error(
            &layer("rotation: fortnightly, start: 2026-01-05"),
            r#"invalid rotation "fortnightly": write daily, weekly, or a duration like 12h"#,
        );
        check_yaml_error(
            &layer("rotation: 12, start: 2026-01-05"),
            r#"invalid rotation "12""#,
        );
        check_yaml_error(
            &layer("rotation: [daily], start: 2026-01-05"),
            "expected daily, weekly, or a duration like 12h",
        );
        check_yaml_error(&layer("rotation: daily"), "missing field `start`");
        check_yaml_error(
            &layer("rotation: daily, start: 2026-01-05, every: 12h"),
            "unknown field `every`",
        );
        check_yaml_error(&layer("rotation: daily, start: 2026-13-01"), "month");
        check_yaml_error("{name: s}", "missing field `timezone`");
        check_yaml_error(
            "{name: s, timezone: UTC, overrides: [{user: a, start: 2026-01-05, end: 2026-01-06}]}",
            "start",
        );
    }

    #[test]
    fn rotation_strings() {
        let check = |s: &str, expected: Result<Rotation, &str>| {
            let got = s.parse::<Rotation>();
            match expected {
                Ok(r) => {
                    assert_eq!(got, Ok(r), "{s}");
                    assert_eq!(r.to_string().parse::<Rotation>(), Ok(r), "{s}");
                }
                Err(e) => assert!(got.as_ref().unwrap_err().contains(e), "{s}: {got:?}"),
            }
        };
        let every = |secs| Ok(Rotation::Every(HumanDuration::secs(secs)));
        check("daily", Ok(Rotation::Daily));
        check("weekly", Ok(Rotation::Weekly));
        check(" weekly ", Ok(Rotation::Weekly));
        check("12h", every(12 * 3600));
        check("1h30m", every(5400));
        check("3d", every(3 * 86_400));
        check("2w", every(14 * 86_400));
        check("Daily", Err(r#"invalid rotation "Daily""#));
        check("monthly", Err(r#"invalid rotation "monthly""#));
        check("", Err("invalid rotation"));
        assert_eq!(Rotation::Weekly.length(), Duration::from_secs(604_800));
    }
}
