//! Exhaustive model checking of the queue's slot protocol.
//!
//! The protocol code under test is the real one: `memshare::queue::put_slot`,
//! `get_slot` and `close` (with the claim loops, the waiting loop with its
//! waiter counts and futexes, and the repair of slots whose owner died) are
//! generic over [`SlotMem`], and run here over a model of the shared memory
//! in which every atomic operation, futex call and liveness check is a step
//! that the explorer schedules.
//!
//! How: each simulated process runs its script (puts or gets) from the start,
//! replaying the results recorded for its previous steps, until it asks for a
//! step not yet taken; that step is its next move, and the replay stops by
//! unwinding. A state of the system is the model memory plus, for each
//! process, the list of results it has seen (which determines everything it
//! will do next, since the code is deterministic). The explorer enumerates,
//! depth first, every scheduling choice at every step, visiting each state
//! once (two interleavings that reach the same state have the same futures),
//! and counts the complete schedules these states stand for.
//!
//! Modelled besides atomics: `futex_wait` sleeps only while the word holds the
//! expected value; `futex_wake(n)` wakes any `n` sleepers (every choice is
//! explored); a sleep with the short `STUCK_AFTER` slice may time out when
//! nothing else can run (and, within a budget, at any moment); time passes
//! per process by the timeouts it has taken. A process may die (stop forever,
//! and leave the futex queue) before any step; survivors then find its slots
//! through the real repair path. Once nothing can run, a supervisor closes
//! the queue, so consumers drain it and return.
//!
//! Checked in every state: slot data is written only by the process that
//! holds the slot WRITING and read only by the one holding it READING; no
//! process spins without end. At quiescence: no sleeper could make progress
//! (a lost wake-up) unless a process died (then the one-second insurance
//! slice fires, and the model counts it). At the end: every message taken at
//! most once, from the position it was written at; every message whose put
//! returned is taken, unless it was in a slot the dead consumer had claimed;
//! a repairer discards only such messages; messages of one producer are
//! taken by each consumer in the order they were put; without deaths every
//! put completes and every message is delivered.
//!
//! Memory orderings are not modelled (the model is sequentially consistent).

use std::cell::{Cell, RefCell};
use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use memshare::queue::{
    close, get_slot, get_view, pack, put_slot, put_view, unpack, Atomic32, Atomic64, GetView,
    PutView, Side, SlotMem, STUCK_AFTER,
};
use memshare::Error;

// ----- model memory ----------------------------------------------------------

const TAIL: u8 = 0;
const HEAD: u8 = 1;
const CLOSED: u8 = 2;
const NOT_EMPTY: u8 = 3;
const GET_WAITERS: u8 = 4;
const NOT_FULL: u8 = 5;
const PUT_WAITERS: u8 = 6;
const SLOTS: u8 = 7;
fn word_loc(slot: u8) -> u8 {
    SLOTS + 3 * slot
}
fn kind_loc(slot: u8) -> u8 {
    SLOTS + 3 * slot + 1
}
fn data_loc(slot: u8) -> u8 {
    SLOTS + 3 * slot + 2
}

// Slot states, as in queue.rs.
const WRITING: u64 = 1;
const READING: u64 = 3;

