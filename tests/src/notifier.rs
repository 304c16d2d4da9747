//! The notifier in tests: a config pointing every channel at the fakes and
//! the SMTP sink, an escalation config that pages on every channel, and
//! pages made by hand for load and crash tests.

use std::path::Path;

use tocsin_notifier::NotifierConfig;
use tocsin_proto::{
    codec,
    incident::{IncidentSummary, Severity},
    notify::{Channel, MessageKind, Page, PageTarget},
    Envelope,
};

use crate::{fakes::FakeProviders, smtp::SmtpSink};

/// Escalation for notifier tests: a critical incident pages alice (SMS,
/// email and Slack DM at once, by the default rules), the #incidents Slack
/// channel (id C0INCIDENTS), PagerDuty service `payments` and webhook `teams`.
pub const ALL_CHANNELS: &str = r##"
route:
  policy: all
policies:
  - name: all
    levels:
      - targets: [{user: alice}, {slack_channel: C0INCIDENTS}, {pagerduty_service: payments}, {webhook: teams}]
        delay: 15m
users:
  - {name: alice, email: alice@example.com, phone: "+14155550101", slack: U01ALICE}
"##;

/// Notifier config YAML for the fakes (and `smtp`, when given), with fast
/// retries and a 1-second breaker so fault tests stay quick. (`_data_dir`
/// is no longer used: delivery records live in the KV bucket on NATS.)
pub fn config_yaml(fakes: &FakeProviders, smtp: Option<&SmtpSink>, _data_dir: &Path) -> String {
    let guard =
        "{timeout: 3s, rate_per_second: 0, breaker: {failures: 5, open_for: 1s, successes: 2}}";
    let email = match smtp {
        Some(s) => format!(
            "email:\n  host: {}\n  port: {}\n  tls: none\n  from: \"Tocsin <tocsin@example.com>\"\n  guard: {guard}\n",
            s.host(),
            s.port()
        ),
        None => String::new(),
    };
    format!(
        r#"incident_url: "https://tocsin.example.com/incidents/{{{{number}}}}"
status_page_url: https://status.example.com
concurrency: 32
ack_wait: 5s
retry: {{initial: 100ms, max: 1s, give_up_after: 1h}}
slack:
  api_url: {slack}
  token: {slack_token}
  guard: {guard}
pagerduty:
  url: {pd}
  services:
    payments: {{routing_key: {pd_key}}}
    # A 32-character key PagerDuty does not know: its events get 400.
    broken: {{routing_key: ffffffffffffffffffffffffffffffff}}
  guard: {guard}
sms:
  api_url: {twilio}
  account_sid: {sid}
  auth_token: {twilio_token}
  from: "{from}"
  guard: {guard}
webhooks:
  - name: teams
    url: {hook}
    secret: {secret}
    guard: {guard}
{email}"#,
        slack = fakes.slack_api_url(),
        slack_token = FakeProviders::SLACK_TOKEN,
        pd = fakes.pagerduty_url(),
        pd_key = FakeProviders::PD_ROUTING_KEY,
        twilio = fakes.twilio_url(),
        sid = FakeProviders::TWILIO_SID,
        twilio_token = FakeProviders::TWILIO_TOKEN,
        from = FakeProviders::TWILIO_FROM,
        hook = fakes.webhook_url("teams"),
        secret = FakeProviders::WEBHOOK_SECRET,
    )
}

/// [`config_yaml`] parsed.
pub fn config(fakes: &FakeProviders, smtp: Option<&SmtpSink>, data_dir: &Path) -> NotifierConfig {
    serde_yaml_ng::from_str(&config_yaml(fakes, smtp, data_dir)).expect("test notifier config")
}

