//! Pins: the arena-wide table of in-flight handles. A pin keeps a block
//! alive between pickling a handle and opening it; it belongs either to the
//! process that made it (and dies with that process's epoch) or to an owner
//! block such as a queue (and dies when the owner is freed).
//!
//! Crash repair recounts pins from this table (see `repair.rs`).

use super::txn::Txn;
use crate::error::{Error, Result};
use crate::handle::Handle;
use crate::layout::*;

impl Txn<'_> {
    /// Pins a block for an in-flight handle, on behalf of this process or of
    /// an owner block. Returns (pin index, slot, epoch) for the handle.
    pub(super) fn pin(
        &mut self,
        r: BlockRef,
        generation: u64,
        owner: Option<(BlockRef, u64)>,
    ) -> Result<(u32, u32, u32)> {
        let (slot, epoch, owner, owner_generation) = match owner {
            Some((o, og)) => {
                let oh = self.hdr(o)?;
                if oh.state != BLOCK_LIVE || oh.generation != og {
                    return Err(Error::StaleHandle("the owner block was freed".into()));
                }
                oh.flags |= BLOCK_OWNS_PINS;
                (OWNED_PIN_SLOT, 0, o, og)
            }
            None => (self.local.slot, self.local.epoch, BlockRef::NIL, 0),
        };
        for i in 0..MAX_PINS {
            let idx = (self.ctl.pin_cursor as usize + i) % MAX_PINS;
            if self.ctl.pins[idx].block.is_nil() {
                self.ctl.pins[idx] = PinEntry {
                    block: r,
                    generation,
                    slot,
                    epoch,
                    owner,
                    owner_generation,
                };
                self.ctl.pin_cursor = ((idx + 1) % MAX_PINS) as u32;
                self.ctl.pins_in_use += 1;
                self.hdr(r)?.pins += 1;
                return Ok((idx as u32, slot, epoch));
            }
        }
        Err(Error::TooManyPins { max: MAX_PINS })
    }

    /// Adopts the pin of a handle being opened (drops it from the table).
    pub(super) fn consume_pin(&mut self, h: &Handle) -> Result<()> {
        let Some(idx) = h.pin else { return Ok(()) };
        let idx = idx as usize;
        if idx >= MAX_PINS {
            return Err(Error::InvalidHandle("pin index out of range".into()));
        }
        let r = BlockRef::new(h.segment, h.offset);
        let e = &self.ctl.pins[idx];
        if e.block == r
            && e.generation == h.generation
            && e.slot == h.pin_slot
            && e.epoch == h.pin_epoch
        {
            self.ctl.pins[idx].block = BlockRef::NIL;
            self.ctl.pins_in_use -= 1;
            let hdr = self.hdr(r)?;
            hdr.pins = hdr.pins.saturating_sub(1);
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
        let (flags, generation) = {
            let h = self.hdr(r)?;
            (h.flags, h.generation)
        };
        if flags & BLOCK_OWNS_PINS == 0 {
            return Ok(());
        }
        for i in 0..MAX_PINS {
            let p = &self.ctl.pins[i];
            if !p.block.is_nil() && p.owner == r && p.owner_generation == generation {
                let target = p.block;
                self.ctl.pins[i].block = BlockRef::NIL;
                self.ctl.pins_in_use -= 1;
                let th = self.hdr(target)?;
                th.pins = th.pins.saturating_sub(1);
                if self.unreferenced(target)? {
                    freed.push(target);
                }
            }
        }
        Ok(())
    }
}
