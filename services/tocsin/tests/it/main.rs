//! Integration tests, one binary (see tests/it/main.rs for why).

mod alertmanager;
mod chaos;
mod cli;
mod domain;
mod failover;
mod first_run;
mod listeners;
mod notifier_crash;
mod ops;
mod page_path;
mod remediation_crash;
mod remediation_reload;
mod report;
mod runbook_cli;
mod show_text;
mod support;
