//! `bench all`'s timers scenario: the `escalation` bench (one run per
//! repetition, [`super::escalation_run`]) as figures: memory per 1,000
//! pending escalation timers, the lateness of bursts of them coming due in
//! the same clock minute, and the time to ready of a cold rebuild and of a
//! warm restart. Beside the memory and burst figures, the same timers held
//! by the broker as JetStream message schedules ([`super::schedules`]).

use super::{
    all::{Figure, Outcome, NO_PEER},
    peer, percentile_ms, EscalationArgs,
};

/// What the Tocsin column measures.
const SIDE: &str = "tocsin escalation alone, in-process (the bench process), ManualClock";

/// What the peer column measures.
const PEER: &str = "JetStream message schedules (nats-server holds the timers)";

/// Bursts the level-1 steps come due in (the `escalation` bench's default).
const BURSTS: u32 = 10;

pub async fn timers(timers: u32, reps: u32) -> anyhow::Result<Outcome> {
    println!(
        "{timers} incidents with a pending level-1 step, due in {BURSTS} bursts one clock minute apart \
         (the `escalation` bench, once per repetition)"
    );
    let scenario = format!("timers, {timers} pending");
    let figure = |metric: &str, unit: &str, peer: &str| {
        Figure::new(&scenario, metric, unit, "lower", peer).side(SIDE)
    };
    let mut figures = vec![
        figure("RSS growth per 1,000 pending timers", "MiB", PEER),
        figure("burst lateness p50", "ms", PEER),
        figure("burst lateness p99", "ms", PEER),
        figure("cold rebuild to ready", "s", NO_PEER),
        figure("warm restart to ready", "s", NO_PEER),
    ];
    let mut outcome = Outcome::default();
    for rep in 0..reps {
        println!("-- repetition {}", rep + 1);
        // The bench process is the service: its peak is this run's alone.
        peer::reset_peak_rss();
        let r = super::escalation_run(&EscalationArgs {
            incidents: timers,
            bursts: BURSTS,
            nats_url: None,
        })
        .await?;
        let values = [
            r.growth_mib / f64::from(r.timers) * 1000.0,
            percentile_ms(&r.lateness, 0.50),
            percentile_ms(&r.lateness, 0.99),
            r.cold_ready.as_secs_f64(),
            r.warm_ready.as_secs_f64(),
        ];
        for (f, v) in figures.iter_mut().zip(values) {
            f.push(true, v);
        }
        outcome.rss(
            "timers: bench process (escalation in-process)".into(),
            peer::peak_rss_mib(None),
        );
        outcome.rss("timers: nats-server".into(), r.nats_peak_mib);
        if !r.failures.is_empty() {
            for f in &r.failures {
                eprintln!("  {f}");
            }
            outcome.problems.push(format!(
                "timers, repetition {}: {}",
                rep + 1,
                r.failures.join("; ")
            ));
        }
        // The peer: nats-server's growth is the peer's "RSS growth".
        let burst = (timers / BURSTS).max(1);
        println!(
            "  broker: {timers} JetStream message schedules, {burst} due in the same second, the rest a day later"
        );
        let b = super::schedules::broker_run(timers, burst).await?;
        println!(
            "  broker: nats-server VmRSS {:+.1} MiB with {} pending; burst lateness p50 {:.1}ms p99 {:.1}ms max {:.1}ms ({} fired)",
            b.growth_mib,
            b.timers,
            percentile_ms(&b.lateness, 0.50),
            percentile_ms(&b.lateness, 0.99),
            percentile_ms(&b.lateness, 1.0),
            b.lateness.len()
        );
        let peer_values = [
            b.growth_mib / f64::from(b.timers) * 1000.0,
            percentile_ms(&b.lateness, 0.50),
            percentile_ms(&b.lateness, 0.99),
        ];
        for (f, v) in figures.iter_mut().zip(peer_values) {
            f.push(false, v);
        }
        if !b.failures.is_empty() {
            outcome.problems.push(format!(
                "timers, broker schedules, repetition {}: {}",
                rep + 1,
                b.failures.join("; ")
            ));
        }
        println!();
    }
    outcome.figures = figures;
    Ok(outcome)
}
