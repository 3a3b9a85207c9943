//! Decay: idle free memory goes back to the OS by itself, as jemalloc decays
//! dirty pages. Free blocks remember when they were freed; a background
//! thread in each process looks once a second and punches the pages of
//! blocks idle for [`DECAY_NS`], oldest first, until at most the arena's
//! `retain` bytes of free space stay committed (the warm cache that bursts
//! reuse at full speed).
//!
//! The thread never takes the GIL and never waits on shared state: it only
//! try-locks, and skips a busy arena until the next tick. It never blocks
//! exit (the process does not wait for it). Threads do not survive `fork`:
//! the child starts its own on its next allocation, and the fork handlers
//! hold [`pause_for_fork`]'s gate so that no pass is half-done in the parent
//! at the instant of the fork.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use super::local::Local;
use super::txn::Txn;
use super::Arena;
use crate::error::Result;
use crate::sys;

/// How long a free block stays committed (warm) after it was last freed.
pub const DECAY_NS: u64 = 5_000_000_000;
/// How often the decay thread looks.
const TICK: Duration = Duration::from_secs(1);

/// The process whose decay thread runs (0: none yet).
static STARTED_PID: AtomicU32 = AtomicU32::new(0);
/// Held by a decay pass, and by a fork in progress.
static GATE: Mutex<()> = Mutex::new(());

thread_local! {
    /// The gate held across a fork by the forking thread.
    static FORK_HOLD: RefCell<Option<MutexGuard<'static, ()>>> = const { RefCell::new(None) };
}

/// Call before `fork()`: waits for a running decay pass to finish and keeps
/// passes from starting until [`resume_after_fork`].
pub fn pause_for_fork() {
    let guard = GATE.lock().unwrap_or_else(|p| p.into_inner());
    FORK_HOLD.with(|h| *h.borrow_mut() = Some(guard));
}

/// Call after `fork()`, in parent and child.
pub fn resume_after_fork() {
    FORK_HOLD.with(|h| h.borrow_mut().take());
}

/// Starts this process's decay thread unless it runs already.
pub(super) fn ensure_thread() {
    let pid = sys::pid();
    if STARTED_PID.swap(pid, Ordering::AcqRel) == pid {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("memshare-decay".into())
        .spawn(run);
    if spawned.is_err() {
        STARTED_PID.store(0, Ordering::Release); // try again next time
    }
}

fn run() {
    loop {
        std::thread::sleep(TICK);
        let _gate = GATE.lock().unwrap_or_else(|p| p.into_inner());
        for arena in Arena::all_attached() {
            arena.decay_tick();
        }
    }
}

impl Arena {
    fn decay_tick(&self) {
        let Ok(mut local) = self.inner.local.try_lock() else {
            return; // busy (or poisoned): next tick
        };
        let local: &mut Local = &mut local;
        if local.detached {
            return;
        }
        let Ok(Some(mut txn)) = self.inner.try_txn(local) else {
            return;
        };
        // Blocks this process kept a whole tick without reusing them go back.
        let now = sys::monotonic_ns();
        let idle = txn
            .local
            .cache
            .drain_older_than(now.saturating_sub(TICK.as_nanos() as u64));
        if !idle.is_empty() {
            let _ = txn.free_cached(idle);
        }
        // Allocations served from the cache take no lock, and so never check
        // for dead processes: this pass does, at the same once-a-second pace.
        if now.saturating_sub(txn.ctl.last_reap_ns) > super::heap::REAP_INTERVAL_NS {
            let _ = txn.reap();
        }
        let frees = txn.ctl.frees;
        if txn.ctl.decayed_frees == frees && txn.ctl.decay_pending == 0 {
            return; // nothing freed since the last pass of any process
        }
        if let Ok(pending) = txn.decay(sys::monotonic_ns()) {
            txn.ctl.decayed_frees = frees;
            txn.ctl.decay_pending = pending as u64;
        }
    }
}

impl Txn<'_> {
    /// Punches the free blocks idle for [`DECAY_NS`], oldest first, until at
    /// most `retain` free bytes stay committed. Returns true if more than
    /// that stays committed in blocks not idle long enough yet.
    pub(super) fn decay(&mut self, now: u64) -> Result<bool> {
        let retain = self.ctl.retain;
        let mut dirty = Vec::new();
        let mut total = 0u64;
        for r in self.free_blocks()? {
            let h = self.hdr(r)?;
            if h.dirty > 0 {
                total += h.dirty;
                dirty.push((h.freed_ns, r, h.dirty));
            }
        }
        dirty.sort_unstable();
        for (freed_ns, r, bytes) in dirty {
            if total <= retain {
                break;
            }
            if now.saturating_sub(freed_ns) < DECAY_NS {
                return Ok(true);
            }
            self.punch(r)?;
            total -= bytes;
        }
        Ok(false)
    }
}
