//! SIGHUP reloads runbooks in a real `tocsin remediation` process: a
//! runbook file added before the signal runs after it, and a bad file on
//! reload is refused (file and line in the log) while the others keep
//! running.

use crate::support::start_remediation;
use std::{path::Path, process::Command, time::Duration};

use tocsin_proto::{codec, AlertStatus};
use tocsin_remediation::control::{self, Control, ControlReply};
use tocsin_tests::{
    incidents::{alert, publish_alert},
    remediation::{has, wait_timeline, Runbooks},
    NatsServer, TocsinHarness,
};

/// The runbooks the process has loaded, asked over NATS.
async fn loaded(client: &async_nats::Client) -> Option<Vec<String>> {
    let payload = codec::encode(&Control::Runbooks).unwrap();
    let reply = tokio::time::timeout(
        Duration::from_secs(2),
        client.request(control::SUBJECT, payload.into()),
    )
    .await
    .ok()?
    .ok()?;
    match codec::decode::<ControlReply>(&reply.payload).ok()? {
        ControlReply::Runbooks { runbooks, .. } => {
            Some(runbooks.into_iter().map(|r| r.name).collect())
        }
        _ => None,
    }
}

async fn wait_loaded(client: &async_nats::Client, want: &[&str], log: &Path) {
    let last = tocsin_tests::eventually_within(Duration::from_secs(30), || async {
        match loaded(client).await {
            Some(g) if g == want => Ok(()),
            other => Err(other),
        }
    })
    .await;
    if let Err(got) = last {
        panic!(
            "loaded {got:?}, want {want:?}; log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
    }
}

fn annotating(name: &str, alertname: &str) -> String {
    format!(
        "name: {name}\nmatch: {{labels: ['alertname=\"{alertname}\"']}}\nsteps:\n  - id: note\n    annotate: \"{name} ran\"\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_loads_a_new_runbook_and_a_bad_file_keeps_the_others() {
    let nats = NatsServer::start().await;
    let tocsin = TocsinHarness::start(&nats).await;
    let rb = Runbooks::new();
    rb.add("first", &annotating("first", "First"));
    let config = rb.dir.path().join("tocsin.yaml");
    std::fs::write(
        &config,
        format!(
            "nats:\n  url: {}\n  credentials:\n    remediation: {{user: remediation, password: {}}}\nremediation:\n  runbook_dirs: [\"{}\"]\n",
            nats.address(),
            nats.password("remediation"),
            rb.path().display(),
        ),
    )
    .unwrap();
    let client = nats.client().await;
    let js = async_nats::jetstream::new(client.clone());
    let log = rb.dir.path().join("remediation.log");
    let mut child = start_remediation(&config, &log);
    wait_loaded(&client, &["first"], &log).await;

    // A new runbook and a broken one, then SIGHUP.
    rb.add("second", &annotating("second", "Second"));
    rb.add(
        "zz-broken",
        "name: broken\nmatch: {}\nsteps:\n  - id: x\n    shell: rm -rf /\n",
    );
    let hup = Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    wait_loaded(&client, &["first", "second"], &log).await;
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("runbook refused on reload")
            && text.contains("zz-broken.yaml:5")
            && text.contains("unknown field `shell`"),
        "{text}"
    );

    let t0 = tocsin.clock_now();
    for name in ["Second", "First"] {
        publish_alert(
            &js,
            alert(
                &[("alertname", name)],
                &["alertname"],
                AlertStatus::Firing,
                t0,
            ),
            t0,
        )
        .await;
    }
    for n in [1, 2] {
        wait_timeline(&client, n, "the run", |tl| has(tl, "run", "succeeded")).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
}
