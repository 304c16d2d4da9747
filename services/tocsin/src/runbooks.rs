//! `tocsin runbook lint <files>` and `tocsin runbook list`: local checks of
//! runbook files against the config's `remediation:` section (its
//! allowlist and folders); no NATS needed.

use std::{path::Path, process::ExitCode};

use serde::Deserialize;
use tocsin_remediation::{runbook, RemediationConfig};

use crate::cli::RunbookCommand;

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
