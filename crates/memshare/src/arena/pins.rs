//! Pins: the arena-wide table of in-flight handles. A pin keeps a block
//! alive between pickling a handle and opening it. It has one owner:
//! - a process (slot + epoch): released when the receiver opens the handle,
//!   or when the process dies;
//! - a [`Lease`] (owned by a process): all its pins are released when the
//!   lease is dropped, or when its process dies;
//! - a block, such as a queue: the pins survive the process that made them
//!   and are released when the owner block is freed.
//!
//! Each owner keeps its pins on a doubly linked list threaded through the
//! entries, and free entries form a list of their own, so pinning, opening
//! and releasing an owner never scan the 65,536-entry table. Process and
//! lease pins count against their process's quota ([`PIN_QUOTA`]): a process
//! that leaks handles cannot starve the others. Crash repair rebuilds every
//! list from the table (see `repair.rs`).

use std::sync::atomic::{compiler_fence, Ordering};

use super::txn::Txn;
use super::Arena;
use crate::error::{Error, Result};
use crate::handle::Handle;
use crate::layout::*;

/// Who a new pin belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PinOwner {
    Process,
    /// `kept`: opening the handle leaves the pin in place (see
    /// [`crate::Block::handle_leased_kept`]).
    Lease {
        index: u32,
        generation: u32,
        kept: bool,
    },
    Block {
        block: BlockRef,
        generation: u64,
    },
}

/// The owner of the pins of one transport call (for example one pool
/// `map`): the handles it pins stay valid until they are opened, the lease is
/// dropped, or its process dies, whichever comes first.
pub struct Lease {
    arena: Arena,
    index: u32,
    generation: u32,
    slot: u32,
    epoch: u32,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease").field("index", &self.index).finish()
    }
}

impl Lease {
    pub fn arena(&self) -> &Arena {
        &self.arena
    }

    pub(crate) fn owner(&self, kept: bool) -> PinOwner {
        PinOwner::Lease {
            index: self.index,
            generation: self.generation,
            kept,
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        // Only the process that took the lease ends it (a forked child drops
        // its inherited copy without touching the parent's pins).
        if self.arena.my_owner() != (self.slot, self.epoch) {
            return;
        }
        // Errors here mean the arena is gone: nothing left to release.
        let _ = self
            .arena
            .with_txn(|txn| txn.end_lease(self.index, self.generation));
    }
}

impl Arena {
    /// A new lease of this process.
    pub fn lease(&self) -> Result<Lease> {
        let (index, generation, slot, epoch) = self.with_txn(|txn| txn.take_lease())?;
        Ok(Lease {
            arena: self.clone(),
            index,
            generation,
            slot,
            epoch,
        })
    }

    pub(super) fn pin(
        &self,
        bref: BlockRef,
        generation: u64,
        owner: PinOwner,
    ) -> Result<(u32, u32, u32)> {
        self.with_txn(|txn| txn.pin(bref, generation, owner))
    }
}

impl Arena {
    /// Moves the pins of `handles`, handles this process pinned and has not
    /// delivered, to the block `owner` (a queue they go into), all in one
    /// transaction: the hand-off of a message into a queue without opening
    /// its blocks, re-pinning them and letting them go (three per block).
    /// Returns the handle of each moved pin, or None for a handle whose pin
    /// is not an undelivered pin of this process (the caller opens it and
    /// re-pins, which also reports what is wrong with it).
    pub fn move_pins(
        &self,
        handles: &[&Handle],
        owner: &super::Block,
    ) -> Result<Vec<Option<Handle>>> {
        let token = self.token();
        let key = self.mac_key();
        let movable = |h: &Handle| {
            h.token == token
                && owner.arena().token() == token
                && h.pin.is_some_and(|i| (i as usize) < MAX_PINS)
                && h.verify(&key).is_ok()
        };
        if !handles.iter().any(|h| movable(h)) {
            return Ok(vec![None; handles.len()]);
        }
        let target = PinOwner::Block {
            block: owner.bref,
            generation: owner.generation,
        };
        let moved = self.with_txn(|txn| {
            Ok(handles
                .iter()
                .map(|h| {
                    if !movable(h) {
                        return None;
                    }
                    // Any trouble with one: not moved (the caller's fallback
                    // path raises the error).
                    txn.move_pin(h, target).ok().flatten()
                })
                .collect::<Vec<_>>())
        })?;
        Ok(handles
            .iter()
            .zip(moved)
            .map(|(h, m)| {
                m.map(|(pin, slot, serial)| {
                    Handle::new(
                        token,
                        h.segment,
                        h.offset,
                        h.generation,
                        h.len,
                        Some(pin),
                        slot,
                        serial,
                        h.readonly,
                        &key,
                    )
                })
            })
            .collect())
    }
}

impl Txn<'_> {
    /// [`Arena::move_pins`] for one handle (MAC verified by the caller).
    fn move_pin(&mut self, h: &Handle, target: PinOwner) -> Result<Option<(u32, u32, u32)>> {
        let PinOwner::Block {
            block: owner_ref,
            generation: owner_generation,
        } = target
        else {
            return Ok(None);
        };
        let Some(idx) = h.pin else { return Ok(None) };
        self.check_handle(h)?;
        let r = BlockRef::new(h.segment, h.offset);
        let (slot, epoch) = (self.local.slot, self.local.epoch);
        let e = &self.ctl.pins[idx as usize];
        let ours = e.kind == PIN_PROCESS
            && e.block == r
            && e.generation == h.generation
            && e.serial == h.pin_epoch
            && (e.slot, e.epoch) == (slot, epoch);
        let oh = self.hdr(owner_ref)?;
        if !ours || oh.state != BLOCK_LIVE || oh.generation != owner_generation {
            return Ok(None);
        }
        // The freed entry is taken again at once: the block is pinned
        // throughout (nobody else runs while we hold the lock).
        self.unpin(idx)?;
        match self.pin(r, h.generation, target) {
            Ok(pinned) => Ok(Some(pinned)),
            Err(e) => {
                if self.unreferenced(r)? {
                    self.free_block(r)?;
                }
                Err(e)
            }
        }
    }
}

