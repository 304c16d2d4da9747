//! `tocsin demo-target`: a tiny HTTP service whose health can be broken
//! and repaired by requests, for the demo runbook (runbooks/demo-heal.yaml).
//! `GET /health` answers 200 `{"status":"ok"}` or 503
//! `{"status":"broken"}`; `POST /break` and `POST /repair` switch it.
//! Given an ingest URL (`--alert-url`, token in `$TOCSIN_INGEST_TOKEN`) it
//! is its own monitor: breaking it fires the `DemoTargetDown` alert and
//! repairing it resolves the alert, as Prometheus and Alertmanager would.

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

/// Where the target reports its own alert (generic JSON ingest).
#[derive(Clone)]
pub struct Alerter {
    pub url: String,
    pub token: String,
    pub client: reqwest::Client,
}

impl Alerter {
    async fn send(&self, status: &str) {
        let body = serde_json::json!([{
            "labels": {"alertname": "DemoTargetDown", "service": "demo-target", "severity": "critical"},
            "annotations": {"summary": "the demo target's /health is failing"},
            "status": status,
        }]);
        let sent = self
            .client
            .post(&self.url)
            .bearer_auth(&self.token)
            .json(&body)
            .send()
            .await;
        match sent {
            Ok(r) if r.status().is_success() => {}
            Ok(r) => eprintln!(
                "demo target: ingest answered {} to the {status} alert",
                r.status()
            ),
            Err(e) => eprintln!("demo target: cannot send the {status} alert: {e}"),
        }
    }
}

#[derive(Clone)]
struct Target {
    broken: Arc<AtomicBool>,
    alerter: Option<Alerter>,
}

impl Target {
    async fn set(&self, broken: bool) -> Json<serde_json::Value> {
        self.broken.store(broken, Ordering::SeqCst);
        if let Some(a) = &self.alerter {
            a.send(if broken { "firing" } else { "resolved" }).await;
        }
        Json(serde_json::json!({"status": if broken { "broken" } else { "ok" }}))
    }
}

/// The router (tests serve it on their own listener).
pub fn router() -> Router {
    router_with(None)
}

/// The router, reporting its own alert to `alerter`.
pub fn router_with(alerter: Option<Alerter>) -> Router {
    let target = Target {
        broken: Arc::new(AtomicBool::new(false)),
        alerter,
    };
    Router::new()
        .route("/health", get(health))
        .route(
            "/break",
            post(|State(t): State<Target>| async move { t.set(true).await }),
        )
        .route(
            "/repair",
            post(|State(t): State<Target>| async move { t.set(false).await }),
        )
        .with_state(target)
}

async fn health(State(t): State<Target>) -> (StatusCode, Json<serde_json::Value>) {
    if t.broken.load(Ordering::SeqCst) {
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
    serve_with(listener, None, stop).await
}

/// Serves until `stop`, reporting its alert to `alerter`.
pub async fn serve_with(
    listener: TcpListener,
    alerter: Option<Alerter>,
    stop: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router_with(alerter))
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
}

pub fn main(listen: SocketAddr, alert_url: Option<String>) -> ExitCode {
    let alerter = match alert_url {
        None => None,
        Some(url) => match std::env::var("TOCSIN_INGEST_TOKEN") {
            Ok(token) if !token.is_empty() => Some(Alerter {
                url,
                token,
                client: reqwest::Client::new(),
            }),
            _ => {
                eprintln!("--alert-url needs the ingest token in $TOCSIN_INGEST_TOKEN");
                return ExitCode::from(2);
            }
        },
    };
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
        serve_with(listener, alerter, stop).await
    });
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo target: {e}");
            ExitCode::FAILURE
        }
    }
}
