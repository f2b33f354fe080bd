//! x86-64 kernels: AVX2 (+F16C, FMA) and AVX-512 (F, BW, VL). Each computes exactly what the scalar
//! reference in `fourbit.rs` / `int8.rs` computes (same IEEE operations per element, same error
//! index); the tests at the end compare all three. `quantize_4bit_full_blocks` and
//! `quantize_int8_rows` pick AVX-512 when the CPU has it, else AVX2.

use std::arch::x86_64::*;

use super::fourbit::{QuantType, ABSMAX_FLOOR};
use super::int8::overflow;
use super::{block_scale, block_scales_avx2, row_scale};
use crate::dtype::FloatSlice;
use crate::error::{Error, Result};

/// Input formats, as const-generic tags so every kernel is compiled once per format.
const BF16: u8 = 0;
const F16: u8 = 1;
const F32: u8 = 2;

/// Bytes per element of format `D`.
const fn size<const D: u8>() -> usize {
    if D == F32 {
        4
    } else {
        2
    }
}

/// |x| bit pattern of +inf in format `D`: every larger pattern is NaN.
const fn inf_bits<const D: u8>() -> u32 {
    match D {
        BF16 => 0x7f80,
        F16 => 0x7c00,
        _ => 0x7f80_0000,
    }
}

/// The value of a non-negative bit pattern of format `D` (exact).
fn widen_bits<const D: u8>(bits: u32) -> f32 {
    match D {
        BF16 => f32::from_bits(bits << 16),
        F16 => half::f16::from_bits(bits as u16).to_f32(),
        _ => f32::from_bits(bits),
    }
}

/// Loads 8 elements starting at element `i` of `x`, widened to f32.
#[inline]
#[target_feature(enable = "avx2,f16c,fma")]
unsafe fn load8(x: &FloatSlice, i: usize) -> __m256 {
    match x {
        FloatSlice::F32(b) => {
            debug_assert!(b.len() >= (i + 8) * 4);
            // SAFETY: the caller keeps i + 8 <= len; unaligned load.
            _mm256_loadu_ps(b.as_ptr().add(i * 4) as *const f32)
        }
        FloatSlice::F16(b) => {
            debug_assert!(b.len() >= (i + 8) * 2);
            // SAFETY: as above, 16 bytes.
            _mm256_cvtph_ps(_mm_loadu_si128(b.as_ptr().add(i * 2) as *const __m128i))
        }
        FloatSlice::BF16(b) => {
            debug_assert!(b.len() >= (i + 8) * 2);
            // SAFETY: as above, 16 bytes; bf16 -> f32 is a 16-bit left shift of the bits.
            let h = _mm_loadu_si128(b.as_ptr().add(i * 2) as *const __m128i);
            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
        }
    }
}

/// The largest |x| bit pattern of elements `start..start + len` of a 16-bit format (`BF16` or
/// `F16`), see `inf_bits`: for finite values the pattern of max |x|, since the IEEE order of
/// non-negative floats is their integer order.
#[inline]
#[target_feature(enable = "avx2,f16c,fma")]
unsafe fn max_abs_bits16(p: *const u8, start: usize, len: usize) -> u32 {
    let mask = _mm256_set1_epi16(0x7fff);
    let mut m = _mm256_setzero_si256();
    let mut i = 0;
    while i + 16 <= len {
        // SAFETY: i + 16 <= len, inside the caller's range.
        let v = _mm256_loadu_si256(p.add((start + i) * 2) as *const __m256i);
        m = _mm256_max_epu16(m, _mm256_and_si256(v, mask));
        i += 16;
    }
    let b = _mm_max_epu16(_mm256_castsi256_si128(m), _mm256_extracti128_si256::<1>(m));
    // max = !min(!v): phminposuw finds the minimum of 8 u16 lanes in one instruction.
    let min = _mm_minpos_epu16(_mm_xor_si128(b, _mm_set1_epi16(-1)));
    let mut best = 0xffff - (_mm_extract_epi16::<0>(min) as u32 & 0xffff);
    for j in i..len {
        // SAFETY: j < len, inside the caller's range.
        let h = u16::from_le_bytes([*p.add((start + j) * 2), *p.add((start + j) * 2 + 1)]);
        best = best.max(u32::from(h & 0x7fff));
    }
    best
}

