//! The end-to-end tests: one binary (each test binary links the whole
//! stack, so one binary instead of one per file saves most of the link time).
//! Each module is one area; each test starts its own nats-server.

mod api_v1;
mod chatops_slack;
mod chatops_sms;
mod config_keys;
mod crate_layers;
mod deploy_files;
mod escalation_flow;
mod escalation_queries;
mod escalation_restart;
mod fakes_selftest;
mod incidents_commands;
mod incidents_crash;
mod incidents_faults;
mod incidents_inhibit;
mod incidents_lifecycle;
mod incidents_memory;
mod incidents_poison;
mod incidents_rebuild;
mod ingest_alertmanager;
mod ingest_concurrency;
mod ingest_connections;
mod ingest_hostile;
mod ingest_limits;
mod ingest_outage;
mod ingest_pagerduty;
mod ingest_rejections;
mod ingest_shutdown;
mod lease_fence;
mod lease_follower;
mod nats_auth;
mod notifier_channels;
mod notifier_email;
mod notifier_faults;
mod notifier_once;
mod notifier_scale;
mod notifier_slack_webhook;
mod pull_consumers;
mod remediation_approval;
mod remediation_flow;
mod remediation_guardrails;
mod remediation_runbooks;
mod remediation_steps;
mod shipped_files;
mod storage_limits;
