//! The loops: pages from NOTIFY (a durable work-queue consumer every
//! replica shares), and incident changes from INCIDENTS (a second durable
//! consumer, one event at a time across replicas) that update what was sent.

use std::{sync::Arc, time::Duration};

use async_nats::{
    jetstream::{
        self,
        consumer::{pull, AckPolicy, DeliverPolicy},
        message::PublishMessage,
        AckKind,
    },
    HeaderMap,
};
use futures::StreamExt;
use tocsin_proto::{
    codec::{self, decode_envelope},
    command::{Action, Command, IncidentRef},
    incident::{Actor, EventKind, IncidentEvent, IncidentStatus, IncidentSummary, LogEntry},
    notify::{Channel, Delivery, DeliveryOutcome, MessageKind, Page, PageTarget, ProviderRef},
    subjects::{self, headers, STREAM_INCIDENTS, STREAM_NOTIFY},
    Envelope,
};
use tocsin_runtime::admin::Health;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::{
    channels::Outgoing,
    config::SlackMode,
    deliver::{Deliverer, Step},
    templates::{short_time, Context, EventView, IncidentView, PageView, TocsinView},
};

/// The durable consumer every replica shares for pages.
pub const PAGES_CONSUMER: &str = "tocsin-notifier";
/// The durable consumer for incident changes.
pub const SYNC_CONSUMER: &str = "tocsin-notifier-sync";

pub(crate) struct Shared {
    pub(crate) d: Deliverer,
    pub(crate) js: jetstream::Context,
    pub(crate) ack_wait: Duration,
    pub(crate) incidents: tokio::sync::OnceCell<jetstream::stream::Stream>,
}

impl Shared {
    fn context(
        &self,
        inc: &tocsin_proto::incident::IncidentSummary,
        kind: MessageKind,
        page: PageView,
        actor: Option<String>,
        note: Option<String>,
        at: jiff::Timestamp,
    ) -> Context {
        Context {
            incident: IncidentView::new(inc, self.d.incident_url.as_deref()),
            page,
            event: EventView {
                kind: kind.as_str().into(),
                actor,
                at: at.to_string(),
                note,
                next_update: if kind == MessageKind::StatusUpdate {
                    at.checked_add(jiff::SignedDuration::from_mins(30))
                        .ok()
                        .map(short_time)
                } else {
                    None
                },
            },
            tocsin: TocsinView {
                status_page: self.d.status_page.clone(),
                reply_to: self.d.reply_to.clone(),
            },
        }
    }

    pub(crate) fn outgoing_for_page(&self, page: Page) -> Outgoing {
        let target = target_name(&page.target);
        let view = PageView {
            level: page.level + 1,
            repeat: page.repeat,
            reason: page.reason.clone(),
            target: target.clone(),
            address: page.address.clone(),
        };
        let ctx = self.context(&page.incident, page.kind, view, None, None, page.due_at);
        Outgoing {
            id: page.id.clone(),
            kind: page.kind,
            channel: page.channel,
            incident: page.incident.clone(),
            address: page.address.clone(),
            target,
            reference: None,
            ctx,
            page: Some(page),
        }
    }

