//! Double quantization of the 4-bit statistics (bitsandbytes' `compress_statistics=True`):
//! offset = mean(absmax), summed in the GPU's order (cuda_mean.rs); (absmax - offset) is quantized
//! blockwise (blocksize 256) to 8 bits against the signed dynamic map (`create_dynamic_map(signed=True)`),
//! with one f32 absmax per 256-block.
//!
//! The rounding is the CUDA kernel's (`csrc/kernels.cu`, `kQuantizeBlockwise` with `General8bit` and
//! `dQuantize<0>`): a 7-step binary search of the sorted map from pivot 127, then the nearer of the two
//! neighbours by comparing against their f32 midpoint. bitsandbytes' CPU kernel (`csrc/cpu_ops.cpp`)
//! rounds through a 65,536-entry lookup table instead and disagrees on about 0.2% of the codes; a model
//! quantized on the GPU by transformers holds the CUDA codes, so those are the ones fastq writes.

use super::cuda_mean::{cuda_mean, H100_RESIDENT_BLOCKS};
use super::tables::DYNAMIC_SIGNED_BITS;

/// Block size of the nested quantization (fixed by bitsandbytes).
pub const NESTED_BLOCKSIZE: usize = 256;

/// The signed 8-bit dynamic map, sorted ascending (bitsandbytes' `nested_quant_map`).
pub fn dynamic_map() -> [f32; 256] {
    DYNAMIC_SIGNED_BITS.map(f32::from_bits)
}

/// The double-quantized statistics of one 4-bit tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct Nested {
    /// One 8-bit code per 4-bit block (bitsandbytes stores these as the `absmax` of the QuantState).
    pub codes: Vec<u8>,
    /// One f32 absmax per 256 codes (`nested_absmax`).
    pub absmax: Vec<f32>,
    /// The mean subtracted before quantizing (`nested_offset`).
    pub offset: f32,
}

/// The offset: the absmax's float32 mean summed as torch sums it on an H100 or H200 (`cuda_mean`), so a
/// conversion on the CPU writes the offset a GPU would. Where that float32 sum overflows (absmax near
/// f32::MAX; the GPU's offset is then inf and its nested statistics NaN) the mean is accumulated in f64
/// instead, so the model stays usable.
pub fn mean_offset(absmax: &[f32]) -> f32 {
    let m = cuda_mean(absmax, H100_RESIDENT_BLOCKS);
    if m.is_finite() || absmax.iter().any(|a| !a.is_finite()) {
        return m;
    }
    let s: f64 = absmax.iter().map(|&a| a as f64).sum();
    (s / absmax.len() as f64) as f32
}

/// Double-quantizes a tensor's absmax vector.
pub fn quantize_nested(absmax: &[f32]) -> Nested {
    let offset = mean_offset(absmax);
    let centered: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
    let (codes, nested_absmax) = quantize_blockwise_dynamic(&centered);
    Nested {
        codes,
        absmax: nested_absmax,
        offset,
    }
}

/// 8-bit blockwise quantization against the signed dynamic map with blocksize 256, rounding as the
/// CUDA kernel does. Returns (codes, absmax per block). Groups of blocks run in parallel on the
/// current rayon pool.
pub fn quantize_blockwise_dynamic(x: &[f32]) -> (Vec<u8>, Vec<f32>) {
    use rayon::prelude::*;
    const GROUP: usize = 64; // blocks per parallel task
    let map = dynamic_map();
    let mut codes = vec![0u8; x.len()];
    let mut absmax = vec![0f32; x.len().div_ceil(NESTED_BLOCKSIZE)];
    x.par_chunks(NESTED_BLOCKSIZE * GROUP)
        .zip(codes.par_chunks_mut(NESTED_BLOCKSIZE * GROUP))
        .zip(absmax.par_chunks_mut(GROUP))
        .for_each(|((x, codes), absmax)| {
            #[cfg(target_arch = "x86_64")]
            if super::has_avx512() {
                // SAFETY: the CPU supports the AVX-512 subsets the kernel needs (checked just above).
                unsafe { super::x86::avx512::quantize_blockwise_dynamic(x, codes, absmax) };
                return;
            } else if super::has_avx2() {
                // SAFETY: the CPU supports avx2, f16c and fma (checked just above).
                unsafe { super::x86::quantize_blockwise_dynamic_avx2(x, codes, absmax) };
                return;
            }
            let blocks = x
                .chunks(NESTED_BLOCKSIZE)
                .zip(codes.chunks_mut(NESTED_BLOCKSIZE));
            for ((block, out), am_out) in blocks.zip(absmax.iter_mut()) {
                // The kernel starts its reduction at -FLT_MAX; over |x| that is the plain maximum.
                let am = block.iter().fold(f32::MIN, |m, v| m.max(v.abs()));
                *am_out = am;
                let inv = super::block_scale(am);
                for (o, &v) in out.iter_mut().zip(block) {
                    *o = cuda_dquantize(&map, v * inv);
                }
            }
        });
    (codes, absmax)
}

/// `dQuantize<0>` of `csrc/kernels.cu`: nearest entry of a sorted 256-entry map by binary search.
/// Comparisons are written as in the kernel so that NaN and ties fall the same way; every step is a
/// select rather than a branch (the comparisons are unpredictable, so branches would mispredict).
#[inline]
pub fn cuda_dquantize(map: &[f32; 256], x: f32) -> u8 {
    let mut pivot: usize = 127;
    let mut upper_pivot: usize = 255;
    let mut lower_pivot: usize = 0;
    let mut lower = -1.0f32;
    let mut upper = 1.0f32;
    let mut step = 64;
    while step > 0 {
        let val = map[pivot];
        let gt = x > val;
        lower_pivot = if gt { pivot } else { lower_pivot };
        lower = if gt { val } else { lower };
        upper_pivot = if gt { upper_pivot } else { pivot };
        upper = if gt { upper } else { val };
        pivot = if gt { pivot + step } else { pivot - step };
        step >>= 1;
    }
    let val = map[pivot];
    if upper_pivot == 255 {
        upper = map[upper_pivot];
    }
    if lower_pivot == 0 {
        lower = map[lower_pivot];
    }
    let (mid, above, near, far) = if x > val {
        ((upper + val) * 0.5, true, pivot, upper_pivot)
    } else {
        ((lower + val) * 0.5, false, pivot, lower_pivot)
    };
    // above: x > mid picks the upper neighbour; below: x < mid picks the lower one.
    let take_far = if above { x > mid } else { x < mid };
    (if take_far { far } else { near }) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_is_sorted_and_spans_minus_one_to_one() {
        let m = dynamic_map();
        assert!(m.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(m[255], 1.0);
        assert!(m[0] < -0.99);
    }

    #[test]
    fn exact_map_values_round_to_themselves() {
        let m = dynamic_map();
        for (i, &v) in m.iter().enumerate() {
            let q = cuda_dquantize(&m, v) as usize;
            assert_eq!(m[q], v, "entry {i}");
        }
    }

    #[test]
    fn nested_roundtrip_error_is_small() {
        let absmax: Vec<f32> = (0..1000)
            .map(|i| 0.01 + (i as f32 * 0.37).sin().abs() * 0.05)
            .collect();
        let n = quantize_nested(&absmax);
        let map = dynamic_map();
        for (i, &a) in absmax.iter().enumerate() {
            let back = map[n.codes[i] as usize] * n.absmax[i / 256] + n.offset;
            assert!(
                (back - a).abs() <= 0.02 * n.absmax[i / 256] + 1e-7,
                "{i}: {back} vs {a}"
            );
        }
    }
}
