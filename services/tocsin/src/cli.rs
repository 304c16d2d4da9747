//! The command line.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
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
    /// Validate a config file; exits non-zero and prints file, line and reason on errors.
    CheckConfig {
        /// File to check (default: --config).
        file: Option<PathBuf>,
    },
}

/// Entry point of every binary; `forced` fixes the command (`tocsin-ingest`).
pub fn main(forced: Option<Command>) -> ExitCode {
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
    telemetry::init_tracing(cli.log_format, &cli.log_level);
    match cli.command {
        Command::CheckConfig { ref file } => {
            let path = file.clone().unwrap_or_else(|| cli.config.clone());
            match Config::load(&path, &Service::ALL) {
                Ok(_) => {
                    println!("{}: ok", path.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Up => serve(&cli, &Service::ALL),
        Command::Ingest => serve(&cli, &[Service::Ingest]),
        Command::Incidents => serve(&cli, &[Service::Incidents]),
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
