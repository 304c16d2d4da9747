//! The durable pull consumers replicas share (the notifier's pages and
//! changes, remediation's events, the incidents service's commands), as
//! `tocsin_runtime::pull::Puller` opens and pulls them.

use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, stream::RetentionPolicy};
use tocsin_runtime::pull::Puller;
use tocsin_tests::NatsCluster;
use tokio_util::sync::CancellationToken;

/// Two replicas starting together on a NATS cluster, on different nodes,
/// create the stream and the same durable consumer at once, as every
/// replica does at start. The first pull request of one of them often
/// reaches the consumer before its leader listens and is answered "no
/// responders"; async-nats then asks again only when that request would
/// have expired (35 s), so for that long the replica takes nothing.
/// `.ci/run` saw it on both notifier replicas for one channel: 0 of 3
/// Slack pages sent after 20 s. Each round is a new stream and consumer;
/// both replicas must be waiting at the consumer with a pull request.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_opening_a_new_consumer_together_on_a_cluster_both_pull() {
    tocsin_tests::init_logs();
    let cluster = NatsCluster::start().await;
    let nodes = cluster.nodes();
    let a = jetstream::new(nodes[0].client().await);
    let b = jetstream::new(nodes[1].client().await);
    for round in 0..8 {
        let name = format!("WORK{round}");
        let stream = jetstream::stream::Config {
            name: name.clone(),
            subjects: vec![format!("work.{round}")],
            retention: RetentionPolicy::WorkQueue,
            num_replicas: 3,
            ..Default::default()
        };
        let config = pull::Config {
            durable_name: Some("work".into()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ..Default::default()
        };
        let stop = CancellationToken::new();
        let (tx, mut taken) = tokio::sync::mpsc::unbounded_channel();
        let replica = |js: jetstream::Context, who: &'static str| {
            let (stream, config, name) = (stream.clone(), config.clone(), name.clone());
            let (tx, shutdown) = (tx.clone(), stop.clone());
            async move {
                ensure(&js, &stream).await;
                let mut puller = Puller::new(&js, &name, config, 16);
                while let Some(msg) = puller.next(&shutdown).await {
                    let _ = tx.send((who, msg));
                }
            }
        };
        let replicas = [
            tokio::spawn(replica(a.clone(), "a")),
            tokio::spawn(replica(b.clone(), "b")),
        ];
        // 20 s: well short of the 35 s a lost first pull costs, and room
        // for the info request itself, which can take 10 s while the new
        // consumer's leader is elected.
        let waiting = tocsin_tests::eventually_within(Duration::from_secs(20), || async {
            let info = a
                .get_stream(&name)
                .await
                .map_err(|e| e.to_string())?
                .consumer_info("work")
                .await
                .map_err(|e| e.to_string())?;
            if info.num_waiting == 2 {
                Ok(())
            } else {
                Err(format!("{} pull requests waiting", info.num_waiting))
            }
        })
        .await;
        if let Err(e) = waiting {
            panic!("round {round}: both replicas opened the consumer, but after 20 s {e}, not 2");
        }
        // And a message reaches one of them.
        a.publish(format!("work.{round}"), "job".into())
            .await
            .expect("publish")
            .await
            .expect("stored");
        let (who, msg) = tokio::time::timeout(Duration::from_secs(15), taken.recv())
            .await
            .unwrap_or_else(|_| panic!("round {round}: the job reached neither replica in 15 s"))
            .expect("a replica");
        assert!(["a", "b"].contains(&who));
        msg.double_ack().await.expect("ack");
        stop.cancel();
        for r in replicas {
            r.await.expect("the replica's task");
        }
    }
}

/// Creates the stream if it is not there, as each replica does at start.
async fn ensure(js: &jetstream::Context, config: &jetstream::stream::Config) {
    tocsin_tests::eventually("the stream", || async {
        js.get_or_create_stream(config.clone())
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    })
    .await
}
