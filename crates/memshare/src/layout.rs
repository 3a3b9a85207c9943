//! Shared-memory layouts. Every struct here is `#[repr(C)]` and is read by
//! other processes, possibly built from another version of this crate: each
//! segment starts with a magic number and a layout version, and attaching
//! refuses anything it does not understand.
//!
//! ```text
//! control segment  memshare-<token>           data segment  memshare-<token>-<n>-<random>
//! +---------------------------+               +---------------------------+
//! | CtlHeader: magic, version |               | SegHeader (128 B)         |
//! |  token, mac key, mutex    |               +---------------------------+
//! |  stats, free-list bins    |               | BlockHeader (128 B)       |
//! | SegmentEntry x 4096       |               | payload (64-B aligned)    |
//! | ProcSlot x 256            |               +---------------------------+
//! | PinEntry x 65536          |               | BlockHeader | payload ... |
//! | LeaseEntry x 4096         |               +---------------------------+
//! +---------------------------+
//! ```

use crate::sys::MUTEX_BYTES;

pub const CTL_MAGIC: u64 = u64::from_le_bytes(*b"MSHRCTL\0");
pub const SEG_MAGIC: u64 = u64::from_le_bytes(*b"MSHRSEG\0");
pub const BLOCK_MAGIC: u32 = u32::from_le_bytes(*b"MSBK");
pub const LAYOUT_VERSION: u32 = 7;

/// Payloads are aligned to a cache line (and to every numpy dtype).
pub const ALIGN: u64 = 64;
pub const SEG_HEADER: u64 = 128;
pub const BLOCK_HEADER: u64 = 128;
/// Process slots per arena; also the width of a block's holder bitmap.
pub const MAX_PROCS: usize = 256;
pub const HOLDER_WORDS: usize = MAX_PROCS / 64;
pub const MAX_SEGMENTS: usize = 4096;
/// Handles pinned but not yet unpickled, arena-wide.
pub const MAX_PINS: usize = 65536;
/// Free-list bins: bin `b` holds free blocks with payload in [64 * 2^b, 64 * 2^(b+1)).
pub const NBINS: usize = 48;
/// Byte offset in the control file where per-slot OFD liveness locks start.
pub const SLOT_LOCK_BASE: u64 = 1 << 40;

pub const BLOCK_FREE: u32 = 1;
pub const BLOCK_LIVE: u32 = 2;

pub const SLOT_FREE: u32 = 0;
pub const SLOT_ALIVE: u32 = 1;

pub const BLOCK_READONLY: u32 = 1;
/// The block owns pins of other blocks (drop them when it is freed).
pub const BLOCK_OWNS_PINS: u32 = 2;
/// A free block some of whose pages were given back to the OS (punched):
/// reserve its range again before use.
pub const BLOCK_HOLES: u32 = 4;
/// `pin_slot` value in a handle whose pin is owned by a block.
pub const OWNED_PIN_SLOT: u32 = 0xffff;
/// End of a pin list (pin indices are u32).
pub const NO_PIN: u32 = u32::MAX;
/// Leases (pin owners of one transport call) per arena.
pub const MAX_LEASES: usize = 4096;
/// Pins one process may hold for handles in flight (its own and its
/// leases'): a quarter of the table, so one leaking process cannot starve
/// the others.
pub const PIN_QUOTA: u32 = (MAX_PINS / 4) as u32;

/// `PinEntry::kind`: who owns a pin.
pub const PIN_FREE: u32 = 0;
/// Owned by process `slot` (epoch `epoch`).
pub const PIN_PROCESS: u32 = 1;
/// Owned by lease `lease` (generation `lease_generation`).
pub const PIN_LEASE: u32 = 2;
/// Owned by block `owner` (generation `owner_generation`), e.g. a queue.
pub const PIN_BLOCK: u32 = 3;
/// Owned by a lease like `PIN_LEASE`, but kept when a handle is opened: the
/// handle of an argument that every task of a pool call receives opens any
/// number of times until the lease ends.
pub const PIN_LEASE_KEPT: u32 = 4;

