//! Signals to cancellation.
//!
//! SIGTERM and SIGINT both mean "drain": the token is cancelled, services stop
//! taking new work, finish what is in flight and return. A second signal
//! exits at once, for the operator who really means it.

use tokio_util::sync::CancellationToken;

/// Cancels `token` on the first SIGTERM or SIGINT; exits the process with
/// status 130 on the second.
pub fn cancel_on_signals(token: CancellationToken) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let first = wait_for_signal().await;
        tracing::info!(
            signal = first,
            "shutdown requested; draining (send again to exit now)"
        );
        token.cancel();
        let second = wait_for_signal().await;
        tracing::warn!(signal = second, "second signal; exiting without draining");
        std::process::exit(130);
    })
}

#[cfg(unix)]
async fn wait_for_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot install SIGTERM handler; only Ctrl-C will stop");
            let _ = tokio::signal::ctrl_c().await;
            return "SIGINT";
        }
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = tokio::signal::ctrl_c() => "SIGINT",
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() -> &'static str {
    let _ = tokio::signal::ctrl_c().await;
    "SIGINT"
}
