//! A bounded multi-producer multi-consumer queue of byte messages in shared
//! memory, usable from any number of processes (Rust or Python).
//!
//! The whole queue is one arena [`Block`], so it is reference-counted,
//! passed between processes by [`Handle`] and freed like any block:
//!
//! ```text
//! +--------------------------------------------------------------+
//! | Header (320 B): magic, version, capacity, slot size, flags,  |
//! |   closed | unfinished (own line) | tail (own line) |          |
//! |   head (own line) | futex words + waiter counts              |
//! +--------------------------------------------------------------+
//! | slot 0: word u64 | kind u32 | len u32 | data [inline_size]   |
//! | slot 1: ...                                                  |
//! +--------------------------------------------------------------+
//! ```
//!
//! # Slot protocol
//! Each slot has one 64-bit *word* that holds `seq` (the queue position the
//! slot is ready for, modulo 2^32), a state and an *owner tag* (arena slot +
//! epoch of the process that claimed it):
//!
//! ```text
//!   EMPTY(p) --producer CAS--> WRITING(p, me) --store--> FULL(p)
//!   FULL(p)  --consumer CAS--> READING(p, me) --store--> EMPTY(p + capacity)
//! ```
//! Claims are CASes on the slot word itself (so the owner tag is written
//! atomically with the claim); `tail`/`head` are then advanced by the
//! claimer or by anyone who sees the slot already claimed or moved past that
//! position (helping, as in Vyukov's bounded queue; it also moves a tail or
//! head left behind by a claimer killed before advancing it). No lock is
//! taken on the hot path.
//!
//! The protocol steps (`put_slot`, `get_slot`, waiting, repair, `close`) are
//! written over [`SlotMem`], implemented by [`Queue`] over shared memory and
//! by the model checker in `tests/queue_model.rs`, which runs this same code
//! under every interleaving of small scenarios, with deaths.
//!
//! # Faults
//! A process killed between claiming and releasing a slot leaves it WRITING
//! or READING with its owner tag. A waiter blocked on such a slot for
//! [`STUCK_AFTER`] checks whether the owner still lives
//! ([`Arena::is_alive`] plus the slot's epoch, so a reused slot is not taken
//! for its previous occupant) and, if not, repairs it:
//! - WRITING: if the dead producer had finished writing the message (its
//!   `kind` is set), the message is published; otherwise the slot is
//!   published as a tombstone that consumers skip.
//! - READING: the consumer died inside `get`, before the message was handed
//!   to its caller. The message is dropped and the memory it references is
//!   released; the slot becomes EMPTY for the next lap.
//!
//! # Messages
//! Messages up to `inline_size` bytes are copied into the slot; larger ones
//! into their own arena block whose handle (pinned by the queue block, so it
//! survives the death of the producer and is freed with the queue) sits in
//! the slot. With `put_message(.., adopt_handles = true)` the message is a
//! [`crate::message`]: the blocks its handle table lists are re-pinned to the
//! queue block too, so they are owned by the queue while the message waits
//! and by the consumer once `get` returns. The queue reads that table and
//! nothing else: it never looks into the payload.

use std::borrow::Borrow;
use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::arena::{Arena, Block};
use crate::array::{ArrayMeta, SharedArray};
use crate::error::{Error, Result};
use crate::handle::{Handle, HANDLE_LEN};
use crate::layout::MAX_PROCS;
use crate::message;
use crate::sys;

pub const QUEUE_MAGIC: u64 = u64::from_le_bytes(*b"MSHRQUE\0");
pub const QUEUE_VERSION: u32 = 2;
/// Bytes before the first slot.
pub const HEADER_SIZE: usize = 320;
/// Bytes of a slot before its data.
pub const SLOT_HEADER: usize = 16;
/// Largest capacity (slots) of a queue.
pub const MAX_CAPACITY: u64 = 1 << 24;
/// Largest inline message size.
pub const MAX_INLINE: usize = 1 << 20;
/// How long a waiter lets a claimed slot sit before checking its owner.
pub const STUCK_AFTER: Duration = Duration::from_millis(10);
/// Waiters wake at least this often even if nobody wakes them, as insurance
/// against wake-ups lost with a process that died right after being woken.
const IDLE_SLICE: Duration = Duration::from_secs(1);
/// How long a waiter keeps looking (yielding the core between looks) before
/// it sleeps on the futex: a peer on the other core usually answers sooner
/// than a futex sleep and wake-up take, and a waiter that is still looking
/// needs no wake-up call. Not on one core, where looking only delays the peer.
const LOOK_FOR: Duration = Duration::from_micros(50);

const FLAG_JOINABLE: u32 = 1;

// Word layout: seq (32) | state (2) | owner slot (8) | owner epoch (22).
const EMPTY: u64 = 0;
const WRITING: u64 = 1;
const FULL: u64 = 2;
const READING: u64 = 3;
const EPOCH_BITS: u32 = 22;
const EPOCH_MASK: u32 = (1 << EPOCH_BITS) - 1;
const _: () = assert!(MAX_PROCS <= 256, "owner tags hold an 8-bit arena slot");

const KIND_NONE: u32 = 0;
const KIND_INLINE: u32 = 1;
const KIND_BLOCK: u32 = 2;
const KIND_MASK: u32 = 0xff;
/// The message is a `crate::message` whose table entries the queue pins.
const KIND_HANDLES: u32 = 0x100;

/// Packs a slot word. Public for the model tests of the slot protocol.
pub fn pack(seq: u32, state: u64, owner: u32) -> u64 {
    ((seq as u64) << 32) | (state << 30) | (owner as u64 & 0x3fff_ffff)
}

/// (seq, state, owner) of a slot word.
pub fn unpack(w: u64) -> (u32, u64, u32) {
    ((w >> 32) as u32, (w >> 30) & 3, (w & 0x3fff_ffff) as u32)
}

fn owner_tag(slot: u32, epoch: u32) -> u32 {
    (slot << EPOCH_BITS) | (epoch & EPOCH_MASK)
}

/// Signed distance from position `pos` to a slot's `seq` (both mod 2^32).
fn dist(seq: u32, pos: u64) -> i32 {
    seq.wrapping_sub(pos as u32) as i32
}

/// What a producer should do, given the word of the slot at the tail.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum PutView {
    /// The slot is free for position `pos`: CAS it to WRITING.
    Claim,
    /// Position `pos` is taken: help advance the tail.
    Advance,
    /// The slot still holds the previous lap: the queue is full.
    Full,
    /// The slot moved past `pos`: the tail moved on, or lags behind a
    /// claimer that died; help advance it.
    Stale,
}

/// What a consumer should do, given the word of the slot at the head.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum GetView {
    Claim,
    Advance,
    /// Nothing published at `pos` yet.
    Empty,
    /// The slot moved past `pos`: help advance the head.
    Stale,
}

/// The producer's decision for the slot at tail position `pos`.
pub fn put_view(word: u64, pos: u64) -> PutView {
    let (seq, state, _) = unpack(word);
    match dist(seq, pos) {
        0 if state == EMPTY => PutView::Claim,
        0 => PutView::Advance,
        d if d < 0 => PutView::Full,
        _ => PutView::Stale,
    }
}

/// The consumer's decision for the slot at head position `pos`.
pub fn get_view(word: u64, pos: u64) -> GetView {
    let (seq, state, _) = unpack(word);
    match dist(seq, pos) {
        0 => match state {
            FULL => GetView::Claim,
            READING => GetView::Advance,
            _ => GetView::Empty,
        },
        d if d < 0 => GetView::Empty,
        _ => GetView::Stale,
    }
}

