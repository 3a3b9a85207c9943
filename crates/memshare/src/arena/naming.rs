//! Names and configuration: where an arena's files live, how tokens are
//! spelled, and how size settings such as `MEMSHARE_LIMIT` are parsed.

use std::path::{Path, PathBuf};

pub fn hex(token: &[u8; 16]) -> String {
    token.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn parse_hex(s: &str) -> Option<[u8; 16]> {
    if s.len() != 32 || !s.bytes().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// The directory holding segments: `MEMSHARE_DIR`, else /dev/shm.
pub fn default_dir() -> PathBuf {
    std::env::var_os("MEMSHARE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/dev/shm"))
}

pub fn ctl_path(dir: &Path, token: &[u8; 16]) -> PathBuf {
    dir.join(format!("memshare-{}", hex(token)))
}

pub fn seg_path(dir: &Path, token: &[u8; 16], index: u32) -> PathBuf {
    dir.join(format!("memshare-{}-{index}", hex(token)))
}

/// Parses `MEMSHARE_LIMIT`-style sizes: `1073741824`, `512M`, `8G`, `1.5GiB`.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let num: f64 = num.trim().parse().ok()?;
    let mult: u64 = match unit
        .trim()
        .to_ascii_lowercase()
        .trim_end_matches("ib")
        .trim_end_matches('b')
    {
        "" => 1,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        "t" => 1 << 40,
        _ => return None,
    };
    if !num.is_finite() || num < 0.0 {
        return None;
    }
    Some((num * mult as f64) as u64)
}
