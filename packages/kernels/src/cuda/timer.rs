//! GPU time per kernel, for `bench step --profile`: while enabled, every launch (NVRTC kernels and
//! cuBLASLt GEMMs) is bracketed by two CUDA events on the stream. The step runs unsynchronised, as
//! it does in training, so the sum of kernel times against the step's wall time shows how much of
//! the step the GPU spends idle waiting for the host. Off by default: a disabled timer costs one
//! mutex check per launch.
//!
//! In graph mode (`enable(true, true)`) the events are recorded as external events, so that a CUDA
//! graph captured meanwhile holds them as event-record nodes: each replay records them again, and
//! `read(true)` gives that replay's times, keeping the events for the next. A graph captured so
//! refuses to replay once timing has been reset (its events are destroyed then): `generation`.

use super::{ck, device};
use cudarc::driver::sys as cu;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

struct Timer {
    labels: Vec<String>,
    index: HashMap<String, usize>,
    /// (label, start, end) per timed launch, in stream order.
    marks: Vec<(usize, cu::CUevent, cu::CUevent)>,
    /// Events recorded as external events (a graph captured meanwhile holds them).
    graph: bool,
}

unsafe impl Send for Timer {}

static TIMER: Mutex<Option<Timer>> = Mutex::new(None);
/// Bumped at every start or stop of timing: the events of a graph-mode timer live until then.
static GENERATION: AtomicU64 = AtomicU64::new(0);

/// A launch being timed: its label and start event.
pub struct Mark(usize, cu::CUevent);

fn event() -> Result<cu::CUevent, String> {
    let mut ev: cu::CUevent = std::ptr::null_mut();
    ck(unsafe { cu::cuEventCreate(&mut ev, 0) }, "cuEventCreate")?;
    Ok(ev)
}

/// Starts or stops timing (stopping drops what was recorded); `graph`: as external events.
pub fn enable(on: bool, graph: bool) -> Result<(), String> {
    let mut g = TIMER.lock().unwrap_or_else(|e| e.into_inner());
    GENERATION.fetch_add(1, Ordering::SeqCst);
    if let Some(t) = g.take() {
        destroy(&t);
    }
    if on {
        *g = Some(Timer {
            labels: Vec::new(),
            index: HashMap::new(),
            marks: Vec::new(),
            graph,
        });
    }
    Ok(())
}

/// Which timing is on now (see GENERATION).
pub fn generation() -> u64 {
    GENERATION.load(Ordering::SeqCst)
}

/// Whether timing is on, and if so whether in graph mode.
pub fn mode() -> Option<bool> {
    TIMER
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .map(|t| t.graph)
}

/// Records `ev` on the stream: in graph mode while the stream is being captured, as an external
/// event (an event-record node; the flag is invalid outside a capture).
fn record(ev: cu::CUevent, graph: bool) -> Result<(), String> {
    let stream = device()?.stream;
    let mut status = cu::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
    if graph {
        ck(
            unsafe { cu::cuStreamIsCapturing(stream, &mut status) },
            "cuStreamIsCapturing",
        )?;
    }
    if status == cu::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_ACTIVE {
        let flags = cu::CUevent_record_flags_enum::CU_EVENT_RECORD_EXTERNAL as u32;
        ck(
            unsafe { cu::cuEventRecordWithFlags(ev, stream, flags) },
            "cuEventRecordWithFlags",
        )
    } else {
        ck(unsafe { cu::cuEventRecord(ev, stream) }, "cuEventRecord")
    }
}

fn destroy(t: &Timer) {
    for (_, a, b) in &t.marks {
        unsafe {
            cu::cuEventDestroy_v2(*a);
            cu::cuEventDestroy_v2(*b);
        }
    }
}

/// Whether launches are being timed.
pub fn on() -> bool {
    TIMER.lock().unwrap_or_else(|e| e.into_inner()).is_some()
}

/// Records the start of a launch labelled by `label()` (called only when timing is on).
pub fn start(label: impl FnOnce() -> String) -> Result<Option<Mark>, String> {
    let mut g = TIMER.lock().unwrap_or_else(|e| e.into_inner());
    let Some(t) = g.as_mut() else { return Ok(None) };
    let name = label();
    let id = match t.index.get(&name) {
        Some(i) => *i,
        None => {
            t.labels.push(name.clone());
            t.index.insert(name, t.labels.len() - 1);
            t.labels.len() - 1
        }
    };
    let ev = event()?;
    record(ev, t.graph)?;
    Ok(Some(Mark(id, ev)))
}

/// Records the end of a timed launch.
pub fn stop(m: Option<Mark>) -> Result<(), String> {
    let Some(Mark(id, a)) = m else { return Ok(()) };
    let b = event()?;
    let mut g = TIMER.lock().unwrap_or_else(|e| e.into_inner());
    record(b, g.as_ref().is_some_and(|t| t.graph))?;
    match g.as_mut() {
        Some(t) => t.marks.push((id, a, b)),
        None => unsafe {
            cu::cuEventDestroy_v2(a);
            cu::cuEventDestroy_v2(b);
        },
    }
    Ok(())
}

/// Per label: (label, milliseconds, launches).
pub type LabelTimes = Vec<(String, f64, u32)>;

/// Per label: (milliseconds, launches), summed over what was recorded since the last read, plus
/// the span from the first start to the last end. Waits for the stream; clears the record unless
/// `keep` (a graph's events, recorded again by its next replay).
pub fn read(keep: bool) -> Result<(LabelTimes, f64), String> {
    super::synchronize()?;
    let mut g = TIMER.lock().unwrap_or_else(|e| e.into_inner());
    let Some(t) = g.as_mut() else {
        return Ok((Vec::new(), 0.0));
    };
    let mut sums = vec![(0.0f64, 0u32); t.labels.len()];
    for (id, a, b) in &t.marks {
        let mut ms = 0.0f32;
        ck(
            unsafe { cu::cuEventElapsedTime_v2(&mut ms, *a, *b) },
            "cuEventElapsedTime",
        )?;
        sums[*id].0 += ms as f64;
        sums[*id].1 += 1;
    }
    let mut span = 0.0f32;
    if let (Some(f), Some(l)) = (t.marks.first(), t.marks.last()) {
        ck(
            unsafe { cu::cuEventElapsedTime_v2(&mut span, f.1, l.2) },
            "cuEventElapsedTime",
        )?;
    }
    if !keep {
        destroy(t);
        t.marks.clear();
    }
    let out = t
        .labels
        .iter()
        .zip(sums)
        .filter(|(_, (_, n))| *n > 0)
        .map(|(l, (ms, n))| (l.clone(), ms, n))
        .collect();
    Ok((out, span as f64))
}
