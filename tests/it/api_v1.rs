//! The HTTP API end to end: every endpoint against the real services,
//! authentication (none: 401, read token writing: 403), validation (400
//! naming the field), cursor pagination, the OpenAPI file against the
//! routes, and `/status.json` following an incident's severity and
//! resolution.

use std::collections::BTreeSet;

use reqwest::{Client, Method, StatusCode};
use serde_json::{json, Value};
use tocsin_proto::{incident::IncidentStatus, AlertStatus};
use tocsin_tests::{
    chatops::{self, READ_TOKEN, WRITE_TOKEN},
    fakes::FakeProviders,
    incidents::{alert, publish_alert, wait_for},
    NatsServer, TocsinHarness,
};

const ESCALATION: &str = r#"
route:
  policy: default
policies:
  - name: default
    levels:
      - targets: [{schedule: primary}]
        delay: 15m
schedules:
  - name: primary
    timezone: UTC
    layers:
      - {name: weekly, participants: [alice, bob], rotation: weekly, handoff: "09:00", start: 2026-01-05}
users:
  - {name: alice, email: alice@example.com, slack: U01ALICE}
  - {name: bob, email: bob@example.com, slack: U02BOB}
"#;

struct Api {
    base: String,
    http: Client,
}

impl Api {
    async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut r = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r.send().await.expect("chatops answered");
        let status = resp.status();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }
    async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.call(Method::GET, path, Some(READ_TOKEN), None).await
    }
    async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.call(Method::POST, path, Some(WRITE_TOKEN), Some(body))
            .await
    }
}

async fn start() -> (NatsServer, FakeProviders, TocsinHarness, Api) {
    start_with(|_| {}).await
}

/// [`start`] with `edit` applied to the config first.
async fn start_with(
    edit: impl FnOnce(&mut tocsin::config::Config),
) -> (NatsServer, FakeProviders, TocsinHarness, Api) {
    let nats = NatsServer::start().await;
    let fakes = FakeProviders::start().await;
    let mut config = TocsinHarness::config(&nats);
    edit(&mut config);
    config.escalation = serde_yaml_ng::from_str(ESCALATION).unwrap();
    let mut c = chatops::config(&fakes);
    c.status = serde_yaml_ng::from_str(
        r#"
title: Example status
components:
  - {name: API, matchers: ['service="api"']}
  - {name: Database, matchers: ['service=~"db|postgres"']}
cache_for: 0s
"#,
    )
    .unwrap();
    config.chatops = Some(c);
    config.compose_chatops_users();
    let tocsin = TocsinHarness::start_with(config).await;
    let api = Api {
        base: tocsin.chatops_url.clone(),
        http: Client::new(),
    };
    (nats, fakes, tocsin, api)
}

async fn open(
    js: &async_nats::jetstream::Context,
    name: &str,
    service: &str,
    severity: &str,
    at: jiff::Timestamp,
) {
    publish_alert(
        js,
        alert(
            &[
                ("alertname", name),
                ("service", service),
                ("severity", severity),
            ],
            &["alertname", "service"],
            AlertStatus::Firing,
            at,
        ),
        at,
    )
    .await;
}

