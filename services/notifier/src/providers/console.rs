//! The console: a provider that needs no account. Every message for a
//! channel that has no provider configured is rendered with that
//! channel's template, as Slack, SMS or email would have received it, and
//! written to the log and (with `file`) appended to a file. The shipped
//! development config uses it, so a new user sees the page the first
//! incident would have sent.

use std::io::Write;

use futures::future::BoxFuture;
use tocsin_proto::{
    incident::{IncidentStatus, IncidentSummary},
    notify::{MessageKind, ProviderRef},
};

use super::{Outgoing, Provider, Rendered, SendError};
use crate::{config::ConsoleConfig, record::Shown};

pub struct Console {
    file: Option<std::path::PathBuf>,
    lock: std::sync::Mutex<()>,
}

impl Console {
    pub fn new(cfg: &ConsoleConfig) -> Result<Console, String> {
        let file = cfg.file.as_ref().map(|p| p.0.clone());
        if let Some(f) = &file {
            if let Some(dir) = f.parent().filter(|d| !d.as_os_str().is_empty()) {
                if !dir.is_dir() {
                    std::fs::create_dir_all(dir).map_err(|e| {
                        format!(
                            "console: cannot create the folder of file {}: {e}",
                            f.display()
                        )
                    })?;
                }
            }
        }
        Ok(Console {
            file,
            lock: std::sync::Mutex::new(()),
        })
    }

    /// The block written for one message.
    pub fn block(out: &Outgoing, r: &Rendered) -> String {
        let to = if out.address.is_empty() {
            out.target.clone()
        } else {
            format!("{} ({})", out.target, out.address)
        };
        format!(
            "──── {} · {} to {to} · {} · INC-{} ────\n{}\n\n",
            jiff::Timestamp::now().strftime("%Y-%m-%d %H:%M:%S UTC"),
            out.channel.as_str(),
            out.kind.as_str(),
            out.incident.number,
            r.text().trim_end()
        )
    }
}

impl Provider for Console {
    fn name(&self) -> &str {
        "console"
    }

    fn timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(5)
    }

    fn send<'a>(
        &'a self,
        out: &'a Outgoing,
        r: &'a Rendered,
    ) -> BoxFuture<'a, Result<ProviderRef, SendError>> {
        Box::pin(async move {
            let block = Console::block(out, r);
            tracing::info!(
                channel = out.channel.as_str(),
                target = %out.target,
                incident = out.incident.number,
                kind = out.kind.as_str(),
                "console (no {} provider configured):\n{}",
                out.channel.as_str(),
                block.trim_end()
            );
            if let Some(path) = &self.file {
                let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
                let written = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .and_then(|mut f| f.write_all(block.as_bytes()));
                if let Err(e) = written {
                    return Err(SendError::retry(format!(
                        "console: cannot append to {}: {e}",
                        path.display()
                    )));
                }
            }
            Ok(ProviderRef::Console)
        })
    }

    /// Shows every change, as the real channel's update would.
    fn update(
        &self,
        sent: &ProviderRef,
        shown: &Shown,
        now: &IncidentSummary,
    ) -> Option<MessageKind> {
        if !matches!(sent, ProviderRef::Console) || shown.status == now.status {
            return None;
        }
        Some(match now.status {
            IncidentStatus::Triggered => MessageKind::Page,
            IncidentStatus::Acknowledged => MessageKind::Acknowledged,
            IncidentStatus::Resolved => MessageKind::Resolved,
        })
    }

    fn may_update(&self, sent: &ProviderRef) -> bool {
        matches!(sent, ProviderRef::Console)
    }

    /// Renders the channel's template; a kind that channel has no template
    /// for (an SMS "resolved") is shown as one line.
    fn render(&self, t: &crate::templates::Templates, out: &Outgoing) -> Result<Rendered, String> {
        match super::render_default(t, out) {
            Ok(r) => Ok(r),
            Err(_) => Ok(Rendered::Text(format!(
                "INC-{} {}: {}{}",
                out.incident.number,
                out.incident.status.as_str(),
                out.incident.title,
                out.ctx
                    .event
                    .actor
                    .as_ref()
                    .map(|a| format!(" (by {a})"))
                    .unwrap_or_default()
            ))),
        }
    }
}
