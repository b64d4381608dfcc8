//! Time and fresh ids come from outside the store, so the simulator can pass
//! virtual ones and replay a seed exactly.

use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};

use entente_model::RecordId;

/// Wall-clock time and record-id minting.
pub trait Clock: Send + Sync {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> i64;
    /// A fresh record id (UUIDv7).
    fn new_id(&self) -> RecordId;
}

/// The real clock and OS randomness.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0)
    }

    fn new_id(&self) -> RecordId {
        RecordId::parse(&uuid::Uuid::now_v7().hyphenated().to_string()).expect("uuid is a valid id")
    }
}

/// A clock that only moves when told to, minting ids from a seed: the same
/// seed and the same calls give the same ids.
#[derive(Debug)]
pub struct ManualClock {
    now: AtomicI64,
    state: Mutex<u64>,
}

impl ManualClock {
    /// Starts at `now_ms` with id stream `seed`.
    pub fn new(now_ms: i64, seed: u64) -> ManualClock {
        ManualClock {
            now: AtomicI64::new(now_ms),
            state: Mutex::new(seed ^ 0x9E37_79B9_7F4A_7C15),
        }
    }

    /// Sets the time.
    pub fn set(&self, now_ms: i64) {
        self.now.store(now_ms, Ordering::SeqCst);
    }

    /// Moves time forward.
    pub fn advance(&self, ms: i64) {
        self.now.fetch_add(ms, Ordering::SeqCst);
    }
}

fn splitmix(s: &mut u64) -> u64 {
    *s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *s;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.now.load(Ordering::SeqCst)
    }

    fn new_id(&self) -> RecordId {
        let mut s = self.state.lock().expect("lock");
        let a = splitmix(&mut s).to_le_bytes();
        let b = splitmix(&mut s).to_le_bytes();
        let mut r = [0u8; 10];
        r[..8].copy_from_slice(&a);
        r[8..].copy_from_slice(&b[..2]);
        RecordId::new_v7(self.now_ms().max(0) as u64, r)
    }
}
