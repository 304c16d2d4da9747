//! Self-test of the test kit's fake providers and SMTP sink: each fake
//! accepts what the real service accepts, rejects what it rejects with the
//! real error shapes, and records what it accepted.

use std::time::Duration;

use serde_json::{json, Value};
use tocsin_tests::fakes::{
    form_encode, webhook_signature, Failure, FakeProviders as F, Outcome, Provider, RateLimit,
    RateLimitKey, RequestCounts,
};
use tocsin_tests::smtp::SmtpSink;

/// A plain client (after the kit's one-time set-up: logs, TLS crypto provider).
fn client() -> reqwest::Client {
    tocsin_tests::init_logs();
    reqwest::Client::new()
}

struct Answer {
    status: u16,
    retry_after: Option<String>,
    text: String,
    json: Value,
}

async fn send(req: reqwest::RequestBuilder) -> Answer {
    let resp = req.send().await.expect("request sent");
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let text = resp.text().await.unwrap_or_default();
    let json = serde_json::from_str(&text).unwrap_or(Value::Null);
    Answer {
        status,
        retry_after,
        text,
        json,
    }
}

async fn slack(c: &reqwest::Client, fakes: &F, method: &str, body: Value) -> Answer {
    send(
        c.post(format!("{}/{method}", fakes.slack_api_url()))
            .bearer_auth(F::SLACK_TOKEN)
            .header("content-type", "application/json; charset=utf-8")
            .body(body.to_string()),
    )
    .await
}

fn ack_button(style: &str, label: &str) -> Value {
    json!([{"type": "actions", "block_id": "inc_42", "elements": [
        {"type": "button", "action_id": "ack", "value": "INC-42", "style": style,
         "text": {"type": "plain_text", "text": label}}]}])
}

#[tokio::test]
async fn slack_web_api() {
    let fakes = F::start().await;
    let c = client();
    let url = format!("{}/chat.postMessage", fakes.slack_api_url());
    let msg = json!({"channel": "C123", "text": "hi"}).to_string();

    let a = send(
        c.post(&url)
            .header("content-type", "application/json")
            .body(msg.clone()),
    )
    .await;
    assert_eq!(
        (a.status, a.json.clone()),
        (200, json!({"ok": false, "error": "not_authed"}))
    );
    let a = send(
        c.post(&url)
            .bearer_auth("xoxb-wrong")
            .header("content-type", "application/json")
            .body(msg.clone()),
    )
    .await;
    assert_eq!(a.json["error"], "invalid_auth");
    let a = send(
        c.post(&url)
            .bearer_auth(F::SLACK_TOKEN)
            .header("content-type", "text/plain")
            .body(msg),
    )
    .await;
    assert_eq!(a.json["error"], "invalid_post_type");

    let err = |a: Answer| a.json["error"].as_str().unwrap_or("").to_string();
    assert_eq!(
        err(slack(&c, &fakes, "chat.postMessage", json!({"text": "x"})).await),
        "channel_not_found"
    );
    assert_eq!(
        err(slack(&c, &fakes, "chat.postMessage", json!({"channel": "C1"})).await),
        "no_text"
    );
    let bad = [
        ack_button("default", "Acknowledge"),
        ack_button("primary", &"x".repeat(76)),
        json!([{"type": "section", "text": {"type": "mrkdwn", "text": "x"},
                "accessory": {"type": "button", "text": {"type": "mrkdwn", "text": "x"}}}]),
        json!([{"text": "no type"}]),
        json!({"type": "section"}),
    ];
    for blocks in bad {
        let a = slack(
            &c,
            &fakes,
            "chat.postMessage",
            json!({"channel": "C1", "text": "x", "blocks": blocks}),
        )
        .await;
        assert_eq!(a.json["error"], "invalid_blocks", "{blocks}");
    }
    assert_eq!(
        err(slack(
            &c,
            &fakes,
            "chat.postMessage",
            json!({"channel": "C1", "text": "x".repeat(40_001)})
        )
        .await),
        "msg_too_long"
    );

    // Accepted: a channel post with blocks and metadata, and a DM by user id.
    let metadata = json!({"event_type": "tocsin_page", "event_payload": {"page_id": "p-1"}});
    let a = slack(
        &c,
        &fakes,
        "chat.postMessage",
        json!({"channel": "C123", "text": "INC-42 firing", "unknown_field": 1,
               "blocks": ack_button("primary", "Acknowledge"), "metadata": metadata}),
    )
    .await;
    assert_eq!(a.json["ok"], true, "{}", a.text);
    assert_eq!(a.json["channel"], "C123");
    assert_eq!(a.json["message"]["text"], "INC-42 firing");
    let ts1 = a.json["ts"].as_str().unwrap().to_string();
    assert_eq!(ts1.len(), "1700000000.000123".len());
    let a = slack(
        &c,
        &fakes,
        "chat.postMessage",
        json!({"channel": "U42", "text": "you are paged"}),
    )
    .await;
    assert_eq!(a.json["channel"], "D42");
    let ts2 = a.json["ts"].as_str().unwrap().to_string();
    assert!(ts2.parse::<f64>().unwrap() > ts1.parse::<f64>().unwrap());

    // chat.update: only a known (channel, ts) pair.
    let a = slack(
        &c,
        &fakes,
        "chat.update",
        json!({"channel": "C123", "ts": ts1, "text": "INC-42 acknowledged"}),
    )
    .await;
    assert_eq!(
        (a.json["ok"].clone(), a.json["text"].clone()),
        (json!(true), json!("INC-42 acknowledged"))
    );
    let a = slack(
        &c,
        &fakes,
        "chat.update",
        json!({"channel": "U42", "ts": ts2, "text": "x"}),
    )
    .await;
    assert_eq!(a.json["error"], "message_not_found");
    let a = slack(
        &c,
        &fakes,
        "chat.update",
        json!({"channel": "D42", "ts": ts2, "text": "y"}),
    )
    .await;
    assert_eq!(a.json["ok"], true);

    // conversations.open and .history (JSON and form).
    let a = slack(&c, &fakes, "conversations.open", json!({"users": "U42"})).await;
    assert_eq!(a.json, json!({"ok": true, "channel": {"id": "D42"}}));
    let a = slack(
        &c,
        &fakes,
        "conversations.history",
        json!({"channel": "C123", "include_all_metadata": true}),
    )
    .await;
    assert_eq!(a.json["has_more"], false);
    let msgs = a.json["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0]["ts"], ts1.as_str());
    assert_eq!(msgs[0]["text"], "INC-42 acknowledged");
    assert_eq!(msgs[0]["metadata"], metadata);
    let a = send(
        c.post(format!("{}/conversations.history", fakes.slack_api_url()))
            .bearer_auth(F::SLACK_TOKEN)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form_encode(&[("channel", "C123"), ("oldest", &ts1)])),
    )
    .await;
    assert_eq!(a.json["messages"], json!([]), "oldest is exclusive");
    let a = send(
        c.post(format!("{}/conversations.history", fakes.slack_api_url()))
            .bearer_auth(F::SLACK_TOKEN)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form_encode(&[("channel", "C123"), ("oldest", "1")])),
    )
    .await;
    assert_eq!(a.json["messages"].as_array().unwrap().len(), 1);
    assert!(a.json["messages"][0].get("metadata").is_none());

    let posts = fakes.slack_posts();
    assert_eq!(posts.len(), 2);
    assert_eq!(
        (posts[0].channel.as_str(), posts[0].ts.as_str()),
        ("C123", ts1.as_str())
    );
    assert_eq!(posts[0].metadata, metadata);
    assert_eq!(posts[0].blocks[0]["block_id"], "inc_42");
    assert_eq!(posts[0].body["unknown_field"], 1);
    assert_eq!(posts[1].channel, "D42");
    assert_eq!(fakes.slack_updates().len(), 2);
    assert_eq!(fakes.rejected().len(), 12);
    assert!(fakes
        .rejected()
        .iter()
        .all(|r| r.provider == Provider::Slack && r.status == 200));
    assert_eq!(fakes.requests(Provider::Slack), 20);
}