/// A cache line of its own.
#[repr(C, align(64))]
struct Line<T>(T);

#[repr(C)]
struct Header {
    magic: u64,
    version: u32,
    header_size: u32,
    capacity: u64,
    stride: u64,
    inline_size: u64,
    flags: u32,
    closed: AtomicU32,
    _pad: [u64; 2],
    unfinished: Line<AtomicU64>,
    tail: Line<AtomicU64>,
    head: Line<AtomicU64>,
    futex: Line<Futexes>,
}

#[repr(C)]
struct Futexes {
    /// Bumped when a message is published and consumers wait.
    not_empty: AtomicU32,
    get_waiters: AtomicU32,
    /// Bumped when a slot is released and producers wait.
    not_full: AtomicU32,
    put_waiters: AtomicU32,
    /// Bumped when `unfinished` drops to zero.
    all_done: AtomicU32,
    join_waiters: AtomicU32,
}

const _: () = assert!(std::mem::size_of::<Header>() == HEADER_SIZE);

#[repr(C)]
struct SlotHdr {
    word: AtomicU64,
    kind: AtomicU32,
    len: AtomicU32,
}

const _: () = assert!(std::mem::size_of::<SlotHdr>() == SLOT_HEADER);

/// A message taken from the queue.
pub struct Message {
    data: Payload,
    /// The blocks of the message's handle table with their array layouts,
    /// opened before the slot was released (this process now holds them).
    entries: Vec<(Block, ArrayMeta)>,
    /// Where the payload starts (after the handle table, if any).
    payload_at: usize,
}

enum Payload {
    Inline(Vec<u8>),
    Block(Block),
}

impl Message {
    pub fn as_bytes(&self) -> &[u8] {
        match &self.data {
            Payload::Inline(v) => v,
            // SAFETY: a message block is written once by its producer before
            // it is published and never written again; this process holds
            // the only reference that reaches it through the queue.
            Payload::Block(b) => unsafe { b.as_slice() },
        }
    }

    pub fn into_vec(self) -> Vec<u8> {
        match self.data {
            Payload::Inline(v) => v,
            Payload::Block(_) => self.as_bytes().to_vec(),
        }
    }

    /// The bytes after the handle table (all of a plain byte message).
    pub fn payload(&self) -> &[u8] {
        &self.as_bytes()[self.payload_at..]
    }

    /// The opened entries of the message's handle table.
    pub fn entries(&self) -> &[(Block, ArrayMeta)] {
        &self.entries
    }

    pub fn into_entries(self) -> Vec<(Block, ArrayMeta)> {
        self.entries
    }
}

/// A table entry of a message being put.
enum Embedded {
    /// Still pinned by the sender: its pin moves to the queue (one arena
    /// transaction), or if it is not this process's own, the block is
    /// opened and re-pinned.
    Pinned(Handle),
    /// Held by this process, not pinned for the message (a block of another
    /// arena, which the queue cannot own a pin of, or one the sender put
    /// with [`Queue::put_blocks`]): pinned for the queue when written.
    Opened(Block),
}

/// A message ready to be put (see [`Queue::prepare`]).
pub struct Prepared {
    /// (offset, entry) of each table entry.
    embedded: Vec<(usize, Embedded)>,
    /// The message has a handle table (put with `adopt_handles`).
    table: bool,
    big: Option<Block>,
    len: usize,
}

impl Prepared {
    /// Putting it takes the arena's lock (its table entries are re-pinned
    /// to the queue), so it is not tried with the GIL held.
    pub fn needs_lock(&self) -> bool {
        !self.embedded.is_empty() || self.big.is_some()
    }
}

/// Which side of the queue a waiter is on.
#[doc(hidden)]
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Put,
    Get,
}

enum Attempt<T> {
    Done(Result<T>),
    /// Blocked; `(pos, word)` of a slot claimed by someone else that is in
    /// the way, if any.
    Blocked(Option<(u64, u64)>),
    /// Made progress (skipped a tombstone): try again at once.
    Retry,
}

/// A bounded MPMC queue of byte messages in shared memory.
pub struct Queue {
    block: Block,
    cap: u64,
    stride: usize,
    inline: usize,
    joinable: bool,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("capacity", &self.cap)
            .field("inline_size", &self.inline)
            .field("len", &self.len())
            .finish()
    }
}

fn deadline_of(now: Instant, timeout: Option<Duration>) -> Option<Instant> {
    timeout.and_then(|t| now.checked_add(t))
}

/// Time left at `now` until `deadline`; None waits forever (no timeout, or
/// one too large to represent).
fn remaining(deadline: Option<Instant>, now: Instant) -> Option<Duration> {
    deadline.map(|d| d.saturating_duration_since(now))
}

impl Queue {
    /// Creates a queue of `capacity` messages in `arena`; messages up to
    /// `inline_size` bytes are stored in the slots themselves.
    pub fn new(arena: &Arena, capacity: usize, inline_size: usize) -> Result<Queue> {
        Self::with_options(arena, capacity, inline_size, false)
    }

    /// As [`Queue::new`]; a joinable queue also counts unfinished tasks
    /// ([`Queue::task_done`], [`Queue::join`]).
    pub fn with_options(
        arena: &Arena,
        capacity: usize,
        inline_size: usize,
        joinable: bool,
    ) -> Result<Queue> {
        if capacity == 0 || capacity as u64 > MAX_CAPACITY {
            return Err(Error::InvalidArgument(format!(
                "queue capacity must be between 1 and {MAX_CAPACITY}, not {capacity}"
            )));
        }
        if inline_size > MAX_INLINE {
            return Err(Error::InvalidArgument(format!(
                "inline message size must be at most {MAX_INLINE} bytes, not {inline_size}"
            )));
        }
        let data = inline_size.max(HANDLE_LEN);
        let stride = (SLOT_HEADER + data).div_ceil(64) * 64;
        let total = HEADER_SIZE + capacity * stride;
        let block = arena.alloc(total, false)?;
        let base = block.as_ptr();
        // SAFETY: the block was just allocated with room for the header and
        // `capacity` slots, is 64-byte aligned, and no other process knows
        // it yet, so this thread has exclusive access while initialising.
        unsafe {
            std::ptr::write_bytes(base, 0, HEADER_SIZE);
            let h = &mut *(base as *mut Header);
            h.version = QUEUE_VERSION;
            h.header_size = HEADER_SIZE as u32;
            h.capacity = capacity as u64;
            h.stride = stride as u64;
            h.inline_size = inline_size as u64;
            h.flags = if joinable { FLAG_JOINABLE } else { 0 };
            for i in 0..capacity {
                let s = base.add(HEADER_SIZE + i * stride);
                std::ptr::write_bytes(s, 0, SLOT_HEADER);
                (*(s as *mut SlotHdr))
                    .word
                    .store(pack(i as u32, EMPTY, 0), Ordering::Relaxed);
            }
            fence(Ordering::Release);
            h.magic = QUEUE_MAGIC;
        }
        Ok(Queue {
            block,
            cap: capacity as u64,
            stride,
            inline: inline_size,
            joinable,
        })
    }

    /// Opens a queue from its handle (made by [`Queue::handle`] in any process).
    pub fn from_handle(handle: &Handle) -> Result<Queue> {
        Self::from_block(crate::open(handle)?)
    }

