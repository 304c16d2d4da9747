//! # tocsin-escalation (work in progress)
#![deny(unreachable_pub)]

pub mod ical;
pub mod schedule;
