//! 4-bit blockwise quantization (NF4 and FP4), byte for byte as bitsandbytes 0.50.2 does it
//! (`backends/default/ops.py`, `quantize_4bit`):
//! - the tensor is flattened row-major and cut into blocks of `blocksize` that cross rows;
//! - absmax = max |x| per block, kept as f32; the scale uses max(absmax, 1e-38). Full blocks store the
//!   unclamped absmax, the tail block stores the clamped one (`am = ...abs().max().clamp(min=1e-38)`
//!   is both its scale and its saved statistic), so an all-zero tail saves 1e-38, not 0;
//! - full blocks are scaled by `x * (1 / absmax)`, the tail block by `x / absmax` (the CPU kernel
//!   divides there, and the two roundings differ);
//! - scaled values are clamped to [-1, 1] and bucketed against the midpoints of the sorted code
//!   (`torch.bucketize`, right=False: a value equal to a midpoint goes to the lower code);
//! - two codes a byte, first element in the high nibble; an odd count is padded with a scaled 0.

use super::tables::{
    FP4_BOUND_BITS, FP4_CODE_BITS, FP4_ORDER, NF4_BOUND_BITS, NF4_CODE_BITS, NF4_ORDER,
};
use super::Kernel;
use crate::dtype::FloatSlice;
use crate::error::{Error, Result};

/// Block sizes bitsandbytes accepts for 4-bit quantization (`functional.quantize_4bit`).
pub const BLOCKSIZES: [usize; 8] = [32, 64, 128, 256, 512, 1024, 2048, 4096];

/// The smallest absmax the scale divides by (`absmax.clamp(min=1e-38)`).
pub(crate) const ABSMAX_FLOOR: f32 = 1e-38;

/// The two 4-bit data types.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QuantType {
    /// NormalFloat4.
    Nf4,
    /// 4-bit float (1 sign bit, bias 3), normalized by 12.
    Fp4,
}

impl QuantType {
    /// Parses "nf4" / "fp4".
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "nf4" => Ok(QuantType::Nf4),
            "fp4" => Ok(QuantType::Fp4),
            _ => Err(Error::InvalidArgument(format!(
                "quant_type must be 'nf4' or 'fp4', got '{s}'"
            ))),
        }
    }

    /// "nf4" or "fp4".
    pub fn as_str(self) -> &'static str {
        match self {
            QuantType::Nf4 => "nf4",
            QuantType::Fp4 => "fp4",
        }
    }

    /// The value of each code (bitsandbytes' `quant_map`).
    pub fn code(self) -> [f32; 16] {
        let bits = match self {
            QuantType::Nf4 => NF4_CODE_BITS,
            QuantType::Fp4 => FP4_CODE_BITS,
        };
        bits.map(f32::from_bits)
    }

    /// Midpoints between sorted code values.
    pub(crate) fn bounds(self) -> [f32; 15] {
        let bits = match self {
            QuantType::Nf4 => NF4_BOUND_BITS,
            QuantType::Fp4 => FP4_BOUND_BITS,
        };
        bits.map(f32::from_bits)
    }

    /// Code index of each sorted position.
    pub(crate) fn order(self) -> [u8; 16] {
        match self {
            QuantType::Nf4 => NF4_ORDER,
            QuantType::Fp4 => FP4_ORDER,
        }
    }
}

/// Checks a blocksize against bitsandbytes' list.
pub fn check_blocksize(blocksize: usize) -> Result<()> {
    if BLOCKSIZES.contains(&blocksize) {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "blocksize must be one of {BLOCKSIZES:?}, got {blocksize}"
        )))
    }
}

/// Output buffers of one 4-bit quantization: `codes` holds (n + 1) / 2 bytes, `absmax` one f32 per block.
pub struct Out4<'a> {
    /// Packed codes, two a byte, first element in the high nibble.
    pub codes: &'a mut [u8],
    /// The absmax of each block.
    pub absmax: &'a mut [f32],
}

/// Quantizes `x` to 4 bits with the fastest kernel, returning (packed codes, absmax per block).
pub fn quantize_4bit(
    x: FloatSlice,
    qt: QuantType,
    blocksize: usize,
    kernel: Kernel,
) -> Result<(Vec<u8>, Vec<f32>)> {
    check_blocksize(blocksize)?;
    let n = x.len();
    let mut codes = vec![0u8; n.div_ceil(2)];
    let mut absmax = vec![0f32; n.div_ceil(blocksize)];
    quantize_4bit_into(
        x,
        qt,
        blocksize,
        kernel,
        Out4 {
            codes: &mut codes,
            absmax: &mut absmax,
        },
    )?;
    Ok((codes, absmax))
}

