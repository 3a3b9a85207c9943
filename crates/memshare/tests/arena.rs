//! Integration tests of the arena: allocation, reference counts, handles,
//! reclaiming dead processes, and a second Rust process reading an array.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus};
use std::sync::mpsc;
use std::time::Duration;

use memshare::arena::crash::{self, CrashPoint};
use memshare::arena::{ctl_path, hex};
use memshare::{Arena, Error, Handle, SharedArray};
use ndarray::{ArrayD, IxDyn};
use proptest::prelude::*;

/// A private directory per test so tests never see each other's segments.
struct TestDir(PathBuf);

impl TestDir {
    fn new(name: &str) -> TestDir {
        let p = PathBuf::from(format!(
            "/dev/shm/memshare-rust-test-{}-{name}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TestDir(p)
    }

    fn files(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&self.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes a file as memshare would make it (owner-only), so that what is
/// refused is its content and not its mode.
fn write_private(path: &std::path::Path, bytes: &[u8]) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .unwrap();
    f.write_all(bytes).unwrap();
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn from_hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// Runs the test `name` of this binary in a new process with `env` set
/// (its half of a two-process test); true if it succeeded.
fn run_child(name: &str, dir: &TestDir, env: (&str, String)) -> bool {
    run_child_status(name, dir, env).success()
}

/// As [`run_child`], but returns how the child ended.
fn run_child_status(name: &str, dir: &TestDir, env: (&str, String)) -> ExitStatus {
    wait_bounded(child_command(name, dir, env).spawn().unwrap())
}

/// The command that runs the test `name` of this binary with `env` set, in
/// the arena directory `dir`.
fn child_command(name: &str, dir: &TestDir, env: (&str, String)) -> Command {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(env.0, env.1)
        .env("MEMSHARE_DIR", &dir.0);
    command
}

/// How long a child half of a test may take: far more than it needs.
const CHILD_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs `f` on a thread and returns its result, or, past [`CHILD_TIMEOUT`],
/// runs `on_timeout` (which must end what `f` waits for) and fails.
fn bounded<T: Send + 'static>(
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
    on_timeout: impl FnOnce(),
) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(CHILD_TIMEOUT) {
        Ok(value) => value,
        Err(_) => {
            on_timeout();
            panic!("waited {CHILD_TIMEOUT:?} for {what}");
        }
    }
}

/// Waits for `child` to exit, killing it (and failing) past [`CHILD_TIMEOUT`].
fn wait_bounded(mut child: Child) -> ExitStatus {
    let pid = child.id() as i32;
    // SAFETY: `pid` is not reaped yet (the waiting thread has not returned),
    // so it still names the child.
    let kill = move || unsafe {
        libc::kill(pid, libc::SIGKILL);
    };
    bounded("a child to exit", move || child.wait().unwrap(), kill)
}

/// Child halves: attaches to the arena `token` (hex) in `MEMSHARE_DIR`.
fn attach_from_env(token: &str) -> Arena {
    let dir = std::env::var("MEMSHARE_DIR").unwrap();
    let token = memshare::arena::parse_hex(token).unwrap();
    Arena::attach(std::path::Path::new(&dir), token).unwrap()
}

/// Keeps this process's decay thread (which reaps every arena of this test
/// binary once a second) from running until dropped, for tests that see a
/// dead process before it is reaped.
struct DecayPaused;

impl DecayPaused {
    fn new() -> DecayPaused {
        memshare::arena::pause_for_fork();
        DecayPaused
    }
}

impl Drop for DecayPaused {
    fn drop(&mut self) {
        memshare::arena::resume_after_fork();
    }
}

#[test]
fn alloc_free_and_stats() {
    let dir = TestDir::new("stats");
    let arena = Arena::create(&dir.0).unwrap();
    let a = arena.alloc(1000, false).unwrap();
    let b = arena.alloc(40 << 20, false).unwrap();
    assert_eq!(a.as_ptr() as usize % 64, 0);
    assert_eq!(b.as_ptr() as usize % 64, 0);
    let s = arena.stats().unwrap();
    assert_eq!(s.live_blocks, 2);
    // The large block has a segment of its own, rounded to whole pages.
    let exact = 1024 + (40 << 20);
    assert!((exact..exact + 4096).contains(&s.bytes_in_use), "{s:?}");
    let c = b.clone();
    drop(b);
    assert_eq!(
        arena.stats().unwrap().live_blocks,
        2,
        "a clone keeps the block alive"
    );
    drop(c);
    drop(a);
    let s = arena.stats().unwrap();
    assert_eq!((s.live_blocks, s.bytes_in_use), (0, 0));
    assert!(s.bytes_reserved > 0);
}

#[test]
fn freed_memory_is_recycled() {
    let dir = TestDir::new("recycle");
    let arena = Arena::create(&dir.0).unwrap();
    let first = arena.alloc(40 << 20, false).unwrap();
    let addr = first.as_ptr();
    drop(first);
    let reserved = arena.stats().unwrap().bytes_reserved;
    for _ in 0..100 {
        let b = arena.alloc(40 << 20, false).unwrap();
        assert_eq!(b.as_ptr(), addr, "the same warm block is reused");
    }
    assert_eq!(
        arena.stats().unwrap().bytes_reserved,
        reserved,
        "no growth when recycling"
    );
}

/// Above the per-process cache's 64 MiB: freed blocks go to the shared heap.
const UNCACHED: usize = 80 << 20;

/// An arena whose free blocks are never given back by the decay thread:
/// a test that sleeps 5 s between a free and the next allocation on a
/// loaded machine must still get the block with its pages.
fn arena_that_keeps_free_pages(dir: &TestDir) -> Arena {
    let arena = Arena::create(&dir.0).unwrap();
    arena.set_retain(u64::MAX).unwrap();
    arena
}

#[test]
fn a_block_this_process_wrote_last_is_known_to_have_its_pages_mapped() {
    let dir = TestDir::new("mapped");
    let arena = arena_that_keeps_free_pages(&dir);
    let fresh = arena.alloc(UNCACHED, false).unwrap();
    assert!(
        !fresh.pages_mapped(),
        "a new segment is new to this process"
    );
    let addr = fresh.as_ptr();
    drop(fresh);
    let again = arena.alloc(UNCACHED, false).unwrap();
    assert_eq!(again.as_ptr(), addr);
    assert!(again.pages_mapped(), "this process allocated it last");
    drop(again);
    let smaller = arena.alloc(UNCACHED - (1 << 20), false).unwrap();
    assert_eq!(smaller.as_ptr(), addr);
    assert!(smaller.pages_mapped(), "within what was allocated last");
    drop(smaller);
    let larger = arena.alloc(UNCACHED - 4096, false).unwrap();
    assert_eq!(larger.as_ptr(), addr);
    assert!(!larger.pages_mapped(), "beyond the bytes allocated last");
}

#[test]
fn a_block_from_the_cache_is_known_to_have_its_pages_mapped() {
    let dir = TestDir::new("cached");
    let arena = arena_that_keeps_free_pages(&dir);
    let n = 8 << 20; // under the cache's 64 MiB
    let first = arena.alloc(n, false).unwrap();
    assert!(!first.pages_mapped());
    let addr = first.as_ptr();
    drop(first);
    assert!(
        arena.stats().unwrap().cached_bytes > 0,
        "kept in this process's cache"
    );
    let again = arena.alloc(n - 4096, false).unwrap();
    assert_eq!(again.as_ptr(), addr, "from this process's cache");
    assert!(again.pages_mapped(), "within what was allocated last");
    drop(again);
    let larger = arena.alloc(n, false).unwrap();
    assert_eq!(larger.as_ptr(), addr, "from this process's cache");
    assert!(!larger.pages_mapped(), "beyond the bytes allocated last");
}

#[test]
fn a_block_whose_pages_were_given_back_is_not_known_to_be_mapped() {
    let dir = TestDir::new("punched");
    let arena = Arena::create(&dir.0).unwrap();
    let first = arena.alloc(UNCACHED, false).unwrap();
    let addr = first.as_ptr();
    drop(first);
    // Growing by a block the free one cannot serve, under a limit that
    // leaves no room for both, gives the free block's pages back first.
    arena.set_limit(2 * UNCACHED as u64 + (8 << 20)).unwrap();
    let big = arena.alloc(2 * UNCACHED, false).unwrap();
    drop(big);
    let again = arena.alloc(UNCACHED, false).unwrap();
    assert_eq!(again.as_ptr(), addr, "the block this process wrote last");
    assert!(!again.pages_mapped(), "its pages were punched meanwhile");
}

/// Child half of `a_block_another_process_wrote_last_is_not_known_to_be_mapped`.
#[test]
fn child_takes_the_free_block() {
    let Ok(token) = std::env::var("MEMSHARE_TEST_TAKE") else {
        return;
    };
    let arena = attach_from_env(&token);
    // The parent holds slot 0: every child, one after the other, takes slot 1.
    assert_eq!(arena.my_slot(), 1);
    let reserved = arena.stats().unwrap().bytes_reserved;
    let b = arena.alloc(UNCACHED, false).unwrap();
    assert!(
        !b.pages_mapped(),
        "another process (or an earlier occupant of this slot) allocated it last"
    );
    assert_eq!(arena.stats().unwrap().bytes_reserved, reserved, "no growth");
}

#[test]
fn a_block_another_process_wrote_last_is_not_known_to_be_mapped() {
    let dir = TestDir::new("taken");
    let arena = arena_that_keeps_free_pages(&dir);
    let mine = arena.alloc(UNCACHED, false).unwrap();
    let addr = mine.as_ptr();
    drop(mine);
    // The second child gets the slot the first had, with the next epoch.
    for _ in 0..2 {
        assert!(run_child(
            "child_takes_the_free_block",
            &dir,
            ("MEMSHARE_TEST_TAKE", hex(&arena.token()))
        ));
    }
    let again = arena.alloc(UNCACHED, false).unwrap();
    assert_eq!(again.as_ptr(), addr);
    assert!(
        !again.pages_mapped(),
        "the child allocated it after this process"
    );
}

#[test]
fn handles_roundtrip_and_pin() {
    let dir = TestDir::new("handles");
    let arena = Arena::create(&dir.0).unwrap();
    let b = arena.alloc(4096, false).unwrap();
    // SAFETY: the block is private to this test.
    unsafe { b.as_mut_slice()[..4].copy_from_slice(b"abcd") };
    let h = b.handle().unwrap();
    assert_eq!(arena.stats().unwrap().pins, 1);
    drop(b);
    assert_eq!(
        arena.stats().unwrap().live_blocks,
        1,
        "the pin keeps the block alive in flight"
    );
    let bytes = h.to_bytes();
    let reopened = arena.open(&Handle::from_bytes(&bytes).unwrap()).unwrap();
    // SAFETY: as above.
    assert_eq!(unsafe { &reopened.as_slice()[..4] }, b"abcd");
    assert_eq!(arena.stats().unwrap().pins, 0, "opening adopts the pin");
    drop(reopened);
    assert_eq!(arena.stats().unwrap().live_blocks, 0);
    // The block is gone: the same handle is now stale.
    let err = arena
        .open(&Handle::from_bytes(&bytes).unwrap())
        .unwrap_err();
    assert!(matches!(err, Error::StaleHandle(_)), "{err}");
}

#[test]
fn forged_handles_are_rejected() {
    let dir = TestDir::new("forged");
    let arena = Arena::create(&dir.0).unwrap();
    let b = arena.alloc(4096, false).unwrap();
    let mut bytes = b.handle().unwrap().to_bytes();
    bytes[24] ^= 0x40; // move the offset
    let err = Handle::from_bytes(&bytes)
        .and_then(|h| arena.open(&h))
        .unwrap_err();
    assert!(matches!(err, Error::InvalidHandle(_)), "{err}");
    assert!(Handle::from_bytes(&bytes[..10]).is_err());
}

#[test]
fn files_are_private_and_removed_by_last_process() {
    let dir = TestDir::new("files");
    let arena = Arena::create(&dir.0).unwrap();
    let _b = arena.alloc(1 << 20, false).unwrap();
    let ctl = ctl_path(&dir.0, &arena.token());
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&ctl).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    assert!(dir
        .files()
        .iter()
        .all(|f| f.starts_with(&format!("memshare-{}", hex(&arena.token())))));
    arena.detach().unwrap();
    assert!(dir.files().is_empty(), "left behind: {:?}", dir.files());
}

#[test]
fn limit_gives_out_of_memory() {
    let dir = TestDir::new("limit");
    let arena = Arena::create(&dir.0).unwrap();
    arena.set_limit(64 << 20).unwrap();
    let err = arena.alloc(100 << 20, false).unwrap_err();
    assert!(matches!(err, Error::OutOfMemory { .. }), "{err}");
    assert!(err.to_string().contains("MEMSHARE_LIMIT"));
}

#[test]
fn corrupt_control_file_is_refused() {
    let dir = TestDir::new("corrupt");
    let token = [0xab; 16];
    write_private(&ctl_path(&dir.0, &token), &vec![0u8; 1 << 20]);
    let err = Arena::attach(&dir.0, token).err().unwrap();
    assert!(matches!(err, Error::Corrupt { .. }), "{err}");
    let removed = Arena::collect_garbage(&dir.0, false).unwrap();
    assert_eq!(removed, vec![hex(&token)]);
    assert!(dir.files().is_empty());
}

/// Child half of `second_process_reads_array`: runs only when re-executed.
#[test]
fn child_reads_array() {
    let Ok(msg) = std::env::var("MEMSHARE_TEST_MESSAGE") else {
        return;
    };
    let bytes = from_hex(&msg);
    let mut a = SharedArray::from_bytes(&bytes).unwrap();
    let sum: f64 = a.view::<f64>().unwrap().sum();
    assert_eq!(sum, (0..1000).map(|x| x as f64).sum::<f64>());
    // SAFETY: the parent waits for this process and reads nothing meanwhile.
    unsafe { a.view_mut::<f64>() }.unwrap()[[0, 0]] = -1.0;
}

#[test]
fn second_process_reads_array() {
    let dir = TestDir::new("xproc");
    let arena = Arena::create(&dir.0).unwrap();
    let data = ArrayD::from_shape_fn(IxDyn(&[10, 100]), |i| (i[0] * 100 + i[1]) as f64);
    let a = SharedArray::from_view(&arena, data.view()).unwrap();
    let msg = to_hex(&a.to_bytes().unwrap());
    assert!(run_child(
        "child_reads_array",
        &dir,
        ("MEMSHARE_TEST_MESSAGE", msg)
    ));
    assert_eq!(
        a.view::<f64>().unwrap()[[0, 0]],
        -1.0,
        "the child's write is visible here"
    );
    drop(a);
    assert_eq!(arena.stats().unwrap().live_blocks, 0);
    assert_eq!(
        arena.stats().unwrap().processes,
        1,
        "the child's slot was released"
    );
}

/// Child half of `dead_process_is_reaped`: takes references, then dies hard.
#[test]
fn child_dies_holding() {
    let Ok(msg) = std::env::var("MEMSHARE_TEST_DIE") else {
        return;
    };
    let bytes = from_hex(&msg);
    let a = SharedArray::from_bytes(&bytes).unwrap();
    let arena = a.block().arena().clone();
    let _mine = arena.alloc(1 << 20, false).unwrap();
    let _pinned = _mine.handle().unwrap();
    // A lease of the dying process, with pins: repair releases them too.
    let lease = arena.lease().unwrap();
    let _leased = (
        _mine.handle_leased(&lease).unwrap(),
        a.block().handle_leased(&lease).unwrap(),
    );
    std::mem::forget(lease);
    std::mem::forget(a);
    // SAFETY: abort-like exit without running destructors, like SIGKILL.
    unsafe { libc::_exit(0) };
}

#[test]
fn dead_process_is_reaped() {
    let dir = TestDir::new("reap");
    let arena = Arena::create(&dir.0).unwrap();
    let a = SharedArray::zeros::<f64>(&arena, &[1000]).unwrap();
    let msg = to_hex(&a.to_bytes().unwrap());
    let paused = DecayPaused::new();
    assert!(run_child(
        "child_dies_holding",
        &dir,
        ("MEMSHARE_TEST_DIE", msg)
    ));
    assert_eq!(
        arena.stats().unwrap().live_blocks,
        2,
        "the dead child's block is still accounted"
    );
    assert!(arena.reap().unwrap());
    drop(paused);
    drop(a);
    let s = arena.stats().unwrap();
    assert_eq!((s.live_blocks, s.pins, s.processes), (0, 0, 1));
}

/// The crash point named `name` (its `Debug` spelling).
fn crash_point(name: &str) -> CrashPoint {
    *CrashPoint::ALL
        .iter()
        .find(|p| format!("{p:?}") == name)
        .unwrap()
}

/// Child half of the crash-point tests: attaches to the arena named by
/// `MEMSHARE_TEST_CRASH` (`<point>:<token>`), is told to die at the point,
/// then reaps (a repair point) or allocates a block too big for the free
/// space (a growth point).
#[test]
fn child_dies_at_a_crash_point() {
    let Ok(arg) = std::env::var("MEMSHARE_TEST_CRASH") else {
        return;
    };
    let (name, token) = arg.split_once(':').unwrap();
    let point = crash_point(name);
    crash::exit_at(point);
    // Attaching may reap already; if not, the explicit reap does.
    let arena = attach_from_env(token);
    let _mine = arena.alloc(1 << 20, false).unwrap();
    arena.reap().unwrap();
    let _big = arena.alloc(GROWS, false).unwrap();
    panic!("{point:?} was never reached");
}

/// A block bigger than any free space of these tests: it grows the arena.
const GROWS: usize = 40 << 20;

/// Runs `child_dies_at_a_crash_point` at `point` and checks that it died there.
fn die_at(point: CrashPoint, dir: &TestDir, arena: &Arena) {
    let status = run_child_status(
        "child_dies_at_a_crash_point",
        dir,
        (
            "MEMSHARE_TEST_CRASH",
            format!("{point:?}:{}", hex(&arena.token())),
        ),
    );
    assert_eq!(
        status.code(),
        Some(crash::EXIT_STATUS),
        "the child did not die at {point:?}"
    );
}

/// The sizes of the arena's segment files, summed.
fn segment_file_bytes(dir: &TestDir, arena: &Arena) -> u64 {
    let ctl = ctl_path(&dir.0, &arena.token());
    std::fs::read_dir(&dir.0)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| *p != ctl)
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum()
}

