//! SMS replies through Twilio's webhook: signed with `X-Twilio-Signature`,
//! from a known number, `ACK` (the number left out: the sender's one open
//! page), `RES 1`; answered with TwiML. Bad signatures get 401 and change
//! nothing; strangers get an empty answer.

use std::time::Duration;

use tocsin_proto::{
    command::IncidentRef,
    incident::{EventKind, IncidentStatus},
    AlertStatus,
};
use tocsin_tests::{
    chatops::{self, post_sms, twilio_signature, TWILIO_TOKEN, TWILIO_URL},
    fakes::FakeProviders,
    incidents::{alert, get, publish_alert, wait_for},
    NatsServer, TocsinHarness,
};

const WAIT: Duration = Duration::from_secs(20);
const ALICE: &str = "+14155550101";

/// Every service in this process with chat-ops taking SMS replies, and a
/// NATS client; the first four are held so they stay up.
struct Setup {
    _nats: NatsServer,
    fakes: FakeProviders,
    _data: tempfile::TempDir,
    tocsin: TocsinHarness,
    client: async_nats::Client,
    js: async_nats::jetstream::Context,
}

impl Setup {
    async fn start() -> Setup {
        let nats = NatsServer::start().await;
        let fakes = FakeProviders::start().await;
        let data = tempfile::tempdir().unwrap();
        let tocsin =
            TocsinHarness::start_with(chatops::harness_config(&nats, &fakes, data.path())).await;
        let client = nats.client().await;
        let js = async_nats::jetstream::new(client.clone());
        Setup {
            _nats: nats,
            fakes,
            _data: data,
            tocsin,
            client,
            js,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sms_replies_acknowledge_and_resolve_and_bad_signatures_change_nothing() {
    // Every field bound: what `..` left out would be dropped at once.
    let Setup {
        _nats,
        fakes,
        _data,
        tocsin,
        client,
        js,
    } = Setup::start().await;
    let t0 = tocsin.clock_now();
    publish_alert(
        &js,
        alert(
            &[
                ("alertname", "DiskFull"),
                ("service", "db"),
                ("severity", "critical"),
            ],
            &["alertname"],
            AlertStatus::Firing,
            t0,
        ),
        t0,
    )
    .await;
    let inc = wait_for(&client, "the incident", |l| l.len() == 1).await[0].clone();
    assert!(
        fakes.wait_for(|f| !f.sms().is_empty(), WAIT).await,
        "no SMS page within {WAIT:?}"
    );
    assert_eq!(fakes.sms().len(), 1, "one SMS page: {:?}", fakes.sms());
    // The page is on the timeline before the reply relies on it.
    let deadline = tokio::time::Instant::now() + WAIT;
    while !get(&client, IncidentRef::Id(inc.id))
        .await
        .timeline
        .iter()
        .any(|e| matches!(e.kind, EventKind::Paged { .. }))
    {
        assert!(tokio::time::Instant::now() < deadline, "no paged entry");
        // Poll interval of a wait for something to happen (with a deadline), not a wait to prove that nothing did.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let url = format!("{}/twilio/sms", tocsin.chatops_url);

    // Bad signatures: a changed parameter, another token, none at all.
    let http = reqwest::Client::new();
    let params = [("From", ALICE), ("To", "+15005550006"), ("Body", "RES 1")];
    let form = |p: &[(&str, &str)]| {
        let mut s = form_urlencoded::Serializer::new(String::new());
        for (k, v) in p {
            s.append_pair(k, v);
        }
        s.finish()
    };
    let signed_for_other = twilio_signature(
        TWILIO_TOKEN,
        TWILIO_URL,
        &[("From", ALICE), ("To", "+15005550006"), ("Body", "RES 2")],
    );
    for (what, sig) in [
        ("changed parameter", Some(signed_for_other)),
        (
            "wrong token",
            Some(twilio_signature("nope", TWILIO_URL, &params)),
        ),
        (
            "another URL",
            Some(twilio_signature(
                TWILIO_TOKEN,
                "https://evil.example/twilio/sms",
                &params,
            )),
        ),
        ("missing", None),
    ] {
        let mut r = http
            .post(&url)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form(&params));
        if let Some(s) = sig {
            r = r.header("x-twilio-signature", s);
        }
        let r = r.send().await.unwrap();
        assert_eq!(r.status(), 401, "{what}");
    }

    // A stranger: an empty TwiML answer, nothing done.
    let r = post_sms(&url, "+19999999999", "ACK 1").await;
    assert_eq!(r.status(), 200);
    let body = r.text().await.unwrap();
    assert!(body.contains("<Response></Response>"), "{body}");

    // Junk: the help.
    let r = post_sms(&url, ALICE, "hello?").await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["content-type"].to_str().unwrap(),
        "text/xml; charset=utf-8"
    );
    let body = r.text().await.unwrap();
    assert!(body.contains("Reply ACK 42, RES 42 or ESC 42"), "{body}");

    // `ack` without a number: alice has one open page.
    let r = post_sms(&url, ALICE, "ack").await;
    let body = r.text().await.unwrap();
    assert!(body.contains("<Message>"), "{body}");
    let d = get(&client, IncidentRef::Id(inc.id)).await;
    assert_eq!(d.incident.status, IncidentStatus::Acknowledged, "{body}");
    let by = d.incident.acknowledged_by.unwrap();
    assert_eq!((by.name.as_str(), by.via.as_str()), ("alice", "sms"));

    // `RES 1`.
    let r = post_sms(&url, ALICE, &format!("RES {}", inc.number)).await;
    let body = r.text().await.unwrap();
    let d = get(&client, IncidentRef::Id(inc.id)).await;
    assert_eq!(d.incident.status, IncidentStatus::Resolved, "{body}");
    let resolved = d
        .timeline
        .iter()
        .find(|e| matches!(e.kind, EventKind::Resolved { .. }))
        .unwrap();
    assert_eq!(resolved.actor.as_ref().unwrap().via, "sms");
    // Nothing was applied from the refused requests: one resolve, by alice.
    assert_eq!(
        d.timeline
            .iter()
            .filter(|e| matches!(e.kind, EventKind::Resolved { .. }))
            .count(),
        1
    );
    let metrics = tocsin.metrics().await;
    for line in [
        "tocsin_chatops_signatures_refused_total{source=\"twilio\",reason=\"mismatch\"} 3",
        "tocsin_chatops_signatures_refused_total{source=\"twilio\",reason=\"missing\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} not in {metrics}");
    }
}

/// In a storm one person gets many pages; `ACK ALL` (or GoAlert's `AA`)
/// acknowledges every open incident that paged them (as its timeline
/// says, the rule `ACK` without a number uses too), in one reply, and
/// says which.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_all_acknowledges_every_open_page_of_the_sender() {
    let Setup {
        _nats,
        fakes: _fakes,
        _data,
        tocsin,
        client,
        js,
    } = Setup::start().await;
    let t0 = tocsin.clock_now();
    for name in ["DiskFull", "CpuHot", "LinkDown"] {
        publish_alert(
            &js,
            alert(
                &[("alertname", name), ("severity", "critical")],
                &["alertname"],
                AlertStatus::Firing,
                t0,
            ),
            t0,
        )
        .await;
    }
    let incidents = wait_for(&client, "three incidents", |l| l.len() == 3).await;
    // Each page is on its incident's timeline before the reply relies on it.
    for inc in &incidents {
        let paged = tocsin_tests::eventually_within(WAIT, || async {
            let d = get(&client, IncidentRef::Id(inc.id)).await;
            if d.timeline
                .iter()
                .any(|e| matches!(e.kind, EventKind::Paged { .. }))
            {
                Ok(())
            } else {
                Err(d.incident.number)
            }
        })
        .await;
        assert_eq!(paged, Ok(()), "incident paged");
    }
    let url = format!("{}/twilio/sms", tocsin.chatops_url);

