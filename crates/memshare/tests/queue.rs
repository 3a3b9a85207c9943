//! Integration tests of the shared-memory queue: semantics, MPMC correctness
//! across threads and processes, timeouts, and producers/consumers killed
//! with SIGKILL at random instants.

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use memshare::{Arena, Error, Handle, Queue, SharedArray};
use ndarray::{ArrayD, IxDyn};

struct TestDir(PathBuf);

impl TestDir {
    fn new(name: &str) -> TestDir {
        let p = PathBuf::from(format!(
            "/dev/shm/memshare-rust-qtest-{}-{name}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TestDir(p)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const T: Option<Duration> = Some(Duration::from_secs(30));
const NOW: Option<Duration> = Some(Duration::ZERO);

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn spawn_child(test: &str, dir: &TestDir, q: &Queue, extra: &[(&str, String)]) -> Child {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env("MEMSHARE_DIR", &dir.0)
        .env("MEMSHARE_TEST_QUEUE", hex(&q.handle().unwrap().to_bytes()));
    for (k, v) in extra {
        c.env(k, v);
    }
    c.spawn().unwrap()
}

fn child_queue() -> Option<Queue> {
    let h = std::env::var("MEMSHARE_TEST_QUEUE").ok()?;
    let h = Handle::from_bytes(&unhex(&h)).unwrap();
    Some(Queue::from_handle(&h).unwrap())
}

fn assert_clean(arena: &Arena) {
    arena.reap().unwrap();
    let s = arena.stats().unwrap();
    assert_eq!((s.live_blocks, s.pins), (0, 0), "{s:?}");
}

#[test]
fn fifo_full_empty_and_sizes() {
    let dir = TestDir::new("basic");
    let arena = Arena::create(&dir.0).unwrap();
    let q = Queue::new(&arena, 3, 100).unwrap();
    assert!(q.is_empty());
    assert!(matches!(q.get(NOW), Err(Error::Empty)));
    let big = vec![7u8; 1 << 20];
    q.put(b"one", NOW).unwrap();
    q.put(&big, NOW).unwrap();
    q.put(b"", NOW).unwrap();
    assert!(q.is_full());
    assert_eq!(q.len(), 3);
    assert!(matches!(q.put(b"four", NOW), Err(Error::Full)));
    assert_eq!(q.get(NOW).unwrap(), b"one");
    assert_eq!(q.get(NOW).unwrap(), big);
    assert_eq!(q.get(NOW).unwrap(), b"");
    for i in 0..100u32 {
        q.put(&i.to_le_bytes(), NOW).unwrap();
        assert_eq!(q.get(NOW).unwrap(), i.to_le_bytes());
    }
    drop(q);
    assert_clean(&arena);
}

#[test]
fn timeouts_are_honoured() {
    let dir = TestDir::new("timeouts");
    let arena = Arena::create(&dir.0).unwrap();
    let q = Queue::new(&arena, 1, 64).unwrap();
    for ms in [1u64, 10, 50] {
        let t0 = Instant::now();
        assert!(matches!(
            q.get(Some(Duration::from_millis(ms))),
            Err(Error::Empty)
        ));
        assert!(t0.elapsed() >= Duration::from_millis(ms));
    }
    q.put(b"x", NOW).unwrap();
    let t0 = Instant::now();
    assert!(matches!(
        q.put(b"y", Some(Duration::from_millis(20))),
        Err(Error::Full)
    ));
    assert!(t0.elapsed() >= Duration::from_millis(20));
}

#[test]
fn blocked_get_is_woken_and_close_wakes_everyone() {
    let dir = TestDir::new("wake");
    let arena = Arena::create(&dir.0).unwrap();
    let q = Arc::new(Queue::new(&arena, 2, 64).unwrap());
    let q2 = q.clone();
    let t = std::thread::spawn(move || q2.get(T).unwrap());
    std::thread::sleep(Duration::from_millis(20));
    q.put(b"hello", T).unwrap();
    assert_eq!(t.join().unwrap(), b"hello");
    let q3 = q.clone();
    let t = std::thread::spawn(move || q3.get(None));
    q.close();
    assert!(matches!(t.join().unwrap(), Err(Error::Closed)));
    assert!(matches!(q.put(b"late", T), Err(Error::Closed)));
}

#[test]
fn close_lets_consumers_drain() {
    let dir = TestDir::new("drain");
    let arena = Arena::create(&dir.0).unwrap();
    let q = Queue::new(&arena, 4, 64).unwrap();
    q.put(b"a", T).unwrap();
    q.close();
    assert_eq!(q.get(T).unwrap(), b"a");
    assert!(matches!(q.get(T), Err(Error::Closed)));
}

#[test]
fn joinable_counts_tasks() {
    let dir = TestDir::new("join");
    let arena = Arena::create(&dir.0).unwrap();
    let q = Arc::new(Queue::with_options(&arena, 4, 64, true).unwrap());
    q.put(b"a", T).unwrap();
    q.put(b"b", T).unwrap();
    assert_eq!(q.unfinished(), 2);
    assert!(!q.join(Some(Duration::from_millis(5))).unwrap());
    let q2 = q.clone();
    let t = std::thread::spawn(move || q2.join(T).unwrap());
    q.get(T).unwrap();
    q.task_done().unwrap();
    q.get(T).unwrap();
    q.task_done().unwrap();
    assert!(t.join().unwrap());
    assert!(q.task_done().is_err());
}

#[test]
fn arrays_travel_by_handle_and_belong_to_the_queue() {
    let dir = TestDir::new("arrays");
    let arena = Arena::create(&dir.0).unwrap();
    let q = Queue::new(&arena, 4, 256).unwrap();
    let data = ArrayD::from_shape_fn(IxDyn(&[100, 50]), |i| (i[0] * 50 + i[1]) as f64);
    let a = SharedArray::from_view(&arena, data.view()).unwrap();
    q.put_array(&a, T).unwrap();
    drop(a); // the queue keeps it
    assert_eq!(arena.stats().unwrap().live_blocks, 2);
    let b = q.get_array(T).unwrap();
    assert_eq!(b.view::<f64>().unwrap(), data.view());
    drop(b);
    assert_eq!(
        arena.stats().unwrap().live_blocks,
        1,
        "only the queue is left"
    );
    // Arrays still inside a dropped queue are freed with it.
    let a = SharedArray::from_view(&arena, data.view()).unwrap();
    q.put_array(&a, T).unwrap();
    drop(a);
    drop(q);
    assert_clean(&arena);
}

#[test]
fn put_blocks_pins_each_block_for_the_queue_and_refuses_bad_layouts() {
    let dir = TestDir::new("put-blocks");
    let arena = Arena::create(&dir.0).unwrap();
    let q = Queue::new(&arena, 4, 1024).unwrap();
    let data = ArrayD::from_shape_fn(IxDyn(&[10, 4]), |i| (i[0] * 4 + i[1]) as f64);
    let a = SharedArray::from_view(&arena, data.view()).unwrap();
    let b = SharedArray::from_view(&arena, data.view()).unwrap();
    let entries = |a: &SharedArray, b: &SharedArray| {
        vec![
            (a.block().clone(), a.meta().clone()),
            (b.block().clone(), b.meta().clone()),
        ]
    };
    // A small payload (inline) and one too large for a slot (its own block).
    for payload in [b"payload".to_vec(), vec![7u8; 10_000]] {
        q.put_blocks(&entries(&a, &b), &payload, T).unwrap();
        // The queue's: one per block, and one for the message's own block.
        let own_block = usize::from(payload.len() > 1024);
        assert_eq!(arena.stats().unwrap().pins as usize, 2 + own_block);
        let msg = q.get_message(T).unwrap();
        assert_eq!(arena.stats().unwrap().pins, 0);
        assert_eq!(msg.payload(), &payload[..]);
        let got = msg.entries();
        assert_eq!(got.len(), 2);
        assert_eq!((&got[0].1, &got[1].1), (a.meta(), b.meta()));
        assert_eq!(got[1].0.as_ptr(), b.block().as_ptr());
    }
    // The queue alone keeps what it holds.
    q.put_blocks(&entries(&a, &b), b"", T).unwrap();
    let (pa, meta) = (a.block().as_ptr(), a.meta().clone());
    drop((a, b));
    let msg = q.get_message(T).unwrap();
    assert_eq!(
        (msg.entries()[0].0.as_ptr(), &msg.entries()[0].1),
        (pa, &meta)
    );
    drop(msg);
    // A layout outside its block is refused before anything is pinned.
    let c = SharedArray::from_view(&arena, data.view()).unwrap();
    let mut bad = c.meta().clone();
    bad.offset = c.block().len() + 8;
    let err = q
        .put_blocks(&[(c.block().clone(), bad)], b"", T)
        .unwrap_err();
    assert!(matches!(err, Error::InvalidHandle(_)), "{err:?}");
    assert!(q.is_empty());
    assert_eq!(arena.stats().unwrap().pins, 0);
    drop((c, q));
    assert_clean(&arena);
}

fn mpmc_threads(cap: usize, inline: usize, producers: u64, consumers: usize, n: u64) {
    let dir = TestDir::new(&format!("mpmc-{cap}-{inline}"));
    let arena = Arena::create(&dir.0).unwrap();
    let q = Arc::new(Queue::new(&arena, cap, inline).unwrap());
    let mut hs = Vec::new();
    for p in 0..producers {
        let q = q.clone();
        hs.push(std::thread::spawn(move || {
            for i in 0..n {
                let mut m = [0u8; 16];
                m[..8].copy_from_slice(&p.to_le_bytes());
                m[8..].copy_from_slice(&i.to_le_bytes());
                // Every 97th message is large (goes through its own block).
                if i % 97 == 0 {
                    let mut v = m.to_vec();
                    v.resize(inline + 1000, 0xab);
                    q.put(&v, T).unwrap();
                } else {
                    q.put(&m, T).unwrap();
                }
            }
            Vec::new()
        }));
    }
    let total = producers * n;
    let taken = Arc::new(std::sync::atomic::AtomicU64::new(0));
    for _ in 0..consumers {
        let q = q.clone();
        let taken = taken.clone();
        hs.push(std::thread::spawn(move || {
            let mut got = Vec::new();
            let mut last = vec![-1i64; producers as usize];
            while taken.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < total {
                let m = q.get(T).unwrap();
                let p = u64::from_le_bytes(m[..8].try_into().unwrap());
                let i = u64::from_le_bytes(m[8..16].try_into().unwrap());
                assert!(i as i64 > last[p as usize], "per-producer order");
                last[p as usize] = i as i64;
                got.push((p, i));
            }
            got
        }));
    }
    let mut all = HashSet::new();
    for h in hs {
        for x in h.join().unwrap() {
            assert!(all.insert(x), "duplicate {x:?}");
        }
    }
    assert_eq!(all.len() as u64, total);
    assert!(q.is_empty());
    drop(q);
    assert_clean(&arena);
}

#[test]
fn mpmc_threads_small_ring() {
    mpmc_threads(2, 64, 4, 4, 20_000);
}

#[test]
fn mpmc_threads_large_ring() {
    mpmc_threads(64, 200, 4, 4, 20_000);
}

/// Child: puts MEMSHARE_TEST_N messages tagged with MEMSHARE_TEST_ID.
#[test]
fn child_producer() {
    let Some(q) = child_queue() else { return };
    let id: u64 = std::env::var("MEMSHARE_TEST_ID").unwrap().parse().unwrap();
    let n: u64 = std::env::var("MEMSHARE_TEST_N").unwrap().parse().unwrap();
    for i in 0..n {
        let mut m = [0u8; 16];
        m[..8].copy_from_slice(&id.to_le_bytes());
        m[8..].copy_from_slice(&i.to_le_bytes());
        q.put(&m, T).unwrap();
    }
}

#[test]
fn mpmc_processes() {
    let dir = TestDir::new("procs");
    let arena = Arena::create(&dir.0).unwrap();
    let q = Arc::new(Queue::new(&arena, 8, 64).unwrap());
    let n = 20_000u64;
    let kids: Vec<Child> = (0..3)
        .map(|id| {
            spawn_child(
                "child_producer",
                &dir,
                &q,
                &[
                    ("MEMSHARE_TEST_ID", id.to_string()),
                    ("MEMSHARE_TEST_N", n.to_string()),
                ],
            )
        })
        .collect();
    let mut seen = HashSet::new();
    let mut last = [-1i64; 3];
    for _ in 0..3 * n {
        let m = q.get(T).unwrap();
        let p = u64::from_le_bytes(m[..8].try_into().unwrap()) as usize;
        let i = u64::from_le_bytes(m[8..16].try_into().unwrap());
        assert!(i as i64 > last[p]);
        last[p] = i as i64;
        assert!(seen.insert((p, i)));
    }
    for mut k in kids {
        assert!(k.wait().unwrap().success());
    }
    assert!(matches!(q.get(NOW), Err(Error::Empty)));
    drop(q);
    assert_clean(&arena);
}

/// Child: puts (some large) messages forever, until killed.
#[test]
fn child_endless_producer() {
    let Some(q) = child_queue() else { return };
    let arena = q.block().arena().clone();
    let mut i = 0u64;
    loop {
        let r = match i % 3 {
            0 => q.put(&vec![1u8; 5000], T),
            1 => {
                let a = SharedArray::zeros::<f64>(&arena, &[300]).unwrap();
                q.put_array(&a, T)
            }
            _ => q.put(&i.to_le_bytes(), T),
        };
        r.unwrap();
        i += 1;
    }
}

/// Child: gets messages forever, until killed.
#[test]
fn child_endless_consumer() {
    let Some(q) = child_queue() else { return };
    loop {
        let _ = q.get_message(T).unwrap();
    }
}

fn rand_ms(seed: &mut u64, max: u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed % max
}

/// Producers and consumers SIGKILLed at random instants never block the
/// survivors, and no memory is left once the queue is dropped. Exact
/// delivery under kills is tested by the Python suite; here we check
/// liveness and leaks.
#[test]
fn killed_producers_and_consumers_never_block_survivors() {
    let dir = TestDir::new("kill");
    let arena = Arena::create(&dir.0).unwrap();
    let q = Arc::new(Queue::new(&arena, 2, 64).unwrap());
    let mut seed = 0x9e3779b97f4a7c15u64 ^ std::process::id() as u64;
    for round in 0..12 {
        let producer = round % 2 == 0;
        let mut kid = spawn_child(
            if producer {
                "child_endless_producer"
            } else {
                "child_endless_consumer"
            },
            &dir,
            &q,
            &[],
        );
        // Keep the other side busy so the child is caught mid-operation.
        let deadline = Instant::now() + Duration::from_millis(30 + rand_ms(&mut seed, 70));
        while Instant::now() < deadline {
            if producer {
                let _ = q.get_message(Some(Duration::from_millis(5)));
            } else {
                let _ = q.put(&[9u8; 200], Some(Duration::from_millis(5)));
            }
        }
        kid.kill().unwrap();
        kid.wait().unwrap();
        // The queue must still work for the survivors: fill and drain it.
        while q.get_message(Some(Duration::from_millis(50))).is_ok() {}
        for k in 0..2u8 {
            q.put(&[k], T).unwrap();
        }
        let got: Vec<Vec<u8>> = (0..2).map(|_| q.get(T).unwrap()).collect();
        assert_eq!(got, vec![vec![0u8], vec![1u8]], "round {round}");
    }
    drop(q);
    assert_clean(&arena);
    assert_eq!(arena.stats().unwrap().processes, 1);
}