#[tokio::test]
async fn slack_incoming_webhook() {
    let fakes = F::start().await;
    let c = client();
    let post = |body: &str| {
        c.post(fakes.slack_webhook_url())
            .header("content-type", "application/json")
            .body(body.to_string())
    };
    let a = send(post(r#"{"text":"INC-42 firing"}"#)).await;
    assert_eq!((a.status, a.text.as_str()), (200, "ok"));
    let a = send(post(r#"{"username":"x"}"#)).await;
    assert_eq!((a.status, a.text.as_str()), (400, "no_text"));
    let a = send(post("{nope")).await;
    assert_eq!((a.status, a.text.as_str()), (400, "invalid_payload"));
    assert_eq!(
        fakes.slack_webhook_posts(),
        vec![json!({"text": "INC-42 firing"})]
    );
    assert_eq!(fakes.requests(Provider::SlackWebhook), 3);
}

/// Posts `n` messages to `channel`; their `ts`, oldest first.
async fn post_many(c: &reqwest::Client, fakes: &F, channel: &str, n: usize) -> Vec<String> {
    let mut ts = Vec::with_capacity(n);
    for i in 0..n {
        let a = slack(
            c,
            fakes,
            "chat.postMessage",
            json!({"channel": channel, "text": format!("message {i}")}),
        )
        .await;
        assert_eq!(a.json["ok"], true, "{}", a.text);
        ts.push(a.json["ts"].as_str().unwrap().to_string());
    }
    ts
}

fn ts_of(a: &Answer) -> Vec<String> {
    a.json["messages"]
        .as_array()
        .unwrap_or_else(|| panic!("no messages in {}", a.text))
        .iter()
        .map(|m| m["ts"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn slack_history_pages_with_a_cursor() {
    let fakes = F::start().await;
    let c = client();
    let posted = post_many(&c, &fakes, "C1", 200).await;
    post_many(&c, &fakes, "C2", 3).await;
    let newest_first: Vec<String> = posted.iter().rev().cloned().collect();

    // 200 messages, limit 50: four pages, newest first, chained by cursor.
    let mut seen = Vec::new();
    let mut cursors = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut args = json!({"channel": "C1", "limit": 50});
        if let Some(c) = &cursor {
            args["cursor"] = json!(c);
        }
        let a = slack(&c, &fakes, "conversations.history", args).await;
        pages += 1;
        assert_eq!(a.json["ok"], true, "{}", a.text);
        assert_eq!(ts_of(&a).len(), 50, "page {pages}");
        seen.extend(ts_of(&a));
        if a.json["has_more"] == json!(true) {
            let next = a.json["response_metadata"]["next_cursor"]
                .as_str()
                .unwrap_or_else(|| panic!("has_more without a cursor: {}", a.text));
            assert!(!next.is_empty());
            cursors.push(next.to_string());
            cursor = Some(next.to_string());
        } else {
            assert_eq!(a.json["has_more"], false, "{}", a.text);
            let next = &a.json["response_metadata"]["next_cursor"];
            assert!(next.is_null() || next == "", "{}", a.text);
            break;
        }
        assert!(pages < 10, "the cursor chain does not end");
    }
    assert_eq!(pages, 4);
    assert_eq!(seen, newest_first);
    let distinct: std::collections::HashSet<_> = cursors.iter().collect();
    assert_eq!(distinct.len(), 3, "{cursors:?}");

    // The same walk as a form GET: the cursor is an ordinary argument.
    let a = send(
        c.get(format!(
            "{}/conversations.history?{}",
            fakes.slack_api_url(),
            form_encode(&[("channel", "C1"), ("limit", "50"), ("cursor", &cursors[2]),])
        ))
        .bearer_auth(F::SLACK_TOKEN),
    )
    .await;
    assert_eq!(ts_of(&a), newest_first[150..].to_vec());
    assert_eq!(a.json["has_more"], false);

    // Default limit 100; a limit above the maximum is capped, not refused.
    let a = slack(
        &c,
        &fakes,
        "conversations.history",
        json!({"channel": "C1"}),
    )
    .await;
    assert_eq!(ts_of(&a), newest_first[..100].to_vec());
    assert_eq!(a.json["has_more"], true);
    let a = slack(
        &c,
        &fakes,
        "conversations.history",
        json!({"channel": "C1", "limit": 5000}),
    )
    .await;
    assert_eq!(ts_of(&a).len(), 200);
    assert_eq!(a.json["has_more"], false);

    // oldest/latest bound the walk; exclusive unless inclusive.
    let a = slack(
        &c,
        &fakes,
        "conversations.history",
        json!({"channel": "C1", "oldest": posted[49], "limit": 100}),
    )
    .await;
    assert_eq!(ts_of(&a), newest_first[..100].to_vec());
    let next = a.json["response_metadata"]["next_cursor"].clone();
    let a = slack(
        &c,
        &fakes,
        "conversations.history",
        json!({"channel": "C1", "oldest": posted[49], "limit": 100, "cursor": next}),
    )
    .await;
    assert_eq!(ts_of(&a), newest_first[100..150].to_vec());
    assert_eq!(a.json["has_more"], false);
    let a = slack(
        &c,
        &fakes,
        "conversations.history",
        json!({"channel": "C1", "oldest": posted[49], "latest": posted[60],
               "inclusive": true, "limit": 999}),
    )
    .await;
    assert_eq!(ts_of(&a), newest_first[139..=150].to_vec());
    let a = slack(
        &c,
        &fakes,
        "conversations.history",
        json!({"channel": "C1", "latest": posted[1], "limit": 999}),
    )
    .await;
    assert_eq!(ts_of(&a), vec![posted[0].clone()]);

    // Cursors and timestamps that do not parse are refused as Slack does.
    for cursor in ["not a cursor", "bmV4dF90czp4eXo=", "dXNlcjpVMDYxTkZUVDI="] {
        let a = slack(
            &c,
            &fakes,
            "conversations.history",
            json!({"channel": "C1", "cursor": cursor}),
        )
        .await;
        assert_eq!(
            (a.status, a.json.clone()),
            (200, json!({"ok": false, "error": "invalid_cursor"})),
            "{cursor}"
        );
    }
    let a = slack(
        &c,
        &fakes,
        "conversations.history",
        json!({"channel": "C1", "oldest": "yesterday"}),
    )
    .await;
    assert_eq!(a.json["error"], "invalid_ts_oldest");
    let a = slack(
        &c,
        &fakes,
        "conversations.history",
        json!({"channel": "C1", "latest": "1x"}),
    )
    .await;
    assert_eq!(a.json["error"], "invalid_ts_latest");
    assert_eq!(fakes.requests(Provider::Slack), 203 + 4 + 1 + 2 + 4 + 3 + 2);
}

#[tokio::test]
async fn pagerduty_events_and_dedup() {
    let fakes = F::start().await;
    let c = client();
    let enqueue = |event: Value| {
        send(
            c.post(fakes.pagerduty_url())
                .header("content-type", "application/json")
                .body(event.to_string()),
        )
    };
    let trigger = |key: &str, summary: &str| {
        json!({"routing_key": F::PD_ROUTING_KEY, "event_action": "trigger", "dedup_key": key,
               "payload": {"summary": summary, "source": "tocsin", "severity": "critical",
                           "timestamp": "2015-07-17T08:42:58.315+0000",
                           "custom_details": {"n": 1}},
               "links": [{"href": "http://tocsin/incidents/42", "text": "incident"}]})
    };
    let action = |a: &str, key: &str| json!({"routing_key": F::PD_ROUTING_KEY, "event_action": a, "dedup_key": key});

    // Every problem is listed.
    let a = enqueue(json!({"routing_key": "short", "event_action": "trigger",
                           "payload": {"summary": "x", "severity": "fatal",
                                       "timestamp": "yesterday"},
                           "links": [{"text": "no href"}]}))
    .await;
    assert_eq!(a.status, 400);
    assert_eq!(a.json["status"], "invalid event");
    assert_eq!(a.json["message"], "Event object is invalid");
    let errors = a.json["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 5, "{errors:?}");
    assert!(errors[0].as_str().unwrap().contains("routing_key"));
    let a = enqueue(json!({"routing_key": "ffffffffffffffffffffffffffffffff",
                           "event_action": "resolve"}))
    .await;
    assert_eq!(a.json["errors"].as_array().unwrap().len(), 2, "{}", a.text);
    let mut huge = trigger("k", "big");
    huge["payload"]["custom_details"]["blob"] = json!("x".repeat(520_000));
    assert_eq!(enqueue(huge).await.status, 400);
    let mut long = trigger("k", "x");
    long["payload"]["summary"] = json!("s".repeat(1025));
    assert_eq!(enqueue(long).await.status, 400);

    // Dedup: merge while open, new alert after resolve, late actions dropped.
    let a = enqueue(trigger("inc-42", "INC-42 firing")).await;
    assert_eq!(
        (a.status, a.json.clone()),
        (
            202,
            json!({"status": "success", "message": "Event processed", "dedup_key": "inc-42"})
        )
    );
    assert_eq!(enqueue(trigger("inc-42", "again")).await.status, 202);
    assert_eq!(enqueue(action("acknowledge", "inc-42")).await.status, 202);
    assert_eq!(enqueue(trigger("inc-42", "and again")).await.status, 202);
    assert_eq!(enqueue(action("resolve", "inc-42")).await.status, 202);
    assert_eq!(enqueue(action("acknowledge", "inc-42")).await.status, 202);
    assert_eq!(enqueue(action("resolve", "never-seen")).await.status, 202);
    assert_eq!(enqueue(trigger("inc-42", "reopened")).await.status, 202);
    let mut no_key = trigger("", "generated key");
    no_key.as_object_mut().unwrap().remove("dedup_key");
    let a = enqueue(no_key).await;
    let generated = a.json["dedup_key"].as_str().unwrap().to_string();
    assert_eq!(generated.len(), 32);

    let alerts = fakes.pagerduty_alerts();
    let summary: Vec<_> = alerts
        .iter()
        .map(|a| (a.dedup_key.as_str(), a.status.as_str(), a.triggers))
        .collect();
    assert_eq!(
        summary,
        vec![
            ("inc-42", "resolved", 3),
            ("inc-42", "triggered", 1),
            (generated.as_str(), "triggered", 1)
        ]
    );
    assert_eq!(alerts[0].summary, "INC-42 firing");
    assert_eq!(alerts[0].severity, "critical");
    assert_eq!(fakes.pagerduty_events().len(), 9);
    assert_eq!(fakes.requests(Provider::PagerDuty), 13);
}

#[tokio::test]
async fn twilio_messages() {
    let fakes = F::start().await;
    let c = client();
    let url = format!(
        "{}/2010-04-01/Accounts/{}/Messages.json",
        fakes.twilio_url(),
        F::TWILIO_SID
    );
    let create = |pairs: &[(&str, &str)], token: &str| {
        send(
            c.post(&url)
                .basic_auth(F::TWILIO_SID, Some(token))
                .header("content-type", "application/x-www-form-urlencoded")
                .body(form_encode(pairs)),
        )
    };
    let ok = [
        ("To", "+14155552345"),
        ("From", F::TWILIO_FROM),
        ("Body", "INC-42 firing"),
    ];

    let a = create(&ok, "wrong").await;
    assert_eq!(a.status, 401);
    assert_eq!(
        a.json,
        json!({"code": 20003, "message": "Authenticate",
               "more_info": "https://www.twilio.com/docs/errors/20003", "status": 401})
    );
    let a = create(&[("To", "555-1234"), ok[1], ok[2]], F::TWILIO_TOKEN).await;
    assert_eq!((a.status, a.json["code"].clone()), (400, json!(21211)));
    assert_eq!(
        a.json["message"],
        "The 'To' number 555-1234 is not a valid phone number."
    );
    let a = create(&[ok[0], ok[2]], F::TWILIO_TOKEN).await;
    assert_eq!((a.status, a.json["code"].clone()), (400, json!(21603)));
    let long = "x".repeat(1601);
    let a = create(&[ok[0], ok[1], ("Body", &long)], F::TWILIO_TOKEN).await;
    assert_eq!((a.status, a.json["code"].clone()), (400, json!(21617)));

    let a = create(&ok, F::TWILIO_TOKEN).await;
    assert_eq!(a.status, 201, "{}", a.text);
    let sid = a.json["sid"].as_str().unwrap().to_string();
    assert!(sid.starts_with("SM") && sid.len() == 34);
    assert_eq!(a.json["status"], "queued");
    assert_eq!(a.json["num_segments"], "1");
    assert_eq!(a.json["account_sid"], F::TWILIO_SID);
    assert_eq!(a.json["date_sent"], Value::Null);
    assert!(a.json["date_created"].as_str().unwrap().ends_with(" +0000"));
    let long = "y".repeat(200);
    let a = create(
        &[
            ("To", "+447700900123"),
            ("MessagingServiceSid", "MG00000000000000000000000000000000"),
            ("Body", &long),
        ],
        F::TWILIO_TOKEN,
    )
    .await;
    assert_eq!(
        (a.status, a.json["num_segments"].clone()),
        (201, json!("2"))
    );

    // Listing, newest first, filtered.
    let today = jiff::Timestamp::now().strftime("%Y-%m-%d").to_string();
    let list = |query: String| {
        send(
            c.get(format!("{url}?{query}"))
                .basic_auth(F::TWILIO_SID, Some(F::TWILIO_TOKEN)),
        )
    };
    let a = list(form_encode(&[("PageSize", "20")])).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.json["page_size"], 20);
    assert_eq!(a.json["next_page_uri"], Value::Null);
    let listed = a.json["messages"].as_array().unwrap();
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[1]["sid"], sid.as_str());
    let a = list(form_encode(&[
        ("To", "+14155552345"),
        ("DateSent>", &today),
    ]))
    .await;
    assert_eq!(a.json["messages"].as_array().unwrap().len(), 1);
    let a = list(form_encode(&[("DateSent<", "2000-01-01")])).await;
    assert_eq!(a.json["messages"], json!([]));

    let sms = fakes.sms();
    assert_eq!(sms.len(), 2);
    assert_eq!(
        (
            sms[0].sid.as_str(),
            sms[0].to.as_str(),
            sms[0].from.as_deref()
        ),
        (sid.as_str(), "+14155552345", Some(F::TWILIO_FROM))
    );
    assert_eq!(
        sms[1].messaging_service_sid.as_deref(),
        Some("MG00000000000000000000000000000000")
    );
    assert_eq!(fakes.requests(Provider::Twilio), 9);
}

fn sids(a: &Answer) -> Vec<String> {
    a.json["messages"]
        .as_array()
        .unwrap_or_else(|| panic!("no messages in {}", a.text))
        .iter()
        .map(|m| m["sid"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn twilio_list_pages_like_twilio() {
    let fakes = F::start().await;
    let c = client();
    let list_url = format!(
        "{}/2010-04-01/Accounts/{}/Messages.json",
        fakes.twilio_url(),
        F::TWILIO_SID
    );
    let path = format!("/2010-04-01/Accounts/{}/Messages.json", F::TWILIO_SID);
    let create = |pairs: Vec<(&'static str, String)>| {
        let pairs: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (*k, v.as_str())).collect();
        send(
            c.post(&list_url)
                .basic_auth(F::TWILIO_SID, Some(F::TWILIO_TOKEN))
                .header("content-type", "application/x-www-form-urlencoded")
                .body(form_encode(&pairs)),
        )
    };
    let get = |uri: &str| {
        send(
            c.get(format!("{}{uri}", fakes.twilio_url()))
                .basic_auth(F::TWILIO_SID, Some(F::TWILIO_TOKEN)),
        )
    };
    let mut to_a = Vec::new();
    for i in 0..250 {
        let a = create(vec![
            ("To", "+14155550100".into()),
            ("From", F::TWILIO_FROM.into()),
            ("Body", format!("page {i}")),
        ])
        .await;
        assert_eq!(a.status, 201, "{}", a.text);
        to_a.push(a.json["sid"].as_str().unwrap().to_string());
    }
    for i in 0..5 {
        let a = create(vec![
            ("To", "+14155550199".into()),
            (
                "MessagingServiceSid",
                "MG00000000000000000000000000000000".into(),
            ),
            ("Body", format!("other {i}")),
        ])
        .await;
        assert_eq!(a.status, 201, "{}", a.text);
    }
    let newest_first: Vec<String> = to_a.iter().rev().cloned().collect();

    // 250 messages, PageSize 100: three pages by next_page_uri.
    let query = form_encode(&[("To", "+14155550100"), ("PageSize", "100")]);
    let first = get(&format!("{path}?{query}")).await;
    assert_eq!(first.status, 200, "{}", first.text);
    let first_uri = format!("{path}?To=%2B14155550100&PageSize=100&Page=0");
    assert_eq!(first.json["first_page_uri"], first_uri.as_str());
    assert_eq!(first.json["uri"], first_uri.as_str());
    assert_eq!(first.json["previous_page_uri"], Value::Null);
    assert_eq!(
        (
            first.json["page"].clone(),
            first.json["page_size"].clone(),
            first.json["start"].clone(),
            first.json["end"].clone()
        ),
        (json!(0), json!(100), json!(0), json!(99))
    );
    assert_eq!(
        first.json["next_page_uri"],
        format!(
            "{path}?To=%2B14155550100&PageSize=100&Page=1&PageToken=PA{}",
            newest_first[99]
        )
        .as_str()
    );
    let mut pages = vec![first];
    while let Some(next) = pages.last().unwrap().json["next_page_uri"].as_str() {
        let a = get(next).await;
        assert_eq!(a.status, 200, "{}", a.text);
        pages.push(a);
        assert!(pages.len() < 10, "next_page_uri does not end");
    }
    assert_eq!(pages.len(), 3);
    let walked: Vec<String> = pages.iter().flat_map(sids).collect();
    assert_eq!(walked, newest_first);
    let (second, third) = (&pages[1], &pages[2]);
    assert_eq!(
        (
            second.json["page"].clone(),
            second.json["start"].clone(),
            second.json["end"].clone()
        ),
        (json!(1), json!(100), json!(199))
    );
    assert_eq!(
        (
            third.json["page"].clone(),
            third.json["start"].clone(),
            third.json["end"].clone()
        ),
        (json!(2), json!(200), json!(249))
    );
    assert_eq!(third.json["next_page_uri"], Value::Null);
    assert_eq!(third.json["first_page_uri"], first_uri.as_str());
    // previous_page_uri leads back to the page before.
    let back = get(second.json["previous_page_uri"].as_str().unwrap()).await;
    assert_eq!(sids(&back), newest_first[..100].to_vec());
    assert_eq!(back.json["page"], 0);

    // PageSize: default 50, at most 1000.
    let a = get(&path).await;
    assert_eq!(
        (sids(&a).len(), a.json["page_size"].clone()),
        (50, json!(50))
    );
    let a = get(&format!("{path}?PageSize=5000")).await;
    assert_eq!(
        (sids(&a).len(), a.json["page_size"].clone()),
        (255, json!(1000))
    );
    assert_eq!(a.json["next_page_uri"], Value::Null);

    // Filters: To, From, DateSent (a GMT date; a time of day is ignored).
    let all = |q: &[(&str, &str)]| {
        let mut q = q.to_vec();
        q.push(("PageSize", "1000"));
        get(&format!("{path}?{}", form_encode(&q)))
    };
    assert_eq!(sids(&all(&[("To", "+14155550199")]).await).len(), 5);
    assert_eq!(sids(&all(&[("From", F::TWILIO_FROM)]).await), newest_first);
    let newest = &a.json["messages"][0]["date_sent"];
    let sent = jiff::fmt::rfc2822::parse(newest.as_str().unwrap())
        .unwrap()
        .timestamp();
    let day = sent.strftime("%Y-%m-%d").to_string();
    let oldest_day =
        jiff::fmt::rfc2822::parse(a.json["messages"][254]["date_sent"].as_str().unwrap())
            .unwrap()
            .timestamp()
            .strftime("%Y-%m-%d")
            .to_string();
    let a = all(&[("DateSent>", &oldest_day), ("DateSent<", &day)]).await;
    assert_eq!(sids(&a).len(), 255, "{}", a.json["uri"]);
    assert_eq!(
        a.json["uri"],
        format!("{path}?DateSent%3C={day}&DateSent%3E={oldest_day}&PageSize=1000&Page=0").as_str()
    );
    let later_that_day = (sent + jiff::SignedDuration::from_secs(1)).to_string();
    let a = all(&[("DateSent>", &later_that_day)]).await;
    assert!(sids(&a).contains(&newest_first[0]), "DateSent is a date");
    let a = all(&[("DateSent", "2000-01-01")]).await;
    assert_eq!(sids(&a).len(), 0);
    assert_eq!(
        (
            a.json["start"].clone(),
            a.json["end"].clone(),
            a.json["next_page_uri"].clone()
        ),
        (json!(0), json!(0), Value::Null)
    );
    assert_eq!(sids(&all(&[("DateSent<", "2000-01-01")]).await).len(), 0);
    assert_eq!(sids(&all(&[("DateSent>", "2999-01-01")]).await).len(), 0);

    // Paging needs the token the API handed out.
    let a = get(&format!("{path}?PageSize=100&Page=1")).await;
    assert_eq!(
        (a.status, a.json["code"].clone(), a.json["message"].clone()),
        (
            400,
            json!(70002),
            json!("Paged requests must include a PageToken")
        )
    );
    let a = get(&format!("{path}?PageSize=100&Page=1&PageToken=PAnope")).await;
    assert_eq!(
        (a.status, a.json["code"].clone()),
        (400, json!(20001)),
        "{}",
        a.text
    );
    let a = all(&[("DateSent", "last tuesday")]).await;
    assert_eq!(
        (a.status, a.json["code"].clone()),
        (400, json!(20001)),
        "{}",
        a.text
    );
    assert_eq!(
        fakes.requests(Provider::Twilio),
        255 + 3 + 1 + 2 + 2 + 2 + 1 + 2 + 3
    );
}

#[tokio::test]
async fn standard_webhooks() {
    let fakes = F::start().await;
    let c = client();
    let now = jiff::Timestamp::now().as_second().to_string();
    let body = r#"{"type":"incident.opened","data":{"id":42}}"#;
    let post = |name: &str, id: &str, ts: &str, sig: Option<String>, body: &str| {
        let mut r = c
            .post(fakes.webhook_url(name))
            .header("content-type", "application/json")
            .header("webhook-id", id)
            .header("webhook-timestamp", ts)
            .body(body.to_string());
        if let Some(s) = sig {
            r = r.header("webhook-signature", s);
        }
        send(r)
    };
    let sign = |id: &str, ts: &str, body: &str| {
        webhook_signature(F::WEBHOOK_SECRET, id, ts, body.as_bytes())
    };

    let a = post("ops", "msg_1", &now, Some(sign("msg_1", &now, body)), body).await;
    assert_eq!(a.status, 204);
    // Several signatures, one valid; a repeat of the id is answered but not recorded.
    let several = format!("v1,AAAA {} v2,xyz", sign("msg_1", &now, body));
    assert_eq!(
        post("ops", "msg_1", &now, Some(several), body).await.status,
        204
    );
    let a = post("ops", "msg_2", &now, Some(sign("msg_1", &now, body)), body).await;
    assert_eq!(
        (a.status, a.json.clone()),
        (401, json!({"error": "invalid signature"}))
    );
    assert_eq!(post("ops", "msg_3", &now, None, body).await.status, 401);
    let old = (jiff::Timestamp::now().as_second() - 301).to_string();
    let a = post("ops", "msg_4", &old, Some(sign("msg_4", &old, body)), body).await;
    assert_eq!(a.status, 401);
    let a = post(
        "ops",
        "msg_5",
        &now,
        Some(sign("msg_5", &now, "[1]")),
        "[1]",
    )
    .await;
    assert_eq!(a.status, 400);
    assert_eq!(
        post("unsigned-audit", "msg_6", &now, None, body)
            .await
            .status,
        204
    );

    let calls = fakes.webhooks();
    assert_eq!(calls.len(), 2);
    assert_eq!(
        (
            calls[0].name.as_str(),
            calls[0].id.as_str(),
            calls[0].timestamp.as_str()
        ),
        ("ops", "msg_1", now.as_str())
    );
    assert_eq!(calls[0].body["data"]["id"], 42);
    assert_eq!(calls[1].name, "unsigned-audit");
    assert_eq!(fakes.requests(Provider::Webhook), 7);
    assert_eq!(fakes.rejected().len(), 4);
}

#[tokio::test]
async fn failure_injection() {
    let fakes = F::start().await;
    let c = client();
    let post = || {
        slack(
            &c,
            &fakes,
            "chat.postMessage",
            json!({"channel": "C1", "text": "x"}),
        )
    };

    fakes.fail_next(Provider::Slack, 2, Failure::Status(500));
    fakes.fail_next(
        Provider::Slack,
        1,
        Failure::RateLimited {
            retry_after_secs: 7,
        },
    );
    assert_eq!(post().await.status, 500);
    assert_eq!(post().await.status, 500);
    let a = post().await;
    assert_eq!(
        (a.status, a.retry_after.as_deref(), a.json.clone()),
        (429, Some("7"), json!({"ok": false, "error": "ratelimited"}))
    );
    assert_eq!(post().await.json["ok"], true);

    // Injected failures come before validation: even an invalid request gets them.
    fakes.fail_next(Provider::PagerDuty, 1, Failure::Status(503));
    let a = send(c.post(fakes.pagerduty_url()).body("not json")).await;
    assert_eq!(a.status, 503);

    fakes.fail_next(
        Provider::Twilio,
        1,
        Failure::RateLimited {
            retry_after_secs: 1,
        },
    );
    let a = send(c.get(format!("{}/x", fakes.twilio_url()))).await;
    assert_eq!(a.status, 404, "not a Twilio route: not counted");
    let a = send(c.post(format!(
        "{}/2010-04-01/Accounts/{}/Messages.json",
        fakes.twilio_url(),
        F::TWILIO_SID
    )))
    .await;
    assert_eq!((a.status, a.json["code"].clone()), (429, json!(20429)));

    // A hung request times the client out and records nothing.
    fakes.fail_next(
        Provider::Webhook,
        1,
        Failure::Hang(Duration::from_millis(400)),
    );
    let hung = c
        .post(fakes.webhook_url("unsigned"))
        .header("webhook-id", "h1")
        .body("{}")
        .timeout(Duration::from_millis(100))
        .send()
        .await;
    assert!(hung.unwrap_err().is_timeout());
    let a = send(
        c.post(fakes.webhook_url("unsigned"))
            .header("webhook-id", "h1")
            .body("{}"),
    )
    .await;
    assert_eq!(a.status, 204);
    assert_eq!(fakes.webhooks().len(), 1);
    assert_eq!(fakes.requests(Provider::Webhook), 2);

    let rejected = fakes.rejected();
    let seen: Vec<_> = rejected.iter().map(|r| (r.provider, r.status)).collect();
    assert_eq!(
        seen,
        vec![
            (Provider::Slack, 500),
            (Provider::Slack, 500),
            (Provider::Slack, 429),
            (Provider::PagerDuty, 503),
            (Provider::Twilio, 429)
        ]
    );
    assert_eq!(
        serde_json::from_str::<Value>(&rejected[0].body).unwrap(),
        json!({"ok": false, "error": "fatal_error"})
    );
    assert_eq!(fakes.slack_posts().len(), 1);
}

/// A limit no test outlasts: the second request within 100 s is refused.
fn slow(burst: u32, key: RateLimitKey) -> RateLimit {
    RateLimit {
        per_second: 0.01,
        burst,
        key,
    }
}

fn retry_after_secs(a: &Answer) -> u64 {
    a.retry_after
        .as_deref()
        .unwrap_or_else(|| panic!("no Retry-After: {}", a.text))
        .parse()
        .unwrap()
}

#[tokio::test]
async fn rate_limits_answer_as_the_providers_do() {
    let fakes = F::start().await;
    let c = client();
    let post = |channel: &str| {
        slack(
            &c,
            &fakes,
            "chat.postMessage",
            json!({"channel": channel, "text": "x"}),
        )
    };

    // Slack chat.postMessage, per channel: 429 with Retry-After and Slack's body.
    fakes.set_rate_limit(Provider::Slack, slow(2, RateLimitKey::PerChannel));
    let first = post("C1").await;
    assert_eq!(first.json["ok"], true);
    assert_eq!(post("C1").await.json["ok"], true, "a burst of 2");
    let a = post("C1").await;
    assert_eq!(
        (a.status, a.json.clone()),
        (429, json!({"ok": false, "error": "ratelimited"}))
    );
    let wait = retry_after_secs(&a);
    assert!((90..=100).contains(&wait), "Retry-After {wait}");
    assert_eq!(post("C2").await.json["ok"], true, "another channel");
    let ts = first.json["ts"].as_str().unwrap();
    let update = json!({"channel": "C1", "ts": ts, "text": "y"});
    let a = slack(&c, &fakes, "chat.update", update.clone()).await;
    assert_eq!(a.json["ok"], true, "chat.update has its own limit");
    fakes.set_operation_rate_limit(
        Provider::Slack,
        "chat.update",
        slow(1, RateLimitKey::Global),
    );
    assert_eq!(
        slack(&c, &fakes, "chat.update", update.clone()).await.json["ok"],
        true
    );
    let a = slack(&c, &fakes, "chat.update", update).await;
    assert_eq!(
        (a.status, a.json["error"].clone()),
        (429, json!("ratelimited"))
    );
    let a = slack(&c, &fakes, "chat.postMessage", json!({"channel": "C1"})).await;
    assert_eq!(
        (a.status, a.json["error"].clone()),
        (429, json!("ratelimited")),
        "the limit comes before the method's checks"
    );
    let unauthed = send(
        c.post(format!("{}/chat.postMessage", fakes.slack_api_url()))
            .header("content-type", "application/json")
            .body(json!({"channel": "C1", "text": "x"}).to_string()),
    )
    .await;
    assert_eq!(
        (unauthed.status, unauthed.json["error"].clone()),
        (200, json!("not_authed")),
        "authentication comes first"
    );

    // Twilio, account-wide: 429 with error 20429; listing is not limited.
    fakes.set_rate_limit(Provider::Twilio, slow(1, RateLimitKey::Global));
    let url = format!(
        "{}/2010-04-01/Accounts/{}/Messages.json",
        fakes.twilio_url(),
        F::TWILIO_SID
    );
    let sms = |to: &str| {
        send(
            c.post(&url)
                .basic_auth(F::TWILIO_SID, Some(F::TWILIO_TOKEN))
                .header("content-type", "application/x-www-form-urlencoded")
                .body(form_encode(&[
                    ("To", to),
                    ("From", F::TWILIO_FROM),
                    ("Body", "x"),
                ])),
        )
    };
    assert_eq!(sms("+14155550100").await.status, 201);
    let a = sms("+14155550101").await;
    assert_eq!(
        (a.status, a.json.clone(), a.retry_after.clone()),
        (
            429,
            json!({"code": 20429, "message": "Too Many Requests",
                   "more_info": "https://www.twilio.com/docs/errors/20429", "status": 429}),
            None
        )
    );
    let a = send(c.get(&url).basic_auth(F::TWILIO_SID, Some(F::TWILIO_TOKEN))).await;
    assert_eq!(a.status, 200);

    // PagerDuty, per integration key: 429, the event is not ingested.
    fakes.set_rate_limit(Provider::PagerDuty, slow(1, RateLimitKey::PerChannel));
    let event = |key: &str| {
        json!({"routing_key": key, "event_action": "trigger", "dedup_key": "k",
               "payload": {"summary": "s", "source": "tocsin", "severity": "critical"}})
    };
    let enqueue = |e: Value| {
        send(
            c.post(fakes.pagerduty_url())
                .header("content-type", "application/json")
                .body(e.to_string()),
        )
    };
    assert_eq!(enqueue(event(F::PD_ROUTING_KEY)).await.status, 202);
    let a = enqueue(event(F::PD_ROUTING_KEY)).await;
    assert_eq!(
        (a.status, a.json["status"].clone(), a.retry_after.clone()),
        (429, json!("throttle event"), None)
    );
    let a = enqueue(event("ffffffffffffffffffffffffffffffff")).await;
    assert_eq!(a.status, 400, "an unknown key is no integration's traffic");
    assert_eq!(fakes.pagerduty_alerts()[0].triggers, 1);

    // Webhook receivers and Slack incoming webhooks, per URL.
    fakes.set_rate_limit(Provider::Webhook, slow(1, RateLimitKey::PerChannel));
    fakes.set_rate_limit(Provider::SlackWebhook, slow(1, RateLimitKey::PerChannel));
    let hook = |name: &str, id: &str| {
        send(
            c.post(fakes.webhook_url(name))
                .header("webhook-id", id)
                .body("{}"),
        )
    };
    assert_eq!(hook("unsigned-a", "1").await.status, 204);
    let a = hook("unsigned-a", "2").await;
    assert_eq!(
        (a.status, a.json.clone()),
        (429, json!({"error": "rate limited"}))
    );
    assert!(retry_after_secs(&a) >= 90);
    assert_eq!(hook("unsigned-b", "3").await.status, 204);
    let incoming = || {
        send(
            c.post(fakes.slack_webhook_url())
                .header("content-type", "application/json")
                .body(r#"{"text":"x"}"#),
        )
    };
    assert_eq!(incoming().await.status, 200);
    let a = incoming().await;
    assert_eq!((a.status, a.text.as_str()), (429, "rate_limited"));
    assert!(retry_after_secs(&a) >= 90);

    // Refused requests are counted and recorded as rejected, by destination.
    assert_eq!(
        fakes.counts(Provider::Slack),
        RequestCounts {
            accepted: 5,
            invalid: 1,
            rate_limited: 3,
            ..Default::default()
        }
    );
    assert_eq!(
        fakes.operation_counts(Provider::Slack, "chat.postMessage"),
        RequestCounts {
            accepted: 3,
            invalid: 1,
            rate_limited: 2,
            ..Default::default()
        }
    );
    let limited: Vec<_> = fakes
        .timeline(Provider::Slack)
        .into_iter()
        .filter(|r| r.outcome == Outcome::RateLimited)
        .map(|r| (r.operation, r.destination, r.status))
        .collect();
    assert_eq!(
        limited,
        vec![
            ("chat.postMessage".to_string(), "C1".to_string(), 429),
            ("chat.update".to_string(), "C1".to_string(), 429),
            ("chat.postMessage".to_string(), "C1".to_string(), 429),
        ]
    );
    for p in [
        Provider::Twilio,
        Provider::PagerDuty,
        Provider::Webhook,
        Provider::SlackWebhook,
    ] {
        assert_eq!(fakes.counts(p).rate_limited, 1, "{p:?}");
    }
    let rejected_429 = fakes.rejected().iter().filter(|r| r.status == 429).count();
    assert_eq!(rejected_429, 7);

    // Limits are off again once cleared.
    fakes.clear_rate_limits();
    assert_eq!(post("C1").await.json["ok"], true);
    assert_eq!(sms("+14155550100").await.status, 201);
}

#[tokio::test]
async fn counts_timeline_and_updates_per_message() {
    let fakes = F::start().await;
    let c = client();
    let post = |channel: &str| {
        slack(
            &c,
            &fakes,
            "chat.postMessage",
            json!({"channel": channel, "text": "x"}),
        )
    };
    fakes.fail_next(Provider::Slack, 1, Failure::Status(500));
    assert_eq!(post("C1").await.status, 500);
    fakes.fail_next(Provider::Slack, 1, Failure::Hang(Duration::from_millis(50)));
    assert_eq!(post("C1").await.json["ok"], true, "answered, not recorded");
    let a = post("C1").await;
    let ts1 = a.json["ts"].as_str().unwrap().to_string();
    let a = post("U7").await;
    let ts2 = a.json["ts"].as_str().unwrap().to_string();
    assert_eq!(post("").await.json["error"], "channel_not_found");
    for text in ["ack", "resolved"] {
        let a = slack(
            &c,
            &fakes,
            "chat.update",
            json!({"channel": "C1", "ts": ts1, "text": text}),
        )
        .await;
        assert_eq!(a.json["ok"], true);
    }

    assert_eq!(
        fakes.counts(Provider::Slack),
        RequestCounts {
            accepted: 4,
            invalid: 1,
            rate_limited: 0,
            injected: 1,
            hung: 1,
        }
    );
    assert_eq!(fakes.counts(Provider::Slack).total(), 7);
    assert_eq!(fakes.counts(Provider::Slack).rejected(), 2);
    assert_eq!(fakes.requests(Provider::Slack), 7);
    assert_eq!(
        fakes
            .operation_counts(Provider::Slack, "chat.update")
            .accepted,
        2
    );
    assert_eq!(fakes.counts(Provider::Twilio), RequestCounts::default());

    let timeline = fakes.timeline(Provider::Slack);
    let seen: Vec<_> = timeline
        .iter()
        .map(|r| {
            (
                r.operation.as_str(),
                r.destination.as_str(),
                r.outcome,
                r.status,
            )
        })
        .collect();
    assert_eq!(
        seen,
        vec![
            ("chat.postMessage", "C1", Outcome::Injected, 500),
            ("chat.postMessage", "C1", Outcome::Hung, 0),
            ("chat.postMessage", "C1", Outcome::Accepted, 200),
            ("chat.postMessage", "D7", Outcome::Accepted, 200),
            ("chat.postMessage", "", Outcome::Invalid, 200),
            ("chat.update", "C1", Outcome::Accepted, 200),
            ("chat.update", "C1", Outcome::Accepted, 200),
        ]
    );
    assert!(timeline
        .windows(2)
        .all(|w| w[0].received_at <= w[1].received_at));
    assert!(timeline.iter().all(|r| r.provider == Provider::Slack));
    let posts = fakes.slack_posts();
    assert!(timeline[2].received_at <= posts[0].at);

    let per_ts = fakes.slack_updates_per_ts();
    assert_eq!(per_ts.get(&ts1), Some(&2));
    assert_eq!(per_ts.get(&ts2), Some(&0));
    assert_eq!(per_ts.len(), 2);
}

#[tokio::test]
async fn wait_for_polls() {
    let fakes = F::start().await;
    let url = fakes.slack_webhook_url();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        client()
            .post(url)
            .header("content-type", "application/json")
            .body(r#"{"text":"late"}"#)
            .send()
            .await
            .unwrap();
    });
    assert!(
        fakes
            .wait_for(
                |f| f.slack_webhook_posts().len() == 1,
                Duration::from_secs(3)
            )
            .await
    );
    assert!(
        !fakes
            .wait_for(|f| f.sms().len() == 1, Duration::from_millis(60))
            .await
    );
}

mod smtp {
    use super::*;
    use lettre::{
        message::{header::ContentType, Mailbox, MultiPart},
        transport::smtp::authentication::Credentials,
        AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor,
    };

    fn message(subject: &str) -> Message {
        Message::builder()
            .from(
                "Incident Bot <bot@example.test>"
                    .parse::<Mailbox>()
                    .unwrap(),
            )
            .to("oncall@example.test".parse::<Mailbox>().unwrap())
            .to("backup@example.test".parse::<Mailbox>().unwrap())
            .subject(subject)
            .message_id(None)
            .multipart(MultiPart::alternative_plain_html(
                "p99 latency above 2s — café\nsecond line".to_string(),
                "<p>p99 latency above 2s — café</p>".to_string(),
            ))
            .unwrap()
    }

    #[tokio::test]
    async fn sink_receives_lettre_mail() {
        let sink = SmtpSink::start().await;
        let mailer = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(sink.host())
            .port(sink.port())
            .build();
        let subject = "[FIRING] HighLatency — api été ✓";
        let resp = mailer.send(message(subject)).await.expect("sent");
        assert_eq!(resp.code().to_string(), "250");
        let plain = Message::builder()
            .from("bot@example.test".parse::<Mailbox>().unwrap())
            .to("oncall@example.test".parse::<Mailbox>().unwrap())
            .subject("plain")
            .header(ContentType::TEXT_PLAIN)
            .body(String::from("just text"))
            .unwrap();
        mailer.send(plain).await.expect("sent");

        let mails = sink.wait_for_count(2, Duration::from_secs(5)).await;
        assert_eq!(mails.len(), 2);
        let m = &mails[0];
        assert_eq!(m.mail_from, "bot@example.test");
        assert_eq!(m.rcpt_tos, ["oncall@example.test", "backup@example.test"]);
        assert_eq!(m.subject, subject);
        assert_eq!(m.content_type, "multipart/alternative");
        assert_eq!(m.text, "p99 latency above 2s — café\nsecond line");
        assert_eq!(m.html, "<p>p99 latency above 2s — café</p>");
        assert!(m.message_id.starts_with('<') && m.message_id.ends_with('>'));
        assert!(m.raw.contains("\r\n"));
        let p = &mails[1];
        assert_eq!(
            (p.subject.as_str(), p.content_type.as_str(), p.text.as_str()),
            ("plain", "text/plain", "just text")
        );
        assert_eq!(p.message_id, "", "lettre adds none unless asked");
    }

    #[tokio::test]
    async fn sink_requires_auth() {
        let sink = SmtpSink::start_with_auth("tocsin", "s3cret").await;
        let without = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(sink.host())
            .port(sink.port())
            .build();
        let err = without.send(message("no auth")).await.unwrap_err();
        assert!(err.is_permanent(), "{err}");
        let wrong = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(sink.host())
            .port(sink.port())
            .credentials(Credentials::new("tocsin".into(), "wrong".into()))
            .build();
        assert!(wrong.send(message("wrong auth")).await.is_err());
        let with = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(sink.host())
            .port(sink.port())
            .credentials(Credentials::new("tocsin".into(), "s3cret".into()))
            .build();
        with.send(message("with auth")).await.expect("sent");
        let mails = sink.wait_for_count(1, Duration::from_secs(5)).await;
        assert_eq!(mails.len(), 1);
        assert_eq!(mails[0].subject, "with auth");
    }
}
