//! Health, metrics and the admin HTTP server (`/livez`, `/readyz`, `/metrics`).

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
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
    /// `tocsin_standby_followed_sequence{role}`: while standing by, the
    /// INCIDENTS sequence this process's store is caught up to (see
    /// [`crate::lease::followed`]); gone once the process takes the lease.
    pub followed: Family<Labels, Gauge>,
    /// `tocsin_handled_sequence{service,stream}`: every message of the
    /// stream up to this sequence is handled by the service, its effects
    /// stored (see [`crate::progress`]).
    pub handled: Family<Labels, Gauge>,
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
        let followed = Family::<Labels, Gauge>::default();
        registry.register(
            "tocsin_standby_followed_sequence",
            "While standing by: the INCIDENTS sequence this process's store is caught up to \
             (compare with the stream's last sequence for the standby's lag)",
            followed.clone(),
        );
        let handled = Family::<Labels, Gauge>::default();
        registry.register(
            "tocsin_handled_sequence",
            "Every message of the stream up to this sequence is handled by the service, its \
             effects stored (tocsin_stream_last_sequence minus this is how far it is behind)",
            handled.clone(),
        );
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let workers: Gauge = Gauge::default();
            workers.set(i64::try_from(rt.metrics().num_workers()).unwrap_or(i64::MAX));
            registry.register(
                "tocsin_runtime_worker_threads",
                "Worker threads of this process's async runtime (--threads, TOCSIN_THREADS; \
                 default one per CPU the process may use)",
                workers,
            );
        }
        Metrics {
            registry: Arc::new(Mutex::new(registry)),
            nats_connected,
            nats_clients: Arc::default(),
            nats_events,
            leader,
            followed,
            handled,
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
    /// Passes unless a step of a service's loop has run too long.
    Watchdog(Watchdog),
}

/// A service loop's watchdog: the loop marks each step of local work (its
/// store's reads and writes) while it runs; one that has not
/// finished after `limit` fails both `/readyz` and `/livez`, so a loop that
/// hangs (as sled once did, holding a lock every later write waited for)
/// is reported and, under a supervisor that probes `/livez`, restarted.
/// Waits for NATS are not marked: a broker outage is the `nats` check's,
/// and restarting would not end it.
#[derive(Clone)]
pub struct Watchdog {
    /// The steps in progress, by the number each was given; a clone of
    /// the watchdog marks steps of its own beside the others'.
    busy: Arc<Mutex<Marks>>,
    limit: Duration,
}

#[derive(Default)]
struct Marks {
    next: u64,
    running: std::collections::BTreeMap<u64, (Instant, &'static str)>,
}

impl Watchdog {
    /// Marks the loop busy with `what` until the guard is dropped.
    pub fn busy(&self, what: &'static str) -> Busy {
        let mut marks = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        let n = marks.next;
        marks.next += 1;
        marks.running.insert(n, (Instant::now(), what));
        Busy(self.clone(), n)
    }

    /// Runs `f` marked busy with `what`.
    pub fn during<T>(&self, what: &'static str, f: impl FnOnce() -> T) -> T {
        let _busy = self.busy(what);
        f()
    }

    /// What has been running too long, if anything: the oldest step, the
    /// one with the lowest number (numbers are given in the order marked).
    fn stuck(&self) -> Option<String> {
        let oldest = self
            .busy
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .running
            .first_key_value()
            .map(|(_, step)| *step);
        let (since, what) = oldest?;
        let took = since.elapsed();
        (took >= self.limit).then(|| {
            format!(
                "stuck: {what} has not finished after {} s (limit {} s)",
                took.as_secs(),
                self.limit.as_secs()
            )
        })
    }
}

/// A step of local work in progress (see [`Watchdog`]).
pub struct Busy(Watchdog, u64);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0
            .busy
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .running
            .remove(&self.1);
    }
}

