//! A watchdog over other processes for the ranks of a run on several GPUs (issue 22). A rank waiting
//! in an NCCL collective for a peer that has died waits for ever, with its JavaScript thread blocked
//! in the device read, so the run's own error path (which names the dead rank and the checkpoint to
//! resume from) never runs. This thread does not depend on the JavaScript thread: every 100 ms it
//! looks at the watched processes (Linux: /proc/<pid>/stat; a zombie counts as gone), and once one
//! has been gone for the grace period it prints the note (`{pid}` and `{rank}` filled in) and ends
//! this process with exit code 3 at once (`_exit`: no exit handlers, which could wait on the blocked
//! device). The grace period lets a JavaScript thread that is not blocked report the failure itself.

use napi_derive::napi;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

struct Watch {
    /// (pid, rank) pairs.
    procs: Vec<(i32, i32)>,
    note: String,
    grace: Duration,
    /// Bumped by every watch/unwatch: a thread whose generation is stale stops.
    generation: u64,
}

static WATCH: OnceLock<Mutex<Watch>> = OnceLock::new();

fn state() -> &'static Mutex<Watch> {
    WATCH.get_or_init(|| {
        Mutex::new(Watch {
            procs: Vec::new(),
            note: String::new(),
            grace: Duration::ZERO,
            generation: 0,
        })
    })
}

/// Whether process `pid` is running (not gone, not a zombie waiting to be reaped).
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // "pid (comm) S ...": the state is the first field after the last ')'.
        Ok(s) => !matches!(
            s.rsplit(')')
                .next()
                .and_then(|t| t.trim_start().chars().next()),
            Some('Z') | Some('X') | None
        ),
        Err(_) => false,
    }
}

extern "C" {
    fn _exit(code: std::ffi::c_int) -> !;
}

/// Watches `pids` (rank `ranks[i]` for pid i) from now on, replacing any earlier watch. Without
/// /proc (not Linux) it watches nothing and returns false.
#[napi]
pub fn watch_processes(pids: Vec<i32>, ranks: Vec<i32>, note: String, grace_ms: u32) -> bool {
    if !std::path::Path::new("/proc/self/stat").exists() {
        return false;
    }
    let generation = {
        let mut w = state().lock().unwrap();
        w.generation += 1;
        w.procs = pids.into_iter().zip(ranks).collect();
        w.note = note;
        w.grace = Duration::from_millis(grace_ms as u64);
        w.generation
    };
    std::thread::spawn(move || {
        let mut gone_since: Option<(Instant, i32, i32)> = None;
        loop {
            std::thread::sleep(Duration::from_millis(100));
            let w = state().lock().unwrap();
            if w.generation != generation {
                return;
            }
            match gone_since {
                None => {
                    if let Some(&(pid, rank)) = w.procs.iter().find(|(p, _)| !alive(*p)) {
                        gone_since = Some((Instant::now(), pid, rank));
                    }
                }
                Some((t, pid, rank)) if t.elapsed() >= w.grace => {
                    let msg = w
                        .note
                        .replace("{pid}", &pid.to_string())
                        .replace("{rank}", &rank.to_string());
                    eprintln!("{msg}");
                    unsafe { _exit(3) };
                }
                Some(_) => {}
            }
        }
    });
    true
}

/// The note printed when a watched process is gone (the run's progress changes it as it goes).
#[napi]
pub fn set_watch_note(note: String) {
    state().lock().unwrap().note = note;
}

/// Stops watching (the run is ending on its own terms).
#[napi]
pub fn unwatch() {
    let mut w = state().lock().unwrap();
    w.generation += 1;
    w.procs.clear();
}