pub const LEASE_FREE: u32 = 0;
pub const LEASE_LIVE: u32 = 1;

/// Where a block's header lives: segment index in the top 16 bits, byte
/// offset of the header in that segment below. Stored as-is in shared
/// memory (free lists, pin table), hence `repr(transparent)`.
#[repr(transparent)]
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct BlockRef(u64);

impl BlockRef {
    /// The reference stored as `raw` (see [`BlockRef::raw`]).
    pub fn from_raw(raw: u64) -> BlockRef {
        BlockRef(raw)
    }

    pub fn raw(self) -> u64 {
        self.0
    }

    /// No block / end of a list.
    pub const NIL: BlockRef = BlockRef(u64::MAX);

    pub fn new(segment: u32, offset: u64) -> BlockRef {
        BlockRef(((segment as u64) << 48) | offset)
    }

    pub fn segment(self) -> u32 {
        (self.0 >> 48) as u32
    }

    /// Byte offset of the block header in its segment.
    pub fn offset(self) -> u64 {
        self.0 & ((1 << 48) - 1)
    }

    /// Byte offset of the payload in its segment.
    pub fn payload_offset(self) -> u64 {
        self.offset() + BLOCK_HEADER
    }

    pub fn is_nil(self) -> bool {
        self == BlockRef::NIL
    }
}

#[repr(C, align(64))]
pub struct MutexStorage(pub [u8; MUTEX_BYTES]);

/// A segment that is a file in the shm directory.
pub const SEG_FILE: u32 = 0;
/// A memory-backed segment (memfd) with no name: other processes open it
/// through a process that holds it (`/proc/<pid>/fd/<fd>`).
pub const SEG_MEMFD: u32 = 1;
/// A memory-backed segment that every process holding it has let go of:
/// its memory is gone. Its index stays taken; walks and totals skip it.
pub const SEG_GONE: u32 = 2;
/// Processes recorded as holders of a memory-backed segment.
pub const SEG_HOLDERS: usize = 6;

/// A process that holds a memory-backed segment open as descriptor `fd`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct SegHolder {
    pub pid: u32,
    pub fd: u32,
}

#[repr(C)]
pub struct SegmentEntry {
    /// Bytes of the segment, 0 if the entry is unused.
    pub size: u64,
    /// The random part of the segment file's name, chosen when it is made
    /// (nobody can take the name first, as they could a counter's).
    pub name: u64,
    /// Bytes of backing store the segment holds now (reserved and not
    /// punched), as the kernel counts them.
    pub committed: u64,
    /// `SEG_FILE`, `SEG_MEMFD` or `SEG_GONE`.
    pub kind: u32,
    pub _pad: u32,
    /// Identity of a memory-backed segment, checked when it is opened.
    pub dev: u64,
    pub ino: u64,
    pub holders: [SegHolder; SEG_HOLDERS],
}

/// Releases one process may have put off at a time (see [`PutOffRelease`]).
pub const PUT_OFF_RELEASES: usize = 16;

/// A release its process put off: its holder bit on `block` (of generation
/// `generation`) is still set, though it holds no reference any more. Only
/// the slot's process fills a mark, without the lock (`block` first, then a
/// non-zero `generation` with release ordering); whoever holds the lock may
/// carry it out (clear the bit, free the block if it was the last) and then
/// empties it (`generation` 0). So an allocation that would grow the arena
/// can first take back what others let go of, even from a process that is
/// stopped or busy.
#[repr(C)]
pub struct PutOffRelease {
    /// 0: the mark is empty. Generations start at 1.
    pub generation: std::sync::atomic::AtomicU64,
    /// A `BlockRef`, as its `u64`.
    pub block: std::sync::atomic::AtomicU64,
}

