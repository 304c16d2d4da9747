//! The delivery record of one message, and the rules that keep a message
//! delivered once: pure data and functions, no I/O.
//!
//! A record lives in the JetStream KV bucket shared by every replica
//! ([`crate::records`]); every change is revision-checked, so two replicas
//! can never both move one record on. The life of a record:
//!
//! ```text
//!   (none) ──claim──► Held ──turn──► InFlight ──answer──► Sent | Failed
//!                      │                │  └─retryable──► Pending ──► (claim again)
//!                      │                └─no answer (crash)─► lease expires ─► doubt
//!                      └─ incident moved on ─► Skipped        Pending, too long ─► GaveUp
//! ```
//!
//! A replica that finds a record held by another (lease not expired) hands
//! the bus message back; one whose lease expired takes it over. When the
//! expired lease was `InFlight`, a request may have reached the provider
//! without its answer being recorded: the next attempt carries a *doubt*
//! (since when) and asks the provider first ([`Arrival::Go`]).

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use serde::{Deserialize, Serialize};
use tocsin_proto::{
    incident::IncidentStatus,
    notify::{Channel, MessageKind, ProviderRef},
};

/// What a message is and where it went: enough for any replica to find the
/// messages sent for an incident and bring them up to date.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct About {
    pub incident: uuid::Uuid,
    pub number: u64,
    pub kind: MessageKind,
    pub channel: Channel,
    /// `alice`, `#ops`, a PagerDuty service or webhook name.
    pub target: String,
    /// Phone number, email address, Slack user or channel.
    #[serde(default)]
    pub address: String,
}

/// What a sent message shows, so an update is only sent when the incident
/// has moved on from it, and never goes back to an older state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shown {
    pub status: IncidentStatus,
    /// The INCIDENTS stream sequence of the incident state it shows.
    pub version: u64,
    #[serde(default)]
    pub by: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum State {
    /// Claimed by `owner` (a replica) until `until`, waiting for its turn
    /// (its destination's rate limit). No request has left since `doubt`.
    Held {
        owner: String,
        until: Timestamp,
        #[serde(default)]
        doubt: Option<Timestamp>,
    },
    /// A request left at `since`; its answer is not recorded yet.
    InFlight {
        owner: String,
        since: Timestamp,
        until: Timestamp,
        /// An earlier attempt whose answer was lost, if any.
        #[serde(default)]
        doubt: Option<Timestamp>,
    },
    /// Not sent yet; the last attempt failed and will be retried.
    Pending {
        #[serde(default)]
        doubt: Option<Timestamp>,
    },
    Sent {
        provider: ProviderRef,
        #[serde(default)]
        shown: Option<Shown>,
    },
    Failed {
        reason: String,
    },
    GaveUp {
        reason: String,
    },
    /// Not sent: the incident had moved on (resolved, silenced, acknowledged).
    Skipped {
        reason: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub about: About,
    pub state: State,
    /// Requests made (1 = the first).
    pub attempts: u32,
    /// When the record was created (give-up counts from here).
    pub first_attempt: Timestamp,
    #[serde(default)]
    pub last_error: String,
}

/// What to do with a message that just arrived from the bus.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Arrival {
    /// Already final: (re)publish its receipt and acknowledge.
    Done,
    /// Another replica (or another task of this one) holds it: hand the
    /// bus message back for this long.
    Busy(Duration),
    /// Retries went on long enough: record this final state.
    GiveUp(State),
    /// Deliver it. `doubt`: an earlier request may have arrived (its answer
    /// was lost at that time): ask the provider before sending again.
    Go { doubt: Option<Timestamp> },
}

impl Record {
    pub fn new(about: About, now: Timestamp) -> Record {
        Record {
            about,
            state: State::Pending { doubt: None },
            attempts: 0,
            first_attempt: now,
            last_error: String::new(),
        }
    }

    pub fn is_final(&self) -> bool {
        matches!(
            self.state,
            State::Sent { .. }
                | State::Failed { .. }
                | State::GaveUp { .. }
                | State::Skipped { .. }
        )
    }

    /// The sent message and what it shows (for updates), if it was sent.
    pub fn sent(&self) -> Option<(&ProviderRef, Option<&Shown>)> {
        match &self.state {
            State::Sent { provider, shown } => Some((provider, shown.as_ref())),
            _ => None,
        }
    }

    /// The doubt this record carries into the next attempt.
    fn doubt(&self) -> Option<Timestamp> {
        match &self.state {
            State::Held { doubt, .. } | State::Pending { doubt } => *doubt,
            // The lease ran out with a request in the air: it may have arrived.
            State::InFlight { since, doubt, .. } => Some(doubt.map_or(*since, |d| d.min(*since))),
            _ => None,
        }
    }

