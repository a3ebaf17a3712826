//! Fault injection for the crash-consistency tests: with the `fault-injection` feature,
//! `OP_DBUS_FAULT_AT=N` aborts the process at the N-th fault point it passes (counting
//! from 1), as a SIGKILL would, so a test can stop an operation at every point in turn.
//! Without the feature every point compiles to nothing.

#[cfg(feature = "fault-injection")]
pub fn point(name: &str) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static HITS: AtomicU64 = AtomicU64::new(0);
    let n = HITS.fetch_add(1, Ordering::SeqCst) + 1;
    if std::env::var("OP_DBUS_FAULT_AT").ok().and_then(|v| v.parse::<u64>().ok()) == Some(n) {
        eprintln!("fault injection: stopping at point {n} ({name})");
        std::process::abort();
    }
}

#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn point(_name: &str) {}
