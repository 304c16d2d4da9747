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
    /// Services: address of /livez, /readyz and /metrics (before the command:
    /// `tocsin --admin-listen 127.0.0.1:9465 up`).
    #[arg(
        long,
        env = "TOCSIN_ADMIN_LISTEN",
        default_value = "127.0.0.1:9464",
        help_heading = "Service options (before the command)"
    )]
    pub admin_listen: SocketAddr,
    /// Services: how long in-flight work may take to finish after SIGTERM/SIGINT.
    #[arg(long, env = "TOCSIN_GRACE_PERIOD", default_value = "30s", value_parser = parse_duration,
          help_heading = "Service options (before the command)")]
    pub grace_period: std::time::Duration,
    /// Services: worker threads of the process's async runtime (default:
    /// one per CPU the process may use).
    #[arg(long, env = "TOCSIN_THREADS", value_parser = clap::value_parser!(u16).range(1..=1024),
          help_heading = "Service options (before the command)")]
    pub threads: Option<u16>,
    /// Operator commands: how long to wait for NATS and for the services'
    /// answer (`tocsin --timeout 30s ack 42`).
    #[arg(long, env = "TOCSIN_TIMEOUT", default_value = "10s", value_parser = parse_duration,
          help_heading = "Operator options (before the command)")]
    pub timeout: std::time::Duration,
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
        #[command(flatten)]
        output: OutputArg,
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
    /// Snooze an incident: nobody is paged until the snooze ends, then it is
    /// triggered again and escalation resumes.
    Snooze {
        #[command(flatten)]
        target: Target,
        /// How long, e.g. 30m, 2h or 1d.
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
        /// How many at most (1 to 1000).
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u16).range(1..=1000))]
        limit: u16,
        #[command(flatten)]
        output: OutputArg,
    },
    /// Who is on call now (or at --at), for one schedule or all.
    Oncall {
        /// Schedule name (default: every schedule).
        schedule: Option<String>,
        /// An instant (RFC 3339), e.g. 2026-12-24T20:00:00Z.
        #[arg(long)]
        at: Option<jiff::Timestamp>,
        #[command(flatten)]
        output: OutputArg,
    },
    /// Show an incident with its alerts and timeline.
    Show {
        /// Incident number (42 or #42) or id.
        #[arg(value_parser = crate::ops::incident_ref)]
        incident: IncidentRef,
        #[command(flatten)]
        output: OutputArg,
    },
    /// Silences: alerts matching them page nobody until they end.
    #[command(subcommand)]
    Silence(SilenceCommand),
    /// Print a shell completion script: `tocsin completions bash > /etc/bash_completion.d/tocsin`.
    Completions {
        /// bash, zsh or fish.
        #[arg(value_parser = ["bash", "zsh", "fish"])]
        shell: String,
    },
}

/// `tocsin silence add|list|expire`.
#[derive(Debug, Subcommand)]
pub enum SilenceCommand {
    /// Silence alerts matching every matcher, from now for DURATION.
    Add {
        /// Matchers in Alertmanager's syntax: service=payments, severity=~"high|critical", env!=dev.
        #[arg(required = true, num_args = 1..)]
        matchers: Vec<String>,
        /// How long, 1m to 90d, e.g. 2h.
        #[arg(long = "for", value_name = "DURATION")]
        duration: String,
        /// Why (shown in the list and on suppressed alerts).
        #[arg(long, default_value = "")]
        comment: String,
        /// Who is silencing. Default: $USER.
        #[arg(long = "as", env = "USER", default_value = "operator")]
        actor: String,
    },
    /// List silences (active, pending and expired), newest first.
    List {
        #[command(flatten)]
        output: OutputArg,
    },
    /// End a silence now.
    Expire {
        /// The silence id (from `tocsin silence list`).
        id: String,
        /// Who is expiring it. Default: $USER.
        #[arg(long = "as", env = "USER", default_value = "operator")]
        actor: String,
    },
}

