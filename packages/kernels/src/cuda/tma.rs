//! Tensor maps for the Hopper kernels' TMA copies (gemm_sm90.cu): `cuTensorMapEncodeTiled`, reached
//! through cudarc's dynamically loaded driver like every other driver call. The map is host data
//! (128 bytes, encoded without touching the device); a launch passes it by value as a
//! `const __grid_constant__ CUtensorMap` parameter.

use super::{ck, device};
use cudarc::driver::sys as cu;

/// Element type of a 2-D tensor a map describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapElem {
    /// FP8 codes (E4M3 or E5M2: TMA copies bytes).
    U8,
    Bf16,
    F32,
}

impl MapElem {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "u8" => Ok(MapElem::U8),
            "bf16" => Ok(MapElem::Bf16),
            "f32" => Ok(MapElem::F32),
            _ => Err(format!(
                "tensor map: element type {s:?} (want \"u8\", \"bf16\" or \"f32\")"
            )),
        }
    }

    fn bytes(self) -> u64 {
        match self {
            MapElem::U8 => 1,
            MapElem::Bf16 => 2,
            MapElem::F32 => 4,
        }
    }
}

/// A row-major `[rows, inner]` tensor at device address `ptr`, copied in boxes of
/// `box_inner x box_rows` elements with the 128- or 64-byte swizzle (`swizzle`, the layout the
/// kernels' shared-memory tiles and wgmma descriptors assume: gemm_sm90.cu 128, flash_sm90.cu 64);
/// reads past the tensor's edge return zeros, writes there are dropped.
pub struct Map2d {
    pub ptr: u64,
    pub elem: MapElem,
    pub inner: u64,
    pub rows: u64,
    pub box_inner: u32,
    pub box_rows: u32,
    /// Swizzle span in bytes: 128 or 64; a box row is at most this long.
    pub swizzle: u32,
}

/// The 128 bytes of the tensor map, or the driver's reason for refusing it.
pub fn encode_2d(m: &Map2d) -> Result<[u8; 128], String> {
    device()?;
    let row_bytes = m.inner * m.elem.bytes();
    // The driver's own rules, checked here to name the offending value in the message.
    if !m.ptr.is_multiple_of(16) || !row_bytes.is_multiple_of(16) {
        return Err(format!(
            "tensor map: address {:#x} and row pitch {row_bytes} bytes must be multiples of 16",
            m.ptr
        ));
    }
    let swizzle = match m.swizzle {
        128 => cu::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
        64 => cu::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_64B,
        s => return Err(format!("tensor map: swizzle {s} bytes (want 128 or 64)")),
    };
    if m.box_inner as u64 * m.elem.bytes() > m.swizzle as u64 || m.box_rows == 0 || m.box_rows > 256
    {
        return Err(format!(
            "tensor map: box {}x{} does not fit the {}-byte swizzle",
            m.box_inner, m.box_rows, m.swizzle
        ));
    }
    let dtype = match m.elem {
        MapElem::U8 => cu::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_UINT8,
        MapElem::Bf16 => cu::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
        MapElem::F32 => cu::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT32,
    };
    let dims: [u64; 2] = [m.inner.max(1), m.rows.max(1)];
    let strides: [u64; 1] = [row_bytes.max(16)];
    let boxes: [u32; 2] = [m.box_inner, m.box_rows];
    let elem_strides: [u32; 2] = [1, 1];
    let mut map = cu::CUtensorMap { opaque: [0; 16] };
    ck(
        unsafe {
            cu::cuTensorMapEncodeTiled(
                &mut map,
                dtype,
                2,
                m.ptr as *mut std::ffi::c_void,
                dims.as_ptr(),
                strides.as_ptr(),
                boxes.as_ptr(),
                elem_strides.as_ptr(),
                cu::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
                swizzle,
                cu::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                cu::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
            )
        },
        "cuTensorMapEncodeTiled",
    )?;
    let mut out = [0u8; 128];
    for (i, w) in map.opaque.iter().enumerate() {
        out[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
    }
    Ok(out)
}
