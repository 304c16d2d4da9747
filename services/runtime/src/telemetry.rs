//! Tracing initialisation: one log style for every service.

use std::{
    str::FromStr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex,
    },
    time::{Duration, Instant},
};

use tracing_subscriber::{fmt, EnvFilter};

/// How logs are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines, for terminals.
    #[default]
    Human,
    /// One JSON object per line, for log shippers.
    Json,
}

impl FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "human" | "text" => Ok(LogFormat::Human),
            "json" => Ok(LogFormat::Json),
            other => Err(format!(
                "unknown log format {other:?}; use `human` or `json`"
            )),
        }
    }
}

/// Installs the global subscriber. `filter` uses `RUST_LOG` syntax
/// (`info,tocsin_ingest=debug`). Calling it twice is harmless (tests do).
pub fn init_tracing(format: LogFormat, filter: &str) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match format {
        // Colour codes only for a person at a terminal, never into files
        // or pipes (journald, `2> log`, `| less`); NO_COLOR turns them off.
        LogFormat::Human => {
            use std::io::IsTerminal as _;
            let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
            builder.with_target(true).with_ansi(colour).try_init()
        }
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// Lets a WARN through at most once per interval (10 s by default),
/// counting the rest, so a flood of the same trouble is one line now and
/// then, with how many were held back.
pub struct RateLimitedWarn {
    interval: Duration,
    last: Mutex<Option<Instant>>,
    suppressed: AtomicU64,
}

impl Default for RateLimitedWarn {
    fn default() -> Self {
        RateLimitedWarn::every(Duration::from_secs(10))
    }
}

impl RateLimitedWarn {
    /// At most one WARN per `interval`.
    pub fn every(interval: Duration) -> Self {
        RateLimitedWarn {
            interval,
            last: Mutex::new(None),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(n)` when this occurrence should be logged, `n` being how many
    /// were held back since the last one logged.
    pub fn admit(&self) -> Option<u64> {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if last.is_some_and(|t| now.duration_since(t) < self.interval) {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *last = Some(now);
        Some(self.suppressed.swap(0, Ordering::Relaxed))
    }
}

#[cfg(test)]
mod rate_limited_warn_tests {
    use super::*;

    #[test]
    fn warnings_are_rate_limited_and_count_what_they_held_back() {
        let w = RateLimitedWarn::default();
        assert_eq!(w.admit(), Some(0));
        assert_eq!(w.admit(), None);
        assert_eq!(w.admit(), None);
        *w.last.lock().unwrap() = Some(Instant::now() - Duration::from_secs(11));
        assert_eq!(w.admit(), Some(2));
    }
}
