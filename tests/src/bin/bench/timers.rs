//! `bench all`'s timers scenario: the `escalation` bench (one run per
//! repetition, [`super::escalation_run`]) as figures: memory per 1,000
//! pending escalation timers, the lateness of bursts of them coming due in
//! the same clock minute, and the time to ready of a cold rebuild and of a
//! warm restart. There is no peer.

use super::{
    all::{Figure, Outcome, NO_PEER},
    peer, percentile_ms, EscalationArgs,
};

/// What the Tocsin column measures.
const SIDE: &str = "tocsin escalation alone, in-process (the bench process), ManualClock";

/// Bursts the level-1 steps come due in (the `escalation` bench's default).
const BURSTS: u32 = 10;

pub async fn timers(timers: u32, reps: u32) -> anyhow::Result<Outcome> {
    println!(
        "{timers} incidents with a pending level-1 step, due in {BURSTS} bursts one clock minute apart \
         (the `escalation` bench, once per repetition)"
    );
    let scenario = format!("timers, {timers} pending");
    let figure = |metric: &str, unit: &str| {
        Figure::new(&scenario, metric, unit, "lower", NO_PEER).side(SIDE)
    };
    let mut figures = vec![
        figure("RSS growth per 1,000 pending timers", "MiB"),
        figure("burst lateness p50", "ms"),
        figure("burst lateness p99", "ms"),
        figure("cold rebuild to ready", "s"),
        figure("warm restart to ready", "s"),
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
        println!();
    }
    outcome.figures = figures;
    Ok(outcome)
}