    /// A queue over a block that holds one (checks the layout).
    pub fn from_block(block: Block) -> Result<Queue> {
        let bad = |why: String| Error::InvalidArgument(format!("not a memshare queue: {why}"));
        if block.len() < HEADER_SIZE {
            return Err(bad(format!("the block has only {} bytes", block.len())));
        }
        // SAFETY: the block holds at least HEADER_SIZE bytes and is 64-byte
        // aligned; the plain fields read here are written once before the
        // magic at creation and never change.
        let (magic, version, header_size, cap, stride, inline, flags) = unsafe {
            let h = &*(block.as_ptr() as *const Header);
            (
                std::ptr::read_volatile(&h.magic),
                h.version,
                h.header_size,
                h.capacity,
                h.stride,
                h.inline_size,
                h.flags,
            )
        };
        fence(Ordering::Acquire);
        if magic != QUEUE_MAGIC {
            return Err(bad("bad magic number".into()));
        }
        if version != QUEUE_VERSION || header_size as usize != HEADER_SIZE {
            return Err(bad(format!(
                "layout version {version} is not {QUEUE_VERSION} (made by another memshare version)"
            )));
        }
        let inline = inline as usize;
        let stride = stride as usize;
        let ok = (1..=MAX_CAPACITY).contains(&cap)
            && inline <= MAX_INLINE
            && stride >= SLOT_HEADER + inline.max(HANDLE_LEN)
            && stride % 64 == 0
            && (cap as usize)
                .checked_mul(stride)
                .and_then(|n| n.checked_add(HEADER_SIZE))
                .is_some_and(|n| n <= block.len());
        if !ok {
            return Err(bad("inconsistent header".into()));
        }
        Ok(Queue {
            block,
            cap,
            stride,
            inline,
            joinable: flags & FLAG_JOINABLE != 0,
        })
    }

    /// A handle another process can pass to [`Queue::from_handle`].
    pub fn handle(&self) -> Result<Handle> {
        self.block.handle()
    }

    /// The block holding the queue.
    pub fn block(&self) -> &Block {
        &self.block
    }

    pub fn capacity(&self) -> usize {
        self.cap as usize
    }

    /// Largest message stored inline in a slot.
    pub fn inline_size(&self) -> usize {
        self.inline
    }

    pub fn is_joinable(&self) -> bool {
        self.joinable
    }

    fn hdr(&self) -> &Header {
        // SAFETY: the block holds a validated header (checked in `from_block`
        // or written in `with_options`) and lives as long as `self`; every
        // field that changes after creation is atomic.
        unsafe { &*(self.block.as_ptr() as *const Header) }
    }

    fn slot(&self, pos: u64) -> &SlotHdr {
        let i = (pos % self.cap) as usize;
        // SAFETY: slot `i < cap` lies inside the block (checked against the
        // block length when the queue was opened); its header is atomics.
        unsafe { &*(self.block.as_ptr().add(HEADER_SIZE + i * self.stride) as *const SlotHdr) }
    }

    fn data_ptr(&self, pos: u64) -> *mut u8 {
        let i = (pos % self.cap) as usize;
        // SAFETY: as in `slot`; the data area follows the slot header and is
        // `stride - SLOT_HEADER >= max(inline, HANDLE_LEN)` bytes long.
        unsafe {
            self.block
                .as_ptr()
                .add(HEADER_SIZE + i * self.stride + SLOT_HEADER)
        }
    }

