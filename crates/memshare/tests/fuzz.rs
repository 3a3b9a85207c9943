//! Mutation fuzzing of everything that decodes untrusted bytes: handles and
//! array messages (from pickles) against a live arena. Deterministic and
//! bounded so it runs in CI: `MEMSHARE_FUZZ_ITERS` raises the count. Seeds
//! come from the committed corpus in `tests/corpus/` plus fresh valid inputs.

use std::path::PathBuf;

use memshare::{Arena, ArrayMeta, Handle, SharedArray};

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
    let valid_msg = a
        .meta()
        .encode(&Handle::from_bytes(&a.to_bytes().unwrap()[4..68]).unwrap());
    let valid_handle = b.handle().unwrap().to_bytes().to_vec();
    let mut seeds = corpus();
    seeds.push(valid_msg.clone());
    seeds.push(valid_handle.clone());
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
        if let Ok((h, meta)) = ArrayMeta::decode(&input) {
            if let Ok(block) = arena.open(&h) {
                meta.check_bounds(block.len()).unwrap();
                accepted += 1;
            }
        }
    }
    eprintln!("fuzz: {executions} executions, {accepted} inputs accepted (unmutated or harmless mutations)");
    // Adopt the pins of the valid inputs in case no unmutated copy was drawn.
    drop(arena.open(&Handle::from_bytes(&valid_handle).unwrap()));
    drop(arena.open(&ArrayMeta::decode(&valid_msg).unwrap().0));
    drop((a, b));
    let s = arena.stats().unwrap();
    assert_eq!(s.live_blocks, 0, "opened blocks were all released");
    arena.detach().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
