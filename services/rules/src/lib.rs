//! # tocsin-rules
//!
//! The vocabulary the services share, pure and without I/O, so that no
//! service crate depends on another:
//! - [`matchers`]: Alertmanager label matchers (parse, compile, match);
//! - [`time`]: `HH:MM` times of day, weekday names, local times resolved
//!   with Tocsin's one DST rule, and time-zone lookup with suggestions;
//! - [`window`]: the weekly window (weekdays plus a time of day range in a
//!   time zone) used by maintenance windows, escalation levels' active
//!   hours and on-call schedule restrictions alike.
#![deny(unreachable_pub)]

pub mod matchers;
pub mod time;
pub mod window;
