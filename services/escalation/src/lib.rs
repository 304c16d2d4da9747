//! # tocsin-escalation (work in progress)
//!
//! Decides who is paged, on which channel, and when. Done so far: the pure
//! parts — on-call [`schedule`]s and their iCalendar export ([`ical`]), and
//! the [`plan`]ner (route tree, policy levels, per-severity channels, delays,
//! repeats, empty and out-of-hours levels) over the [`config`]. Still to come:
//! the service loop with durable timers that publishes pages to NOTIFY.
#![deny(unreachable_pub)]

pub mod config;
pub mod ical;
pub mod plan;
pub mod schedule;