    /// Decides what to do with this record's bus message
    /// (`give_up_after`: zero for never).
    pub fn arrival(rec: Option<&Record>, now: Timestamp, give_up_after: Duration) -> Arrival {
        let Some(rec) = rec else {
            return Arrival::Go { doubt: None };
        };
        if rec.is_final() {
            return Arrival::Done;
        }
        match &rec.state {
            State::Held { until, .. } | State::InFlight { until, .. } if *until > now => {
                // Still leased (by another replica, or by a task of this one
                // that is still working on it): it is not ours to touch.
                let left = until.duration_since(now);
                return Arrival::Busy(Duration::try_from(left).unwrap_or_default());
            }
            _ => {}
        }
        if let State::Pending { .. } = rec.state {
            let waited = now.duration_since(rec.first_attempt);
            if rec.attempts > 0
                && !give_up_after.is_zero()
                && waited > SignedDuration::try_from(give_up_after).unwrap_or(SignedDuration::MAX)
            {
                return Arrival::GiveUp(State::GaveUp {
                    reason: format!(
                        "gave up after {} attempts over {}: {}",
                        rec.attempts,
                        tocsin_runtime::config::HumanDuration(give_up_after),
                        rec.last_error
                    ),
                });
            }
        }
        Arrival::Go { doubt: rec.doubt() }
    }

    /// Claimed by `me` until `until`, before any wait.
    pub fn hold(&mut self, me: &str, until: Timestamp) {
        let doubt = self.doubt();
        self.state = State::Held {
            owner: me.to_string(),
            until,
            doubt,
        };
    }

    /// A request leaves now. Whatever doubt the record carries (an
    /// earlier request's, or that of an in-flight attempt whose lease ran
    /// out) stays until the provider has told.
    pub fn in_flight(&mut self, me: &str, now: Timestamp, until: Timestamp) {
        let doubt = self.doubt();
        self.attempts += 1;
        self.state = State::InFlight {
            owner: me.to_string(),
            since: now,
            until,
            doubt,
        };
    }

    /// The doubt an in-flight attempt carries from before it.
    fn doubt_before_attempt(&self) -> Option<Timestamp> {
        match &self.state {
            State::Held { doubt, .. } | State::Pending { doubt } => *doubt,
            State::InFlight { doubt, .. } => *doubt,
            _ => None,
        }
    }

    /// The provider told whether an earlier attempt arrived (it did not):
    /// no doubt is left.
    pub fn doubt_cleared(&mut self) {
        match &mut self.state {
            State::Held { doubt, .. } | State::Pending { doubt } => *doubt = None,
            State::InFlight { doubt, .. } => *doubt = None,
            _ => {}
        }
    }

    pub fn sent_as(&mut self, provider: ProviderRef, shown: Option<Shown>) {
        self.state = State::Sent { provider, shown };
    }

    pub fn failed(&mut self, reason: String) {
        self.state = State::Failed { reason };
    }

    pub fn skipped(&mut self, reason: String) {
        self.state = State::Skipped { reason };
    }

    /// The attempt failed and will be retried. `maybe_arrived`: the request
    /// went out and no answer came (a timeout), so it may have arrived.
    pub fn retry_later(&mut self, reason: String, maybe_arrived: bool) {
        let doubt = match &self.state {
            State::InFlight { since, doubt, .. } if maybe_arrived => {
                Some(doubt.map_or(*since, |d| d.min(*since)))
            }
            State::InFlight { doubt, .. } => *doubt,
            State::Held { doubt, .. } | State::Pending { doubt } => *doubt,
            _ => None,
        };
        self.last_error = reason;
        self.state = State::Pending { doubt };
    }

    /// A look-up could not reach the provider: back to pending with the
    /// doubt kept, so the next attempt asks again.
    pub fn lookup_failed(&mut self, reason: String) {
        let doubt = self.doubt_before_attempt().or(match &self.state {
            State::InFlight { since, .. } => Some(*since),
            _ => None,
        });
        // The attempt counter counts requests that may have delivered; a
        // look-up that failed delivered nothing.
        self.attempts = self.attempts.saturating_sub(1);
        self.last_error = reason;
        self.state = State::Pending { doubt };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap()
    }

    fn about() -> About {
        About {
            incident: uuid::Uuid::nil(),
            number: 7,
            kind: MessageKind::Page,
            channel: Channel::Sms,
            target: "alice".into(),
            address: "+14155550101".into(),
        }
    }

    const GIVE_UP: Duration = Duration::from_secs(3600);

    /// What another replica decides about `rec` at `now`.
    fn other(rec: &Record, now: Timestamp) -> Arrival {
        Record::arrival(Some(rec), now, GIVE_UP)
    }

    #[test]
    fn a_new_page_is_delivered_without_doubt() {
        assert_eq!(
            Record::arrival(None, t(0), GIVE_UP),
            Arrival::Go { doubt: None }
        );
    }

