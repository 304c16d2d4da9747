//! The tenure fence (`tocsin_runtime::fence`) on a real nats-server: a
//! tenure's marker on `tocsin.incidents.tenure` (or, for escalation's
//! pages, `tocsin.notify.tenure` in the work queue NOTIFY), the entries
//! that name it, and what happens to an older tenure's marker and entries
//! once a newer tenure took the fence. The services end to end are in
//! `incidents_crash.rs`
//! (`entries_of_an_ended_tenure_are_never_stored_after_the_next_tenure_wrote`)
//! and `escalation_restart.rs`
//! (`pages_of_an_ended_tenure_are_never_stored_after_the_next_tenure_began`).

use async_nats::jetstream;
use futures::FutureExt as _;
use tocsin_proto::subjects::{INCIDENTS_TENURE, NOTIFY_TENURE, STREAM_INCIDENTS, STREAM_NOTIFY};
use tocsin_runtime::{
    bus::{message, LEASE},
    fence::{self, Ack, Fence, FenceError, EXPECTED_SUBJECT_SEQUENCE},
    streams::{ensure_streams, JetStreamConfig},
};
use tocsin_tests::NatsServer;

use crate::cluster_writes::send_fenced;

/// A role's fence: its stream, tenure subject, a subject it writes, and
/// the role's name in its lease.
struct Role {
    stream: &'static str,
    tenure: &'static str,
    subject: &'static str,
    name: &'static str,
}

const INCIDENTS: Role = Role {
    stream: STREAM_INCIDENTS,
    tenure: INCIDENTS_TENURE,
    subject: "tocsin.incidents.inc.0.opened",
    name: "incidents",
};

/// NOTIFY is a work queue: its last marker is read with a message get.
const ESCALATION: Role = Role {
    stream: STREAM_NOTIFY,
    tenure: NOTIFY_TENURE,
    subject: "tocsin.notify.email",
    name: "escalation",
};

impl Role {
    /// Takes the fence as term `term` of this role's lease would.
    async fn take(&self, js: &jetstream::Context, term: u64) -> Result<Option<Fence>, FenceError> {
        LEASE
            .scope(
                format!("{}/{term}", self.name),
                fence::take(js, self.stream, self.tenure),
            )
            .await
    }

    /// Publishes an entry-like message fenced by `f`; its stream sequence,
    /// or whether it was refused for a sequence that did not match.
    async fn entry(&self, js: &jetstream::Context, f: &Fence, id: &str) -> Result<u64, bool> {
        let headers = f.headers();
        let extra: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let m = message(b"entry".to_vec(), id, None, &extra);
        match js.send_publish(self.subject, m).await.expect("sent").await {
            Ok(ack) => Ok(ack.sequence),
            Err(e) => Err(fence::is_wrong_sequence(&e)),
        }
    }
}

/// An acknowledgement awaited in place (`Ack::poll_came`: the incidents
/// service waits so for a batch's entries while it takes more inputs, and
/// drops the wait when one comes) is kept when the wait is dropped: taken
/// up again, each comes once, a stored message's with its sequence and a
/// refused one's as the refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledgement_awaited_in_place_is_kept_when_the_wait_is_dropped() {
    let nats = NatsServer::start().await;
    let js = jetstream::new(nats.client().await);
    ensure_streams(&js, &JetStreamConfig::default())
        .await
        .unwrap();
    let f1 = INCIDENTS.take(&js, 1).await.unwrap().unwrap();
    let mut acks = Vec::new();
    for id in ["e1", "e2", "e3"] {
        acks.push(send_fenced(&js, &f1, INCIDENTS.subject, id).await);
    }
    // A newer tenure's marker: what the older one sends next is refused.
    let f2 = INCIDENTS.take(&js, 2).await.unwrap().unwrap();
    acks.push(send_fenced(&js, &f1, INCIDENTS.subject, "e4").await);

    // Each wait is polled once and dropped...
    let waker = futures::task::noop_waker();
    let mut cx = std::task::Context::from_waker(&waker);
    for ack in acks.iter_mut() {
        let _ = ack.poll_came(&mut cx);
    }
    // ...then taken up again until every one came.
    std::future::poll_fn(|cx| {
        for ack in acks.iter_mut() {
            std::task::ready!(ack.poll_came(cx));
        }
        std::task::Poll::Ready(())
    })
    .await;
    assert!(acks.iter().all(Ack::came));
    let got: Vec<_> = acks
        .into_iter()
        .map(|a| a.get().now_or_never().expect("came, so at once"))
        .collect();
    let stored: Vec<(u64, bool)> = got[..3]
        .iter()
        .map(|r| {
            r.as_ref()
                .map(|a| (a.sequence, a.duplicate))
                .expect("stored")
        })
        .collect();
    assert_eq!(
        stored,
        [
            (f1.seq + 1, false),
            (f1.seq + 2, false),
            (f1.seq + 3, false)
        ]
    );
    assert!(f2.seq > f1.seq + 3);
    let refused = got[3].as_ref().expect_err("an ended tenure's entry");
    assert!(fence::is_wrong_sequence(refused), "{refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_tenures_marker_refuses_everything_an_older_tenure_sends() {
    the_fence_holds(&INCIDENTS).await;
}