#[test]
fn a_reaper_that_dies_mid_repair_leaves_the_dead_to_the_next() {
    let dir = TestDir::new("reaper-dies");
    let arena = Arena::create(&dir.0).unwrap();
    let a = SharedArray::zeros::<f64>(&arena, &[1000]).unwrap();
    let msg = to_hex(&a.to_bytes().unwrap());
    let repair_points = CrashPoint::ALL
        .into_iter()
        .filter(|p| format!("{p:?}").starts_with("Repair"));
    for point in repair_points {
        // One process dies holding blocks, a pin and a lease; the one that
        // reaps it dies mid-repair, holding the mutex. Nobody else reaps the
        // first in between.
        let paused = DecayPaused::new();
        assert!(run_child(
            "child_dies_holding",
            &dir,
            ("MEMSHARE_TEST_DIE", msg.clone())
        ));
        die_at(point, &dir, &arena);
        drop(paused);
        // The next locker repairs again (EOWNERDEAD): both are gone.
        arena.reap().unwrap();
        let s = arena.stats().unwrap();
        assert_eq!(
            (s.live_blocks, s.pins, s.processes),
            (1, 0, 1),
            "after a reaper died at {point:?}, the dead still hold memory"
        );
    }
    drop(a);
    let s = arena.stats().unwrap();
    assert_eq!((s.live_blocks, s.bytes_in_use, s.pins), (0, 0, 0));
}

