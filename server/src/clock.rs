//! The wall clock every timestamp moorline records or sends is read from: milliseconds since
//! the Unix epoch, as amarre's summaries, the events and the audit log carry them.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (0 for a clock set before it).
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