/// The owner tag of model process `pid` (arena slot pid + 1, epoch 1).
fn tag(pid: usize) -> u32 {
    ((pid as u32 + 1) << 22) | 1
}
fn pid_of(tag: u32) -> usize {
    (tag >> 22) as usize - 1
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Op {
    Load(u8),
    Store(u8, u64),
    Cas(u8, u64, u64),
    FetchAdd(u8, u32),
    FetchSub(u8, u32),
    /// (word, expected, short timeout)
    FutexWait(u8, u32, bool),
    FutexWake(u8, u32),
    OwnerAlive(u32),
    /// Message value written into / read from the data area of a slot.
    WriteData(u8, u64),
    ReadData(u8),
    /// A repairer drops the message of a slot.
    Discard(u8),
    /// The supervisor waits until nothing else can run.
    Quiesce,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Res {
    Val(u64),
    /// A failed compare-exchange, with the value found.
    Fail(u64),
    Unit,
    Woken,
    /// `futex_wait` returned at once: the word had changed.
    Again,
    TimedOut,
}

impl Res {
    fn val(self) -> u64 {
        match self {
            Res::Val(v) => v,
            r => panic!("expected a value, got {r:?}"),
        }
    }
}

/// What a process records for the checks (not a step).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Note {
    /// `put` of message `id` returned Ok.
    Put(u64),
    /// `put` failed with Closed.
    PutClosed,
    /// The consumer read `value` from the slot of position `pos`.
    Taken(u64, u64),
    /// `get` returned the message.
    Got(u64),
    /// `get` failed with Closed.
    GetClosed,
}

/// Unwinds a replay that reached a step not taken yet.
struct Frontier;

/// One replay of one process.
struct Ctx {
    pid: usize,
    hist: Vec<(Op, Res)>,
    idx: Cell<usize>,
    pending: Cell<Option<Op>>,
    notes: RefCell<Vec<Note>>,
    clock: Cell<Duration>,
    base: Instant,
}

impl Ctx {
    fn op(&self, op: Op) -> Res {
        let i = self.idx.get();
        match self.hist.get(i) {
            Some(&(o, r)) => {
                assert_eq!(o, op, "process {} is not deterministic", self.pid);
                self.idx.set(i + 1);
                r
            }
            None => {
                self.pending.set(Some(op));
                resume_unwind(Box::new(Frontier))
            }
        }
    }
    fn note(&self, n: Note) {
        self.notes.borrow_mut().push(n);
    }
}

/// A model atomic (32 or 64 bits) at a location of the model memory.
struct MCell {
    loc: u8,
    ctx: Rc<Ctx>,
}

impl Atomic64 for MCell {
    fn load(&self, _: Ordering) -> u64 {
        self.ctx.op(Op::Load(self.loc)).val()
    }
    fn store(&self, val: u64, _: Ordering) {
        self.ctx.op(Op::Store(self.loc, val));
    }
    fn compare_exchange(&self, cur: u64, new: u64, _: Ordering, _: Ordering) -> Result<u64, u64> {
        match self.ctx.op(Op::Cas(self.loc, cur, new)) {
            Res::Val(v) => Ok(v),
            Res::Fail(v) => Err(v),
            r => panic!("bad CAS result {r:?}"),
        }
    }
}

impl Atomic32 for MCell {
    fn load(&self, _: Ordering) -> u32 {
        self.ctx.op(Op::Load(self.loc)).val() as u32
    }
    fn store(&self, val: u32, _: Ordering) {
        self.ctx.op(Op::Store(self.loc, val as u64));
    }
    fn fetch_add(&self, val: u32, _: Ordering) -> u32 {
        self.ctx.op(Op::FetchAdd(self.loc, val)).val() as u32
    }
    fn fetch_sub(&self, val: u32, _: Ordering) -> u32 {
        self.ctx.op(Op::FetchSub(self.loc, val)).val() as u32
    }
}

/// The queue as one model process sees it.
struct Model {
    ctx: Rc<Ctx>,
    cap: u64,
    cells: Vec<MCell>,
}

impl Model {
    fn new(ctx: Rc<Ctx>, cap: u64) -> Model {
        let cells = (0..SLOTS + 3 * cap as u8)
            .map(|loc| MCell {
                loc,
                ctx: ctx.clone(),
            })
            .collect();
        Model { ctx, cap, cells }
    }
    fn slot(&self, pos: u64) -> u8 {
        (pos % self.cap) as u8
    }
}

impl SlotMem for Model {
    type A64 = MCell;
    type A32 = MCell;
    fn capacity(&self) -> u64 {
        self.cap
    }
    fn tail(&self) -> &MCell {
        &self.cells[TAIL as usize]
    }
    fn head(&self) -> &MCell {
        &self.cells[HEAD as usize]
    }
    fn closed(&self) -> &MCell {
        &self.cells[CLOSED as usize]
    }
    fn word(&self, pos: u64) -> &MCell {
        &self.cells[word_loc(self.slot(pos)) as usize]
    }
    fn kind(&self, pos: u64) -> &MCell {
        &self.cells[kind_loc(self.slot(pos)) as usize]
    }
    fn futex(&self, side: Side) -> (&MCell, &MCell) {
        match side {
            Side::Get => (
                &self.cells[NOT_EMPTY as usize],
                &self.cells[GET_WAITERS as usize],
            ),
            Side::Put => (
                &self.cells[NOT_FULL as usize],
                &self.cells[PUT_WAITERS as usize],
            ),
        }
    }
    fn futex_wait(&self, word: &MCell, seen: u32, timeout: Option<Duration>) {
        let short = timeout.is_some_and(|t| t <= STUCK_AFTER);
        if self.ctx.op(Op::FutexWait(word.loc, seen, short)) == Res::TimedOut {
            let t = timeout.expect("only timed waits time out");
            self.ctx.clock.set(self.ctx.clock.get() + t);
        }
    }
    fn futex_wake(&self, word: &MCell, n: u32) {
        self.ctx.op(Op::FutexWake(word.loc, n));
    }
    fn now(&self) -> Instant {
        self.ctx.base + self.ctx.clock.get()
    }
    /// The model's clock moves only when a wait times out: no looking first
    /// (it would add only more of the attempts the model already explores).
    fn look_for(&self) -> Duration {
        Duration::ZERO
    }
    fn me(&self) -> u32 {
        tag(self.ctx.pid)
    }
    fn owner_alive(&self, owner: u32) -> bool {
        self.ctx.op(Op::OwnerAlive(owner)).val() != 0
    }
    fn discard(&self, pos: u64, kind: u32) {
        if kind & 0xff != 0 {
            self.ctx.op(Op::Discard(self.slot(pos)));
        }
    }
    fn finish_task(&self) {}
}

// ----- scripts ---------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum Role {
    /// Puts this many messages.
    Producer(u64),
    /// Gets until the queue is closed.
    Consumer,
    /// Closes the queue once nothing else can run.
    Supervisor,
}

