//! One active instance per role, any number of standbys: a lease in
//! JetStream KV.
//!
//! Each role that must have a single writer (`incidents`, `escalation`) has
//! its own KV bucket `tocsin_lease_<role>` with one key, `leader`. The
//! bucket's `max_age` is the lease TTL, so a key nobody renews vanishes
//! TTL after its last write, by the NATS server's clock alone.
//!
//! - **Acquire**: a standby reads the key every `ttl / 10` (at most 500 ms);
//!   when it is absent (expired, or released by a holder that stopped) it
//!   creates it (create-if-absent: of several standbys exactly one wins).
//!   The term of that tenure is the revision the create got, so terms only
//!   grow.
//! - **Renew**: the holder replaces the revision it wrote (a
//!   revision-checked update) every `ttl / 6`. A conflict means someone else
//!   holds the lease now: the holder stops at once. A renewal sent a
//!   sixth of the TTL after a prompt one must be answered before two
//!   thirds of the TTL after that one (the fence below): it has half the
//!   TTL, where renewing every third left it a third, so a bus that stalls
//!   now and then (a loaded disk) stands the holder down less often.
//!   Renewals are sent one at a time (each names the revision the one
//!   before wrote), so renewals that are all late must each be answered
//!   within a third of the TTL.
//! - **Fence**: the holder acts only until `sent + 2/3 ttl`, where `sent` is
//!   when it *sent* its last successful create or renewal, measured on the
//!   local monotonic clock. The server stored that write after `sent`, so
//!   the key lives until at least `sent + ttl`: the holder stops acting a
//!   third of the TTL before anyone else can take the lease, whatever
//!   happened meanwhile (NATS unreachable, the process frozen). The last
//!   third is the margin for messages already on the wire and for the
//!   drift between the two clocks' rates.
//!
//! - **Take back after a restart**: each instance locks a file in its
//!   data directory (`lease.lock`, an exclusive `flock`, held while [`lead`]
//!   runs) and, while it holds that lock, writes the lock's id (a random id
//!   kept in the file, with the host name) into the lease record. An
//!   instance that finds the lease held under its own lock id takes it at
//!   once with a revision-checked write, in a new term, instead of waiting
//!   for it to expire: the operating system releases the lock only when the
//!   process holding it has exited, so the previous holder can no longer
//!   act. A restarted process (systemd, a container restarted in its pod) is active
//!   again within a poll, whatever the TTL. A second live process on the
//!   same directory cannot take the lock and waits like any standby; a
//!   frozen holder keeps its lock. The data directory must be on a local
//!   file system (flock over NFS is not reliable), and must never be copied
//!   to a second instance while the first one runs (the copy would carry
//!   the same id).
//!
//! # Which clock
//! Neither the injected clock (`ServiceContext::clock`: business time,
//! frozen in tests, and wall time in production, which NTP may step) nor
//! a timestamp stored in the key (another host's wall clock) decides who
//! holds the lease. Expiry is the NATS server's `max_age`; the holder's
//! deadline is its own monotonic clock. No two clocks are ever compared,
//! only durations, each measured on one clock.
//!
//! # Acting only while holding
//! [`lead`] runs the role's service one tenure at a time: it waits for the
//! lease, runs the service with a shutdown token of its own, and polls the
//! service's future only while the lease is valid (checked at every poll,
//! so nothing is published after the deadline, even by a process that was
//! frozen past it). When the lease is lost the service's future is dropped
//! and the instance waits again; the next tenure starts the service afresh
//! (or from what its standby follower kept current, see [`lead`]), so it
//! catches up from the streams before it acts. Every JetStream message
//! published during a tenure carries the header `Tocsin-Lease:
//! <role>/<term>` (see [`crate::bus::message`]), so the stream itself shows
//! which tenure wrote what.
//!
//! A standby is ready (it is doing its job: waiting): `/readyz` shows the
//! role's check as `standby: ...`, and `tocsin_leader{role}` is 0 (1 on the
//! holder).

use std::{
    fs::{File, TryLockError},
    future::Future,
    io::{Read, Seek, Write},
    path::{Path, PathBuf},
    pin::Pin,
    sync::Arc,
    task::{Context as TaskContext, Poll},
    time::Duration,
};

