//! The tenure fence (`tocsin_runtime::fence`) on a real nats-server: a
//! tenure's marker on `tocsin.incidents.tenure`, the entries that name it,
//! and what happens to an older tenure's marker and entries once a newer
//! tenure took the fence. The incidents service end to end is in
//! `incidents_crash.rs`
//! (`entries_of_an_ended_tenure_are_never_stored_after_the_next_tenure_wrote`).

use async_nats::jetstream;
use tocsin_proto::subjects::{INCIDENTS_TENURE, STREAM_INCIDENTS};
use tocsin_runtime::{
    bus::{message, LEASE},
    fence::{self, Fence, FenceError, EXPECTED_SUBJECT_SEQUENCE},
    streams::{ensure_streams, JetStreamConfig},
};
use tocsin_tests::NatsServer;

/// Takes the fence as term `term` of the incidents lease would.
async fn take(js: &jetstream::Context, term: u64) -> Result<Option<Fence>, FenceError> {
    LEASE
        .scope(
            format!("incidents/{term}"),
            fence::take(js, STREAM_INCIDENTS, INCIDENTS_TENURE),
        )
        .await
}

/// Publishes an entry-like message fenced by `f`; its stream sequence, or
/// whether it was refused for a sequence that did not match.
async fn entry(js: &jetstream::Context, f: &Fence, id: &str) -> Result<u64, bool> {
    let headers = f.headers();
    let extra: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let m = message(b"entry".to_vec(), id, None, &extra);
    match js
        .send_publish("tocsin.incidents.inc.0.opened", m)
        .await
        .expect("sent")
        .await
    {
        Ok(ack) => Ok(ack.sequence),
        Err(e) => Err(fence::is_wrong_sequence(&e)),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_tenures_marker_refuses_everything_an_older_tenure_sends() {
    let nats = NatsServer::start().await;
    let js = jetstream::new(nats.client().await);
    ensure_streams(&js, &JetStreamConfig::default())
        .await
        .unwrap();

    // Outside a lease there is nothing to fence.
    assert_eq!(
        fence::take(&js, STREAM_INCIDENTS, INCIDENTS_TENURE)
            .await
            .unwrap(),
        None
    );

    // Term 3 writes its marker; taking it again (a retry after a lost
    // acknowledgement) finds the same one.
    let f3 = take(&js, 3).await.unwrap().expect("a fence under a lease");
    assert_eq!(f3.term, 3);
    assert_eq!(take(&js, 3).await.unwrap(), Some(f3.clone()));
    let stored = entry(&js, &f3, "e1").await.expect("term 3's entry stored");
    assert!(stored > f3.seq);

    // Term 5 takes over: its marker comes after term 3's entry, and from
    // then on term 3's entries are refused, term 5's stored.
    let f5 = take(&js, 5).await.unwrap().unwrap();
    assert!(f5.seq > stored);
    assert_eq!(
        entry(&js, &f3, "e2").await,
        Err(true),
        "an ended tenure's entry"
    );
    entry(&js, &f5, "e3").await.expect("term 5's entry stored");

    // A tenure older than the last marker cannot take the fence, and its
    // marker sent late (naming the marker it read before term 5's) is
    // refused by the server.
    assert_eq!(
        take(&js, 4).await,
        Err(FenceError::Superseded { ours: 4, theirs: 5 })
    );
    let late = LEASE.sync_scope("incidents/4".into(), || {
        message(
            b"incidents/4".to_vec(),
            "tenure:incidents/4",
            None,
            &[(EXPECTED_SUBJECT_SEQUENCE, &f3.seq.to_string())],
        )
    });
    let refused = js
        .send_publish(INCIDENTS_TENURE, late)
        .await
        .unwrap()
        .await
        .expect_err("a late marker of an older tenure is refused");
    assert!(fence::is_wrong_sequence(&refused), "{refused}");
    entry(&js, &f5, "e4").await.expect("term 5 still writes");

    // The marker gone (the stream's age limit, a purge): entries naming it
    // are refused, and taking the fence again writes a new one.
    js.get_stream(STREAM_INCIDENTS)
        .await
        .unwrap()
        .purge()
        .filter(INCIDENTS_TENURE)
        .await
        .unwrap();
    assert_eq!(entry(&js, &f5, "e5").await, Err(true));
    let again = take(&js, 5).await.unwrap().unwrap();
    assert!(again.seq > f5.seq);
    entry(&js, &again, "e6")
        .await
        .expect("stored after the new marker");
}
