//! How many notifier replicas are running, so that together they keep each
//! destination's rate limit (`guard.rate_per_second` is the provider's
//! limit, not each replica's).
//!
//! Every replica puts its own key (a random id per start) into the KV bucket
//! `tocsin_notifier_replicas` every [`BEAT`]. The bucket keeps one value per
//! key (history 1) for three beats (`max_age`), so its message count is the
//! number of replicas that beat within that time, by the NATS server's
//! clock alone: a replica that dies drops out of the count within three
//! beats, one that stops purges its key ([`leave`]) and drops out at the
//! others' next beat, one that starts is counted at its first beat. While the
//! count is above one the replicas book every destination's turns together
//! ([`crate::paces`], opened here beside this bucket); where that bucket
//! does not answer, each paces a destination at `1/n` of its rate and
//! burst ([`crate::guard::Pace::share`]). The count errs high for a moment
//! (a replica just gone is still counted), never low once every replica
//! has beaten, so together they stay under the limit; the cost is a round
//! trip per turn (or, on the fallback, a slower pace) for up to three
//! beats after the last other replica goes. Both buckets live in memory:
//! they are rebuilt by the next beats after a NATS restart.
//!
//! While NATS cannot be reached the last count stays in force.

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use tokio_util::sync::CancellationToken;

use crate::lanes::Lanes;

/// The bucket's name (its stream is `KV_tocsin_notifier_replicas`).
pub(crate) const BUCKET: &str = "tocsin_notifier_replicas";

/// How often each replica says it is running.
pub(crate) const BEAT: Duration = Duration::from_secs(2);

/// How long a beat counts: the bucket's `max_age`.
const KEPT: Duration = Duration::from_secs(6);

/// The bucket (created if needed) and its stream, whose message count is
/// the count of replicas.
struct Bucket {
    kv: kv::Store,
    stream: jetstream::stream::Stream,
}

/// Opens the bucket of shared paces and hands it to `lanes`; false (said
/// once, in `failing`) if it cannot be opened, e.g. under a NATS user whose
/// permissions predate it: the replicas are still counted, and each paces
/// a destination at its share of the rate.
async fn open_paces(
    js: &jetstream::Context,
    lanes: &Lanes,
    replicas: usize,
    failing: &mut Option<String>,
) -> bool {
    let error = match tokio::time::timeout(BEAT, crate::paces::open(js, replicas)).await {
        Ok(Ok(paces)) => {
            lanes.set_shared(std::sync::Arc::new(paces));
            *failing = None;
            return true;
        }
        Ok(Err(e)) => e,
        Err(_) => format!("no answer opening {} within {BEAT:?}", crate::paces::BUCKET),
    };
    if news(failing, &error) {
        tracing::warn!(error = %error, "cannot open the notifier replicas' shared paces; each replica paces a destination at its share of the rate until it can");
    }
    false
}

/// Whether `error` is not what `last` already said (a failure that goes
/// on is logged once); `last` becomes it.
fn news(last: &mut Option<String>, error: &str) -> bool {
    if last.as_deref() == Some(error) {
        return false;
    }
    *last = Some(error.to_string());
    true
}

async fn open(js: &jetstream::Context, replicas: usize) -> Result<Bucket, String> {
    let kv = tocsin_runtime::kv::open_or_create(
        js,
        kv::Config {
            bucket: BUCKET.into(),
            description: "Tocsin notifier: the replicas running (one key each, kept three beats)"
                .into(),
            history: 1,
            max_age: KEPT,
            storage: jetstream::stream::StorageType::Memory,
            num_replicas: replicas.max(1),
            ..Default::default()
        },
    )
    .await?;
    let stream = js
        .get_stream(format!("KV_{BUCKET}"))
        .await
        .map_err(|e| format!("cannot open the stream of {BUCKET}: {e}"))?;
    Ok(Bucket { kv, stream })
}