/// Critical incidents #1 (DiskFull, db), #2 (HighLatency, api) and #3
/// (QueueBacklog, billing), a second apart from `t0`.
async fn open_three(js: &async_nats::jetstream::Context, t0: jiff::Timestamp) {
    for (k, (name, service)) in [
        ("DiskFull", "db"),
        ("HighLatency", "api"),
        ("QueueBacklog", "billing"),
    ]
    .into_iter()
    .enumerate()
    {
        open(
            js,
            name,
            service,
            "critical",
            t0 + jiff::SignedDuration::from_secs(k as i64),
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_with_auth_validation_and_pagination() {
    let (nats, _fakes, tocsin, api) = start().await;
    let client = nats.client().await;
    let js = async_nats::jetstream::new(client.clone());
    let t0 = tocsin.clock_now();
    open_three(&js, t0).await;
    wait_for(&client, "three incidents", |l| l.len() == 3).await;

    // --- Authentication.
    let (s, j) = api.call(Method::GET, "/api/v1/incidents", None, None).await;
    assert_eq!(s, 401);
    assert_eq!(j["error"], "unauthorized");
    assert!(
        j["reason"].as_str().unwrap().contains("Authorization"),
        "{j}"
    );
    let (s, _) = api
        .call(
            Method::GET,
            "/api/v1/incidents",
            Some("wrong-token-0123456789"),
            None,
        )
        .await;
    assert_eq!(s, 401);
    let (s, j) = api
        .call(
            Method::POST,
            "/api/v1/incidents/1/ack",
            Some(READ_TOKEN),
            None,
        )
        .await;
    assert_eq!(s, 403, "{j}");
    assert!(j["reason"].as_str().unwrap().contains("read scope"), "{j}");
    let (s, _) = api
        .call(
            Method::POST,
            "/api/v1/silences",
            Some(READ_TOKEN),
            Some(json!({})),
        )
        .await;
    assert_eq!(s, 403);
    let (s, _) = api
        .call(Method::DELETE, "/api/v1/silences/x", None, None)
        .await;
    assert_eq!(s, 401);

    // --- Listing: pages of two, most recent first, by cursor.
    let (s, j) = api.get("/api/v1/incidents?limit=2").await;
    assert_eq!(s, 200, "{j}");
    let numbers = |j: &Value| -> Vec<u64> {
        j["incidents"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["number"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(numbers(&j), [3, 2]);
    assert_eq!(j["next_cursor"], "2");
    let (_, j) = api.get("/api/v1/incidents?limit=2&cursor=2").await;
    assert_eq!(numbers(&j), [1]);
    assert_eq!(j["next_cursor"], Value::Null);
    let (_, j) = api
        .get("/api/v1/incidents?matcher=service%3D%22api%22")
        .await;
    assert_eq!(numbers(&j), [2]);
    let (_, j) = api.get("/api/v1/incidents?status=resolved").await;
    assert_eq!(numbers(&j), Vec::<u64>::new());
    let (_, j) = api
        .get("/api/v1/incidents?severity=critical&status=all")
        .await;
    assert_eq!(numbers(&j).len(), 3);

    // --- Validation: 400 naming the field.
    for (path, field) in [
        ("/api/v1/incidents?limit=0", "limit"),
        ("/api/v1/incidents?limit=abc", "limit"),
        ("/api/v1/incidents?severity=dire", "severity"),
        ("/api/v1/incidents?status=pending", "status"),
        ("/api/v1/incidents?cursor=x", "cursor"),
        ("/api/v1/incidents?since=yesterday", "since"),
        ("/api/v1/incidents?matcher=a%3D~%22(%22", "matcher"),
        ("/api/v1/incidents?colour=red", "colour"),
        ("/api/v1/incidents/forty-two", "incident"),
        ("/api/v1/oncall/primary?at=soon", "at"),
        ("/api/v1/report?since=forever", "since"),
    ] {
        let (s, j) = api.get(path).await;
        assert_eq!(s, 400, "{path}: {j}");
        assert!(
            j["reason"].as_str().unwrap().starts_with(field),
            "{path}: {j}"
        );
    }
    for (path, body, field) in [
        ("/api/v1/incidents/1/snooze", json!({}), "duration"),
        (
            "/api/v1/incidents/1/snooze",
            json!({"duration": "8d"}),
            "duration",
        ),
        (
            "/api/v1/incidents/1/snooze",
            json!({"duration": 30}),
            "duration",
        ),
        ("/api/v1/incidents/1/note", json!({"text": ""}), "text"),
        (
            "/api/v1/incidents/1/note",
            json!({"text": "x".repeat(5000)}),
            "text",
        ),
        ("/api/v1/incidents/1/assign", json!({}), "user"),
        ("/api/v1/incidents/1/ack", json!({"force": true}), "force"),
        ("/api/v1/incidents/1/ack", json!([1]), "body"),
        ("/api/v1/silences", json!({"duration": "1h"}), "matchers"),
        (
            "/api/v1/silences",
            json!({"matchers": ["service"], "duration": "1h"}),
            "matchers[0]",
        ),
        (
            "/api/v1/silences",
            json!({"matchers": [1], "duration": "1h"}),
            "matchers[0]",
        ),
        (
            "/api/v1/silences",
            json!({"matchers": ["a=~\".*\""], "duration": "1h"}),
            "matchers",
        ),
        (
            "/api/v1/silences",
            json!({"matchers": ["service=db"], "duration": "1y"}),
            "duration",
        ),
    ] {
        let (s, j) = api.post(path, body.clone()).await;
        assert_eq!(s, 400, "{path} {body}: {j}");
        assert!(
            j["reason"].as_str().unwrap().starts_with(field),
            "{path} {body}: {j}"
        );
    }
    let r = api
        .http
        .post(format!("{}/api/v1/incidents/1/note", api.base))
        .bearer_auth(WRITE_TOKEN)
        .body(vec![b'x'; 70 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let (s, j) = api.post("/api/v1/incidents/1/dance", json!({})).await;
    assert_eq!(s, 404, "{j}");
    let (s, j) = api.get("/api/v1/incidents/99").await;
    assert_eq!(s, 404, "{j}");
    let (s, j) = api.get("/api/v1/nothing").await;
    assert_eq!(
        (s, j["error"].as_str()),
        (StatusCode::NOT_FOUND, Some("no_such_endpoint"))
    );

    // --- Actions, recorded as the token's name via api.
    let id = {
        let (_, j) = api.get("/api/v1/incidents/1").await;
        j["incident"]["id"].as_str().unwrap().to_string()
    };
    let (s, j) = api
        .post(&format!("/api/v1/incidents/{id}/ack"), json!({}))
        .await;
    assert_eq!(s, 200, "{j}");
    assert_eq!(j["status"], "accepted");
    assert_eq!(j["incident"]["acknowledged_by"]["name"], "grafana");
    assert_eq!(j["incident"]["acknowledged_by"]["via"], "api");
    let (s, j) = api.post("/api/v1/incidents/1/ack", json!({})).await;
    assert_eq!(s, 409, "{j}");
    assert!(
        j["reason"]
            .as_str()
            .unwrap()
            .contains("already acknowledged by grafana (api)"),
        "{j}"
    );
    for (action, body) in [
        ("unack", json!({})),
        ("note", json!({"text": "looking"})),
        ("assign", json!({"user": "bob"})),
        ("escalate", json!({"reason": "no progress"})),
        ("snooze", json!({"duration": "30m"})),
        ("resolve", json!({})),
        ("reopen", json!({})),
    ] {
        let (s, j) = api
            .post(&format!("/api/v1/incidents/1/{action}"), body)
            .await;
        assert_eq!(s, 200, "{action}: {j}");
    }
    let (s, j) = api.get("/api/v1/incidents/%231").await;
    assert_eq!(s, 200, "{j}");
    assert_eq!(j["incident"]["assignee"], "bob");
    let kinds: Vec<&str> = j["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"]["type"].as_str().unwrap())
        .collect();
    for k in [
        "acknowledged",
        "unacknowledged",
        "note_added",
        "assigned",
        "snoozed",
        "escalated",
        "resolved",
        "reopened",
    ] {
        assert!(kinds.contains(&k), "{k} not in {kinds:?}");
    }
    assert!(j["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["actor"]["name"] == "grafana" && e["actor"]["via"] == "api"));
    assert_eq!(j["alerts"].as_array().unwrap().len(), 1);

    // --- Silences: create, list, expire.
    let (s, j) = api
        .post(
            "/api/v1/silences",
            json!({"matchers": ["service=\"billing\""], "duration": "2h", "comment": "migration"}),
        )
        .await;
    assert_eq!(s, 201, "{j}");
    let sid = j["id"].as_str().unwrap().to_string();
    assert_eq!(j["silence"]["created_by"], "grafana");
    let (s, j) = api.get("/api/v1/silences").await;
    assert_eq!(s, 200);
    assert!(
        j["silences"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["id"] == sid.as_str()),
        "{j}"
    );
    let (s, j) = api
        .call(
            Method::DELETE,
            &format!("/api/v1/silences/{sid}"),
            Some(WRITE_TOKEN),
            None,
        )
        .await;
    assert_eq!(s, 200, "{j}");

    // --- On call: the weekly rotation from 2026-01-05 09:00 UTC.
    let (s, j) = api.get("/api/v1/schedules").await;
    assert_eq!((s, j), (StatusCode::OK, json!({"schedules": ["primary"]})));
    let (s, j) = api
        .get("/api/v1/oncall/primary?at=2026-01-06T12:00:00Z")
        .await;
    assert_eq!(s, 200, "{j}");
    assert_eq!(j["user"], "alice");
    assert_eq!(j["shift_end"], "2026-01-12T09:00:00Z");
    assert_eq!(j["next"][0]["user"], "bob");
    let (s, j) = api.get("/api/v1/oncall?at=2026-01-13T12:00:00Z").await;
    assert_eq!(s, 200);
    assert_eq!(j["oncall"][0]["user"], "bob");
    let (s, j) = api.get("/api/v1/oncall/tertiary").await;
    assert_eq!(s, 404, "{j}");

    // --- The report (its window ends at the services' clock, moved past
    // the incidents' openings).
    tocsin.clock.advance(jiff::SignedDuration::from_secs(60));
    let (s, j) = api.get("/api/v1/report?since=1d").await;
    assert_eq!(s, 200, "{j}");
    assert_eq!(j["incidents"], 3);
    assert_eq!(j["mtta"]["count"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_file_documents_exactly_the_routes() {
    let (_nats, _fakes, _tocsin, api) = start().await;
    let file =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../services/chatops/openapi.yaml");
    let doc: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
    let mut documented = BTreeSet::new();
    for (path, ops) in doc["paths"].as_mapping().unwrap() {
        for (method, _) in ops.as_mapping().unwrap() {
            documented.insert((
                method.as_str().unwrap().to_string(),
                path.as_str().unwrap().to_string(),
            ));
        }
    }
    let served: BTreeSet<(String, String)> = tocsin_chatops::ROUTES
        .iter()
        .filter(|(_, p)| p.starts_with("/api/v1") || *p == "/status.json")
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(documented, served, "openapi.yaml and the routes differ");
    // Every route answers (not the router's fallback, not 405).
    for (method, path) in tocsin_chatops::ROUTES {
        let concrete = path
            .replace("{incident}", "1")
            .replace("{id}", "s1")
            .replace("{schedule}", "primary");
        let m = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
        let r = api
            .http
            .request(m, format!("{}{concrete}", api.base))
            .send()
            .await
            .unwrap();
        let status = r.status();
        let text = r.text().await.unwrap();
        assert_ne!(status, 405, "{method} {path}");
        assert!(
            !text.contains("no_such_endpoint"),
            "{method} {path}: {text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_json_shows_an_open_critical_incident_on_its_component_until_resolved() {
    let (nats, _fakes, tocsin, api) = start().await;
    let client = nats.client().await;
    let js = async_nats::jetstream::new(client.clone());
    let status = || async {
        let r = api
            .http
            .get(format!("{}/status.json", api.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.json::<Value>().await.unwrap()
    };
    let page = status().await;
    assert_eq!(page["title"], "Example status");
    assert_eq!(page["state"], "operational");
    assert_eq!(
        page["components"],
        json!([{"name": "API", "state": "operational"}, {"name": "Database", "state": "operational"}])
    );

    open(&js, "HighLatency", "api", "critical", tocsin.clock_now()).await;
    // An incident no component covers stays off the page.
    open(&js, "CronFailed", "batch", "critical", tocsin.clock_now()).await;
    wait_for(&client, "the incidents", |l| l.len() == 2).await;
    let (s, _) = api
        .post(
            "/api/v1/incidents/1/note",
            json!({"text": "internal: restarting pods on node-7"}),
        )
        .await;
    assert_eq!(s, 200);
    let (s, _) = api
        .post(
            "/api/v1/incidents/1/note",
            json!({"text": "public: We are investigating slow responses."}),
        )
        .await;
    assert_eq!(s, 200);
    let page = status().await;
    assert_eq!(page["state"], "major_outage");
    assert_eq!(
        page["components"][0],
        json!({"name": "API", "state": "major_outage"})
    );
    assert_eq!(
        page["components"][1],
        json!({"name": "Database", "state": "operational"})
    );
    let active = page["active_incidents"].as_array().unwrap();
    assert_eq!(active.len(), 1, "{page}");
    assert_eq!(active[0]["title"], "API: major outage");
    assert_eq!(active[0]["status"], "investigating");
    assert_eq!(active[0]["components"], json!(["API"]));
    assert_eq!(
        active[0]["latest_note"]["text"],
        "We are investigating slow responses."
    );
    let text = page.to_string();
    for internal in [
        "HighLatency",
        "alertname",
        "service",
        "node-7",
        "CronFailed",
        "severity",
    ] {
        assert!(!text.contains(internal), "{internal} leaked: {text}");
    }

    let (s, j) = api.post("/api/v1/incidents/1/resolve", json!({})).await;
    assert_eq!(s, 200, "{j}");
    wait_for(&client, "resolved", |l| {
        l.iter()
            .any(|i| i.number == 1 && i.status == IncidentStatus::Resolved)
    })
    .await;
    let page = status().await;
    assert_eq!(page["state"], "operational", "{page}");
    assert_eq!(page["components"][0]["state"], "operational");
    assert_eq!(page["active_incidents"], json!([]));
    let recent = page["recently_resolved"].as_array().unwrap();
    assert_eq!(recent.len(), 1);
    assert_eq!(recent[0]["status"], "resolved");
    assert!(recent[0]["resolved_at"].is_string());
}

/// The incidents service reads at most `incidents.list_max_reads` stored
/// incidents per answer: a page it cut short, even an empty one, still
/// hands out a `next_cursor`, and following it finds what is older.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_cut_short_by_the_services_read_bound_still_has_a_cursor() {
    let (nats, _fakes, tocsin, api) = start_with(|config| {
        config.incidents =
            serde_yaml_ng::from_str("max_in_memory: 1\nlist_max_reads: 1\n").unwrap();
    })
    .await;
    let client = nats.client().await;
    let js = async_nats::jetstream::new(client.clone());
    let t0 = tocsin.clock_now();
    open_three(&js, t0).await;
    tocsin.settled(&js).await;
    let numbers = |j: &Value| -> Vec<u64> {
        j["incidents"]
            .as_array()
            .unwrap_or_else(|| panic!("a page: {j}"))
            .iter()
            .map(|i| i["number"].as_u64().unwrap())
            .collect()
    };
    // One of the three is in memory (whichever changed last), the others
    // in the store, and one answer may read one of those: the first page
    // stops before it reaches #1, empty, with a cursor; following the
    // cursors finds #1 and ends.
    let path = "/api/v1/incidents?matcher=service%3D%22db%22";
    let (s, j) = api.get(path).await;
    assert_eq!(s, 200, "{j}");
    assert_eq!(numbers(&j), Vec::<u64>::new(), "{j}");
    let mut cursor = j["next_cursor"].as_str().map(str::to_string);
    assert!(cursor.is_some(), "a page cut short has a cursor: {j}");
    let mut found = Vec::new();
    let mut pages = 1;
    while let Some(c) = cursor {
        assert!(
            pages <= 3,
            "three incidents, one read an answer: at most three pages"
        );
        let (s, j) = api.get(&format!("{path}&cursor={c}")).await;
        assert_eq!(s, 200, "{j}");
        found.extend(numbers(&j));
        cursor = j["next_cursor"].as_str().map(str::to_string);
        pages += 1;
    }
    assert_eq!(found, [1]);
    // The chat-ops status page follows the cursor by itself: the database
    // component shows its open critical incident.
    let (s, j) = api.call(Method::GET, "/status.json", None, None).await;
    assert_eq!(s, 200, "{j}");
    let db = j["components"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "Database")
        .unwrap_or_else(|| panic!("{j}"));
    assert_eq!(db["state"], "major_outage", "{j}");
    tocsin.stop().await.unwrap();
}
