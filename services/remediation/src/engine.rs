//! Runs: deciding whether a run may start (guardrails), running its steps
//! with progress in the KV bucket, resuming or failing safe after a crash,
//! and telling the incident's timeline (and escalation) what happened.
//!
//! A run's id is (incident, runbook, INCIDENTS sequence of the event that
//! started it, and its place in that message when the message holds
//! several entries), so the same event delivered twice, to one replica or two,
//! is one run: its record is created if absent, and every change names the
//! revision read. A step is marked started before it runs and done (with
//! its output) after; a replica that takes a run over (the event came back
//! because the replica running it went silent) skips done steps and, for a
//! started one that is not idempotent, fails the run safe: rollback, then
//! escalate, said on the timeline.

use std::{
    collections::BTreeMap,
    sync::{Arc, RwLock},
    time::Duration,
};

use async_nats::{jetstream, HeaderMap};
use futures::StreamExt;
use jiff::{SignedDuration, Timestamp};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tocsin_proto::{
    codec,
    command::{Action, Command, CommandReply, IncidentRef},
    incident::{Actor, EventKind, IncidentEvent, IncidentSummary, RunbookRequest},
    notify::{Channel, MessageKind, Page, PageTarget},
    subjects::headers,
    Envelope,
};
use tocsin_runtime::clock::Clock;
use uuid::Uuid;

use crate::{
    config::RemediationConfig,
    events::{RemediationEvent, RemediationMetrics, RunEnd},
    runbook::{Kind, Loaded, OnFailure, PageMode, Runbook, Step},
    state::{self, Breaker, Bucket, Cooldown, Count, Disabled, WriteError},
    steps::{self, empty_output, Limits, Outcome},
    template,
};

/// The step name of run-level timeline entries.
pub const RUN: &str = "run";

/// The `failed_step` of a run that never started: denied, or no decision
/// on its approval in time.
pub const APPROVAL: &str = "approval";

/// The key (in `tocsin_remediation`) of the runs waiting for approval and
/// their deadlines, read by every replica's sweeper.
pub const APPROVALS: &str = "approvals";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    /// Created; guardrails not decided yet.
    Claimed,
    /// Waits for `tocsin runbook approve|deny` (`require_approval`).
    AwaitingApproval,
    Running,
    Succeeded,
    Failed,
    Skipped,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Main,
    Rollback,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StepState {
    pub started: bool,
    pub done: bool,
    #[serde(default)]
    pub output: Value,
}

/// A run's record in `tocsin_remediation_runs` (key `run.<id>`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunRecord {
    pub run: String,
    pub runbook: String,
    pub incident: Uuid,
    pub number: u64,
    /// incident, labels, annotations, params: frozen at the start.
    pub context: Value,
    pub state: RunState,
    pub phase: Phase,
    #[serde(default)]
    pub steps: BTreeMap<String, StepState>,
    #[serde(default)]
    pub rollback: BTreeMap<String, StepState>,
    pub started_at: Timestamp,
    #[serde(default)]
    pub leases: Vec<String>,
    #[serde(default)]
    pub dry_run: bool,
    #[serde(default)]
    pub held: bool,
    /// The failure being rolled back, or why it was skipped.
    #[serde(default)]
    pub detail: String,
    #[serde(default)]
    pub failed_step: String,
    #[serde(default)]
    pub takeovers: u32,
    /// With `require_approval`: no decision by then escalates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval_deadline: Option<Timestamp>,
    /// Who approved it (empty: nobody yet, or no approval needed).
    #[serde(default)]
    pub approved_by: String,
    /// Who started it by hand (`tocsin runbook run`); empty when an
    /// incident event started it.
    #[serde(default)]
    pub requested_by: String,
    /// The incident when the run started (what a `notify` step's message
    /// shows of it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<IncidentSummary>,
}

impl RunState {
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Claimed => "claimed",
            RunState::AwaitingApproval => "awaiting_approval",
            RunState::Running => "running",
            RunState::Succeeded => "succeeded",
            RunState::Failed => "failed",
            RunState::Skipped => "skipped",
        }
    }
}

impl RunRecord {
    fn context(&self, rb: &Runbook) -> Value {
        let mut ctx = self.context.clone();
        let mut steps = serde_json::Map::new();
        for s in rb.steps.iter() {
            let out = self
                .steps
                .get(&s.id)
                .filter(|st| st.done)
                .map(|st| st.output.clone())
                .unwrap_or_else(|| empty_output("not_run"));
            steps.insert(s.id.clone(), out);
        }
        for s in rb.rollback.iter() {
            if let Some(st) = self.rollback.get(&s.id).filter(|st| st.done) {
                steps.insert(s.id.clone(), st.output.clone());
            }
        }
        ctx["steps"] = Value::Object(steps);
        ctx["run"] = json!({"id": self.run, "runbook": self.runbook});
        ctx
    }

    fn states(&mut self, phase: Phase) -> &mut BTreeMap<String, StepState> {
        match phase {
            Phase::Main => &mut self.steps,
            Phase::Rollback => &mut self.rollback,
        }
    }
}

/// A failure that needs a retry of the whole event later (NATS trouble).
#[derive(Debug)]
pub struct Later(pub String);

impl From<String> for Later {
    fn from(s: String) -> Self {
        Later(s)
    }
}

enum StepsEnd {
    Done,
    Failed {
        step: String,
        summary: String,
        rollback: bool,
    },
    /// Another replica took the run over.
    Lost,
}

pub struct Engine {
    pub js: jetstream::Context,
    pub runs: Bucket,
    pub locks: Bucket,
    pub guards: Bucket,
    pub config: RemediationConfig,
    pub runbooks: RwLock<Arc<Vec<Loaded>>>,
    pub clock: Arc<dyn Clock>,
    pub http: reqwest::Client,
    pub limits: Limits,
    pub metrics: RemediationMetrics,
    /// Runs this process is working on (a redelivered event for one of
    /// them waits instead of taking its own run over).
    pub active: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Wakes this replica's approval sweeper (a run started waiting).
    pub waiting: tokio::sync::Notify,
}

/// Removes a run from `active` when dropped.
struct Active<'a>(&'a Engine, String);

impl Drop for Active<'_> {
    fn drop(&mut self) {
        if let Ok(mut a) = self.0.active.lock() {
            a.remove(&self.1);
        }
    }
}

fn add(at: Timestamp, d: Duration) -> Timestamp {
    SignedDuration::try_from(d)
        .ok()
        .and_then(|d| at.checked_add(d).ok())
        .unwrap_or(Timestamp::MAX)
}