/// One beat: says this replica is running, and counts the replicas that are
/// (the stream's messages, asked afresh: one per key that beat within
/// `max_age`).
async fn beat(b: &mut Bucket, id: &str) -> Result<u64, String> {
    b.kv.put(id, "1".into())
        .await
        .map_err(|e| format!("cannot write to {BUCKET}: {e}"))?;
    let info = b
        .stream
        .info()
        .await
        .map_err(|e| format!("cannot read {BUCKET}: {e}"))?;
    Ok(info.state.messages)
}

/// This replica stops: its key leaves the bucket (the subject purged, so
/// no delete marker is left to be counted), and the others count one less
/// at their next beat instead of three beats later.
async fn leave(b: &Bucket, id: &str) {
    let subject = format!("$KV.{BUCKET}.{id}");
    let purge = async { b.stream.purge().filter(subject).await };
    match tokio::time::timeout(BEAT, purge).await {
        Ok(Ok(_)) => tracing::debug!("left the count of notifier replicas"),
        Ok(Err(e)) => {
            tracing::info!(error = %e, "cannot leave the count of notifier replicas; it drops out within three beats")
        }
        Err(_) => tracing::info!(
            "no answer leaving the count of notifier replicas; it drops out within three beats"
        ),
    }
}

/// Beats every [`BEAT`] and sets the share of `lanes` until `shutdown`.
pub(crate) async fn run(
    js: jetstream::Context,
    lanes: &Lanes,
    stream_replicas: usize,
    shutdown: CancellationToken,
) {
    let id = uuid::Uuid::now_v7().simple().to_string();
    let mut store: Option<Bucket> = None;
    let mut seen = 1u32;
    let mut failing: Option<String> = None;
    // The shared paces: opened once the replicas can be counted, again
    // after the count failed (the in-memory bucket may have gone with NATS).
    let mut paces_open = false;
    let mut paces_failing: Option<String> = None;
    loop {
        let counted = async {
            let b = match &mut store {
                Some(b) => b,
                None => store.insert(open(&js, stream_replicas).await?),
            };
            beat(b, &id).await
        };
        // Not cut short by `shutdown`: a put already sent could reach the
        // stream after `leave` purged the key (JetStream takes the API
        // request and the message on separate queues) and count this
        // replica three beats longer.
        let counted = tokio::time::timeout(BEAT, counted).await;
        if shutdown.is_cancelled() {
            break;
        }
        match counted {
            Ok(Ok(n)) => {
                // At least this replica, whatever the count says.
                let n = u32::try_from(n).unwrap_or(u32::MAX).max(1);
                if n != seen {
                    tracing::info!(
                        replicas = n,
                        "notifier replicas running: {n} (more than one: they book each destination's turns together)"
                    );
                    seen = n;
                }
                failing = None;
                // The shared paces first: sharing the count before them would
                // have the replica book alone at its share until they open.
                if !paces_open {
                    paces_open = tokio::select! {
                        _ = shutdown.cancelled() => break,
                        opened = open_paces(&js, lanes, stream_replicas, &mut paces_failing) => opened,
                    };
                }
                lanes.set_replicas(n);
            }
            Ok(Err(e)) => {
                if news(&mut failing, &e) {
                    tracing::warn!(error = %e, replicas = seen, "cannot count the notifier replicas; keeping the last count");
                }
                // Reopened next time (the bucket may have gone with NATS).
                store = None;
                paces_open = false;
            }
            Err(_) => {
                tracing::debug!(replicas = seen, "counting the notifier replicas timed out");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(BEAT) => {}
        }
    }
    // Reopened if the last beat failed, so the key still leaves.
    let bucket = match store {
        Some(b) => Some(b),
        None => tokio::time::timeout(BEAT, open(&js, stream_replicas))
            .await
            .ok()
            .and_then(Result::ok),
    };
    if let Some(b) = &bucket {
        leave(b, &id).await;
    }
}