/// max |x| of elements `start..end` (a multiple of 16 apart), or None if one is not finite.
#[inline]
#[target_feature(enable = "avx2,f16c,fma")]
unsafe fn absmax_avx2(x: &FloatSlice, start: usize, end: usize) -> Option<f32> {
    match x {
        // 16-bit formats: the integer maximum of the |x| bit patterns, 16 elements an op.
        FloatSlice::BF16(b) => {
            let bits = max_abs_bits16(b.as_ptr(), start, end - start);
            (bits < inf_bits::<BF16>()).then(|| widen_bits::<BF16>(bits))
        }
        FloatSlice::F16(b) => {
            let bits = max_abs_bits16(b.as_ptr(), start, end - start);
            (bits < inf_bits::<F16>()).then(|| widen_bits::<F16>(bits))
        }
        FloatSlice::F32(_) => {
            let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
            let mut vmax = _mm256_setzero_ps();
            let mut bad = _mm256_setzero_ps();
            let mut i = start;
            while i < end {
                let a = _mm256_and_ps(load8(x, i), abs_mask);
                bad = _mm256_or_ps(bad, nonfinite_mask(a));
                vmax = _mm256_max_ps(vmax, a);
                i += 8;
            }
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), vmax);
            (_mm256_movemask_ps(bad) == 0).then(|| lanes.iter().fold(0f32, |m, &v| m.max(v)))
        }
    }
}

/// True if any lane of `v` is NaN or +-inf.
#[inline]
#[target_feature(enable = "avx2,f16c,fma")]
unsafe fn nonfinite_mask(abs: __m256) -> __m256 {
    _mm256_cmp_ps(abs, _mm256_set1_ps(f32::INFINITY), _CMP_NLT_UQ)
}

/// First non-finite element of `x[start..end]` (for the error message).
fn first_nonfinite(x: &FloatSlice, start: usize, end: usize) -> usize {
    (start..end)
        .find(|&i| !x.get(i).is_finite())
        .unwrap_or(start)
}

/// The bound tables of a 4-step binary search for "number of bounds strictly below s" (the bucket,
/// 0..=15): after the steps before `step` the count so far `c` is a multiple of 2 * step and the
/// next bound to test is `bounds[c + step - 1]`.
struct Search8 {
    /// bounds[7], bounds[3], bounds[11], broadcast.
    b7: __m256,
    b3: __m256,
    b11: __m256,
    /// bounds[4k + 1] at k (k = c >> 2 < 4).
    t2: __m256,
    /// bounds[2k] at k (k = c >> 1 < 8).
    t1: __m256,
}

impl Search8 {
    #[inline]
    #[target_feature(enable = "avx2,f16c,fma")]
    unsafe fn new(qt: QuantType) -> Self {
        let b = qt.bounds();
        let t2: [f32; 8] = std::array::from_fn(|k| b[(4 * k + 1).min(14)]);
        let t1: [f32; 8] = std::array::from_fn(|k| b[2 * k]);
        Search8 {
            b7: _mm256_set1_ps(b[7]),
            b3: _mm256_set1_ps(b[3]),
            b11: _mm256_set1_ps(b[11]),
            t2: _mm256_loadu_ps(t2.as_ptr()),
            t1: _mm256_loadu_ps(t1.as_ptr()),
        }
    }

    /// The bucket of each lane of `s` (15 vector ops instead of 30 for 15 compares). No clamp to
    /// [-1, 1] is needed: every bound lies strictly inside it, so clamping never changes a bucket.
    #[inline]
    #[target_feature(enable = "avx2,f16c,fma")]
    unsafe fn buckets(&self, s: __m256) -> __m256i {
        // All-ones where bound < s, as `bucket` in fourbit.rs counts.
        let m8 = _mm256_cmp_ps::<_CMP_LT_OQ>(self.b7, s);
        let mut c = _mm256_and_si256(_mm256_castps_si256(m8), _mm256_set1_epi32(8));
        let m = _mm256_cmp_ps::<_CMP_LT_OQ>(_mm256_blendv_ps(self.b3, self.b11, m8), s);
        c = _mm256_or_si256(
            c,
            _mm256_and_si256(_mm256_castps_si256(m), _mm256_set1_epi32(4)),
        );
        let t = _mm256_permutevar8x32_ps(self.t2, _mm256_srli_epi32::<2>(c));
        let m = _mm256_cmp_ps::<_CMP_LT_OQ>(t, s);
        c = _mm256_or_si256(
            c,
            _mm256_and_si256(_mm256_castps_si256(m), _mm256_set1_epi32(2)),
        );
        let t = _mm256_permutevar8x32_ps(self.t1, _mm256_srli_epi32::<1>(c));
        let m = _mm256_cmp_ps::<_CMP_LT_OQ>(t, s);
        _mm256_sub_epi32(c, _mm256_castps_si256(m))
    }
}