use async_nats::jetstream::{self, kv};
use serde::{Deserialize, Serialize};
use tokio::{sync::watch, time::Instant};

use crate::{
    admin::{labels, Metrics},
    context::ServiceContext,
    kv::{write_checked, WriteError},
};

/// The key of the lease in its role's bucket.
pub const KEY: &str = "leader";

/// Shortest and longest lease TTL accepted (`<role>.lease_ttl`).
pub const TTL_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_secs(1)..=Duration::from_secs(600);

/// The bucket of `role`'s lease: `tocsin_lease_<role>` (its stream is
/// `KV_tocsin_lease_<role>`).
pub fn bucket(role: &str) -> String {
    format!("tocsin_lease_{role}")
}

/// Checks a configured TTL; the error names the key.
pub fn check_ttl(key: &str, ttl: Duration) -> Result<(), String> {
    if TTL_RANGE.contains(&ttl) {
        Ok(())
    } else {
        Err(format!(
            "{key} is {ttl:?}; use 1s to 10m (default 5s): a standby takes over within about \
             this long after the active instance dies"
        ))
    }
}

/// What the key holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Who holds it: host, process and a per-start suffix.
    pub holder: String,
    /// The term, once the holder has renewed (the create's revision until
    /// then: see [`Record::term_at`]).
    #[serde(default)]
    pub term: Option<u64>,
    /// The id of the data-directory lock the holder held when it wrote
    /// this (see the module docs), if it held one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock: Option<String>,
}

impl Record {
    /// The term of a record stored at `revision`.
    pub fn term_at(&self, revision: u64) -> u64 {
        self.term.unwrap_or(revision)
    }
}

/// The lease as one instance sees it: the pure state machine, driven by
/// the times it is given (the monotonic clock in [`lead`], chosen instants
/// in tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Not holding: waiting for the lease.
    Standby,
    /// Holding `term` (the key at `revision`) and allowed to act until
    /// `valid_until`.
    Leader {
        term: u64,
        revision: u64,
        valid_until: Instant,
    },
}

/// The lease's timing, derived from the TTL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    pub ttl: Duration,
}

impl Timing {
    /// How often the holder renews: a sixth of the TTL, so a renewal sent
    /// after a prompt one keeps the holder acting if it is answered within
    /// half the TTL ([`Timing::valid_for`] after the prompt one). Each is
    /// one small synced write to the lease bucket.
    pub fn renew_every(&self) -> Duration {
        self.ttl / 6
    }

    /// How long after sending a successful write the holder may act: two
    /// thirds of the TTL (the key lives at least a whole TTL after it).
    pub fn valid_for(&self) -> Duration {
        self.ttl * 2 / 3
    }

    /// How often a standby looks at the key.
    pub fn poll_every(&self) -> Duration {
        (self.ttl / 10).min(Duration::from_millis(500))
    }
}

impl State {
    /// Whether the instance may act at `now`.
    pub fn acting(&self, now: Instant) -> bool {
        matches!(self, State::Leader { valid_until, .. } if now < *valid_until)
    }

    /// The term held (None: not holding).
    pub fn term(&self) -> Option<u64> {
        match self {
            State::Leader { term, .. } => Some(*term),
            State::Standby => None,
        }
    }

    /// When acting must stop (None: not holding).
    pub fn fence_at(&self) -> Option<Instant> {
        match self {
            State::Leader { valid_until, .. } => Some(*valid_until),
            State::Standby => None,
        }
    }

    /// The lease was created (won) by a write sent at `sent`, which got
    /// `revision`: the term.
    pub fn acquired(&mut self, timing: Timing, sent: Instant, revision: u64) {
        *self = State::Leader {
            term: revision,
            revision,
            valid_until: sent + timing.valid_for(),
        };
    }

    /// A renewal sent at `sent` stored `revision`. A renewal that comes
    /// back after the deadline it would have saved changes nothing: the
    /// holder has stopped, and stays stopped until it wins the lease again.
    pub fn renewed(&mut self, timing: Timing, sent: Instant, revision: u64, now: Instant) {
        if let State::Leader {
            revision: rev,
            valid_until,
            ..
        } = self
        {
            if now >= *valid_until {
                *self = State::Standby;
                return;
            }
            *rev = revision;
            *valid_until = (*valid_until).max(sent + timing.valid_for());
        }
    }