#[test]
fn a_process_that_dies_growing_the_arena_leaves_it_sound() {
    for point in [CrashPoint::GrowBeforePublish, CrashPoint::GrowAfterPublish] {
        let dir = TestDir::new("grower-dies");
        let arena = Arena::create(&dir.0).unwrap();
        let mine = arena.alloc(1 << 20, false).unwrap();
        die_at(point, &dir, &arena);
        // The next locker repairs (EOWNERDEAD); then the arena grows again
        // (at the same index, or into the segment the child published).
        let big = arena.alloc(GROWS, false).unwrap();
        // SAFETY: this process holds the only reference to the fresh block.
        unsafe { std::slice::from_raw_parts_mut(big.as_ptr(), GROWS) }.fill(7);
        let s = arena.stats().unwrap();
        assert_eq!((s.live_blocks, s.pins, s.processes), (2, 0, 1), "{point:?}");
        assert_eq!(
            s.bytes_segments,
            segment_file_bytes(&dir, &arena),
            "after a process died at {point:?}, the arena's size is not its files'"
        );
        assert!(
            s.bytes_reserved <= s.bytes_segments,
            "after a process died at {point:?}, {} bytes committed of {} in segments",
            s.bytes_reserved,
            s.bytes_segments
        );
        drop((mine, big));
        let s = arena.stats().unwrap();
        assert_eq!((s.live_blocks, s.bytes_in_use), (0, 0), "{point:?}");
    }
}