/// Quantizes whole blocks (x.len() is a multiple of `blocksize`, itself a multiple of 32) with the
/// widest kernel the CPU runs.
///
/// # Safety
/// The CPU must support avx2, f16c and fma.
pub(crate) unsafe fn quantize_4bit_full_blocks(
    x: FloatSlice,
    qt: QuantType,
    blocksize: usize,
    codes: &mut [u8],
    absmax: &mut [f32],
) -> Result<()> {
    if super::has_avx512() {
        // SAFETY: the CPU supports avx512f/bw/vl (checked just above) and avx2/f16c/fma (caller).
        unsafe { avx512::quantize_4bit_full_blocks(x, qt, blocksize, codes, absmax) }
    } else {
        // SAFETY: the caller checked avx2, f16c and fma.
        unsafe { quantize_4bit_full_blocks_avx2(x, qt, blocksize, codes, absmax) }
    }
}

/// The AVX2 version of `quantize_4bit_full_blocks`.
///
/// # Safety
/// The CPU must support avx2, f16c and fma.
#[target_feature(enable = "avx2,f16c,fma")]
pub(crate) unsafe fn quantize_4bit_full_blocks_avx2(
    x: FloatSlice,
    qt: QuantType,
    blocksize: usize,
    codes: &mut [u8],
    absmax: &mut [f32],
) -> Result<()> {
    let n = x.len();
    debug_assert_eq!(n % blocksize, 0);
    debug_assert_eq!(blocksize % 32, 0);
    debug_assert_eq!(codes.len(), n / 2);
    let search = Search8::new(qt);
    let order = qt.order();
    let order_tbl = _mm256_broadcastsi128_si256(_mm_loadu_si128(order.as_ptr() as *const __m128i));
    let remap = qt == QuantType::Fp4;
    let lane_fix = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    let low_byte = _mm256_set1_epi16(0x00ff);
    // Eight blocks at a time: their absmax, their scales (8 lanes at once), then their codes.
    let mut scales = [0f32; 8];
    for g0 in (0..absmax.len()).step_by(8) {
        let g1 = (g0 + 8).min(absmax.len());
        for b in g0..g1 {
            let (start, end) = (b * blocksize, (b + 1) * blocksize);
            let Some(am) = absmax_avx2(&x, start, end) else {
                return Err(Error::NonFinite {
                    path: Default::default(),
                    tensor: String::new(),
                    index: first_nonfinite(&x, start, end),
                });
            };
            absmax[b] = am;
            scales[b - g0] = am.max(ABSMAX_FLOOR);
        }
        block_scales_avx2(&mut scales[..g1 - g0]);
        for b in g0..g1 {
            let (start, end) = (b * blocksize, (b + 1) * blocksize);
            let inv = _mm256_set1_ps(scales[b - g0]);
            let mut i = start;
            while i < end {
                let mut q = [_mm256_setzero_si256(); 4];
                for (k, qk) in q.iter_mut().enumerate() {
                    *qk = search.buckets(_mm256_mul_ps(load8(&x, i + 8 * k), inv));
                }
                // 32 i32 codes -> 32 bytes in element order.
                let p01 = _mm256_packs_epi32(q[0], q[1]);
                let p23 = _mm256_packs_epi32(q[2], q[3]);
                let mut bytes =
                    _mm256_permutevar8x32_epi32(_mm256_packus_epi16(p01, p23), lane_fix);
                if remap {
                    bytes = _mm256_shuffle_epi8(order_tbl, bytes);
                }
                // Pairs (b0, b1) as 16-bit words: packed = (b0 << 4) | b1.
                let w = _mm256_or_si256(_mm256_slli_epi16(bytes, 4), _mm256_srli_epi16(bytes, 8));
                let w = _mm256_and_si256(w, low_byte);
                let packed = _mm256_permute4x64_epi64(_mm256_packus_epi16(w, w), 0b1000);
                // SAFETY: codes holds n / 2 bytes and i / 2 + 16 <= end / 2 <= n / 2.
                _mm_storeu_si128(
                    codes.as_mut_ptr().add(i / 2) as *mut __m128i,
                    _mm256_castsi256_si128(packed),
                );
                i += 32;
            }
        }
    }
    Ok(())
}