impl Engine {
    pub fn runbooks(&self) -> Arc<Vec<Loaded>> {
        self.runbooks
            .read()
            .map(|g| g.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    pub fn set_runbooks(&self, loaded: Vec<Loaded>) {
        match self.runbooks.write() {
            Ok(mut g) => *g = Arc::new(loaded),
            Err(p) => *p.into_inner() = Arc::new(loaded),
        }
    }

    /// Handles one INCIDENTS event: every runbook it starts, run to its end.
    /// `seq` is its message's stream sequence and `index` its place in
    /// that message when it holds several entries (receipts; 0 otherwise):
    /// together they name its runs.
    pub async fn on_event(
        self: &Arc<Self>,
        ev: &IncidentEvent,
        seq: u64,
        index: u32,
    ) -> Result<(), Later> {
        if let EventKind::Runbook { request } = &ev.kind {
            return self.on_request(ev, request, seq).await;
        }
        if let EventKind::Resolved { .. } = &ev.kind {
            return self.drop_waiting(ev).await;
        }
        if ev.incident.status == tocsin_proto::incident::IncidentStatus::Resolved {
            return Ok(());
        }
        let matching: Vec<Runbook> = self
            .runbooks()
            .iter()
            .filter(|l| l.runbook.applies(&ev.kind, &ev.incident))
            .map(|l| l.runbook.clone())
            .collect();
        let at = match index {
            0 => seq.to_string(),
            i => format!("{seq}.{i}"),
        };
        let results =
            futures::future::join_all(matching.iter().map(|rb| self.run_one(rb, ev, &at))).await;
        results.into_iter().collect::<Result<Vec<()>, Later>>()?;
        Ok(())
    }

    async fn run_one(
        self: &Arc<Self>,
        rb: &Runbook,
        ev: &IncidentEvent,
        at: &str,
    ) -> Result<(), Later> {
        let run = format!("{}.{}.{at}", ev.incident.id.simple(), rb.name);
        let rec = self.new_record(rb, ev, &run);
        self.drive(rb, &run, Some(rec)).await
    }

    /// Works on run `run` until it ends or waits: creates its record from
    /// `new` when absent, then starts, resumes or finishes it by its state.
    async fn drive(
        self: &Arc<Self>,
        rb: &Runbook,
        run: &str,
        new: Option<RunRecord>,
    ) -> Result<(), Later> {
        let key = format!("run.{run}");
        let fresh = self
            .active
            .lock()
            .map(|mut a| a.insert(run.to_string()))
            .unwrap_or(false);
        if !fresh {
            return Err(Later(format!("run {run} is in progress in this process")));
        }
        let _active = Active(self, run.to_string());
        for _ in 0..10 {
            match self.runs.get::<RunRecord>(&key).await? {
                None => {
                    let Some(rec) = new.clone() else {
                        return Ok(());
                    };
                    match self.runs.write(&key, &rec, None).await {
                        Ok(rev) => return self.start(rb, rec, rev).await,
                        Err(WriteError::Conflict) => continue,
                        Err(WriteError::Failed(e)) => return Err(Later(e)),
                    }
                }
                Some((rec, rev)) => {
                    return match rec.state {
                        RunState::Failed if rec.failed_step == APPROVAL => {
                            // Denied or timed out, and maybe broken off
                            // before the page: say it again (the ids
                            // make a repeat a no-op).
                            self.refused(&rec).await
                        }
                        RunState::Succeeded | RunState::Failed | RunState::Skipped => Ok(()),
                        RunState::AwaitingApproval => self.announce_wait(rb, &rec).await,
                        RunState::Claimed => self.start(rb, rec, rev).await,
                        RunState::Running => self.resume(rb, rec, rev).await,
                    };
                }
            }
        }
        Err(Later(format!("run {run}: the record keeps changing")))
    }

    /// The loaded runbook `name`.
    fn find(&self, name: &str) -> Option<Runbook> {
        self.runbooks()
            .iter()
            .find(|l| l.runbook.name == name)
            .map(|l| l.runbook.clone())
    }

    /// Handles a person's request read from INCIDENTS: start a runbook by
    /// hand (every guardrail but `match` applies), or approve or deny a
    /// run waiting for approval.
    pub async fn on_request(
        self: &Arc<Self>,
        ev: &IncidentEvent,
        request: &RunbookRequest,
        seq: u64,
    ) -> Result<(), Later> {
        let who = ev
            .actor
            .as_ref()
            .map(|a| format!("{} ({})", a.name, a.via))
            .unwrap_or_else(|| "someone".into());
        let inc = &ev.incident;
        let (run, approve) = match request {
            RunbookRequest::Run { runbook, dry_run } => {
                let Some(rb) = self.find(runbook) else {
                    self.note(inc.id, runbook, "ignored", format!("{who} asked to run runbook {runbook}, which the remediation service has not loaded; nothing runs"), seq).await;
                    return Ok(());
                };
                let run = format!("{}.{}.{seq}", inc.id.simple(), rb.name);
                let mut rec = self.new_record(&rb, ev, &run);
                rec.dry_run |= *dry_run;
                rec.requested_by = who;
                return self.drive(&rb, &run, Some(rec)).await;
            }
            RunbookRequest::Approve { run } => (run, true),
            RunbookRequest::Deny { run } => (run, false),
        };
        let op = request.op();
        let key = format!("run.{run}");
        let named = run.split('.').nth(1).unwrap_or("").to_string();
        for _ in 0..10 {
            let Some((mut rec, rev)) = self.runs.get::<RunRecord>(&key).await? else {
                self.note(
                    inc.id,
                    &named,
                    "ignored",
                    format!("{op} by {who} ignored: there is no run {run}"),
                    seq,
                )
                .await;
                return Ok(());
            };
            if rec.incident != inc.id {
                self.note(
                    inc.id,
                    &named,
                    "ignored",
                    format!(
                        "{op} by {who} ignored: run {run} is not a run on incident #{}",
                        inc.number
                    ),
                    seq,
                )
                .await;
                return Ok(());
            }
            let Some(rb) = self.find(&rec.runbook) else {
                // Not loaded any more: the run cannot go on; a denial still
                // pages (below, by the deadline) as the run said it would.
                self.note(inc.id, &rec.runbook, "ignored", format!("{op} by {who} ignored: runbook {} is not loaded now; the run waits until its deadline", rec.runbook), seq).await;
                return Ok(());
            };
            match rec.state {
                RunState::AwaitingApproval => {
                    // A decision counts when it was made (recorded on the
                    // timeline), not when this replica reads it.
                    let late = rec.approval_deadline.is_some_and(|d| d <= ev.at);
                    if late {
                        rec.state = RunState::Failed;
                        rec.failed_step = APPROVAL.into();
                        rec.detail = timed_out(&rec);
                    } else if approve {
                        rec.state = RunState::Claimed;
                        rec.approved_by = who.clone();
                    } else {
                        rec.state = RunState::Failed;
                        rec.failed_step = APPROVAL.into();
                        rec.detail = format!("approval denied by {who}");
                    }
                    match self.runs.write(&key, &rec, Some(rev)).await {
                        Ok(_) => {}
                        Err(WriteError::Conflict) => continue,
                        Err(WriteError::Failed(e)) => return Err(Later(e)),
                    }
                    if rec.state == RunState::Failed {
                        return self.refused(&rec).await;
                    }
                    self.index_waiting(run, None).await?;
                    self.timeline(
                        &rec,
                        RUN,
                        "approved",
                        format!("run {run} of runbook {} approved by {who}", rb.name),
                        None,
                    )
                    .await;
                    return self.drive(&rb, run, None).await;
                }
                // The same decision again (its event came back after a
                // crash): carry on with what it decided.
                RunState::Claimed | RunState::Running if approve && !rec.approved_by.is_empty() => {
                    return self.drive(&rb, run, None).await
                }
                RunState::Failed if !approve && rec.failed_step == APPROVAL => {
                    return self.refused(&rec).await
                }
                other => {
                    self.note(
                        inc.id,
                        &rec.runbook,
                        "ignored",
                        format!(
                            "{op} by {who} ignored: run {run} is {}, not waiting for approval",
                            other.as_str()
                        ),
                        seq,
                    )
                    .await;
                    return Ok(());
                }
            }
        }
        Err(Later(format!("run {run}: the record keeps changing")))
    }

    /// Records that run `rec` waits for approval: the index every replica's
    /// sweeper reads, the hold (`page: on_failure`) and how to decide.
    async fn announce_wait(&self, rb: &Runbook, rec: &RunRecord) -> Result<(), Later> {
        let deadline = rec
            .approval_deadline
            .unwrap_or_else(|| add(rec.started_at, Duration::from_secs(900)));
        self.index_waiting(&rec.run, Some(deadline)).await?;
        self.waiting.notify_one();
        if rec.held {
            let until = add(rec.started_at, rb.hold_at_most());
            self.timeline(
                rec,
                RUN,
                "held",
                format!(
                    "runbook {} waits for approval: the first page waits until {until} unless the run ends first",
                    rb.name
                ),
                Some(until),
            )
            .await;
        }
        let run = &rec.run;
        self.timeline(
            rec,
            RUN,
            "awaiting_approval",
            format!(
                "runbook {} waits for approval before it runs: `tocsin runbook approve {run}` or `tocsin runbook deny {run}`; with no decision by {deadline} the incident escalates",
                rb.name
            ),
            None,
        )
        .await;
        Ok(())
    }

    /// Adds run `run` (with its deadline) to the waiting runs, or takes it
    /// off (`None`).
    async fn index_waiting(&self, run: &str, deadline: Option<Timestamp>) -> Result<(), Later> {
        for _ in 0..20 {
            let (mut idx, rev) = match self
                .guards
                .get::<BTreeMap<String, Timestamp>>(APPROVALS)
                .await?
            {
                Some((m, rev)) => (m, Some(rev)),
                None => (BTreeMap::new(), None),
            };
            let unchanged = match deadline {
                Some(d) => idx.insert(run.to_string(), d) == Some(d),
                None => idx.remove(run).is_none(),
            };
            if unchanged {
                return Ok(());
            }
            match self.guards.write(APPROVALS, &idx, rev).await {
                Ok(_) => return Ok(()),
                Err(WriteError::Conflict) => continue,
                Err(WriteError::Failed(e)) => return Err(Later(e)),
            }
        }
        Err(Later(
            "the list of runs waiting for approval keeps changing".into(),
        ))
    }

    /// A run that will not run (denied, or no decision in time): says so,
    /// pages (the `failed` entry ends a hold; otherwise the incident
    /// escalates now) and leaves the waiting runs.
    async fn refused(&self, rec: &RunRecord) -> Result<(), Later> {
        let reason = format!("runbook {} did not run: {}", rec.runbook, rec.detail);
        RemediationEvent::RunEnded {
            runbook: &rec.runbook,
            incident: rec.number,
            end: RunEnd::Refused,
            reason: &reason,
        }
        .emit(&self.metrics);
        self.timeline(rec, RUN, "failed", reason.clone(), None)
            .await;
        if !rec.held {
            let id = format!("rem-{}-escalate", state::digest(&rec.run));
            let action = Action::Escalate {
                incident: IncidentRef::Id(rec.incident),
                reason,
            };
            if let Err(e) = self.send(&rec.runbook, action, id, false).await {
                return Err(Later(format!("cannot escalate: {e}")));
            }
        }
        self.index_waiting(&rec.run, None).await
    }

    /// An incident resolved: its runs still waiting for approval will not
    /// be needed; they end as skipped (nobody is paged about them).
    async fn drop_waiting(&self, ev: &IncidentEvent) -> Result<(), Later> {
        let prefix = format!("{}.", ev.incident.id.simple());
        let waiting: Vec<String> = self
            .guards
            .get::<BTreeMap<String, Timestamp>>(APPROVALS)
            .await?
            .map(|(m, _)| m.into_keys().filter(|r| r.starts_with(&prefix)).collect())
            .unwrap_or_default();
        for run in waiting {
            let key = format!("run.{run}");
            for _ in 0..10 {
                let Some((mut rec, rev)) = self.runs.get::<RunRecord>(&key).await? else {
                    break;
                };
                if rec.state != RunState::AwaitingApproval {
                    break;
                }
                rec.state = RunState::Skipped;
                rec.detail =
                    "the incident was resolved before anyone approved or denied the run".into();
                match self.runs.write(&key, &rec, Some(rev)).await {
                    Ok(_) => {
                        RemediationEvent::RunEnded {
                            runbook: &rec.runbook,
                            incident: rec.number,
                            end: RunEnd::Skipped,
                            reason: &rec.detail,
                        }
                        .emit(&self.metrics);
                        self.timeline(&rec, RUN, "skipped", rec.detail.clone(), None)
                            .await;
                        break;
                    }
                    Err(WriteError::Conflict) => continue,
                    Err(WriteError::Failed(e)) => return Err(Later(e)),
                }
            }
            self.index_waiting(&run, None).await?;
        }
        Ok(())
    }

    /// Ends run `run` if it still waits for approval past its deadline.
    async fn time_out(&self, run: &str) -> Result<(), Later> {
        let key = format!("run.{run}");
        for _ in 0..10 {
            let Some((mut rec, rev)) = self.runs.get::<RunRecord>(&key).await? else {
                return self.index_waiting(run, None).await;
            };
            match rec.state {
                RunState::AwaitingApproval => {
                    if rec.approval_deadline.is_some_and(|d| d > self.clock.now()) {
                        return Ok(());
                    }
                    rec.state = RunState::Failed;
                    rec.failed_step = APPROVAL.into();
                    rec.detail = timed_out(&rec);
                    match self.runs.write(&key, &rec, Some(rev)).await {
                        Ok(_) => return self.refused(&rec).await,
                        Err(WriteError::Conflict) => continue,
                        Err(WriteError::Failed(e)) => return Err(Later(e)),
                    }
                }
                RunState::Failed if rec.failed_step == APPROVAL => return self.refused(&rec).await,
                _ => return self.index_waiting(run, None).await,
            }
        }
        Ok(())
    }

    /// Every replica: ends the runs whose approval did not come in time.
    /// Wakes at the next deadline (by the service clock), when a run
    /// starts waiting here, and every 5 s for runs other replicas added.
    pub async fn sweep_approvals(self: Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        loop {
            let idx = match self
                .guards
                .get::<BTreeMap<String, Timestamp>>(APPROVALS)
                .await
            {
                Ok(v) => v.map(|(m, _)| m).unwrap_or_default(),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the runs waiting for approval");
                    BTreeMap::new()
                }
            };
            let now = self.clock.now();
            let mut next: Option<Timestamp> = None;
            for (run, deadline) in idx {
                if deadline <= now {
                    if let Err(e) = self.time_out(&run).await {
                        tracing::warn!(error = %e.0, %run, "cannot end a run whose approval timed out; retrying");
                    }
                } else {
                    next = Some(next.map_or(deadline, |n| n.min(deadline)));
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.clock.wait(next), if next.is_some() => {}
                _ = self.waiting.notified() => {}
                // Poll interval for runs other replicas put on the list.
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
        }
    }

    /// A run-level line on incident `incident`'s timeline that belongs to
    /// no run (a request that names none); its id comes from the request.
    async fn note(&self, incident: Uuid, runbook: &str, status: &str, detail: String, seq: u64) {
        tracing::info!(%incident, runbook, %detail, "runbook request");
        let action = Action::Remediation {
            incident: IncidentRef::Id(incident),
            runbook: runbook.to_string(),
            step: RUN.into(),
            status: status.into(),
            detail,
            hold_until: None,
        };
        if let Err(e) = self
            .send(runbook, action, format!("rem-request-{seq}"), false)
            .await
        {
            tracing::warn!(error = %e, "cannot record a runbook request's outcome on the timeline");
        }
    }

    fn new_record(&self, rb: &Runbook, ev: &IncidentEvent, run: &str) -> RunRecord {
        let inc = &ev.incident;
        let annotations = match &ev.kind {
            EventKind::Opened { alert, .. } | EventKind::AlertFiring { alert, .. } => {
                serde_json::to_value(&alert.annotations).unwrap_or(json!({}))
            }
            _ => json!({}),
        };
        let context = json!({
            "incident": {
                "id": inc.id.to_string(),
                "number": inc.number,
                "title": inc.title,
                "severity": inc.severity.as_str(),
                "status": inc.status.as_str(),
                "dedup_key": inc.dedup_key,
                "opened_at": inc.opened_at.to_string(),
            },
            "labels": inc.labels,
            "annotations": annotations,
            "params": rb.params,
        });
        RunRecord {
            run: run.to_string(),
            runbook: rb.name.clone(),
            incident: inc.id,
            number: inc.number,
            context,
            state: RunState::Claimed,
            phase: Phase::Main,
            steps: BTreeMap::new(),
            rollback: BTreeMap::new(),
            started_at: self.clock.now(),
            leases: Vec::new(),
            dry_run: rb.dry_run || self.config.dry_run,
            held: false,
            detail: String::new(),
            failed_step: String::new(),
            takeovers: 0,
            approval_deadline: None,
            approved_by: String::new(),
            requested_by: String::new(),
            summary: Some(inc.clone()),
        }
    }

    fn key(rec: &RunRecord) -> String {
        format!("run.{}", rec.run)
    }

    /// Writes `rec` over revision `rev`; Ok(None) when another replica
    /// changed it (the run is theirs now).
    async fn save(&self, rec: &RunRecord, rev: u64) -> Result<Option<u64>, Later> {
        match self.runs.write(&Self::key(rec), rec, Some(rev)).await {
            Ok(r) => Ok(Some(r)),
            Err(WriteError::Conflict) => {
                tracing::info!(run = %rec.run, "another replica took the run over");
                Ok(None)
            }
            Err(WriteError::Failed(e)) => Err(Later(e)),
        }
    }

    /// Decides the guardrails and, when they allow it, runs.
    async fn start(
        self: &Arc<Self>,
        rb: &Runbook,
        mut rec: RunRecord,
        rev: u64,
    ) -> Result<(), Later> {
        let now = self.clock.now();
        if let Some(a) = &rb.guardrails.require_approval {
            if rec.approved_by.is_empty() && !rec.dry_run {
                // What would skip the run anyway skips it now, not after
                // someone approved it.
                if let Some(reason) = self.blocked(rb, &rec, now).await? {
                    return self.skip(rb, rec, rev, reason).await;
                }
                rec.state = RunState::AwaitingApproval;
                rec.approval_deadline = Some(add(now, a.timeout.0));
                rec.held = rb.page == PageMode::OnFailure;
                if self.save(&rec, rev).await?.is_none() {
                    return Ok(());
                }
                return self.announce_wait(rb, &rec).await;
            }
        }
        let decision = self.guardrails(rb, &rec, now).await?;
        match decision {
            Err(reason) => self.skip(rb, rec, rev, reason).await,
            Ok(leases) => {
                rec.state = RunState::Running;
                rec.leases = leases;
                // A run that waited for approval announced its hold then.
                let announced = rec.approval_deadline.is_some();
                rec.held = rb.page == PageMode::OnFailure && !rec.dry_run;
                let Some(rev) = self.save(&rec, rev).await? else {
                    return Ok(());
                };
                let steps = rb.steps.len();
                let mut mode = if rec.dry_run {
                    " (dry run: nothing is changed)".to_string()
                } else {
                    String::new()
                };
                if !rec.requested_by.is_empty() {
                    mode.push_str(&format!("; started by hand by {}", rec.requested_by));
                }
                if rec.held && !announced {
                    let until = add(now, rb.hold_at_most());
                    self.timeline(
                        &rec,
                        RUN,
                        "held",
                        format!(
                            "runbook {} is working on it: the first page waits until {until} unless the run ends first",
                            rb.name
                        ),
                        Some(until),
                    )
                    .await;
                }
                self.timeline(
                    &rec,
                    RUN,
                    "started",
                    format!("runbook {}: {steps} step(s){mode}", rb.name),
                    None,
                )
                .await;
                self.execute(rb, rec, rev).await
            }
        }
    }

    /// Records a run as skipped, with the reason.
    async fn skip(
        &self,
        rb: &Runbook,
        mut rec: RunRecord,
        rev: u64,
        reason: String,
    ) -> Result<(), Later> {
        rec.state = RunState::Skipped;
        rec.detail = reason.clone();
        if self.save(&rec, rev).await?.is_none() {
            return Ok(());
        }
        RemediationEvent::RunEnded {
            runbook: &rb.name,
            incident: rec.number,
            end: RunEnd::Skipped,
            reason: &reason,
        }
        .emit(&self.metrics);
        self.timeline(&rec, RUN, "skipped", reason, None).await;
        Ok(())
    }

    /// Why the runbook cannot run now, read-only: switched off, breaker
    /// open, cooling down (checked again, and counted, when it starts).
    async fn blocked(
        &self,
        rb: &Runbook,
        rec: &RunRecord,
        now: Timestamp,
    ) -> Result<Option<String>, Later> {
        if let Some(why) = self.disabled(rb).await? {
            return Ok(Some(why));
        }
        if let Some((b, _)) = self
            .guards
            .get::<Breaker>(&format!("breaker.{}", rb.name))
            .await?
        {
            if let Some(until) = b.open_until.filter(|u| *u > now) {
                return Ok(Some(format!(
                    "breaker open after {} consecutive failed runs, until {until}",
                    b.consecutive_failures
                )));
            }
        }
        if !rb.guardrails.cooldown.0.is_zero() {
            let dedup = rec.context["incident"]["dedup_key"].as_str().unwrap_or("");
            let ckey = format!("cool.{}.{}", rb.name, state::digest(dedup));
            if let Some((c, _)) = self.guards.get::<Cooldown>(&ckey).await? {
                if let Some(until) = c.until.filter(|u| *u > now) {
                    return Ok(Some(format!(
                        "cooldown: a run for this dedup key started less than {:?} ago; next run allowed after {until}",
                        rb.guardrails.cooldown.0
                    )));
                }
            }
        }
        Ok(None)
    }

    /// Whether the kill switch or the runbook's own switch is off, and by whom.
    async fn disabled(&self, rb: &Runbook) -> Result<Option<String>, Later> {
        for (key, what) in [
            (
                "disabled._all".to_string(),
                "remediation is switched off (kill switch)".to_string(),
            ),
            (
                format!("disabled.{}", rb.name),
                format!("runbook {} is disabled", rb.name),
            ),
        ] {
            if let Some((d, _)) = self.guards.get::<Disabled>(&key).await? {
                if d.disabled {
                    let by = if d.by.is_empty() {
                        String::new()
                    } else {
                        format!(" by {}", d.by)
                    };
                    return Ok(Some(format!("{what}{by}")));
                }
            }
        }
        Ok(None)
    }

    /// Takes over a run another replica was running when it went silent.
    async fn resume(
        self: &Arc<Self>,
        rb: &Runbook,
        mut rec: RunRecord,
        rev: u64,
    ) -> Result<(), Later> {
        rec.takeovers += 1;
        let Some(rev) = self.save(&rec, rev).await? else {
            return Ok(());
        };
        self.timeline(
            &rec,
            RUN,
            "resumed",
            format!(
                "runbook {}: taken over after the process running it stopped (takeover {}); completed steps are not run again",
                rb.name, rec.takeovers
            ),
            None,
        )
        .await;
        self.execute(rb, rec, rev).await
    }

    /// Runs (or goes on with) the steps, then the rollback if needed, then ends the run.
    async fn execute(
        self: &Arc<Self>,
        rb: &Runbook,
        mut rec: RunRecord,
        mut rev: u64,
    ) -> Result<(), Later> {
        let renew = self.renew_leases(&rec);
        let end = if rec.phase == Phase::Main {
            let limit = rb.guardrails.run_timeout.0.max(Duration::from_secs(1));
            match tokio::time::timeout(limit, self.steps(rb, &mut rec, &mut rev, Phase::Main)).await
            {
                Ok(r) => r?,
                Err(_) => StepsEnd::Failed {
                    step: RUN.into(),
                    summary: format!("the run took longer than its run_timeout ({limit:?})"),
                    rollback: true,
                },
            }
        } else {
            StepsEnd::Failed {
                step: rec.failed_step.clone(),
                summary: rec.detail.clone(),
                rollback: true,
            }
        };
        let result = match end {
            StepsEnd::Lost => Ok(()),
            StepsEnd::Done => self.finish(rb, rec, rev, None).await,
            StepsEnd::Failed {
                step,
                summary,
                rollback,
            } => {
                if rollback && !rb.rollback.is_empty() {
                    if rec.phase == Phase::Main {
                        rec.phase = Phase::Rollback;
                        rec.failed_step = step.clone();
                        rec.detail = summary.clone();
                        match self.save(&rec, rev).await? {
                            Some(r) => rev = r,
                            None => {
                                renew.abort();
                                return Ok(());
                            }
                        }
                        self.timeline(
                            &rec,
                            RUN,
                            "rolling_back",
                            format!(
                                "step {step} failed: rolling back ({} step(s))",
                                rb.rollback.len()
                            ),
                            None,
                        )
                        .await;
                    }
                    if let StepsEnd::Lost =
                        self.steps(rb, &mut rec, &mut rev, Phase::Rollback).await?
                    {
                        renew.abort();
                        return Ok(());
                    }
                }
                self.finish(rb, rec, rev, Some((step, summary))).await
            }
        };
        renew.abort();
        result
    }

    /// Keeps the run's leases from expiring while it runs.
    fn renew_leases(self: &Arc<Self>, rec: &RunRecord) -> tokio::task::JoinHandle<()> {
        let (me, leases, run) = (self.clone(), rec.leases.clone(), rec.run.clone());
        tokio::spawn(async move {
            let ttl = me.config.lease_ttl();
            loop {
                tokio::time::sleep(ttl / 3).await;
                let now = me.clock.now();
                for l in &leases {
                    if let Err(e) = state::take_lease(&me.locks, l, &run, now, add(now, ttl)).await
                    {
                        tracing::warn!(error = %e, lease = %l, "cannot renew a lease");
                    }
                }
            }
        })
    }

    async fn steps(
        self: &Arc<Self>,
        rb: &Runbook,
        rec: &mut RunRecord,
        rev: &mut u64,
        phase: Phase,
    ) -> Result<StepsEnd, Later> {
        let list: &[Step] = match phase {
            Phase::Main => &rb.steps,
            Phase::Rollback => &rb.rollback,
        };
        let prefix = match phase {
            Phase::Main => "",
            Phase::Rollback => "rollback ",
        };
        for step in list {
            let st = rec.states(phase).get(&step.id).cloned().unwrap_or_default();
            if st.done {
                continue;
            }
            let repeatable = step.idempotent
                || matches!(
                    step.kind(),
                    // A notify's message id makes a repeat a no-op.
                    Kind::Wait | Kind::Check | Kind::Ack | Kind::Resolve | Kind::Notify
                );
            if st.started && !repeatable {
                let summary = format!(
                    "{prefix}step {} ({}) was in flight when the process running it stopped; it is not idempotent, so it is not run again",
                    step.id,
                    step.kind().as_str()
                );
                rec.states(phase).insert(
                    step.id.clone(),
                    StepState {
                        started: true,
                        done: true,
                        output: empty_output("failed"),
                    },
                );
                match self.save(rec, *rev).await? {
                    Some(r) => *rev = r,
                    None => return Ok(StepsEnd::Lost),
                }
                RemediationEvent::StepEnded { outcome: "failed" }.emit(&self.metrics);
                self.timeline(rec, &step.id, "failed", summary.clone(), None)
                    .await;
                if phase == Phase::Main {
                    return Ok(StepsEnd::Failed {
                        step: step.id.clone(),
                        summary,
                        rollback: true,
                    });
                }
                continue;
            }
            let ctx = rec.context(rb);
            let run_it = match &step.when {
                None => Ok(true),
                Some(w) => template::condition(w, &ctx),
            };
            let outcome = match run_it {
                Ok(false) => {
                    rec.states(phase).insert(
                        step.id.clone(),
                        StepState {
                            started: false,
                            done: true,
                            output: empty_output("skipped"),
                        },
                    );
                    match self.save(rec, *rev).await? {
                        Some(r) => *rev = r,
                        None => return Ok(StepsEnd::Lost),
                    }
                    RemediationEvent::StepEnded { outcome: "skipped" }.emit(&self.metrics);
                    self.timeline(
                        rec,
                        &step.id,
                        "skipped",
                        format!("{prefix}step {}: `when` is false", step.id),
                        None,
                    )
                    .await;
                    continue;
                }
                Err(m) => Outcome {
                    ok: false,
                    summary: format!("when: {m}"),
                    output: empty_output("failed"),
                },
                Ok(true) => {
                    rec.states(phase).insert(
                        step.id.clone(),
                        StepState {
                            started: true,
                            done: false,
                            output: Value::Null,
                        },
                    );
                    match self.save(rec, *rev).await? {
                        Some(r) => *rev = r,
                        None => return Ok(StepsEnd::Lost),
                    }
                    self.attempts(rb, rec, step, &ctx).await
                }
            };
            rec.states(phase).insert(
                step.id.clone(),
                StepState {
                    started: true,
                    done: true,
                    output: outcome.output.clone(),
                },
            );
            match self.save(rec, *rev).await? {
                Some(r) => *rev = r,
                None => return Ok(StepsEnd::Lost),
            }
            let status = if rec.dry_run && outcome.ok {
                "dry_run"
            } else if outcome.ok {
                "succeeded"
            } else {
                "failed"
            };
            RemediationEvent::StepEnded { outcome: status }.emit(&self.metrics);
            let detail = self.describe(prefix, step, &outcome);
            self.timeline(rec, &step.id, status, detail, None).await;
            if !outcome.ok && phase == Phase::Main {
                match step.on_failure {
                    OnFailure::Continue => {}
                    OnFailure::Abort | OnFailure::Rollback => {
                        return Ok(StepsEnd::Failed {
                            step: step.id.clone(),
                            summary: outcome.summary,
                            rollback: step.on_failure == OnFailure::Rollback,
                        })
                    }
                }
            }
        }
        Ok(StepsEnd::Done)
    }

    /// One timeline line for a step: type, outcome, duration, bounded output.
    fn describe(&self, prefix: &str, step: &Step, o: &Outcome) -> String {
        let ms = o
            .output
            .get("duration_ms")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        let attempts = o
            .output
            .get("attempts")
            .and_then(Value::as_u64)
            .unwrap_or(1);
        let mut d = format!(
            "{prefix}{} {}: {} in {:.1}s",
            step.kind().as_str(),
            step.id,
            o.summary,
            ms as f64 / 1000.0
        );
        if attempts > 1 {
            d.push_str(&format!(" ({attempts} attempts)"));
        }
        let max = self.limits.max_output;
        for f in ["stdout", "stderr", "body"] {
            if let Some(s) = o.output.get(f).and_then(Value::as_str) {
                if !s.trim().is_empty() {
                    d.push_str(&format!("\n{f}: {}", steps::cut(s.trim_end(), max)));
                }
            }
        }
        d
    }

    /// Runs a step with its retries and backoff.
    async fn attempts(&self, rb: &Runbook, rec: &RunRecord, step: &Step, ctx: &Value) -> Outcome {
        let started = std::time::Instant::now();
        let mut delay = step.backoff();
        let mut n = 0;
        loop {
            n += 1;
            let mut o = self.attempt(rb, rec, step, ctx).await;
            if o.ok || n > step.retries {
                o.output["attempts"] = n.into();
                o.output["duration_ms"] = (started.elapsed().as_millis() as u64).into();
                return o;
            }
            tracing::info!(runbook = %rb.name, step = %step.id, attempt = n, summary = %o.summary, "step failed; retrying");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(300));
        }
    }

    async fn attempt(&self, rb: &Runbook, rec: &RunRecord, step: &Step, ctx: &Value) -> Outcome {
        let timeout = step.timeout();
        let dry = rec.dry_run;
        let ok = |summary: String| Outcome {
            ok: true,
            summary,
            output: {
                let mut o = empty_output("succeeded");
                o["status"] = "succeeded".into();
                o
            },
        };
        let fail = |summary: String| Outcome {
            ok: false,
            summary,
            output: empty_output("failed"),
        };
        let render = |t: &str| template::render(t, ctx);
        match step.kind() {
            Kind::Exec => {
                let e = step.exec.as_ref().expect("checked at load");
                if !self.config.allowed_programs.contains(&e.argv[0]) {
                    return fail(format!(
                        "program {:?} is not on remediation.allowed_programs",
                        e.argv[0]
                    ));
                }
                if dry {
                    return match e
                        .argv
                        .iter()
                        .map(|a| render(a))
                        .collect::<Result<Vec<_>, _>>()
                    {
                        Ok(argv) => ok(format!("would run {argv:?}")),
                        Err(m) => fail(m),
                    };
                }
                steps::exec(e, ctx, timeout, &self.limits).await
            }
            Kind::Http => {
                let h = step.http.as_ref().expect("checked at load");
                if dry {
                    return match template::render_url(&h.url, ctx) {
                        Ok(u) => ok(format!("would send {} {u}", h.method)),
                        Err(m) => fail(m),
                    };
                }
                steps::http(&self.http, h, ctx, timeout, &self.limits).await
            }
            Kind::Check => {
                let c = step.check.as_ref().expect("checked at load");
                if dry {
                    return ok("would check until the condition holds".into());
                }
                if let Some(e) = &c.exec {
                    if !e
                        .argv
                        .first()
                        .is_some_and(|p| self.config.allowed_programs.contains(p))
                    {
                        return fail(
                            "the probe's program is not on remediation.allowed_programs".into(),
                        );
                    }
                }
                steps::check(&self.http, c, ctx, timeout, &self.limits).await
            }
            Kind::Nats => {
                let n = step.nats.as_ref().expect("checked at load");
                if dry {
                    return match template::render(&n.subject, ctx) {
                        Ok(s) => ok(format!("would request {s}")),
                        Err(m) => fail(m),
                    };
                }
                steps::nats(&self.js.client(), n, ctx, timeout, &self.limits).await
            }
            Kind::Notify => {
                let n = step.notify.as_ref().expect("checked at load");
                let (target, channel, to) = match (&n.slack, &n.webhook) {
                    (Some(c), _) => match render(c) {
                        Ok(c) => (
                            PageTarget::SlackChannel { channel: c.clone() },
                            Channel::Slack,
                            format!("slack {c}"),
                        ),
                        Err(m) => return fail(m),
                    },
                    (None, Some(w)) => match render(w) {
                        Ok(w) => (
                            PageTarget::Webhook { name: w.clone() },
                            Channel::Webhook,
                            format!("webhook {w}"),
                        ),
                        Err(m) => return fail(m),
                    },
                    (None, None) => return fail("notify names no slack channel or webhook".into()),
                };
                let message = match render(&n.message) {
                    Ok(m) => steps::cut(&m, 4000),
                    Err(m) => return fail(m),
                };
                if dry {
                    return ok(format!("would post to {to}: {message}"));
                }
                let Some(incident) = rec.summary.clone() else {
                    return fail(
                        "the run has no incident summary (started by an older version)".into(),
                    );
                };
                let page = Page {
                    id: format!("rem:{}:{}", state::digest(&rec.run), step.id),
                    incident,
                    level: 0,
                    repeat: 0,
                    target,
                    channel,
                    address: String::new(),
                    reason: format!("runbook {}: {message}", rb.name),
                    due_at: self.clock.now(),
                    kind: MessageKind::Page,
                };
                match self.publish_page(&page).await {
                    Ok(()) => ok(format!("posted to {to} through the notifier")),
                    Err(e) => fail(format!("cannot post to {to}: {e}")),
                }
            }
            Kind::Wait => {
                let d = step
                    .wait
                    .map(|w| w.0)
                    .unwrap_or_default()
                    .min(crate::runbook::MAX_STEP_TIMEOUT);
                if dry {
                    return ok(format!("would wait {d:?}"));
                }
                tokio::time::sleep(d).await;
                ok(format!("waited {d:?}"))
            }
            Kind::Annotate | Kind::Ack | Kind::Resolve | Kind::Escalate => {
                let incident = IncidentRef::Id(rec.incident);
                let action = match step.kind() {
                    Kind::Annotate => match render(step.annotate.as_deref().unwrap_or("")) {
                        Ok(text) => Action::Note {
                            incident,
                            text: steps::cut(&text, 8000),
                        },
                        Err(m) => return fail(m),
                    },
                    Kind::Ack => Action::Ack { incident },
                    Kind::Resolve => Action::Resolve { incident },
                    _ => match render(step.escalate.as_deref().unwrap_or("")) {
                        Ok(reason) => Action::Escalate {
                            incident,
                            reason: steps::cut(&format!("runbook {}: {reason}", rb.name), 2000),
                        },
                        Err(m) => return fail(m),
                    },
                };
                let name = action.name();
                if dry {
                    return ok(format!("would send {name}"));
                }
                let id = format!("rem-{}-{}-{name}", state::digest(&rec.run), step.id);
                match self.send(&rb.name, action, id, true).await {
                    Ok(Some(CommandReply::Accepted { message, .. })) => ok(message),
                    // What the step wanted is already so (the alert resolved
                    // the incident when the fix took): done, not failed.
                    Ok(Some(CommandReply::Rejected { reason, .. }))
                        if step.kind() == Kind::Resolve
                            && reason.ends_with("is already resolved") =>
                    {
                        ok(reason)
                    }
                    Ok(Some(CommandReply::Rejected { reason, .. })) => {
                        fail(format!("{name} rejected: {reason}"))
                    }
                    Ok(None) => ok(format!("{name} was already applied")),
                    Err(e) => fail(format!("{name} not sent: {e}")),
                }
            }
        }
    }

    /// Ends a run: its state, the breaker, the leases, the cooldown; says
    /// so on the timeline; on failure pages (ends the hold, or escalates).
    async fn finish(
        self: &Arc<Self>,
        rb: &Runbook,
        mut rec: RunRecord,
        rev: u64,
        failure: Option<(String, String)>,
    ) -> Result<(), Later> {
        rec.state = if failure.is_some() {
            RunState::Failed
        } else {
            RunState::Succeeded
        };
        if let Some((step, summary)) = &failure {
            rec.failed_step = step.clone();
            rec.detail = summary.clone();
        }
        if self.save(&rec, rev).await?.is_none() {
            return Ok(());
        }
        for l in &rec.leases {
            if let Err(e) = state::release_lease(&self.locks, l, &rec.run).await {
                tracing::warn!(error = %e, lease = %l, "cannot free a lease; it expires by itself");
            }
        }
        let breaker_note = self.count_outcome(rb, failure.is_none()).await;
        match failure {
            None => {
                RemediationEvent::RunEnded {
                    runbook: &rb.name,
                    incident: rec.number,
                    end: RunEnd::Succeeded,
                    reason: "",
                }
                .emit(&self.metrics);
                self.timeline(
                    &rec,
                    RUN,
                    "succeeded",
                    format!("runbook {} succeeded", rb.name),
                    None,
                )
                .await;
            }
            Some((step, summary)) => {
                let mut reason = format!(
                    "runbook {} failed at step {step}: {}",
                    rb.name,
                    steps::cut(&summary, 1000)
                );
                if !rb.rollback.is_empty() && rec.phase == Phase::Rollback {
                    reason.push_str(" (rolled back)");
                }
                if let Some(b) = &breaker_note {
                    reason.push_str("; ");
                    reason.push_str(b);
                }
                RemediationEvent::RunEnded {
                    runbook: &rb.name,
                    incident: rec.number,
                    end: RunEnd::Failed,
                    reason: &reason,
                }
                .emit(&self.metrics);
                self.timeline(&rec, RUN, "failed", reason.clone(), None)
                    .await;
                // A held page fires now (the `failed` entry ends the hold,
                // and escalation puts the reason on the page); otherwise the
                // incident escalates now.
                if !rec.held && !rec.dry_run {
                    let id = format!("rem-{}-escalate", state::digest(&rec.run));
                    let action = Action::Escalate {
                        incident: IncidentRef::Id(rec.incident),
                        reason,
                    };
                    if let Err(e) = self.send(&rb.name, action, id, false).await {
                        return Err(Later(format!("cannot escalate: {e}")));
                    }
                }
            }
        }
        Ok(())
    }

    /// Moves the breaker on; a note when it opened.
    async fn count_outcome(&self, rb: &Runbook, ok: bool) -> Option<String> {
        let key = format!("breaker.{}", rb.name);
        for _ in 0..10 {
            let (mut b, rev) = match self.guards.get::<Breaker>(&key).await {
                Ok(Some((b, rev))) => (b, Some(rev)),
                Ok(None) => (Breaker::default(), None),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the breaker");
                    return None;
                }
            };
            let mut note = None;
            if ok {
                if b.consecutive_failures == 0 && b.open_until.is_none() {
                    return None;
                }
                b = Breaker::default();
            } else {
                b.consecutive_failures += 1;
                if b.consecutive_failures >= rb.guardrails.breaker_after && b.open_until.is_none() {
                    let until = add(self.clock.now(), rb.guardrails.breaker_reset.0);
                    b.open_until = Some(until);
                    note = Some(format!(
                        "breaker open: {} consecutive failed runs; runbook {} is skipped until {until}",
                        b.consecutive_failures, rb.name
                    ));
                }
            }
            match self.guards.write(&key, &b, rev).await {
                Ok(_) => return note,
                Err(WriteError::Conflict) => continue,
                Err(WriteError::Failed(e)) => {
                    tracing::warn!(error = %e, "cannot write the breaker");
                    return None;
                }
            }
        }
        None
    }

    /// Ok(leases) when the run may start, Err(reason) when it is skipped.
    async fn guardrails(
        &self,
        rb: &Runbook,
        rec: &RunRecord,
        now: Timestamp,
    ) -> Result<Result<Vec<String>, String>, Later> {
        let g = &rb.guardrails;
        if let Some(why) = self.disabled(rb).await? {
            return Ok(Err(why));
        }
        let bkey = format!("breaker.{}", rb.name);
        if let Some((mut b, rev)) = self.guards.get::<Breaker>(&bkey).await? {
            match b.open_until {
                Some(until) if until > now => {
                    return Ok(Err(format!(
                        "breaker open after {} consecutive failed runs, until {until}",
                        b.consecutive_failures
                    )))
                }
                Some(_) => {
                    // Half-open: this run is the trial; a failure opens it again.
                    b.open_until = None;
                    b.consecutive_failures = g.breaker_after.saturating_sub(1);
                    if let Err(WriteError::Conflict) = self.guards.write(&bkey, &b, Some(rev)).await
                    {
                        return Ok(Err("breaker half-open: another run is the trial".into()));
                    }
                }
                None => {}
            }
        }
        let dedup = rec.context["incident"]["dedup_key"]
            .as_str()
            .unwrap_or("")
            .to_string();
        let ckey = format!("cool.{}.{}", rb.name, state::digest(&dedup));
        if !g.cooldown.0.is_zero() {
            if let Some((c, _)) = self.guards.get::<Cooldown>(&ckey).await? {
                if let Some(until) = c.until.filter(|u| *u > now) {
                    return Ok(Err(format!(
                        "cooldown: a run for this dedup key started less than {:?} ago; next run allowed after {until}",
                        g.cooldown.0
                    )));
                }
            }
        }
        let hour = now.as_second().div_euclid(3600);
        let hkey = format!("hour.{}.{hour}", rb.name);
        let mut hourly: Option<(Count, Option<u64>)> = None;
        if let Some(max) = g.max_runs_per_hour {
            let (c, rev) = match self.guards.get::<Count>(&hkey).await? {
                Some((c, rev)) => (c, Some(rev)),
                None => (Count::default(), None),
            };
            if c.n >= max {
                return Ok(Err(format!(
                    "max_runs_per_hour: {max} runs already started this hour"
                )));
            }
            hourly = Some((c, rev));
        }
        let until = add(now, self.config.lease_ttl());
        let mut leases = Vec::new();
        if let Some(t) = &g.concurrency_key {
            let value = match template::render(t, &rec.context(rb)) {
                Ok(v) => v,
                // A label the key names is missing: that cannot change by
                // retrying, so the run is skipped, saying why.
                Err(m) => return Ok(Err(format!("concurrency_key: {m}"))),
            };
            let key = format!("key.{}.{}", rb.name, state::digest(&value));
            if !state::take_lease(&self.locks, &key, &rec.run, now, until).await? {
                return Ok(Err(format!(
                    "concurrency_key: a run for {value:?} is already in progress"
                )));
            }
            leases.push(key);
        }
        // Slots are tried from a place that depends on the run, so
        // concurrent runs rarely try the same slot and a free one is found
        // in a read or two (not a scan of every held one).
        let mut slot = None;
        let first = u32::from_str_radix(&state::digest(&rec.run)[..8], 16).unwrap_or(0);
        for j in 0..g.max_concurrent {
            let i = (first.wrapping_add(j)) % g.max_concurrent;
            let key = format!("slot.{}.{i}", rb.name);
            if state::take_lease(&self.locks, &key, &rec.run, now, until).await? {
                slot = Some(key);
                break;
            }
        }
        let release = |leases: Vec<String>| async move {
            for l in leases {
                let _ = state::release_lease(&self.locks, &l, &rec.run).await;
            }
        };
        match slot {
            Some(s) => leases.push(s),
            None => {
                release(leases).await;
                return Ok(Err(format!(
                    "max_concurrent: {} run(s) of runbook {} already in progress",
                    g.max_concurrent, rb.name
                )));
            }
        }
        if let (Some(max), Some((mut c, mut rev))) = (g.max_runs_per_hour, hourly) {
            loop {
                if c.n >= max {
                    release(leases).await;
                    return Ok(Err(format!(
                        "max_runs_per_hour: {max} runs already started this hour"
                    )));
                }
                c.n += 1;
                match self.guards.write(&hkey, &c, rev).await {
                    Ok(_) => break,
                    Err(WriteError::Conflict) => {
                        (c, rev) = match self.guards.get::<Count>(&hkey).await? {
                            Some((c, r)) => (c, Some(r)),
                            None => (Count::default(), None),
                        };
                    }
                    Err(WriteError::Failed(e)) => {
                        release(leases).await;
                        return Err(Later(e));
                    }
                }
            }
        }
        if !g.cooldown.0.is_zero() {
            let c = Cooldown {
                until: Some(add(now, g.cooldown.0)),
            };
            self.guards.put(&ckey, &c).await?;
        }
        Ok(Ok(leases))
    }

    /// Puts a line on the incident's timeline (a `remediation` command).
    /// Its id is derived from the run, step and status, so a repeat after a
    /// crash is dropped by JetStream.
    async fn timeline(
        &self,
        rec: &RunRecord,
        step: &str,
        status: &str,
        detail: String,
        hold_until: Option<Timestamp>,
    ) {
        let phase = match rec.phase {
            Phase::Main => "m",
            Phase::Rollback => "r",
        };
        let id = format!(
            "rem-{}-{phase}-{step}-{status}-{}",
            state::digest(&rec.run),
            rec.takeovers
        );
        let action = Action::Remediation {
            incident: IncidentRef::Id(rec.incident),
            runbook: rec.runbook.clone(),
            step: step.to_string(),
            status: status.to_string(),
            detail: steps::cut(&detail, 3 * self.limits.max_output + 1000),
            hold_until,
        };
        // Progress records are retried a few times; a timeline line that
        // cannot be written is logged, never a reason to stop the run.
        for i in 0..5 {
            match self
                .send(&rec.runbook, action.clone(), id.clone(), false)
                .await
            {
                Ok(_) => return,
                Err(e) if i == 4 => {
                    tracing::warn!(error = %e, run = %rec.run, step, status, "cannot record a remediation step on the timeline")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200 << i)).await,
            }
        }
    }

