//! The one error type of the crate. Every message says what happened and what
//! the user can do about it; the Python bindings map each variant once onto an
//! exception class users already catch.

use std::io;

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The arena's configured limit would be exceeded.
    #[error(
        "memshare: cannot allocate {} of shared memory: {} in use, {} reserved, limit {}; \
         free shared objects you no longer need or raise the limit with \
         MEMSHARE_LIMIT=<bytes> or memshare.set_limit()",
        human(*requested), human(*in_use), human(*reserved), human(*limit)
    )]
    OutOfMemory {
        requested: u64,
        in_use: u64,
        reserved: u64,
        limit: u64,
    },

    /// The file system holding the segments has no room.
    #[error(
        "memshare: no room in {dir} for a {} segment ({} free of {}); enlarge that mount \
         (e.g. docker run --shm-size=8g) or set MEMSHARE_DIR to a directory on a larger tmpfs",
        human(*requested), human(*available), human(*total)
    )]
    NoSpace {
        dir: String,
        requested: u64,
        available: u64,
        total: u64,
    },

    /// A segment exists but is not ours to use (another user's, a symbolic
    /// link, or readable by others).
    #[error("memshare: refusing shared memory segment {path}: {why}; segments are private (0600) to the user that created them")]
    PermissionDenied { path: String, why: String },

    /// The segment directory lets other users replace our files.
    #[error(
        "memshare: refusing shared memory directory {path} (mode {mode:o}): other users can write \
         it and it lacks the sticky bit, so they could replace segments; use a directory only you \
         can write (MEMSHARE_DIR) or set its sticky bit (chmod +t)"
    )]
    UnsafeDir { path: String, mode: u32 },

    /// A file of that name exists already (a name taken by someone else).
    #[error("memshare: {path} exists already")]
    Exists { path: String },

    /// Neither the shm directory nor memory-backed segments have room: the
    /// machine (or the container's memory limit) is out of memory.
    #[error(
        "memshare: cannot reserve {} of shared memory: {dir} has {} free of {} and the system \
         (or this container's memory limit) has only {} available for memory-backed segments; \
         free shared objects you no longer need, give the machine or container more memory, or \
         enlarge {dir} (e.g. docker run --shm-size=8g)",
        human(*requested), human(*dir_available), human(*dir_total), human(*available)
    )]
    NoMemory {
        dir: String,
        requested: u64,
        available: u64,
        dir_available: u64,
        dir_total: u64,
    },

    /// A segment named by a handle does not exist (any more).
    #[error("memshare: shared memory segment {path} does not exist; the data was freed because every process that held it exited")]
    NotFound { path: String },

    /// Handle bytes that were never produced by memshare, or were damaged.
    #[error("memshare: invalid handle: {0}")]
    InvalidHandle(String),

    /// A well-formed handle whose block has been freed (and maybe reused).
    #[error("memshare: stale handle: {0}")]
    StaleHandle(String),

    /// A file with a memshare name whose contents are not a memshare segment.
    #[error("memshare: refusing shared memory segment {path}: {why}; remove it with `memshare gc` if no memshare program is running")]
    Corrupt { path: String, why: String },

    #[error("memshare: too many processes attached to one arena (at most {max}); use fewer worker processes")]
    TooManyProcesses { max: usize },

    /// The pin table (or this process's quota of it) is full.
    #[error("memshare: too many shared objects in flight: {what}. Receive (unpickle) the objects you send, or end what holds them (a pool call, a queue)")]
    TooManyPins { what: String },

    #[error("memshare: {0}")]
    InvalidArgument(String),

    /// The arena's lock was not free within the time allowed: another
    /// process holds it (stopped by SIGSTOP, a debugger or a frozen container?).
    #[error("memshare: arena {0} is busy: another process has held its lock for too long (is one stopped?); try again, or resume or kill that process")]
    Busy(String),

    #[error("memshare: queue is full")]
    Full,

    #[error("memshare: queue is empty")]
    Empty,

    #[error("memshare: queue is closed")]
    Closed,

    #[error("memshare: {context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_actionable() {
        let e = Error::OutOfMemory {
            requested: 3 << 30,
            in_use: 1 << 30,
            reserved: 2 << 30,
            limit: 2 << 30,
        };
        let m = e.to_string();
        assert!(m.contains("3.0 GiB") && m.contains("MEMSHARE_LIMIT"), "{m}");
        assert_eq!(human(10), "10 B");
    }
}
