//! Fork handling.
//!
//! Before `fork()` the parent reserves a slot for the child in every arena,
//! locked through a new open file description the child inherits, with the
//! holder bits of every block the parent references (and, until the fork,
//! of every block it opens or allocates: the child's bits mirror the
//! parent's). The child switches to that slot.
//!
//! Only the forking thread survives in the child, so any process-local lock
//! another thread held at the instant of fork would stay locked forever
//! there. `pthread_atfork` handlers therefore take every such lock (the
//! home arena, the table of attachments, each attachment's local state)
//! right before the fork and release them on both sides right after it; the
//! guards wait in a thread-local of the forking thread in between.

use std::cell::RefCell;
use std::os::fd::OwnedFd;
use std::sync::{Arc, MutexGuard, Once, Weak};

use super::naming::ctl_path;
use super::{attached, lock_local, Arena, Inner, Local};
use crate::error::Result;
use crate::layout::BlockRef;
use crate::sys;

/// A slot reserved for the child of a fork in progress.
pub(super) struct ForkReservation {
    fd: OwnedFd,
    pub(super) slot: u32,
    epoch: u32,
}

/// Every process-local memshare lock, held across a fork.
struct ForkLocks {
    // Fields drop in order: the guards before the values they borrow from.
    locals: Vec<MutexGuard<'static, Local>>,
    _list: MutexGuard<'static, Vec<Weak<Inner>>>,
    _home: MutexGuard<'static, Option<Arena>>,
    arenas: Vec<Arc<Inner>>,
}

thread_local! {
    static HELD: RefCell<Option<ForkLocks>> = const { RefCell::new(None) };
}

/// Call before `fork()` (it may wait on shared state: without the GIL):
/// reserves a child slot in every attached arena. Without it, a child of
/// `fork()` gets no slot: it is detached (it can attach anew).
pub fn reserve_fork_slots() {
    for a in Arena::all_attached() {
        // Failure (e.g. no free slot) leaves the child detached, never broken.
        let _ = a.prepare_fork();
    }
}

/// Takes every process-local lock, in the order the rest of the crate
/// takes them (home, table, attachments), and keeps the guards for after
/// the fork. Runs inside `fork()` (a `pthread_atfork` prepare handler) on
/// the forking thread, so no other code runs between it and the fork: in
/// particular no Python code that could hand the GIL to a thread that
/// would then wait for one of these locks. The threads that hold them never
/// need the GIL to let go.
fn lock_for_fork() {
    let home = crate::home_slot().lock().unwrap_or_else(|p| p.into_inner());
    let list = attached().lock().unwrap_or_else(|p| p.into_inner());
    let arenas: Vec<Arc<Inner>> = list.iter().filter_map(|w| w.upgrade()).collect();
    let locals = arenas
        .iter()
        .map(|inner| {
            let g = lock_local(&inner.local);
            // SAFETY: the guard borrows `inner.local`; the Arc that keeps it
            // alive is stored beside the guard in `ForkLocks` and dropped
            // after it (field order), so the borrow never dangles.
            unsafe { std::mem::transmute::<MutexGuard<'_, Local>, MutexGuard<'static, Local>>(g) }
        })
        .collect();
    let held = ForkLocks {
        locals,
        _list: list,
        _home: home,
        arenas,
    };
    HELD.with(|h| *h.borrow_mut() = Some(held));
}

extern "C" fn atfork_prepare() {
    // A panic must not unwind into libc; the after-handlers cope with no guards.
    let _ = std::panic::catch_unwind(lock_for_fork);
}

extern "C" fn atfork_parent() {
    let _ = std::panic::catch_unwind(after_fork_in_parent);
}

extern "C" fn atfork_child() {
    let _ = std::panic::catch_unwind(after_fork_in_child);
}

/// Registers the fork handlers once per process (at the first attach).
pub(super) fn install_fork_handlers() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| sys::at_fork(atfork_prepare, atfork_parent, atfork_child));
}

/// Runs `f` on every attachment's local state: on the guards held across
/// the fork, or (when the fork was not prepared by this thread) by locking.
fn for_each_local(f: impl Fn(&Inner, &mut Local)) {
    match HELD.with(|h| h.borrow_mut().take()) {
        Some(mut held) => {
            // `locals` were taken from `arenas`, one each, in order.
            for (inner, g) in held.arenas.iter().zip(held.locals.iter_mut()) {
                f(inner, g);
            }
        }
        None => {
            for a in Arena::all_attached() {
                f(&a.inner, &mut lock_local(&a.inner.local));
            }
        }
    }
}

/// In the parent after `fork()` (also when it failed).
fn after_fork_in_parent() {
    // The child owns the reservations now; if fork failed, their slots are
    // reclaimed as a dead process's once their descriptors close here.
    for_each_local(|_, local| local.fork = None);
}

/// In the child after `fork()`: switch to the reserved slots.
fn after_fork_in_child() {
    super::txn::reset_lock_acquisitions();
    for_each_local(|inner, local| match local.fork.take() {
        Some(f) => {
            // Emptied before the reservation; the parent's if it was not.
            local.cache.drain();
            local.releases.drain();
            local.claimed(f.fd, f.slot, f.epoch)
        }
        // Not prepared (no free slot, or attached after the reservation):
        // this process has no slot; the parent's references are not ours
        // to drop.
        None => {
            local.forget();
            // The inherited descriptor shares the parent's open file
            // description, and with it the parent's slot lock: kept, it
            // would make the parent look alive after it died, for as long
            // as this child lives, and keep all it held.
            if let Ok(fd) = sys::reopen(&ctl_path(&inner.dir, &inner.token)) {
                local.fd = fd;
            }
        }
    });
}

impl Arena {
    /// Call before `fork()`: reserves a slot for the child that already holds
    /// this process's references, locked through a new open file description
    /// that the child inherits.
    pub fn prepare_fork(&self) -> Result<()> {
        let mut local = lock_local(&self.inner.local);
        if !local.usable() {
            return Ok(());
        }
        let fd = sys::reopen(&ctl_path(&self.inner.dir, &self.inner.token))?;
        let refs: Vec<BlockRef> = local.refs.values().map(|e| e.bref).collect();
        let (slot, epoch) = {
            let mut txn = self.inner.txn(&mut local)?;
            // The child will hold what we hold: nothing of ours stays
            // private, and the cache (held by us alone) goes back first.
            txn.flush_cache()?;
            for e in txn.local.refs.values_mut() {
                e.private = false;
            }
            let (slot, epoch) = txn.claim_slot(&fd)?;
            for r in refs {
                txn.set_holder(r, slot, true)?;
            }
            (slot, epoch)
        };
        local.fork = Some(ForkReservation { fd, slot, epoch });
        Ok(())
    }
}