    /// Someone else holds the lease (a renewal conflicted), or it was given
    /// up.
    pub fn lost(&mut self) {
        *self = State::Standby;
    }

    /// At `now`, past the deadline: the same as lost.
    pub fn expire(&mut self, now: Instant) {
        if !self.acting(now) {
            *self = State::Standby;
        }
    }
}

/// This host's name (`HOSTNAME`, else `/etc/hostname`).
fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".into())
}

/// A process-unique holder id: host, pid and a per-lease suffix (two
/// instances in one process, as tests run them, differ too).
fn holder_id(role: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let host = host_name();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{host}/{}/{role}-{:x}{nanos:08x}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// The exclusive lock on `<data dir>/lease.lock`, held while [`lead`] runs
/// (dropped with the file, or by the operating system when the process
/// dies).
struct DirLock {
    _file: File,
    /// `<host>/<random id kept in the file>`.
    id: String,
}

/// The lock file in `dir`.
fn lock_path(dir: &Path) -> PathBuf {
    dir.join("lease.lock")
}

/// Takes the lock on `dir` if no live process holds it: None when another
/// one does. Creates the directory, and the file with a new random id.
fn lock_dir(dir: &Path) -> std::io::Result<Option<DirLock>> {
    std::fs::create_dir_all(dir)?;
    let mut file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(lock_path(dir))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => return Ok(None),
        Err(TryLockError::Error(e)) => return Err(e),
    }
    let mut kept = String::new();
    file.read_to_string(&mut kept)?;
    let kept = kept.trim();
    let id = if kept.len() == 32 && kept.bytes().all(|b| b.is_ascii_hexdigit()) {
        kept.to_string()
    } else {
        let id = uuid::Uuid::new_v4().simple().to_string();
        file.set_len(0)?;
        file.rewind()?;
        file.write_all(format!("{id}\n").as_bytes())?;
        file.sync_all()?;
        id
    };
    Ok(Some(DirLock {
        _file: file,
        id: format!("{}/{id}", host_name()),
    }))
}

/// Who this instance is: its holder id and, while it holds one, its
/// data-directory lock.
struct Me {
    holder: String,
    dir: PathBuf,
    lock: Option<DirLock>,
    /// What the last failed attempt to lock said (logged once).
    lock_error: Option<String>,
}

impl Me {
    /// Tries to take the data-directory lock if not held yet.
    fn try_lock(&mut self, role: &str) {
        if self.lock.is_some() {
            return;
        }
        let dir = &self.dir;
        match lock_dir(dir) {
            Ok(lock) => {
                self.lock = lock;
                self.lock_error = None;
            }
            Err(e) => {
                let e = e.to_string();
                if self.lock_error.as_ref() != Some(&e) {
                    tracing::warn!(
                        role,
                        path = %lock_path(dir).display(),
                        error = %e,
                        "cannot lock the data directory's lease.lock; after a restart this \
                         instance waits for its old lease to expire (check the directory's \
                         permissions)"
                    );
                }
                self.lock_error = Some(e);
            }
        }
    }

    fn lock_id(&self) -> Option<String> {
        self.lock.as_ref().map(|l| l.id.clone())
    }

    /// The record this instance writes for `term` (None: the write's revision).
    fn record(&self, term: Option<u64>) -> Record {
        Record {
            holder: self.holder.clone(),
            term,
            lock: self.lock_id(),
        }
    }
}

/// Records that a standby of `role` has its store caught up to INCIDENTS
/// sequence `seq` (`tocsin_standby_followed_sequence{role}`).
pub fn followed(metrics: &Metrics, role: &str, seq: u64) {
    metrics
        .followed
        .get_or_create(&labels(&[("role", role)]))
        .set(i64::try_from(seq).unwrap_or(i64::MAX));
}

/// Sets `tocsin_leader{role}`.
fn set_leader(metrics: &Metrics, role: &str, leader: bool) {
    metrics
        .leader
        .get_or_create(&labels(&[("role", role)]))
        .set(i64::from(leader));
    if leader {
        // Only a standby follows: a value left from standing by would read
        // as a growing lag on the active instance.
        metrics.followed.remove(&labels(&[("role", role)]));
    }
}

