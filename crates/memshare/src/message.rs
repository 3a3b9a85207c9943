//! Messages: the bytes that travel between processes for shared objects.
//!
//! A message lists the shared blocks it references in an explicit handle
//! table, in front of a payload the core never looks into (a pickle, for the
//! Python package):
//!
//! ```text
//! header (16 B)  "MSMG" | version u16 | 0 u16 | entry count u32 | table bytes u32
//! table entry    len u32 | handle (64 B) | itemsize u64 | byte offset u64 | ndim u8 |
//!                dtype len u16 | dtype (utf-8) | shape u64 x ndim | strides i64 x ndim |
//!                MAC u64
//! payload        the rest of the message, opaque to the core
//! ```
//! The MAC of an entry (SipHash-2-4 keyed with the secret of the arena the
//! handle names, like the handle's own MAC) covers every byte of the entry
//! before it: the handle *and* the array layout. It is checked before any
//! field of the entry is parsed or used, so a receiver only ever builds
//! views that a process of the arena described. Decoding untrusted bytes
//! never panics: every malformed input is [`Error::InvalidHandle`].
//!
//! Senders pin each listed block for its receiver (see [`crate::Block::handle`]);
//! transports such as the [`crate::Queue`] repin exactly the listed entries
//! and open exactly those on the other side, without scanning the payload.

use std::hash::Hasher;

use siphasher::sip::SipHasher24;

use crate::arena::{default_dir, Arena};
use crate::array::{ArrayMeta, MAX_NDIM};
use crate::error::{Error, Result};
use crate::handle::{Handle, HANDLE_LEN};

pub const MAGIC: &[u8; 4] = b"MSMG";
pub const VERSION: u16 = 1;
/// magic (4) | version u16 | reserved u16 | entry count u32 | table bytes u32.
pub const HEADER_LEN: usize = 16;
/// Most entries one message may list.
pub const MAX_ENTRIES: usize = 1 << 16;
/// Longest dtype description (numpy's `descr` of a structured dtype).
pub const MAX_DTYPE_LEN: usize = 1 << 15;

/// Offset of the handle inside an entry, and of the arena token in a handle.
const HANDLE_AT: usize = 4;
const TOKEN_IN_HANDLE: usize = 8;
/// len u32 + handle + itemsize u64 + offset u64 + ndim u8 + dtype len u16 + MAC u64.
const ENTRY_FIXED: usize = 4 + HANDLE_LEN + 8 + 8 + 1 + 2 + 8;

/// One table entry: a shared block and where an array lies in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub handle: Handle,
    pub layout: ArrayMeta,
}

/// A decoded message: its entries (MACs checked, layouts inside their
/// blocks) and the payload.
#[derive(Debug)]
pub struct Decoded<'a> {
    pub entries: Vec<Entry>,
    /// Byte offset of each entry in the message (see [`set_handle`]).
    pub offsets: Vec<usize>,
    pub payload: &'a [u8],
}

fn bad(what: &str) -> Error {
    Error::InvalidHandle(format!("message {what}"))
}

fn mac_of(key: &[u8; 16], body: &[u8]) -> u64 {
    let mut h = SipHasher24::new_with_key(key);
    h.write(body);
    h.finish()
}

/// How many table entries `bytes` lists, read from the header alone (no
/// checks: [`decode`] checks). Zero for anything that is not a message. A
/// message that lists none opens no block, so it needs no arena lock.
pub fn entry_count(bytes: &[u8]) -> usize {
    if bytes.len() < HEADER_LEN || !is_message(bytes) {
        return 0;
    }
    u32_at(bytes, 8) as usize
}

/// True if `bytes` start like a message (the magic number).
pub fn is_message(bytes: &[u8]) -> bool {
    bytes.get(..4) == Some(&MAGIC[..])
}

/// An error unless `m` can be an entry for a block of `block_len` bytes.
pub fn check_layout(m: &ArrayMeta, block_len: usize) -> Result<()> {
    if m.dtype.len() > MAX_DTYPE_LEN {
        return Err(Error::InvalidArgument(format!(
            "dtype description of {} bytes is too long (at most {MAX_DTYPE_LEN})",
            m.dtype.len()
        )));
    }
    if m.shape.len() > MAX_NDIM || m.shape.len() != m.strides.len() {
        return Err(Error::InvalidArgument(format!(
            "arrays have at most {MAX_NDIM} dimensions and one stride per dimension"
        )));
    }
    m.check_bounds(block_len)
}

/// Builds a message entry by entry.
pub struct Encoder {
    buf: Vec<u8>,
    count: u32,
}

impl Default for Encoder {
    fn default() -> Self {
        Self::new()
    }
}