    let r = post_sms(&url, ALICE, "ACK ALL").await;
    assert_eq!(r.status(), 200);
    let body = r.text().await.unwrap();
    let mut numbers: Vec<u64> = incidents.iter().map(|i| i.number).collect();
    numbers.sort();
    let listed = numbers
        .iter()
        .map(|n| format!("#{n}"))
        .collect::<Vec<_>>()
        .join(", ");
    assert!(
        body.contains(&format!("Acknowledged 3 incidents: {listed}.")),
        "{body}"
    );
    for inc in &incidents {
        let d = get(&client, IncidentRef::Id(inc.id)).await;
        assert_eq!(
            d.incident.status,
            IncidentStatus::Acknowledged,
            "#{}",
            inc.number
        );
        let by = d.incident.acknowledged_by.unwrap();
        assert_eq!((by.name.as_str(), by.via.as_str()), ("alice", "sms"));
    }
    // Again: nothing is left to acknowledge; `aa` is the same.
    let body = post_sms(&url, ALICE, "aa").await.text().await.unwrap();
    assert!(
        body.contains("You have no open page to acknowledge."),
        "{body}"
    );
    // ALL goes with ACK only.
    let body = post_sms(&url, ALICE, "RES ALL").await.text().await.unwrap();
    assert!(body.contains("Reply ACK 42, RES 42 or ESC 42"), "{body}");
}
