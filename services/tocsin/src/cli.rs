//! The command line.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use tocsin_proto::command::{Action, IncidentRef};
use tocsin_runtime::{config::parse_duration, telemetry, CancellationToken};

use crate::{
    app::{self, Options},
    config::{Config, Service},
};

/// Tocsin: alerts in, incidents out, people paged.
#[derive(Debug, Parser)]
#[command(name = "tocsin", version, about)]
pub struct Cli {
    /// Config file.
    #[arg(
        short,
        long,
        global = true,
        env = "TOCSIN_CONFIG",
        default_value = "config/tocsin.yaml"
    )]
    pub config: PathBuf,
    /// Log filter, RUST_LOG syntax (`info`, `info,tocsin_ingest=debug`).
    #[arg(long, global = true, env = "TOCSIN_LOG", default_value = "info")]
    pub log_level: String,
    /// Log format: `human` or `json`.
    #[arg(
        long,
        global = true,
        env = "TOCSIN_LOG_FORMAT",
        default_value = "human"
    )]
    pub log_format: telemetry::LogFormat,
    /// Address of /livez, /readyz and /metrics.
    #[arg(
        long,
        global = true,
        env = "TOCSIN_ADMIN_LISTEN",
        default_value = "127.0.0.1:9464"
    )]
    pub admin_listen: SocketAddr,
    /// How long in-flight work may take to finish after SIGTERM/SIGINT.
    #[arg(long, global = true, env = "TOCSIN_GRACE_PERIOD", default_value = "30s", value_parser = parse_duration)]
    pub grace_period: std::time::Duration,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run every service in this process.
    Up,
    /// Run the ingest service (HTTP receivers -> ALERTS stream).
    Ingest,
    /// Run the incidents service (ALERTS + COMMANDS -> INCIDENTS).
    Incidents,
    /// Run the escalation service (INCIDENTS -> NOTIFY, by policy and schedule).
    Escalation,
    /// Run the notifier (NOTIFY -> Slack, PagerDuty, SMS, email, webhooks).
    Notifier,
    /// Run chat-ops (Slack buttons and /tocsin, SMS replies, the HTTP API, status.json).
    Chatops,
    /// Run the remediation service (INCIDENTS -> runbooks -> COMMANDS).
    Remediation,
    /// Runbooks: check files, list what the config loads.
    #[command(subcommand)]
    Runbook(RunbookCommand),
    /// A tiny HTTP service for the demo runbook: GET /health answers 200
    /// until POST /break, 503 after, until POST /repair.
    DemoTarget {
        /// Where to listen.
        #[arg(long, default_value = "127.0.0.1:9477")]
        listen: SocketAddr,
        /// Ingest's generic JSON URL (http://127.0.0.1:8080/api/v1/alerts):
        /// breaking the target fires its DemoTargetDown alert there,
        /// repairing it resolves it. The token is read from
        /// $TOCSIN_INGEST_TOKEN.
        #[arg(long)]
        alert_url: Option<String>,
    },
    /// MTTA, MTTR and on-call load over a window (asks the chat-ops service).
    Report {
        /// How far back: 30d, 12h, 2w.
        #[arg(long, default_value = "30d", value_parser = parse_duration)]
        since: std::time::Duration,
        /// `text` or `json`.
        #[arg(long, default_value = "text", value_parser = ["text", "json"])]
        output: String,
    },
    /// Validate a config file; exits non-zero and prints file, line and reason on errors.
    CheckConfig {
        /// File to check (default: --config).
        file: Option<PathBuf>,
    },
    /// Acknowledge an incident (stops its escalation).
    Ack(Target),
    /// Return an acknowledged incident to triggered.
    Unack(Target),
    /// Resolve an incident.
    Resolve(Target),
    /// Reopen a resolved incident.
    Reopen(Target),
    /// Snooze an incident: escalation pauses, and it is triggered again after.
    Snooze {
        #[command(flatten)]
        target: Target,
        /// How long: 30m, 2h, ...
        #[arg(value_parser = parse_duration)]
        duration: std::time::Duration,
    },
    /// Escalate an incident now.
    Escalate {
        #[command(flatten)]
        target: Target,
        /// Why (recorded on the timeline).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Add a note to an incident's timeline.
    Note {
        #[command(flatten)]
        target: Target,
        /// The note.
        text: String,
    },
    /// Assign an incident to someone.
    Assign {
        #[command(flatten)]
        target: Target,
        /// Who.
        user: String,
    },
    /// List open incidents (most recent first).
    List {
        /// Include resolved incidents.
        #[arg(long)]
        all: bool,
        /// How many at most.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Who is on call now (or at --at), for one schedule or all.
    Oncall {
        /// Schedule name (default: every schedule).
        schedule: Option<String>,
        /// An instant (RFC 3339), e.g. 2026-12-24T20:00:00Z.
        #[arg(long)]
        at: Option<jiff::Timestamp>,
    },
    /// Show an incident with its alerts and timeline.
    Show {
        /// Incident number (42 or #42) or id.
        #[arg(value_parser = crate::ops::incident_ref)]
        incident: IncidentRef,
    },
}

#[derive(Debug, Subcommand)]
pub enum RunbookCommand {
    /// Check runbook files: schema, unknown step types, templates naming
    /// unknown fields, programs not on remediation.allowed_programs (of
    /// --config). Prints file:line and the reason for each bad file.
    Lint {
        /// Runbook files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// The runbooks the config's remediation.runbook_dirs hold, and the
    /// files refused.
    List,
}

/// Which incident, and who is acting.
#[derive(Debug, Clone, clap::Args)]
pub struct Target {
    /// Incident number (42 or #42) or id.
    #[arg(value_parser = crate::ops::incident_ref)]
    pub incident: IncidentRef,
    /// Who is acting (recorded on the timeline). Default: $USER.
    #[arg(long = "as", env = "USER", default_value = "operator")]
    pub actor: String,
}

/// Entry point of every binary; `forced` fixes the command (`tocsin-ingest`).
pub fn main(forced: Option<Command>) -> ExitCode {
    tocsin_runtime::install_crypto();
    let mut cli = Cli::parse_from(match forced {
        // A single-service binary takes the global flags only.
        Some(_) => std::iter::once(std::ffi::OsString::from("tocsin"))
            .chain(std::env::args_os().skip(1))
            .chain(std::iter::once("up".into()))
            .collect::<Vec<_>>(),
        None => std::env::args_os().collect(),
    });
    if let Some(c) = forced {
        cli.command = c;
    }
    // Operator commands print their answer; connection chatter would only
    // get in the way, so they log warnings unless asked for more.
    let operator = !matches!(
        cli.command,
        Command::Up
            | Command::Ingest
            | Command::Incidents
            | Command::Escalation
            | Command::Notifier
            | Command::Chatops
            | Command::Remediation
            | Command::DemoTarget { .. }
            | Command::CheckConfig { .. }
    );
    let level = if operator && std::env::var_os("TOCSIN_LOG").is_none() && cli.log_level == "info" {
        "warn"
    } else {
        cli.log_level.as_str()
    };
    telemetry::init_tracing(cli.log_format, level);
    match cli.command {
        Command::CheckConfig { ref file } => {
            let path = file.clone().unwrap_or_else(|| cli.config.clone());
            match Config::load(&path, &Service::ALL) {
                Ok(c) => {
                    for w in &c.warnings {
                        eprintln!("warning: {w}");
                    }
                    println!("{}: ok", path.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Ack(_)
        | Command::Unack(_)
        | Command::Resolve(_)
        | Command::Reopen(_)
        | Command::Snooze { .. }
        | Command::Escalate { .. }
        | Command::Note { .. }
        | Command::Assign { .. }
        | Command::List { .. }
        | Command::Oncall { .. }
        | Command::Show { .. }
        | Command::Report { .. } => operate(&cli),
        Command::Up => serve(&cli, &Service::ALL),
        Command::Ingest => serve(&cli, &[Service::Ingest]),
        Command::Incidents => serve(&cli, &[Service::Incidents]),
        Command::Escalation => serve(&cli, &[Service::Escalation]),
        Command::Notifier => serve(&cli, &[Service::Notifier]),
        Command::Chatops => serve(&cli, &[Service::Chatops]),
        Command::Remediation => serve(&cli, &[Service::Remediation]),
        Command::Runbook(ref r) => crate::runbooks::command(&cli.config, r),
        Command::DemoTarget {
            listen,
            ref alert_url,
        } => crate::demo::main(listen, alert_url.clone()),
    }
}

fn serve(cli: &Cli, services: &[Service]) -> ExitCode {
    let config = match Config::load(&cli.config, services) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    for w in &config.warnings {
        tracing::warn!("{w}");
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let options = Options {
        admin_listen: cli.admin_listen,
        grace_period: cli.grace_period,
        clock: std::sync::Arc::new(tocsin_incidents::clock::SystemClock),
    };
    let result = runtime.block_on(async {
        let shutdown = CancellationToken::new();
        tocsin_runtime::shutdown::cancel_on_signals(shutdown.clone());
        let listeners = app::Listeners::bind(&config, services, &options).await?;
        app::run(config, services, options, listeners, shutdown).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "tocsin stopped with an error");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs an operator command against the running services.
fn operate(cli: &Cli) -> ExitCode {
    let config = match crate::config::OperatorConfig::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let act = |t: &Target, action: Action| (t.actor.clone(), action);
    let result: anyhow::Result<(bool, String)> = runtime.block_on(async {
        let (actor, action) = match &cli.command {
            Command::List { all, limit } => {
                return crate::ops::list(&config, *all, *limit)
                    .await
                    .map(|s| (true, s))
            }
            Command::Show { incident } => {
                return crate::ops::show(&config, incident.clone())
                    .await
                    .map(|s| (true, s))
            }
            Command::Report { since, output } => {
                return crate::ops::report(&config, *since, output == "json")
                    .await
                    .map(|s| (true, s))
            }
            Command::Oncall { schedule, at } => {
                return crate::ops::oncall(&config, schedule.clone(), *at)
                    .await
                    .map(|s| (true, s))
            }
            Command::Ack(t) => act(
                t,
                Action::Ack {
                    incident: t.incident.clone(),
                },
            ),
            Command::Unack(t) => act(
                t,
                Action::Unack {
                    incident: t.incident.clone(),
                },
            ),
            Command::Resolve(t) => act(
                t,
                Action::Resolve {
                    incident: t.incident.clone(),
                },
            ),
            Command::Reopen(t) => act(
                t,
                Action::Reopen {
                    incident: t.incident.clone(),
                },
            ),
            Command::Snooze { target, duration } => act(
                target,
                Action::Snooze {
                    incident: target.incident.clone(),
                    seconds: duration.as_secs(),
                },
            ),
            Command::Escalate { target, reason } => act(
                target,
                Action::Escalate {
                    incident: target.incident.clone(),
                    reason: reason.clone(),
                },
            ),
            Command::Note { target, text } => act(
                target,
                Action::Note {
                    incident: target.incident.clone(),
                    text: text.clone(),
                },
            ),
            Command::Assign { target, user } => act(
                target,
                Action::Assign {
                    incident: target.incident.clone(),
                    user: user.clone(),
                },
            ),
            _ => unreachable!("only operator commands reach here"),
        };
        crate::ops::command(&config, &actor, action)
            .await
            .map(|(ok, m)| (ok, format!("{m}\n")))
    });
    match result {
        Ok((true, out)) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Ok((false, reason)) => {
            eprint!("rejected: {reason}");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(3)
        }
    }
}