#[repr(C)]
pub struct ProcSlot {
    pub state: u32,
    /// Incremented each time the slot is taken, so a pin or handle naming an
    /// earlier occupant is recognised.
    pub epoch: u32,
    pub pid: u32,
    /// Pins counted against this process's quota (its own and its leases').
    pub pins: u32,
    /// Head of the list of pins this process owns.
    pub pin_head: u32,
    pub _reserved: u32,
    pub put_off: [PutOffRelease; PUT_OFF_RELEASES],
}

impl ProcSlot {
    /// A new occupant, or the reaper of a dead one: no release is put off.
    pub fn clear_put_off(&self) {
        for m in &self.put_off {
            m.generation.store(0, std::sync::atomic::Ordering::Release);
        }
    }
}

/// One pin. Every pin is on exactly one list: its owner's (a process
/// slot, a lease or a block, doubly linked through `next`/`prev`) or the
/// free list (through `next`), so releasing an owner walks its own pins only.
#[repr(C)]
pub struct PinEntry {
    /// Block pinned by an in-flight handle, `BlockRef::NIL` if the entry is free.
    pub block: BlockRef,
    pub generation: u64,
    /// `PIN_FREE`, `PIN_PROCESS`, `PIN_LEASE`, `PIN_BLOCK` or `PIN_LEASE_KEPT`.
    pub kind: u32,
    /// The process whose quota the pin counts against (process and lease
    /// pins), with its epoch; `OWNED_PIN_SLOT` for block-owned pins.
    pub slot: u32,
    pub epoch: u32,
    /// Names this use of the entry in its handle (entries are reused).
    pub serial: u32,
    /// The owner block (`PIN_BLOCK`): an owned pin lives as long as its
    /// owner block, whatever happens to the process that made it.
    pub owner: BlockRef,
    /// The owner block's generation (`PIN_BLOCK`), or the owner lease as
    /// `generation << 32 | index` (`PIN_LEASE`, `PIN_LEASE_KEPT`; see
    /// [`PinEntry::lease`]).
    pub owner_generation: u64,
    pub next: u32,
    pub prev: u32,
}

impl PinEntry {
    /// (index, generation) of the owner lease of a `PIN_LEASE` or
    /// `PIN_LEASE_KEPT` pin.
    pub fn lease(&self) -> (u32, u32) {
        (
            self.owner_generation as u32,
            (self.owner_generation >> 32) as u32,
        )
    }
}

/// `PinEntry::owner_generation` of a pin owned by lease `index`.
pub fn lease_tag(index: u32, generation: u32) -> u64 {
    ((generation as u64) << 32) | index as u64
}

/// A lease: the owner of the pins of one transport call, itself owned by a
/// process. Its pins go when the lease is dropped or its process dies.
#[repr(C)]
pub struct LeaseEntry {
    pub state: u32,
    pub slot: u32,
    pub epoch: u32,
    pub generation: u32,
    pub pin_head: u32,
    pub _reserved: u32,
}

#[repr(C)]
pub struct CtlHeader {
    pub magic: u64,
    pub version: u32,
    /// `size_of::<CtlHeader>()` of the creator, checked on attach.
    pub header_size: u32,
    pub token: [u8; 16],
    pub mac_key: [u8; 16],
    /// Nonzero while the metadata waits for a repair: set by a repair as it
    /// starts and cleared as it ends (one that failed is redone by the next
    /// transaction), and by a locker that got EOWNERDEAD but cannot repair
    /// (`memshare ls`, `gc`).
    pub repair_needed: u32,
    pub _pad0: [u8; 12],
    pub mutex: MutexStorage,
    pub limit: u64,
    pub bytes_reserved: u64,
    pub bytes_in_use: u64,
    pub live_blocks: u64,
    pub next_generation: u64,
    pub last_reap_ns: u64,
    pub segment_count: u32,
    /// Head of the free list of pin entries.
    pub pin_free: u32,
    pub pins_in_use: u64,
    pub pin_serial: u32,
    pub lease_generation: u32,
    /// Bytes of backing store all segments hold (the sum of `committed`).
    pub bytes_committed: u64,
    /// Idle free space kept committed for reuse (the warm cache).
    pub retain: u64,
    /// Blocks freed so far, and the count at the last decay pass: the decay
    /// threads (one per process) skip an arena that freed nothing since the
    /// last pass of any of them, unless that pass left work for later.
    pub frees: u64,
    pub decayed_frees: u64,
    pub decay_pending: u64,
    pub bins: [BlockRef; NBINS],
    pub segments: [SegmentEntry; MAX_SEGMENTS],
    pub slots: [ProcSlot; MAX_PROCS],
    pub pins: [PinEntry; MAX_PINS],
    pub leases: [LeaseEntry; MAX_LEASES],
}

