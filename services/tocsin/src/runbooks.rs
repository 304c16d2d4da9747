//! `tocsin runbook lint <files>` and `tocsin runbook list`: local checks of
//! runbook files against the config's `remediation:` section (its
//! allowlist and folders); no NATS needed.
//!
//! `tocsin runbook run|approve|deny|disable|enable` ask the running
//! services: `run`, `approve` and `deny` are commands the incidents service
//! records on the incident's timeline (who asked), where the remediation
//! service reads them; the remediation service is asked first
//! (`tocsin.query.remediation`) whether the runbook is loaded or the run
//! waits for approval, so a typo is refused at once. `disable` and `enable`
//! are answered by the remediation service, which keeps the switches.

use std::{path::Path, process::ExitCode};

use serde::Deserialize;
use serde_json::json;
use tocsin_proto::{
    codec,
    command::{Action, IncidentRef},
    incident::RunbookRequest,
};
use tocsin_remediation::{
    control::{self, Control, ControlReply},
    runbook, RemediationConfig,
};

use crate::{
    cli::{RunbookCommand, Usage},
    config::OperatorConfig,
    ops::Refused,
};

/// The part of the config these commands read (other sections are ignored).
#[derive(Debug, Default, Deserialize)]
struct Section {
    #[serde(default)]
    remediation: Option<RemediationConfig>,
}

pub fn command(config: &Path, c: &RunbookCommand) -> ExitCode {
    let section: Section = match tocsin_runtime::config::load(config) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let rc = section.remediation.unwrap_or_default();
    match c {
        RunbookCommand::Lint { files } => {
            let (out, ok) = lint(files, &rc.allowed_programs);
            print!("{out}");
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        RunbookCommand::List => {
            print!("{}", list(&rc));
            ExitCode::SUCCESS
        }
        _ => unreachable!("the other runbook commands ask the services"),
    }
}

/// Asks the remediation service.
async fn ask(
    config: &OperatorConfig,
    client: &async_nats::Client,
    c: &Control,
) -> anyhow::Result<ControlReply> {
    let patience = config.patience;
    let resp = tokio::time::timeout(
        patience,
        client.request(control::SUBJECT, codec::encode(c)?.into()),
    )
    .await
    .map_err(|_| {
        anyhow::anyhow!("no answer within {patience:?}; is the remediation service running?")
    })?
    .map_err(|e| crate::ops::request_failed(&e, "remediation"))?;
    match codec::decode::<ControlReply>(&resp.payload)? {
        ControlReply::Error { reason } => Err(Refused(reason).into()),
        r => Ok(r),
    }
}

/// The incident a run id names (`<incident id>.<runbook>.<number>`, or
/// `.<number>.<index>` for a run started by an entry stored with others).
fn run_incident(run: &str) -> Result<uuid::Uuid, Usage> {
    tocsin_proto::incident::run_incident(run).ok_or_else(|| {
        Usage(format!(
            "{run:?} is not a run id (<incident id>.<runbook>.<number>[.<index>], as the incident's timeline shows it)"
        ))
    })
}

/// `tocsin runbook run|approve|deny|disable|enable`: the text (or JSON) to print.
pub async fn remote(config: &OperatorConfig, c: &RunbookCommand) -> anyhow::Result<String> {
    let client = crate::ops::connect(config).await?;
    match c {
        RunbookCommand::Run {
            name,
            incident,
            dry_run,
            who,
        } => {
            let ControlReply::Runbooks { runbooks, .. } =
                ask(config, &client, &Control::Runbooks).await?
            else {
                anyhow::bail!("the remediation service answered something else");
            };
            let needs_approval = runbooks
                .iter()
                .any(|r| r.name == *name && r.approval_timeout_secs.is_some());
            if !runbooks.iter().any(|r| r.name == *name) {
                let names: Vec<&str> = runbooks.iter().map(|r| r.name.as_str()).collect();
                return Err(Refused(format!(
                    "no runbook {name:?} is loaded by the remediation service (loaded: {})",
                    if names.is_empty() {
                        "none".into()
                    } else {
                        names.join(", ")
                    }
                ))
                .into());
            }
            let action = Action::Runbook {
                incident: incident.clone(),
                request: RunbookRequest::Run {
                    runbook: name.clone(),
                    dry_run: *dry_run,
                },
            };
            let message = crate::ops::command(config, &who.actor, action).await?;
            if who.output.output == "json" {
                return crate::ops::to_json(&json!({
                    "runbook": name,
                    "incident": incident.to_string(),
                    "dry_run": dry_run,
                    "message": message,
                }));
            }
            let next = if needs_approval && !*dry_run {
                "the run waits for approval first (its id is on the timeline)"
            } else {
                "the remediation service starts it"
            };
            Ok(format!(
                "{message}\n{next}; `tocsin show {incident}` lists its steps\n"
            ))
        }
        RunbookCommand::Approve { run, who } | RunbookCommand::Deny { run, who } => {
            let approve = matches!(c, RunbookCommand::Approve { .. });
            let id = run_incident(run)?;
            let ControlReply::Run { run: info } =
                ask(config, &client, &Control::Run { run: run.clone() }).await?
            else {
                anyhow::bail!("the remediation service answered something else");
            };
            let Some(info) = info else {
                return Err(Refused(format!("no run {run}")).into());
            };
            if info.state != "awaiting_approval" {
                let detail = if info.detail.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", info.detail)
                };
                return Err(Refused(format!(
                    "run {run} is {}, not waiting for approval{detail}",
                    info.state
                ))
                .into());
            }
            let request = if approve {
                RunbookRequest::Approve { run: run.clone() }
            } else {
                RunbookRequest::Deny { run: run.clone() }
            };
            let action = Action::Runbook {
                incident: IncidentRef::Id(id),
                request,
            };
            let message = crate::ops::command(config, &who.actor, action).await?;
            let effect = if approve {
                "it runs now"
            } else {
                "it does not run; the incident escalates"
            };
            if who.output.output == "json" {
                return crate::ops::to_json(&json!({
                    "run": run,
                    "runbook": info.runbook,
                    "incident": info.incident,
                    "decision": if approve { "approve" } else { "deny" },
                    "message": message,
                }));
            }
            Ok(format!(
                "{message}\nrun {run} of runbook {} on incident #{}: {effect}\n",
                info.runbook, info.incident
            ))
        }
        RunbookCommand::Disable { name, all, who } | RunbookCommand::Enable { name, all, who } => {
            let disabled = matches!(c, RunbookCommand::Disable { .. });
            let runbook = match (all, name) {
                (true, _) => control::ALL.to_string(),
                (false, Some(n)) => n.clone(),
                (false, None) => return Err(Usage("name a runbook or give --all".into()).into()),
            };
            let switch = Control::Switch {
                runbook: runbook.clone(),
                disabled,
                by: who.actor.clone(),
            };
            let ControlReply::Switched { message } = ask(config, &client, &switch).await? else {
                anyhow::bail!("the remediation service answered something else");
            };
            if who.output.output == "json" {
                return crate::ops::to_json(&json!({
                    "runbook": if *all { None } else { Some(runbook) },
                    "all": all,
                    "disabled": disabled,
                    "message": message,
                }));
            }
            Ok(format!("{message}\n"))
        }
        RunbookCommand::Lint { .. } | RunbookCommand::List => {
            unreachable!("lint and list read local files")
        }
    }
}

