//! LLM.int8 weight quantization, byte for byte as bitsandbytes' CUDA kernel (`kInt8VectorQuant`, what
//! transformers gets on a GPU) and, but for the reciprocal, as `Int8Params._quantize` on the CPU
//! (`nn/modules.py` casts the weight to float16 first; `backends/default/ops.py`,
//! `int8_vectorwise_quant` with threshold 0):
//! - every element is rounded to float16 (round to nearest even), then widened back to f32;
//! - SCB = max |w| per row (f32); CB = round_half_even(w * ((1 / SCB) * 127)) as i8;
//! - an all-zero row gets SCB = 0 and CB = 0.
//!
//! `1 / SCB` is the GPU's approximate reciprocal (MUFU.RCP: the CUDA kernel is built with
//! `--use_fast_math`), then multiplied by 127 (`quant::row_scale`; benches/gpu/rcp_table.py --sass-only
//! shows the instructions). torch on the CPU computes `127.0 / SCB` as the correctly rounded reciprocal
//! times 127, so bitsandbytes' CPU quantization can be one code apart, in the rows whose reciprocal the
//! GPU rounds the other way (12 of the fixture's 81,964 CB).

use super::{row_scale, Kernel};
use crate::dtype::FloatSlice;
use crate::error::{Error, Result};

/// Quantizes a `rows x cols` weight (row-major) to (CB, SCB) with the fastest kernel.
pub fn quantize_int8(
    x: FloatSlice,
    rows: usize,
    cols: usize,
    kernel: Kernel,
) -> Result<(Vec<i8>, Vec<f32>)> {
    if rows.checked_mul(cols) != Some(x.len()) {
        return Err(Error::BadShape {
            path: Default::default(),
            tensor: String::new(),
            reason: format!(
                "int8 needs rows x cols = {rows} x {cols} elements, got {}",
                x.len()
            ),
        });
    }
    let mut cb = vec![0i8; x.len()];
    let mut scb = vec![0f32; rows];
    quantize_int8_into(x, cols, kernel, &mut cb, &mut scb)?;
    Ok((cb, scb))
}

/// Quantizes whole rows of `x` into caller-owned buffers (`x.len() == scb.len() * cols`).
pub fn quantize_int8_into(
    x: FloatSlice,
    cols: usize,
    kernel: Kernel,
    cb: &mut [i8],
    scb: &mut [f32],
) -> Result<()> {
    #[cfg(target_arch = "x86_64")]
    if kernel == Kernel::Auto && super::has_avx2() {
        // SAFETY: the CPU supports avx2, f16c and fma (checked just above).
        return unsafe { super::x86::quantize_int8_rows(x, cols, cb, scb) };
    }
    let _ = kernel;
    scalar_rows(x, cols, cb, scb)
}

/// The scalar reference.
pub fn quantize_int8_reference(
    x: FloatSlice,
    rows: usize,
    cols: usize,
) -> Result<(Vec<i8>, Vec<f32>)> {
    quantize_int8(x, rows, cols, Kernel::Scalar)
}

/// Rounds an f32 to float16 and back (what `.to(torch.float16)` does to every weight).
#[inline(always)]
pub(crate) fn through_f16(v: f32) -> f32 {
    half::f16::from_f32(v).to_f32()
}

/// The error for a value that is not finite once in float16.
pub(crate) fn overflow(index: usize) -> Error {
    Error::NonFinite {
        path: Default::default(),
        tensor: String::new(),
        index,
    }
}

fn scalar_rows(x: FloatSlice, cols: usize, cb: &mut [i8], scb: &mut [f32]) -> Result<()> {
    let mut row = vec![0f32; cols];
    for (r, s) in scb.iter_mut().enumerate() {
        x.widen_into(r * cols, &mut row);
        let mut am = 0f32;
        for (c, v) in row.iter_mut().enumerate() {
            *v = through_f16(*v);
            if !v.is_finite() {
                return Err(overflow(r * cols + c));
            }
            am = am.max(v.abs());
        }
        *s = am;
        let out = &mut cb[r * cols..(r + 1) * cols];
        if am == 0.0 {
            out.fill(0);
            continue;
        }
        let scale = row_scale(am);
        for (o, v) in out.iter_mut().zip(&row) {
            *o = (v * scale).round_ties_even() as i8;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_scale_to_127_and_zero_rows_stay_zero() {
        let v: Vec<u8> = [1.0f32, -0.5, 0.25, 0.0, 0.0, 0.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let (cb, scb) = quantize_int8_reference(FloatSlice::F32(&v), 2, 3).unwrap();
        assert_eq!(scb, vec![1.0, 0.0]);
        assert_eq!(cb, vec![127, -64, 32, 0, 0, 0]);
    }

    #[test]
    fn overflowing_float16_is_an_error() {
        let v: Vec<u8> = [1.0e6f32, 1.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        assert!(matches!(
            quantize_int8_reference(FloatSlice::F32(&v), 1, 2),
            Err(Error::NonFinite { index: 0, .. })
        ));
    }
}
