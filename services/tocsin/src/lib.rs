//! # tocsin
//!
//! The `tocsin` command: `tocsin up` runs every service in one process on one
//! config; `tocsin ingest` runs one service (also installed as the
//! `tocsin-ingest` binary for deployments that run services separately);
//! `tocsin check-config` validates a config file.
//!
//! # Layout
//! - [`config`]: the whole config file, a section per service.
//! - [`app`]: start-up and shutdown shared by every way of running services.
//! - [`cli`]: the command line.
//! - [`ops`]: operator commands (`ack`, `resolve`, `list`, `show`, ...).
//! - [`runbooks`]: `tocsin runbook lint|list`.
//! - [`demo`]: `tocsin demo-target`, the service the demo runbook heals.
#![deny(unreachable_pub)]

pub mod app;
pub mod cli;
pub mod config;
pub mod demo;
pub mod ops;
pub mod runbooks;
