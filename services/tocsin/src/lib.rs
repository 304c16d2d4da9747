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

/// The allocator of every Tocsin binary (the `jemalloc` feature, on by
/// default): jemalloc, with its background threads handing freed memory
/// back to the operating system while a service is quiet. With glibc's
/// allocator a service kept what a busy spell had freed: with 100,000 open incidents, once quiet, the notifier
/// held 110 MiB (74 after an explicit `malloc_trim`) and the Tocsin
/// processes 414 MiB together; with jemalloc 55-61 and 351-359 MiB, the
/// rest of the run no slower (`bench all --only recovery --incidents
/// 100000`, two runs). mimalloc, tried the same way, held more (500 MiB).
#[cfg(all(feature = "jemalloc", not(target_env = "msvc")))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

pub mod app;
pub mod cli;
pub mod config;
pub mod demo;
pub mod ops;
pub mod runbooks;
