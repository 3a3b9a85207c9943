//! Process slots and liveness. Each attached process owns a slot and holds
//! an OFD lock on the slot's byte of the control file for as long as it
//! lives; the kernel drops the lock when the process dies by any means, so a
//! slot whose state says ALIVE but whose lock is free belongs to a dead
//! process. Leaving gives the slot up, and the last process out removes the
//! arena's files.

use std::os::fd::OwnedFd;

use super::naming::ctl_path;
use super::txn::Txn;
use super::{lock_local, Arena, Inner, Local};
use crate::error::{Error, Result};
use crate::layout::*;
use crate::sys;

/// One process slot as seen by `memshare ls`.
#[derive(Debug, Clone)]
pub struct SlotInfo {
    pub slot: u32,
    pub pid: u32,
    pub alive: bool,
}

/// The byte of the control file whose OFD lock says slot `slot` is alive.
pub(super) fn slot_lock_offset(slot: u32) -> u64 {
    SLOT_LOCK_BASE + slot as u64
}

impl Local {
    /// True while the process in `slot` lives: it is us, or another open file
    /// description holds the slot's lock.
    pub(super) fn slot_alive(&self, slot: u32) -> bool {
        slot == self.slot || sys::ofd_is_locked(&self.fd, slot_lock_offset(slot), 1)
    }
}

impl Txn<'_> {
    pub(super) fn slot_alive(&self, slot: u32) -> bool {
        self.local.slot_alive(slot)
    }

    fn take_slot(&mut self) -> Result<(u32, u32)> {
        for s in 0..MAX_PROCS {
            if self.ctl.slots[s].state == SLOT_FREE {
                let slot = &mut self.ctl.slots[s];
                slot.state = SLOT_ALIVE;
                slot.epoch = slot.epoch.wrapping_add(1);
                slot.pid = sys::pid();
                // Pins of an earlier occupant that exited stay valid on
                // lists of their own; the new process starts empty.
                slot.pins = 0;
                slot.pin_head = NO_PIN;
                slot.clear_put_off();
                return Ok((s as u32, slot.epoch));
            }
        }
        Err(Error::TooManyProcesses { max: MAX_PROCS })
    }

    /// Takes a free slot and locks its liveness byte with `fd` before the
    /// mutex is released, so no reaper ever sees it unlocked.
    pub(super) fn claim_slot(&mut self, fd: &OwnedFd) -> Result<(u32, u32)> {
        let (slot, epoch) = self.take_slot()?;
        if !sys::ofd_lock(fd, slot_lock_offset(slot), 1, false)? {
            self.ctl.slots[slot as usize].state = SLOT_FREE;
            return Err(Error::StaleHandle("the arena is being removed".into()));
        }
        Ok((slot, epoch))
    }
}

impl Inner {
    /// Drops this process's references, gives up its slot and, if it was the
    /// last process, removes the arena's files.
    pub(super) fn leave(&self) -> Result<()> {
        let mut local = lock_local(&self.local);
        if !local.usable() {
            // No slot, or a child forked without handlers whose inherited
            // slot lock is its parent's: nothing here is ours to release.
            local.forget();
            return Ok(());
        }
        let refs: Vec<(BlockRef, u64)> = local
            .refs
            .values()
            .map(|e| (e.bref, e.generation))
            .collect();
        let slot = local.slot;
        let result = (|| {
            let mut txn = self.txn(&mut local)?;
            txn.flush_cache()?;
            for (r, generation) in refs {
                txn.drop_holder(r, generation)?;
            }
            txn.end_leases_of_this_process()?;
            if let Some(s) = txn.ctl.slots.get_mut(slot as usize) {
                s.state = SLOT_FREE;
            }
            sys::ofd_unlock(&txn.local.fd, slot_lock_offset(slot), 1);
            // Last one out: nobody holds a slot lock any more.
            if sys::ofd_lock(&txn.local.fd, SLOT_LOCK_BASE, MAX_PROCS as u64, false)? {
                txn.ctl.magic = 0;
                txn.remove_segment_files();
                sys::unlink(&ctl_path(&self.dir, &self.token));
                sys::ofd_unlock(&txn.local.fd, SLOT_LOCK_BASE, MAX_PROCS as u64);
            }
            Ok(())
        })();
        local.forget();
        result
    }
}

impl Arena {
    /// This process's slot in the arena (an owner tag for shared structures).
    pub fn my_slot(&self) -> u32 {
        lock_local(&self.inner.local).slot
    }

    /// This process's (slot, epoch). The epoch changes each time a slot is
    /// taken, so the pair names one process even after its slot is reused.
    pub fn my_owner(&self) -> (u32, u32) {
        let local = lock_local(&self.inner.local);
        (local.slot, local.epoch)
    }

    /// The epoch of the process that currently occupies `slot`, if any.
    pub fn slot_epoch(&self, slot: u32) -> Result<Option<u32>> {
        if slot as usize >= MAX_PROCS {
            return Ok(None);
        }
        self.with_txn(|txn| {
            let s = &txn.ctl.slots[slot as usize];
            Ok((s.state == SLOT_ALIVE).then_some(s.epoch))
        })
    }

    /// True while the process in `slot` lives (it holds the slot's OFD lock).
    pub fn is_alive(&self, slot: u32) -> bool {
        lock_local(&self.inner.local).slot_alive(slot)
    }

    /// The process slots in use, with liveness.
    pub fn slots(&self) -> Result<Vec<SlotInfo>> {
        self.with_txn(|txn| {
            Ok((0..MAX_PROCS as u32)
                .filter(|&s| txn.ctl.slots[s as usize].state == SLOT_ALIVE)
                .map(|s| SlotInfo {
                    slot: s,
                    pid: txn.ctl.slots[s as usize].pid,
                    alive: txn.slot_alive(s),
                })
                .collect())
        })
    }

    /// Detaches this process: drops its references, gives up its slot and, if
    /// it was the last process, removes the arena's files. Mappings stay valid
    /// until every `Block` of this process is gone.
    pub fn detach(&self) -> Result<()> {
        self.inner.leave()
    }
}