/// Rounds 8 f32 lanes to float16 and back.
#[inline]
#[target_feature(enable = "avx2,f16c,fma")]
unsafe fn through_f16(v: __m256) -> __m256 {
    _mm256_cvtph_ps(_mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v))
}

/// max |through_f16(x)| of the `cols` elements from `base` (infinite or NaN when one of them is not
/// finite in float16). Rounding to float16 is monotone, so for the 16-bit formats it is the rounded
/// maximum of the |x| bit patterns.
#[inline]
#[target_feature(enable = "avx2,f16c,fma")]
unsafe fn row_absmax_f16_avx2(x: &FloatSlice, base: usize, cols: usize) -> f32 {
    let through = super::int8::through_f16;
    match x {
        FloatSlice::BF16(b) => {
            let bits = max_abs_bits16(b.as_ptr(), base, cols);
            if bits >= inf_bits::<BF16>() {
                f32::NAN
            } else {
                through(widen_bits::<BF16>(bits))
            }
        }
        FloatSlice::F16(b) => widen_bits::<F16>(max_abs_bits16(b.as_ptr(), base, cols)),
        FloatSlice::F32(_) => {
            let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
            let mut vmax = _mm256_setzero_ps();
            let mut bad = _mm256_setzero_ps();
            let mut c = 0;
            while c + 8 <= cols {
                let a = _mm256_and_ps(through_f16(load8(x, base + c)), abs_mask);
                bad = _mm256_or_ps(bad, nonfinite_mask(a));
                vmax = _mm256_max_ps(vmax, a);
                c += 8;
            }
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), vmax);
            let mut am = lanes.iter().fold(0f32, |m, &v| m.max(v));
            let mut bad_any = _mm256_movemask_ps(bad) != 0;
            for cc in c..cols {
                let v = through(x.get(base + cc));
                bad_any |= !v.is_finite();
                am = am.max(v.abs());
            }
            if bad_any {
                f32::NAN
            } else {
                am
            }
        }
    }
}

/// Int8 row-wise quantization of whole rows with the widest kernel the CPU runs.
///
/// # Safety
/// The CPU must support avx2, f16c and fma.
pub(crate) unsafe fn quantize_int8_rows(
    x: FloatSlice,
    cols: usize,
    cb: &mut [i8],
    scb: &mut [f32],
) -> Result<()> {
    if super::has_avx512() {
        // SAFETY: the CPU supports avx512f/bw/vl (checked just above) and avx2/f16c/fma (caller).
        unsafe { avx512::quantize_int8_rows(x, cols, cb, scb) }
    } else {
        // SAFETY: the caller checked avx2, f16c and fma.
        unsafe { quantize_int8_rows_avx2(x, cols, cb, scb) }
    }
}

