//! CUDA graphs of the one stream's work (issue 18: a training step recorded once and replayed as
//! one launch, so the host issues one call where it issued ~850). A capture records every launch,
//! cuBLASLt call and memset enqueued between `begin` and `end` (relaxed mode: the allocator may still
//! call cuMemAlloc while recording, which is not stream work); nothing runs until `launch`. The
//! replayed work uses the same addresses and kernel arguments as the recorded one, so the device
//! blocks it touched belong to the graph while it lives (alloc.rs), and whatever differs per
//! replay must be read by the kernels from device memory that the host rewrites between replays.

use super::{alloc, ck, device, timer};
use cudarc::driver::sys as cu;

pub struct Graph {
    id: u64,
    graph: cu::CUgraph,
    exec: cu::CUgraphExec,
    nodes: usize,
    /// Recorded with timing events (timer.rs, graph mode): the timing's generation, whose end
    /// destroys them.
    timed: Option<u64>,
}

// The handles are used from the JS thread only (as the device's).
unsafe impl Send for Graph {}

/// Starts recording the stream's work.
pub fn begin() -> Result<(), String> {
    let d = device()?;
    if timer::mode() == Some(false) {
        return Err(
            "CUDA graph capture while kernel timing is on (bench --profile runs uncaptured; a graph is timed in the timer's graph mode)".into(),
        );
    }
    alloc::capture_begin()?;
    let r = unsafe {
        cu::cuStreamBeginCapture_v2(
            d.stream,
            cu::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED,
        )
    };
    if let Err(m) = ck(r, "cuStreamBeginCapture") {
        alloc::capture_end(false);
        return Err(m);
    }
    Ok(())
}

/// Ends the recording and instantiates it. A capture that an operation broke (a synchronising call
/// while recording) fails here with that operation's error.
pub fn end() -> Result<Graph, String> {
    let d = device()?;
    let mut graph: cu::CUgraph = std::ptr::null_mut();
    let r = unsafe { cu::cuStreamEndCapture(d.stream, &mut graph) };
    let ok = r == cu::CUresult::CUDA_SUCCESS && !graph.is_null();
    let id = alloc::capture_end(ok);
    if let Err(m) = ck(r, "cuStreamEndCapture") {
        if !graph.is_null() {
            unsafe { cu::cuGraphDestroy(graph) };
        }
        return Err(m);
    }
    let id = id.ok_or("cuStreamEndCapture returned no graph")?;
    let mut nodes = 0usize;
    let mut exec: cu::CUgraphExec = std::ptr::null_mut();
    let r = unsafe {
        cu::cuGraphGetNodes(graph, std::ptr::null_mut(), &mut nodes);
        cu::cuGraphInstantiateWithFlags(&mut exec, graph, 0)
    };
    if let Err(m) = ck(r, "cuGraphInstantiate") {
        unsafe { cu::cuGraphDestroy(graph) };
        alloc::release_graph(id);
        return Err(m);
    }
    Ok(Graph {
        id,
        graph,
        exec,
        nodes,
        timed: (timer::mode() == Some(true)).then(timer::generation),
    })
}

/// Ends a recording that the host abandoned (an error in the code being captured), discarding it.
pub fn abort() {
    let Ok(d) = device() else { return };
    let mut graph: cu::CUgraph = std::ptr::null_mut();
    unsafe {
        cu::cuStreamEndCapture(d.stream, &mut graph);
        if !graph.is_null() {
            cu::cuGraphDestroy(graph);
        }
    }
    alloc::capture_end(false);
}

impl Graph {
    /// Enqueues one replay on the stream (refused while a tensor made outside the graph holds one
    /// of its blocks).
    pub fn launch(&self) -> Result<(), String> {
        alloc::check_graph(self.id)?;
        if self.timed.is_some_and(|g| g != timer::generation()) {
            return Err("a graph recorded with kernel timing replayed after the timing ended (its events are gone)".into());
        }
        ck(
            unsafe { cu::cuGraphLaunch(self.exec, device()?.stream) },
            "cuGraphLaunch",
        )
    }

    /// Recorded operations (kernels, GEMMs' kernels, memsets).
    pub fn nodes(&self) -> usize {
        self.nodes
    }

    /// Device blocks the graph's work uses.
    pub fn blocks(&self) -> usize {
        alloc::graph_blocks(self.id)
    }

    /// Of those, the ones held now by tensors made outside the graph.
    pub fn borrowed(&self) -> usize {
        alloc::graph_borrowed(self.id)
    }
}

impl Drop for Graph {
    /// Stream-ordered like a free: replays already enqueued keep their blocks until they are done,
    /// since later work on the stream runs after them.
    fn drop(&mut self) {
        unsafe {
            cu::cuGraphExecDestroy(self.exec);
            cu::cuGraphDestroy(self.graph);
        }
        alloc::release_graph(self.id);
    }
}