/// Message `i` of producer `pid` (never 0).
fn msg_id(pid: usize, i: u64) -> u64 {
    ((pid as u64) << 8) | (i + 1)
}

fn run(role: Role, m: &Model) {
    let pid = m.ctx.pid;
    match role {
        Role::Producer(n) => {
            for i in 0..n {
                let id = msg_id(pid, i);
                let r = put_slot(m, None, |pos| {
                    // Value and position, so that a read can check both.
                    m.ctx.op(Op::WriteData(m.slot(pos), id | (pos << 32)));
                    Ok(1) // KIND_INLINE
                });
                match r {
                    Ok(()) => m.ctx.note(Note::Put(id)),
                    Err(Error::Closed) => return m.ctx.note(Note::PutClosed),
                    Err(e) => panic!("put failed: {e}"),
                }
            }
        }
        Role::Consumer => loop {
            let r = get_slot(m, None, |pos, kind| {
                if kind & 0xff == 0 {
                    return None; // tombstone
                }
                let v = m.ctx.op(Op::ReadData(m.slot(pos))).val();
                m.ctx.note(Note::Taken(v, pos));
                Some(Ok(v & 0xffff_ffff))
            });
            match r {
                Ok(id) => m.ctx.note(Note::Got(id)),
                Err(Error::Closed) => return m.ctx.note(Note::GetClosed),
                Err(e) => panic!("get failed: {e}"),
            }
        },
        Role::Supervisor => {
            m.ctx.op(Op::Quiesce);
            close(m);
        }
    }
}

// ----- explorer --------------------------------------------------------------

#[derive(Clone, PartialEq, Eq, Hash, Debug)]
enum PState {
    /// Runnable; its history id.
    Run(u32),
    /// Asleep in `futex_wait` (its pending step) on a word.
    Sleep(u32),
    /// Finished or dead: only what it noted matters (an id of its notes).
    Done(u32),
    Dead(u32),
}

impl PState {
    fn hist(&self) -> u32 {
        match *self {
            PState::Run(h) | PState::Sleep(h) => h,
            _ => panic!("no history"),
        }
    }
}

#[derive(Clone, PartialEq, Eq, Hash, Debug)]
struct State {
    mem: Vec<u64>,
    procs: Vec<PState>,
    dead: Option<usize>,
    /// Messages in slots the dead consumer had claimed when it died.
    lost: Vec<u64>,
    discarded: Vec<u64>,
    /// Short sleeps timed out while something else could run.
    early: u8,
    /// Process that took the last step, and preemptions so far (when
    /// bounded).
    last: u8,
    preemptions: u8,
    /// One-second insurance slices that fired.
    idle: u8,
}

#[derive(Clone, Copy, Debug)]
enum Label {
    Step(usize, Op, Res),
    Sleep(usize, Op),
    Wake(usize, usize),
    Timeout(usize),
    Kill(usize),
}

#[derive(Clone, Debug)]
enum Next {
    Op(Op),
    Done,
}

struct Frontier2 {
    next: Next,
    notes: Vec<Note>,
}

struct Frame {
    key: u128,
    state: State,
    label: Option<Label>,
    succ: Vec<(Label, State)>,
    next: usize,
    count: u128,
}

struct HistNode {
    parent: u32,
    step: Option<(Op, Res)>,
    pid: usize,
    len: usize,
}

#[derive(Clone, Debug)]
struct Scenario {
    name: &'static str,
    cap: u64,
    /// Messages per producer.
    producers: Vec<u64>,
    consumers: usize,
    /// One process may die.
    deaths: bool,
    /// Early timeouts of short sleeps allowed per execution.
    early: u8,
    /// Preemptions allowed per execution (None: all schedules).
    preemptions: Option<u8>,
}

#[derive(Debug, Default)]
struct Stats {
    states: u64,
    transitions: u64,
    /// Complete schedules (maximal interleavings) the states stand for.
    schedules: u128,
    /// Distinct final states.
    finals: u64,
    /// Final states in which a one-second insurance slice fired.
    idle_finals: u64,
    /// Final states in which a repair happened (a dead process's slot).
    deaths: u64,
}