#[test]
fn a_death_seen_first_by_ls_or_gc_is_still_repaired() {
    for via_gc in [false, true] {
        let dir = TestDir::new("ls-sees-death");
        let arena = Arena::create(&dir.0).unwrap();
        let mine = arena.alloc(1 << 20, false).unwrap();
        // The child dies holding the mutex, with the segment it published
        // out of the free lists and its slot still taken.
        die_at(CrashPoint::GrowAfterPublish, &dir, &arena);
        // No decay pass of ours takes the lock (and repairs) meanwhile.
        let paused = DecayPaused::new();
        let seen = if via_gc {
            Arena::collect_garbage(&dir.0, false).map(|removed| removed.is_empty())
        } else {
            Arena::inspect(&dir.0, arena.token()).map(|_| true)
        };
        // The next transaction (a plain stats call, which never reaps on
        // its own) repairs: the dead child's slot is free again.
        let s = arena.stats();
        drop(paused);
        assert!(seen.unwrap(), "the live arena was removed or not read");
        let tool = if via_gc { "gc" } else { "ls" };
        assert_eq!(
            s.unwrap().processes,
            1,
            "the death that {tool} saw first went unrepaired"
        );
        let big = arena.alloc(GROWS, false).unwrap();
        assert_eq!(
            arena.stats().unwrap().segments,
            2,
            "the published block is reused"
        );
        drop((mine, big));
    }
}

