//! The lease (`tocsin_runtime::lease::lead`) on a real nats-server behind
//! a proxy that stalls some of its renewals, as a bus on a loaded disk
//! does now and then. The holder may act until two thirds of the TTL after
//! it sent its last renewal that was answered; renewing every third of
//! the TTL left the renewal after a prompt one a third of the TTL, and
//! under load holders stood down and the lease went back and forth
//! between instances (the bench's 100,000-incident recovery). Renewing
//! every sixth leaves it half.

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use tocsin_runtime::{clock::SystemClock, context::ServiceContext};
use tocsin_tests::{bus::lease_revision, eventually_within, faults::NatsProxy, NatsServer};

/// Every fourth renewal reaches the server 40% of the TTL after it was
/// sent: the holder keeps its first tenure through three such stalls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_whose_renewals_are_answered_late_keeps_its_tenure() {
    let nats = NatsServer::start().await;
    let proxy = NatsProxy::start(nats.port()).await;
    let direct = async_nats::jetstream::new(nats.client().await);
    let through = async_nats::jetstream::new(
        async_nats::ConnectOptions::with_user_and_password(
            "admin".into(),
            nats.password("admin").into(),
        )
        .connect(proxy.url_for(&nats.address()))
        .await
        .expect("connect through the proxy"),
    );
    let dir = tempfile::tempdir().unwrap();
    // Long enough that the stall (2 s) and the margins around it are
    // large beside a busy machine's scheduling and syncs.
    let ttl = Duration::from_secs(5);
    let ctx = ServiceContext::standalone(through, Arc::new(SystemClock));
    let tenures = Arc::new(AtomicUsize::new(0));
    let lead = tokio::spawn({
        let (ctx, tenures, dir) = (ctx.clone(), tenures.clone(), dir.path().to_path_buf());
        async move {
            tocsin_runtime::lease::lead(
                &ctx,
                "incidents",
                ttl,
                &dir,
                |c: ServiceContext| {
                    let tenures = tenures.clone();
                    async move {
                        tenures.fetch_add(1, Ordering::SeqCst);
                        c.shutdown.cancelled().await;
                        Ok::<(), String>(())
                    }
                },
                |c: ServiceContext| async move { c.shutdown.cancelled().await },
            )
            .await
        }
    });
    eventually_within(ttl * 10, || async {
        match tenures.load(Ordering::SeqCst) {
            0 => Err("no tenure yet"),
            _ => Ok(()),
        }
    })
    .await
    .expect("the lease taken");

    // From now on every fourth write to the lease bucket comes late.
    let late = ttl * 40 / 100;
    proxy.delay(
        &[&format!(
            "$KV.{}.",
            tocsin_runtime::lease::bucket("incidents")
        )],
        late,
        4,
    );
    let from = lease_revision(&direct, "incidents").await;
    let renewed = eventually_within(ttl * 30, || async {
        let now = lease_revision(&direct, "incidents").await;
        if now >= from + 13 {
            Ok(now)
        } else {
            Err(format!("revision {now}, from {from}"))
        }
    })
    .await;
    ctx.shutdown.cancel();
    let _ = tokio::time::timeout(ttl * 5, lead).await;
    assert!(renewed.is_ok(), "the lease was not renewed: {renewed:?}");
    assert_eq!(
        tenures.load(Ordering::SeqCst),
        1,
        "with every fourth renewal answered {late:?} late (TTL {ttl:?}) the holder stood down \
         and took the lease again"
    );
}
