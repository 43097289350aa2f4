//! Caching device allocator. Requests are rounded up to a size class (512-byte multiples below
//! 4 KiB, then four classes per power of two, so at most 25% is wasted); a freed block goes to its
//! class's free list and is handed to the next request of that class. Reuse is stream-ordered: all
//! work runs on the backend's single stream, so a block freed after enqueuing the kernels that use
//! it may be given to kernels enqueued later without waiting. When the device runs out of memory
//! the cache is returned to the driver (after a stream synchronisation) and the allocation retried.
//!
//! Blocks a captured CUDA graph uses (graph.rs) stay with the allocator but belong to the graph:
//! every block handed out or given back while a capture is recording becomes the graph's, since the
//! graph's kernels will use those addresses on every replay. Between replays other work may still
//! be given a graph's free blocks (all work is stream-ordered, so it runs between two replays), but
//! a replay is refused while one is still held by a tensor made outside the graph (`check_graph`),
//! and `empty_cache` never returns a graph's block to the driver.
//!
//! `MOE8_CUDA_CACHE=0` turns caching off (exact sizes, freed at once after a synchronisation: slow,
//! for compute-sanitizer); `MOE8_POISON=1` fills every new block with 0xff bytes (NaN in f32, bf16
//! and both FP8 formats, -1 in i32) so an output an op forgets to write shows up in the op suite.

use super::{ck, device};
use cudarc::driver::sys as cu;
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

#[derive(Default)]
struct Pool {
    free: HashMap<usize, Vec<u64>>,
    /// Bytes in blocks handed out (rounded sizes).
    allocated: u64,
    peak: u64,
    /// Bytes in the free lists.
    cached: u64,
    /// Bytes obtained from the driver (allocated + cached).
    reserved: u64,
    allocs: u64,
    hits: u64,
    /// Per live graph: its blocks, and those of them its capture left held (its outputs).
    graphs: HashMap<u64, GraphBlocks>,
    /// How many live graphs use each block.
    owners: HashMap<u64, u32>,
    /// Graph blocks handed out now.
    live_owned: HashSet<u64>,
    /// The capture recording now: its graph's id and the blocks it has touched.
    capture: Option<(u64, HashSet<u64>)>,
    next_graph: u64,
}

#[derive(Default)]
struct GraphBlocks {
    blocks: Vec<u64>,
    held: HashSet<u64>,
}

impl Pool {
    /// Bookkeeping of a block handed out (`out`) or given back.
    fn touch(&mut self, ptr: u64, out: bool) {
        if let Some((_, set)) = self.capture.as_mut() {
            set.insert(ptr);
        }
        if self.owners.contains_key(&ptr) {
            if out {
                self.live_owned.insert(ptr);
            } else {
                self.live_owned.remove(&ptr);
            }
        }
    }
}

static POOL: Mutex<Option<Pool>> = Mutex::new(None);

fn caching() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("MOE8_CUDA_CACHE").as_deref() != Ok("0"))
}

pub fn poison() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("MOE8_POISON").as_deref() == Ok("1"))
}

/// The size class of a request.
pub fn size_class(bytes: usize) -> usize {
    if bytes == 0 {
        return 0;
    }
    if !caching() {
        return bytes.div_ceil(256) * 256;
    }
    if bytes <= 4096 {
        return bytes.div_ceil(512) * 512;
    }
    let p = usize::BITS - 1 - (bytes - 1).leading_zeros(); // 2^p < bytes <= 2^(p+1)
    let step = 1usize << (p - 2); // four classes between 2^p and 2^(p+1)
    bytes.div_ceil(step) * step
}

fn with_pool<T>(f: impl FnOnce(&mut Pool) -> T) -> T {
    let mut g = POOL.lock().unwrap_or_else(|e| e.into_inner());
    f(g.get_or_insert_with(Pool::default))
}

/// Returns every cached block to the driver (waits for the stream first).
pub fn empty_cache() -> Result<(), String> {
    let d = device()?;
    if with_pool(|p| p.capture.is_some()) {
        return Err("out of device memory while a CUDA graph is being captured".into());
    }
    ck(
        unsafe { cu::cuStreamSynchronize(d.stream) },
        "cuStreamSynchronize",
    )?;
    let blocks: Vec<(usize, u64)> = with_pool(|p| -> Result<_, String> {
        // A live graph's blocks stay: its replays write to them.
        let owners = &p.owners;
        let mut v: Vec<(usize, u64)> = Vec::new();
        for (c, l) in p.free.iter_mut() {
            let (kept, gone): (Vec<u64>, Vec<u64>) =
                l.drain(..).partition(|ptr| owners.contains_key(ptr));
            *l = kept;
            v.extend(gone.into_iter().map(|ptr| (*c, ptr)));
        }
        for (c, _) in &v {
            p.cached -= *c as u64;
            p.reserved -= *c as u64;
        }
        Ok(v)
    })?;
    for (_, ptr) in blocks {
        ck(unsafe { cu::cuMemFree_v2(ptr) }, "cuMemFree")?;
    }
    Ok(())
}

