//! Remediation in tests: a config whose runbooks live in a temp folder, a
//! recording program (appends each of its arguments, one per line, to a
//! file: what reached it as argv, literally), the demo target, and the
//! runbook entries of an incident's timeline.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use async_nats::Client;
use tocsin::config::Config;
use tocsin_proto::{
    command::IncidentRef,
    incident::{EventKind, IncidentEvent},
};
use tocsin_remediation::RemediationConfig;
use tocsin_runtime::config::{ConfigPath, HumanDuration};

use crate::{escalation::REFERENCE, NatsServer, TocsinHarness};

/// A folder of runbooks and the files tests need beside them.
pub struct Runbooks {
    pub dir: tempfile::TempDir,
}

impl Runbooks {
    pub fn new() -> Runbooks {
        Runbooks {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    /// The folder runbooks go in.
    pub fn path(&self) -> PathBuf {
        self.dir.path().join("runbooks")
    }

    /// Writes runbook `name`.yaml.
    pub fn add(&self, name: &str, text: &str) {
        std::fs::create_dir_all(self.path()).unwrap();
        std::fs::write(self.path().join(format!("{name}.yaml")), text).unwrap();
    }

    /// A recording program: appends each argument on its own line to
    /// `$RECORD_TO`, then exits with `$EXIT` (default 0) after `$SLEEP`
    /// seconds (default 0).
    pub fn recorder(&self) -> PathBuf {
        let p = self.dir.path().join("record");
        let script = "#!/bin/sh\nfor a in \"$@\"; do printf '%s\\n' \"$a\" >> \"$RECORD_TO\"; done\nsleep \"${SLEEP:-0}\"\nexit \"${EXIT:-0}\"\n";
        std::fs::write(&p, script).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    /// Where the recorder writes (`RECORD_TO`).
    pub fn record_file(&self) -> PathBuf {
        self.dir.path().join("argv.txt")
    }

    /// The recorded lines so far.
    pub fn recorded(&self) -> Vec<String> {
        std::fs::read_to_string(self.record_file())
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

impl Default for Runbooks {
    fn default() -> Self {
        Self::new()
    }
}

/// The `remediation:` section for `dir`, allowing `programs`.
pub fn remediation_config(dir: &Path, programs: &[&str]) -> RemediationConfig {
    RemediationConfig {
        runbook_dirs: vec![ConfigPath(dir.to_path_buf())],
        allowed_programs: programs.iter().map(|s| s.to_string()).collect(),
        ack_wait: HumanDuration(Duration::from_secs(3)),
        ..Default::default()
    }
}

/// The harness config with the reference escalation policy, a 30 s group
/// wait (so a runbook's hold lands before the first level is due, on the
/// manual clock) and remediation over `dir`.
pub fn config(nats: &NatsServer, dir: &Path, programs: &[&str]) -> Config {
    let mut config = TocsinHarness::config(nats);
    config.escalation = serde_yaml_ng::from_str(REFERENCE).unwrap();
    config.incidents.group_wait = HumanDuration(Duration::from_secs(30));
    config.remediation = Some(remediation_config(dir, programs));
    config
}

/// The runbook entries of a timeline: (runbook, step, status, detail).
pub fn steps(timeline: &[IncidentEvent]) -> Vec<(String, String, String, String)> {
    timeline
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::Remediation {
                runbook,
                step,
                status,
                detail,
                ..
            } => Some((
                runbook.clone(),
                step.clone(),
                status.clone(),
                detail.clone(),
            )),
            _ => None,
        })
        .collect()
}

/// Polls incident `n`'s timeline until `done` holds (30 s at most).
pub async fn wait_timeline<F: Fn(&[IncidentEvent]) -> bool>(
    client: &Client,
    n: u64,
    what: &str,
    done: F,
) -> Vec<IncidentEvent> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let d = crate::incidents::ask::<_, tocsin_proto::query::QueryReply>(
            client,
            tocsin_proto::subjects::query::GET_INCIDENT,
            &tocsin_proto::query::GetIncident {
                incident: IncidentRef::Number(n),
                timeline: true,
            },
        )
        .await;
        let tl = match d {
            tocsin_proto::query::QueryReply::Incident(d) => d.timeline,
            _ => Vec::new(),
        };
        if done(&tl) {
            return tl;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what} on incident #{n}; runbook entries: {:#?}",
            steps(&tl)
        );
        // Poll interval of a wait for something to happen (with a deadline), not a wait to prove that nothing did.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether the timeline has runbook entry (step, status).
pub fn has(tl: &[IncidentEvent], step: &str, status: &str) -> bool {
    steps(tl)
        .iter()
        .any(|(_, s, st, _)| s == step && st == status)
}

/// The demo target on a port-0 listener; its base URL. Stops with `stop`.
pub async fn demo_target(stop: tocsin_runtime::CancellationToken) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(tocsin::demo::serve(listener, stop));
    url
}

/// The id of the run waiting for approval on a timeline (from its
/// `awaiting_approval` entry, which says how to approve it).
pub fn waiting_run(tl: &[IncidentEvent]) -> Option<String> {
    steps(tl).iter().find_map(|(_, step, status, detail)| {
        if step != "run" || status != "awaiting_approval" {
            return None;
        }
        let rest = detail.split("tocsin runbook approve ").nth(1)?;
        Some(rest.split('`').next()?.to_string())
    })
}

/// The reasons of the timeline's `escalated` entries.
pub fn escalations(tl: &[IncidentEvent]) -> Vec<String> {
    tl.iter()
        .filter_map(|e| match &e.kind {
            EventKind::Escalated { reason } => Some(reason.clone()),
            _ => None,
        })
        .collect()
}