impl Encoder {
    pub fn new() -> Encoder {
        let mut buf = Vec::with_capacity(HEADER_LEN + 128);
        buf.extend_from_slice(MAGIC);
        buf.extend_from_slice(&VERSION.to_le_bytes());
        buf.extend_from_slice(&[0; 10]);
        Encoder { buf, count: 0 }
    }

    /// Appends an entry, authenticated with `key` (the secret of the arena
    /// that `entry.handle` names).
    pub fn push(&mut self, entry: &Entry, key: &[u8; 16]) -> Result<()> {
        let m = &entry.layout;
        check_layout(m, entry.handle.len as usize)?;
        if self.count as usize >= MAX_ENTRIES {
            return Err(Error::InvalidArgument(format!(
                "a message lists at most {MAX_ENTRIES} shared arrays"
            )));
        }
        let start = self.buf.len();
        let len = ENTRY_FIXED + m.dtype.len() + 16 * m.shape.len();
        self.buf.extend_from_slice(&(len as u32).to_le_bytes());
        self.buf.extend_from_slice(&entry.handle.to_bytes());
        self.buf
            .extend_from_slice(&(m.itemsize as u64).to_le_bytes());
        self.buf.extend_from_slice(&(m.offset as u64).to_le_bytes());
        self.buf.push(m.shape.len() as u8);
        self.buf
            .extend_from_slice(&(m.dtype.len() as u16).to_le_bytes());
        self.buf.extend_from_slice(m.dtype.as_bytes());
        for &n in &m.shape {
            self.buf.extend_from_slice(&(n as u64).to_le_bytes());
        }
        for &s in &m.strides {
            self.buf.extend_from_slice(&(s as i64).to_le_bytes());
        }
        let mac = mac_of(key, &self.buf[start..]);
        self.buf.extend_from_slice(&mac.to_le_bytes());
        debug_assert_eq!(self.buf.len() - start, len);
        self.count += 1;
        Ok(())
    }

    /// Bytes written so far: where the next entry starts in the message.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// True before anything but the header is written.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The message: header, table, then `payload`.
    pub fn finish(mut self, payload: &[u8]) -> Vec<u8> {
        let table = (self.buf.len() - HEADER_LEN) as u32;
        self.buf[8..12].copy_from_slice(&self.count.to_le_bytes());
        self.buf[12..16].copy_from_slice(&table.to_le_bytes());
        self.buf.extend_from_slice(payload);
        self.buf
    }
}

/// Encodes `entries` (each with the key of its arena) and `payload`.
pub fn encode(entries: &[(Entry, [u8; 16])], payload: &[u8]) -> Result<Vec<u8>> {
    let mut e = Encoder::new();
    for (entry, key) in entries {
        e.push(entry, key)?;
    }
    Ok(e.finish(payload))
}

fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([b[i], b[i + 1]])
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], i: usize) -> u64 {
    u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"))
}

/// Decodes a message (untrusted input). `key_of` gives the secret of the
/// arena named by a token (its errors, e.g. an arena that no longer exists,
/// are returned as they are). Each entry's MAC is verified before the entry
/// is parsed; each layout is checked against its handle's length.
pub fn decode<'a>(
    bytes: &'a [u8],
    mut key_of: impl FnMut(&[u8; 16]) -> Result<[u8; 16]>,
) -> Result<Decoded<'a>> {
    if bytes.len() < HEADER_LEN {
        return Err(bad("is truncated"));
    }
    if !is_message(bytes) {
        return Err(bad("has a bad magic number (not a memshare message)"));
    }
    let version = u16_at(bytes, 4);
    if version != VERSION {
        return Err(bad(&format!(
            "format version {version} is not {VERSION} (made by another memshare version?)"
        )));
    }
    if u16_at(bytes, 6) != 0 {
        return Err(bad("has unknown flags"));
    }
    let count = u32_at(bytes, 8) as usize;
    let table = u32_at(bytes, 12) as usize;
    let end = HEADER_LEN
        .checked_add(table)
        .filter(|&e| e <= bytes.len())
        .ok_or_else(|| bad("table runs past its end"))?;
    if count > MAX_ENTRIES || count > table / ENTRY_FIXED {
        return Err(bad("lists more entries than its table holds"));
    }
    let mut entries = Vec::with_capacity(count);
    let mut offsets = Vec::with_capacity(count);
    let mut pos = HEADER_LEN;
    for _ in 0..count {
        if end - pos < ENTRY_FIXED {
            return Err(bad("table is truncated"));
        }
        let len = u32_at(bytes, pos) as usize;
        if len < ENTRY_FIXED || len > end - pos {
            return Err(bad("entry has a bad length"));
        }
        let e = &bytes[pos..pos + len];
        let mut token = [0u8; 16];
        token.copy_from_slice(&e[HANDLE_AT + TOKEN_IN_HANDLE..HANDLE_AT + TOKEN_IN_HANDLE + 16]);
        let key = key_of(&token)?;
        if mac_of(&key, &e[..len - 8]) != u64_at(e, len - 8) {
            return Err(bad(
                "entry failed authentication (forged, damaged or foreign bytes)",
            ));
        }
        entries.push(parse_entry(e)?);
        offsets.push(pos);
        pos += len;
    }
    if pos != end {
        return Err(bad("table has trailing bytes"));
    }
    Ok(Decoded {
        entries,
        offsets,
        payload: &bytes[end..],
    })
}