/// The AVX2 version of `quantize_int8_rows`.
///
/// # Safety
/// The CPU must support avx2, f16c and fma.
#[target_feature(enable = "avx2,f16c,fma")]
pub(crate) unsafe fn quantize_int8_rows_avx2(
    x: FloatSlice,
    cols: usize,
    cb: &mut [i8],
    scb: &mut [f32],
) -> Result<()> {
    let lane_fix = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    let vec_end = cols / 32 * 32;
    for (r, scb_out) in scb.iter_mut().enumerate() {
        let base = r * cols;
        let am = row_absmax_f16_avx2(&x, base, cols);
        if !am.is_finite() {
            let idx = (base..base + cols)
                .find(|&i| !super::int8::through_f16(x.get(i)).is_finite())
                .unwrap_or(base);
            return Err(overflow(idx));
        }
        *scb_out = am;
        let out = &mut cb[base..base + cols];
        if am == 0.0 {
            out.fill(0);
            continue;
        }
        let scale_s = row_scale(am);
        let scale = _mm256_set1_ps(scale_s);
        let mut c = 0;
        while c < vec_end {
            let mut q = [_mm256_setzero_si256(); 4];
            for (k, qk) in q.iter_mut().enumerate() {
                let v = _mm256_mul_ps(through_f16(load8(&x, base + c + 8 * k)), scale);
                *qk = _mm256_cvtps_epi32(_mm256_round_ps::<
                    { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
                >(v));
            }
            let p01 = _mm256_packs_epi32(q[0], q[1]);
            let p23 = _mm256_packs_epi32(q[2], q[3]);
            let bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(p01, p23), lane_fix);
            // SAFETY: c + 32 <= cols, inside this row of `out`.
            _mm256_storeu_si256(out.as_mut_ptr().add(c) as *mut __m256i, bytes);
            c += 32;
        }
        for (cc, o) in out.iter_mut().enumerate().skip(vec_end) {
            let v = super::int8::through_f16(x.get(base + cc));
            *o = (v * scale_s).round_ties_even() as i8;
        }
    }
    Ok(())
}

/// AVX2 `double::quantize_blockwise_dynamic` (the nested 8-bit quantization of the 4-bit absmax):
/// the CUDA kernel's 7-step binary search of the sorted 256-entry map, 8 values at a time without
/// branches. The first four steps read the map at their (at most 16) pivots from registers by
/// blends and permutes; the last three gather.
///
/// # Safety
/// The CPU must support avx2, f16c and fma.
#[target_feature(enable = "avx2,f16c,fma")]
pub(crate) unsafe fn quantize_blockwise_dynamic_avx2(
    x: &[f32],
    codes: &mut [u8],
    absmax: &mut [f32],
) {
    use super::double::{dynamic_map, NESTED_BLOCKSIZE};
    debug_assert_eq!(codes.len(), x.len());
    debug_assert_eq!(absmax.len(), x.len().div_ceil(NESTED_BLOCKSIZE));
    let map = dynamic_map();
    // Pivots after steps 32, 16, 8: 64 * k + 31, 32 * k + 15, 16 * k + 7.
    let level = |first: usize, stride: usize| -> [f32; 16] {
        std::array::from_fn(|k| map[(first + stride * k).min(255)])
    };
    let (l2, l3, l4) = (level(31, 64), level(15, 32), level(7, 16));
    let t = DynTables8 {
        after64: [_mm256_set1_ps(map[63]), _mm256_set1_ps(map[191])],
        after32: _mm256_loadu_ps(l2.as_ptr()),
        after16: _mm256_loadu_ps(l3.as_ptr()),
        after8: [
            _mm256_loadu_ps(l4.as_ptr()),
            _mm256_loadu_ps(l4.as_ptr().add(8)),
        ],
    };
    let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    for ((block, out), am_out) in x
        .chunks(NESTED_BLOCKSIZE)
        .zip(codes.chunks_mut(NESTED_BLOCKSIZE))
        .zip(absmax.iter_mut())
    {
        let len = block.len();
        // Lanes below `len - i` of group i (sign bit set), for masked loads of a short block.
        let mask = |i: usize| -> __m256i {
            let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
            _mm256_cmpgt_epi32(_mm256_set1_epi32((len - i).min(8) as i32), lanes)
        };
        // The kernel's reduction starts at -FLT_MAX; zeros in masked-off lanes change nothing because
        // the maximum of |x| is at least 0. maxps returns its second operand when either is NaN: NaN
        // is skipped, like f32::max.
        let mut vmax = _mm256_setzero_ps();
        for i in (0..len).step_by(8) {
            // SAFETY: only lanes below `len` are read.
            let v = _mm256_maskload_ps(block.as_ptr().add(i), mask(i));
            vmax = _mm256_max_ps(_mm256_and_ps(v, abs_mask), vmax);
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), vmax);
        let am = lanes.iter().fold(f32::MIN, |m, &v| m.max(v));
        *am_out = am;
        let inv = _mm256_set1_ps(block_scale(am));
        for i in (0..len).step_by(8) {
            // SAFETY: only lanes below `len` are read.
            let v = _mm256_mul_ps(_mm256_maskload_ps(block.as_ptr().add(i), mask(i)), inv);
            let mut q = [0i32; 8];
            _mm256_storeu_si256(q.as_mut_ptr() as *mut __m256i, dquantize8(&map, v, &t));
            for (o, &c) in out[i..].iter_mut().zip(&q) {
                *o = c as u8;
            }
        }
    }
}