/// Quantizes `x` into caller-owned buffers. `x` must start on a block boundary of the whole tensor and,
/// unless it ends the tensor, hold a whole number of blocks (that is how the pipeline splits large
/// tensors across threads). Non-finite values are an error naming the element (relative to `x`).
pub fn quantize_4bit_into(
    x: FloatSlice,
    qt: QuantType,
    blocksize: usize,
    kernel: Kernel,
    out: Out4,
) -> Result<()> {
    let n = x.len();
    debug_assert_eq!(out.codes.len(), n.div_ceil(2));
    debug_assert_eq!(out.absmax.len(), n.div_ceil(blocksize));
    let full = n / blocksize * blocksize;
    let (codes_full, codes_tail) = out.codes.split_at_mut(full / 2);
    let (absmax_full, absmax_tail) = out.absmax.split_at_mut(full / blocksize);
    #[cfg(target_arch = "x86_64")]
    let done = if kernel == Kernel::Auto && super::has_avx2() {
        // SAFETY: the CPU supports avx2, f16c and fma (checked just above).
        unsafe {
            super::x86::quantize_4bit_full_blocks(
                x.slice(0, full),
                qt,
                blocksize,
                codes_full,
                absmax_full,
            )
        }?;
        true
    } else {
        false
    };
    #[cfg(not(target_arch = "x86_64"))]
    let done = {
        let _ = kernel;
        false
    };
    if !done {
        scalar_blocks(x.slice(0, full), qt, blocksize, codes_full, absmax_full)?;
    }
    if full < n {
        // The tail block (fewer than `blocksize` elements) always goes through the scalar path: it is
        // scaled by division, as bitsandbytes does.
        scalar_blocks(x.slice(full, n), qt, blocksize, codes_tail, absmax_tail)
            .map_err(|e| e.offset_index(full))?;
    }
    Ok(())
}

/// The scalar reference: the whole tensor, one element at a time.
pub fn quantize_4bit_reference(
    x: FloatSlice,
    qt: QuantType,
    blocksize: usize,
) -> Result<(Vec<u8>, Vec<f32>)> {
    quantize_4bit(x, qt, blocksize, Kernel::Scalar)
}

/// Bucket of a scaled value: the number of bounds strictly below it (`torch.bucketize`, right=False).
#[inline(always)]
pub(crate) fn bucket(bounds: &[f32; 15], s: f32) -> usize {
    bounds.iter().filter(|&&b| b < s).count()
}

/// Scalar quantization of consecutive blocks; the last one may be short (then it is the tensor's tail).
fn scalar_blocks(
    x: FloatSlice,
    qt: QuantType,
    blocksize: usize,
    codes: &mut [u8],
    absmax: &mut [f32],
) -> Result<()> {
    let bounds = qt.bounds();
    let order = qt.order();
    let n = x.len();
    let mut buf = vec![0f32; blocksize.min(n)];
    for (b, am_out) in absmax.iter_mut().enumerate() {
        let start = b * blocksize;
        let end = (start + blocksize).min(n);
        let vals = &mut buf[..end - start];
        x.widen_into(start, vals);
        let mut am = 0f32;
        for (i, v) in vals.iter().enumerate() {
            if !v.is_finite() {
                return Err(Error::NonFinite {
                    path: Default::default(),
                    tensor: String::new(),
                    index: start + i,
                });
            }
            am = am.max(v.abs());
        }
        let full = end - start == blocksize;
        // bitsandbytes saves the tail block's absmax after clamping it (see the module docs).
        *am_out = if full { am } else { am.max(ABSMAX_FLOOR) };
        let am = am.max(ABSMAX_FLOOR);
        let inv = 1.0f32 / am;
        for (i, v) in vals.iter().enumerate() {
            let s = if full { v * inv } else { v / am };
            let q = order[bucket(&bounds, s.clamp(-1.0, 1.0))];
            let j = start + i;
            if j.is_multiple_of(2) {
                codes[j / 2] = q << 4;
            } else {
                codes[j / 2] |= q;
            }
        }
    }
    if n % 2 == 1 {
        // Odd count: the pad element is a scaled zero, quantized like any other.
        codes[n / 2] |= order[bucket(&bounds, 0.0)];
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32s(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn nf4_extremes_map_to_end_codes() {
        let bytes = f32s(&[-2.0, 2.0, 0.0, 1.0]);
        let (codes, absmax) =
            quantize_4bit_reference(FloatSlice::F32(&bytes), QuantType::Nf4, 64).unwrap();
        assert_eq!(absmax, vec![2.0]);
        assert_eq!(codes, vec![0x0F, 0x7C]);
    }

    #[test]
    fn odd_count_pads_with_zero_code() {
        let bytes = f32s(&[1.0]);
        let (codes, _) =
            quantize_4bit_reference(FloatSlice::F32(&bytes), QuantType::Nf4, 64).unwrap();
        assert_eq!(codes, vec![0xF7]);
        let (codes, _) =
            quantize_4bit_reference(FloatSlice::F32(&bytes), QuantType::Fp4, 64).unwrap();
        assert_eq!(codes, vec![0x30]);
    }

    #[test]
    fn rejects_bad_blocksize_and_nan() {
        let bytes = f32s(&[1.0, f32::NAN]);
        assert!(matches!(
            quantize_4bit(FloatSlice::F32(&bytes), QuantType::Nf4, 48, Kernel::Auto),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            quantize_4bit(FloatSlice::F32(&bytes), QuantType::Nf4, 64, Kernel::Auto),
            Err(Error::NonFinite { index: 1, .. })
        ));
    }
}
