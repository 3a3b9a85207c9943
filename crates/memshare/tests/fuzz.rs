//! Mutation fuzzing of everything that decodes untrusted bytes: handles and
//! messages (header, handle table, layouts) against a live arena: every bad
//! input is `InvalidHandle`, never a panic or a view outside its block. Deterministic and
//! bounded so it runs in CI: `MEMSHARE_FUZZ_ITERS` raises the count. Seeds
//! come from the committed corpus in `tests/corpus/` plus fresh valid inputs.

use std::path::PathBuf;

use memshare::message::{self, Entry};
use memshare::{Arena, ArrayMeta, Error, Handle, Result, SharedArray};

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn mutate(rng: &mut XorShift, input: &[u8]) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..=rng.below(4) {
        match rng.below(6) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] ^= 1 << rng.below(8);
            }
            1 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = rng.next() as u8;
            }
            2 => v.truncate(rng.below(v.len() + 1)),
            3 => v.push(rng.next() as u8),
            4 if v.len() >= 8 => {
                // Overwrite a little-endian integer field with an extreme value.
                let i = rng.below(v.len() - 7);
                let vals = [0u64, 1, u64::MAX, u64::MAX / 2, 1 << 48, 63, 64];
                v[i..i + 8].copy_from_slice(&vals[rng.below(vals.len())].to_le_bytes());
            }
            _ => {}
        }
    }
    v
}

fn corpus() -> Vec<Vec<u8>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/corpus");
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        out.push(std::fs::read(e.unwrap().path()).unwrap());
    }
    out
}

/// Fresh valid messages over `a` (a 64 x 32 f8 array): the whole array, a
/// negative-stride view, a scalar, an empty view, a structured dtype, two
/// entries with a payload.
fn valid_messages(arena: &Arena, a: &SharedArray) -> Result<Vec<Vec<u8>>> {
    let key = message::key_of(arena);
    let entry = |layout: ArrayMeta| -> Result<(Entry, [u8; 16])> {
        Ok((
            Entry {
                handle: a.block().handle()?,
                layout,
            },
            key,
        ))
    };
    let whole = a.meta().clone();
    let mut rev = ArrayMeta::c_order("<f8", 8, &[64]);
    rev.strides = vec![-256];
    rev.offset = 63 * 256;
    let scalar = ArrayMeta::c_order("<f8", 8, &[]);
    let empty = ArrayMeta::c_order("|u1", 1, &[0, 5]);
    let structured = ArrayMeta::c_order(
        r#"{"names":["a","b"],"formats":["<i4","<f8"],"offsets":[0,8],"itemsize":16}"#,
        16,
        &[128],
    );
    Ok(vec![
        message::encode(&[entry(whole.clone())?], b"")?,
        message::encode(&[entry(rev)?], b"")?,
        message::encode(&[entry(scalar)?], b"")?,
        message::encode(&[entry(empty)?], b"")?,
        message::encode(&[entry(structured)?], b"")?,
        message::encode(&[entry(whole.clone())?, entry(whole)?], b"\x80\x05pickle")?,
    ])
}

#[test]
fn fuzz_handles_and_array_messages() {
    let iters: usize = std::env::var("MEMSHARE_FUZZ_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300_000);
    let dir = PathBuf::from(format!(
        "/dev/shm/memshare-rust-fuzz-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let arena = Arena::create(&dir).unwrap();
    // Live targets: an array and a raw block.
    let a = SharedArray::zeros::<f64>(&arena, &[64, 32]).unwrap();
    let b = arena.alloc(4096, false).unwrap();
    let valid_msgs = valid_messages(&arena, &a).unwrap();
    let valid_handle = b.handle().unwrap().to_bytes().to_vec();
    let mut seeds = corpus();
    seeds.extend(valid_msgs.iter().cloned());
    seeds.push(valid_handle.clone());
    let (token, key) = (arena.token(), message::key_of(&arena));
    let keys = |t: &[u8; 16]| -> Result<[u8; 16]> {
        if *t == token {
            Ok(key)
        } else {
            Err(Error::InvalidHandle(
                "handle belongs to another arena".into(),
            ))
        }
    };
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let (mut accepted, mut executions) = (0usize, 0usize);
    for i in 0..iters {
        let input = mutate(&mut rng, &seeds[i % seeds.len()]);
        executions += 1;
        if let Ok(h) = Handle::from_bytes(&input) {
            if let Ok(block) = arena.open(&h) {
                // Only an exact valid handle may open, and it must be in bounds.
                assert!(block.len() <= block.capacity());
                accepted += 1;
            }
        }
        match message::decode(&input, keys) {
            Ok(d) => {
                for e in d.entries {
                    if let Ok(block) = arena.open(&e.handle) {
                        e.layout.check_bounds(block.len()).unwrap();
                        accepted += 1;
                    }
                }
            }
            Err(e) => assert!(
                matches!(e, Error::InvalidHandle(_)),
                "a bad message gave {e:?}, not InvalidHandle"
            ),
        }
    }
    eprintln!("fuzz: {executions} executions, {accepted} inputs accepted (unmutated or harmless mutations)");
    // Adopt the pins of the valid inputs in case no unmutated copy was drawn.
    drop(arena.open(&Handle::from_bytes(&valid_handle).unwrap()));
    for m in &valid_msgs {
        for e in message::decode(m, keys).unwrap().entries {
            drop(arena.open(&e.handle));
        }
    }
    drop((a, b));
    let s = arena.stats().unwrap();
    assert_eq!(s.live_blocks, 0, "opened blocks were all released");
    arena.detach().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
