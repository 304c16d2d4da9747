//! Each destination's pace, shared by the notifier replicas: while more
//! than one runs, a turn for a destination is booked in the KV bucket
//! `tocsin_notifier_paces` (one key per destination holding the pace's
//! next theoretical arrival time, GCRA as in [`crate::guard::Pace`]),
//! written only over the revision read, so two replicas never book the
//! same turn. Together the replicas then send to a destination at its
//! rate with its burst, whichever replica pulled its pages: splitting the
//! rate (each replica at `1/n`) kept the limit but wasted it whenever the
//! pages did not split evenly, and a burst of pages usually lands on the
//! replica that pulled first.
//!
//! One replica alone books in memory ([`crate::lanes`]), with no round
//! trip. The bucket is in memory (a turn is worth nothing after a NATS
//! restart) and forgets a destination an hour after its last booking; a
//! 429's `Retry-After` is written there too, so the other replicas hold
//! back as well. Times are the replicas' clocks: replicas on hosts whose
//! clocks differ by `d` may send up to `d` early on each other's turns.
//! When a second replica starts (or the last other one stops) the turns a
//! replica booked in memory are not in the bucket (or the other way
//! round): a destination may get up to one burst early then, and a 429
//! holds it back.

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use jiff::Timestamp;
use sha2::{Digest, Sha256};
use tocsin_runtime::kv::{read_checked, write_checked, WriteError};

use crate::guard::Pace;

/// The bucket's name (its stream is `KV_tocsin_notifier_paces`).
pub(crate) const BUCKET: &str = "tocsin_notifier_paces";

/// How long a destination's pace is kept after its last booking (far
/// beyond any turn booked ahead: `max_hold`, a `Retry-After`).
const KEPT: Duration = Duration::from_secs(3600);

/// At most this much memory on the server (a key and its time take about
/// 150 bytes: some 100,000 destinations an hour). Full, a booking fails
/// and the replica books in memory at its share of the rate.
const MAX_BYTES: i64 = 16 * 1024 * 1024;

/// Bookings that lost the race to another replica, retried at once, at
/// most this many times. Each loss is another replica's booking made, so
/// many in a row mean the others are busy with the same destination (a
/// burst for it), not that the bucket fails: on a 3-node cluster a
/// replica near the stream leader won 16 in a row during a burst of 20
/// pages, and the other then booked alone, at its share of the rate on
/// top of the whole rate. What bounds the time is the caller's
/// `notifier.shared_booking_timeout`; this only bounds the count.
const TRIES: usize = 4096;

pub(crate) struct SharedPaces {
    kv: kv::Store,
}

/// The bucket (created if needed).
pub(crate) async fn open(js: &jetstream::Context, replicas: usize) -> Result<SharedPaces, String> {
    let kv = tocsin_runtime::kv::open_or_create(
        js,
        kv::Config {
            bucket: BUCKET.into(),
            description: "Tocsin notifier: each destination's next turn, booked by every replica"
                .into(),
            history: 1,
            max_age: KEPT,
            max_bytes: MAX_BYTES,
            storage: jetstream::stream::StorageType::Memory,
            num_replicas: replicas.max(1),
            ..Default::default()
        },
    )
    .await?;
    Ok(SharedPaces { kv })
}

/// The key of `provider`'s `destination`: a digest, since destinations
/// (addresses, URLs, channel names) hold characters keys cannot.
fn key(provider: &str, destination: &str) -> String {
    let mut h = Sha256::new();
    h.update(provider.as_bytes());
    h.update([0]);
    h.update(destination.as_bytes());
    hex::encode(&h.finalize()[..16])
}

impl SharedPaces {
    /// Books the next turn of `provider`'s `destination` at `pace` (its
    /// whole rate and burst): `Ok(Ok(wait))` booked, `Ok(Err(wait))` not
    /// booked (the turn is further than `max_wait`), `Err` the bucket
    /// could not be used.
    pub(crate) async fn book(
        &self,
        provider: &str,
        destination: &str,
        pace: &Pace,
        now: Timestamp,
        max_wait: Duration,
    ) -> Result<Result<Duration, Duration>, String> {
        let key = key(provider, destination);
        self.change(&key, |tat| pace.book(tat, now, max_wait)).await
    }