/// How one tenure ended.
enum Tenure<E> {
    /// The service returned (shutdown, or an error).
    Returned(Result<(), E>),
    /// The lease was lost or ran out: the service was stopped.
    Fenced,
}

/// Polls `inner` only while `state` allows acting.
struct Guarded<'a, F> {
    inner: Pin<Box<F>>,
    state: &'a watch::Sender<State>,
}

impl<F: Future> Future for Guarded<'_, F> {
    type Output = Option<F::Output>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        if !self.state.borrow().acting(Instant::now()) {
            return Poll::Ready(None);
        }
        self.inner.as_mut().poll(cx).map(Some)
    }
}

/// The role's lease bucket, and the TTL it enforces.
struct Bucket {
    kv: kv::Store,
    timing: Timing,
}

async fn open_bucket(
    js: &jetstream::Context,
    role: &str,
    ttl: Duration,
    replicas: usize,
) -> Result<Bucket, String> {
    let name = bucket(role);
    let kv = crate::kv::open_or_create(
        js,
        kv::Config {
            bucket: name.clone(),
            description: format!("Tocsin: the {role} lease (max_age = lease TTL)"),
            history: 1,
            max_age: ttl,
            storage: jetstream::stream::StorageType::File,
            num_replicas: replicas.max(1),
            ..Default::default()
        },
    )
    .await?;
    // The bucket's max_age is the TTL every instance of the role obeys: an
    // instance configured otherwise uses it (and says so), so no two
    // instances ever work with different TTLs.
    let actual = kv.status().await.map_err(|e| e.to_string())?.max_age();
    if actual.is_zero() {
        return Err(format!(
            "the KV bucket {name} has no max_age, so a lease would never expire; delete it \
             (nats kv del {name}, as the NATS admin) and start again"
        ));
    }
    if actual != ttl {
        tracing::warn!(
            role,
            bucket = %name,
            configured = ?ttl,
            bucket_max_age = ?actual,
            "{role}.lease_ttl differs from the lease bucket's max_age; using the bucket's. \
             To change it, stop every {role} instance and delete the bucket (as the NATS admin)"
        );
    }
    Ok(Bucket {
        kv,
        timing: Timing { ttl: actual },
    })
}

async fn read(b: &Bucket) -> Result<Option<(Record, u64)>, String> {
    let entry = b.kv.entry(KEY).await.map_err(|e| e.to_string())?;
    let Some(entry) = entry else { return Ok(None) };
    if entry.operation != kv::Operation::Put || entry.value.is_empty() {
        return Ok(None);
    }
    let record: Record = serde_json::from_slice(&entry.value)
        .map_err(|e| format!("the lease record does not decode: {e}"))?;
    Ok(Some((record, entry.revision)))
}

fn encode(r: &Record) -> Vec<u8> {
    serde_json::to_vec(r).unwrap_or_default()
}

/// Writes `record` over `expected` (None: only if the key is absent) and,
/// once stored, returns the state of holding it: valid from the moment the
/// write was sent, in the record's term (None: the write's revision).
async fn take(b: &Bucket, record: &Record, expected: Option<u64>) -> Result<State, WriteError> {
    let sent = Instant::now();
    let revision = write_checked(&b.kv, KEY, encode(record), expected).await?;
    let mut s = State::Standby;
    s.acquired(b.timing, sent, revision);
    if let (Some(term), State::Leader { term: t, .. }) = (record.term, &mut s) {
        *t = term;
    }
    Ok(s)
}

