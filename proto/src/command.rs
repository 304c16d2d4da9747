//! Commands to the incidents service (COMMANDS stream) and their replies.
//!
//! A caller publishes a [`Command`] to `tocsin.cmd.<action>` with
//! `Nats-Msg-Id` = the command id and, to hear back, a reply subject in the
//! `Tocsin-Reply-To` header; the incidents service publishes a
//! [`CommandReply`] there once the command's effect is on the INCIDENTS
//! stream. An accepted command is durable (work-queue stream) even if the
//! caller goes away.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{
    incident::{Actor, Fired, IncidentSummary, RunbookRequest},
    notify::Delivery,
    silence::Silence,
};

/// Which incident a command is about.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IncidentRef {
    Id(Uuid),
    /// The short number (`#42`).
    Number(u64),
}

impl std::fmt::Display for IncidentRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IncidentRef::Id(id) => write!(f, "{id}"),
            IncidentRef::Number(n) => write!(f, "#{n}"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Action {
    Ack {
        incident: IncidentRef,
    },
    Unack {
        incident: IncidentRef,
    },
    Resolve {
        incident: IncidentRef,
    },
    /// Pause escalation for `seconds`; the incident is triggered again after.
    Snooze {
        incident: IncidentRef,
        seconds: u64,
    },
    Reopen {
        incident: IncidentRef,
    },
    /// Escalate now.
    Escalate {
        incident: IncidentRef,
        #[serde(default)]
        reason: String,
    },
    Assign {
        incident: IncidentRef,
        user: String,
    },
    Note {
        incident: IncidentRef,
        text: String,
    },
    /// Progress of a runbook step.
    Remediation {
        incident: IncidentRef,
        runbook: String,
        step: String,
        status: String,
        #[serde(default)]
        detail: String,
        /// With status `held`: escalation keeps the first level back until
        /// then (or until the run reports `succeeded`/`failed`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        hold_until: Option<jiff::Timestamp>,
    },
    CreateSilence {
        silence: Silence,
    },
    ExpireSilence {
        id: String,
    },
    /// Escalation paged people for an incident (recorded on its timeline).
    Paged {
        incident: IncidentRef,
        level: u32,
        repeat: u32,
        /// `alice via sms`, `#ops via slack`, ...
        pages: Vec<String>,
        reason: String,
        /// Which escalation step this was (see [`Fired`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        fired: Option<Fired>,
    },
    /// The notifier delivered (or failed to deliver) a message for an incident.
    Delivery {
        incident: IncidentRef,
        delivery: Delivery,
    },
    /// A request to the remediation service (start a runbook, approve or
    /// deny a run), recorded on the incident's timeline for it to read.
    Runbook {
        incident: IncidentRef,
        request: RunbookRequest,
    },
}

impl Action {
    /// The last subject token: `tocsin.cmd.<name>`.
    pub fn name(&self) -> &'static str {
        match self {
            Action::Ack { .. } => "ack",
            Action::Unack { .. } => "unack",
            Action::Resolve { .. } => "resolve",
            Action::Snooze { .. } => "snooze",
            Action::Reopen { .. } => "reopen",
            Action::Escalate { .. } => "escalate",
            Action::Assign { .. } => "assign",
            Action::Note { .. } => "note",
            Action::Remediation { .. } => "remediation",
            Action::CreateSilence { .. } => "create_silence",
            Action::ExpireSilence { .. } => "expire_silence",
            Action::Paged { .. } => "paged",
            Action::Delivery { .. } => "delivery",
            Action::Runbook { .. } => "runbook",
        }
    }

    pub fn incident(&self) -> Option<&IncidentRef> {
        match self {
            Action::Ack { incident }
            | Action::Unack { incident }
            | Action::Resolve { incident }
            | Action::Snooze { incident, .. }
            | Action::Reopen { incident }
            | Action::Escalate { incident, .. }
            | Action::Assign { incident, .. }
            | Action::Note { incident, .. }
            | Action::Remediation { incident, .. }
            | Action::Paged { incident, .. }
            | Action::Delivery { incident, .. }
            | Action::Runbook { incident, .. } => Some(incident),
            Action::CreateSilence { .. } | Action::ExpireSilence { .. } => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    /// Unique per command (a UUID); also its `Nats-Msg-Id`, so a retried
    /// command is applied once.
    pub id: String,
    pub actor: Actor,
    pub action: Action,
}

impl Command {
    pub fn new(actor: Actor, action: Action) -> Self {
        Command {
            id: Uuid::now_v7().to_string(),
            actor,
            action,
        }
    }

    pub fn subject(&self) -> String {
        format!("tocsin.cmd.{}", self.action.name())
    }

    /// Whether a message on `subject` may carry this command: its own
    /// subject (or, in a message of several, [`batch_subject`] of its
    /// action). NATS permissions are given per subject, so a command is
    /// applied only on its action's subject: a client allowed to publish
    /// receipts cannot send a resolve on the receipt subject.
    pub fn fits_subject(&self, subject: &str) -> bool {
        let Some(rest) = subject.strip_prefix("tocsin.cmd.") else {
            return false;
        };
        let action = rest.strip_suffix(BATCH_SUFFIX).unwrap_or(rest);
        action == self.action.name()
    }
}

/// Ends the subject of a message holding several commands of one action.
const BATCH_SUFFIX: &str = ".batch";

/// Subject of a message holding several commands of `action` (an
/// `Envelope<Vec<Command>>`): `tocsin.cmd.<action>.batch`. A service that
/// sends many receipts at once (escalation firing a burst of steps) sends
/// them in one message, which JetStream syncs once.
pub fn batch_subject(action: &str) -> String {
    format!("tocsin.cmd.{action}{BATCH_SUFFIX}")
}

/// Whether a COMMANDS message holds several commands ([`batch_subject`]).
pub fn is_batch(subject: &str) -> bool {
    subject.starts_with("tocsin.cmd.") && subject.ends_with(BATCH_SUFFIX)
}

// A wire type built and read one at a time: boxing the summary would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum CommandReply {
    Accepted {
        command_id: String,
        message: String,
        #[serde(default)]
        incident: Option<IncidentSummary>,
    },
    Rejected {
        command_id: String,
        reason: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::incident::Actor;

    #[test]
    fn a_command_fits_its_own_subject_and_its_actions_batch_only() {
        let ack = Command::new(
            Actor::new("alice", "test"),
            Action::Ack {
                incident: IncidentRef::Number(1),
            },
        );
        assert!(ack.fits_subject("tocsin.cmd.ack"));
        assert!(ack.fits_subject(&batch_subject("ack")));
        assert!(is_batch(&batch_subject("ack")));
        for other in [
            "tocsin.cmd.delivery",
            "tocsin.cmd.paged.batch",
            "tocsin.cmd.ack.x",
            "tocsin.cmd.acknowledge",
            "tocsin.alerts.ack",
            "ack",
        ] {
            assert!(!ack.fits_subject(other), "{other}");
        }
        assert!(!is_batch("tocsin.cmd.ack"));
        assert!(!is_batch("tocsin.alerts.generic.batch"));
    }

    #[test]
    fn a_batch_decodes_in_order_and_a_single_command_as_one() {
        let cmds: Vec<Command> = (0..3)
            .map(|n| {
                Command::new(
                    Actor::new("escalation", "tocsin"),
                    Action::Note {
                        incident: IncidentRef::Number(n),
                        text: format!("n{n}"),
                    },
                )
            })
            .collect();
        let now = jiff::Timestamp::now();
        let bytes = crate::codec::encode(&crate::Envelope::new("t", now, cmds.clone())).unwrap();
        let got = crate::codec::decode_commands(&batch_subject("note"), &bytes).unwrap();
        assert_eq!(got.body, cmds);
        let one = crate::codec::encode(&crate::Envelope::new("t", now, cmds[0].clone())).unwrap();
        let got = crate::codec::decode_commands("tocsin.cmd.note", &one).unwrap();
        assert_eq!(got.body, vec![cmds[0].clone()]);
        assert!(crate::codec::decode_commands("tocsin.cmd.note", &bytes).is_err());
    }
}