/// A page made by hand (no incident behind it): incident number `n`, for
/// `channel`, to the fakes' known targets.
pub fn page(n: u64, channel: Channel) -> Page {
    let id = uuid::Uuid::now_v7();
    let mut inc = IncidentSummary::new(
        id,
        n,
        format!("alertname=Load{n}"),
        format!("Load test incident {n}"),
        jiff::Timestamp::now(),
    );
    inc.severity = Severity::Critical;
    inc.labels.insert("alertname".into(), format!("Load{n}"));
    let (target, address) = match channel {
        Channel::Sms => (
            PageTarget::User {
                name: "alice".into(),
                schedule: None,
            },
            format!("+1415555{:04}", n % 10_000),
        ),
        Channel::Email => (
            PageTarget::User {
                name: "alice".into(),
                schedule: None,
            },
            "alice@example.com".to_string(),
        ),
        Channel::Slack => (
            PageTarget::SlackChannel {
                channel: "C0LOAD".into(),
            },
            "C0LOAD".to_string(),
        ),
        Channel::Pagerduty => (
            PageTarget::PagerdutyService {
                service: "payments".into(),
            },
            String::new(),
        ),
        Channel::Webhook => (
            PageTarget::Webhook {
                name: "teams".into(),
            },
            String::new(),
        ),
    };
    Page {
        id: Page::make_id(&id, 0, 0, 0, &target, channel, 0),
        incident: inc,
        level: 0,
        repeat: 0,
        target,
        channel,
        address,
        reason: "load test".into(),
        due_at: jiff::Timestamp::now(),
        kind: MessageKind::Page,
    }
}

/// Publishes `pages` (all for one channel) in one NOTIFY message, as
/// escalation sends a burst's: on `tocsin.notify.<channel>.batch`, its
/// message id made of the pages' ids, `Tocsin-Items` saying how many.
pub async fn publish_batch(js: &async_nats::jetstream::Context, pages: &[Page]) {
    publish_batch_saying(js, pages, Some(pages.len())).await;
}

/// [`publish_batch`] with `Tocsin-Items` saying `items` (none: no header,
/// as a message made by hand).
pub async fn publish_batch_saying(
    js: &async_nats::jetstream::Context,
    pages: &[Page],
    items: Option<usize>,
) {
    let (subject, publish) = batch_message(pages, items);
    js.send_publish(subject, publish)
        .await
        .expect("pages sent")
        .await
        .expect("pages stored");
}

/// `pages` (all for one channel) as escalation sends a burst's to NOTIFY:
/// the subject `tocsin.notify.<channel>.batch` and the message (the
/// headers every Tocsin message carries, its id a digest of the pages'
/// ids, `Tocsin-Items` saying `items`; none: no header, as a message made
/// by hand).
pub fn batch_message(
    pages: &[Page],
    items: Option<usize>,
) -> (String, async_nats::jetstream::message::PublishMessage) {
    use sha2::Digest as _;
    let channel = pages[0].channel;
    assert!(pages.iter().all(|p| p.channel == channel), "one channel");
    let payload = codec::encode(&Envelope::new(
        "test",
        jiff::Timestamp::now(),
        pages.to_vec(),
    ))
    .expect("encode pages");
    let mut ids = sha2::Sha256::new();
    for p in pages {
        ids.update(p.id.as_bytes());
        ids.update(b"\n");
    }
    let id: String = ids.finalize()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let count = items.map(|n| n.to_string());
    let extra: Vec<(&str, &str)> = count
        .iter()
        .map(|n| (tocsin_proto::subjects::headers::ITEMS, n.as_str()))
        .collect();
    (
        tocsin_proto::subjects::notify_batch_subject(channel.as_str()),
        tocsin_runtime::bus::message(payload, format!("pages:{id}"), None, &extra),
    )
}

/// Publishes pages to NOTIFY with their ids as `Nats-Msg-Id`, all sent
/// before any acknowledgement is awaited.
pub async fn publish_pages(js: &async_nats::jetstream::Context, pages: &[Page]) {
    let mut acks = Vec::new();
    for p in pages {
        let payload = codec::encode(&Envelope::new("test", jiff::Timestamp::now(), p.clone()))
            .expect("encode page");
        let publish = async_nats::jetstream::message::PublishMessage::build()
            .payload(payload.into())
            .message_id(p.id.clone());
        acks.push(
            js.send_publish(p.subject(), publish)
                .await
                .expect("page sent"),
        );
        if acks.len() >= 256 {
            for a in acks.drain(..) {
                a.await.expect("page stored");
            }
        }
    }
    for a in acks {
        a.await.expect("page stored");
    }
}

/// A notifier running in-process on its own (no other service), as one
/// replica: its own metrics, health and data dir.
pub struct Replica {
    pub metrics: tocsin_runtime::admin::Metrics,
    pub health: tocsin_runtime::admin::Health,
    pub shutdown: tokio_util::sync::CancellationToken,
    task: Option<tokio::task::JoinHandle<Result<(), tocsin_notifier::NotifierError>>>,
}