    /// Messages in the queue (including ones being written or read).
    pub fn len(&self) -> usize {
        let h = self.hdr();
        let head = h.head.0.load(Ordering::Acquire);
        let tail = h.tail.0.load(Ordering::Acquire);
        tail.saturating_sub(head).min(self.cap) as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn is_full(&self) -> bool {
        self.len() >= self.capacity()
    }

    /// Closes the queue for every process: `put` fails with
    /// [`Error::Closed`]; `get` drains what is left, then fails with
    /// [`Error::Closed`]; blocked callers wake up.
    pub fn close(&self) {
        close(self)
    }

    pub fn is_closed(&self) -> bool {
        is_closed(self)
    }

    // ----- put -----------------------------------------------------------

    /// Puts a message, waiting up to `timeout` (None: forever) for room.
    /// Fails with [`Error::Full`] on timeout, [`Error::Closed`] if closed.
    pub fn put(&self, msg: &[u8], timeout: Option<Duration>) -> Result<()> {
        self.put_message(msg, timeout, false)
    }

    /// Puts a message. With `adopt_handles`, `msg` is a [`crate::message`]
    /// whose table entries (pinned by their sender) are pinned by the queue
    /// instead while the message waits; consumers get them back, opened,
    /// from [`Queue::get_message`].
    pub fn put_message(
        &self,
        msg: &[u8],
        timeout: Option<Duration>,
        adopt_handles: bool,
    ) -> Result<()> {
        let prepared = self.prepare(msg, adopt_handles)?;
        self.put_prepared(msg, &prepared, timeout)
    }

    /// The part of a put that may take long or fail, done before a slot is
    /// claimed, holding what this process holds (released if it dies): checks
    /// the table's handles (their pins, this process's, keep the blocks until
    /// they move to the queue; blocks of other arenas are opened) and copies
    /// a large message into a block.
    /// A [`Prepared`] can be put several times until it succeeds (e.g. a
    /// non-blocking attempt first), but is consumed by one successful put.
    pub fn prepare(&self, msg: &[u8], adopt_handles: bool) -> Result<Prepared> {
        let arena = self.block.arena();
        let mut embedded: Vec<(usize, Embedded)> = Vec::new();
        if adopt_handles {
            let table = message::decode_in(arena, msg)?;
            for (entry, off) in table.entries.iter().zip(table.offsets) {
                let h = &entry.handle;
                embedded.push(if h.token == arena.token() && h.pin.is_some() {
                    (off, Embedded::Pinned(h.clone()))
                } else {
                    (off, Embedded::Opened(open_in(arena, h)?))
                });
            }
        }
        let big = self.own_block_for(msg)?;
        Ok(Prepared {
            embedded,
            table: adopt_handles,
            big,
            len: msg.len(),
        })
    }

    /// Puts a message listing `blocks` (each with the layout of an array in
    /// it) in front of `payload`. Each block is pinned for the queue as the
    /// message is written into its slot, one arena transaction per block and
    /// none by the sender: a message its sender pinned ([`Queue::put_message`])
    /// costs a pin and then a move. The blocks stay held by the caller
    /// until the put returns.
    pub fn put_blocks<B: Borrow<Block>>(
        &self,
        blocks: &[(B, ArrayMeta)],
        payload: &[u8],
        timeout: Option<Duration>,
    ) -> Result<()> {
        // Unpinned handles hold the places the pins will take (`fill`); the
        // encoder checks each layout against its block.
        let mut enc = message::Encoder::new();
        let mut embedded = Vec::with_capacity(blocks.len());
        for (b, layout) in blocks {
            let b = b.borrow();
            let entry = message::Entry {
                handle: b.unpinned_handle(),
                layout: layout.clone(),
            };
            embedded.push((enc.len(), Embedded::Opened(b.clone())));
            enc.push(&entry, &message::key_of(b.arena()))?;
        }
        let msg = enc.finish(payload);
        let big = self.own_block_for(&msg)?;
        let prepared = Prepared {
            embedded,
            table: true,
            big,
            len: msg.len(),
        };
        self.put_prepared(&msg, &prepared, timeout)
    }

    /// A block holding a copy of `msg` if it does not fit in a slot.
    fn own_block_for(&self, msg: &[u8]) -> Result<Option<Block>> {
        if msg.len() <= self.inline {
            return Ok(None);
        }
        let b = self.block.arena().alloc(msg.len(), false)?;
        // SAFETY: the fresh block is `msg.len()` bytes and only ours.
        unsafe { std::ptr::copy_nonoverlapping(msg.as_ptr(), b.as_ptr(), msg.len()) };
        Ok(Some(b))
    }

    /// Puts `msg` prepared by [`Queue::prepare`].
    pub fn put_prepared(
        &self,
        msg: &[u8],
        prepared: &Prepared,
        timeout: Option<Duration>,
    ) -> Result<()> {
        if self.is_closed() {
            return Err(Error::Closed);
        }
        if prepared.len != msg.len() {
            return Err(Error::InvalidArgument(
                "the message differs from the one prepared".into(),
            ));
        }
        put_slot(self, timeout, |pos| {
            if self.joinable {
                self.hdr().unfinished.0.fetch_add(1, Ordering::SeqCst);
            }
            let filled = self.fill(pos, msg, prepared);
            if filled.is_err() {
                self.finish_task();
            }
            filled
        })
    }

    /// Writes `msg` into the claimed slot `pos`; returns its kind. On error,
    /// the pins made so far are released.
    fn fill(&self, pos: u64, msg: &[u8], prepared: &Prepared) -> Result<u32> {
        let arena = self.block.arena();
        let (embedded, big) = (&prepared.embedded, &prepared.big);
        let slot = self.slot(pos);
        let data = self.data_ptr(pos);
        let mut made: Vec<(Handle, [u8; 16])> = Vec::new();
        let filled = (|| -> Result<u32> {
            let target = match big {
                Some(b) => b.as_ptr(),
                None => {
                    // SAFETY: the slot is claimed by us; the data area holds
                    // `inline >= msg.len()` bytes.
                    unsafe { std::ptr::copy_nonoverlapping(msg.as_ptr(), data, msg.len()) };
                    data
                }
            };
            // The sender's pins move to the queue in one transaction.
            let pinned: Vec<&Handle> = embedded
                .iter()
                .filter_map(|(_, e)| match e {
                    Embedded::Pinned(h) => Some(h),
                    Embedded::Opened(_) => None,
                })
                .collect();
            let moved = arena.move_pins(&pinned, &self.block)?;
            // Released with the others if a later entry fails.
            let key = message::key_of(arena);
            made.extend(moved.iter().flatten().map(|h| (h.clone(), key)));
            let mut moved = moved.into_iter();
            for (off, e) in embedded {
                let (nh, key) = match e {
                    Embedded::Pinned(h) => match moved.next().flatten() {
                        Some(m) => (m, key),
                        // Not this process's pin (e.g. a lease's): open, re-pin.
                        None => self.repin_new(&open_in(arena, h)?, &mut made)?,
                    },
                    Embedded::Opened(b) => self.repin_new(b, &mut made)?,
                };
                let len = entry_len(&msg[*off..]);
                let mut entry = msg[*off..*off + len].to_vec();
                message::set_handle(&mut entry, 0, &nh, &key)?;
                // SAFETY: the entry `off..off + len` was decoded from `msg`,
                // so it lies inside the copy at `target`, memory we own
                // exclusively (the claimed slot or our fresh block).
                unsafe { std::ptr::copy_nonoverlapping(entry.as_ptr(), target.add(*off), len) };
            }
            let mut kind = if let Some(b) = big {
                let h = b.handle_owned_by(&self.block)?;
                // SAFETY: the claimed slot's data area holds >= 64 bytes.
                unsafe { std::ptr::copy_nonoverlapping(h.to_bytes().as_ptr(), data, HANDLE_LEN) };
                KIND_BLOCK
            } else {
                slot.len.store(msg.len() as u32, Ordering::Relaxed);
                KIND_INLINE
            };
            if prepared.table {
                kind |= KIND_HANDLES;
            }
            Ok(kind)
        })();
        if filled.is_err() {
            // Release the pins made so far; a tombstone is published.
            for (h, _) in &made {
                drop(open_in(arena, h));
            }
        }
        filled
    }

    /// [`Queue::repin`], recorded in `made` (released if the put fails).
    fn repin_new(
        &self,
        b: &Block,
        made: &mut Vec<(Handle, [u8; 16])>,
    ) -> Result<(Handle, [u8; 16])> {
        let pinned = self.repin(b)?;
        made.push(pinned.clone());
        Ok(pinned)
    }

    /// A handle of `b` pinned by the queue block (by this process for a
    /// block of another arena, which the queue cannot own), with the key
    /// that authenticates its entry.
    fn repin(&self, b: &Block) -> Result<(Handle, [u8; 16])> {
        let key = message::key_of(b.arena());
        if b.arena().token() == self.block.arena().token() {
            Ok((b.handle_owned_by(&self.block)?, key))
        } else {
            Ok((b.handle()?, key))
        }
    }

    /// Puts a shared array (by handle: no copy). A Python consumer receives
    /// it as a numpy array (`memshare.Queue.get`), a Rust one with
    /// [`Queue::get_array`].
    pub fn put_array(&self, a: &SharedArray, timeout: Option<Duration>) -> Result<()> {
        self.put_blocks(&[(a.block().clone(), a.meta().clone())], &[], timeout)
    }

    // ----- get -----------------------------------------------------------

    /// Takes a message, waiting up to `timeout` (None: forever). Fails with
    /// [`Error::Empty`] on timeout, [`Error::Closed`] once closed and drained.
    pub fn get(&self, timeout: Option<Duration>) -> Result<Vec<u8>> {
        Ok(self.get_message(timeout)?.into_vec())
    }

    /// Takes a message with the blocks its handle table lists, opened.
    pub fn get_message(&self, timeout: Option<Duration>) -> Result<Message> {
        get_slot(self, timeout, |pos, kind| self.read(pos, kind))
    }

    /// Takes the message of kind `kind` in the claimed slot `pos` (before the
    /// slot is released). `None` for a tombstone.
    fn read(&self, pos: u64, kind: u32) -> Option<Result<Message>> {
        // The message is ours now: waiting for the arena's lock past the
        // caller's deadline delays it, giving up would lose it.
        crate::arena::with_deadline(None, || self.read_claimed(pos, kind))
    }

    fn read_claimed(&self, pos: u64, kind: u32) -> Option<Result<Message>> {
        let arena = self.block.arena();
        let slot = self.slot(pos);
        let data = self.data_ptr(pos);
        let taken = match kind & KIND_MASK {
            KIND_INLINE => {
                let len = (slot.len.load(Ordering::Relaxed) as usize).min(self.inline);
                // SAFETY: the slot is claimed by us and was published with
                // `len` bytes of data (clamped to the data area).
                let v = unsafe { std::slice::from_raw_parts(data, len) }.to_vec();
                Some(Ok(Payload::Inline(v)))
            }
            KIND_BLOCK => {
                // SAFETY: the claimed slot's data area holds >= 64 bytes.
                let hb = unsafe { std::slice::from_raw_parts(data, HANDLE_LEN) };
                Some(
                    Handle::from_bytes(hb)
                        .and_then(|h| arena.open(&h))
                        .map(Payload::Block),
                )
            }
            _ => None,
        };
        // Open the table's handles before releasing the slot: from then on
        // this process's references keep (and, if it dies, free) the data.
        taken.map(|r| {
            r.and_then(|data| {
                let mut msg = Message {
                    data,
                    entries: Vec::new(),
                    payload_at: 0,
                };
                if kind & KIND_HANDLES != 0 {
                    let (entries, payload_at) = open_table(arena, msg.as_bytes())?;
                    msg.entries = entries;
                    msg.payload_at = payload_at;
                }
                Ok(msg)
            })
        })
    }

    /// Takes a message that holds an array (see [`Queue::put_array`]).
    pub fn get_array(&self, timeout: Option<Duration>) -> Result<SharedArray> {
        let msg = self.get_message(timeout)?;
        if msg.entries.len() != 1 || !msg.payload().is_empty() {
            return Err(Error::InvalidArgument(
                "the message is not an array (was it put by put_array?)".into(),
            ));
        }
        let (block, layout) = msg.into_entries().pop().expect("one entry");
        SharedArray::from_entry(block, layout)
    }

    // ----- joinable ------------------------------------------------------

    /// Marks one message as processed (joinable queues).
    pub fn task_done(&self) -> Result<()> {
        if !self.joinable {
            return Err(Error::InvalidArgument(
                "task_done() needs a joinable queue".into(),
            ));
        }
        let h = self.hdr();
        let prev = h
            .unfinished
            .0
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| v.checked_sub(1))
            .map_err(|_| Error::InvalidArgument("task_done() called too many times".into()))?;
        if prev == 1 {
            let f = &h.futex.0;
            f.all_done.fetch_add(1, Ordering::SeqCst);
            if f.join_waiters.load(Ordering::SeqCst) > 0 {
                sys::futex_wake(&f.all_done, u32::MAX);
            }
        }
        Ok(())
    }

