//! `Block`, one counted reference of this process to a block of shared
//! memory, and `PrivateView`, a copy-on-write view of one.

use super::pins::{Lease, PinOwner};
use super::Arena;
use crate::error::{Error, Result};
use crate::handle::Handle;
use crate::layout::BlockRef;
use crate::sys::{self, Mapping};

/// One reference, held by this process, to a block of shared memory.
/// Cloning adds a reference; dropping the last reference of the last process
/// frees the block.
pub struct Block {
    pub(super) arena: Arena,
    pub(super) bref: BlockRef,
    pub(super) generation: u64,
    pub(super) ptr: *mut u8,
    pub(super) len: usize,
    pub(super) capacity: usize,
    pub(super) readonly: bool,
    /// See [`Block::pages_mapped`].
    pub(super) pages_mapped: bool,
}

// SAFETY: a Block is a counted reference to shared memory that stays mapped
// while the Block (and thus its Arena) lives; the pointer may be used from any
// thread, and the reference count is protected by the arena's locks.
unsafe impl Send for Block {}
// SAFETY: see `Send`; &Block only exposes the pointer and immutable metadata.
unsafe impl Sync for Block {}

impl Block {
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// True if [`Arena::alloc`](super::Arena::alloc) gave this process a
    /// block that it allocated last, for at least as many bytes, with none
    /// of its pages given back since: they are still in this process's page
    /// tables, so populating them ahead of a write
    /// ([`crate::sys::prefault_write`]) would only walk them (some 5 ms per
    /// 200 MB). False when not known: a block new to this process, and
    /// every block opened from a handle. (That the last allocation wrote its
    /// bytes is assumed: if not, writing this one faults its pages in.)
    pub fn pages_mapped(&self) -> bool {
        self.pages_mapped
    }

    /// Bytes requested at allocation.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Usable bytes (the requested length rounded up to 64).
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn readonly(&self) -> bool {
        self.readonly
    }

    pub fn arena(&self) -> &Arena {
        &self.arena
    }

    /// A handle that another process can open. The block stays alive while the
    /// handle is in flight: the receiver adopts the pin when it opens it.
    pub fn handle(&self) -> Result<Handle> {
        self.make_handle(PinOwner::Process)
    }

    /// A handle whose pin belongs to `lease`: released when the receiver
    /// opens it, when the lease is dropped, or when its process dies.
    pub fn handle_leased(&self, lease: &Lease) -> Result<Handle> {
        self.handle_of_lease(lease, false)
    }

    /// A handle whose pin belongs to `lease` and is kept when the handle is
    /// opened: any number of receivers open it, each with a reference of
    /// its own, until the lease is dropped or its process dies. For an
    /// argument that every task of a pool call receives (one pin per call
    /// instead of one per task).
    pub fn handle_leased_kept(&self, lease: &Lease) -> Result<Handle> {
        self.handle_of_lease(lease, true)
    }

    fn handle_of_lease(&self, lease: &Lease, kept: bool) -> Result<Handle> {
        if lease.arena().token() != self.arena.token() {
            return Err(Error::InvalidArgument(
                "the lease belongs to another arena".into(),
            ));
        }
        self.make_handle(lease.owner(kept))
    }

    /// A handle whose pin belongs to `owner` (for example a queue the handle
    /// is stored in) rather than to this process: it stays valid if this
    /// process dies, and is released when `owner` is freed.
    pub fn handle_owned_by(&self, owner: &Block) -> Result<Handle> {
        if owner.arena.token() != self.arena.token() {
            return Err(Error::InvalidArgument(
                "owner block belongs to another arena".into(),
            ));
        }
        self.make_handle(PinOwner::Block {
            block: owner.bref,
            generation: owner.generation,
        })
    }