impl Replica {
    /// Ensures the streams exist, then starts the notifier with `config`
    /// on the system clock.
    pub async fn start(nats: &crate::NatsServer, config: NotifierConfig) -> Replica {
        Self::start_with_clock(
            nats,
            config,
            std::sync::Arc::new(tocsin_runtime::clock::SystemClock),
        )
        .await
    }

    /// [`Replica::start`] with the given clock.
    pub async fn start_with_clock(
        nats: &crate::NatsServer,
        config: NotifierConfig,
        clock: std::sync::Arc<dyn tocsin_runtime::clock::Clock>,
    ) -> Replica {
        Self::start_as("admin", nats, config, clock).await
    }

    /// [`Replica::start_with_clock`] connected as `user` (`notifier`: with
    /// the shipped permissions of the notifier's NATS user).
    pub async fn start_as(
        user: &str,
        nats: &crate::NatsServer,
        config: NotifierConfig,
        clock: std::sync::Arc<dyn tocsin_runtime::clock::Clock>,
    ) -> Replica {
        Self::start_with(user, nats, config, clock, 1).await
    }

    /// [`Replica::start_as`] as the notifier's NATS user, with its streams
    /// and buckets at `replicas` (3 on a [`crate::NatsCluster`], `nats`
    /// one of its nodes).
    pub async fn start_replicated(
        nats: &crate::NatsServer,
        config: NotifierConfig,
        clock: std::sync::Arc<dyn tocsin_runtime::clock::Clock>,
        replicas: usize,
    ) -> Replica {
        Self::start_with("notifier", nats, config, clock, replicas).await
    }

    async fn start_with(
        user: &str,
        nats: &crate::NatsServer,
        config: NotifierConfig,
        clock: std::sync::Arc<dyn tocsin_runtime::clock::Clock>,
        replicas: usize,
    ) -> Replica {
        crate::init_logs();
        let jetstream = tocsin_runtime::streams::JetStreamConfig {
            replicas,
            ..Default::default()
        };
        let client = nats
            .client_as(user)
            .await
            .unwrap_or_else(|e| panic!("connect to the test nats-server as {user}: {e}"));
        let js = async_nats::jetstream::new(client);
        tocsin_runtime::streams::ensure_streams(&js, &jetstream)
            .await
            .expect("streams");
        let metrics = tocsin_runtime::admin::Metrics::new();
        let health = tocsin_runtime::admin::Health::new();
        let shutdown = tokio_util::sync::CancellationToken::new();
        let ctx = tocsin_runtime::context::ServiceContext {
            metrics: metrics.clone(),
            health: health.clone(),
            jetstream,
            shutdown: shutdown.clone(),
            ..tocsin_runtime::context::ServiceContext::standalone(js, clock)
        };
        let task = tokio::spawn(async move { tocsin_notifier::run(config, &ctx, None).await });
        Replica {
            metrics,
            health,
            shutdown,
            task: Some(task),
        }
    }

    /// Waits until it is pulling pages (its `notifier` check passes).
    pub async fn wait_ready(&self) {
        let ready = crate::eventually_within(std::time::Duration::from_secs(20), || async {
            if self.health.is_ready() {
                Ok(())
            } else {
                Err(self.health.report())
            }
        })
        .await;
        if let Err(report) = ready {
            panic!("notifier not ready: {report:?}");
        }
    }

    /// Waits until it counts `n` notifier replicas running
    /// (`tocsin_notifier_replicas`, from their beats in the KV bucket
    /// `tocsin_notifier_replicas`): from then on it paces each destination
    /// at `1/n` of its rate.
    pub async fn wait_replicas(&self, n: u64) -> Result<(), String> {
        self.wait_metric("tocsin_notifier_replicas", n).await
    }

    /// Waits (20 s at most) until the metric `name` (labels written out)
    /// is `value`.
    pub async fn wait_metric(&self, name: &str, value: u64) -> Result<(), String> {
        crate::eventually_within(std::time::Duration::from_secs(20), || async {
            let seen = self.metric(name);
            if seen == value {
                Ok(())
            } else {
                Err(format!("{name} is {seen}, not {value}, after 20 s"))
            }
        })
        .await
    }