/// Child half of `a_child_forked_without_a_slot_keeps_no_lock_of_its_parent`:
/// holds a block, forks (a plain fork: no slot is reserved for the child)
/// and dies; the grandchild lives on until its stdin closes.
#[test]
fn child_forks_without_a_reservation_and_dies() {
    let Ok(token) = std::env::var("MEMSHARE_TEST_FORK") else {
        return;
    };
    let arena = attach_from_env(&token);
    let held = arena.alloc(1 << 20, false).unwrap();
    // SAFETY: the grandchild only reads its stdin and exits; this process
    // exits at once without running destructors, like SIGKILL.
    unsafe {
        if libc::fork() == 0 {
            // The fork handlers have run: say so, then wait.
            let ready = READY.as_bytes();
            libc::write(2, ready.as_ptr().cast(), ready.len());
            let mut byte = 0u8;
            while libc::read(0, std::ptr::addr_of_mut!(byte).cast(), 1) > 0 {}
            libc::_exit(0);
        }
        std::mem::forget(held);
        libc::_exit(0);
    }
}

/// What the grandchild of that test writes to stderr once it runs.
const READY: &str = "grandchild ready";

#[test]
fn a_child_forked_without_a_slot_keeps_no_lock_of_its_parent() {
    let dir = TestDir::new("fork-no-slot");
    let arena = Arena::create(&dir.0).unwrap();
    let mut parent = child_command(
        "child_forks_without_a_reservation_and_dies",
        &dir,
        ("MEMSHARE_TEST_FORK", hex(&arena.token())),
    )
    .stdin(std::process::Stdio::piped())
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::piped())
    // Its own group, so that a hung grandchild can be killed with it.
    .process_group(0)
    .spawn()
    .unwrap();
    let group = parent.id() as i32;
    // Closing it (also on a failed assert) ends the grandchild.
    let grandchild_stdin = parent.stdin.take();
    // Until the grandchild says it runs, its fork handlers may not have
    // let go of what it inherited. (If both died first, this reads EOF.)
    let mut stderr = parent.stderr.take().unwrap();
    let read_ready = move || {
        let mut said = Vec::new();
        let mut chunk = [0u8; 256];
        while !String::from_utf8_lossy(&said).contains(READY) {
            match std::io::Read::read(&mut stderr, &mut chunk).unwrap() {
                0 => break,
                n => said.extend_from_slice(&chunk[..n]),
            }
        }
        String::from_utf8_lossy(&said).into_owned()
    };
    // SAFETY: kills the group of the child, which is not reaped yet.
    let kill_group = move || unsafe {
        libc::kill(-group, libc::SIGKILL);
    };
    let said = bounded("the grandchild to start", read_ready, kill_group);
    assert!(said.contains(READY), "the grandchild never ran: {said}");
    assert!(wait_bounded(parent).success());
    // The grandchild lives, but it does not hold its dead parent's slot
    // lock. (This process's decay thread may have reaped it already.)
    arena.reap().unwrap();
    let s = arena.stats().unwrap();
    assert_eq!(
        (s.live_blocks, s.processes),
        (0, 1),
        "the dead parent was not reaped: its child holds its slot lock"
    );
    drop(grandchild_stdin);
}

