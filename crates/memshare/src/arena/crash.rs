//! Crash points, for tests of a process killed in the middle of an arena
//! operation: a process told to exits at the named point, holding the
//! arena's mutex and running no destructors, as SIGKILL would leave it.
//! Nothing exits unless a test calls [`exit_at`].

use std::sync::atomic::{AtomicU32, Ordering};

/// The exit status of a process that stopped at its crash point.
pub const EXIT_STATUS: i32 = 77;

/// Where a process can be made to die.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum CrashPoint {
    /// Repair: dead holders cleared from every block header (pass 1).
    RepairAfterHolders = 1,
    /// Repair: the pin table recounted and relinked (pass 2).
    RepairAfterPins,
    /// Repair: pins owned by blocks about to be freed released (pass 2b).
    RepairAfterOwnedPins,
    /// Repair: blocks freed, merged, binned and counted (pass 3).
    RepairAfterBlocks,
    /// Growth: the new segment is made and written, not yet published.
    GrowBeforePublish,
    /// Growth: the new segment is published, its free block not yet binned.
    GrowAfterPublish,
}

impl CrashPoint {
    /// Every crash point, in the order an operation reaches them.
    pub const ALL: [CrashPoint; 6] = [
        CrashPoint::RepairAfterHolders,
        CrashPoint::RepairAfterPins,
        CrashPoint::RepairAfterOwnedPins,
        CrashPoint::RepairAfterBlocks,
        CrashPoint::GrowBeforePublish,
        CrashPoint::GrowAfterPublish,
    ];
}

/// The point at which this process exits (0: none).
static EXIT_AT: AtomicU32 = AtomicU32::new(0);

/// Makes this process exit (status [`EXIT_STATUS`]) when it next reaches
/// `point`.
pub fn exit_at(point: CrashPoint) {
    EXIT_AT.store(point as u32, Ordering::Relaxed);
}

/// Exits here if this process was told to by [`exit_at`].
pub(super) fn reached(point: CrashPoint) {
    if EXIT_AT.load(Ordering::Relaxed) == point as u32 {
        // SAFETY: ends the process at once without unwinding or running
        // destructors, which is what the test means to simulate.
        unsafe { libc::_exit(EXIT_STATUS) };
    }
}