/// `--output text|json` of the read commands.
#[derive(Debug, Clone, clap::Args)]
pub struct OutputArg {
    /// `text` for people, `json` for programs (fields in the README).
    #[arg(long, short = 'o', default_value = "text", value_parser = ["text", "json"])]
    pub output: String,
}

impl OutputArg {
    fn style(&self) -> crate::ops::Style {
        crate::ops::Style::new(self.output == "json")
    }
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
    /// Start runbook NAME on an incident now, through the remediation
    /// service: every guardrail applies but `match`.
    Run {
        /// The runbook's name.
        name: String,
        /// Incident number (42 or #42) or id.
        #[arg(long, value_parser = crate::ops::incident_ref)]
        incident: IncidentRef,
        /// Only record what it would do.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        who: Who,
    },
    /// Let a run waiting for approval (`require_approval`) go ahead.
    Approve {
        /// The run id (on the incident's timeline).
        run: String,
        #[command(flatten)]
        who: Who,
    },
    /// Refuse a run waiting for approval: it does not run, and the incident
    /// escalates now.
    Deny {
        /// The run id (on the incident's timeline).
        run: String,
        #[command(flatten)]
        who: Who,
    },
    /// Switch a runbook off (no new run starts; runs in progress go on), or
    /// every runbook with --all (the kill switch).
    Disable {
        /// The runbook's name.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        name: Option<String>,
        /// Every runbook (the kill switch).
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        who: Who,
    },
    /// Switch a runbook (or with --all, the kill switch) back on.
    Enable {
        /// The runbook's name.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        name: Option<String>,
        /// The kill switch.
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        who: Who,
    },
}

impl RunbookCommand {
    /// Whether it asks the running services (the others read local files).
    fn remote(&self) -> bool {
        !matches!(self, RunbookCommand::Lint { .. } | RunbookCommand::List)
    }
}

/// Who is acting, and how the answer is printed.
#[derive(Debug, Clone, clap::Args)]
pub struct Who {
    /// Who is acting (recorded on the timeline). Default: $USER.
    #[arg(long = "as", env = "USER", default_value = "operator")]
    pub actor: String,
    #[command(flatten)]
    pub output: OutputArg,
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
            | Command::Completions { .. }
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
        | Command::Silence(_)
        | Command::Report { .. } => operate(&cli),
        Command::Runbook(ref r) if r.remote() => operate(&cli),
        Command::Completions { ref shell } => {
            let shell = match shell.as_str() {
                "bash" => clap_complete::Shell::Bash,
                "zsh" => clap_complete::Shell::Zsh,
                _ => clap_complete::Shell::Fish,
            };
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "tocsin", &mut std::io::stdout());
            ExitCode::SUCCESS
        }
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
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if let Some(n) = cli.threads {
        builder.worker_threads(usize::from(n));
    }
    let runtime = match builder.build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let options = Options {
        admin_listen: cli.admin_listen,
        grace_period: cli.grace_period,
        clock: std::sync::Arc::new(tocsin_runtime::clock::SystemClock),
        progress: Default::default(),
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

/// The file `./deploy/dev.sh up` writes in the checkout: the operator's
/// NATS address and password for the development NATS.
pub const DEV_ENV: &str = ".tocsin/env";

/// Reads the `export TOCSIN_NATS_…=…` lines of [`DEV_ENV`] in the current
/// folder into the environment, so operator commands reach the NATS of
/// `./deploy/dev.sh up` without a prefix. Only when neither
/// `TOCSIN_NATS_URL` nor `TOCSIN_NATS_OPERATOR_PASSWORD` is set (an
/// operator's own settings always win, and a password set for another NATS
/// is never sent to the address of a file), and only from a file of the
/// current user that nobody else may read or write (dev.sh makes it 0600).
/// Returns the file when it was used.
fn load_dev_env() -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt as _;
    if std::env::var_os("TOCSIN_NATS_URL").is_some()
        || std::env::var_os("TOCSIN_NATS_OPERATOR_PASSWORD").is_some()
    {
        return None;
    }
    let path = PathBuf::from(DEV_ENV);
    let meta = std::fs::metadata(&path).ok()?;
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    if !meta.is_file() || meta.uid() != uid || meta.mode() & 0o077 != 0 {
        return None;
    }
    let text = std::fs::read_to_string(&path).ok()?;
    let mut found = false;
    for line in text.lines() {
        let Some((name, value)) = line
            .trim()
            .strip_prefix("export ")
            .and_then(|l| l.split_once('='))
        else {
            continue;
        };
        if name.starts_with("TOCSIN_NATS_")
            && name
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
            && std::env::var_os(name).is_none()
        {
            std::env::set_var(name, value.trim());
            found = true;
        }
    }
    found.then_some(path)
}