/// The same on NOTIFY, a work queue (escalation's pages).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_tenures_marker_refuses_every_page_an_older_tenure_sends() {
    the_fence_holds(&ESCALATION).await;
}

async fn the_fence_holds(role: &Role) {
    let nats = NatsServer::start().await;
    let js = jetstream::new(nats.client().await);
    ensure_streams(&js, &JetStreamConfig::default())
        .await
        .unwrap();

    // Outside a lease there is nothing to fence.
    assert_eq!(
        fence::take(&js, role.stream, role.tenure).await.unwrap(),
        None
    );

    // Term 3 writes its marker; taking it again (a retry after a lost
    // acknowledgement) finds the same one.
    let f3 = role
        .take(&js, 3)
        .await
        .unwrap()
        .expect("a fence under a lease");
    assert_eq!(f3.term, 3);
    assert_eq!(role.take(&js, 3).await.unwrap(), Some(f3.clone()));
    let stored = role
        .entry(&js, &f3, "e1")
        .await
        .expect("term 3's entry stored");
    assert!(stored > f3.seq);

    // Term 5 takes over: its marker comes after term 3's entry, and from
    // then on term 3's entries are refused, term 5's stored.
    let f5 = role.take(&js, 5).await.unwrap().unwrap();
    assert!(f5.seq > stored);
    assert_eq!(
        role.entry(&js, &f3, "e2").await,
        Err(true),
        "an ended tenure's entry"
    );
    role.entry(&js, &f5, "e3")
        .await
        .expect("term 5's entry stored");

    // A tenure older than the last marker cannot take the fence, and its
    // marker sent late (naming the marker it read before term 5's) is
    // refused by the server.
    assert_eq!(
        role.take(&js, 4).await,
        Err(FenceError::Superseded { ours: 4, theirs: 5 })
    );
    let late = LEASE.sync_scope(format!("{}/4", role.name), || {
        message(
            format!("{}/4", role.name).into_bytes(),
            format!("tenure:{}/4", role.name),
            None,
            &[(EXPECTED_SUBJECT_SEQUENCE, &f3.seq.to_string())],
        )
    });
    let refused = js
        .send_publish(role.tenure, late)
        .await
        .unwrap()
        .await
        .expect_err("a late marker of an older tenure is refused");
    assert!(fence::is_wrong_sequence(&refused), "{refused}");
    role.entry(&js, &f5, "e4")
        .await
        .expect("term 5 still writes");

    // The marker gone (the stream's age limit, a purge): entries naming it
    // are refused, and taking the fence again writes a new one.
    js.get_stream(role.stream)
        .await
        .unwrap()
        .purge()
        .filter(role.tenure)
        .await
        .unwrap();
    assert_eq!(role.entry(&js, &f5, "e5").await, Err(true));
    let again = role.take(&js, 5).await.unwrap().unwrap();
    assert!(again.seq > f5.seq);
    role.entry(&js, &again, "e6")
        .await
        .expect("stored after the new marker");
}
