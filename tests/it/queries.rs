//! The request/reply query loop every service answers queries with
//! (`tocsin_runtime::query::Queries`), on a real nats-server with Tocsin's
//! own users and permissions.

use std::sync::Arc;

use tocsin_proto::subjects::query;
use tocsin_runtime::query::Queries;
use tocsin_tests::NatsServer;
use tokio_util::sync::CancellationToken;

/// A query whose answer waits (for the incidents service's next batch to
/// be stored, for the store, for the stream) must not hold up the queries
/// behind it. The storm of `bench all --only storm` found the incidents
/// service answering one query at a time, each after a batch: the
/// notifier's look-ups of an incident's alerts queued for minutes, the
/// notifier gave up on each after its timeout and sent the page without
/// its alert list, and the late answers were refused by nats-server
/// (`permissions violation for publish to "_INBOX.notifier..."`: a
/// responder may answer a request only for a while), 3,221 of them in
/// one run. Here every answer waits until all of them have been asked:
/// answered one at a time, the first waits for ever and every asker
/// times out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_that_waits_does_not_hold_up_the_ones_behind_it() {
    tocsin_tests::init_logs();
    let nats = NatsServer::start().await;
    let incidents =
        async_nats::jetstream::new(nats.client_as("incidents").await.expect("incidents"));
    let notifier = nats.client_as("notifier").await.expect("notifier");
    let queries = Queries::subscribe(&incidents, "tocsin-incidents", &[query::GET_INCIDENT])
        .await
        .expect("subscribe");
    const ASKED: usize = 8;
    let all_asked = Arc::new(tokio::sync::Barrier::new(ASKED));
    let stop = CancellationToken::new();
    let serving = tokio::spawn({
        let (all_asked, stop) = (all_asked.clone(), stop.clone());
        async move {
            queries
                .serve(stop, |_, payload| {
                    let all_asked = all_asked.clone();
                    async move {
                        all_asked.wait().await;
                        Ok(payload.to_vec())
                    }
                })
                .await
        }
    });
    // async-nats gives up on a request after 10 s.
    let answers = futures::future::join_all(
        (0..ASKED).map(|i| notifier.request(query::GET_INCIDENT, format!("query {i}").into())),
    )
    .await;
    for (i, a) in answers.into_iter().enumerate() {
        let msg = a.unwrap_or_else(|e| panic!("query {i}: {e}"));
        assert_eq!(msg.payload, format!("query {i}").as_bytes(), "query {i}");
    }
    stop.cancel();
    serving.await.expect("the query loop ends");
}

/// Once `Queries::subscribe` has returned, the server has the
/// subscriptions: a query from another connection sent right after finds
/// its responder. CI found "no responders" here once: `Client::flush`
/// only writes the client's buffer to the socket, and the asker's message,
/// on its own connection, can reach the server first. A service reports
/// ready after subscribing, so an asker that waited for ready must be
/// answered. Each round subscribes to a subject of its own and asks at
/// once; one round lost is a failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_asked_as_soon_as_the_subscription_returns_is_answered() {
    tocsin_tests::init_logs();
    let nats = NatsServer::start().await;
    let incidents =
        async_nats::jetstream::new(nats.client_as("incidents").await.expect("incidents"));
    let asker = nats.client_as("admin").await.expect("admin");
    for round in 0..300 {
        let subject = format!("tocsin.query.incidents.round{round}");
        let queries = Queries::subscribe(&incidents, "tocsin-incidents", &[subject.as_str()])
            .await
            .expect("subscribe");
        let stop = CancellationToken::new();
        let serving =
            tokio::spawn(queries.serve(
                stop.clone(),
                |_, payload| async move { Ok(payload.to_vec()) },
            ));
        let answer = asker
            .request(subject.clone(), format!("round {round}").into())
            .await
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert_eq!(answer.payload, format!("round {round}").as_bytes());
        stop.cancel();
        serving.await.expect("the query loop ends");
    }
}