/// Runs an operator command against the running services.
fn operate(cli: &Cli) -> ExitCode {
    // Before any thread starts: it sets environment variables.
    let dev_env = load_dev_env();
    let mut config = match crate::config::OperatorConfig::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    config.patience = cli.timeout;
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let act = |t: &Target, action: Action| (t.actor.clone(), action);
    let result: anyhow::Result<String> = runtime.block_on(async {
        let (actor, action) = match &cli.command {
            Command::List { all, limit, output } => {
                return crate::ops::list(&config, *all, usize::from(*limit), &output.style()).await
            }
            Command::Show { incident, output } => {
                return crate::ops::show(&config, incident.clone(), &output.style()).await
            }
            Command::Report { since, output } => {
                return crate::ops::report(&config, *since, output.output == "json").await
            }
            Command::Oncall {
                schedule,
                at,
                output,
            } => return crate::ops::oncall(&config, schedule.clone(), *at, &output.style()).await,
            Command::Runbook(r) => {
                return crate::runbooks::remote(&config, r).await;
            }
            Command::Silence(SilenceCommand::List { output }) => {
                return crate::ops::silences(&config, &output.style()).await
            }
            Command::Silence(SilenceCommand::Add {
                matchers,
                duration,
                comment,
                actor,
            }) => {
                let silence =
                    crate::ops::new_silence(matchers, duration, comment, actor).map_err(Usage)?;
                let id = silence.id.clone();
                let m =
                    crate::ops::command(&config, actor, Action::CreateSilence { silence }).await?;
                return Ok(format!("{m}\n{id}\n"));
            }
            Command::Silence(SilenceCommand::Expire { id, actor }) => {
                (actor.clone(), Action::ExpireSilence { id: id.clone() })
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
            .map(|m| format!("{m}\n"))
    });
    // Where the address came from, when NATS cannot be reached.
    let result = result.map_err(|e| {
        let Some(u) = e.downcast_ref::<crate::ops::NatsUnreachable>() else {
            return e;
        };
        let hint = match &dev_env {
            Some(p) => format!(
                "the address is from {}, written by ./deploy/dev.sh up: is it running?",
                p.display()
            ),
            None => format!(
                "set nats.url in {} or TOCSIN_NATS_URL (for ./deploy/dev.sh up, run from the checkout: {DEV_ENV} is read)",
                cli.config.display()
            ),
        };
        anyhow::anyhow!("{u}; {hint}")
    });
    exit(result)
}

/// Exit codes of operator commands (documented in the README).
pub mod exit {
    /// Done; the answer is printed.
    pub const OK: u8 = 0;
    /// A service answered and refused (an unknown incident or schedule, a
    /// command that does not apply); the reason is printed.
    pub const REFUSED: u8 = 1;
    /// A usage or config error.
    pub const USAGE: u8 = 2;
    /// NATS or the service that answers cannot be reached.
    pub const UNREACHABLE: u8 = 3;
    /// The command is stored on the bus and will be applied when the
    /// incidents service runs, but it has not answered yet.
    pub const QUEUED: u8 = 4;
}

/// Bad input found after parsing the command line (a matcher, a duration).
#[derive(Debug)]
pub(crate) struct Usage(pub(crate) String);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Usage {}

/// Prints an operator command's outcome and picks its exit code.
fn exit(result: anyhow::Result<String>) -> ExitCode {
    match result {
        Ok(out) => {
            print!("{}", terminal_safe(&out));
            ExitCode::from(exit::OK)
        }
        Err(e) => {
            if let Some(u) = e.downcast_ref::<Usage>() {
                eprintln!("error: {}", terminal_safe(&u.to_string()));
                ExitCode::from(exit::USAGE)
            } else if let Some(r) = e.downcast_ref::<crate::ops::Refused>() {
                eprintln!("rejected: {}", terminal_safe(&r.to_string()));
                ExitCode::from(exit::REFUSED)
            } else if let Some(q) = e.downcast_ref::<crate::ops::Queued>() {
                println!("{}", terminal_safe(&q.to_string()));
                ExitCode::from(exit::QUEUED)
            } else {
                eprintln!("error: {}", terminal_safe(&format!("{e:#}")));
                ExitCode::from(exit::UNREACHABLE)
            }
        }
    }
}

/// The colours operator commands paint with (`ESC [ n m`, `ops::Style`).
const COLOURS: [&str; 5] = ["0", "1", "31", "32", "33"];

/// `text` fit for a terminal: control characters other than line feeds
/// and tabs, and Unicode's bidirectional controls, are written out (`\e`,
/// `\u{7}`, `\u{202e}`), so text from outside (a note sent from Slack, an
/// alert's summary, a runbook step's output) cannot retitle the window,
/// move the cursor, clear the screen or reorder the line of whoever reads
/// it; the commands' own colours ([`COLOURS`]) stay.
pub(crate) fn terminal_safe(text: &str) -> std::borrow::Cow<'_, str> {
    let unsafe_char = |c: char| (c.is_control() && c != '\n' && c != '\t') || is_bidi_control(c);
    if !text.chars().any(unsafe_char) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if c == '\x1b' {
            let colour = COLOURS.iter().find_map(|code| {
                let seq = format!("\x1b[{code}m");
                rest.starts_with(&seq).then_some(seq)
            });
            if let Some(seq) = colour {
                out.push_str(&seq);
                rest = &rest[seq.len()..];
                continue;
            }
            out.push_str("\\e");
        } else if unsafe_char(c) {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
        rest = &rest[c.len_utf8()..];
    }
    std::borrow::Cow::Owned(out)
}

/// Unicode's explicit bidirectional formatting characters (UAX #9): the
/// Arabic letter mark, the left-to-right and right-to-left marks, the
/// embeddings and overrides, and the isolates.
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

#[cfg(test)]
mod tests {
    use super::terminal_safe;

    #[test]
    fn only_the_commands_own_colours_reach_the_terminal() {
        let plain = "#1 disk full\n  note:\tdone";
        assert!(matches!(
            terminal_safe(plain),
            std::borrow::Cow::Borrowed(_)
        ));
        assert_eq!(
            terminal_safe("\x1b[31mpaged\x1b[0m \x1b]0;pwned\x07\x1b[8mhidden\r\u{9b}2J"),
            "\x1b[31mpaged\x1b[0m \\e]0;pwned\\u{7}\\e[8mhidden\\u{d}\\u{9b}2J"
        );
    }

    /// Unicode's bidirectional controls reorder what follows them on
    /// terminals that lay out right-to-left text (GNOME's VTE, Konsole):
    /// `db`, then U+202E, then `lanoitcudorp` shows as `dbproduction`, so
    /// a line of `tocsin list` could show other text than the incident
    /// holds. They are written out too.
    #[test]
    fn bidirectional_controls_are_written_out() {
        assert_eq!(
            terminal_safe("#7 db\u{202e}lanoitcudorp\u{2066}x\u{2069}\u{200f}\u{61c}"),
            "#7 db\\u{202e}lanoitcudorp\\u{2066}x\\u{2069}\\u{200f}\\u{61c}"
        );
        // Right-to-left text itself stays as it is.
        assert_eq!(terminal_safe("שלום مرحبا"), "שלום مرحبا");
    }
}
