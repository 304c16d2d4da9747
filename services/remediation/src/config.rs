//! The `remediation:` section of the config file.

use std::time::Duration;

use serde::Deserialize;
use tocsin_runtime::config::{ConfigPath, HumanDuration};

/// `remediation:`. Without this section `tocsin up` runs no remediation.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemediationConfig {
    /// Folders whose `*.yaml`/`*.yml` files are runbooks (relative to the
    /// config file). Default: none.
    #[serde(default)]
    pub runbook_dirs: Vec<ConfigPath>,
    /// Programs an `exec` step may run, written exactly as a runbook's
    /// `argv[0]` names them (`kubectl`, `/usr/bin/systemctl`). Default: none.
    #[serde(default)]
    pub allowed_programs: Vec<String>,
    /// Global dry run: every runbook only records what it would do.
    #[serde(default)]
    pub dry_run: bool,
    /// Runs one replica works on at once (default 32).
    #[serde(default = "default_parallel")]
    pub max_parallel_runs: usize,
    /// Bytes kept of a step's stdout and of its stderr (and of an HTTP
    /// answer) for templates and the timeline (default 4096).
    #[serde(default = "default_output")]
    pub max_output_bytes: usize,
    /// How long a run's incident event stays unacknowledged without a sign
    /// of life before another replica takes the run over (default 30s).
    #[serde(default = "default_ack_wait")]
    pub ack_wait: HumanDuration,
    /// How long a concurrency lease lasts unless renewed (default 60s).
    #[serde(default = "default_lease")]
    pub lease_ttl: HumanDuration,
    /// How long run records are kept in the KV bucket (default 7d).
    #[serde(default = "default_kept")]
    pub runs_kept_for: HumanDuration,
    /// `PATH` given to `exec` steps (their environment is otherwise only
    /// what the step sets). Default: the usual system folders.
    #[serde(default = "default_path")]
    pub exec_path: String,
}

fn default_parallel() -> usize {
    32
}
fn default_output() -> usize {
    4096
}
fn default_ack_wait() -> HumanDuration {
    HumanDuration::secs(30)
}
fn default_lease() -> HumanDuration {
    HumanDuration::secs(60)
}
fn default_kept() -> HumanDuration {
    HumanDuration::secs(7 * 86400)
}
fn default_path() -> String {
    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()
}

impl Default for RemediationConfig {
    fn default() -> Self {
        RemediationConfig {
            runbook_dirs: Vec::new(),
            allowed_programs: Vec::new(),
            dry_run: false,
            max_parallel_runs: default_parallel(),
            max_output_bytes: default_output(),
            ack_wait: default_ack_wait(),
            lease_ttl: default_lease(),
            runs_kept_for: default_kept(),
            exec_path: default_path(),
        }
    }
}

impl RemediationConfig {
    /// What is out of bounds, one message each (`tocsin check-config` and
    /// every start refuse it rather than quietly raise or lower it).
    pub fn check(&self) -> Vec<String> {
        let mut errors = Vec::new();
        if self.max_parallel_runs == 0 {
            errors.push("max_parallel_runs is 0; use at least 1 (default 32)".to_string());
        }
        if !(64..=1 << 20).contains(&self.max_output_bytes) {
            errors.push(format!(
                "max_output_bytes is {}; use 64 to 1048576 (default 4096)",
                self.max_output_bytes
            ));
        }
        let (second, hour) = (HumanDuration::secs(1), HumanDuration::secs(3600));
        for (name, d, least, default) in [
            ("ack_wait", self.ack_wait, second, "30s"),
            ("lease_ttl", self.lease_ttl, second, "60s"),
            ("runs_kept_for", self.runs_kept_for, hour, "7d"),
        ] {
            errors.extend(tocsin_runtime::config::at_least(name, d, least, default));
        }
        errors
    }

    pub fn ack_wait(&self) -> Duration {
        self.ack_wait.0.max(Duration::from_secs(1))
    }
    pub fn lease_ttl(&self) -> Duration {
        self.lease_ttl.0.max(Duration::from_secs(1))
    }
}
