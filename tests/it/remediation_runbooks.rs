//! Runbook files without a bus: every shipped runbook passes the lint with
//! the shipped config's allowlist; a bad runbook is refused with file and
//! line (unknown step type, program not on the allowlist) while the good
//! ones beside it load.

use std::path::{Path, PathBuf};

use tocsin_remediation::{load_runbooks, RemediationConfig};
use tocsin_runtime::config::ConfigPath;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `remediation.allowed_programs` of config/tocsin.yaml.
fn shipped_allowlist() -> Vec<String> {
    let text = std::fs::read_to_string(root().join("config/tocsin.yaml")).unwrap();
    let v: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).unwrap();
    v["remediation"]["allowed_programs"]
        .as_sequence()
        .expect("config/tocsin.yaml has remediation.allowed_programs")
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn every_shipped_runbook_passes_lint() {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("runbooks"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    let names: Vec<String> = files
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for expected in [
        "demo-heal.yaml",
        "disk-cleanup.yaml",
        "high-api-latency.yaml",
        "systemd-restart.yaml",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} missing: {names:?}"
        );
    }
    let (report, ok) = tocsin::runbooks::lint(&files, &shipped_allowlist());
    assert!(ok, "{report}");
    // The reference runbook ships in dry run.
    let rc = RemediationConfig {
        runbook_dirs: vec![ConfigPath(root().join("runbooks"))],
        allowed_programs: shipped_allowlist(),
        ..Default::default()
    };
    let (loaded, errors) = load_runbooks(&rc);
    assert!(errors.is_empty(), "{errors:?}");
    let latency = loaded
        .iter()
        .find(|l| l.runbook.name == "high-api-latency")
        .unwrap();
    assert!(latency.runbook.dry_run);
    let ids: Vec<&str> = latency
        .runbook
        .steps
        .iter()
        .map(|s| s.id.as_str())
        .collect();
    for step in ["scale_up", "clear_cache", "restart_service"] {
        assert!(ids.contains(&step), "{ids:?}");
    }
}

#[test]
fn a_bad_runbook_is_refused_with_file_and_line_and_the_others_load() {
    let dir = tempfile::tempdir().unwrap();
    let good = "name: good\nmatch: {labels: ['alertname=\"A\"']}\nsteps:\n  - id: s\n    exec: {argv: [kubectl, get, pods]}\n";
    let not_allowed = "name: shell\nmatch: {}\nsteps:\n  - id: s\n    exec:\n      argv: [bash, -c, \"rm -rf {{labels.path}}\"]\n";
    let unknown_type = "name: unknown\nmatch: {}\nsteps:\n  - id: s\n    shell: \"rm -rf /\"\n";
    std::fs::write(dir.path().join("a-good.yaml"), good).unwrap();
    std::fs::write(dir.path().join("b-shell.yaml"), not_allowed).unwrap();
    std::fs::write(dir.path().join("c-unknown.yaml"), unknown_type).unwrap();
    let rc = RemediationConfig {
        runbook_dirs: vec![ConfigPath(dir.path().to_path_buf())],
        allowed_programs: vec!["kubectl".into()],
        ..Default::default()
    };
    let (loaded, errors) = load_runbooks(&rc);
    assert_eq!(
        loaded
            .iter()
            .map(|l| l.runbook.name.as_str())
            .collect::<Vec<_>>(),
        ["good"]
    );
    let errors: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(
        errors[0].contains("b-shell.yaml:6")
            && errors[0].contains(
                "program \"bash\" is not on remediation.allowed_programs (allowed: kubectl)"
            ),
        "{}",
        errors[0]
    );
    assert!(
        errors[1].contains("c-unknown.yaml:5") && errors[1].contains("unknown field `shell`"),
        "{}",
        errors[1]
    );
    // The lint says the same.
    let files = [
        dir.path().join("b-shell.yaml"),
        dir.path().join("a-good.yaml"),
    ];
    let (report, ok) = tocsin::runbooks::lint(&files, &["kubectl".to_string()]);
    assert!(!ok);
    assert!(
        report.contains("b-shell.yaml:6") && report.contains("a-good.yaml: ok (good)"),
        "{report}"
    );
}
