//! Local stores (sled) are caches of a stream, never the record. This is
//! the one way a service opens its cache: open and load it; if that fails
//! (missing, unreadable, another version, a file in the folder's place),
//! wipe it and open it again empty, so the service rebuilds it from the
//! stream instead of refusing to start.

use std::path::Path;
use std::time::{Duration, Instant};

/// How long an open waits for the folder's lock to be let go (see
/// [`open_when_unlocked`]).
const LOCKED_WAIT: Duration = Duration::from_secs(30);

/// Opens the cache at `dir` with `open` (which also loads it). On failure
/// the folder is removed and `open` runs once more on the empty folder;
/// only that second failure is returned. `what` names the store in the log.
/// A folder locked by another open is waited for ([`open_when_unlocked`])
/// and never removed.
pub fn open_or_rebuild<T, E: std::fmt::Display>(
    dir: &Path,
    what: &str,
    open: impl Fn(&Path) -> Result<T, E>,
) -> Result<T, E> {
    match open_when_unlocked(dir, &open) {
        Ok(x) => Ok(x),
        Err(e) if is_locked(&e) => Err(e),
        Err(e) => {
            tracing::warn!(
                dir = %dir.display(),
                error = %e,
                "{what} unreadable; rebuilding it from the stream"
            );
            remove(dir);
            open(dir)
        }
    }
}

/// Opens `dir` with `open`, waiting while the folder is locked by another
/// open (sled's "could not acquire lock"): a tenure of this process that
/// lost its lease while it read its store lets go of it when that read
/// ends, and a store just dropped lets go once sled's IO threads have
/// finished with its files. `open` is tried again every 50 ms for up to
/// 30 s, then the error is returned. It sleeps: call it off the async
/// threads (`spawn_blocking`), as the services do, since reading a large
/// store takes seconds anyway.
pub fn open_when_unlocked<T, E: std::fmt::Display>(
    dir: &Path,
    open: impl Fn(&Path) -> Result<T, E>,
) -> Result<T, E> {
    let started = Instant::now();
    loop {
        match open(dir) {
            Err(e) if is_locked(&e) && started.elapsed() < LOCKED_WAIT => {
                // Poll interval of a bounded wait for the lock.
                std::thread::sleep(Duration::from_millis(50));
            }
            r => return r,
        }
    }
}

fn is_locked(e: &impl std::fmt::Display) -> bool {
    e.to_string().contains("could not acquire lock")
}

/// Removes a local store (a folder, or a file in its place). Missing is
/// fine; other failures are logged.
pub fn remove(dir: &Path) {
    let removed = if dir.is_file() {
        std::fs::remove_file(dir)
    } else {
        std::fs::remove_dir_all(dir)
    };
    if let Err(e) = removed {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot remove the local store");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store that cannot be read (a file where its folder should be) is
    /// wiped and opened again; a readable one is opened once.
    #[test]
    fn an_unreadable_store_is_wiped_and_opened_empty() {
        let tmp = std::env::temp_dir().join(format!("tocsin-store-test-{}", std::process::id()));
        std::fs::write(&tmp, b"not a folder").unwrap();
        let open = |d: &Path| -> Result<usize, String> {
            if d.is_file() {
                return Err("a file, not a store".into());
            }
            std::fs::create_dir_all(d).map_err(|e| e.to_string())?;
            Ok(std::fs::read_dir(d).map_err(|e| e.to_string())?.count())
        };
        assert_eq!(open_or_rebuild(&tmp, "test store", open), Ok(0));
        assert!(tmp.is_dir(), "rebuilt as an empty folder");
        std::fs::write(tmp.join("kept"), b"x").unwrap();
        assert_eq!(
            open_or_rebuild(&tmp, "test store", open),
            Ok(1),
            "not wiped"
        );
        remove(&tmp);
        assert!(!tmp.exists());
    }
}