#[derive(Debug, Clone)]
enum Op {
    Alloc(usize),
    Free(usize),
    Clone(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (1usize..3_000_000).prop_map(Op::Alloc),
        (0usize..64).prop_map(Op::Free),
        (0usize..64).prop_map(Op::Clone),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
    /// The allocator against a model: live blocks never overlap, contents are
    /// not disturbed by other allocations, and the statistics match.
    #[test]
    fn allocator_matches_model(ops in proptest::collection::vec(op(), 1..120)) {
        let dir = TestDir::new("model");
        let arena = Arena::create(&dir.0).unwrap();
        let mut live: Vec<(memshare::Block, u8)> = Vec::new();
        let mut tag = 0u8;
        for op in ops {
            match op {
                Op::Alloc(n) => {
                    let b = arena.alloc(n, false).unwrap();
                    tag = tag.wrapping_add(1);
                    // SAFETY: fresh block private to this test.
                    unsafe { b.as_mut_slice().fill(tag) };
                    live.push((b, tag));
                }
                Op::Free(i) if !live.is_empty() => { live.swap_remove(i % live.len()); }
                Op::Clone(i) if !live.is_empty() => { let (b, t) = &live[i % live.len()]; let c = (b.clone(), *t); live.push(c); }
                _ => {}
            }
        }
        let mut ranges: Vec<(usize, usize)> = live.iter().map(|(b, _)| (b.as_ptr() as usize, b.as_ptr() as usize + b.capacity())).collect();
        ranges.sort();
        ranges.dedup();
        for w in ranges.windows(2) {
            prop_assert!(w[0].1 <= w[1].0, "blocks overlap");
        }
        for (b, t) in &live {
            // SAFETY: blocks private to this test.
            prop_assert!(unsafe { b.as_slice() }.iter().all(|x| x == t), "block contents disturbed");
        }
        let s = arena.stats().unwrap();
        prop_assert_eq!(s.live_blocks as usize, ranges.len());
        prop_assert_eq!(s.bytes_in_use as usize, ranges.iter().map(|(a, b)| b - a).sum::<usize>());
        drop(live);
        let s = arena.stats().unwrap();
        prop_assert_eq!((s.live_blocks, s.bytes_in_use), (0, 0));
    }
}

#[test]
fn owned_pins_live_and_die_with_their_owner() {
    let dir = TestDir::new("owned");
    let arena = Arena::create(&dir.0).unwrap();
    let queue = arena.alloc(4096, false).unwrap();
    let msg = arena.alloc(1 << 20, false).unwrap();
    let h1 = msg.handle_owned_by(&queue).unwrap();
    let _h2 = msg.handle_owned_by(&queue).unwrap();
    drop(msg);
    assert_eq!(
        arena.stats().unwrap().live_blocks,
        2,
        "the queue's pins keep the message alive"
    );
    let got = arena.open(&h1).unwrap();
    assert_eq!(arena.stats().unwrap().pins, 1);
    drop(got);
    assert_eq!(
        arena.stats().unwrap().live_blocks,
        2,
        "one owned pin is left"
    );
    drop(queue);
    let s = arena.stats().unwrap();
    assert_eq!(
        (s.live_blocks, s.pins),
        (0, 0),
        "dropping the owner frees what it pinned"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
    /// Whatever bytes sit in a file with a memshare name, attaching refuses
    /// them with an error instead of trusting them.
    #[test]
    fn garbage_control_files_are_refused(
        mut bytes in proptest::collection::vec(any::<u8>(), 0..4096),
        valid_magic in any::<bool>(),
        pad in any::<bool>(),
    ) {
        let dir = TestDir::new("garbage");
        if valid_magic && bytes.len() >= 8 {
            bytes[..8].copy_from_slice(b"MSHRCTL\0");
        }
        if pad {
            bytes.resize(memshare::layout::CTL_SIZE as usize, 0xee);
        }
        let token = [0x5a; 16];
        write_private(&ctl_path(&dir.0, &token), &bytes);
        let err = Arena::attach(&dir.0, token).err().expect("garbage must not attach");
        prop_assert!(matches!(err, Error::Corrupt { .. }), "{}", err);
    }
}

/// Child half of `other_user_cannot_attach`.
#[test]
fn child_as_nobody() {
    let Ok(token) = std::env::var("MEMSHARE_TEST_NOBODY") else {
        return;
    };
    let dir = std::env::var("MEMSHARE_DIR").unwrap();
    // SAFETY: plain syscalls dropping privileges in a single-threaded child test.
    unsafe {
        assert_eq!(libc::setgid(65534), 0);
        assert_eq!(libc::setuid(65534), 0);
    }
    let token = memshare::arena::parse_hex(&token).unwrap();
    let err = Arena::attach(std::path::Path::new(&dir), token)
        .err()
        .expect("must not attach");
    assert!(matches!(err, Error::PermissionDenied { .. }), "{err}");
}

#[test]
fn other_user_cannot_attach() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: switching users needs root");
        return;
    }
    let dir = TestDir::new("nobody");
    let arena = Arena::create(&dir.0).unwrap();
    let token = hex(&arena.token());
    assert!(run_child(
        "child_as_nobody",
        &dir,
        ("MEMSHARE_TEST_NOBODY", token)
    ));
}

