//! Tocsin's streams in a JetStream domain, its services on a leaf node
//! (`jetstream.domain`): every JetStream request, KV put and direct get
//! goes to the domain's API, through the permissions
//! `deploy/nats/domain-permissions.sh` prints.

use std::time::Duration;

use tocsin_tests::{fakes::FakeProviders, smtp::SmtpSink, tocsin::SERVICES, NatsDomain};

use crate::support::{
    alert, bin, free_port, full_config, own_credentials, post_alerts, wait_paged_everywhere, Proc,
    Setup,
};

const WAIT: Duration = Duration::from_secs(60);

/// `tocsin up` (chat-ops and remediation too) on a leaf node, each
/// service as its own NATS user, with `jetstream.domain: hub`: an alert pages on every channel, an operator's
/// ack through the leaf is applied, and every stream and KV bucket is in
/// the hub's JetStream while the leaf's own holds nothing. (Queries waited
/// on `$JS.API.INFO`, outside the domain and its permissions, and the
/// shipped permissions allowed no domain at all.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_on_a_leaf_node_page_and_take_acks_in_the_hubs_domain() {
    let nats = NatsDomain::start().await;
    let fakes = FakeProviders::start().await;
    let smtp = SmtpSink::start().await;
    let dir = tempfile::tempdir().unwrap();
    let ingest = free_port();
    let path = full_config(
        &nats.leaf,
        &fakes,
        &smtp,
        ingest,
        dir.path(),
        &Setup::default(),
    );
    // Each service (and the operator) as its own user of the leaf, not as
    // the admin full_config connects as.
    let who: Vec<&str> = SERVICES.into_iter().chain(["operator"]).collect();
    let mut env = own_credentials(&path, &nats.leaf, &who);
    let text = std::fs::read_to_string(&path).unwrap();
    // Chat-ops and remediation run too (their queries and KV buckets).
    let runbooks = dir.path().join("runbooks");
    std::fs::create_dir_all(&runbooks).unwrap();
    let text = text
        + &format!(
            "jetstream:\n  domain: {domain}\n\
         remediation:\n  runbook_dirs: [\"{runbooks}\"]\n\
         chatops:\n  listen: 127.0.0.1:{chatops}\n  slack:\n    \
         signing_secret: ${{TOCSIN_SLACK_SIGNING_SECRET}}\n",
            domain = NatsDomain::DOMAIN,
            runbooks = runbooks.display(),
            chatops = free_port(),
        );
    std::fs::write(&path, text).unwrap();
    env.push((
        "TOCSIN_SLACK_SIGNING_SECRET".to_string(),
        "domain-test-signing-secret-0123456789".to_string(),
    ));

    let mut up = Proc::start_with_env(&path, dir.path(), &["up"], &env);
    up.ready().await;
    post_alerts(ingest, &serde_json::json!([alert("DiskFull", "firing")])).await;
    wait_paged_everywhere(&fakes, WAIT, || up.log_text()).await;
    assert_eq!(smtp.wait_for(1, WAIT).await.len(), 1, "{}", up.log_text());

    // The operator's ack goes through the leaf to the incidents service,
    // which answers once it is in the incident's log.
    let out = tokio::process::Command::new(bin())
        .arg("--config")
        .arg(&path)
        .args(["ack", "1", "--as", "alice"])
        .envs(env.iter().cloned())
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .unwrap();
    assert_eq!(
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).trim()
        ),
        (Some(0), "incident #1 acknowledged"),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        up.log_text()
    );
    up.stop();
    // No service was refused anything on the way (a refusal is logged, and
    // a subscriber retries, so it may not show otherwise).
    let log = up.log_text();
    assert!(
        !log.contains("permissions violation") && !log.contains("cannot subscribe"),
        "{log}"
    );

    // Everything is in the hub's domain; the leaf's own JetStream is empty.
    let hub = async_nats::jetstream::new(nats.hub.client().await);
    let mut names: Vec<String> = Vec::new();
    let mut list = hub.stream_names();
    while let Some(name) = futures::StreamExt::next(&mut list).await {
        names.push(name.unwrap());
    }
    names.sort();
    for want in [
        "ALERTS",
        "INCIDENTS",
        "COMMANDS",
        "NOTIFY",
        "DEADLETTER",
        "KV_tocsin_deliveries",
        "KV_tocsin_lease_incidents",
        "KV_tocsin_lease_escalation",
        "KV_tocsin_remediation",
        "KV_tocsin_remediation_runs",
        "KV_tocsin_remediation_locks",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} is not in the hub's domain: {names:?}"
        );
    }
    let deliveries = hub.get_key_value("tocsin_deliveries").await.unwrap();
    let mut keys = deliveries.keys().await.unwrap();
    assert!(
        futures::StreamExt::next(&mut keys).await.is_some(),
        "the notifier's delivery records were put in the hub's bucket"
    );
    let leaf = async_nats::jetstream::new(nats.leaf.client().await);
    let account = leaf.query_account().await.unwrap();
    assert_eq!(
        account.streams, 0,
        "the leaf's own JetStream holds no stream of Tocsin's"
    );
}
