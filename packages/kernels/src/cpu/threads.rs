//! The rayon pool of the cpu backend, with the thread that loads the addon (JavaScript's main
//! thread) as one of its workers.
//!
//! A parallel op called from a thread outside the pool is injected into the pool's queue while the
//! caller sleeps until a worker has finished it: every op then costs a wake-up of the workers and
//! one of the caller, and the caller's core idles while the op runs. With the caller as worker 0,
//! an op starts on the calling thread and only the other workers are woken to steal from it. A
//! training step makes ~900 native calls; on two cores the wake-ups were ~10% of the step's CPU
//! time, most of its system time.

use std::sync::OnceLock;

/// Builds the global pool, with the calling thread as worker 0, unless something built it first
/// (then the default pool stays). Call it before any other rayon use: `info()` does, and the
/// addon's loader calls `info()` as soon as it loads the addon.
pub fn init_pool() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        // An error means the pool exists already; it works as before, only without the caller.
        let _ = rayon::ThreadPoolBuilder::new()
            .use_current_thread()
            .build_global();
    });
}