impl Txn<'_> {
    fn take_lease(&mut self) -> Result<(u32, u32, u32, u32)> {
        let (slot, epoch) = (self.local.slot, self.local.epoch);
        let Some(i) = self.ctl.leases.iter().position(|l| l.state == LEASE_FREE) else {
            return Err(Error::TooManyPins {
                what: format!(
                    "all {MAX_LEASES} leases (pool calls in flight) of the arena are taken"
                ),
            });
        };
        self.ctl.lease_generation = self.ctl.lease_generation.wrapping_add(1);
        let generation = self.ctl.lease_generation;
        self.ctl.leases[i] = LeaseEntry {
            state: LEASE_LIVE,
            slot,
            epoch,
            generation,
            pin_head: NO_PIN,
            _reserved: 0,
        };
        Ok((i as u32, generation, slot, epoch))
    }

    /// Releases every pin of a lease and the lease itself.
    fn end_lease(&mut self, index: u32, generation: u32) -> Result<()> {
        let l = &self.ctl.leases[index as usize];
        if l.state != LEASE_LIVE || l.generation != generation {
            return Ok(());
        }
        let mut freed = Vec::new();
        while self.ctl.leases[index as usize].pin_head != NO_PIN {
            let idx = self.ctl.leases[index as usize].pin_head;
            let target = self.unpin(idx)?;
            if self.unreferenced(target)? {
                freed.push(target);
            }
        }
        self.ctl.leases[index as usize].state = LEASE_FREE;
        for r in freed {
            self.free_block(r)?;
        }
        Ok(())
    }

    /// Ends the leases this process still holds (it is leaving).
    pub(super) fn end_leases_of_this_process(&mut self) -> Result<()> {
        let (slot, epoch) = (self.local.slot, self.local.epoch);
        for i in 0..MAX_LEASES {
            let l = &self.ctl.leases[i];
            if l.state == LEASE_LIVE && l.slot == slot && l.epoch == epoch {
                let generation = l.generation;
                self.end_lease(i as u32, generation)?;
            }
        }
        Ok(())
    }

    /// The head of `owner`'s list of pin `e`, or None for a pin left by a
    /// process that exited (its slot has a new occupant or none): such
    /// pins form lists of their own that no head points to.
    fn head_of(&mut self, e: usize) -> Result<Option<&mut u32>> {
        let p = &self.ctl.pins[e];
        Ok(match p.kind {
            // Indices out of range (a corrupt entry) own no list.
            PIN_PROCESS => {
                let epoch = p.epoch;
                self.ctl
                    .slots
                    .get_mut(p.slot as usize)
                    .filter(|s| s.state == SLOT_ALIVE && s.epoch == epoch)
                    .map(|s| &mut s.pin_head)
            }
            PIN_LEASE | PIN_LEASE_KEPT => {
                let (index, generation) = p.lease();
                self.ctl
                    .leases
                    .get_mut(index as usize)
                    .filter(|l| l.state == LEASE_LIVE && l.generation == generation)
                    .map(|l| &mut l.pin_head)
            }
            PIN_BLOCK => {
                let (owner, og) = (p.owner, p.owner_generation);
                let h = self.hdr(owner)?;
                (h.state == BLOCK_LIVE && h.generation == og && h.flags & BLOCK_OWNS_PINS != 0)
                    .then_some(&mut h.pin_head)
            }
            _ => None,
        })
    }

    /// Puts pin `idx` at the head of its owner's list.
    pub(super) fn link_pin(&mut self, idx: u32) -> Result<()> {
        let old = match self.head_of(idx as usize)? {
            Some(head) => std::mem::replace(head, idx),
            None => NO_PIN,
        };
        let p = &mut self.ctl.pins[idx as usize];
        p.next = old;
        p.prev = NO_PIN;
        if old != NO_PIN {
            self.ctl.pins[old as usize].prev = idx;
        }
        Ok(())
    }

    fn unlink_pin(&mut self, idx: u32) -> Result<()> {
        let (next, prev) = {
            let p = &self.ctl.pins[idx as usize];
            (p.next, p.prev)
        };
        if prev != NO_PIN {
            self.ctl.pins[prev as usize].next = next;
        } else if let Some(head) = self.head_of(idx as usize)? {
            if *head == idx {
                *head = next;
            }
        }
        if next != NO_PIN {
            self.ctl.pins[next as usize].prev = prev;
        }
        Ok(())
    }

    /// The slot whose quota pin `idx` counts against, if its process lives.
    pub(super) fn quota_slot(&self, idx: usize) -> Option<usize> {
        let p = &self.ctl.pins[idx];
        if !matches!(p.kind, PIN_PROCESS | PIN_LEASE | PIN_LEASE_KEPT) {
            return None;
        }
        let s = self.ctl.slots.get(p.slot as usize)?;
        (s.state == SLOT_ALIVE && s.epoch == p.epoch).then_some(p.slot as usize)
    }

    /// Removes pin `idx` from its owner, its block and its process's quota,
    /// and frees the entry. Returns the block it pinned (the caller frees it
    /// if nothing references it any more).
    pub(super) fn unpin(&mut self, idx: u32) -> Result<BlockRef> {
        self.unlink_pin(idx)?;
        if let Some(s) = self.quota_slot(idx as usize) {
            let slot = &mut self.ctl.slots[s];
            slot.pins = slot.pins.saturating_sub(1);
        }
        let target = self.ctl.pins[idx as usize].block;
        let p = &mut self.ctl.pins[idx as usize];
        p.block = BlockRef::NIL;
        p.kind = PIN_FREE;
        p.prev = NO_PIN;
        p.next = self.ctl.pin_free;
        self.ctl.pin_free = idx;
        self.ctl.pins_in_use = self.ctl.pins_in_use.saturating_sub(1);
        let th = self.hdr(target)?;
        th.pins = th.pins.saturating_sub(1);
        Ok(target)
    }

    /// Pins a block for an in-flight handle on behalf of `owner`. Returns
    /// (pin index, slot, serial) for the handle.
    pub(super) fn pin(
        &mut self,
        r: BlockRef,
        generation: u64,
        owner: PinOwner,
    ) -> Result<(u32, u32, u32)> {
        // A handle of it exists now: no longer this process's alone. An
        // owner block's free releases what it pins: never cached either.
        self.local.not_private(r);
        if let PinOwner::Block { block, .. } = owner {
            self.local.not_private(block);
        }
        let (slot, epoch) = (self.local.slot, self.local.epoch);
        let mut e = PinEntry {
            block: r,
            generation,
            kind: PIN_PROCESS,
            slot,
            epoch,
            serial: 0,
            owner: BlockRef::NIL,
            owner_generation: 0,
            next: NO_PIN,
            prev: NO_PIN,
        };
        match owner {
            PinOwner::Process => {}
            PinOwner::Lease {
                index,
                generation,
                kept,
            } => {
                let l = self.ctl.leases.get(index as usize);
                if !l.is_some_and(|l| l.state == LEASE_LIVE && l.generation == generation) {
                    return Err(Error::StaleHandle("the lease has ended".into()));
                }
                e.kind = if kept { PIN_LEASE_KEPT } else { PIN_LEASE };
                e.owner_generation = lease_tag(index, generation);
            }
            PinOwner::Block { block, generation } => {
                let oh = self.hdr(block)?;
                if oh.state != BLOCK_LIVE || oh.generation != generation {
                    return Err(Error::StaleHandle("the owner block was freed".into()));
                }
                if oh.flags & BLOCK_OWNS_PINS == 0 {
                    // The empty list first: the flag says the head is valid.
                    oh.pin_head = NO_PIN;
                    oh.flags |= BLOCK_OWNS_PINS;
                }
                e.kind = PIN_BLOCK;
                e.slot = OWNED_PIN_SLOT;
                e.epoch = 0;
                e.owner = block;
                e.owner_generation = generation;
            }
        }
        let counted = e.kind != PIN_BLOCK;
        if counted {
            let held = self.ctl.slots[slot as usize].pins;
            if held >= PIN_QUOTA {
                return Err(Error::TooManyPins {
                    what: format!(
                        "this process already has {held} handles in flight, its quota of the \
                         arena's {MAX_PINS} pins; handles sent through a transport and never \
                         received keep their pin until the receiver opens them, the call's \
                         lease ends or this process exits"
                    ),
                });
            }
        }
        let idx = self.ctl.pin_free;
        if idx == NO_PIN {
            return Err(Error::TooManyPins {
                what: format!(
                    "all {MAX_PINS} pins of the arena are taken by handles in flight (queues \
                     holding messages, or processes that sent handles never received)"
                ),
            });
        }
        self.ctl.pin_free = self.ctl.pins[idx as usize].next;
        self.ctl.pin_serial = self.ctl.pin_serial.wrapping_add(1);
        e.serial = self.ctl.pin_serial;
        let serial = e.serial;
        let slot_tag = e.slot;
        // The kind goes in last: a process killed while the entry is being
        // copied leaves it free (repair puts it back on the free list), not
        // a pin that mixes this one's fields with an earlier one's.
        let kind = std::mem::replace(&mut e.kind, PIN_FREE);
        self.ctl.pins[idx as usize] = e;
        compiler_fence(Ordering::SeqCst);
        self.ctl.pins[idx as usize].kind = kind;
        self.link_pin(idx)?;
        if counted {
            self.ctl.slots[slot as usize].pins += 1;
        }
        self.ctl.pins_in_use += 1;
        self.hdr(r)?.pins += 1;
        Ok((idx, slot_tag, serial))
    }

    /// Adopts the pin of a handle being opened (drops it from the table),
    /// unless its lease keeps it for further opens (`PIN_LEASE_KEPT`).
    pub(super) fn consume_pin(&mut self, h: &Handle) -> Result<()> {
        let Some(idx) = h.pin else { return Ok(()) };
        if idx as usize >= MAX_PINS {
            return Err(Error::InvalidHandle("pin index out of range".into()));
        }
        let r = BlockRef::new(h.segment, h.offset);
        let e = &self.ctl.pins[idx as usize];
        if e.kind != PIN_FREE
            && e.kind != PIN_LEASE_KEPT
            && e.block == r
            && e.generation == h.generation
            && e.serial == h.pin_epoch
        {
            self.unpin(idx)?;
        }
        // Otherwise the pin was consumed already (a handle unpickled twice);
        // the caller's reference is valid because the block is live.
        Ok(())
    }

    /// Drops the pins that block `r` (about to be freed) owns; pushes onto
    /// `freed` the targets that nothing references any more.
    pub(super) fn release_owned_pins(
        &mut self,
        r: BlockRef,
        freed: &mut Vec<BlockRef>,
    ) -> Result<()> {
        if self.hdr(r)?.flags & BLOCK_OWNS_PINS == 0 {
            return Ok(());
        }
        loop {
            let idx = self.hdr(r)?.pin_head;
            if idx == NO_PIN {
                return Ok(());
            }
            let target = self.unpin(idx)?;
            if self.unreferenced(target)? {
                freed.push(target);
            }
        }
    }

    /// Puts every free entry on the free list (at creation and in repair).
    pub(super) fn rebuild_free_pins(&mut self) {
        let mut head = NO_PIN;
        for i in (0..MAX_PINS).rev() {
            let p = &mut self.ctl.pins[i];
            if p.kind == PIN_FREE {
                p.block = BlockRef::NIL;
                p.prev = NO_PIN;
                p.next = head;
                head = i as u32;
            }
        }
        self.ctl.pin_free = head;
    }
}