    /// Messages put but not yet marked done (joinable queues).
    pub fn unfinished(&self) -> u64 {
        self.hdr().unfinished.0.load(Ordering::SeqCst)
    }

    /// Waits until every message put has been marked done. Returns false on
    /// timeout.
    pub fn join(&self, timeout: Option<Duration>) -> Result<bool> {
        if !self.joinable {
            return Err(Error::InvalidArgument(
                "join() needs a joinable queue".into(),
            ));
        }
        let deadline = deadline_of(Instant::now(), timeout);
        let h = self.hdr();
        let f = &h.futex.0;
        loop {
            let seen = f.all_done.load(Ordering::SeqCst);
            if h.unfinished.0.load(Ordering::SeqCst) == 0 {
                return Ok(true);
            }
            let wait = match remaining(deadline, Instant::now()) {
                Some(r) if r.is_zero() => return Ok(false),
                Some(r) => r.min(IDLE_SLICE),
                None => IDLE_SLICE,
            };
            f.join_waiters.fetch_add(1, Ordering::SeqCst);
            if h.unfinished.0.load(Ordering::SeqCst) != 0 {
                sys::futex_wait(&f.all_done, seen, Some(wait));
            }
            f.join_waiters.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl SlotMem for Queue {
    type A64 = AtomicU64;
    type A32 = AtomicU32;

    fn capacity(&self) -> u64 {
        self.cap
    }
    fn tail(&self) -> &AtomicU64 {
        &self.hdr().tail.0
    }
    fn head(&self) -> &AtomicU64 {
        &self.hdr().head.0
    }
    fn closed(&self) -> &AtomicU32 {
        &self.hdr().closed
    }
    fn word(&self, pos: u64) -> &AtomicU64 {
        &self.slot(pos).word
    }
    fn kind(&self, pos: u64) -> &AtomicU32 {
        &self.slot(pos).kind
    }
    fn futex(&self, side: Side) -> (&AtomicU32, &AtomicU32) {
        let f = &self.hdr().futex.0;
        match side {
            Side::Put => (&f.not_full, &f.put_waiters),
            Side::Get => (&f.not_empty, &f.get_waiters),
        }
    }
    fn futex_wait(&self, word: &AtomicU32, seen: u32, timeout: Option<Duration>) {
        sys::futex_wait(word, seen, timeout);
    }
    fn futex_wake(&self, word: &AtomicU32, n: u32) {
        sys::futex_wake(word, n)
    }
    fn now(&self) -> Instant {
        Instant::now()
    }
    fn me(&self) -> u32 {
        let (slot, epoch) = self.block.arena().my_owner();
        owner_tag(slot, epoch)
    }

    fn owner_alive(&self, owner: u32) -> bool {
        let arena = self.block.arena();
        let (slot, epoch) = (owner >> EPOCH_BITS, owner & EPOCH_MASK);
        let (my_slot, my_epoch) = arena.my_owner();
        if slot == my_slot && epoch == my_epoch & EPOCH_MASK {
            return true;
        }
        if !arena.is_alive(slot) {
            return false;
        }
        match arena.slot_epoch(slot) {
            Ok(Some(e)) => e & EPOCH_MASK == epoch,
            Ok(None) => false,
            // Cannot tell: never take over a slot from a live process.
            Err(_) => true,
        }
    }

    /// Releases the pins a message in slot `pos` holds (it will never be
    /// delivered).
    fn discard(&self, pos: u64, kind: u32) {
        // Giving up on the arena's lock here would leak the message's blocks.
        crate::arena::with_deadline(None, || self.discard_claimed(pos, kind))
    }

    fn finish_task(&self) {
        if self.joinable {
            let _ = Queue::task_done(self);
        }
    }

    /// A message with blocks is opened under the arena's lock once claimed,
    /// with no deadline (giving up then would lose it): so a caller with a
    /// deadline first waits, within it, until the lock is free.
    fn before_take(&self, pos: u64) -> Result<()> {
        let slot = self.slot(pos);
        let kind = slot.kind.load(Ordering::Acquire);
        let opens = match kind & KIND_MASK {
            KIND_BLOCK => true,
            // A table with no entries (a plain value's message) opens nothing.
            KIND_INLINE if kind & KIND_HANDLES != 0 => {
                let len = (slot.len.load(Ordering::Relaxed) as usize).min(self.inline);
                // SAFETY: the slot is claimed by us and was published with
                // `len` bytes of data (clamped to the data area).
                let data = unsafe { std::slice::from_raw_parts(self.data_ptr(pos), len) };
                message::entry_count(data) > 0
            }
            _ => false,
        };
        if opens && crate::arena::has_deadline() {
            self.block.arena().wait_for_lock()?;
        }
        Ok(())
    }
}

impl Queue {
    /// Releases the blocks of the message in claimed slot `pos`.
    fn discard_claimed(&self, pos: u64, kind: u32) {
        let arena = self.block.arena();
        let data = self.data_ptr(pos);
        let release_embedded = |bytes: &[u8]| {
            // Opening adopts the queue's pins; dropping releases them.
            drop(open_table(arena, bytes));
        };
        match kind & KIND_MASK {
            KIND_INLINE if kind & KIND_HANDLES != 0 => {
                let len = (self.slot(pos).len.load(Ordering::Relaxed) as usize).min(self.inline);
                // SAFETY: the slot is ours (claimed by CAS); `len` is
                // clamped to the data area.
                let bytes = unsafe { std::slice::from_raw_parts(data, len) };
                release_embedded(bytes);
            }
            KIND_BLOCK => {
                // SAFETY: the slot is ours and its data area holds >= 64 bytes.
                let hb = unsafe { std::slice::from_raw_parts(data, HANDLE_LEN) };
                if let Ok(b) = Handle::from_bytes(hb).and_then(|h| arena.open(&h)) {
                    if kind & KIND_HANDLES != 0 {
                        // SAFETY: message blocks are never written after
                        // publication.
                        release_embedded(unsafe { b.as_slice() });
                    }
                }
            }
            _ => {}
        }
    }
}

// ----- the slot protocol ---------------------------------------------------
//
// The steps of `put`, `get`, waiting and repair touch shared state only
// through [`SlotMem`], so the same code runs over the queue's shared memory
// (`impl SlotMem for Queue`) and over the model in `tests/queue_model.rs`,
// which enumerates their interleavings.

/// The atomic operations the slot protocol uses on a 64-bit word.
#[doc(hidden)]
pub trait Atomic64 {
    fn load(&self, order: Ordering) -> u64;
    fn store(&self, val: u64, order: Ordering);
    fn compare_exchange(
        &self,
        current: u64,
        new: u64,
        success: Ordering,
        failure: Ordering,
    ) -> std::result::Result<u64, u64>;
}

/// The atomic operations the slot protocol uses on a 32-bit word.
#[doc(hidden)]
pub trait Atomic32 {
    fn load(&self, order: Ordering) -> u32;
    fn store(&self, val: u32, order: Ordering);
    fn fetch_add(&self, val: u32, order: Ordering) -> u32;
    fn fetch_sub(&self, val: u32, order: Ordering) -> u32;
}

impl Atomic64 for AtomicU64 {
    fn load(&self, order: Ordering) -> u64 {
        AtomicU64::load(self, order)
    }
    fn store(&self, val: u64, order: Ordering) {
        AtomicU64::store(self, val, order)
    }
    fn compare_exchange(
        &self,
        current: u64,
        new: u64,
        success: Ordering,
        failure: Ordering,
    ) -> std::result::Result<u64, u64> {
        AtomicU64::compare_exchange(self, current, new, success, failure)
    }
}

impl Atomic32 for AtomicU32 {
    fn load(&self, order: Ordering) -> u32 {
        AtomicU32::load(self, order)
    }
    fn store(&self, val: u32, order: Ordering) {
        AtomicU32::store(self, val, order)
    }
    fn fetch_add(&self, val: u32, order: Ordering) -> u32 {
        AtomicU32::fetch_add(self, val, order)
    }
    fn fetch_sub(&self, val: u32, order: Ordering) -> u32 {
        AtomicU32::fetch_sub(self, val, order)
    }
}

/// The shared state of a queue and the services of its process, as seen by
/// the slot protocol. Implemented by [`Queue`] and by the model test.
#[doc(hidden)]
pub trait SlotMem {
    type A64: Atomic64;
    type A32: Atomic32;
    /// Slots in the ring.
    fn capacity(&self) -> u64;
    fn tail(&self) -> &Self::A64;
    fn head(&self) -> &Self::A64;
    fn closed(&self) -> &Self::A32;
    /// The word of the slot for position `pos`.
    fn word(&self, pos: u64) -> &Self::A64;
    /// The message kind of the slot for position `pos`.
    fn kind(&self, pos: u64) -> &Self::A32;
    /// (futex word, waiter count) of a side.
    fn futex(&self, side: Side) -> (&Self::A32, &Self::A32);
    /// Sleeps while `word` holds `seen`, at most `timeout`.
    fn futex_wait(&self, word: &Self::A32, seen: u32, timeout: Option<Duration>);
    /// Wakes up to `n` sleepers on `word`.
    fn futex_wake(&self, word: &Self::A32, n: u32);
    fn now(&self) -> Instant;
    /// How long a waiter keeps looking before it sleeps (see [`LOOK_FOR`]).
    fn look_for(&self) -> Duration {
        if several_cores() {
            LOOK_FOR
        } else {
            Duration::ZERO
        }
    }
    /// This process's owner tag.
    fn me(&self) -> u32;
    /// True if the process that holds owner tag `owner` is alive.
    fn owner_alive(&self, owner: u32) -> bool;
    /// Releases what the message in claimed slot `pos` holds (it will never
    /// be delivered).
    fn discard(&self, pos: u64, kind: u32);
    /// Marks one task done on a joinable queue.
    fn finish_task(&self);
    /// Called before a consumer claims the published slot `pos`: an error
    /// is returned from `get` with nothing claimed. Once a message is
    /// claimed it is always taken or, if that fails, reported: never left
    /// half-taken, so whatever may fail for lack of time fails here.
    fn before_take(&self, _pos: u64) -> Result<()> {
        Ok(())
    }
}

fn is_closed<M: SlotMem>(m: &M) -> bool {
    m.closed().load(Ordering::Acquire) != 0
}

/// Closes the queue (see [`Queue::close`]).
#[doc(hidden)]
pub fn close<M: SlotMem>(m: &M) {
    m.closed().store(1, Ordering::SeqCst);
    for side in [Side::Get, Side::Put] {
        let (w, _) = m.futex(side);
        w.fetch_add(1, Ordering::SeqCst);
        m.futex_wake(w, u32::MAX);
    }
}

// ----- waiting -------------------------------------------------------------

fn wake<M: SlotMem>(m: &M, side: Side) {
    let (word, waiters) = m.futex(side);
    // Pairs with the fence in `wait`: either we see the waiter, or the
    // waiter's re-check sees our change.
    fence(Ordering::SeqCst);
    if waiters.load(Ordering::Relaxed) > 0 {
        word.fetch_add(1, Ordering::SeqCst);
        m.futex_wake(word, 1);
    }
}

/// Runs `attempt` until it is done, sleeping on the side's futex while
/// it is blocked, repairing slots whose owner died.
fn wait<M: SlotMem, T>(
    m: &M,
    side: Side,
    timeout: Option<Duration>,
    mut attempt: impl FnMut() -> Attempt<T>,
) -> Result<T> {
    let deadline = deadline_of(m.now(), timeout);
    let (word, waiters) = m.futex(side);
    let timeout_err = || match side {
        Side::Put => Error::Full,
        Side::Get => Error::Empty,
    };
    // (pos, word) of a foreign claimed slot in the way, first seen when,
    // owner last checked when.
    let mut stuck: Option<(u64, u64, Instant, Instant)> = None;
    // Until when to keep looking: set at the first miss, so that a call
    // that finds its slot at once reads no clock for it.
    let mut look_until: Option<Instant> = None;
    loop {
        let blocker = match attempt() {
            Attempt::Done(r) => return r,
            Attempt::Retry => continue,
            Attempt::Blocked(b) => b,
        };
        if is_closed(m) {
            return Err(Error::Closed);
        }
        let now = m.now();
        if remaining(deadline, now) == Some(Duration::ZERO) {
            return Err(timeout_err());
        }
        if now < *look_until.get_or_insert_with(|| now + m.look_for()) {
            std::thread::yield_now();
            continue;
        }
        let mut slice = IDLE_SLICE;
        if let Some((pos, w)) = blocker {
            match stuck {
                Some((p, sw, since, checked)) if p == pos && sw == w => {
                    if now.duration_since(since) >= STUCK_AFTER
                        && now.duration_since(checked) >= STUCK_AFTER
                    {
                        stuck = Some((p, sw, since, now));
                        if repair(m, pos, w) {
                            continue;
                        }
                    }
                }
                _ => stuck = Some((pos, w, now, now)),
            }
            slice = STUCK_AFTER;
        } else {
            stuck = None;
        }
        let seen = word.load(Ordering::Acquire);
        waiters.fetch_add(1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        match attempt() {
            Attempt::Done(r) => {
                waiters.fetch_sub(1, Ordering::SeqCst);
                return r;
            }
            Attempt::Retry => {
                waiters.fetch_sub(1, Ordering::SeqCst);
                continue;
            }
            Attempt::Blocked(_) => {}
        }
        let wait = match remaining(deadline, m.now()) {
            Some(r) => r.min(slice),
            None => slice,
        };
        if !is_closed(m) && !wait.is_zero() {
            m.futex_wait(word, seen, Some(wait));
        }
        waiters.fetch_sub(1, Ordering::SeqCst);
    }
}

/// True if this process may run on more than one core (read once).
fn several_cores() -> bool {
    static SEVERAL: OnceLock<bool> = OnceLock::new();
    *SEVERAL.get_or_init(|| std::thread::available_parallelism().is_ok_and(|n| n.get() > 1))
}

/// Repairs the slot at `pos` if it still holds `word` and the owner is
/// dead. Returns true if something changed.
fn repair<M: SlotMem>(m: &M, pos: u64, word: u64) -> bool {
    let (seq, state, owner) = unpack(word);
    if (state != WRITING && state != READING) || m.owner_alive(owner) {
        return false;
    }
    let slot = m.word(pos);
    let mine = pack(seq, state, m.me());
    if slot
        .compare_exchange(word, mine, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        return true;
    }
    let kind = m.kind(pos).load(Ordering::Acquire);
    if state == WRITING {
        // Publish what the dead producer finished writing, or a tombstone.
        if kind & KIND_MASK == KIND_NONE {
            m.finish_task();
        }
        slot.store(pack(seq, FULL, 0), Ordering::Release);
        wake(m, Side::Get);
    } else {
        // The consumer died inside `get`: its caller never saw the message.
        m.discard(pos, kind);
        if kind & KIND_MASK != KIND_NONE {
            m.finish_task();
        }
        m.kind(pos).store(KIND_NONE, Ordering::Relaxed);
        slot.store(
            pack(seq.wrapping_add(m.capacity() as u32), EMPTY, 0),
            Ordering::Release,
        );
        wake(m, Side::Put);
    }
    true
}

// ----- put -----------------------------------------------------------------

/// Claims the slot at the tail (`Side::Put`) or head (`Side::Get`), or says
/// what blocks the claim.
fn try_claim<M: SlotMem>(m: &M, me: u32, side: Side) -> Attempt<u64> {
    enum View {
        Claim,
        Advance,
        Blocked,
    }
    let (counter, claimed) = match side {
        Side::Put => (m.tail(), WRITING),
        Side::Get => (m.head(), READING),
    };
    loop {
        let pos = counter.load(Ordering::Acquire);
        let slot = m.word(pos);
        let w = slot.load(Ordering::Acquire);
        let view = match side {
            Side::Put => match put_view(w, pos) {
                PutView::Claim => View::Claim,
                PutView::Advance | PutView::Stale => View::Advance,
                PutView::Full => View::Blocked,
            },
            Side::Get => match get_view(w, pos) {
                GetView::Claim => View::Claim,
                GetView::Advance | GetView::Stale => View::Advance,
                GetView::Empty => View::Blocked,
            },
        };
        match view {
            View::Claim => {
                if side == Side::Get {
                    if let Err(e) = m.before_take(pos) {
                        return Attempt::Done(Err(e));
                    }
                }
                if slot
                    .compare_exchange(
                        w,
                        pack(pos as u32, claimed, me),
                        Ordering::AcqRel,
                        Ordering::Relaxed,
                    )
                    .is_ok()
                {
                    let _ =
                        counter.compare_exchange(pos, pos + 1, Ordering::AcqRel, Ordering::Relaxed);
                    return Attempt::Done(Ok(pos));
                }
            }
            // Stale: the slot has moved past `pos`, so position `pos` was
            // claimed. Usually the counter has moved on too; but if the
            // claimer died before advancing it, nobody else would, and
            // reloading alone would spin for ever (found by tests/queue_model.rs).
            View::Advance => {
                let _ = counter.compare_exchange(pos, pos + 1, Ordering::AcqRel, Ordering::Relaxed);
            }
            View::Blocked => {
                if counter.load(Ordering::Acquire) != pos {
                    continue;
                }
                let (_, state, _) = unpack(w);
                let blocker = (state == WRITING || state == READING).then_some((pos, w));
                return Attempt::Blocked(blocker);
            }
        }
    }
}

/// Claims a slot (waiting up to `timeout` for room), lets `fill` write the
/// message into it, and publishes it: with the kind `fill` returns, or as a
/// tombstone if `fill` fails.
#[doc(hidden)]
pub fn put_slot<M: SlotMem>(
    m: &M,
    timeout: Option<Duration>,
    fill: impl FnOnce(u64) -> Result<u32>,
) -> Result<()> {
    let me = m.me();
    let pos = wait(m, Side::Put, timeout, || try_claim(m, me, Side::Put))?;
    let result = match fill(pos) {
        Ok(kind) => {
            m.kind(pos).store(kind, Ordering::Release);
            Ok(())
        }
        Err(e) => Err(e),
    };
    m.word(pos)
        .store(pack(pos as u32, FULL, 0), Ordering::Release);
    wake(m, Side::Get);
    result
}

// ----- get -----------------------------------------------------------------

/// Lets `read` take the message in the claimed slot `pos` (given its kind;
/// `None` for a tombstone) and releases the slot.
fn take<M: SlotMem, T>(
    m: &M,
    pos: u64,
    read: &mut impl FnMut(u64, u32) -> Option<Result<T>>,
) -> Option<Result<T>> {
    let kind = m.kind(pos).load(Ordering::Acquire);
    let taken = read(pos, kind);
    m.kind(pos).store(KIND_NONE, Ordering::Relaxed);
    m.word(pos).store(
        pack((pos as u32).wrapping_add(m.capacity() as u32), EMPTY, 0),
        Ordering::Release,
    );
    wake(m, Side::Put);
    taken
}

/// Claims a published message (waiting up to `timeout`), lets `read` take
/// it and releases the slot; tombstones are skipped.
#[doc(hidden)]
pub fn get_slot<M: SlotMem, T>(
    m: &M,
    timeout: Option<Duration>,
    mut read: impl FnMut(u64, u32) -> Option<Result<T>>,
) -> Result<T> {
    let me = m.me();
    wait(m, Side::Get, timeout, || {
        match try_claim(m, me, Side::Get) {
            Attempt::Done(Ok(pos)) => match take(m, pos, &mut read) {
                Some(r) => Attempt::Done(r),
                None => Attempt::Retry,
            },
            Attempt::Done(Err(e)) => Attempt::Done(Err(e)),
            Attempt::Blocked(b) => Attempt::Blocked(b),
            Attempt::Retry => Attempt::Retry,
        }
    })
}

/// A new handle for `b` (opened from `h`) whose pin the queue block owns,
/// keeping `h`'s length and read-only flag.
/// Opens a handle of `arena` there, one of another arena through `MEMSHARE_DIR`.
fn open_in(arena: &Arena, h: &Handle) -> Result<Block> {
    if h.token == arena.token() {
        arena.open(h)
    } else {
        crate::open(h)
    }
}

/// The length of the table entry at the start of `entry` (already decoded).
fn entry_len(entry: &[u8]) -> usize {
    u32::from_le_bytes(entry[..4].try_into().expect("decoded entry")) as usize
}

/// Opens every entry of a stored message's table (adopting the queue's pins).
/// Returns the opened entries and where the payload starts.
fn open_table(arena: &Arena, bytes: &[u8]) -> Result<(Vec<(Block, ArrayMeta)>, usize)> {
    let table = message::decode_in(arena, bytes)?;
    let payload_at = bytes.len() - table.payload.len();
    let mut out = Vec::with_capacity(table.entries.len());
    for e in table.entries {
        out.push((open_in(arena, &e.handle)?, e.layout));
    }
    Ok((out, payload_at))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_roundtrip() {
        let w = pack(u32::MAX, READING, owner_tag(255, EPOCH_MASK));
        assert_eq!(unpack(w), (u32::MAX, READING, owner_tag(255, EPOCH_MASK)));
        assert_eq!(dist(0, u32::MAX as u64), 1);
        assert_eq!(dist(u32::MAX, (1u64 << 32) + 1), -2);
    }

    #[test]
    fn views_follow_the_protocol() {
        let cap = 4;
        // A fresh slot for position 5 (slot 1) holds EMPTY(1) until lap 1.
        assert_eq!(put_view(pack(1, EMPTY, 0), 5), PutView::Full);
        assert_eq!(put_view(pack(5, EMPTY, 0), 5), PutView::Claim);
        assert_eq!(put_view(pack(5, WRITING, 3), 5), PutView::Advance);
        assert_eq!(put_view(pack(5 + cap, EMPTY, 0), 5), PutView::Stale);
        assert_eq!(get_view(pack(5, WRITING, 3), 5), GetView::Empty);
        assert_eq!(get_view(pack(5, FULL, 0), 5), GetView::Claim);
        assert_eq!(get_view(pack(5, READING, 2), 5), GetView::Advance);
        assert_eq!(get_view(pack(5 + cap, EMPTY, 0), 5), GetView::Stale);
        assert_eq!(get_view(pack(1, READING, 2), 5), GetView::Empty);
    }

    struct Dir(std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    fn arena(name: &str) -> (Dir, Arena) {
        let p = std::path::PathBuf::from(format!(
            "/dev/shm/memshare-qunit-{}-{name}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        let a = Arena::create(&p).unwrap();
        (Dir(p), a)
    }

    /// An owner tag of a process that does not exist (arena slot 200).
    const DEAD: u32 = (200 << EPOCH_BITS) | 1;
    const T: Option<Duration> = Some(Duration::from_secs(10));

    /// Simulates a producer that claimed position `pos` and died.
    fn dead_writer(q: &Queue, pos: u64, payload: Option<&[u8]>) {
        let slot = q.slot(pos);
        slot.word
            .store(pack(pos as u32, WRITING, DEAD), Ordering::SeqCst);
        if let Some(p) = payload {
            // SAFETY: test-only; the slot is "claimed" and nobody else writes it.
            unsafe { std::ptr::copy_nonoverlapping(p.as_ptr(), q.data_ptr(pos), p.len()) };
            slot.len.store(p.len() as u32, Ordering::SeqCst);
            slot.kind.store(KIND_INLINE, Ordering::SeqCst);
        }
        q.hdr().tail.0.store(pos + 1, Ordering::SeqCst);
    }

    #[test]
    fn dead_producer_without_message_leaves_a_tombstone() {
        let (_d, a) = arena("tomb");
        let q = Queue::new(&a, 4, 64).unwrap();
        dead_writer(&q, 0, None);
        q.put(b"after", T).unwrap();
        assert_eq!(q.get(T).unwrap(), b"after");
        assert!(matches!(q.get(Some(Duration::ZERO)), Err(Error::Empty)));
    }

    #[test]
    fn dead_producer_with_finished_message_is_delivered() {
        let (_d, a) = arena("finished");
        let q = Queue::new(&a, 4, 64).unwrap();
        dead_writer(&q, 0, Some(b"orphan"));
        q.put(b"after", T).unwrap();
        assert_eq!(q.get(T).unwrap(), b"orphan");
        assert_eq!(q.get(T).unwrap(), b"after");
    }

    #[test]
    fn dead_consumer_slot_is_freed_with_its_memory() {
        let (_d, a) = arena("reader");
        let q = Queue::new(&a, 1, 64).unwrap();
        q.put(&[5u8; 10_000], T).unwrap(); // in its own block
        assert_eq!(a.stats().unwrap().live_blocks, 2);
        // A consumer claims position 0 and dies before taking the message.
        q.slot(0)
            .word
            .store(pack(0, READING, DEAD), Ordering::SeqCst);
        q.hdr().head.0.store(1, Ordering::SeqCst);
        assert!(matches!(
            q.get(Some(Duration::from_millis(30))),
            Err(Error::Empty)
        ));
        // A producer waiting for room repairs the slot.
        q.put(b"next", T).unwrap();
        assert_eq!(q.get(T).unwrap(), b"next");
        let s = a.stats().unwrap();
        assert_eq!(
            (s.live_blocks, s.pins),
            (1, 0),
            "the lost message was freed"
        );
    }

    /// Runs `f` on a thread; fails (instead of hanging) if it does not
    /// return within a minute.
    fn returns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(f()));
        rx.recv_timeout(Duration::from_secs(60))
            .expect("the call spins instead of returning")
    }

    // Regression (found by tests/queue_model.rs): a producer killed between
    // claiming a slot and advancing the tail left the tail behind; once the
    // slot was repaired and consumed, every later `put` spun for ever.
    #[test]
    fn tail_left_behind_by_a_dead_producer_is_advanced() {
        let (_d, a) = arena("tailbehind");
        let q = std::sync::Arc::new(Queue::new(&a, 1, 64).unwrap());
        q.slot(0)
            .word
            .store(pack(0, WRITING, DEAD), Ordering::SeqCst);
        // A consumer repairs the slot (a tombstone) and skips it.
        assert!(matches!(
            q.get(Some(Duration::from_millis(50))),
            Err(Error::Empty)
        ));
        assert_eq!(q.hdr().tail.0.load(Ordering::SeqCst), 0);
        let q2 = q.clone();
        returns(move || q2.put(b"next", T)).unwrap();
        assert_eq!(q.get(T).unwrap(), b"next");
    }

    // Regression (found by tests/queue_model.rs): a consumer killed between
    // claiming a slot and advancing the head left the head behind; once a
    // producer repaired the slot, every later `get` spun for ever.
    #[test]
    fn head_left_behind_by_a_dead_consumer_is_advanced() {
        let (_d, a) = arena("headbehind");
        let q = std::sync::Arc::new(Queue::new(&a, 1, 64).unwrap());
        q.put(b"lost", T).unwrap();
        q.slot(0)
            .word
            .store(pack(0, READING, DEAD), Ordering::SeqCst);
        // A producer waiting for room repairs the slot.
        q.put(b"next", T).unwrap();
        assert_eq!(q.hdr().head.0.load(Ordering::SeqCst), 0);
        let q2 = q.clone();
        assert_eq!(returns(move || q2.get(T)).unwrap(), b"next");
    }

    #[test]
    fn live_owner_is_never_repaired() {
        let (_d, a) = arena("live");
        let q = Queue::new(&a, 4, 64).unwrap();
        let (slot, epoch) = a.my_owner();
        q.slot(0)
            .word
            .store(pack(0, WRITING, owner_tag(slot, epoch)), Ordering::SeqCst);
        q.hdr().tail.0.store(1, Ordering::SeqCst);
        q.put(b"x", T).unwrap();
        assert!(matches!(
            q.get(Some(Duration::from_millis(50))),
            Err(Error::Empty)
        ));
    }
}
