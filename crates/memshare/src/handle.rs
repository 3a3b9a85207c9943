//! Handles: the 64 bytes that travel between processes instead of the data.
//!
//! ```text
//! 0      1      2        4         8          24       32          40    48        52        56    64
//! | ver  | flags| slot   | segment | token    | offset | generation | len | pin idx | pin ep. | MAC |
//! ```
//! Decoding never trusts its input: the length, version and flags are checked,
//! and the MAC (SipHash-2-4 keyed with the arena's secret) is verified before
//! any field is used to find memory. The MAC does not make handles secret —
//! anyone who can read the arena can mint them — it makes forged, damaged and
//! foreign bytes fail cleanly instead of aliasing live memory.

use std::hash::Hasher;

use siphasher::sip::SipHasher24;

use crate::error::{Error, Result};

pub const HANDLE_LEN: usize = 64;
pub const HANDLE_VERSION: u8 = 1;

const FLAG_PINNED: u8 = 1;
const FLAG_READONLY: u8 = 2;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handle {
    pub token: [u8; 16],
    pub segment: u32,
    pub offset: u64,
    pub generation: u64,
    pub len: u64,
    pub pin: Option<u32>,
    pub pin_slot: u32,
    pub pin_epoch: u32,
    pub readonly: bool,
    mac: u64,
}

fn mac_of(key: &[u8; 16], body: &[u8]) -> u64 {
    let mut h = SipHasher24::new_with_key(key);
    h.write(body);
    h.finish()
}

impl Handle {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        token: [u8; 16],
        segment: u32,
        offset: u64,
        generation: u64,
        len: u64,
        pin: Option<u32>,
        pin_slot: u32,
        pin_epoch: u32,
        readonly: bool,
        key: &[u8; 16],
    ) -> Handle {
        let mut h = Handle {
            token,
            segment,
            offset,
            generation,
            len,
            pin,
            pin_slot,
            pin_epoch,
            readonly,
            mac: 0,
        };
        let bytes = h.to_bytes();
        h.mac = mac_of(key, &bytes[..56]);
        h
    }

    pub fn to_bytes(&self) -> [u8; HANDLE_LEN] {
        let mut b = [0u8; HANDLE_LEN];
        b[0] = HANDLE_VERSION;
        b[1] = if self.pin.is_some() { FLAG_PINNED } else { 0 }
            | if self.readonly { FLAG_READONLY } else { 0 };
        b[2..4].copy_from_slice(&(self.pin_slot as u16).to_le_bytes());
        b[4..8].copy_from_slice(&self.segment.to_le_bytes());
        b[8..24].copy_from_slice(&self.token);
        b[24..32].copy_from_slice(&self.offset.to_le_bytes());
        b[32..40].copy_from_slice(&self.generation.to_le_bytes());
        b[40..48].copy_from_slice(&self.len.to_le_bytes());
        b[48..52].copy_from_slice(&self.pin.unwrap_or(0).to_le_bytes());
        b[52..56].copy_from_slice(&self.pin_epoch.to_le_bytes());
        b[56..64].copy_from_slice(&self.mac.to_le_bytes());
        b
    }

    /// Parses handle bytes. Structure only: call [`Handle::verify`] with the
    /// arena's key before using the handle.
    pub fn from_bytes(b: &[u8]) -> Result<Handle> {
        if b.len() != HANDLE_LEN {
            return Err(Error::InvalidHandle(format!(
                "expected {HANDLE_LEN} bytes, got {}",
                b.len()
            )));
        }
        if b[0] != HANDLE_VERSION {
            return Err(Error::InvalidHandle(format!(
                "handle format version {} is not {HANDLE_VERSION} (made by another memshare version?)",
                b[0]
            )));
        }
        if b[1] & !(FLAG_PINNED | FLAG_READONLY) != 0 {
            return Err(Error::InvalidHandle("unknown flags".into()));
        }
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        if b[1] & FLAG_PINNED == 0 && u32_at(48) != 0 {
            return Err(Error::InvalidHandle(
                "pin index set on an unpinned handle".into(),
            ));
        }
        let mut token = [0u8; 16];
        token.copy_from_slice(&b[8..24]);
        Ok(Handle {
            token,
            segment: u32_at(4),
            offset: u64_at(24),
            generation: u64_at(32),
            len: u64_at(40),
            pin: (b[1] & FLAG_PINNED != 0).then(|| u32_at(48)),
            pin_slot: u16::from_le_bytes([b[2], b[3]]) as u32,
            pin_epoch: u32_at(52),
            readonly: b[1] & FLAG_READONLY != 0,
            mac: u64_at(56),
        })
    }

    /// Checks the MAC against the arena's key.
    pub fn verify(&self, key: &[u8; 16]) -> Result<()> {
        let bytes = self.to_bytes();
        if mac_of(key, &bytes[..56]) != self.mac {
            return Err(Error::InvalidHandle(
                "authentication failed (forged or damaged handle bytes)".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample(key: &[u8; 16]) -> Handle {
        Handle::new([7; 16], 3, 4096, 99, 1000, Some(12), 5, 8, true, key)
    }

    #[test]
    fn roundtrip_and_verify() {
        let key = [1; 16];
        let h = sample(&key);
        let back = Handle::from_bytes(&h.to_bytes()).unwrap();
        assert_eq!(back, h);
        back.verify(&key).unwrap();
        assert!(back.verify(&[2; 16]).is_err());
    }

    #[test]
    fn truncated_and_wrong_version() {
        let h = sample(&[1; 16]).to_bytes();
        assert!(Handle::from_bytes(&h[..63]).is_err());
        let mut v = h;
        v[0] = 9;
        assert!(matches!(
            Handle::from_bytes(&v),
            Err(Error::InvalidHandle(_))
        ));
    }

    proptest! {
        #[test]
        fn codec_roundtrips(seg in any::<u32>(), off in any::<u64>(), generation in any::<u64>(), len in any::<u64>(),
                            pin in proptest::option::of(any::<u32>()), slot in 0u32..256, epoch in any::<u32>(), ro in any::<bool>()) {
            let key = [3; 16];
            let h = Handle::new([9; 16], seg, off, generation, len, pin, slot, epoch, ro, &key);
            let back = Handle::from_bytes(&h.to_bytes()).unwrap();
            prop_assert_eq!(&back, &h);
            prop_assert!(back.verify(&key).is_ok());
        }

        #[test]
        fn any_bit_flip_is_rejected(byte in 0usize..64, bit in 0u8..8) {
            let key = [4; 16];
            let mut b = sample(&key).to_bytes();
            b[byte] ^= 1 << bit;
            let ok = Handle::from_bytes(&b).and_then(|h| h.verify(&key)).is_ok();
            prop_assert!(!ok);
        }

        #[test]
        fn random_bytes_never_verify(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            let ok = Handle::from_bytes(&bytes).and_then(|h| h.verify(&[5; 16])).is_ok();
            prop_assert!(!ok);
        }
    }
}
