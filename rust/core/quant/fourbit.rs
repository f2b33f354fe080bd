//! 4-bit blockwise quantization (NF4 and FP4), byte for byte as bitsandbytes 0.50.2's CUDA kernel does it
//! (`csrc/kernels.cu`, `kQuantizeBlockwise` with `dQuantizeNF4` / `dQuantizeFP4`): what transformers
//! writes quantizing on a GPU.
//! - the tensor is flattened row-major and cut into blocks of `blocksize` that cross rows;
//! - absmax = max |x| per block, stored as it is (an all-zero block stores 0);
//! - every block, the tail too, is scaled by `x * (1 / absmax)`, the reciprocal the GPU's approximate
//!   one (`quant::block_scale`); an all-zero block scales into NaN, which both searches send to code 0;
//! - NF4: the code is found by comparing against the kernel's 15 thresholds (the float32 midpoints of
//!   the sorted code, `x > t` picking the upper one); FP4: the sign bit is `x < 0` and the magnitude is
//!   found against the kernel's 7 literal thresholds (`|x| > t`; they sit 1-14 ulps from the
//!   midpoints), so a small negative value gets the negative zero code and -0.0 the positive one;
//! - two codes a byte, first element in the high nibble; an odd count is padded with a scaled 0.
//!
//! bitsandbytes' CPU kernel (`backends/default/ops.py`) agrees on NF4 codes but for the tail block
//! (it divides) and all-zero blocks (it scales by max(absmax, 1e-38), and saves 1e-38 in a tail); on
//! FP4 it buckets against the midpoints with the zero codes the other way round. Both are found in the
//! tests: tests/test_quantize_bnb.py against the CPU kernel and against codes an H200 wrote (as an H100).

use super::tables::{FP4_CODE_BITS, NF4_BOUND_BITS, NF4_CODE_BITS, NF4_ORDER};
use super::Kernel;
use crate::dtype::FloatSlice;
use crate::error::{Error, Result};

/// Block sizes bitsandbytes accepts for 4-bit quantization (`functional.quantize_4bit`).
pub const BLOCKSIZES: [usize; 8] = [32, 64, 128, 256, 512, 1024, 2048, 4096];

/// The smallest absmax whose reciprocal the vector kernels compute as the CUDA kernel does (finite and
/// normal); blocks below it (all-zero or denormal) go through the scalar path.
pub(crate) const ABSMAX_FLOOR: f32 = 1e-38;

/// `dQuantizeFP4`'s thresholds on |x| (`csrc/kernels.cu`), ascending.
const FP4_CUDA_THRESHOLDS: [f32; 7] = [
    0.00260417, 0.0859375, 0.20833333, 0.29166667, 0.4166667, 0.583333, 0.8333333,
];

/// FP4 as the bucket search runs it: a value goes above a bound when `bound < s`. Positive side: the
/// thresholds themselves (`|x| > t`). Negative side: the float just below -t, so that -t itself stays
/// with the smaller magnitude as `|x| > t` has it. Between: the negative float nearest zero, so every
/// s < 0 (even the smallest denormal) falls below it and -0.0, +0.0 above.
const FP4_CUDA_BOUND_BITS: [u32; 15] = fp4_cuda_bounds();

/// Builds `FP4_CUDA_BOUND_BITS` from the thresholds at compile time.
const fn fp4_cuda_bounds() -> [u32; 15] {
    let mut b = [0u32; 15];
    let mut i = 0;
    while i < 7 {
        let t = FP4_CUDA_THRESHOLDS[i].to_bits();
        b[8 + i] = t;
        b[6 - i] = (t + 1) | 0x8000_0000;
        i += 1;
    }
    b[7] = 0x8000_0001;
    b
}

/// Code index of each sorted FP4 position, the kernel's way: the negative zero code (8) just below zero,
/// the positive one (0) from zero up.
const FP4_CUDA_ORDER: [u8; 16] = [11, 10, 13, 12, 15, 14, 9, 8, 0, 1, 6, 7, 4, 5, 2, 3];

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

    /// The bounds between sorted positions, as the CUDA kernel compares (see `fp4_cuda_bounds`; NF4's
    /// are the midpoints, equal to the kernel's thresholds).
    pub(crate) fn bounds(self) -> [f32; 15] {
        let bits = match self {
            QuantType::Nf4 => NF4_BOUND_BITS,
            QuantType::Fp4 => FP4_CUDA_BOUND_BITS,
        };
        bits.map(f32::from_bits)
    }

    /// Code index of each sorted position.
    pub(crate) fn order(self) -> [u8; 16] {
        match self {
            QuantType::Nf4 => NF4_ORDER,
            QuantType::Fp4 => FP4_CUDA_ORDER,
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
    } else {
        redo_small_blocks(x.slice(0, full), qt, blocksize, codes_full, absmax_full)?;
    }
    if full < n {
        // The tail block (fewer than `blocksize` elements) goes through the scalar path.
        scalar_blocks(x.slice(full, n), qt, blocksize, codes_tail, absmax_tail)
            .map_err(|e| e.offset_index(full))?;
    }
    Ok(())
}

/// After a vector kernel (which scales by 1 / max(absmax, ABSMAX_FLOOR)): the whole blocks whose absmax
/// is below the floor (all zero, or denormal) done again the CUDA kernel's way, by the scalar path.
pub(crate) fn redo_small_blocks(
    x: FloatSlice,
    qt: QuantType,
    blocksize: usize,
    codes: &mut [u8],
    absmax: &mut [f32],
) -> Result<()> {
    for b in 0..absmax.len() {
        if absmax[b] < ABSMAX_FLOOR {
            let (s, e) = (b * blocksize, (b + 1) * blocksize);
            let (c, a) = (&mut codes[s / 2..e / 2], &mut absmax[b..b + 1]);
            scalar_blocks(x.slice(s, e), qt, blocksize, c, a)?;
        }
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
    let mut pad = 0u8;
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
        *am_out = am;
        let inv = super::block_scale(am); // inf for an all-zero block: its values scale into NaN
        for (i, v) in vals.iter().enumerate() {
            let q = code_of(&bounds, &order, v * inv);
            let j = start + i;
            if j.is_multiple_of(2) {
                codes[j / 2] = q << 4;
            } else {
                codes[j / 2] |= q;
            }
        }
        pad = code_of(&bounds, &order, 0.0 * inv);
    }
    if n % 2 == 1 {
        // Odd count: the pad element is a zero scaled as its block, quantized like any other.
        codes[n / 2] |= pad;
    }
    Ok(())
}

/// The code of a scaled value: NaN (an all-zero block's) is code 0, as both CUDA searches give it.
#[inline(always)]
fn code_of(bounds: &[f32; 15], order: &[u8; 16], s: f32) -> u8 {
    if s.is_nan() {
        0
    } else {
        order[bucket(bounds, s)]
    }
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