/// The map at the pivots of the first four search steps, in registers.
struct DynTables8 {
    after64: [__m256; 2],
    after32: __m256,
    after16: __m256,
    after8: [__m256; 2],
}

/// `double::cuda_dquantize` on 8 lanes (see there).
#[inline]
#[target_feature(enable = "avx2,f16c,fma")]
unsafe fn dquantize8(map: &[f32; 256], x: __m256, t: &DynTables8) -> __m256i {
    let mut pivot = _mm256_set1_epi32(127);
    let mut lower_pivot = _mm256_setzero_si256();
    let mut upper_pivot = _mm256_set1_epi32(255);
    let mut lower = _mm256_set1_ps(-1.0);
    let mut upper = _mm256_set1_ps(1.0);
    let mut val = _mm256_set1_ps(map[127]);
    for (s, step) in [64, 32, 16, 8, 4, 2, 1].into_iter().enumerate() {
        // `x > val` is false for NaN, as in the kernel; all-ones lanes where it holds.
        let gt = _mm256_cmp_ps::<_CMP_GT_OQ>(x, val);
        let gti = _mm256_castps_si256(gt);
        lower_pivot = _mm256_blendv_epi8(lower_pivot, pivot, gti);
        lower = _mm256_blendv_ps(lower, val, gt);
        upper_pivot = _mm256_blendv_epi8(pivot, upper_pivot, gti);
        upper = _mm256_blendv_ps(val, upper, gt);
        // pivot - step, plus 2 * step where x > val.
        pivot = _mm256_add_epi32(
            _mm256_sub_epi32(pivot, _mm256_set1_epi32(step)),
            _mm256_and_si256(gti, _mm256_set1_epi32(2 * step)),
        );
        val = match s {
            0 => _mm256_blendv_ps(t.after64[0], t.after64[1], gt),
            1 => _mm256_permutevar8x32_ps(t.after32, _mm256_srli_epi32::<6>(pivot)),
            2 => _mm256_permutevar8x32_ps(t.after16, _mm256_srli_epi32::<5>(pivot)),
            3 => {
                // 16 pivots: permutes use the low 3 bits of pivot >> 4; bit 3 picks the half.
                let k = _mm256_srli_epi32::<4>(pivot);
                let lo = _mm256_permutevar8x32_ps(t.after8[0], k);
                let hi = _mm256_permutevar8x32_ps(t.after8[1], k);
                _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32::<28>(k)))
            }
            // SAFETY: pivot stays within 0..=255.
            _ => _mm256_i32gather_ps::<4>(map.as_ptr(), pivot),
        };
    }
    let top = _mm256_castsi256_ps(_mm256_cmpeq_epi32(upper_pivot, _mm256_set1_epi32(255)));
    upper = _mm256_blendv_ps(upper, _mm256_set1_ps(map[255]), top);
    let bottom = _mm256_castsi256_ps(_mm256_cmpeq_epi32(lower_pivot, _mm256_setzero_si256()));
    lower = _mm256_blendv_ps(lower, _mm256_set1_ps(map[0]), bottom);
    let half = _mm256_set1_ps(0.5);
    let gt = _mm256_cmp_ps::<_CMP_GT_OQ>(x, val);
    let up = _mm256_cmp_ps::<_CMP_GT_OQ>(x, _mm256_mul_ps(_mm256_add_ps(upper, val), half));
    let down = _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_mul_ps(_mm256_add_ps(lower, val), half));
    let take_up = _mm256_castps_si256(_mm256_and_ps(gt, up));
    let take_down = _mm256_castps_si256(_mm256_andnot_ps(gt, down));
    let q = _mm256_blendv_epi8(pivot, upper_pivot, take_up);
    _mm256_blendv_epi8(q, lower_pivot, take_down)
}

/// AVX-512 (F, BW, VL) kernels: 16 lanes a vector, absmax from the integer maximum of the |x| bit
/// patterns, and the 4-bit bucket found by a 4-step binary search through permuted bound tables.
pub(crate) mod avx512;

#[cfg(test)]
mod tests;
