//! Telemetry: each event logs and counts together.

use prometheus_client::metrics::{counter::Counter, family::Family, gauge::Gauge};
use tocsin_runtime::{
    admin::{labels, Labels, Metrics},
    http_server::{Closed, ConnectionEvents},
};

#[derive(Clone)]
pub(crate) struct ChatopsMetrics {
    requests: Family<Labels, Counter>,
    refused: Family<Labels, Counter>,
    commands: Family<Labels, Counter>,
    followups: Family<Labels, Counter>,
    connections_open: Gauge,
    connections_closed: Family<Labels, Counter>,
    connections_limited: Family<Labels, Counter>,
}

impl ChatopsMetrics {
    pub(crate) fn register(m: &Metrics) -> Self {
        let s = ChatopsMetrics {
            requests: Family::default(),
            refused: Family::default(),
            commands: Family::default(),
            followups: Family::default(),
            connections_open: Gauge::default(),
            connections_closed: Family::default(),
            connections_limited: Family::default(),
        };
        m.register(
            "tocsin_chatops_requests",
            "Requests by endpoint (slack_actions, slack_command, sms, api, status) and status class",
            s.requests.clone(),
        );
        m.register(
            "tocsin_chatops_signatures_refused",
            "Slack and Twilio requests refused with 401, by source and reason (missing, malformed, stale, mismatch)",
            s.refused.clone(),
        );
        m.register(
            "tocsin_chatops_commands",
            "Commands sent for people, by channel (slack, sms, api), action and outcome (accepted, rejected, no_answer, failed)",
            s.commands.clone(),
        );
        m.register(
            "tocsin_chatops_followups",
            "Messages posted to Slack response_urls, by outcome",
            s.followups.clone(),
        );
        m.register(
            "tocsin_chatops_connections_open",
            "Open HTTP connections (capped by chatops.max_connections)",
            s.connections_open.clone(),
        );
        m.register(
            "tocsin_chatops_connections_closed",
            "HTTP connections closed, by reason",
            s.connections_closed.clone(),
        );
        m.register(
            "tocsin_chatops_connections_limited",
            "New connections at chatops.max_connections, by what was done (evicted, refused)",
            s.connections_limited.clone(),
        );
        s
    }
}

pub(crate) enum ChatopsEvent<'a> {
    Request {
        endpoint: &'static str,
        status: u16,
    },
    SignatureRefused {
        source: &'static str,
        reason: &'static str,
        detail: &'a str,
    },
    Command {
        via: &'a str,
        action: &'a str,
        outcome: &'static str,
        actor: &'a str,
        detail: &'a str,
    },
    FollowUp {
        ok: bool,
        detail: &'a str,
    },
}

impl ChatopsEvent<'_> {
    pub(crate) fn emit(&self, m: &ChatopsMetrics) {
        match *self {
            ChatopsEvent::Request { endpoint, status } => {
                let class = match status {
                    200..=299 => "2xx",
                    400..=499 => "4xx",
                    _ => "5xx",
                };
                m.requests
                    .get_or_create(&labels(&[("endpoint", endpoint), ("status", class)]))
                    .inc();
            }
            ChatopsEvent::SignatureRefused {
                source,
                reason,
                detail,
            } => {
                m.refused
                    .get_or_create(&labels(&[("source", source), ("reason", reason)]))
                    .inc();
                tracing::warn!(
                    source,
                    reason,
                    detail,
                    "request refused: bad or missing signature"
                );
            }
            ChatopsEvent::Command {
                via,
                action,
                outcome,
                actor,
                detail,
            } => {
                m.commands
                    .get_or_create(&labels(&[
                        ("via", via),
                        ("action", action),
                        ("outcome", outcome),
                    ]))
                    .inc();
                if outcome == "failed" {
                    tracing::warn!(via, action, actor, detail, "command not sent");
                } else {
                    tracing::info!(via, action, outcome, actor, detail, "command");
                }
            }
            ChatopsEvent::FollowUp { ok, detail } => {
                m.followups
                    .get_or_create(&labels(&[("outcome", if ok { "sent" } else { "failed" })]))
                    .inc();
                if !ok {
                    tracing::warn!(detail, "cannot post to Slack's response_url");
                }
            }
        }
    }
}

impl ConnectionEvents for ChatopsMetrics {
    fn accept_failed(&self, error: &std::io::Error) {
        tracing::warn!(%error, "chatops cannot accept a connection; if out of file descriptors, raise the open-file limit or lower chatops.max_connections");
    }
    fn limit_reached(&self, max: usize, evicted: bool) {
        self.connections_limited
            .get_or_create(&labels(&[(
                "action",
                if evicted { "evicted" } else { "refused" },
            )]))
            .inc();
        tracing::debug!(max, evicted, "chatops at chatops.max_connections");
    }
    fn opened(&self) {
        self.connections_open.inc();
    }
    fn closed(&self, reason: Closed) {
        self.connections_open.dec();
        self.connections_closed
            .get_or_create(&labels(&[("reason", reason.as_str())]))
            .inc();
    }
}