#[test]
fn copy_on_write_views_keep_writes_private() {
    let dir = TestDir::new("cow");
    let arena = Arena::create(&dir.0).unwrap();
    let b = arena.alloc(3 * 4096 + 100, false).unwrap();
    // SAFETY: the block is private to this test.
    unsafe { b.as_mut_slice().fill(7) };
    let v = b.copy_on_write().unwrap();
    assert_eq!(v.len(), b.len());
    // SAFETY: the view's range is valid for `len` bytes; no other writer.
    let view = unsafe { std::slice::from_raw_parts_mut(v.as_ptr(), v.len()) };
    assert!(view.iter().all(|&x| x == 7), "reads see the shared pages");
    view[5000] = 1;
    // SAFETY: as above.
    assert_eq!(unsafe { b.as_slice()[5000] }, 7, "writes stay in the view");
    drop(b);
    assert_eq!(
        arena.stats().unwrap().live_blocks,
        1,
        "the view holds the block"
    );
    drop(v);
    assert_eq!(arena.stats().unwrap().live_blocks, 0);
}

#[test]
fn a_lease_releases_its_pins_when_dropped() {
    let dir = TestDir::new("lease");
    let arena = Arena::create(&dir.0).unwrap();
    let a = arena.alloc(4096, false).unwrap();
    let b = arena.alloc(4096, false).unwrap();
    let lease = arena.lease().unwrap();
    let opened_later = b.handle_leased(&lease).unwrap();
    for _ in 0..100 {
        a.handle_leased(&lease).unwrap(); // never opened
    }
    let process_pin = a.handle().unwrap();
    drop((a, b));
    let s = arena.stats().unwrap();
    assert_eq!((s.pins, s.live_blocks), (102, 2), "pins keep both blocks");
    let b = arena.open(&opened_later).unwrap(); // adopts one lease pin
    drop(lease);
    let s = arena.stats().unwrap();
    assert_eq!(
        (s.pins, s.live_blocks),
        (1, 2),
        "only the process pin is left"
    );
    drop(arena.open(&process_pin).unwrap());
    drop(b);
    let s = arena.stats().unwrap();
    assert_eq!((s.pins, s.live_blocks), (0, 0));
    // A handle of an ended lease is stale, not a crash.
    let c = arena.alloc(64, false).unwrap();
    let lease = arena.lease().unwrap();
    let h = c.handle_leased(&lease).unwrap();
    drop(lease);
    drop(c);
    assert!(matches!(arena.open(&h), Err(Error::StaleHandle(_))));
}