/// How long one step of a service loop's local work may take before the
/// service counts as stuck. The longest legitimate step here is a store
/// write of a few MiB (well under a second); a minute is far beyond it.
pub const STUCK_AFTER: Duration = Duration::from_secs(60);

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

    /// A watchdog for `service`'s loop, reported as the check
    /// `<service>_loop` (see [`Watchdog`]).
    pub fn watchdog(&self, service: &str, limit: Duration) -> Watchdog {
        let w = Watchdog {
            busy: Arc::default(),
            limit,
        };
        self.set(&format!("{service}_loop"), Check::Watchdog(w.clone()));
        w
    }

    /// Whether no watchdog reports its loop stuck, and what is stuck.
    pub fn liveness(&self) -> (bool, BTreeMap<String, String>) {
        let checks = self.checks.lock().unwrap_or_else(|e| e.into_inner());
        let stuck: BTreeMap<String, String> = checks
            .iter()
            .filter_map(|(name, check)| match check {
                Check::Watchdog(w) => w.stuck().map(|why| (name.clone(), why)),
                _ => None,
            })
            .collect();
        (stuck.is_empty(), stuck)
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
                Check::Watchdog(w) => w.stuck().map_or(Ok(()), Err),
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
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_handler))
        .with_state(AdminState { health, metrics })
}

/// Alive unless a service loop is stuck (see [`Watchdog`]): `ok`, or 503
/// with what is stuck.
async fn livez(State(s): State<AdminState>) -> Response {
    let (alive, stuck) = s.health.liveness();
    if alive {
        return "ok\n".into_response();
    }
    let body = serde_json::json!({ "status": "stuck", "checks": stuck });
    (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
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
) {
    crate::http_server::serve(
        listener,
        router(health, metrics),
        crate::http_server::small_server(ADMIN_MAX_CONNECTIONS, ADMIN_REFUSAL),
        crate::http_server::Logged::new("admin"),
        shutdown,
    )
    .await;
}

/// Connections the admin server keeps open at once: scrapers and probes
/// need a handful. At the cap a new one closes the oldest idle one.
pub const ADMIN_MAX_CONNECTIONS: usize = 64;
const ADMIN_REFUSAL: &str = r#"{"error":"too_many_connections","reason":"the admin server has 64 requests in progress; try again"}"#;

#[cfg(test)]
mod watchdog_tests {
    use super::*;

    #[test]
    fn a_step_running_past_the_limit_fails_readiness_and_liveness_until_it_ends() {
        let health = Health::new();
        health.set_ok("escalation");
        // A limit of zero: any step in progress counts as stuck.
        let w = health.watchdog("escalation", Duration::ZERO);
        let patient = health.watchdog("incidents", Duration::from_secs(3600));
        assert!(health.is_ready());
        assert!(health.liveness().0);
        {
            let _busy = w.busy("saving the tracks");
            let _fine = patient.busy("saving the projection");
            let (ready, checks) = health.report();
            assert!(!ready);
            assert!(
                checks["escalation_loop"].contains("stuck: saving the tracks"),
                "{checks:?}"
            );
            assert_eq!(checks["incidents_loop"], "ok");
            let (alive, stuck) = health.liveness();
            assert!(!alive);
            assert_eq!(stuck.keys().collect::<Vec<_>>(), ["escalation_loop"]);
        }
        assert!(health.is_ready());
        assert!(health.liveness().0);
    }

    /// Two steps at once (the watchdog is `Clone`; a task of the service
    /// may mark a step while its loop is in another): the one that ends
    /// does not clear the other's mark, and the older start counts.
    #[test]
    fn a_step_that_ends_leaves_another_still_running_marked() {
        let health = Health::new();
        let w = health.watchdog("incidents", Duration::ZERO);
        let first = w.busy("reading an incident back");
        {
            let _second = w.busy("saving the projection");
        }
        let (ready, checks) = health.report();
        assert!(!ready, "{checks:?}");
        assert!(
            checks["incidents_loop"].contains("stuck: reading an incident back"),
            "{checks:?}"
        );
        drop(first);
        assert!(health.is_ready());
    }
}