/// Decodes a message whose entries may name any arena of this user (found
/// through `MEMSHARE_DIR`, attached if need be). An arena that no longer
/// exists is [`Error::NotFound`]: the data was freed.
pub fn decode_any(bytes: &[u8]) -> Result<Decoded<'_>> {
    decode(bytes, |t| Ok(Arena::attach(&default_dir(), *t)?.mac_key()))
}

/// Decodes a message, looking entries of `arena` up there (whatever
/// directory it lives in) and others through `MEMSHARE_DIR`.
pub fn decode_in<'a>(arena: &Arena, bytes: &'a [u8]) -> Result<Decoded<'a>> {
    decode(bytes, |t| {
        if *t == arena.token() {
            Ok(arena.mac_key())
        } else {
            Ok(Arena::attach(&default_dir(), *t)?.mac_key())
        }
    })
}

/// The secret that authenticates entries for blocks of `arena`.
pub fn key_of(arena: &Arena) -> [u8; 16] {
    arena.mac_key()
}

/// Parses an authenticated entry (still checked: a MAC proves who wrote it,
/// not that the writer was right).
fn parse_entry(e: &[u8]) -> Result<Entry> {
    let handle = Handle::from_bytes(&e[HANDLE_AT..HANDLE_AT + HANDLE_LEN])?;
    let mut p = HANDLE_AT + HANDLE_LEN;
    let itemsize = u64_at(e, p);
    let offset = u64_at(e, p + 8);
    let ndim = e[p + 16] as usize;
    let dlen = u16_at(e, p + 17) as usize;
    p += 19;
    if ndim > MAX_NDIM || dlen > MAX_DTYPE_LEN {
        return Err(bad("entry has too many dimensions or too long a dtype"));
    }
    if e.len() != ENTRY_FIXED + dlen + 16 * ndim {
        return Err(bad("entry length does not match its layout"));
    }
    let dtype = std::str::from_utf8(&e[p..p + dlen])
        .map_err(|_| bad("entry has a non-UTF-8 dtype"))?
        .to_string();
    p += dlen;
    let to_usize = |v: u64| usize::try_from(v).map_err(|_| bad("entry has an oversized field"));
    let mut shape = Vec::with_capacity(ndim);
    for i in 0..ndim {
        shape.push(to_usize(u64_at(e, p + 8 * i))?);
    }
    p += 8 * ndim;
    let mut strides = Vec::with_capacity(ndim);
    for i in 0..ndim {
        let s = u64_at(e, p + 8 * i) as i64;
        strides.push(isize::try_from(s).map_err(|_| bad("entry has an oversized stride"))?);
    }
    let layout = ArrayMeta {
        dtype,
        itemsize: to_usize(itemsize)?,
        shape,
        strides,
        offset: to_usize(offset)?,
    };
    layout.check_bounds(to_usize(handle.len)?)?;
    Ok(Entry { handle, layout })
}

