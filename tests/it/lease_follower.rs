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
use tocsin_tests::{eventually_within, NatsServer};

/// A follower whose round ends a whole TTL after it is asked to stop
/// keeps the lease just taken: the first tenure runs for three TTLs
/// (nine renewals) and is never fenced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_slow_to_stop_does_not_cost_the_lease_just_taken() {
    let nats = NatsServer::start().await;
    let js = async_nats::jetstream::new(nats.client().await);
    let dir = tempfile::tempdir().unwrap();
    let ttl = Duration::from_secs(1);
    let ctx = ServiceContext::standalone(js, Arc::new(SystemClock));
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
        async move {
            tocsin_runtime::lease::lead(
                &ctx,
                "incidents",
                ttl,
                &dir,
                |c: ServiceContext| {
                    let (tenures, held) = (tenures.clone(), held.clone());
                    async move {
                        let n = tenures.fetch_add(1, Ordering::SeqCst) + 1;
                        // The service's work: three TTLs of it. A tenure
                        // that loses the lease is dropped before the end.
                        tokio::time::sleep(ttl * 3).await;
                        held.store(n, Ordering::SeqCst);
                        c.shutdown.cancelled().await;
                        Ok::<(), String>(())
                    }
                },
                |c: ServiceContext| async move {
                    c.shutdown.cancelled().await;
                    // Ending its round: loading a large store, say.
                    tokio::time::sleep(ttl).await;
                },
            )
            .await
        }
    });
    let came = eventually_within(ttl * 20, || async {
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