    /// Publishes a receipt as a `delivery` command (the incidents service
    /// puts it on the timeline), until JetStream takes it.
    async fn publish_receipt(
        &self,
        incident: uuid::Uuid,
        receipt: &Delivery,
        shutdown: &CancellationToken,
    ) -> bool {
        let cmd = Command {
            id: format!("dlv:{}:{}", receipt.id, receipt.outcome.as_str()),
            actor: Actor::new("notifier", "tocsin"),
            action: Action::Delivery {
                incident: IncidentRef::Id(incident),
                delivery: receipt.clone(),
            },
        };
        let payload = match codec::encode(&Envelope::new(
            "notifier",
            jiff::Timestamp::now(),
            cmd.clone(),
        )) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "cannot encode a receipt");
                return true;
            }
        };
        let mut delay = Duration::from_millis(100);
        loop {
            let mut h = HeaderMap::new();
            h.insert(
                headers::SCHEMA,
                tocsin_proto::SCHEMA_VERSION.to_string().as_str(),
            );
            let publish = PublishMessage::build()
                .payload(payload.clone().into())
                .headers(h)
                .message_id(cmd.id.clone());
            let r = match self.js.send_publish(cmd.subject(), publish).await {
                Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match r {
                Ok(()) => return true,
                Err(e) => tracing::warn!(error = %e, "cannot publish a delivery receipt; retrying"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return false,
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(2));
        }
    }

    /// The incident as it is now: its last entry on INCIDENTS (None when
    /// it cannot be read; the page is then sent).
    async fn incident_now(&self, id: uuid::Uuid) -> Option<IncidentSummary> {
        let stream = self
            .incidents
            .get_or_try_init(|| self.js.get_stream(STREAM_INCIDENTS))
            .await
            .ok()?;
        let msg = stream
            .get_last_raw_message_by_subject(&format!("tocsin.incidents.inc.{}.>", id.simple()))
            .await
            .ok()?;
        match decode_envelope::<LogEntry>(&msg.payload) {
            Ok(Envelope {
                body: LogEntry::Incident(ev),
                ..
            }) => Some(ev.incident),
            _ => None,
        }
    }

    /// Why a page that waited (a backlog, a provider outage) should no
    /// longer be sent: nobody is woken for an incident that is over.
    async fn stale(&self, page: &Page) -> Option<String> {
        let now = self.incident_now(page.incident.id).await?;
        let n = now.number;
        if now.status == IncidentStatus::Resolved {
            return Some(format!(
                "incident #{n} was resolved before this page could be sent"
            ));
        }
        if let Some(why) = &now.suppressed {
            return Some(format!("incident #{n} pages nobody now ({why})"));
        }
        if now.status == IncidentStatus::Acknowledged && page.kind == MessageKind::Page {
            let by = now
                .acknowledged_by
                .as_ref()
                .map(|a| format!(" by {}", a.name))
                .unwrap_or_default();
            return Some(format!(
                "incident #{n} was acknowledged{by} before this page could be sent"
            ));
        }
        None
    }

    /// Runs one delivery to its end or to "later"; publishes the receipt.
    /// Returns the delay for a redelivery, or None when done.
    async fn deliver(
        &self,
        out: &Outgoing,
        redelivered: bool,
        shutdown: &CancellationToken,
    ) -> Option<Duration> {
        let skip = match &out.page {
            Some(p) => self.stale(p).await,
            None => None,
        };
        match self.d.process(out, redelivered, skip).await {
            Step::Later(d) => Some(d),
            Step::Done { record, receipt } => {
                if !record.receipt_published {
                    if !self
                        .publish_receipt(out.incident.id, &receipt, shutdown)
                        .await
                    {
                        return Some(Duration::from_secs(1));
                    }
                    self.d.receipt_published(&out.id, record).await;
                }
                None
            }
        }
    }

    async fn dead_letter(&self, msg: &jetstream::Message, reason: &str) {
        let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
        // One attempt: if it fails the message is acked anyway (it can never
        // be processed), and the error below says so.
        if let Err(e) = tocsin_runtime::streams::dead_letter(
            &self.js,
            STREAM_NOTIFY,
            msg.subject.as_str(),
            msg.payload.clone(),
            seq,
            reason,
        )
        .await
        {
            tracing::warn!(error = %e, "cannot dead-letter a message");
        }
        self.d.metrics.dead_letters.inc();
        tracing::error!(
            seq,
            reason,
            "undecodable NOTIFY message moved to the dead-letter stream"
        );
    }
}

/// `alice`, `#ops`, `payments`, `teams`.
fn target_name(t: &PageTarget) -> String {
    match t {
        PageTarget::User { name, .. } => name.clone(),
        PageTarget::SlackChannel { channel } => channel.clone(),
        PageTarget::PagerdutyService { service } => service.clone(),
        PageTarget::Webhook { name } => name.clone(),
    }
}

/// Tells JetStream the message is still being worked on, so a slow
/// provider does not get it redelivered to another replica meanwhile.
fn keep_alive(msg: &jetstream::Message, ack_wait: Duration) -> tokio::task::JoinHandle<()> {
    let (client, reply) = (msg.context.client(), msg.reply.clone());
    tokio::spawn(async move {
        let Some(reply) = reply else { return };
        let every = (ack_wait / 3).max(Duration::from_millis(200));
        loop {
            tokio::time::sleep(every).await;
            let _ = client.publish(reply.clone(), "+WPI".into()).await;
        }
    })
}