/// Waits for the lease: returns the bucket and the state (Leader), or None
/// on shutdown. Reports standby on `/readyz` meanwhile.
async fn acquire(
    ctx: &ServiceContext,
    role: &str,
    ttl: Duration,
    me: &mut Me,
) -> Option<(Bucket, watch::Sender<State>)> {
    let mut bucket: Option<Bucket> = None;
    let mut last_note = String::new();
    loop {
        let poll;
        // Ready while someone else is seen holding the lease: this instance
        // is a working standby. Not ready while the lease cannot be read.
        let mut passing = false;
        let note = match &bucket {
            None => match open_bucket(&ctx.js, role, ttl, ctx.jetstream.replicas).await {
                Ok(b) => {
                    bucket = Some(b);
                    continue;
                }
                Err(e) => {
                    poll = Duration::from_millis(500);
                    format!("standby: cannot open the lease bucket yet: {e}")
                }
            },
            Some(b) => {
                poll = b.timing.poll_every();
                me.try_lock(role);
                match read(b).await {
                    // Still ours (this instance stood down, say while NATS
                    // was unreachable, and nobody took the lease since): take
                    // it back at once, in the same term, instead of waiting
                    // for it to expire. Nothing of the old tenure runs any
                    // more.
                    Ok(Some((r, rev))) if r.holder == me.holder => {
                        match take(b, &me.record(Some(r.term_at(rev))), Some(rev)).await {
                            Ok(s) => return bucket.map(|b| (b, watch::channel(s).0)),
                            Err(e) => format!("standby: cannot take back its own lease: {e}"),
                        }
                    }
                    // Held under the lock this instance holds now: the
                    // process that wrote it has exited (see the module
                    // docs). Take it in a new term (the write's revision).
                    Ok(Some((r, rev))) if r.lock.is_some() && r.lock == me.lock_id() => {
                        match take(b, &me.record(None), Some(rev)).await {
                            Ok(s) => {
                                tracing::info!(
                                    role,
                                    predecessor = %r.holder,
                                    predecessor_term = r.term_at(rev),
                                    term = s.term(),
                                    "took back the lease of its predecessor at once: this \
                                     process holds the lock on the data directory the \
                                     predecessor held, so that process has exited"
                                );
                                return bucket.map(|b| (b, watch::channel(s).0));
                            }
                            Err(WriteError::Conflict) => {
                                passing = true;
                                "standby: another instance took the lease".to_string()
                            }
                            Err(WriteError::Failed(e)) => {
                                format!("standby: cannot take back its predecessor's lease: {e}")
                            }
                        }
                    }
                    Ok(Some((r, rev))) => {
                        passing = true;
                        format!("standby: {} is active (term {})", r.holder, r.term_at(rev))
                    }
                    Ok(None) => match take(b, &me.record(None), None).await {
                        Ok(s) => return bucket.map(|b| (b, watch::channel(s).0)),
                        Err(WriteError::Conflict) => {
                            passing = true;
                            "standby: another instance took the lease".to_string()
                        }
                        Err(WriteError::Failed(e)) => {
                            format!("standby: cannot take the free lease: {e}")
                        }
                    },
                    Err(e) => format!("standby: cannot read the lease: {e}"),
                }
            }
        };
        if note != last_note {
            tracing::info!(role, "{note}");
            if passing {
                ctx.health.set_passing(role, note.clone());
            } else {
                ctx.health.set_failing(role, note.clone());
            }
            last_note = note;
        }
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return None,
            _ = tokio::time::sleep(poll) => {}
        }
    }
}

/// Renews until the lease is lost or runs out; updates `state`. Returns
/// when the instance must stop acting.
async fn renew(b: &Bucket, state: &watch::Sender<State>, role: &str, me: &Me) {
    let timing = b.timing;
    let mut next = Instant::now() + timing.renew_every();
    loop {
        let Some(fence) = state.borrow().fence_at() else {
            return;
        };
        tokio::select! {
            _ = tokio::time::sleep_until(fence) => {
                state.send_modify(|s| s.expire(Instant::now()));
                if !state.borrow().acting(Instant::now()) {
                    tracing::warn!(role, "could not renew the lease in time; standing down");
                    return;
                }
                continue;
            }
            _ = tokio::time::sleep_until(next) => {}
        }
        let (term, revision) = match *state.borrow() {
            State::Leader { term, revision, .. } => (term, revision),
            State::Standby => return,
        };
        let record = me.record(Some(term));
        let sent = Instant::now();
        let wait = fence.saturating_duration_since(sent);
        let result = tokio::time::timeout(
            wait,
            write_checked(&b.kv, KEY, encode(&record), Some(revision)),
        )
        .await;
        match result {
            Ok(Ok(rev)) => {
                state.send_modify(|s| s.renewed(timing, sent, rev, Instant::now()));
                next = sent + timing.renew_every();
            }
            Ok(Err(WriteError::Conflict)) => {
                // Our own earlier renewal may have landed without its answer
                // reaching us: then the key is ours, at a newer revision.
                match read(b).await {
                    Ok(Some((r, rev))) if r.holder == me.holder && r.term_at(rev) == term => {
                        state.send_modify(|s| {
                            if let State::Leader { revision, .. } = s {
                                *revision = rev;
                            }
                        });
                        next = Instant::now();
                    }
                    other => {
                        let now_held = match other {
                            Ok(Some((r, rev))) => format!("{} (term {})", r.holder, r.term_at(rev)),
                            Ok(None) => "nobody".into(),
                            Err(e) => format!("unknown ({e})"),
                        };
                        tracing::warn!(role, term, held_by = %now_held, "lost the lease; standing down");
                        state.send_modify(State::lost);
                        return;
                    }
                }
            }
            Ok(Err(WriteError::Failed(e))) => {
                tracing::warn!(role, term, error = %e, "cannot renew the lease; retrying");
                next = Instant::now() + Duration::from_millis(100).min(timing.renew_every());
            }
            Err(_) => {
                tracing::warn!(role, term, "renewing the lease timed out");
                next = Instant::now();
            }
        }
    }
}

