//! Elementwise arithmetic, casts and the global sum. Each output element is computed exactly as
//! the ts reference computes it (f64 arithmetic rounded once to f32 where ts works in JS numbers).

use super::util::{bf16_bits, bf16_to_f32, multiversion, par_sum, REDUCE_BLOCK};
use rayon::prelude::*;

const CHUNK: usize = REDUCE_BLOCK;

multiversion! {
    fn add_block(a: &[f32], b: &[f32], o: &mut [f32]) {
        for ((o, &x), &y) in o.iter_mut().zip(a).zip(b) { *o = x + y; }
    }
}

/// o = a + b (an f32 sum of two f32 values equals the f64 sum rounded to f32).
pub fn add(a: &[f32], b: &[f32], o: &mut [f32]) {
    o.par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
        .for_each(|(o, (a, b))| add_block(a, b, o));
}

multiversion! {
    fn add_into_block(d: &mut [f32], s: &[f32], alpha: f64) {
        if alpha == 1.0 {
            for (d, &s) in d.iter_mut().zip(s) { *d += s; }
        } else {
            for (d, &s) in d.iter_mut().zip(s) { *d = (*d as f64 + alpha * s as f64) as f32; }
        }
    }
}

/// d += alpha * s, with alpha * s and the sum in f64 (as ts), rounded once.
pub fn add_into(d: &mut [f32], s: &[f32], alpha: f64) {
    d.par_chunks_mut(CHUNK)
        .zip(s.par_chunks(CHUNK))
        .for_each(|(d, s)| add_into_block(d, s, alpha));
}

multiversion! {
    fn scale_block(a: &[f32], s: f64, o: &mut [f32]) {
        for (o, &x) in o.iter_mut().zip(a) { *o = (x as f64 * s) as f32; }
    }
}

/// o = a * s (s is an f64, as the JS number ts multiplies by).
pub fn scale(a: &[f32], s: f64, o: &mut [f32]) {
    o.par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK))
        .for_each(|(o, a)| scale_block(a, s, o));
}

/// Sum of all elements in f64, deterministic.
pub fn sum(x: &[f32]) -> f64 {
    par_sum(x)
}

multiversion! {
    fn to_bf16_block(x: &[f32], o: &mut [u16]) {
        for (o, &v) in o.iter_mut().zip(x) { *o = bf16_bits(v); }
    }
}
multiversion! {
    fn from_bf16_block(x: &[u16], o: &mut [f32]) {
        for (o, &v) in o.iter_mut().zip(x) { *o = bf16_to_f32(v); }
    }
}

/// f32 to BF16 bits (RNE; inf kept; NaN to 0x7fff).
pub fn cast_to_bf16(x: &[f32], o: &mut [u16]) {
    o.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(o, x)| to_bf16_block(x, o));
}

/// BF16 bits to f32 (exact).
pub fn cast_to_f32(x: &[u16], o: &mut [f32]) {
    o.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(o, x)| from_bf16_block(x, o));
}
