//! memshare: large arrays shared between processes without copying.
//!
//! Data lives in an [`Arena`] of named shared-memory segments; processes pass
//! 64-byte [`Handle`]s instead of data; a block is freed when the last
//! reference in any process goes away, and the references of processes that
//! die are reclaimed by the survivors.
//!
//! ```no_run
//! let arena = memshare::home().unwrap();
//! let mut a = memshare::SharedArray::zeros::<f64>(&arena, &[1000, 500]).unwrap();
//! // SAFETY: `a` was just made; nobody else can see it yet.
//! unsafe { a.view_mut::<f64>() }.unwrap().fill(1.0);
//! let message = a.to_bytes().unwrap(); // send to another process
//! let b = memshare::SharedArray::from_bytes(&message).unwrap();
//! assert_eq!(b.view::<f64>().unwrap().sum(), 500_000.0);
//! ```
#![deny(unsafe_op_in_unsafe_fn)]

pub mod arena;
pub mod array;
pub mod error;
pub mod handle;
pub mod layout;
pub mod message;
pub mod queue;
pub mod sys;

use std::sync::{Mutex, OnceLock};

pub use arena::{release_raw, Arena, Block, Lease, PrivateView, Stats};
pub use array::{ArrayMeta, Element, SharedArray};
pub use error::{Error, Result};
pub use handle::Handle;
pub use message::Entry;
pub use queue::Queue;

/// Environment variable naming the arena that children of this process join.
pub const ARENA_ENV: &str = "MEMSHARE_ARENA";

/// How long start-up clean-up waits for each other arena's lock.
const STARTUP_GC_WAIT: std::time::Duration = std::time::Duration::from_millis(200);

pub(crate) fn home_slot() -> &'static Mutex<Option<Arena>> {
    static HOME: OnceLock<Mutex<Option<Arena>>> = OnceLock::new();
    HOME.get_or_init(|| Mutex::new(None))
}

/// This process's arena for new allocations: the one named by
/// `MEMSHARE_ARENA` if it can be attached (so a process tree shares one
/// arena), else a new one. The caller exports its name in `MEMSHARE_ARENA`
/// for child processes (this function may run inside an allocator hook,
/// where changing the environment is not safe; the Python bindings export it
/// under the GIL).
pub fn home() -> Result<Arena> {
    let mut home = home_slot().lock().unwrap_or_else(|p| p.into_inner());
    if let Some(a) = home.as_ref() {
        if a.usable() {
            return Ok(a.clone());
        }
        // Inherited through a fork without memshare's handlers: join the
        // same arena under a slot of our own.
    }
    let dir = arena::default_dir();
    let inherited = std::env::var(ARENA_ENV)
        .ok()
        .and_then(|s| arena::parse_hex(&s));
    let a = match inherited.map(|t| Arena::attach(&dir, t)) {
        Some(Ok(a)) => a,
        _ => {
            // A new process tree starts: first remove what crashed trees left.
            // Bounded per arena: one stopped program never blocks another.
            let _ = Arena::collect_garbage_within(&dir, false, STARTUP_GC_WAIT);
            Arena::create(&dir)?
        }
    };
    *home = Some(a.clone());
    Ok(a)
}

/// Forgets the home arena (after detaching from it at exit).
pub fn clear_home() -> Option<Arena> {
    home_slot().lock().unwrap_or_else(|p| p.into_inner()).take()
}

/// Opens a handle made by any process of this user, attaching its arena.
pub fn open(handle: &Handle) -> Result<Block> {
    let arena = Arena::attach(&arena::default_dir(), handle.token)?;
    arena.open(handle)
}
