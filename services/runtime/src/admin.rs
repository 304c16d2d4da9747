//! Health, metrics and the admin HTTP server (`/livez`, `/readyz`, `/metrics`).

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use async_nats::Client;
use axum::{
    extract::State,
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Json, Router,
};
use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::{Metric, Registry},
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::RuntimeError;

/// Label set used by simple labelled families.
pub type Labels = Vec<(String, String)>;

/// A [`Labels`] set from pairs: `labels(&[("endpoint", "alertmanager")])`.
pub fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The process's metric registry plus the runtime's own metrics.
///
/// Services register their metrics at start-up; `/metrics` encodes the lot
/// in the Prometheus/OpenMetrics text format. Labels stay low-cardinality
/// (never an incident id).
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Mutex<Registry>>,
    /// 1 while every NATS client of this process is connected.
    pub nats_connected: Gauge,
    /// Each client's connection state, by client name, behind the gauge.
    nats_clients: Arc<Mutex<BTreeMap<String, bool>>>,
    /// NATS connection events by kind.
    pub nats_events: Family<Labels, Counter>,
    /// `tocsin_leader{role}`: 1 while this process holds the role's lease
    /// (see [`crate::lease`]), 0 while it stands by.
    pub leader: Family<Labels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let nats_connected = Gauge::default();
        let nats_events = Family::<Labels, Counter>::default();
        registry.register(
            "tocsin_nats_connected",
            "1 while every NATS client of this process (one per service) is connected",
            nats_connected.clone(),
        );
        registry.register(
            "tocsin_nats_events",
            "NATS connection events by kind",
            nats_events.clone(),
        );
        let leader = Family::<Labels, Gauge>::default();
        registry.register(
            "tocsin_leader",
            "1 while this process holds the role's lease and acts, 0 while it stands by",
            leader.clone(),
        );
        Metrics {
            registry: Arc::new(Mutex::new(registry)),
            nats_connected,
            nats_clients: Arc::default(),
            nats_events,
            leader,
        }
    }

    /// Records whether the NATS client `client` is connected; the gauge is
    /// 1 only while every client seen so far is.
    pub fn set_nats_connected(&self, client: &str, connected: bool) {
        let mut clients = self.nats_clients.lock().unwrap_or_else(|e| e.into_inner());
        clients.insert(client.to_string(), connected);
        self.nats_connected
            .set(i64::from(clients.values().all(|c| *c)));
    }

    /// Registers a metric. `name` should start with `tocsin_<service>_`.
    pub fn register(&self, name: &str, help: &str, metric: impl Metric) {
        self.registry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .register(name, help, metric);
    }

    /// The whole registry in the text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &registry);
        out
    }
}

#[derive(Clone)]
enum Check {
    Fixed(Result<(), String>),
    /// Passes, with something to say (a standby: `standby: ...`).
    Passing(String),
    /// Passes while every client is connected; each named for messages.
    Nats(Vec<(String, Client)>),
}

/// Readiness: a set of named checks; ready when all pass.
#[derive(Clone, Default)]
pub struct Health {
    checks: Arc<Mutex<BTreeMap<String, Check>>>,
}

impl Health {
    pub fn new() -> Self {
        Self::default()
    }

    /// Marks `name` as passing.
    pub fn set_ok(&self, name: &str) {
        self.set(name, Check::Fixed(Ok(())));
    }

    /// Marks `name` as passing with `detail` shown instead of `ok` (a
    /// standby instance: ready, but not the active one).
    pub fn set_passing(&self, name: &str, detail: impl Into<String>) {
        self.set(name, Check::Passing(detail.into()));
    }

    /// Marks `name` as failing with `reason`.
    pub fn set_failing(&self, name: &str, reason: impl Into<String>) {
        self.set(name, Check::Fixed(Err(reason.into())));
    }

    /// Adds a live check that passes while `client` is connected.
    pub fn watch_nats(&self, client: Client) {
        self.set("nats", Check::Nats(vec![(String::new(), client)]));
    }

    /// The `nats` check for several clients (one per service, each named):
    /// it passes while every one of them is connected.
    pub fn watch_nats_clients(&self, clients: Vec<(String, Client)>) {
        self.set("nats", Check::Nats(clients));
    }

    fn set(&self, name: &str, check: Check) {
        self.checks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string(), check);
    }

    /// Whether every check passes, and each check's state.
    pub fn report(&self) -> (bool, BTreeMap<String, String>) {
        let checks = self
            .checks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut ready = !checks.is_empty();
        let mut out = BTreeMap::new();
        for (name, check) in checks {
            let state = match check {
                Check::Passing(detail) => {
                    out.insert(name, detail);
                    continue;
                }
                Check::Fixed(r) => r,
                Check::Nats(clients) => {
                    let down: Vec<String> = clients
                        .iter()
                        .filter(|(_, c)| !crate::nats::is_connected(c))
                        .map(|(name, c)| match name.as_str() {
                            "" => c.connection_state().to_string(),
                            name => format!("{name}: {}", c.connection_state()),
                        })
                        .collect();
                    if down.is_empty() {
                        Ok(())
                    } else {
                        Err(format!("not connected ({})", down.join(", ")))
                    }
                }
            };
            match state {
                Ok(()) => out.insert(name, "ok".to_string()),
                Err(reason) => {
                    ready = false;
                    out.insert(name, reason)
                }
            };
        }
        (ready, out)
    }

    pub fn is_ready(&self) -> bool {
        self.report().0
    }
}

#[derive(Clone)]
struct AdminState {
    health: Health,
    metrics: Metrics,
}

/// The admin router, for embedding or tests.
pub fn router(health: Health, metrics: Metrics) -> Router {
    Router::new()
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_handler))
        .with_state(AdminState { health, metrics })
}

async fn readyz(State(s): State<AdminState>) -> Response {
    let (ready, checks) = s.health.report();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::json!({
        "status": if ready { "ready" } else { "not ready" },
        "checks": checks,
    });
    (status, Json(body)).into_response()
}

async fn metrics_handler(State(s): State<AdminState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
        .into_response()
}

/// Serves the admin endpoints on `listener` until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    health: Health,
    metrics: Metrics,
    shutdown: CancellationToken,
) -> Result<(), RuntimeError> {
    let addr = listener
        .local_addr()
        .map(|a: SocketAddr| a.to_string())
        .unwrap_or_default();
    axum::serve(listener, router(health, metrics))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
        .map_err(|source| RuntimeError::Admin { addr, source })
}