    /// The value of `tocsin_notifications_total` for a channel and outcome.
    pub fn count(&self, channel: &str, outcome: &str) -> u64 {
        self.metric(&format!(
            "tocsin_notifications_total{{channel=\"{channel}\",outcome=\"{outcome}\"}}"
        ))
    }

    /// The value of a metric, its labels written out (0 if it is not there).
    pub fn metric(&self, name: &str) -> u64 {
        let text = self.metrics.encode();
        let key = format!("{name} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&key))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Stops it (drain) and waits.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.task.take() {
            t.await.expect("notifier task").expect("notifier ran");
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// The delivery receipts on incident `number`'s timeline, in order, once
/// `done` holds for them (panics after 20 s).
pub async fn wait_receipts(
    client: &async_nats::Client,
    number: u64,
    done: impl Fn(&[tocsin_proto::notify::Delivery]) -> bool,
) -> Vec<tocsin_proto::notify::Delivery> {
    use tocsin_proto::{command::IncidentRef, incident::EventKind};
    let done = &done;
    crate::eventually(&format!("the receipts on #{number}"), || async move {
        let detail = crate::incidents::get(client, IncidentRef::Number(number)).await;
        let receipts: Vec<_> = detail
            .timeline
            .into_iter()
            .filter_map(|e| match e.kind {
                EventKind::Delivery { delivery } => Some(delivery),
                _ => None,
            })
            .collect();
        if done(&receipts) {
            Ok(receipts)
        } else {
            Err(receipts)
        }
    })
    .await
}

/// Waits until every notifier consumer (one per channel on NOTIFY, and
/// the status-update consumer on INCIDENTS) has no page pending and none
/// unacknowledged, and NOTIFY (a work queue: a page leaves it once
/// acknowledged) holds no page any more: each page has reached its
/// outcome and its receipt is on COMMANDS, since a page is acknowledged
/// only after that. The consumers' counts alone once let a test through
/// with all 16 pages of a message delivered and none of their receipts
/// stored yet; what NOTIFY holds is changed by the acknowledgement
/// itself. Returns at once when no notifier consumer exists. Panics after
/// `limit`.
pub async fn settled(js: &async_nats::jetstream::Context, limit: std::time::Duration) {
    use futures::TryStreamExt;
    use tocsin_proto::subjects::{STREAM_INCIDENTS, STREAM_NOTIFY};
    let result = crate::eventually_within(limit, || async {
        let mut busy = Vec::new();
        for name in [STREAM_NOTIFY, STREAM_INCIDENTS] {
            let Ok(stream) = js.get_stream(name).await else {
                continue;
            };
            let infos: Vec<_> = match stream.consumers().try_collect().await {
                Ok(infos) => infos,
                Err(e) => {
                    busy.push(format!("cannot list the consumers of {name}: {e}"));
                    continue;
                }
            };
            let mut notifier_reads = false;
            for info in infos {
                let is_notifier = info.name.starts_with("tocsin-notifier");
                notifier_reads |= is_notifier;
                if is_notifier && (info.num_pending > 0 || info.num_ack_pending > 0) {
                    busy.push(format!(
                        "{}: {} pending, {} unacknowledged",
                        info.name, info.num_pending, info.num_ack_pending
                    ));
                }
            }
            if name == STREAM_NOTIFY && notifier_reads {
                match pages_left(&stream).await {
                    Ok(0) => {}
                    Ok(n) => busy.push(format!("NOTIFY: {n} messages of pages not acknowledged")),
                    Err(e) => busy.push(format!("cannot count the pages left on NOTIFY: {e}")),
                }
            }
        }
        if busy.is_empty() {
            Ok(())
        } else {
            Err(busy)
        }
    })
    .await;
    if let Err(busy) = result {
        panic!("the notifier did not settle: {busy:?}");
    }
}

/// The messages on NOTIFY other than escalation's tenure markers, which
/// no notifier reads.
async fn pages_left(
    notify: &async_nats::jetstream::stream::Stream,
) -> Result<usize, async_nats::Error> {
    use futures::TryStreamExt;
    let subjects: Vec<(String, usize)> =
        notify.info_with_subjects(">").await?.try_collect().await?;
    Ok(subjects
        .iter()
        .filter(|(subject, _)| !tocsin_proto::subjects::is_tenure_marker(subject))
        .map(|(_, n)| n)
        .sum())
}
