//! `bench all`'s notifier scenario: the `notifier` bench's two runs (one
//! round per repetition each, [`super::notifier_plain`] and
//! [`super::notifier_mixed`]) as figures, 2 replicas in the Tocsin column
//! and 1 replica in the peer's: pages/s and publish-to-fake latency with no
//! rate limit, then every channel at once at the production rate limits,
//! per channel.

use super::{
    all::{Figure, Outcome},
    peer, percentile_ms, MixedResult, NotifierArgs, MIXED_CHANNELS,
};

const TOCSIN_SIDE: &str = "notifier, 2 replicas in-process sharing NOTIFY's consumer";
const PEER: &str = "notifier, 1 replica";

/// The notifier bench's replica counts, as the two columns.
const REPLICAS: [usize; 2] = [2, 1];

pub async fn notifier(quick: bool, reps: u32) -> anyhow::Result<Outcome> {
    let (pages, incidents) = if quick { (500, 10) } else { (2_000, 50) };
    let figure = |scenario: &str, metric: &str, unit: &str, better: &str| {
        Figure::new(scenario, metric, unit, better, PEER).side(TOCSIN_SIDE)
    };
    let mut outcome = Outcome::default();
    peer::reset_peak_rss();

    println!(
        "-- no rate limit: {pages} pages per round (slack, sms, webhook in turn), published as fast as they go"
    );
    let rounds = super::notifier_plain(&NotifierArgs {
        pages,
        rounds: reps,
        rate: 0,
        pagerduty: false,
        mixed: false,
        per_message: 1,
    })
    .await?;
    let mut plain = [
        figure("notifier", "pages/s", "pages/s", "higher"),
        figure("notifier", "publish→fake p50", "ms", "lower"),
        figure("notifier", "publish→fake p99", "ms", "lower"),
    ];
    for (column, replicas) in REPLICAS.iter().enumerate() {
        for r in rounds.iter().filter(|r| r.replicas == *replicas) {
            let values = [
                r.rate(),
                percentile_ms(&r.latencies, 0.50),
                percentile_ms(&r.latencies, 0.99),
            ];
            for (f, v) in plain.iter_mut().zip(values) {
                f.push(column == 0, v);
            }
        }
    }
    for r in &rounds {
        if let Some(first) = r.failures.first() {
            outcome.problems.push(format!(
                "notifier, {} replica(s): {} failures, first: {first}",
                r.replicas,
                r.failures.len()
            ));
        }
    }
    outcome.figures.extend(plain);
    println!();

    // All paged at once, as one escalation turn pages them: each
    // destination's pages go up to 64 to a NOTIFY message.
    println!(
        "-- production rate limits: {incidents} incidents, 5 pages each (sms, slack DM, slack #incidents, pagerduty, webhook), each destination's pages up to 64 a message as escalation sends a burst"
    );
    let MixedResult { rows, failures } = super::notifier_mixed(&NotifierArgs {
        pages: incidents,
        rounds: reps,
        rate: 0,
        pagerduty: true,
        mixed: true,
        per_message: tocsin_escalation::PAGES_PER_MESSAGE as u32,
    })
    .await?;
    for channel in MIXED_CHANNELS {
        let scenario = format!("notifier, rate-limited, {channel}");
        let mut p50 = figure(&scenario, "publish→provider p50", "ms", "lower");
        let mut p99 = figure(&scenario, "publish→provider p99", "ms", "lower");
        for (column, replicas) in REPLICAS.iter().enumerate() {
            for row in rows
                .iter()
                .filter(|r| r.replicas == *replicas && r.channel == channel)
            {
                for (f, q) in [(&mut p50, 0.50), (&mut p99, 0.99)] {
                    f.push(column == 0, percentile_ms(&row.latencies, q));
                }
            }
        }
        outcome.figures.extend([p50, p99]);
    }
    outcome.problems.extend(
        failures
            .iter()
            .map(|f| format!("notifier, rate-limited: {f}")),
    );
    outcome.rss(
        "notifier: bench process (replicas in-process, fakes)".into(),
        peer::peak_rss_mib(None),
    );
    Ok(outcome)
}