async fn finish(msg: &jetstream::Message, later: Option<Duration>) {
    let r = match later {
        None => msg.double_ack().await,
        Some(d) => msg.ack_with(AckKind::Nak(Some(d))).await,
    };
    if let Err(e) = r {
        tracing::warn!(error = %e, "cannot acknowledge a message; it will be redelivered and found in the delivery records");
    }
}

async fn handle_page(s: Arc<Shared>, msg: jetstream::Message, shutdown: CancellationToken) {
    let redelivered = msg.info().map(|i| i.delivered > 1).unwrap_or(false);
    let page = match decode_envelope::<Page>(&msg.payload) {
        Ok(env) => env.body,
        Err(e) => {
            s.dead_letter(&msg, &format!("not a page: {e}")).await;
            finish(&msg, None).await;
            return;
        }
    };
    let alive = keep_alive(&msg, s.ack_wait);
    let out = s.outgoing_for_page(page);
    let later = s.deliver(&out, redelivered, &shutdown).await;
    alive.abort();
    finish(&msg, later).await;
}

/// Pulls from a durable consumer, creating it if needed; retries until NATS
/// and the stream are there (None once `shutdown` is cancelled).
async fn pull_from(
    js: &jetstream::Context,
    stream: &str,
    config: &pull::Config,
    batch: usize,
    shutdown: &CancellationToken,
) -> Option<pull::Stream> {
    let open = || async {
        let name = config.durable_name.clone().unwrap_or_default();
        js.get_stream(stream)
            .await
            .map_err(|e| e.to_string())?
            .get_or_create_consumer(&name, config.clone())
            .await
            .map_err(|e| e.to_string())?
            .stream()
            .max_messages_per_batch(batch)
            .heartbeat(Duration::from_secs(5))
            .expires(Duration::from_secs(30))
            .messages()
            .await
            .map_err(|e| e.to_string())
    };
    let mut delay = Duration::from_millis(100);
    loop {
        match open().await {
            Ok(m) => return Some(m),
            Err(e) => tracing::debug!(error = %e, stream, "consumer not available yet; retrying"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

/// What a consumer loop does next.
enum Next {
    Message(Box<jetstream::Message>),
    /// The consumer went away (deleted, stream ended): open it again.
    Reopen,
    Stop,
}

/// The next message; transient errors are logged and skipped, never the
/// silent end of the loop.
async fn next(messages: &mut pull::Stream, what: &str, shutdown: &CancellationToken) -> Next {
    loop {
        let m = tokio::select! {
            _ = shutdown.cancelled() => return Next::Stop,
            m = messages.next() => m,
        };
        match m {
            Some(Ok(msg)) => return Next::Message(Box::new(msg)),
            Some(Err(e)) => {
                tracing::warn!(error = %e, consumer = what, "consumer error");
                if matches!(e.kind(), pull::MessagesErrorKind::ConsumerDeleted) {
                    return Next::Reopen;
                }
            }
            None => return Next::Reopen,
        }
    }
}

/// Pages: many at a time, each in its own task, up to `concurrency`.
pub(crate) async fn run_pages(
    s: Arc<Shared>,
    concurrency: usize,
    health: Health,
    shutdown: CancellationToken,
) {
    let sem = Arc::new(Semaphore::new(concurrency));
    let config = pull::Config {
        durable_name: Some(PAGES_CONSUMER.into()),
        description: Some("Tocsin notifier: pages to deliver (shared by replicas)".into()),
        ack_policy: AckPolicy::Explicit,
        ack_wait: s.ack_wait,
        max_deliver: -1,
        max_ack_pending: (concurrency * 4) as i64,
        filter_subject: subjects::NOTIFY_SUBJECTS.into(),
        ..Default::default()
    };
    'open: while let Some(mut messages) = pull_from(
        &s.js,
        STREAM_NOTIFY,
        &config,
        concurrency.min(256),
        &shutdown,
    )
    .await
    {
        health.set_ok("notifier");
        loop {
            let permit = tokio::select! {
                _ = shutdown.cancelled() => break 'open,
                p = sem.clone().acquire_owned() => p.expect("semaphore open"),
            };
            match next(&mut messages, PAGES_CONSUMER, &shutdown).await {
                Next::Message(msg) => {
                    let (s, stop) = (s.clone(), shutdown.clone());
                    tokio::spawn(async move {
                        handle_page(s, *msg, stop).await;
                        drop(permit);
                    });
                }
                Next::Reopen => continue 'open,
                Next::Stop => break 'open,
            }
        }
    }
    // Let deliveries in flight finish (the app's grace period bounds this).
    let _ = sem.acquire_many(concurrency as u32).await;
}

/// Incident changes: one at a time (across replicas too), so a message is
/// never left showing an older state than the incident's.
pub(crate) async fn run_sync(s: Arc<Shared>, shutdown: CancellationToken) {
    let config = pull::Config {
        durable_name: Some(SYNC_CONSUMER.into()),
        description: Some(
            "Tocsin notifier: incident changes that update messages already sent".into(),
        ),
        ack_policy: AckPolicy::Explicit,
        ack_wait: s.ack_wait,
        max_deliver: -1,
        max_ack_pending: 1,
        // From now on: what happened before the notifier first ran was
        // never sent by it.
        deliver_policy: DeliverPolicy::New,
        filter_subjects: [
            "acknowledged",
            "unacknowledged",
            "resolved",
            "note_added",
            "delivery",
        ]
        .iter()
        .map(|k| format!("tocsin.incidents.inc.*.{k}"))
        .collect(),
        ..Default::default()
    };
    'open: while let Some(mut messages) =
        pull_from(&s.js, STREAM_INCIDENTS, &config, 1, &shutdown).await
    {
        loop {
            match next(&mut messages, SYNC_CONSUMER, &shutdown).await {
                Next::Message(msg) => {
                    let alive = keep_alive(&msg, s.ack_wait);
                    let later = handle_change(&s, &msg, &shutdown).await;
                    alive.abort();
                    finish(&msg, later).await;
                }
                Next::Reopen => continue 'open,
                Next::Stop => break 'open,
            }
        }
    }
}

/// The messages sent for an incident, from its `delivery` entries on the
/// INCIDENTS stream (shared by every replica, unlike a local store).
async fn sent_messages(
    js: &jetstream::Context,
    incident: uuid::Uuid,
) -> Result<Vec<Delivery>, String> {
    let filter = subjects::incident_subject(&incident, "delivery");
    let msgs = tocsin_runtime::streams::read_matching(js, STREAM_INCIDENTS, filter).await?;
    Ok(msgs
        .iter()
        .filter_map(|m| match decode_envelope::<LogEntry>(&m.payload) {
            Ok(Envelope {
                body: LogEntry::Incident(ev),
                ..
            }) => match ev.kind {
                EventKind::Delivery { delivery } => Some(delivery),
                _ => None,
            },
            _ => None,
        })
        .collect())
}

/// What a change means for messages already sent.
fn update_kind(kind: &EventKind) -> Option<MessageKind> {
    match kind {
        EventKind::Acknowledged => Some(MessageKind::Acknowledged),
        EventKind::Resolved { .. } => Some(MessageKind::Resolved),
        // The message shows the incident open again (with its buttons).
        EventKind::Unacknowledged => Some(MessageKind::Page),
        EventKind::NoteAdded { .. } => Some(MessageKind::StatusUpdate),
        _ => None,
    }
}

fn status_kind(s: IncidentStatus) -> MessageKind {
    match s {
        IncidentStatus::Triggered => MessageKind::Page,
        IncidentStatus::Acknowledged => MessageKind::Acknowledged,
        IncidentStatus::Resolved => MessageKind::Resolved,
    }
}

async fn handle_change(
    s: &Arc<Shared>,
    msg: &jetstream::Message,
    shutdown: &CancellationToken,
) -> Option<Duration> {
    let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
    let ev: IncidentEvent = match decode_envelope::<LogEntry>(&msg.payload) {
        Ok(Envelope {
            body: LogEntry::Incident(ev),
            ..
        }) => ev,
        _ => return None, // not ours to judge; the incidents service wrote it
    };
    let actor = ev.actor.as_ref().map(|a| a.name.clone());
    let mut updates: Vec<(MessageKind, Delivery)> = Vec::new();
    let note = match &ev.kind {
        EventKind::NoteAdded { text } => Some(text.clone()),
        _ => None,
    };
    match &ev.kind {
        EventKind::Delivery { delivery } => {
            // A page delivered after the incident changed shows its state now.
            let late = delivery.outcome == DeliveryOutcome::Sent
                && matches!(delivery.kind, MessageKind::Page | MessageKind::Reminder)
                && ev.incident.status != IncidentStatus::Triggered;
            if late {
                updates.push((status_kind(ev.incident.status), delivery.clone()));
            }
        }
        kind => {
            let k = update_kind(kind)?;
            let sent = match sent_messages(&s.js, ev.incident.id).await {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read what was sent for an incident; retrying");
                    return Some(Duration::from_secs(1));
                }
            };
            for d in sent {
                if d.outcome == DeliveryOutcome::Sent
                    && matches!(d.kind, MessageKind::Page | MessageKind::Reminder)
                {
                    updates.push((k, d));
                }
            }
        }
    }
    let mut later: Option<Duration> = None;
    let mut seen = std::collections::BTreeSet::new();
    for (kind, d) in updates {
        let Some(out) = s.update_for(&ev, seq, kind, &d, actor.clone(), note.clone()) else {
            continue;
        };
        if !seen.insert(out.id.clone()) {
            continue;
        }
        if let Some(delay) = s.deliver(&out, false, shutdown).await {
            later = Some(later.map_or(delay, |l| l.min(delay)));
        }
    }
    later
}

impl Shared {
    /// The update of one sent message, if that channel takes updates.
    fn update_for(
        &self,
        ev: &IncidentEvent,
        seq: u64,
        kind: MessageKind,
        d: &Delivery,
        actor: Option<String>,
        note: Option<String>,
    ) -> Option<Outgoing> {
        let provider = d.provider.clone()?;
        let (channel, key, target) = match (&provider, kind) {
            (ProviderRef::SlackMessage { channel, ts }, _) => (
                Channel::Slack,
                format!("slack:{channel}:{ts}"),
                d.target.clone(),
            ),
            // A webhook cannot edit: one new message per change, not per page.
            (ProviderRef::SlackWebhook, MessageKind::Page) => return None,
            (ProviderRef::SlackWebhook, _) => {
                if self.d.slack_mode() != Some(SlackMode::Webhook) {
                    return None;
                }
                (
                    Channel::Slack,
                    "slack-webhook".to_string(),
                    d.target.clone(),
                )
            }
            (
                ProviderRef::Pagerduty { service, .. },
                MessageKind::Acknowledged | MessageKind::Resolved,
            ) => (Channel::Pagerduty, format!("pd:{service}"), service.clone()),
            (ProviderRef::Pagerduty { .. }, _) => return None,
            (ProviderRef::Webhook { .. }, MessageKind::Page) => return None,
            (ProviderRef::Webhook { .. }, _) => {
                if !self.d.webhook_wants_updates(&d.target) {
                    return None;
                }
                (
                    Channel::Webhook,
                    format!("hook:{}", d.target),
                    d.target.clone(),
                )
            }
            // Email gets status updates, in the page's thread.
            (ProviderRef::Email { to, .. }, MessageKind::StatusUpdate) if !to.is_empty() => {
                (Channel::Email, format!("email:{to}"), d.target.clone())
            }
            (ProviderRef::Sms { .. } | ProviderRef::Email { .. }, _) => return None,
        };
        let address = match &provider {
            ProviderRef::Email { to, .. } => to.clone(),
            _ => String::new(),
        };
        let view = PageView {
            level: 0,
            repeat: 0,
            reason: match kind {
                MessageKind::Page => "the acknowledgement was withdrawn".into(),
                _ => String::new(),
            },
            target: target.clone(),
            address: String::new(),
        };
        let ctx = self.context(&ev.incident, kind, view, actor, note, ev.at);
        Some(Outgoing {
            id: format!("upd:{}:{seq}:{key}", kind.as_str()),
            kind,
            channel,
            incident: ev.incident.clone(),
            target,
            address,
            reference: Some(provider),
            page: None,
            ctx,
        })
    }
}