/// Longest history of one process: beyond it, the process spins.
const MAX_STEPS: usize = 300;
/// Insurance slices per execution: beyond, a waiter keeps missing messages.
const MAX_IDLE: u8 = 4;

struct Explorer {
    sc: Scenario,
    roles: Vec<Role>,
    nodes: Vec<HistNode>,
    intern: HashMap<(u32, Op, Res), u32>,
    frontiers: Vec<Option<Rc<Frontier2>>>,
    base: Instant,
    seen: HashMap<u128, u128>,
    notes_ids: HashMap<Vec<Note>, u32>,
    notes_of: HashMap<u32, Vec<Note>>,
    stats: Stats,
}

fn key_of(s: &State) -> u128 {
    let mut a = DefaultHasher::new();
    s.hash(&mut a);
    let mut b = DefaultHasher::new();
    0x5eed_u32.hash(&mut b);
    s.hash(&mut b);
    ((a.finish() as u128) << 64) | b.finish() as u128
}

impl Explorer {
    fn new(sc: Scenario) -> Explorer {
        let mut roles: Vec<Role> = sc.producers.iter().map(|&n| Role::Producer(n)).collect();
        roles.extend((0..sc.consumers).map(|_| Role::Consumer));
        roles.push(Role::Supervisor);
        let nodes = (0..roles.len())
            .map(|pid| HistNode {
                parent: u32::MAX,
                step: None,
                pid,
                len: 0,
            })
            .collect();
        let n = roles.len();
        Explorer {
            sc,
            roles,
            nodes,
            intern: HashMap::new(),
            frontiers: vec![None; n],
            base: Instant::now(),
            seen: HashMap::new(),
            notes_ids: HashMap::new(),
            notes_of: HashMap::new(),
            stats: Stats::default(),
        }
    }

    fn initial(&self) -> State {
        let mut mem = vec![0; (SLOTS as u64 + 3 * self.sc.cap) as usize];
        for i in 0..self.sc.cap {
            mem[word_loc(i as u8) as usize] = pack(i as u32, 0, 0);
        }
        State {
            mem,
            procs: (0..self.roles.len())
                .map(|p| PState::Run(p as u32))
                .collect(),
            dead: None,
            lost: Vec::new(),
            discarded: Vec::new(),
            early: 0,
            idle: 0,
            last: u8::MAX,
            preemptions: 0,
        }
    }

    /// An id for a list of notes.
    fn notes_id(&mut self, notes: &[Note]) -> u32 {
        let n = self.notes_ids.len() as u32;
        *self.notes_ids.entry(notes.to_vec()).or_insert(n)
    }

    fn child(&mut self, h: u32, op: Op, res: Res) -> u32 {
        if let Some(&c) = self.intern.get(&(h, op, res)) {
            return c;
        }
        let parent = &self.nodes[h as usize];
        let node = HistNode {
            parent: h,
            step: Some((op, res)),
            pid: parent.pid,
            len: parent.len + 1,
        };
        self.nodes.push(node);
        self.frontiers.push(None);
        let c = (self.nodes.len() - 1) as u32;
        self.intern.insert((h, op, res), c);
        c
    }

    /// The next move of the process with history `h`, and its notes so far.
    fn frontier(&mut self, h: u32) -> Rc<Frontier2> {
        if let Some(f) = &self.frontiers[h as usize] {
            return f.clone();
        }
        let node = &self.nodes[h as usize];
        let pid = node.pid;
        if node.len > MAX_STEPS {
            panic!(
                "{}: process {pid} ({:?}) took {MAX_STEPS} steps: it spins",
                self.sc.name, self.roles[pid]
            );
        }
        let mut hist = Vec::with_capacity(node.len);
        let mut i = h;
        while let Some(step) = self.nodes[i as usize].step {
            hist.push(step);
            i = self.nodes[i as usize].parent;
        }
        hist.reverse();
        let ctx = Rc::new(Ctx {
            pid,
            hist,
            idx: Cell::new(0),
            pending: Cell::new(None),
            notes: RefCell::new(Vec::new()),
            clock: Cell::new(Duration::ZERO),
            base: self.base,
        });
        let model = Model::new(ctx.clone(), self.sc.cap);
        let role = self.roles[pid];
        let next = match catch_unwind(AssertUnwindSafe(|| run(role, &model))) {
            Ok(()) => Next::Done,
            Err(p) if p.is::<Frontier>() => Next::Op(ctx.pending.get().expect("a pending step")),
            Err(p) => resume_unwind(p),
        };
        drop(model);
        let f = Rc::new(Frontier2 {
            next,
            notes: ctx.notes.take(),
        });
        self.frontiers[h as usize] = Some(f.clone());
        f
    }

    fn pending(&mut self, h: u32) -> Option<Op> {
        match self.frontier(h).next {
            Next::Op(op) => Some(op),
            Next::Done => None,
        }
    }