    /// A handle of the block with no pin: it keeps nothing alive and opens
    /// only while someone else holds the block. For a message whose entries
    /// get their pins later, when they are written where they travel (see
    /// [`crate::Queue::put_blocks`]).
    pub(crate) fn unpinned_handle(&self) -> Handle {
        Handle::new(
            self.arena.token(),
            self.bref.segment(),
            self.bref.offset(),
            self.generation,
            self.len as u64,
            None,
            0,
            0,
            self.readonly,
            &self.arena.mac_key(),
        )
    }

    fn make_handle(&self, owner: PinOwner) -> Result<Handle> {
        let (pin, slot, epoch) = self.arena.pin(self.bref, self.generation, owner)?;
        Ok(Handle::new(
            self.arena.token(),
            self.bref.segment(),
            self.bref.offset(),
            self.generation,
            self.len as u64,
            Some(pin),
            slot,
            epoch,
            self.readonly,
            &self.arena.mac_key(),
        ))
    }

    /// The block's bytes.
    ///
    /// # Safety
    /// Other processes may write the block concurrently; the caller must know
    /// that nobody does while the slice is alive.
    pub unsafe fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr/len describe live mapped memory owned by this reference;
        // the absence of concurrent writers is the caller's promise.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// The block's bytes, writable.
    ///
    /// # Safety
    /// As for [`Block::as_slice`], and no other reader or writer may access the
    /// bytes while the slice is alive.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn as_mut_slice(&self) -> &mut [u8] {
        // SAFETY: as above; exclusivity is the caller's promise.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Block {
    /// Gives up the Rust value but keeps its reference: for allocators that
    /// hand the pointer to foreign code (numpy's allocator hook). Release it
    /// with [`Arena::release_raw`] or [`release_raw`].
    /// The forgotten value keeps its arena attached, so the pointer stays
    /// mapped for as long as the foreign code holds it.
    pub fn into_raw(self) -> *mut u8 {
        let ptr = self.ptr;
        std::mem::forget(self);
        ptr
    }
}

/// Releases a reference given up with [`Block::into_raw`], in whichever
/// attached arena holds `ptr`. Returns false if `ptr` is not a block start.
pub fn release_raw(ptr: *mut u8) -> bool {
    for a in Arena::all_attached() {
        if a.owns_block_start(ptr as usize) {
            a.release(ptr);
            return true;
        }
    }
    false
}

/// A copy-on-write view of a block: reads share the block's pages, writes
/// copy the pages they touch for this process alone. Holds a reference to the
/// block, so the pages it has not copied stay valid.
pub struct PrivateView {
    _block: Block,
    map: Mapping,
    delta: usize,
    len: usize,
}

// SAFETY: the view owns its private mapping and a counted block reference;
// nothing in it is tied to a thread.
unsafe impl Send for PrivateView {}
// SAFETY: &PrivateView exposes only the pointer and lengths.
unsafe impl Sync for PrivateView {}

impl PrivateView {
    pub fn as_ptr(&self) -> *mut u8 {
        // SAFETY: `delta` < page size <= mapping length.
        unsafe { self.map.ptr().add(self.delta) }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Block {
    /// A copy-on-write view of this block (the semantics of a private copy,
    /// at the cost of copying only the pages that are written).
    pub fn copy_on_write(&self) -> Result<PrivateView> {
        let seg = self.bref.segment();
        let fd = self.arena.with_txn(|txn| txn.open_segment(seg))?;
        let page = sys::page_size() as u64;
        let payload = self.bref.payload_offset();
        let start = payload / page * page;
        let delta = (payload - start) as usize;
        let map_len = (delta + self.len.max(1)).div_ceil(page as usize) * page as usize;
        let map = Mapping::new_private(&fd, start, map_len)?;
        Ok(PrivateView {
            _block: self.clone(),
            map,
            delta,
            len: self.len,
        })
    }
}

impl Clone for Block {
    fn clone(&self) -> Block {
        self.arena.retain(self.ptr);
        Block {
            arena: self.arena.clone(),
            ..*self
        }
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        self.arena.release(self.ptr);
    }
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("len", &self.len)
            .field("generation", &self.generation)
            .finish()
    }
}