/// Gives the lease up (the service stopped while holding it), so a standby
/// takes over at once instead of after the TTL.
async fn release(b: &Bucket, state: &watch::Sender<State>) {
    let revision = match *state.borrow() {
        State::Leader { revision, .. } => Some(revision),
        State::Standby => None,
    };
    state.send_modify(State::lost);
    if let Some(rev) = revision {
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            b.kv.delete_expect_revision(KEY, Some(rev)),
        )
        .await;
    }
}

/// Releases the lease if a tenure's future is dropped while holding it
/// (a service task aborted in-process): nothing of it can act any more, so
/// a standby need not wait out the TTL. A killed process releases nothing;
/// its lease expires.
struct ReleaseOnDrop {
    kv: kv::Store,
    state: Arc<watch::Sender<State>>,
    armed: bool,
}

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let State::Leader { revision, .. } = *self.state.borrow() else {
            return;
        };
        self.state.send_modify(State::lost);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let kv = self.kv.clone();
            rt.spawn(async move {
                let _ = tokio::time::timeout(
                    Duration::from_secs(2),
                    kv.delete_expect_revision(KEY, Some(revision)),
                )
                .await;
            });
        }
    }
}

/// Runs `service` for `role` only while this instance holds the role's
/// lease (see the module docs): waits for it, runs one tenure, and when the
/// lease is lost stops the service (dropping its future) and waits again.
/// Returns when `ctx.shutdown` is cancelled (releasing the lease) or the
/// service fails. `data_dir` is the role's data directory, whose
/// `lease.lock` lets a restarted process take its predecessor's lease back
/// at once (the module docs); it is locked for as long as this runs.
///
/// While it waits for the lease, `standby` runs (a follower keeping the
/// instance's store caught up, so a takeover starts warm). It is asked to
/// stop through its context's `shutdown` as soon as the lease is taken and
/// the tenure starts once it has returned: it must stop between steps,
/// never leaving half an update (its future is not dropped midway). The
/// lease is renewed from the moment it is taken, so a round that takes
/// longer than the lease lasts unrenewed (a large store being loaded) does
/// not cost it.
pub async fn lead<F, Fut, S, SFut, E>(
    ctx: &ServiceContext,
    role: &str,
    ttl: Duration,
    data_dir: &Path,
    mut service: F,
    mut standby: S,
) -> Result<(), E>
where
    F: FnMut(ServiceContext) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    S: FnMut(ServiceContext) -> SFut,
    SFut: Future<Output = ()>,
{
    let mut me = Me {
        holder: holder_id(role),
        dir: data_dir.to_path_buf(),
        lock: None,
        lock_error: None,
    };
    set_leader(&ctx.metrics, role, false);
    ctx.health.set_failing(role, "waiting for the lease");
    loop {
        let stand_down = ctx.shutdown.child_token();
        let mut following = Box::pin(standby(ServiceContext {
            shutdown: stand_down.clone(),
            ..ctx.clone()
        }));
        let mut standing_by = true;
        let acquired = {
            let acquiring = acquire(ctx, role, ttl, &mut me);
            tokio::pin!(acquiring);
            loop {
                tokio::select! {
                    biased;
                    a = &mut acquiring => break a,
                    () = &mut following, if standing_by => standing_by = false,
                }
            }
        };
        stand_down.cancel();
        // `acquire` returns only holding the lease, or None on shutdown.
        let held = acquired.and_then(|(bucket, state)| {
            let term = state.borrow().term()?;
            Some((bucket, Arc::new(state), term))
        });
        let Some((bucket, state, term)) = held else {
            if standing_by {
                following.await;
            }
            return Ok(());
        };
        let mut guard = ReleaseOnDrop {
            kv: bucket.kv.clone(),
            state: state.clone(),
            armed: true,
        };
        tracing::info!(role, term, holder = %me.holder, "took the lease: this instance is active");
        // Renewing starts with the lease, not with the tenure: the
        // follower may take seconds to end its round (loading a large
        // store), longer than the lease lasts without a renewal.
        let renewing = renew(&bucket, &state, role, &me);
        tokio::pin!(renewing);
        let mut kept = true;
        if standing_by {
            tokio::select! {
                biased;
                () = &mut following => {}
                _ = &mut renewing => {
                    kept = false;
                    (&mut following).await;
                }
            }
        }
        drop(following);
        set_leader(&ctx.metrics, role, kept);
        let stop = ctx.shutdown.child_token();
        let tenure_ctx = ServiceContext {
            shutdown: stop.clone(),
            ..ctx.clone()
        };
        let label = format!("{role}/{term}");
        let tenure = if kept {
            let run = crate::bus::LEASE.scope(label, service(tenure_ctx));
            let guarded = Guarded {
                inner: Box::pin(run),
                state: &state,
            };
            tokio::select! {
                biased;
                // The renewal loop ends only when acting must stop.
                _ = &mut renewing => Tenure::Fenced,
                r = guarded => match r {
                    Some(r) => Tenure::Returned(r),
                    None => Tenure::Fenced,
                },
            }
            // The service's future is dropped here: nothing more of it runs.
        } else {
            Tenure::Fenced
        };
        stop.cancel();
        set_leader(&ctx.metrics, role, false);
        guard.armed = false;
        match tenure {
            Tenure::Returned(r) => {
                release(&bucket, &state).await;
                tracing::info!(role, term, "gave up the lease");
                if r.is_err() || ctx.shutdown.is_cancelled() {
                    return r;
                }
                // The service returned by itself without a shutdown: run it
                // again under a new tenure.
            }
            Tenure::Fenced => {
                tracing::warn!(
                    role,
                    term,
                    "no longer holding the lease: stopped acting, standing by"
                );
                ctx.health
                    .set_passing(role, format!("standby: lost the lease (term {term})"));
                if ctx.shutdown.is_cancelled() {
                    return Ok(());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timing() -> Timing {
        Timing {
            ttl: Duration::from_secs(6),
        }
    }

    #[test]
    fn the_holder_acts_only_until_two_thirds_of_the_ttl_after_its_last_sent_write() {
        let t = timing();
        let t0 = Instant::now();
        let s = |secs: f64| t0 + Duration::from_secs_f64(secs);
        let mut st = State::Standby;
        assert!(!st.acting(t0));
        assert_eq!(st.fence_at(), None);

        // Won at revision 7 with a create sent at t0: term 7, valid 4 s.
        st.acquired(t, t0, 7);
        assert!(st.acting(s(0.0)) && st.acting(s(3.999)));
        assert!(!st.acting(s(4.0)), "stops a third of the TTL before expiry");
        assert_eq!(st.fence_at(), Some(s(4.0)));

        // A renewal sent at 2 s extends to 6 s.
        st.renewed(t, s(2.0), 9, s(2.1));
        assert_eq!(
            st,
            State::Leader {
                term: 7,
                revision: 9,
                valid_until: s(6.0)
            }
        );
        // An older renewal answered late never shortens the deadline.
        st.renewed(t, s(1.0), 10, s(2.2));
        assert_eq!(st.fence_at(), Some(s(6.0)));

        // Renewals fail from here on (NATS unreachable): it fences itself at
        // 6 s, while the key (last written after 2 s) lives until >= 8 s.
        st.expire(s(5.9));
        assert!(st.acting(s(5.9)));
        st.expire(s(6.0));
        assert_eq!(st, State::Standby);

        // A renewal that comes back after the deadline changes nothing.
        let mut late = State::Standby;
        late.acquired(t, t0, 3);
        late.renewed(t, s(3.5), 4, s(4.5));
        assert_eq!(late, State::Standby, "frozen past the deadline: stays down");

        // A conflict: lost at once.
        let mut st = State::Standby;
        st.acquired(t, t0, 11);
        st.lost();
        assert!(!st.acting(s(0.1)));
    }

    /// A bus that stalls now and then (a loaded disk syncing every write)
    /// answers a renewal late. The renewal after a prompt one is sent a
    /// sixth of the TTL after it, and the deadline that prompt one set is
    /// two thirds of the TTL after it: the late one keeps the holder
    /// acting if it is answered within half the TTL of being sent.
    /// (Renewing every third of the TTL left it a third: a busy machine
    /// stood holders down, and the lease went back and forth.) Renewals
    /// answered late one after another still must each come back within a
    /// third of the TTL: each is sent only once the one before is answered
    /// (it names that one's revision).
    #[test]
    fn a_renewal_answered_late_after_a_prompt_one_keeps_the_holder_acting() {
        for ttl in [
            Duration::from_secs(1),
            Duration::from_secs(2),
            Duration::from_secs(5),
        ] {
            let t = Timing { ttl };
            let t0 = Instant::now();
            let mut st = State::Standby;
            st.acquired(t, t0, 1);
            // When the next renewal is sent: on schedule after a prompt
            // one, at once after a late one.
            let mut send = t0 + t.renew_every();
            for round in 0..6u64 {
                // A prompt one...
                st.expire(send);
                st.renewed(t, send, 2 + 2 * round, send);
                assert!(st.acting(send), "ttl {ttl:?}: a prompt renewal");
                // ...then one answered just under half the TTL late.
                let sent = send + t.renew_every();
                let answered = sent + ttl * 49 / 100;
                st.expire(answered);
                st.renewed(t, sent, 3 + 2 * round, answered);
                assert!(
                    st.acting(answered),
                    "ttl {ttl:?}: stood down with a renewal answered {:?} after it was sent, {:?} \
                     after the prompt one before it",
                    answered - sent,
                    answered - send
                );
                send = answered;
            }
        }
    }

    #[test]
    fn timing_follows_the_ttl() {
        let t = Timing {
            ttl: Duration::from_secs(5),
        };
        assert_eq!(t.renew_every(), Duration::from_nanos(833_333_333));
        assert_eq!(t.poll_every(), Duration::from_millis(500));
        assert!(t.valid_for() + t.renew_every() <= t.ttl);
        assert!(check_ttl("incidents.lease_ttl", Duration::from_millis(300))
            .unwrap_err()
            .contains("incidents.lease_ttl is 300ms; use 1s to 10m"));
        assert!(check_ttl("x", Duration::from_secs(5)).is_ok());
    }

    #[test]
    fn the_term_is_the_creating_revision_until_renewed() {
        let r = Record {
            holder: "h".into(),
            term: None,
            lock: None,
        };
        assert_eq!(r.term_at(12), 12);
        let r: Record = serde_json::from_slice(br#"{"holder":"h","term":12}"#).unwrap();
        assert_eq!(r.term_at(15), 12);
    }

    #[test]
    fn the_data_directory_lock_is_exclusive_and_keeps_its_id() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("incidents");
        let first = lock_dir(&data).unwrap().expect("a free directory locks");
        assert!(
            lock_dir(&data).unwrap().is_none(),
            "a second lock on a held directory fails"
        );
        let id = first.id.clone();
        assert!(id.starts_with(&format!("{}/", host_name())), "{id}");
        drop(first);
        let again = lock_dir(&data).unwrap().expect("free again once dropped");
        assert_eq!(again.id, id, "the id is kept in the directory");
        let other = lock_dir(&dir.path().join("escalation")).unwrap().unwrap();
        assert_ne!(other.id, id, "each directory has its own id");

        // A record written under the lock names it; old records have none.
        let r: Record = serde_json::from_slice(br#"{"holder":"h","term":3}"#).unwrap();
        assert_eq!(r.lock, None);
        let with = Record {
            holder: "h".into(),
            term: Some(3),
            lock: Some(id.clone()),
        };
        let back: Record = serde_json::from_slice(&encode(&with)).unwrap();
        assert_eq!(back, with);
    }
}
