//! Caching device allocator. Requests are rounded up to a size class (512-byte multiples below
//! 4 KiB, then four classes per power of two, so at most 25% is wasted); a freed block goes to its
//! class's free list and is handed to the next request of that class. Reuse is stream-ordered: all
//! work runs on the backend's single stream, so a block freed after enqueuing the kernels that use
//! it may be given to kernels enqueued later without waiting. When the device runs out of memory
//! the cache is returned to the driver (after a stream synchronisation) and the allocation retried.
//!
//! `MOE8_CUDA_CACHE=0` turns caching off (exact sizes, freed at once after a synchronisation: slow,
//! for compute-sanitizer); `MOE8_POISON=1` fills every new block with 0xff bytes (NaN in f32, bf16
//! and both FP8 formats, -1 in i32) so an output an op forgets to write shows up in the op suite.

use super::{ck, device};
use cudarc::driver::sys as cu;
use std::collections::HashMap;
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
    ck(
        unsafe { cu::cuStreamSynchronize(d.stream) },
        "cuStreamSynchronize",
    )?;
    let blocks: Vec<(usize, u64)> = with_pool(|p| {
        let v: Vec<(usize, u64)> = p
            .free
            .drain()
            .flat_map(|(c, l)| l.into_iter().map(move |ptr| (c, ptr)))
            .collect();
        for (c, _) in &v {
            p.cached -= *c as u64;
            p.reserved -= *c as u64;
        }
        v
    });
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
        if ptr.is_some() {
            p.hits += 1;
            p.cached -= class as u64;
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
            with_pool(|p| p.reserved += class as u64);
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
    });
    Ok(())
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
