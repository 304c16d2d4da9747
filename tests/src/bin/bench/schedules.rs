//! The timers scenario's peer: the same pending timers held by the broker
//! instead of the escalation service, as JetStream message schedules
//! (NATS 2.12, ADR-51: a message with `Nats-Schedule: @at <time>` on its
//! own subject, which nats-server publishes to `Nats-Schedule-Target` when
//! due; one schedule per subject, cancelled by purging the subject).
//! Measured: nats-server's memory growth with every timer pending, and the
//! lateness of a burst coming due in the same second, from the due second
//! to the generated message reaching a consumer. What it leaves out: the
//! escalation service would still have to read each fired message, decide
//! the step and write its page and timeline record, which is what Tocsin's
//! own burst figure includes.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use async_nats::{
    jetstream::{self, consumer, stream},
    HeaderMap,
};
use futures::StreamExt;
use tocsin_tests::NatsServer;

use super::Memory;

const STREAM: &str = "BENCH_SCHEDULES";

/// Publishes in flight at once.
const WINDOW: usize = 512;

pub struct BrokerRun {
    pub timers: u32,
    /// nats-server's VmRSS growth with every schedule stored and pending.
    pub growth_mib: f64,
    /// From the burst's due second to each generated message's arrival.
    pub lateness: Vec<Duration>,
    pub failures: Vec<String>,
}

/// `timers` schedules, `burst` of them due in the same second (soon after
/// they are all stored), the rest a day later.
pub async fn broker_run(timers: u32, burst: u32) -> anyhow::Result<BrokerRun> {
    let nats = NatsServer::start().await;
    let pid = super::nats_server_pid(&nats);
    let client = tocsin_tests::nats::connect_url(&nats.url()).await?;
    let js = jetstream::new(client);
    js.create_stream(stream::Config {
        name: STREAM.into(),
        subjects: vec!["bench.sched.>".into()],
        storage: stream::StorageType::File,
        allow_message_schedules: true,
        ..Default::default()
    })
    .await
    .map_err(|e| anyhow::anyhow!("cannot create {STREAM}: {e}"))?;
    let before = Memory::read(pid);

    let unix_now = || {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
    };
    let at = |secs: u64| -> anyhow::Result<String> {
        let t = jiff::Timestamp::from_second(i64::try_from(secs)?)?;
        Ok(format!("@at {}", t.strftime("%Y-%m-%dT%H:%M:%SZ")))
    };
    let far = at(unix_now().as_secs() + 86_400)?;
    let mut failures = Vec::new();
    let started = Instant::now();
    // The ones not in the burst first (they only have to be pending).
    publish(&js, burst..timers, &far).await?;
    // The burst's second: after the rest is stored at the rate seen so far,
    // with a margin.
    let rate = f64::from((timers - burst).max(1)) / started.elapsed().as_secs_f64().max(1e-3);
    let lead =
        Duration::from_secs_f64(f64::from(burst) / rate.max(500.0) * 1.5) + Duration::from_secs(3);
    let due_secs = (unix_now() + lead).as_secs() + 1;
    let due = at(due_secs)?;
    publish(&js, 0..burst, &due).await?;
    let stored_at = unix_now();
    if stored_at.as_secs() >= due_secs {
        failures.push(format!(
            "the burst was stored {:.1}s after its due second: lateness is understated",
            (stored_at.as_secs_f64() - due_secs as f64)
        ));
    }
    let after = Memory::read(pid);
    let growth_mib = match (before, after) {
        (Some(b), Some(a)) => (a.rss_kib as f64 - b.rss_kib as f64) / 1024.0,
        _ => f64::NAN,
    };

    // Each generated message as it is stored, from an ordered consumer.
    let stream = js.get_stream(STREAM).await?;
    let mut fired = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: "bench.sched.fired.>".into(),
            ..Default::default()
        })
        .await?
        .messages()
        .await?;
    // The due second as an Instant of this process.
    let due_instant = {
        let now_unix = unix_now();
        let until = Duration::from_secs(due_secs).saturating_sub(now_unix);
        Instant::now() + until
    };
    let mut lateness = Vec::with_capacity(burst as usize);
    let deadline = due_instant + Duration::from_secs(120) + lead;
    while lateness.len() < burst as usize {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, fired.next()).await {
            Ok(Some(Ok(_))) => lateness.push(Instant::now().saturating_duration_since(due_instant)),
            Ok(Some(Err(e))) => bail!("reading generated messages: {e}"),
            Ok(None) => bail!("the consumer of generated messages ended"),
            Err(_) => {
                failures.push(format!(
                    "{} of {burst} due schedules fired within 120s of their due second",
                    lateness.len()
                ));
                break;
            }
        }
    }
    Ok(BrokerRun {
        timers,
        growth_mib,
        lateness,
        failures,
    })
}

/// Schedules `range` (subject `bench.sched.timer.<i>`, target
/// `bench.sched.fired.<i>`) at `spec`, with every ack awaited.
async fn publish(
    js: &jetstream::Context,
    range: std::ops::Range<u32>,
    spec: &str,
) -> anyhow::Result<()> {
    let ids: Vec<u32> = range.collect();
    for chunk in ids.chunks(WINDOW) {
        let mut acks = Vec::with_capacity(chunk.len());
        for i in chunk {
            let mut h = HeaderMap::new();
            h.insert("Nats-Schedule", spec);
            h.insert(
                "Nats-Schedule-Target",
                format!("bench.sched.fired.{i}").as_str(),
            );
            let ack = js
                .publish_with_headers(format!("bench.sched.timer.{i}"), h, "page".into())
                .await
                .with_context(|| format!("schedule {i} not sent"))?;
            acks.push(ack);
        }
        for (ack, i) in
            futures::future::join_all(acks.into_iter().map(std::future::IntoFuture::into_future))
                .await
                .into_iter()
                .zip(chunk)
        {
            ack.map_err(|e| anyhow::anyhow!("schedule {i} not stored: {e}"))?;
        }
    }
    Ok(())
}