/// A device block of `class` bytes (a size class from `size_class`); 0 for an empty request.
pub fn alloc(class: usize) -> Result<u64, String> {
    if class == 0 {
        return Ok(0);
    }
    let d = device()?;
    let hit = with_pool(|p| {
        p.allocs += 1;
        let ptr = p.free.get_mut(&class).and_then(|l| l.pop());
        if let Some(b) = ptr {
            p.hits += 1;
            p.cached -= class as u64;
            p.touch(b, true);
        }
        ptr
    });
    let ptr = match hit {
        Some(p) => p,
        None => {
            let mut ptr: cu::CUdeviceptr = 0;
            let mut r = unsafe { cu::cuMemAlloc_v2(&mut ptr, class) };
            if r == cu::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
                empty_cache()?;
                r = unsafe { cu::cuMemAlloc_v2(&mut ptr, class) };
            }
            if r == cu::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
                let (a, c) = with_pool(|p| (p.allocated, p.reserved));
                return Err(format!(
                    "CUDA out of memory allocating {class} bytes ({a} bytes in use by tensors, {c} reserved)"
                ));
            }
            ck(r, "cuMemAlloc")?;
            with_pool(|p| {
                p.reserved += class as u64;
                p.touch(ptr, true);
            });
            ptr
        }
    };
    with_pool(|p| {
        p.allocated += class as u64;
        p.peak = p.peak.max(p.allocated);
    });
    if poison() {
        ck(
            unsafe { cu::cuMemsetD8Async(ptr, 0xff, class, d.stream) },
            "cuMemsetD8Async (poison)",
        )?;
    }
    Ok(ptr)
}

/// Gives a block back: to its class's free list (stream-ordered reuse), or to the driver when
/// caching is off.
pub fn free(ptr: u64, class: usize) -> Result<(), String> {
    if class == 0 || ptr == 0 {
        return Ok(());
    }
    let d = device()?;
    if !caching() {
        ck(
            unsafe { cu::cuStreamSynchronize(d.stream) },
            "cuStreamSynchronize",
        )?;
        ck(unsafe { cu::cuMemFree_v2(ptr) }, "cuMemFree")?;
        with_pool(|p| {
            p.allocated -= class as u64;
            p.reserved -= class as u64;
        });
        return Ok(());
    }
    with_pool(|p| {
        p.allocated -= class as u64;
        p.cached += class as u64;
        p.free.entry(class).or_default().push(ptr);
        p.touch(ptr, false);
    });
    Ok(())
}

/// Starts recording which blocks a capture touches; returns the graph's id.
pub fn capture_begin() -> Result<u64, String> {
    if !caching() {
        return Err("CUDA graphs need the caching allocator (MOE8_CUDA_CACHE=0 is set)".into());
    }
    with_pool(|p| {
        if p.capture.is_some() {
            return Err("a CUDA graph capture is already recording".to_string());
        }
        p.next_graph += 1;
        p.capture = Some((p.next_graph, HashSet::new()));
        Ok(p.next_graph)
    })
}

/// Ends the recording: with `keep`, every block the capture touched becomes the graph's (those
/// still handed out are its held outputs); without, the capture failed and nothing changes.
pub fn capture_end(keep: bool) -> Option<u64> {
    with_pool(|p| {
        let (id, set) = p.capture.take()?;
        if !keep {
            return None;
        }
        let free: HashSet<u64> = p.free.values().flatten().copied().collect();
        let mut g = GraphBlocks::default();
        for ptr in set {
            *p.owners.entry(ptr).or_default() += 1;
            if !free.contains(&ptr) {
                g.held.insert(ptr);
                p.live_owned.insert(ptr);
            }
            g.blocks.push(ptr);
        }
        p.graphs.insert(id, g);
        Some(id)
    })
}

/// Graph `id`'s blocks held now by anything but its own outputs (its memory lent to other work).
pub fn graph_borrowed(id: u64) -> usize {
    with_pool(|p| {
        p.graphs.get(&id).map_or(0, |g| {
            g.blocks
                .iter()
                .filter(|b| p.live_owned.contains(b) && !g.held.contains(b))
                .count()
        })
    })
}

/// Whether graph `id` may replay: none of its blocks is held by anything but its own outputs.
pub fn check_graph(id: u64) -> Result<(), String> {
    let total = graph_blocks(id);
    if total == 0 {
        return Err("CUDA graph: replay after free".into());
    }
    match graph_borrowed(id) {
        0 => Ok(()),
        n => Err(format!(
            "CUDA graph: {n} of its {total} device blocks are held by tensors made outside it; release them before a replay"
        )),
    }
}

/// Graph `id` is gone: its blocks are ordinary cache again (once no other graph uses them).
pub fn release_graph(id: u64) {
    with_pool(|p| {
        let Some(g) = p.graphs.remove(&id) else {
            return;
        };
        for b in g.blocks {
            if let Some(n) = p.owners.get_mut(&b) {
                *n -= 1;
                if *n == 0 {
                    p.owners.remove(&b);
                    p.live_owned.remove(&b);
                }
            }
        }
    })
}

/// Device blocks graph `id` uses (0 once freed).
pub fn graph_blocks(id: u64) -> usize {
    with_pool(|p| p.graphs.get(&id).map_or(0, |g| g.blocks.len()))
}

pub struct MemStats {
    pub allocated: u64,
    pub peak: u64,
    pub cached: u64,
    pub reserved: u64,
    pub allocs: u64,
    pub hits: u64,
}

pub fn stats() -> MemStats {
    with_pool(|p| MemStats {
        allocated: p.allocated,
        peak: p.peak,
        cached: p.cached,
        reserved: p.reserved,
        allocs: p.allocs,
        hits: p.hits,
    })
}

pub fn reset_peak() {
    with_pool(|p| p.peak = p.allocated);
}

#[cfg(test)]
mod tests {
    #[test]
    fn size_classes_waste_at_most_a_quarter() {
        for b in [
            1usize,
            511,
            512,
            513,
            4096,
            4097,
            5000,
            1 << 20,
            (1 << 20) + 1,
            123_456_789,
        ] {
            let c = super::size_class(b);
            assert!(c >= b);
            assert!(b <= 4096 || (c - b) * 4 <= b, "{b} -> {c}");
        }
    }
}