    /// Applies step `op` of process `pid` (history `h`).
    fn apply(&mut self, s: &State, pid: usize, h: u32, op: Op, out: &mut Vec<(Label, State)>) {
        let mut t = s.clone();
        let owns = |s: &State, slot: u8, state: u64| {
            let (_, st, owner) = unpack(s.mem[word_loc(slot) as usize]);
            st == state && owner == tag(pid)
        };
        let res = match op {
            Op::Load(l) => Res::Val(t.mem[l as usize]),
            Op::Store(l, v) => {
                t.mem[l as usize] = v;
                Res::Unit
            }
            Op::Cas(l, cur, new) => {
                let v = t.mem[l as usize];
                if v == cur {
                    t.mem[l as usize] = new;
                    Res::Val(v)
                } else {
                    Res::Fail(v)
                }
            }
            Op::FetchAdd(l, v) => {
                let old = t.mem[l as usize] as u32;
                t.mem[l as usize] = old.wrapping_add(v) as u64;
                Res::Val(old as u64)
            }
            Op::FetchSub(l, v) => {
                let old = t.mem[l as usize] as u32;
                t.mem[l as usize] = old.wrapping_sub(v) as u64;
                Res::Val(old as u64)
            }
            Op::FutexWait(l, seen, _) => {
                if t.mem[l as usize] as u32 != seen {
                    Res::Again
                } else {
                    t.procs[pid] = PState::Sleep(h);
                    out.push((Label::Sleep(pid, op), t));
                    return;
                }
            }
            Op::FutexWake(l, n) => {
                let sleepers: Vec<usize> = (0..t.procs.len())
                    .filter(|&q| match t.procs[q] {
                        PState::Sleep(hq) => {
                            matches!(self.pending(hq), Some(Op::FutexWait(w, _, _)) if w == l)
                        }
                        _ => false,
                    })
                    .collect();
                let h2 = self.child(h, op, Res::Unit);
                t.procs[pid] = self.run_state(h2);
                if sleepers.len() <= n as usize {
                    for &q in &sleepers {
                        self.wake(&mut t, q, Res::Woken);
                    }
                    out.push((Label::Step(pid, op, Res::Unit), t));
                } else {
                    assert_eq!(n, 1, "the queue wakes one or all");
                    for &q in &sleepers {
                        let mut u = t.clone();
                        self.wake(&mut u, q, Res::Woken);
                        out.push((Label::Wake(pid, q), u));
                    }
                }
                return;
            }
            Op::OwnerAlive(owner) => Res::Val((s.dead != Some(pid_of(owner))) as u64),
            Op::WriteData(slot, v) => {
                assert!(
                    owns(s, slot, WRITING),
                    "process {pid} writes slot {slot} it does not hold"
                );
                t.mem[data_loc(slot) as usize] = v;
                Res::Unit
            }
            Op::ReadData(slot) => {
                assert!(
                    owns(s, slot, READING),
                    "process {pid} reads slot {slot} it does not hold"
                );
                Res::Val(t.mem[data_loc(slot) as usize])
            }
            Op::Discard(slot) => {
                assert!(
                    owns(s, slot, READING),
                    "process {pid} discards slot {slot} it does not hold"
                );
                t.discarded
                    .push(t.mem[data_loc(slot) as usize] & 0xffff_ffff);
                t.discarded.sort_unstable();
                Res::Unit
            }
            Op::Quiesce => Res::Unit,
        };
        let h2 = self.child(h, op, res);
        t.procs[pid] = self.run_state(h2);
        out.push((Label::Step(pid, op, res), t));
    }

    /// Ends the futex wait of sleeping process `q` with `res`.
    fn wake(&mut self, t: &mut State, q: usize, res: Res) {
        let hq = t.procs[q].hist();
        let op = self.pending(hq).expect("a sleeper waits");
        let h2 = self.child(hq, op, res);
        t.procs[q] = self.run_state(h2);
    }

    /// Runnable, or done if the script has returned.
    fn run_state(&mut self, h: u32) -> PState {
        let f = self.frontier(h);
        match f.next {
            Next::Op(_) => PState::Run(h),
            Next::Done => PState::Done(self.notes_id_of(&f.notes)),
        }
    }

    fn notes_id_of(&mut self, notes: &[Note]) -> u32 {
        let id = self.notes_id(notes);
        self.notes_of.entry(id).or_insert_with(|| notes.to_vec());
        id
    }

