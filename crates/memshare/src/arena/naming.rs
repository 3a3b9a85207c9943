//! Names and configuration: where an arena's files live, how tokens are
//! spelled, and how size settings such as `MEMSHARE_LIMIT` are parsed.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

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

/// The directory holding segments: `MEMSHARE_DIR`, else /dev/shm (an empty
/// `MEMSHARE_DIR` counts as unset, as the other switches' empty values do).
pub fn default_dir() -> PathBuf {
    std::env::var_os("MEMSHARE_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/dev/shm"))
}

pub fn ctl_path(dir: &Path, token: &[u8; 16]) -> PathBuf {
    dir.join(format!("memshare-{}", hex(token)))
}

/// The file of data segment `index`, whose random `name` is recorded in the
/// control segment: nobody can create it before us, since nobody can guess it.
pub fn seg_path(dir: &Path, token: &[u8; 16], index: u32, name: u64) -> PathBuf {
    dir.join(format!("memshare-{}-{index}-{name:016x}", hex(token)))
}

/// The forms a size setting accepts, for error messages.
pub const SIZE_FORMS: &str =
    "bytes (1073741824) or a number with K, M, G or T (512M, 8G, 1.5G; KiB/KB spellings too)";

/// Parses a size setting: plain bytes (`1073741824`) or a decimal number with
/// a binary unit (`512K`, `512M`, `8G`, `1.5GiB`, `2TB`). Anything else
/// (`lots`, `-1`, `1e30`, `1.5x`, a fraction of a byte, more than 2^62
/// bytes) is None.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let (whole, frac) = num.split_once('.').unwrap_or((num, ""));
    if whole.is_empty() || !whole.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    if num.contains('.') && (frac.is_empty() || !frac.bytes().all(|c| c.is_ascii_digit())) {
        return None;
    }
    let unit = unit.trim().to_ascii_lowercase();
    let shift = match unit.as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return None,
    };
    if shift == 0 && !frac.is_empty() {
        return None; // a fraction of a byte
    }
    let whole: u64 = whole.parse().ok()?;
    let mut bytes = whole.checked_mul(1u64 << shift)?;
    if !frac.is_empty() {
        // Exact decimal fraction of the unit, without floating point.
        let digits = &frac[..frac.len().min(12)];
        let f: u64 = digits.parse().ok()?;
        let scale = 10u64.pow(digits.len() as u32);
        bytes = bytes.checked_add((f as u128 * (1u128 << shift) / scale as u128) as u64)?;
    }
    (bytes <= 1 << 62).then_some(bytes)
}

/// The arena limit set by `MEMSHARE_LIMIT`: `u64::MAX` (no limit) when unset
/// or `0`; a clear error naming the variable and the accepted forms otherwise.
pub fn limit_from_env() -> Result<u64> {
    let Ok(value) = std::env::var("MEMSHARE_LIMIT") else {
        return Ok(u64::MAX);
    };
    match parse_size(&value) {
        Some(0) => Ok(u64::MAX),
        Some(n) => Ok(n),
        None => Err(Error::InvalidArgument(format!(
            "MEMSHARE_LIMIT={value:?} is not a size; use {SIZE_FORMS}, or 0 for no limit"
        ))),
    }
}

/// Idle free bytes an arena keeps committed when `MEMSHARE_RETAIN` is unset.
pub const DEFAULT_RETAIN: u64 = 16 << 20;

/// The warm cache set by `MEMSHARE_RETAIN` (default [`DEFAULT_RETAIN`]).
pub fn retain_from_env() -> Result<u64> {
    match std::env::var("MEMSHARE_RETAIN") {
        Err(_) => Ok(DEFAULT_RETAIN),
        Ok(value) => parse_size(&value).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "MEMSHARE_RETAIN={value:?} is not a size; use {SIZE_FORMS}"
            ))
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse_exactly_or_not_at_all() {
        assert_eq!(parse_size("1073741824"), Some(1 << 30));
        assert_eq!(parse_size("512M"), Some(512 << 20));
        assert_eq!(parse_size(" 8g "), Some(8 << 30));
        assert_eq!(parse_size("1.5GiB"), Some(3 << 29));
        assert_eq!(parse_size("50MB"), Some(50 << 20));
        assert_eq!(parse_size("0"), Some(0));
        for bad in [
            "", "lots", "-1", "1e30", "1.5x", "1.5", "1.", ".5G", "inf", "nan", "9999999T", "8 G B",
        ] {
            assert_eq!(parse_size(bad), None, "{bad:?}");
        }
    }
}
