//! The lease (`tocsin_runtime::lease::lead`) on a real nats-server, with a
//! standby's follower that is slow to stop: once the lease is taken, the
//! follower is asked to stop and the tenure waits for its round to end (a
//! round must not be dropped midway), which with a large store takes
//! seconds. The lease must be kept meanwhile. It was not: the renewals
//! began only with the tenure, a third of the TTL after it began, and a
//! holder may act only two thirds of the TTL after its last write; so with
//! 100,000 incidents the restarted incidents instance (1.8 s to end its
//! follower's round, lease TTL 5 s) stood down 1.5 s into its tenure and
//! nobody answered queries until a new tenure (`bench all --only recovery
//! --incidents 100000`: "no responders").

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use tocsin_runtime::{clock::SystemClock, context::ServiceContext};
use tocsin_tests::{bus::lease_revision, eventually_within, NatsServer};

/// Waits (the kit's polling loop, up to `limit`) until the lease key has
/// been written `n` more times since revision `from`; whether it was.
async fn renewed(js: &async_nats::jetstream::Context, from: u64, n: u64, limit: Duration) -> bool {
    eventually_within(limit, || async {
        if lease_revision(js, "incidents").await >= from + n {
            Ok(())
        } else {
            Err(())
        }
    })
    .await
    .is_ok()
}

/// A follower whose round ends only once the lease just taken has been
/// renewed four times (two thirds of the TTL at least, a renewal every
/// sixth: as long as a holder may act on one write) keeps it: the first
/// tenure runs until six more renewals (a whole TTL) and is never fenced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_slow_to_stop_does_not_cost_the_lease_just_taken() {
    let nats = NatsServer::start().await;
    let js = async_nats::jetstream::new(nats.client().await);
    let dir = tempfile::tempdir().unwrap();
    let ttl = Duration::from_secs(1);
    let ctx = ServiceContext::standalone(js.clone(), Arc::new(SystemClock));
    let tenures = Arc::new(AtomicUsize::new(0));
    // Set to the tenure (counted from 1) that held on to the end.
    let held = Arc::new(AtomicUsize::new(0));
    let lead = tokio::spawn({
        let (ctx, tenures, held, dir) = (
            ctx.clone(),
            tenures.clone(),
            held.clone(),
            dir.path().to_path_buf(),
        );
        let (js_service, js_follower) = (js.clone(), js.clone());
        async move {
            tocsin_runtime::lease::lead(
                &ctx,
                "incidents",
                ttl,
                &dir,
                |c: ServiceContext| {
                    let (tenures, held, js) = (tenures.clone(), held.clone(), js_service.clone());
                    async move {
                        let n = tenures.fetch_add(1, Ordering::SeqCst) + 1;
                        // The service works through six renewals. A
                        // tenure that loses the lease is dropped first.
                        let from = lease_revision(&js, "incidents").await;
                        if renewed(&js, from, 6, ttl * 10).await {
                            held.store(n, Ordering::SeqCst);
                        }
                        c.shutdown.cancelled().await;
                        Ok::<(), String>(())
                    }
                },
                |c: ServiceContext| {
                    let js = js_follower.clone();
                    async move {
                        c.shutdown.cancelled().await;
                        // Ending its round (loading a large store, say)
                        // takes four renewals of the lease just taken.
                        let from = lease_revision(&js, "incidents").await;
                        renewed(&js, from, 4, ttl * 10).await;
                    }
                },
            )
            .await
        }
    });
    let came = eventually_within(ttl * 30, || async {
        match held.load(Ordering::SeqCst) {
            0 => Err(format!("{} tenures so far", tenures.load(Ordering::SeqCst))),
            n => Ok(n),
        }
    })
    .await;
    ctx.shutdown.cancel();
    let _ = tokio::time::timeout(ttl * 5, lead).await;
    assert_eq!(
        came,
        Ok(1),
        "the first tenure held the lease to the end ({} tenures)",
        tenures.load(Ordering::SeqCst)
    );
}