/// Replaces the handle of the entry at `at` in `msg` (an offset from
/// [`Decoded::offsets`]) and authenticates the entry again with `key`.
/// Used by transports that repin an entry to themselves.
pub fn set_handle(msg: &mut [u8], at: usize, handle: &Handle, key: &[u8; 16]) -> Result<()> {
    let len = msg
        .get(at..at + 4)
        .map(|b| u32_at(b, 0) as usize)
        .filter(|&l| l >= ENTRY_FIXED && at + l <= msg.len())
        .ok_or_else(|| bad("entry offset is out of range"))?;
    let e = &mut msg[at..at + len];
    e[HANDLE_AT..HANDLE_AT + HANDLE_LEN].copy_from_slice(&handle.to_bytes());
    let mac = mac_of(key, &e[..len - 8]);
    e[len - 8..].copy_from_slice(&mac.to_le_bytes());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const KEY: [u8; 16] = [7; 16];

    fn keys(t: &[u8; 16]) -> Result<[u8; 16]> {
        Ok(if t[0] == 1 { KEY } else { [9; 16] })
    }

    fn layout_strategy() -> impl Strategy<Value = (ArrayMeta, u64)> {
        (
            "[<>|][a-zA-Z][0-9]{1,2}|\\{\"f\":\\[\\]\\}",
            1usize..32,
            proptest::collection::vec(0usize..6, 0..5),
            0usize..256,
        )
            .prop_map(|(dtype, itemsize, shape, offset)| {
                let mut m = ArrayMeta::c_order(&dtype, itemsize, &shape);
                m.offset = offset;
                let len = (offset + m.nbytes()) as u64;
                (m, len)
            })
    }

    fn entry_strategy() -> impl Strategy<Value = Entry> {
        (
            layout_strategy(),
            any::<u64>(),
            any::<u32>(),
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(|((layout, len), generation, pin, ro, arena1)| {
                let token = [if arena1 { 1 } else { 2 }; 16];
                let key = keys(&token).unwrap();
                let handle =
                    Handle::new(token, 3, 4096, generation, len, Some(pin), 2, 5, ro, &key);
                Entry { handle, layout }
            })
    }

    proptest! {
        /// The codec against the model "a list of entries and a byte string".
        #[test]
        fn table_roundtrips(entries in proptest::collection::vec(entry_strategy(), 0..6),
                            payload in proptest::collection::vec(any::<u8>(), 0..64)) {
            let keyed: Vec<_> = entries.iter().map(|e| (e.clone(), keys(&e.handle.token).unwrap())).collect();
            let msg = encode(&keyed, &payload).unwrap();
            let d = decode(&msg, keys).unwrap();
            prop_assert_eq!(&d.entries, &entries);
            prop_assert_eq!(d.payload, &payload[..]);
            prop_assert_eq!(d.offsets.len(), entries.len());
        }

        /// Any change inside the table fails to decode.
        #[test]
        fn table_bit_flips_are_rejected(entry in entry_strategy(), at in any::<prop::sample::Index>(), bit in 0u8..8) {
            let key = keys(&entry.handle.token).unwrap();
            let mut msg = encode(&[(entry, key)], b"payload").unwrap();
            let table_end = msg.len() - 7;
            let i = at.index(table_end);
            msg[i] ^= 1 << bit;
            prop_assert!(matches!(decode(&msg, keys), Err(Error::InvalidHandle(_))));
        }

        #[test]
        fn random_bytes_never_panic(mut bytes in proptest::collection::vec(any::<u8>(), 0..200), magic in any::<bool>()) {
            if magic && bytes.len() >= 6 {
                bytes[..4].copy_from_slice(MAGIC);
                bytes[4..6].copy_from_slice(&VERSION.to_le_bytes());
            }
            match decode(&bytes, keys) {
                Ok(d) => prop_assert!(d.entries.is_empty()),
                Err(e) => prop_assert!(matches!(e, Error::InvalidHandle(_))),
            }
        }

        /// Repinning one entry keeps the others and the payload.
        #[test]
        fn set_handle_replaces_one_entry(entries in proptest::collection::vec(entry_strategy(), 1..4), which in any::<prop::sample::Index>()) {
            let keyed: Vec<_> = entries.iter().map(|e| (e.clone(), keys(&e.handle.token).unwrap())).collect();
            let mut msg = encode(&keyed, b"xyz").unwrap();
            let i = which.index(entries.len());
            let offsets = decode(&msg, keys).unwrap().offsets;
            let old = &entries[i].handle;
            let key = keys(&old.token).unwrap();
            let new = Handle::new(old.token, 9, 8192, 1, old.len, None, 0, 0, false, &key);
            set_handle(&mut msg, offsets[i], &new, &key).unwrap();
            let d = decode(&msg, keys).unwrap();
            let mut want = entries.clone();
            want[i].handle = new;
            prop_assert_eq!(d.entries, want);
            prop_assert_eq!(d.payload, b"xyz");
        }
    }

    #[test]
    fn wrong_key_and_layout_outside_the_block() {
        let layout = ArrayMeta::c_order("<f8", 8, &[4]);
        let h = Handle::new([1; 16], 0, 128, 1, 32, None, 0, 0, false, &KEY);
        let entry = Entry { handle: h, layout };
        let msg = encode(&[(entry.clone(), KEY)], b"").unwrap();
        assert!(matches!(
            decode(&msg, |_| Ok([0; 16])),
            Err(Error::InvalidHandle(_))
        ));
        let mut too_big = entry;
        too_big.layout.shape = vec![5];
        assert!(encode(&[(too_big, KEY)], b"").is_err());
        // A key lookup failure (arena gone) is passed through unchanged.
        let gone = decode(&msg, |_| Err(Error::NotFound { path: "x".into() }));
        assert!(matches!(gone, Err(Error::NotFound { .. })));
    }
}