    fn kill(&mut self, s: &State, pid: usize, out: &mut Vec<(Label, State)>) {
        let mut t = s.clone();
        t.dead = Some(pid);
        let notes = self.frontier(s.procs[pid].hist()).notes.clone();
        t.procs[pid] = PState::Dead(self.notes_id_of(&notes));
        for slot in 0..self.sc.cap as u8 {
            let (_, st, owner) = unpack(s.mem[word_loc(slot) as usize]);
            if st == READING && owner == tag(pid) && s.mem[kind_loc(slot) as usize] != 0 {
                t.lost.push(s.mem[data_loc(slot) as usize] & 0xffff_ffff);
            }
        }
        t.lost.sort_unstable();
        out.push((Label::Kill(pid), t));
    }

    /// True if the sleeper with history `h` could make progress now (so it
    /// should have been woken).
    fn could_progress(&mut self, s: &State, h: u32) -> bool {
        let cap = self.sc.cap;
        let word = |pos: u64| s.mem[word_loc((pos % cap) as u8) as usize];
        match self.pending(h) {
            Some(Op::FutexWait(NOT_EMPTY, _, _)) => {
                let pos = s.mem[HEAD as usize];
                matches!(get_view(word(pos), pos), GetView::Claim | GetView::Advance)
            }
            Some(Op::FutexWait(NOT_FULL, _, _)) => {
                let pos = s.mem[TAIL as usize];
                matches!(put_view(word(pos), pos), PutView::Claim | PutView::Advance)
            }
            other => panic!("unexpected sleep {other:?}"),
        }
    }

    fn successors(&mut self, s: &State) -> Vec<(Label, State)> {
        let mut out = self.successors_unbounded(s);
        if let Some(bound) = self.sc.preemptions {
            // A step by another process while the last one could still run
            // is a preemption (deaths and time passing are not).
            let last = s.last as usize;
            let last_runs = matches!(s.procs.get(last), Some(PState::Run(h)) if !matches!(self.pending(*h), Some(Op::Quiesce)));
            out.retain_mut(|(label, t)| {
                let who = match *label {
                    Label::Step(p, ..) | Label::Sleep(p, _) | Label::Wake(p, _) => p,
                    _ => return true,
                };
                t.last = who as u8;
                if last_runs && who != last {
                    t.preemptions += 1;
                }
                t.preemptions <= bound
            });
        }
        out
    }

    fn successors_unbounded(&mut self, s: &State) -> Vec<(Label, State)> {
        let mut out = Vec::new();
        let n = s.procs.len();
        let sup = n - 1;
        let mut running = false;
        for pid in 0..n {
            if let PState::Run(h) = s.procs[pid] {
                match self.pending(h) {
                    Some(Op::Quiesce) => {}
                    Some(op) => {
                        running = true;
                        self.apply(s, pid, h, op, &mut out);
                    }
                    None => unreachable!("finished processes are Done"),
                }
            }
        }
        let short_sleepers: Vec<usize> = (0..n)
            .filter(|&p| match s.procs[p] {
                PState::Sleep(h) => matches!(self.pending(h), Some(Op::FutexWait(_, _, true))),
                _ => false,
            })
            .collect();
        if self.sc.deaths && s.dead.is_none() {
            for pid in 0..sup {
                if matches!(s.procs[pid], PState::Run(_) | PState::Sleep(_)) {
                    self.kill(s, pid, &mut out);
                }
            }
        }
        if running {
            if s.early < self.sc.early {
                for &q in &short_sleepers {
                    let mut t = s.clone();
                    t.early += 1;
                    self.wake(&mut t, q, Res::TimedOut);
                    out.push((Label::Timeout(q), t));
                }
            }
            return out;
        }
        // Quiescence: time passes.
        if !short_sleepers.is_empty() {
            for &q in &short_sleepers {
                let mut t = s.clone();
                self.wake(&mut t, q, Res::TimedOut);
                out.push((Label::Timeout(q), t));
            }
            return out;
        }
        let mut missed = false;
        for q in 0..n {
            if let PState::Sleep(h) = s.procs[q] {
                if self.could_progress(s, h) {
                    missed = true;
                    assert!(
                        s.dead.is_some(),
                        "{}: lost wake-up: process {q} sleeps but could progress",
                        self.sc.name
                    );
                    assert!(
                        s.idle < MAX_IDLE,
                        "{}: process {q} keeps missing wake-ups",
                        self.sc.name
                    );
                    let mut t = s.clone();
                    t.idle += 1;
                    self.wake(&mut t, q, Res::TimedOut);
                    out.push((Label::Timeout(q), t));
                }
            }
        }
        if missed {
            return out;
        }
        if let PState::Run(h) = s.procs[sup] {
            self.apply(s, sup, h, Op::Quiesce, &mut out);
            return out;
        }
        for q in 0..n {
            assert!(
                !matches!(s.procs[q], PState::Sleep(_)),
                "{}: process {q} blocks forever",
                self.sc.name
            );
        }
        out
    }