    #[test]
    fn crash_while_held_no_request_left_so_no_lookup() {
        let mut r = Record::new(about(), t(0));
        r.hold("a", t(40));
        // Redelivered while the lease runs: hand it back until it ends.
        assert_eq!(other(&r, t(30)), Arrival::Busy(Duration::from_secs(10)));
        // After it: take over, nothing can have arrived.
        assert_eq!(other(&r, t(41)), Arrival::Go { doubt: None });
    }

    #[test]
    fn crash_with_a_request_in_the_air_means_ask_the_provider() {
        let mut r = Record::new(about(), t(0));
        r.hold("a", t(40));
        r.in_flight("a", t(5), t(25));
        assert_eq!(r.attempts, 1);
        assert!(matches!(other(&r, t(10)), Arrival::Busy(_)));
        assert_eq!(other(&r, t(26)), Arrival::Go { doubt: Some(t(5)) });
        // The next replica claims it: the doubt travels with the claim, so
        // a crash while waiting keeps it.
        r.hold("b", t(60));
        assert_eq!(other(&r, t(61)), Arrival::Go { doubt: Some(t(5)) });
        // It sends (after asking): the new request does not clear the old
        // doubt until the provider answered.
        r.in_flight("b", t(62), t(80));
        assert_eq!(other(&r, t(81)), Arrival::Go { doubt: Some(t(5)) });
        r.doubt_cleared();
        assert_eq!(other(&r, t(81)), Arrival::Go { doubt: Some(t(62)) });
    }

    #[test]
    fn crash_after_the_answer_was_recorded_sends_nothing() {
        let mut r = Record::new(about(), t(0));
        r.in_flight("a", t(1), t(20));
        r.sent_as(ProviderRef::Sms { sid: "SM1".into() }, None);
        assert_eq!(other(&r, t(2)), Arrival::Done);
        let mut f = Record::new(about(), t(0));
        f.failed("HTTP 400".into());
        assert_eq!(other(&f, t(2)), Arrival::Done);
        let mut s = Record::new(about(), t(0));
        s.skipped("resolved".into());
        assert_eq!(other(&s, t(2)), Arrival::Done);
    }

    #[test]
    fn a_retryable_error_leaves_no_doubt_unless_the_request_timed_out() {
        let mut r = Record::new(about(), t(0));
        r.in_flight("a", t(1), t(20));
        r.retry_later("HTTP 503".into(), false);
        assert_eq!(other(&r, t(2)), Arrival::Go { doubt: None });
        r.in_flight("a", t(3), t(20));
        r.retry_later("timed out".into(), true);
        assert_eq!(other(&r, t(4)), Arrival::Go { doubt: Some(t(3)) });
        assert_eq!(r.attempts, 2);
        assert_eq!(r.last_error, "timed out");
    }

    #[test]
    fn a_failed_lookup_keeps_the_doubt_and_does_not_count_as_an_attempt() {
        let mut r = Record::new(about(), t(0));
        r.in_flight("a", t(1), t(20));
        // a crashed; b takes over with doubt and looks up: Slack is down.
        let Arrival::Go { doubt } = other(&r, t(21)) else {
            panic!()
        };
        assert_eq!(doubt, Some(t(1)));
        r.in_flight("b", t(22), t(40));
        r.lookup_failed("Slack 503".into());
        assert_eq!(r.attempts, 1);
        assert_eq!(other(&r, t(23)), Arrival::Go { doubt: Some(t(1)) });
    }

    #[test]
    fn gives_up_after_retrying_long_enough_but_never_before_an_attempt() {
        let mut r = Record::new(about(), t(0));
        assert_eq!(
            other(&r, t(7200)),
            Arrival::Go { doubt: None },
            "never attempted: nothing to give up on"
        );
        r.in_flight("a", t(1), t(20));
        r.retry_later("HTTP 500".into(), false);
        assert_eq!(other(&r, t(3600)), Arrival::Go { doubt: None });
        match other(&r, t(3602)) {
            Arrival::GiveUp(State::GaveUp { reason }) => {
                assert!(reason.contains("1 attempts"), "{reason}");
                assert!(reason.contains("HTTP 500"), "{reason}");
            }
            a => panic!("{a:?}"),
        }
        // Never: zero.
        assert_eq!(
            Record::arrival(Some(&r), t(999_999), Duration::ZERO),
            Arrival::Go { doubt: None }
        );
    }

    #[test]
    fn records_round_trip_through_messagepack() {
        let mut r = Record::new(about(), t(0));
        r.in_flight("a", t(1), t(20));
        r.sent_as(
            ProviderRef::SlackMessage {
                channel: "C1".into(),
                ts: "1.2".into(),
            },
            Some(Shown {
                status: IncidentStatus::Triggered,
                version: 9,
                by: None,
            }),
        );
        let bytes = tocsin_proto::codec::encode(&r).unwrap();
        let back: Record = tocsin_proto::codec::decode(&bytes).unwrap();
        assert_eq!(back, r);
    }
}