    /// The provider asked `provider`'s `destination` to wait until `until`.
    pub(crate) async fn hold_until(
        &self,
        provider: &str,
        destination: &str,
        pace: &Pace,
        until: Timestamp,
    ) -> Result<(), String> {
        let key = key(provider, destination);
        self.change(&key, |tat| {
            Ok::<_, std::convert::Infallible>(((), pace.held(tat, until)))
        })
        .await
        .map(|_| ())
    }

    /// Reads the destination's time, asks `next` for the new one and
    /// writes it over exactly the revision read; again on a conflict.
    async fn change<T, E>(
        &self,
        key: &str,
        next: impl Fn(Option<Timestamp>) -> Result<(T, Timestamp), E>,
    ) -> Result<Result<T, E>, String> {
        until_not_lost(TRIES, || async {
            let (tat, revision) = match read_checked(&self.kv, key)
                .await
                .map_err(|e| format!("cannot read {BUCKET}: {e}"))?
            {
                Some((value, revision)) => (value.as_deref().and_then(decode), Some(revision)),
                None => (None, None),
            };
            let (out, tat) = match next(tat) {
                Ok(x) => x,
                Err(e) => return Ok(Some(Err(e))),
            };
            match write_checked(&self.kv, key, encode(tat), revision).await {
                Ok(_) => Ok(Some(Ok(out))),
                Err(WriteError::Conflict) => Ok(None),
                Err(WriteError::Failed(e)) => Err(format!("cannot write to {BUCKET}: {e}")),
            }
        })
        .await
    }
}

/// Runs `attempt` until it is not lost to another replica (`Ok(None)`),
/// at most `tries` times.
async fn until_not_lost<T, F, Fut>(tries: usize, mut attempt: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>, String>>,
{
    for _ in 0..tries {
        if let Some(done) = attempt().await? {
            return Ok(done);
        }
    }
    Err(format!(
        "{BUCKET}: {tries} bookings in a row lost to other replicas"
    ))
}

/// A time as nanoseconds since the Unix epoch, in decimal.
fn encode(t: Timestamp) -> Vec<u8> {
    t.as_nanosecond().to_string().into_bytes()
}

/// [`encode`]'s reverse; anything else counts as no booking.
fn decode(bytes: &[u8]) -> Option<Timestamp> {
    let n: i128 = std::str::from_utf8(bytes).ok()?.parse().ok()?;
    Timestamp::from_nanosecond(n).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_valid_kv_keys_and_differ_by_provider_and_destination() {
        let a = key("slack", "C0INCIDENTS");
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()), "{a}");
        assert_ne!(a, key("slack", "C0OTHER"));
        assert_ne!(a, key("webhook:teams", "C0INCIDENTS"));
        assert_ne!(key("ab", "c"), key("a", "bc"));
    }

    /// Another replica booking the same destination 20 times while this
    /// one tries (a burst of pages for it) is no failure: the booking is
    /// made once the others let it, not alone at this replica's share.
    #[tokio::test]
    async fn a_booking_lost_to_a_burst_of_the_other_replicas_is_still_made() {
        let mut lost = 0;
        let booked = until_not_lost(TRIES, || {
            lost += 1;
            let done = (lost > 20).then_some("booked");
            async move { Ok(done) }
        })
        .await;
        assert_eq!(booked, Ok("booked"));
        let mut tried = 0;
        let never = until_not_lost::<(), _, _>(TRIES, || {
            tried += 1;
            async { Ok(None) }
        })
        .await;
        assert!(never.is_err(), "bounded: {never:?}");
        assert_eq!(tried, TRIES);
        let failed = until_not_lost::<(), _, _>(TRIES, || async { Err("down".to_string()) }).await;
        assert_eq!(failed, Err("down".to_string()), "a failure is not retried");
    }

    #[test]
    fn times_round_trip_and_garbage_is_no_booking() {
        let t = Timestamp::from_nanosecond(1_800_000_000_123_456_789).unwrap();
        assert_eq!(decode(&encode(t)), Some(t));
        assert_eq!(decode(b"soon"), None);
    }
}