    /// Checks a final state (nothing can run any more).
    fn check_final(&mut self, s: &State) {
        let name = self.sc.name;
        let mut put = Vec::new();
        let mut taken = Vec::new();
        let mut by_survivors = Vec::new();
        for (pid, p) in s.procs.iter().enumerate() {
            let alive = !matches!(p, PState::Dead(_));
            assert!(
                matches!(p, PState::Done(_) | PState::Dead(_)),
                "{name}: process {pid} did not finish"
            );
            let notes = match *p {
                PState::Done(n) | PState::Dead(n) => self.notes_of[&n].clone(),
                _ => unreachable!(),
            };
            let mut last: HashMap<u64, u64> = HashMap::new();
            for n in &notes {
                match *n {
                    Note::Put(id) => put.push(id),
                    Note::Taken(v, pos) => {
                        let id = v & 0xffff_ffff;
                        assert_eq!(
                            v >> 32,
                            pos,
                            "{name}: message {id} read at the wrong position"
                        );
                        let producer = id >> 8;
                        if let Some(&prev) = last.get(&producer) {
                            assert!(prev < id, "{name}: process {pid} took {id} after {prev}");
                        }
                        last.insert(producer, id);
                        taken.push(id);
                        if alive {
                            by_survivors.push(id);
                        }
                    }
                    _ => {}
                }
            }
            if alive && !self.sc.deaths {
                match self.roles[pid] {
                    Role::Producer(k) => assert_eq!(
                        notes.len() as u64,
                        k,
                        "{name}: producer {pid} did not complete its puts"
                    ),
                    Role::Consumer => assert_eq!(notes.last(), Some(&Note::GetClosed)),
                    Role::Supervisor => {}
                }
            }
        }
        taken.sort_unstable();
        for w in taken.windows(2) {
            assert!(w[0] != w[1], "{name}: message {} taken twice", w[0]);
        }
        let consumers_left = (0..s.procs.len()).any(|p| {
            matches!(self.roles[p], Role::Consumer) && !matches!(s.procs[p], PState::Dead(_))
        });
        for id in put.iter().filter(|_| consumers_left) {
            assert!(
                taken.binary_search(id).is_ok() || s.lost.binary_search(id).is_ok(),
                "{name}: message {id} was put but never delivered"
            );
        }
        for id in &s.discarded {
            assert!(
                s.lost.binary_search(id).is_ok() && !by_survivors.contains(id),
                "{name}: message {id} discarded but not lost with a consumer"
            );
        }
        if !self.sc.deaths {
            assert_eq!(
                put.len(),
                taken.len(),
                "{name}: not every message delivered"
            );
        }
    }

    /// Depth-first search over all states, counting complete schedules.
    fn explore(&mut self) {
        let init = self.initial();
        let mut stack: Vec<Frame> = Vec::new();
        let key = key_of(&init);
        stack.push(Frame {
            key,
            state: init,
            label: None,
            succ: Vec::new(),
            next: usize::MAX,
            count: 0,
        });
        while let Some(top) = stack.last_mut() {
            if top.next == usize::MAX {
                // First visit.
                let state = top.state.clone();
                let r = catch_unwind(AssertUnwindSafe(|| self.successors(&state)));
                let succ = match r {
                    Ok(s) => s,
                    Err(p) => {
                        eprintln!("{}", self.trace(&stack));
                        resume_unwind(p)
                    }
                };
                self.stats.states += 1;
                self.stats.transitions += succ.len() as u64;
                let top = stack.last_mut().unwrap();
                top.succ = succ;
                top.next = 0;
                if top.succ.is_empty() {
                    let state = top.state.clone();
                    if let Err(p) = catch_unwind(AssertUnwindSafe(|| self.check_final(&state))) {
                        eprintln!("{}", self.trace(&stack));
                        resume_unwind(p)
                    }
                    self.stats.finals += 1;
                    self.stats.idle_finals += (state.idle > 0) as u64;
                    self.stats.deaths += state.dead.is_some() as u64;
                    let top = stack.last_mut().unwrap();
                    top.count = 1;
                }
                continue;
            }
            if top.next < top.succ.len() {
                let (label, state) = std::mem::replace(
                    &mut top.succ[top.next],
                    (Label::Kill(usize::MAX), self.initial_placeholder()),
                );
                top.next += 1;
                let key = key_of(&state);
                if let Some(&c) = self.seen.get(&key) {
                    top.count = top.count.saturating_add(c);
                    continue;
                }
                stack.push(Frame {
                    key,
                    state,
                    label: Some(label),
                    succ: Vec::new(),
                    next: usize::MAX,
                    count: 0,
                });
                continue;
            }
            let done = stack.pop().unwrap();
            self.seen.insert(done.key, done.count);
            match stack.last_mut() {
                Some(parent) => parent.count = parent.count.saturating_add(done.count),
                None => self.stats.schedules = done.count,
            }
        }
    }