#[test]
fn a_kept_lease_pin_opens_many_times_until_the_lease_ends() {
    let dir = TestDir::new("kept");
    let arena = Arena::create(&dir.0).unwrap();
    let a = arena.alloc(8192, false).unwrap();
    let lease = arena.lease().unwrap();
    let h = a.handle_leased_kept(&lease).unwrap();
    drop(a);
    let opened: Vec<_> = (0..5).map(|_| arena.open(&h).unwrap()).collect();
    assert_eq!(
        arena.stats().unwrap().pins,
        1,
        "opens leave a kept pin in place"
    );
    drop(opened);
    let s = arena.stats().unwrap();
    assert_eq!(
        (s.pins, s.live_blocks),
        (1, 1),
        "the kept pin alone keeps the block"
    );
    let again = arena.open(&h).unwrap();
    drop(lease);
    let s = arena.stats().unwrap();
    assert_eq!(
        (s.pins, s.live_blocks),
        (0, 1),
        "the lease's end releases it; the reference stays"
    );
    drop(again);
    assert_eq!(arena.stats().unwrap().live_blocks, 0);
    assert!(matches!(arena.open(&h), Err(Error::StaleHandle(_))));
}

/// Child half of `one_process_cannot_starve_the_others`: pins its whole
/// quota without sending anything, then dies.
#[test]
fn child_leaks_pins() {
    let Ok(msg) = std::env::var("MEMSHARE_TEST_LEAK") else {
        return;
    };
    let a = SharedArray::from_bytes(&from_hex(&msg)).unwrap();
    for _ in 0..memshare::layout::PIN_QUOTA {
        a.block().handle().unwrap();
    }
    let err = a.block().handle().unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, Error::TooManyPins { .. }), "{text}");
    assert!(
        text.contains("quota") && text.contains("never received"),
        "{text}"
    );
    std::mem::forget(a);
    // SAFETY: exit without destructors, like SIGKILL.
    unsafe { libc::_exit(0) };
}

#[test]
fn one_process_cannot_starve_the_others() {
    let dir = TestDir::new("quota");
    let arena = Arena::create(&dir.0).unwrap();
    let a = SharedArray::zeros::<f64>(&arena, &[16]).unwrap();
    let msg = to_hex(&a.to_bytes().unwrap());
    let paused = DecayPaused::new();
    assert!(run_child(
        "child_leaks_pins",
        &dir,
        ("MEMSHARE_TEST_LEAK", msg)
    ));
    let quota = memshare::layout::PIN_QUOTA as u64;
    assert_eq!(
        arena.stats().unwrap().pins,
        quota,
        "the child's leaked pins"
    );
    // This process still pins and sends (its own quota is untouched).
    let h = a.block().handle().unwrap();
    drop(arena.open(&h).unwrap());
    assert!(arena.reap().unwrap());
    drop(paused);
    assert_eq!(
        arena.stats().unwrap().pins,
        0,
        "the dead child's pins are gone"
    );
}
