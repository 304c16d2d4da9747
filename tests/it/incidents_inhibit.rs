//! Inhibition through the bus: a firing NodeDown mutes the warnings of the
//! same instance (Alertmanager's `equal`), not those of other instances.

use jiff::Timestamp;
use tocsin_proto::AlertStatus;
use tocsin_tests::{
    incidents::{alert, publish_alert, wait_for},
    NatsServer, TocsinHarness,
};

#[tokio::test]
async fn a_firing_source_mutes_matching_targets_with_equal_labels() {
    let nats = NatsServer::start().await;
    let mut config = TocsinHarness::config(&nats);
    config.incidents = serde_yaml_ng::from_str(
        "inhibit_rules:\n  - name: node-down\n    source_matchers: ['alertname=\"NodeDown\"']\n    target_matchers: ['severity=\"warning\"']\n    equal: [instance]\n",
    )
    .unwrap();
    let _tocsin = TocsinHarness::start_with(config).await;
    let client = nats.client().await;
    let js = async_nats::jetstream::new(client.clone());
    let now = Timestamp::now();
    let group = ["alertname", "instance"];
    publish_alert(
        &js,
        alert(
            &[
                ("alertname", "NodeDown"),
                ("instance", "n1"),
                ("severity", "critical"),
            ],
            &group,
            AlertStatus::Firing,
            now,
        ),
        now,
    )
    .await;
    publish_alert(
        &js,
        alert(
            &[
                ("alertname", "DiskSlow"),
                ("instance", "n1"),
                ("severity", "warning"),
            ],
            &group,
            AlertStatus::Firing,
            now,
        ),
        now,
    )
    .await;
    publish_alert(
        &js,
        alert(
            &[
                ("alertname", "DiskSlow"),
                ("instance", "n2"),
                ("severity", "warning"),
            ],
            &group,
            AlertStatus::Firing,
            now,
        ),
        now,
    )
    .await;
    publish_alert(
        &js,
        alert(
            &[
                ("alertname", "CpuHot"),
                ("instance", "n1"),
                ("severity", "critical"),
            ],
            &group,
            AlertStatus::Firing,
            now,
        ),
        now,
    )
    .await;
    let all = wait_for(&client, "four incidents", |all| all.len() == 4).await;
    let find = |name: &str, inst: &str| {
        all.iter()
            .find(|i| {
                i.labels.get("alertname").map(String::as_str) == Some(name)
                    && i.labels.get("instance").map(String::as_str) == Some(inst)
            })
            .unwrap_or_else(|| panic!("{name}/{inst}"))
    };
    let muted = find("DiskSlow", "n1");
    let reason = muted
        .suppressed
        .as_deref()
        .expect("n1's warning is inhibited");
    assert!(
        reason.starts_with("inhibited by rule \"node-down\""),
        "{reason}"
    );
    assert_eq!(find("DiskSlow", "n2").suppressed, None, "other instance");
    assert_eq!(find("CpuHot", "n1").suppressed, None, "not a warning");
    assert_eq!(
        find("NodeDown", "n1").suppressed,
        None,
        "the source itself pages"
    );
}