/// Checks every file; the report and whether all passed.
pub fn lint(files: &[std::path::PathBuf], allowed: &[String]) -> (String, bool) {
    let mut out = String::new();
    let mut ok = true;
    for f in files {
        match runbook::load_file(f, allowed) {
            Ok(rb) => out.push_str(&format!("{}: ok ({})\n", f.display(), rb.name)),
            Err(e) => {
                ok = false;
                out.push_str(&format!("{e}\n"));
            }
        }
    }
    (out, ok)
}

/// One line per loaded runbook, then the refused files.
pub fn list(rc: &RemediationConfig) -> String {
    let (loaded, errors) = tocsin_remediation::load_runbooks(rc);
    let mut out = format!(
        "{:<28} {:<9} {:<12} {:<6} FILE\n",
        "NAME", "DRY RUN", "PAGE", "STEPS"
    );
    for l in &loaded {
        let rb = &l.runbook;
        out.push_str(&format!(
            "{:<28} {:<9} {:<12} {:<6} {}\n",
            rb.name,
            if rb.dry_run || rc.dry_run {
                "yes"
            } else {
                "no"
            },
            match rb.page {
                runbook::PageMode::Immediately => "immediately",
                runbook::PageMode::OnFailure => "on_failure",
            },
            rb.steps.len(),
            l.path.display()
        ));
    }
    if loaded.is_empty() {
        out.push_str("(no runbooks: set remediation.runbook_dirs)\n");
    }
    for e in errors {
        out.push_str(&format!("refused: {e}\n"));
    }
    out
}
