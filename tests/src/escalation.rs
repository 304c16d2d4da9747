//! Escalation in tests: a reference config and reading the pages it writes.

use tocsin_proto::notify::Page;

use crate::bus;

/// The reference practice in small: primary (alice) at once, secondary
/// (bob) after 15 minutes (5 for high), the lead at 30, manager and CTO at 60.
pub const REFERENCE: &str = r##"
route:
  policy: default
policies:
  - name: default
    levels:
      - targets: [{schedule: primary}]
        delay: 15m
        delay_by_severity: {high: 5m}
      - targets: [{schedule: secondary}]
        delay: 15m
      - targets: [{user: lead}]
        delay: 30m
      - targets: [{user: em}, {user: cto}]
schedules:
  - name: primary
    timezone: Europe/Berlin
    layers: [{name: all, participants: [alice], rotation: weekly, start: 2026-01-05}]
  - name: secondary
    timezone: Europe/Berlin
    layers: [{name: all, participants: [bob], rotation: weekly, start: 2026-01-05}]
users:
  - {name: alice, email: alice@example.com, phone: "+14155550101", slack: U01ALICE}
  - {name: bob, email: bob@example.com, phone: "+14155550102"}
  - {name: lead, email: lead@example.com, slack: U01LEAD}
  - {name: em, email: em@example.com}
  - {name: cto, email: cto@example.com}
"##;

/// Every page on the NOTIFY stream, in order.
pub async fn pages(js: &async_nats::jetstream::Context) -> Vec<Page> {
    bus::read_pages(js)
        .await
        .into_iter()
        .map(|m| m.envelope.body)
        .collect()
}

/// The pages on NOTIFY once the engine has settled at the clock's time,
/// asserting there are exactly `n`: every page due by now has been sent and
/// none more will come until the clock moves.
pub async fn expect_pages(
    tocsin: &crate::TocsinHarness,
    js: &async_nats::jetstream::Context,
    n: usize,
) -> Vec<Page> {
    tocsin.settled(js).await;
    let p = pages(js).await;
    assert_eq!(
        p.len(),
        n,
        "pages: {:#?}",
        p.iter().map(|p| &p.id).collect::<Vec<_>>()
    );
    p
}