    fn initial_placeholder(&self) -> State {
        State {
            mem: Vec::new(),
            procs: Vec::new(),
            dead: None,
            lost: Vec::new(),
            discarded: Vec::new(),
            early: 0,
            idle: 0,
            last: 0,
            preemptions: 0,
        }
    }

    /// The schedule that led to the top of `stack`.
    fn trace(&self, stack: &[Frame]) -> String {
        let mut out = format!("{}: counterexample schedule:\n", self.sc.name);
        for f in stack {
            if let Some(l) = f.label {
                let who = |p: usize| format!("p{p} {:?}", self.roles[p]);
                let line = match l {
                    Label::Step(p, op, res) => format!("{}: {op:?} -> {res:?}", who(p)),
                    Label::Sleep(p, op) => format!("{}: {op:?} -> sleeps", who(p)),
                    Label::Wake(p, q) => format!("{}: wakes p{q}", who(p)),
                    Label::Timeout(p) => format!("{}: sleep times out", who(p)),
                    Label::Kill(p) => format!("{}: DIES", who(p)),
                };
                out.push_str(&format!("  {line}\n"));
            }
        }
        out
    }
}

// ----- scenarios -------------------------------------------------------------

fn check(sc: Scenario) -> Stats {
    let t0 = Instant::now();
    let mut e = Explorer::new(sc.clone());
    e.explore();
    let st = e.stats;
    eprintln!(
        "{:<28} states {:>8}  transitions {:>9}  schedules {:>12.3e}  finals {:>6} (repairs {}, insurance {})  histories {:>7}  {:.1?}",
        sc.name,
        st.states,
        st.transitions,
        st.schedules as f64,
        st.finals,
        st.deaths,
        st.idle_finals,
        e.nodes.len(),
        t0.elapsed()
    );
    st
}

fn sc(
    name: &'static str,
    cap: u64,
    producers: &[u64],
    consumers: usize,
    deaths: bool,
    preemptions: Option<u8>,
) -> Scenario {
    Scenario {
        name,
        cap,
        producers: producers.to_vec(),
        consumers,
        deaths,
        early: 1,
        preemptions,
    }
}

/// Every interleaving of one producer and one consumer (plus the closing
/// supervisor), with and without a death at any step.
#[test]
fn model_one_producer_one_consumer_exhaustive() {
    check(sc("1p1c cap1 x2", 1, &[2], 1, false, None));
    check(sc("1p1c cap1 x1 +death", 1, &[1], 1, true, None));
    check(sc("1p1c cap1 x2 +death", 1, &[2], 1, true, None));
    check(sc("1p1c cap2 x2 +death", 2, &[2], 1, true, None));
}

/// Three processes, one of which may die at any step; schedules with at
/// most `k` preemptions (any number of switches where a process blocks,
/// finishes or dies). Each of these found the spin on a tail or head left
/// behind by a dead claimer.
#[test]
fn model_deaths_with_three_processes() {
    check(sc(
        "2p1c cap1 x1 +death <=2pre",
        1,
        &[1, 1],
        1,
        true,
        Some(2),
    ));
    check(sc("1p2c cap1 x2 +death <=1pre", 1, &[2], 2, true, Some(1)));
}

/// Three and four processes without deaths, bounded preemptions.
#[test]
fn model_contention() {
    check(sc("2p1c cap2 x2 <=2pre", 2, &[2, 2], 1, false, Some(2)));
    check(sc("1p2c cap1 x1 <=3pre", 1, &[1], 2, false, Some(3)));
    check(sc("2p2c cap1 x1 <=1pre", 1, &[1, 1], 2, false, Some(1)));
}

/// Any scenario, for longer runs:
/// `MODEL="cap producers consumers deaths early preemptions"`, e.g.
/// `MODEL="2 1,1 2 1 1 1" cargo test -p memshare --test queue_model model_probe -- --nocapture`
/// (producers: messages of each; deaths: 0/1; preemptions: a bound or `-`).
/// Without `MODEL` it checks a small death scenario exhaustively.
#[test]
fn model_probe() {
    let spec = std::env::var("MODEL").unwrap_or_else(|_| "1 1 1 1 0 -".into());
    let f: Vec<&str> = spec.split_whitespace().collect();
    assert_eq!(f.len(), 6, "MODEL needs six fields");
    let producers: Vec<u64> = f[1].split(',').map(|x| x.parse().unwrap()).collect();
    check(Scenario {
        name: "probe",
        cap: f[0].parse().unwrap(),
        producers,
        consumers: f[2].parse().unwrap(),
        deaths: f[3] == "1",
        early: f[4].parse().unwrap(),
        preemptions: f[5].parse().ok(),
    });
}
