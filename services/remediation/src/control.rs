//! Requests to the remediation service itself (core NATS request/reply on
//! [`SUBJECT`], answered by whichever replica the queue group picks): the
//! loaded runbooks and their switches, one run's state, and switching a
//! runbook (or all of them: the kill switch) off and on. `tocsin runbook
//! list --remote`, `approve|deny` (to check the run first), `disable|enable`
//! use it. The switches are records in the KV bucket `tocsin_remediation`
//! (`disabled.<name>`, `disabled._all`), so every replica honours them at a
//! run's next start.

use std::sync::Arc;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use tocsin_proto::codec;
use tocsin_runtime::query::Queries;
use tokio_util::sync::CancellationToken;

use crate::{
    engine::{Engine, RunRecord},
    runbook::PageMode,
    state::Disabled,
};

/// Where requests go (the operator and chat-ops may publish `tocsin.query.>`).
pub const SUBJECT: &str = "tocsin.query.remediation";
/// The queue group every replica answers in.
pub const QUEUE: &str = "tocsin-remediation";
/// The switch of every runbook (the kill switch).
pub const ALL: &str = "_all";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Control {
    /// The runbooks this replica loaded, with their switches.
    Runbooks,
    /// One run's record.
    Run { run: String },
    /// Switch runbook `runbook` (or [`ALL`]) off (`disabled`) or on.
    Switch {
        runbook: String,
        disabled: bool,
        by: String,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum ControlReply {
    Runbooks {
        /// The kill switch is on: no runbook starts.
        all_disabled: bool,
        runbooks: Vec<RunbookInfo>,
    },
    Run {
        run: Option<RunInfo>,
    },
    Switched {
        message: String,
    },
    Error {
        reason: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunbookInfo {
    pub name: String,
    pub description: String,
    pub disabled: bool,
    pub dry_run: bool,
    /// `immediately` or `on_failure`.
    pub page: String,
    pub steps: usize,
    /// `require_approval.timeout` in seconds, when it needs approval.
    pub approval_timeout_secs: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunInfo {
    pub run: String,
    pub runbook: String,
    pub incident: u64,
    /// `claimed`, `awaiting_approval`, `running`, `succeeded`, `failed`, `skipped`.
    pub state: String,
    pub approval_deadline: Option<Timestamp>,
    pub approved_by: String,
    pub detail: String,
}

/// Answers requests until `shutdown`; resubscribes if the subscription ends.
pub(crate) async fn serve(engine: Arc<Engine>, shutdown: CancellationToken) {
    let mut backoff = tocsin_runtime::retry::Backoff::standard();
    while !shutdown.is_cancelled() {
        let queries = match Queries::subscribe(&engine.js, QUEUE, &[SUBJECT]).await {
            Ok(q) => q,
            Err(e) => {
                tracing::warn!(error = %e, "cannot answer remediation requests yet; retrying");
                if !backoff.wait(&shutdown).await {
                    return;
                }
                continue;
            }
        };
        backoff.reset();
        queries
            .serve(shutdown.clone(), |_, payload| {
                let engine = engine.clone();
                async move {
                    let answer = match codec::decode::<Control>(&payload) {
                        Ok(c) => answer(&engine, c).await,
                        Err(e) => ControlReply::Error {
                            reason: format!("not a remediation request: {e}"),
                        },
                    };
                    codec::encode(&answer).map_err(|e| e.to_string())
                }
            })
            .await;
        // The subscription ended (a reconnect gone wrong): a pause, then again.
        if !shutdown.is_cancelled() && !backoff.wait(&shutdown).await {
            return;
        }
    }
}

async fn answer(engine: &Engine, c: Control) -> ControlReply {
    let error = |reason: String| ControlReply::Error { reason };
    match c {
        Control::Runbooks => {
            let switch = |name: String| async move {
                engine
                    .guards
                    .get::<Disabled>(&format!("disabled.{name}"))
                    .await
                    .map(|d| d.is_some_and(|(d, _)| d.disabled))
            };
            let all_disabled = match switch(ALL.into()).await {
                Ok(d) => d,
                Err(e) => return error(e),
            };
            let mut runbooks = Vec::new();
            for l in engine.runbooks().iter() {
                let rb = &l.runbook;
                let disabled = match switch(rb.name.clone()).await {
                    Ok(d) => d,
                    Err(e) => return error(e),
                };
                runbooks.push(RunbookInfo {
                    name: rb.name.clone(),
                    description: rb.description.clone(),
                    disabled,
                    dry_run: rb.dry_run || engine.config.dry_run,
                    page: match rb.page {
                        PageMode::Immediately => "immediately",
                        PageMode::OnFailure => "on_failure",
                    }
                    .into(),
                    steps: rb.steps.len(),
                    approval_timeout_secs: rb
                        .guardrails
                        .require_approval
                        .as_ref()
                        .map(|a| a.timeout.0.as_secs()),
                });
            }
            ControlReply::Runbooks {
                all_disabled,
                runbooks,
            }
        }
        Control::Run { run } => match engine.runs.get::<RunRecord>(&format!("run.{run}")).await {
            Ok(r) => ControlReply::Run {
                run: r.map(|(r, _)| RunInfo {
                    run: r.run,
                    runbook: r.runbook,
                    incident: r.number,
                    state: r.state.as_str().into(),
                    approval_deadline: r.approval_deadline,
                    approved_by: r.approved_by,
                    detail: r.detail,
                }),
            },
            Err(e) => error(e),
        },
        Control::Switch {
            runbook,
            disabled,
            by,
        } => {
            let known =
                runbook == ALL || engine.runbooks().iter().any(|l| l.runbook.name == runbook);
            if !known {
                let names: Vec<String> = engine
                    .runbooks()
                    .iter()
                    .map(|l| l.runbook.name.clone())
                    .collect();
                return error(format!(
                    "no runbook {runbook:?} is loaded (loaded: {})",
                    if names.is_empty() {
                        "none".into()
                    } else {
                        names.join(", ")
                    }
                ));
            }
            let record = Disabled {
                disabled,
                by: by.clone(),
            };
            if let Err(e) = engine
                .guards
                .put(&format!("disabled.{runbook}"), &record)
                .await
            {
                return error(e);
            }
            let what = if runbook == ALL {
                "every runbook (kill switch)".to_string()
            } else {
                format!("runbook {runbook}")
            };
            let state = if disabled {
                "disabled: no new run starts; runs in progress go on"
            } else {
                "enabled"
            };
            tracing::warn!(runbook, disabled, by, "runbook switch changed");
            ControlReply::Switched {
                message: format!("{what} {state} (by {by})"),
            }
        }
    }
}