pub const CTL_SIZE: u64 = std::mem::size_of::<CtlHeader>() as u64;

#[repr(C)]
pub struct SegHeader {
    pub magic: u64,
    pub version: u32,
    pub index: u32,
    pub token: [u8; 16],
    pub size: u64,
    pub _reserved: [u8; 88],
}

#[repr(C)]
pub struct BlockHeader {
    pub magic: u32,
    pub state: u32,
    /// Unique per allocation; a handle names the generation it was made for.
    pub generation: u64,
    /// Payload capacity in bytes (multiple of 64).
    pub size: u64,
    /// Payload capacity of the previous block in the segment (0 for the first).
    pub prev_size: u64,
    /// Bytes the user asked for.
    pub len: u64,
    /// In-flight handles pinning this block.
    pub pins: u64,
    pub flags: u32,
    /// Head of the list of pins this block owns (valid with `BLOCK_OWNS_PINS`).
    pub pin_head: u32,
    /// Free-list links (valid while FREE).
    pub free_next: BlockRef,
    pub free_prev: BlockRef,
    /// Bit `i` set: process slot `i` holds at least one reference.
    pub holders: [u64; HOLDER_WORDS],
    /// While FREE: payload bytes (about) still committed, i.e. not punched.
    pub dirty: u64,
    /// While FREE: when the block was last freed or merged (monotonic ns).
    pub freed_ns: u64,
    /// The process slot, plus one, that allocated the block (or, after a
    /// merge, its first part) last, for `len` bytes (0: none yet). Those
    /// pages are in that process's page tables: a large allocation of the
    /// same slot prefers the block, and writes them without page faults.
    pub writer: u32,
    /// The epoch of `writer`'s slot then: a later occupant of the slot has
    /// none of the block's pages mapped.
    pub writer_epoch: u32,
}

const _: () = assert!(std::mem::size_of::<SegHeader>() as u64 == SEG_HEADER);
const _: () = assert!(std::mem::size_of::<PinEntry>() == 56);
const _: () = assert!(std::mem::size_of::<BlockHeader>() as u64 == BLOCK_HEADER);
const _: () = assert!(std::mem::size_of::<SegmentEntry>() == 96);
const _: () = assert!(BLOCK_HEADER % ALIGN == 0 && SEG_HEADER % ALIGN == 0);

/// Rounds a requested length up to a payload size.
pub fn payload_size(len: u64) -> u64 {
    len.max(1).div_ceil(ALIGN) * ALIGN
}

/// The bin index of a payload size.
pub fn bin_of(size: u64) -> usize {
    let units = (size / ALIGN).max(1);
    ((63 - units.leading_zeros()) as usize).min(NBINS - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refs_roundtrip() {
        let r = BlockRef::new(4095, (1 << 40) + 128);
        assert_eq!(r.segment(), 4095);
        assert_eq!(r.offset(), (1 << 40) + 128);
        assert_eq!(r.payload_offset(), (1 << 40) + 256);
        assert!(BlockRef::NIL.is_nil() && !r.is_nil());
    }

    #[test]
    fn bins() {
        assert_eq!(bin_of(64), 0);
        assert_eq!(bin_of(127), 0);
        assert_eq!(bin_of(128), 1);
        assert_eq!(bin_of(1 << 30), 24);
        assert_eq!(payload_size(0), 64);
        assert_eq!(payload_size(65), 128);
    }

    const _: () = assert!(CTL_SIZE < 5 << 20, "the control segment must stay small");
}
