//! `tocsin demo-target`: a tiny HTTP service whose health can be broken
//! and repaired by requests, for the demo runbook (runbooks/demo-heal.yaml).
//! `GET /health` answers 200 `{"status":"ok"}` or 503
//! `{"status":"broken"}`; `POST /break` and `POST /repair` switch it.

use std::{
    net::SocketAddr,
    process::ExitCode,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use axum::{extract::State, http::StatusCode, routing::get, routing::post, Json, Router};
use tocsin_runtime::CancellationToken;
use tokio::net::TcpListener;

/// The router (tests serve it on their own listener).
pub fn router() -> Router {
    let broken = Arc::new(AtomicBool::new(false));
    Router::new()
        .route("/health", get(health))
        .route(
            "/break",
            post(|State(b): State<Arc<AtomicBool>>| async move {
                b.store(true, Ordering::SeqCst);
                Json(serde_json::json!({"status": "broken"}))
            }),
        )
        .route(
            "/repair",
            post(|State(b): State<Arc<AtomicBool>>| async move {
                b.store(false, Ordering::SeqCst);
                Json(serde_json::json!({"status": "ok"}))
            }),
        )
        .with_state(broken)
}

async fn health(State(b): State<Arc<AtomicBool>>) -> (StatusCode, Json<serde_json::Value>) {
    if b.load(Ordering::SeqCst) {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"status": "broken"})),
        )
    } else {
        (StatusCode::OK, Json(serde_json::json!({"status": "ok"})))
    }
}

/// Serves until `stop`.
pub async fn serve(listener: TcpListener, stop: CancellationToken) -> std::io::Result<()> {
    axum::serve(listener, router())
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
}

pub fn main(listen: SocketAddr) -> ExitCode {
    let rt = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let r = rt.block_on(async {
        let listener = TcpListener::bind(listen).await?;
        eprintln!(
            "demo target on http://{listen}: GET /health; break it with: curl -X POST http://{listen}/break"
        );
        let stop = CancellationToken::new();
        tocsin_runtime::shutdown::cancel_on_signals(stop.clone());
        serve(listener, stop).await
    });
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo target: {e}");
            ExitCode::FAILURE
        }
    }
}
