//! Records in JetStream KV that several replicas share: a write either
//! creates a key that must not exist yet or replaces the exact revision the
//! writer read, so two replicas can never both claim the same record.

use async_nats::jetstream::{
    self,
    kv::{self, CreateErrorKind, UpdateErrorKind},
};

/// The KV bucket `config.bucket`, created with `config` if it does not
/// exist yet (an existing bucket is used as it is).
pub async fn open_or_create(
    js: &jetstream::Context,
    config: kv::Config,
) -> Result<kv::Store, String> {
    if let Ok(kv) = js.get_key_value(&config.bucket).await {
        return Ok(kv);
    }
    let name = config.bucket.clone();
    js.create_key_value(config)
        .await
        .map_err(|e| format!("cannot create the KV bucket {name}: {e}"))
}

/// Why a write did not happen.
#[derive(Debug)]
pub enum WriteError {
    /// Someone else changed (or created) the record since it was read.
    Conflict,
    /// NATS did not take it (down, slow, full): try again later.
    Failed(String),
}

impl std::fmt::Display for WriteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WriteError::Conflict => write!(f, "changed by another replica"),
            WriteError::Failed(e) => write!(f, "{e}"),
        }
    }
}

/// `key`'s value (None: deleted) and revision, for a [`write_checked`]
/// over it; None if it was never written. Read from the stream's leader
/// (`STREAM.MSG.GET`): `kv::Store::entry` uses a direct get, which any
/// replica of a clustered bucket may answer before it has the last write,
/// and a write over that stale revision is refused and must be tried
/// again.
pub async fn read_checked(
    store: &kv::Store,
    key: &str,
) -> Result<Option<(Option<Vec<u8>>, u64)>, String> {
    use jetstream::stream::LastRawMessageErrorKind;
    let subject = format!("{}{key}", store.prefix);
    match store.stream.get_last_raw_message_by_subject(&subject).await {
        Ok(m) => {
            let deleted = m
                .headers
                .get("KV-Operation")
                .is_some_and(|op| matches!(op.as_str(), "DEL" | "PURGE"));
            Ok(Some(((!deleted).then(|| m.payload.to_vec()), m.sequence)))
        }
        Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

/// Creates `key` (`revision` None: it must not exist) or replaces the
/// `revision` read; the new revision.
pub async fn write_checked(
    store: &kv::Store,
    key: &str,
    bytes: Vec<u8>,
    revision: Option<u64>,
) -> Result<u64, WriteError> {
    match revision {
        None => store
            .create(key, bytes.into())
            .await
            .map_err(|e| match e.kind() {
                CreateErrorKind::AlreadyExists => WriteError::Conflict,
                _ if wrong_last_sequence(&e) => WriteError::Conflict,
                _ => WriteError::Failed(e.to_string()),
            }),
        Some(rev) => store
            .update(key, bytes.into(), rev)
            .await
            .map_err(|e| match e.kind() {
                UpdateErrorKind::WrongLastRevision => WriteError::Conflict,
                _ if wrong_last_sequence(&e) => WriteError::Conflict,
                _ => WriteError::Failed(e.to_string()),
            }),
    }
}

/// Whether JetStream refused a write because the key's last revision was
/// not the one expected. A clustered stream (NATS 2.12) answers that with
/// error code 10164 ("wrong last sequence", without the number), which
/// async-nats 0.51 knows only as an unnamed publish error, not as the
/// conflict it is (10071 on one server).
fn wrong_last_sequence(e: &(dyn std::error::Error + 'static)) -> bool {
    use jetstream::ErrorCode;
    let mut source = Some(e);
    while let Some(e) = source {
        if let Some(js) = e.downcast_ref::<jetstream::Error>() {
            return matches!(
                js.error_code(),
                ErrorCode::STREAM_WRONG_LAST_SEQUENCE
                    | ErrorCode::STREAM_WRONG_LAST_SEQUENCE_CONSTANT
            );
        }
        source = e.source();
    }
    false
}
