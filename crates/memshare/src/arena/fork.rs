//! Fork handling. Before `fork()` the parent reserves a slot for the child
//! that already holds the parent's references, locked through a new open
//! file description the child inherits; the child switches to it.

use std::os::fd::OwnedFd;

use super::naming::ctl_path;
use super::{lock_local, Arena};
use crate::error::Result;
use crate::layout::BlockRef;
use crate::sys;

/// A slot reserved for the child of a fork in progress.
pub(super) struct ForkReservation {
    fd: OwnedFd,
    slot: u32,
    epoch: u32,
}

impl Arena {
    /// Call before `fork()`: reserves a slot for the child that already holds
    /// this process's references, locked through a new open file description
    /// that the child inherits.
    pub fn prepare_fork(&self) -> Result<()> {
        let mut local = lock_local(&self.inner.local);
        if local.detached {
            return Ok(());
        }
        let fd = sys::reopen(&ctl_path(&self.inner.dir, &self.inner.token))?;
        let refs: Vec<BlockRef> = local.refs.values().map(|e| e.bref).collect();
        let (slot, epoch) = {
            let mut txn = self.inner.txn(&mut local)?;
            let (slot, epoch) = txn.claim_slot(&fd)?;
            for r in refs {
                txn.set_holder(r, slot, true)?;
            }
            (slot, epoch)
        };
        local.fork = Some(ForkReservation { fd, slot, epoch });
        Ok(())
    }

    /// Call in the parent after `fork()`: the child owns the reservation now
    /// (if fork failed, the slot is reclaimed as a dead process's).
    pub fn after_fork_parent(&self) {
        lock_local(&self.inner.local).fork = None;
    }

    /// Call in the child after `fork()`: switch to the reserved slot.
    pub fn after_fork_child(&self) {
        super::txn::reset_lock_acquisitions();
        let mut local = lock_local(&self.inner.local);
        if let Some(f) = local.fork.take() {
            local.fd = f.fd;
            local.slot = f.slot;
            local.epoch = f.epoch;
        } else {
            // Not prepared (fork without handlers): this process has no slot;
            // the parent's references are not ours to drop.
            local.detached = true;
            local.refs.clear();
            local.by_ref.clear();
        }
    }
}