    /// Puts a message on NOTIFY for the notifier (its id is the message id,
    /// so a repeat is dropped by JetStream).
    async fn publish_page(&self, page: &Page) -> Result<(), String> {
        let env = Envelope::new("remediation", self.clock.now(), page.clone());
        let payload = codec::encode(&env).map_err(|e| e.to_string())?;
        let mut h = HeaderMap::new();
        h.insert(headers::MSG_ID, page.id.as_str());
        self.js
            .publish_with_headers(page.subject(), h, payload.into())
            .await
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        Ok(())
    }

    /// Sends a command; with `wait`, waits for the incidents service's
    /// answer (Ok(None): JetStream had it already, so it was applied).
    async fn send(
        &self,
        runbook: &str,
        action: Action,
        id: String,
        wait: bool,
    ) -> Result<Option<CommandReply>, String> {
        let cmd = Command {
            id: id.clone(),
            actor: Actor::new(runbook, "runbook"),
            action,
        };
        let client = self.js.client();
        let mut h = HeaderMap::new();
        h.insert(headers::MSG_ID, id.as_str());
        let mut replies = None;
        if wait {
            let inbox = client.new_inbox();
            replies = Some(
                client
                    .subscribe(inbox.clone())
                    .await
                    .map_err(|e| e.to_string())?,
            );
            h.insert(headers::REPLY_TO, inbox.as_str());
        }
        let env = Envelope::new("remediation", self.clock.now(), cmd.clone());
        let payload = codec::encode(&env).map_err(|e| e.to_string())?;
        let ack = self
            .js
            .publish_with_headers(cmd.subject(), h, payload.into())
            .await
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        let Some(mut replies) = replies else {
            return Ok(None);
        };
        if ack.duplicate {
            return Ok(None);
        }
        match tokio::time::timeout(Duration::from_secs(15), replies.next()).await {
            Ok(Some(msg)) => codec::decode::<CommandReply>(&msg.payload)
                .map(Some)
                .map_err(|e| e.to_string()),
            _ => Err("no answer from the incidents service within 15s".into()),
        }
    }
}

/// Why a run that waited for approval did not run.
fn timed_out(rec: &RunRecord) -> String {
    match rec.approval_deadline {
        Some(d) => format!("no approve or deny by {d} (require_approval.timeout)"),
        None => "no approve or deny in time (require_approval.timeout)".into(),
    }
}
