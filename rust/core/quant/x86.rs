//! x86-64 kernels: AVX2 (+F16C, FMA) and AVX-512 (F, BW, VL). Each computes exactly what the scalar
//! reference in `fourbit.rs` / `int8.rs` computes (same IEEE operations per element, same error
//! index); the tests at the end compare all three. `quantize_4bit_full_blocks` and
//! `quantize_int8_rows` pick AVX-512 when the CPU has it, else AVX2.

use std::arch::x86_64::*;

use super::fourbit::{QuantType, ABSMAX_FLOOR};
use super::int8::overflow;
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
    for (b, am_out) in absmax.iter_mut().enumerate() {
        let start = b * blocksize;
        let end = start + blocksize;
        let am = absmax_avx2(&x, start, end);
        let Some(am) = am else {
            return Err(Error::NonFinite {
                path: Default::default(),
                tensor: String::new(),
                index: first_nonfinite(&x, start, end),
            });
        };
        *am_out = am;
        let inv = _mm256_set1_ps(1.0f32 / am.max(ABSMAX_FLOOR));
        let mut i = start;
        while i < end {
            let mut q = [_mm256_setzero_si256(); 4];
            for (k, qk) in q.iter_mut().enumerate() {
                *qk = search.buckets(_mm256_mul_ps(load8(&x, i + 8 * k), inv));
            }
            // 32 i32 codes -> 32 bytes in element order.
            let p01 = _mm256_packs_epi32(q[0], q[1]);
            let p23 = _mm256_packs_epi32(q[2], q[3]);
            let mut bytes = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(p01, p23), lane_fix);
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
        // `127.0 / row_stats` in torch is `reciprocal() * 127`: two roundings, as in int8.rs.
        let scale_s = (1.0f32 / am) * 127.0;
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
        let inv = _mm256_set1_ps(1.0f32 / am);
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
pub(crate) mod avx512 {
    use std::arch::x86_64::*;

    use super::{first_nonfinite, inf_bits, size, widen_bits, BF16, F16, F32};
    use crate::dtype::FloatSlice;
    use crate::error::{Error, Result};
    use crate::quant::fourbit::{QuantType, ABSMAX_FLOOR};
    use crate::quant::int8::{overflow, through_f16 as through_f16_scalar};

    /// 16 elements of format `D` starting at element `i` of `p`, widened to f32.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,f16c,fma")]
    unsafe fn load16<const D: u8>(p: *const u8, i: usize) -> __m512 {
        // SAFETY (all arms): the caller keeps i + 16 within the slice; unaligned loads.
        match D {
            BF16 => {
                let h = _mm256_loadu_si256(p.add(i * 2) as *const __m256i);
                // bf16 -> f32 is a 16-bit left shift of the bits.
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
            }
            F16 => _mm512_cvtph_ps(_mm256_loadu_si256(p.add(i * 2) as *const __m256i)),
            _ => _mm512_loadu_ps(p.add(i * 4) as *const f32),
        }
    }

    /// Like `load16`, reading only the lanes set in `k` (the others are 0 and not touched in memory).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,f16c,fma")]
    unsafe fn load16_masked<const D: u8>(p: *const u8, i: usize, k: __mmask16) -> __m512 {
        // SAFETY (all arms): masked-off lanes are not read, so only elements below the end are.
        match D {
            BF16 => {
                let h = _mm256_maskz_loadu_epi16(k, p.add(i * 2) as *const i16);
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
            }
            F16 => _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, p.add(i * 2) as *const i16)),
            _ => _mm512_maskz_loadu_ps(k, p.add(i * 4) as *const f32),
        }
    }

    /// The largest |x| bit pattern of elements `start..start + len` of format `D`. For finite values
    /// this is the bit pattern of max |x| (IEEE order of non-negative floats is their integer order);
    /// a result >= `inf_bits::<D>()` means some element is infinite or NaN.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,f16c,fma")]
    unsafe fn max_abs_bits<const D: u8>(p: *const u8, start: usize, len: usize) -> u32 {
        if D == F32 {
            let mask = _mm512_set1_epi32(0x7fff_ffff);
            let mut m = _mm512_setzero_si512();
            let mut i = 0;
            while i + 16 <= len {
                // SAFETY: i + 16 <= len, inside the caller's range.
                let v = _mm512_loadu_si512(p.add((start + i) * 4) as *const _);
                m = _mm512_max_epu32(m, _mm512_and_si512(v, mask));
                i += 16;
            }
            if i < len {
                let k = ((1u32 << (len - i)) - 1) as __mmask16;
                // SAFETY: only the lanes below len are read.
                let v = _mm512_maskz_loadu_epi32(k, p.add((start + i) * 4) as *const i32);
                m = _mm512_max_epu32(m, _mm512_and_si512(v, mask));
            }
            _mm512_reduce_max_epu32(m)
        } else {
            let mask = _mm512_set1_epi16(0x7fff);
            let mut m = _mm512_setzero_si512();
            let mut i = 0;
            while i + 32 <= len {
                // SAFETY: i + 32 <= len, inside the caller's range.
                let v = _mm512_loadu_si512(p.add((start + i) * 2) as *const _);
                m = _mm512_max_epu16(m, _mm512_and_si512(v, mask));
                i += 32;
            }
            if i < len {
                let k = ((1u64 << (len - i)) - 1) as __mmask32;
                // SAFETY: only the lanes below len are read.
                let v = _mm512_maskz_loadu_epi16(k, p.add((start + i) * 2) as *const i16);
                m = _mm512_max_epu16(m, _mm512_and_si512(v, mask));
            }
            let a = _mm256_max_epu16(_mm512_castsi512_si256(m), _mm512_extracti64x4_epi64::<1>(m));
            let b = _mm_max_epu16(_mm256_castsi256_si128(a), _mm256_extracti128_si256::<1>(a));
            // max = !min(!v): phminposuw finds the minimum of 8 u16 lanes in one instruction.
            let min = _mm_minpos_epu16(_mm_xor_si128(b, _mm_set1_epi16(-1)));
            0xffff - (_mm_extract_epi16::<0>(min) as u32 & 0xffff)
        }
    }

    /// The tables of a 4-step binary search for "number of bounds strictly below s": after the steps
    /// before `step`, the count so far `c` is a multiple of 2 * step, and the next bound to test is
    /// `bounds[c + step - 1]`, so table `step` holds that value at index c.
    struct Search {
        b7: __m512,
        t4: __m512,
        t2: __m512,
        t1: __m512,
        order: __m512i,
        remap: bool,
    }

    impl Search {
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,f16c,fma")]
        unsafe fn new(qt: QuantType) -> Self {
            let b = qt.bounds();
            let table = |step: usize| -> __m512 {
                let t: [f32; 16] = std::array::from_fn(|c| b[(c + step - 1).min(14)]);
                // SAFETY: reads the 16 floats of `t`.
                unsafe { _mm512_loadu_ps(t.as_ptr()) }
            };
            let order: [i32; 16] = qt.order().map(i32::from);
            Search {
                b7: _mm512_set1_ps(b[7]),
                t4: table(4),
                t2: table(2),
                t1: table(1),
                order: _mm512_loadu_si512(order.as_ptr() as *const _),
                remap: qt == QuantType::Fp4,
            }
        }

        /// The 4-bit code of each lane of `s`. No clamp to [-1, 1] is needed: every bound lies
        /// strictly inside it, so clamping never changes the number of bounds below a value.
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,f16c,fma")]
        unsafe fn codes(&self, s: __m512) -> __m512i {
            // s > bound is bound < s for the finite values that reach here.
            let k = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(s, self.b7);
            let mut c = _mm512_maskz_mov_epi32(k, _mm512_set1_epi32(8));
            for (t, step) in [(self.t4, 4), (self.t2, 2), (self.t1, 1)] {
                let k = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(s, _mm512_permutexvar_ps(c, t));
                c = _mm512_mask_or_epi32(c, k, c, _mm512_set1_epi32(step));
            }
            if self.remap {
                c = _mm512_permutexvar_epi32(c, self.order);
            }
            c
        }
    }

    /// Packs the codes of 64 consecutive elements (four vectors of 16 i32 codes) into 32 bytes, the
    /// first element of each pair in the high nibble.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,f16c,fma")]
    unsafe fn pack64(q: [__m512i; 4]) -> __m256i {
        // Per 128-bit lane L the two packs give the bytes of elements 4L..4L+4 of q0, q1, q2, q3.
        let bytes = _mm512_packus_epi16(
            _mm512_packus_epi32(q[0], q[1]),
            _mm512_packus_epi32(q[2], q[3]),
        );
        // 16 * first + second of each byte pair, as 16-bit words, then narrowed back to bytes.
        let words = _mm512_maddubs_epi16(bytes, _mm512_set1_epi16(0x0110));
        let packed = _mm512_cvtepi16_epi8(words);
        // 2-byte unit 4L + q holds output bytes of unit 4q + L: a 4 x 4 transpose of the units.
        let fix = _mm256_setr_epi16(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
        _mm256_permutexvar_epi16(fix, packed)
    }

    /// Blocks are handled a tile at a time: absmax of each block of the tile, then the codes.
    const TILE: usize = 2048;

    /// AVX-512 `quantize_4bit_full_blocks` (see there).
    ///
    /// # Safety
    /// The CPU must support avx512f, avx512bw, avx512vl, avx2, f16c and fma.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,f16c,fma")]
    pub(crate) unsafe fn quantize_4bit_full_blocks(
        x: FloatSlice,
        qt: QuantType,
        blocksize: usize,
        codes: &mut [u8],
        absmax: &mut [f32],
    ) -> Result<()> {
        match x {
            FloatSlice::BF16(b) => fourbit::<BF16>(x, b, qt, blocksize, codes, absmax),
            FloatSlice::F16(b) => fourbit::<F16>(x, b, qt, blocksize, codes, absmax),
            FloatSlice::F32(b) => fourbit::<F32>(x, b, qt, blocksize, codes, absmax),
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,f16c,fma")]
    unsafe fn fourbit<const D: u8>(
        x: FloatSlice,
        bytes: &[u8],
        qt: QuantType,
        blocksize: usize,
        codes: &mut [u8],
        absmax: &mut [f32],
    ) -> Result<()> {
        let n = bytes.len() / size::<D>();
        debug_assert!(blocksize.is_power_of_two() && blocksize >= 32);
        debug_assert_eq!(n % blocksize, 0);
        debug_assert_eq!(codes.len(), n / 2);
        debug_assert_eq!(absmax.len(), n / blocksize);
        let p = bytes.as_ptr();
        let search = Search::new(qt);
        let shift = blocksize.trailing_zeros();
        let tile = blocksize.max(TILE);
        let mut inv = [0f32; TILE / 32];
        let mut t0 = 0;
        while t0 < n {
            let t1 = (t0 + tile).min(n);
            for (j, inv_j) in inv.iter_mut().enumerate().take((t1 - t0) >> shift) {
                let start = t0 + (j << shift);
                let bits = max_abs_bits::<D>(p, start, blocksize);
                if bits >= inf_bits::<D>() {
                    return Err(Error::NonFinite {
                        path: Default::default(),
                        tensor: String::new(),
                        index: first_nonfinite(&x, start, start + blocksize),
                    });
                }
                let am = widen_bits::<D>(bits);
                absmax[(t0 >> shift) + j] = am;
                *inv_j = 1.0f32 / am.max(ABSMAX_FLOOR);
            }
            // 64 elements a step; a tile of 32-element blocks may end with a half step.
            let mut i = t0;
            while i < t1 {
                let vectors = if i + 64 <= t1 { 4 } else { 2 };
                let mut q = [_mm512_setzero_si512(); 4];
                for (k, qk) in q.iter_mut().enumerate().take(vectors) {
                    let e = i + 16 * k;
                    let scale = _mm512_set1_ps(inv[(e - t0) >> shift]);
                    *qk = search.codes(_mm512_mul_ps(load16::<D>(p, e), scale));
                }
                let packed = pack64(q);
                // SAFETY: codes holds n / 2 bytes and i / 2 + 2 * vectors * 4 = (i + 16 * vectors) / 2
                // <= t1 / 2 <= n / 2; a half step writes only the 16 bytes of its 32 elements.
                let dst = codes.as_mut_ptr().add(i / 2);
                if vectors == 4 {
                    _mm256_storeu_si256(dst as *mut __m256i, packed);
                } else {
                    _mm_storeu_si128(dst as *mut __m128i, _mm256_castsi256_si128(packed));
                }
                i += 16 * vectors;
            }
            t0 = t1;
        }
        Ok(())
    }

    /// AVX-512 `double::quantize_blockwise_dynamic` (the nested 8-bit quantization of the 4-bit
    /// absmax): the same 7-step binary search of the sorted 256-entry map as the CUDA kernel's
    /// `dQuantize<0>`, 16 values at a time, branch-free. The first five steps visit at most 32
    /// pivots, read from registers by permutes; the last two gather from the map.
    ///
    /// # Safety
    /// The CPU must support avx512f, avx512bw, avx512vl, avx2, f16c and fma.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,f16c,fma")]
    pub(crate) unsafe fn quantize_blockwise_dynamic(
        x: &[f32],
        codes: &mut [u8],
        absmax: &mut [f32],
    ) {
        use crate::quant::double::{dynamic_map, NESTED_BLOCKSIZE};
        debug_assert_eq!(codes.len(), x.len());
        debug_assert_eq!(absmax.len(), x.len().div_ceil(NESTED_BLOCKSIZE));
        let map = dynamic_map();
        // Pivots after steps 64, 32, 16, 8, 4: 64 * k + 63, ..., 8 * k + 3; table j holds map[pivot]
        // at index pivot >> (6 - j).
        let level = |first: usize, stride: usize| -> [f32; 32] {
            std::array::from_fn(|k| map[(first + stride * k).min(255)])
        };
        let (l1, l2, l3, l4, l5) = (
            level(63, 128),
            level(31, 64),
            level(15, 32),
            level(7, 16),
            level(3, 8),
        );
        let ld = |t: &[f32; 32], half: usize| -> __m512 {
            // SAFETY: reads 16 of the 32 floats of `t`.
            unsafe { _mm512_loadu_ps(t.as_ptr().add(16 * half)) }
        };
        let (t1, t2, t3, t4) = (ld(&l1, 0), ld(&l2, 0), ld(&l3, 0), ld(&l4, 0));
        let (t5lo, t5hi) = (ld(&l5, 0), ld(&l5, 1));
        let abs_mask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fff_ffff));
        for ((block, out), am_out) in x
            .chunks(NESTED_BLOCKSIZE)
            .zip(codes.chunks_mut(NESTED_BLOCKSIZE))
            .zip(absmax.iter_mut())
        {
            let len = block.len();
            let mask = |i: usize| -> __mmask16 {
                if i + 16 <= len {
                    0xffff
                } else {
                    ((1u32 << (len - i)) - 1) as __mmask16
                }
            };
            // The kernel's reduction starts at -FLT_MAX; zeros in masked-off lanes change nothing
            // because the maximum of |x| is at least 0.
            let mut vmax = _mm512_setzero_ps();
            for i in (0..len).step_by(16) {
                // SAFETY: only lanes below `len` are read.
                let v = _mm512_maskz_loadu_ps(mask(i), block.as_ptr().add(i));
                // maxps returns its second operand when either is NaN: NaN is skipped, like f32::max.
                vmax = _mm512_max_ps(_mm512_and_ps(v, abs_mask), vmax);
            }
            let am = _mm512_reduce_max_ps(vmax);
            *am_out = am;
            let inv = _mm512_set1_ps(1.0f32 / am);
            for i in (0..len).step_by(16) {
                let k = mask(i);
                // SAFETY: only lanes below `len` are read.
                let v = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, block.as_ptr().add(i)), inv);
                let q = dquantize16(&map, v, [t1, t2, t3, t4, t5lo, t5hi]);
                // SAFETY: only lanes below `len` are written.
                _mm512_mask_cvtepi32_storeu_epi8(out.as_mut_ptr().add(i) as *mut i8, k, q);
            }
        }
    }

    /// `double::cuda_dquantize` on 16 lanes (see there); `t` holds the map at the pivots of the first
    /// five steps (the fifth in two halves).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,f16c,fma")]
    unsafe fn dquantize16(map: &[f32; 256], x: __m512, t: [__m512; 6]) -> __m512i {
        let mut pivot = _mm512_set1_epi32(127);
        let mut lower_pivot = _mm512_setzero_si512();
        let mut upper_pivot = _mm512_set1_epi32(255);
        let mut lower = _mm512_set1_ps(-1.0);
        let mut upper = _mm512_set1_ps(1.0);
        let mut val = _mm512_set1_ps(map[127]);
        for (s, step) in [64, 32, 16, 8, 4, 2, 1].into_iter().enumerate() {
            // `x > val` is false for NaN, as in the kernel.
            let gt = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(x, val);
            lower_pivot = _mm512_mask_mov_epi32(lower_pivot, gt, pivot);
            lower = _mm512_mask_mov_ps(lower, gt, val);
            upper_pivot = _mm512_mask_mov_epi32(pivot, gt, upper_pivot);
            upper = _mm512_mask_mov_ps(val, gt, upper);
            let st = _mm512_set1_epi32(step);
            pivot = _mm512_mask_add_epi32(_mm512_sub_epi32(pivot, st), gt, pivot, st);
            val = match s {
                0..=3 => _mm512_permutexvar_ps(
                    _mm512_srlv_epi32(pivot, _mm512_set1_epi32(7 - s as i32)),
                    t[s],
                ),
                4 => _mm512_permutex2var_ps(t[4], _mm512_srli_epi32::<3>(pivot), t[5]),
                // SAFETY: pivot stays within 0..=255.
                _ => _mm512_i32gather_ps::<4>(pivot, map.as_ptr()),
            };
        }
        let top = _mm512_cmpeq_epi32_mask(upper_pivot, _mm512_set1_epi32(255));
        upper = _mm512_mask_mov_ps(upper, top, _mm512_set1_ps(map[255]));
        let bottom = _mm512_cmpeq_epi32_mask(lower_pivot, _mm512_setzero_si512());
        lower = _mm512_mask_mov_ps(lower, bottom, _mm512_set1_ps(map[0]));
        let half = _mm512_set1_ps(0.5);
        let gt = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(x, val);
        let up =
            _mm512_cmp_ps_mask::<_CMP_GT_OQ>(x, _mm512_mul_ps(_mm512_add_ps(upper, val), half));
        let down =
            _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, _mm512_mul_ps(_mm512_add_ps(lower, val), half));
        let q = _mm512_mask_mov_epi32(pivot, gt & up, upper_pivot);
        _mm512_mask_mov_epi32(q, !gt & down, lower_pivot)
    }

    /// Round to nearest, ties to even, whatever MXCSR says, without raising exceptions.
    const RNE: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

    /// Rounds 16 f32 lanes to float16 and back.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,f16c,fma")]
    unsafe fn through_f16(v: __m512) -> __m512 {
        _mm512_cvtph_ps(_mm512_cvtps_ph::<RNE>(v))
    }

    /// AVX-512 `quantize_int8_rows` (see there).
    ///
    /// # Safety
    /// The CPU must support avx512f, avx512bw, avx512vl, avx2, f16c and fma.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,f16c,fma")]
    pub(crate) unsafe fn quantize_int8_rows(
        x: FloatSlice,
        cols: usize,
        cb: &mut [i8],
        scb: &mut [f32],
    ) -> Result<()> {
        match x {
            FloatSlice::BF16(b) => int8::<BF16>(x, b, cols, cb, scb),
            FloatSlice::F16(b) => int8::<F16>(x, b, cols, cb, scb),
            FloatSlice::F32(b) => int8::<F32>(x, b, cols, cb, scb),
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,f16c,fma")]
    unsafe fn int8<const D: u8>(
        x: FloatSlice,
        bytes: &[u8],
        cols: usize,
        cb: &mut [i8],
        scb: &mut [f32],
    ) -> Result<()> {
        debug_assert_eq!(bytes.len() / size::<D>(), scb.len() * cols);
        debug_assert_eq!(cb.len(), scb.len() * cols);
        let p = bytes.as_ptr();
        for (r, scb_out) in scb.iter_mut().enumerate() {
            let base = r * cols;
            // Rounding to float16 is monotone, so the largest rounded |w| is the rounded largest |w|.
            let bits = max_abs_bits::<D>(p, base, cols);
            let am = if bits >= inf_bits::<D>() {
                f32::INFINITY
            } else {
                through_f16_scalar(widen_bits::<D>(bits))
            };
            if !am.is_finite() {
                let idx = (base..base + cols)
                    .find(|&i| !through_f16_scalar(x.get(i)).is_finite())
                    .unwrap_or(base);
                return Err(overflow(idx));
            }
            *scb_out = am;
            let out = &mut cb[base..base + cols];
            if am == 0.0 {
                out.fill(0);
                continue;
            }
            // `127.0 / row_stats` in torch is `reciprocal() * 127`: two roundings, as in int8.rs.
            let scale = _mm512_set1_ps((1.0f32 / am) * 127.0);
            let o = out.as_mut_ptr();
            let mut c = 0;
            while c + 16 <= cols {
                let v = _mm512_mul_ps(through_f16(load16::<D>(p, base + c)), scale);
                let q = _mm512_cvt_roundps_epi32::<RNE>(v);
                // SAFETY: c + 16 <= cols, inside this row of `out`; |q| <= 127, so the truncating
                // narrow to i8 is exact.
                _mm_storeu_si128(o.add(c) as *mut __m128i, _mm512_cvtepi32_epi8(q));
                c += 16;
            }
            if c < cols {
                let k = ((1u32 << (cols - c)) - 1) as __mmask16;
                let v = _mm512_mul_ps(through_f16(load16_masked::<D>(p, base + c, k)), scale);
                let q = _mm512_cvt_roundps_epi32::<RNE>(v);
                // SAFETY: only the lanes below cols are written.
                _mm512_mask_cvtepi32_storeu_epi8(o.add(c), k, q);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! The AVX2 and AVX-512 kernels against the scalar reference, byte for byte, on every input
    //! format, blocksize and awkward length, including the error index of non-finite inputs.

    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::quant::fourbit::{quantize_4bit, BLOCKSIZES};
    use crate::quant::int8::quantize_int8;
    use crate::quant::Kernel;

    /// Weight-like values with a per-run scale, exact zeros, subnormal-range and large values.
    fn values(rng: &mut SmallRng, n: usize) -> Vec<f32> {
        let mut v = Vec::with_capacity(n);
        while v.len() < n {
            let run = rng.gen_range(1..200).min(n - v.len());
            let scale = match rng.gen_range(0..8) {
                0 => 0.0,
                1 => 1e-7,
                2 => 1e-4,
                3 => 1000.0,
                4 => 1e-39,
                _ => 0.02,
            };
            for _ in 0..run {
                let u: f32 = (0..4).map(|_| rng.gen::<f32>()).sum::<f32>() - 2.0;
                v.push(u * scale);
            }
        }
        v
    }

    /// `v` in format `fmt` (0 = bf16, 1 = f16, 2 = f32) as little-endian bytes.
    fn encode(v: &[f32], fmt: usize) -> Vec<u8> {
        match fmt {
            0 => v
                .iter()
                .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
                .collect(),
            1 => v
                .iter()
                .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
                .collect(),
            _ => v.iter().flat_map(|&x| x.to_le_bytes()).collect(),
        }
    }

    fn slice(bytes: &[u8], fmt: usize) -> FloatSlice<'_> {
        match fmt {
            0 => FloatSlice::BF16(bytes),
            1 => FloatSlice::F16(bytes),
            _ => FloatSlice::F32(bytes),
        }
    }

    type FourBitKernel =
        unsafe fn(FloatSlice, QuantType, usize, &mut [u8], &mut [f32]) -> Result<()>;

    fn simd_4bit() -> Vec<(&'static str, FourBitKernel)> {
        let mut k: Vec<(&'static str, FourBitKernel)> = Vec::new();
        if crate::quant::has_avx2() {
            k.push(("avx2", quantize_4bit_full_blocks_avx2));
        }
        if crate::quant::has_avx512() {
            k.push(("avx512", avx512::quantize_4bit_full_blocks));
        }
        k
    }

    #[test]
    fn fourbit_kernels_match_scalar() {
        let mut rng = SmallRng::seed_from_u64(7);
        for fmt in 0..3 {
            for qt in [QuantType::Nf4, QuantType::Fp4] {
                for bs in BLOCKSIZES {
                    for blocks in [1, 3, 65, 130] {
                        let n = bs * blocks;
                        let bytes = encode(&values(&mut rng, n), fmt);
                        let x = slice(&bytes, fmt);
                        let want = quantize_4bit(x, qt, bs, Kernel::Scalar).unwrap();
                        for (name, f) in simd_4bit() {
                            let mut codes = vec![0u8; n / 2];
                            let mut absmax = vec![0f32; blocks];
                            // SAFETY: `simd_4bit` lists only kernels the CPU supports.
                            unsafe { f(x, qt, bs, &mut codes, &mut absmax) }.unwrap();
                            let ctx = format!("{name} fmt {fmt} {qt:?} bs {bs} n {n}");
                            assert_eq!(absmax, want.1, "{ctx}");
                            assert_eq!(codes, want.0, "{ctx}");
                        }
                    }
                    // The public entry point, with a tail block and an odd count.
                    let n = bs * 2 + 17;
                    let bytes = encode(&values(&mut rng, n), fmt);
                    let x = slice(&bytes, fmt);
                    assert_eq!(
                        quantize_4bit(x, qt, bs, Kernel::Auto).unwrap(),
                        quantize_4bit(x, qt, bs, Kernel::Scalar).unwrap()
                    );
                }
            }
        }
    }

    #[test]
    fn fourbit_kernels_report_the_same_nonfinite_index() {
        let mut rng = SmallRng::seed_from_u64(8);
        for fmt in 0..3 {
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                let n = 64 * 100;
                let mut v = values(&mut rng, n);
                let at = rng.gen_range(0..n);
                v[at] = bad;
                v[(at + 5).min(n - 1)] = bad;
                let bytes = encode(&v, fmt);
                let x = slice(&bytes, fmt);
                for (name, f) in simd_4bit() {
                    let mut codes = vec![0u8; n / 2];
                    let mut absmax = vec![0f32; n / 64];
                    // SAFETY: `simd_4bit` lists only kernels the CPU supports.
                    let r = unsafe { f(x, QuantType::Nf4, 64, &mut codes, &mut absmax) };
                    assert!(
                        matches!(r, Err(Error::NonFinite { index, .. }) if index == at),
                        "{name} fmt {fmt}: {r:?}, want index {at}"
                    );
                }
            }
        }
    }

    type Int8Kernel = unsafe fn(FloatSlice, usize, &mut [i8], &mut [f32]) -> Result<()>;

    fn simd_int8() -> Vec<(&'static str, Int8Kernel)> {
        let mut k: Vec<(&'static str, Int8Kernel)> = Vec::new();
        if crate::quant::has_avx2() {
            k.push(("avx2", quantize_int8_rows_avx2));
        }
        if crate::quant::has_avx512() {
            k.push(("avx512", avx512::quantize_int8_rows));
        }
        k
    }

    #[test]
    fn int8_kernels_match_scalar() {
        let mut rng = SmallRng::seed_from_u64(9);
        for fmt in 0..3 {
            for cols in [1, 7, 15, 16, 17, 31, 32, 33, 63, 100, 1000, 4099] {
                let rows = 5;
                let mut v = values(&mut rng, rows * cols);
                v[cols..2 * cols].fill(0.0);
                // The top of float16's range in one row (65504 itself is not a bf16 value).
                v[3 * cols] = if fmt == 0 { 65280.0 } else { 65504.0 };
                let bytes = encode(&v, fmt);
                let x = slice(&bytes, fmt);
                let want = quantize_int8(x, rows, cols, Kernel::Scalar).unwrap();
                for (name, f) in simd_int8() {
                    let mut cb = vec![0i8; rows * cols];
                    let mut scb = vec![0f32; rows];
                    // SAFETY: `simd_int8` lists only kernels the CPU supports.
                    unsafe { f(x, cols, &mut cb, &mut scb) }.unwrap();
                    let ctx = format!("{name} fmt {fmt} cols {cols}");
                    assert_eq!(scb, want.1, "{ctx}");
                    assert_eq!(cb, want.0, "{ctx}");
                }
            }
        }
    }

    #[test]
    fn int8_kernels_report_the_same_nonfinite_index() {
        let mut rng = SmallRng::seed_from_u64(10);
        for fmt in 0..3 {
            // NaN, infinity, and (except in f16 input) a finite value that overflows float16.
            for bad in [f32::NAN, f32::NEG_INFINITY, 70000.0, 65520.0] {
                let (rows, cols) = (4, 333);
                let mut v = values(&mut rng, rows * cols);
                let at = rng.gen_range(0..rows * cols);
                v[at] = bad;
                let bytes = encode(&v, fmt);
                let x = slice(&bytes, fmt);
                let want = quantize_int8(x, rows, cols, Kernel::Scalar);
                for (name, f) in simd_int8() {
                    let mut cb = vec![0i8; rows * cols];
                    let mut scb = vec![0f32; rows];
                    // SAFETY: `simd_int8` lists only kernels the CPU supports.
                    let r = unsafe { f(x, cols, &mut cb, &mut scb) };
                    assert_eq!(
                        format!("{:?}", r.err()),
                        format!("{:?}", want.as_ref().err()),
                        "{name} fmt {fmt} value {bad}"
                    );
                }
            }
        }
    }

    type DynKernel = unsafe fn(&[f32], &mut [u8], &mut [f32]);

    /// The nested-quantization kernels this CPU runs.
    fn simd_dynamic() -> Vec<(&'static str, DynKernel)> {
        let mut k: Vec<(&'static str, DynKernel)> = Vec::new();
        if crate::quant::has_avx2() {
            k.push(("avx2", quantize_blockwise_dynamic_avx2));
        }
        if crate::quant::has_avx512() {
            k.push(("avx512", avx512::quantize_blockwise_dynamic));
        }
        k
    }

    /// The scalar reference of the nested quantization, block by block with `cuda_dquantize`
    /// (`double::quantize_blockwise_dynamic` itself dispatches to the SIMD kernels).
    fn dynamic_reference(x: &[f32]) -> (Vec<u8>, Vec<f32>) {
        let map = crate::quant::double::dynamic_map();
        let mut codes = Vec::with_capacity(x.len());
        let mut absmax = Vec::new();
        for block in x.chunks(256) {
            let am = block.iter().fold(f32::MIN, |m, v| m.max(v.abs()));
            absmax.push(am);
            let inv = 1.0f32 / am;
            codes.extend(
                block
                    .iter()
                    .map(|&v| crate::quant::double::cuda_dquantize(&map, v * inv)),
            );
        }
        (codes, absmax)
    }

    fn check_dynamic(x: &[f32]) {
        let want = dynamic_reference(x);
        for (name, f) in simd_dynamic() {
            let mut codes = vec![0u8; x.len()];
            let mut absmax = vec![0f32; x.len().div_ceil(256)];
            // SAFETY: `simd_dynamic` lists only kernels the CPU supports.
            unsafe { f(x, &mut codes, &mut absmax) };
            assert_eq!(absmax, want.1, "{name} n {}", x.len());
            assert_eq!(codes, want.0, "{name} n {}", x.len());
        }
    }

    #[test]
    fn nested_dynamic_quantization_matches_scalar() {
        let map = crate::quant::double::dynamic_map();
        let mut rng = SmallRng::seed_from_u64(11);
        for n in [1, 7, 8, 9, 15, 16, 17, 255, 256, 257, 1000, 5000] {
            // Centered absmax values, plus exact map entries and midpoints scaled by the block
            // absmax (ties), and an all-zero block (0 * inf = NaN in the kernel).
            let mut x: Vec<f32> = (0..n).map(|_| rng.gen_range(-0.01f32..0.03)).collect();
            for v in x.iter_mut().step_by(7) {
                let i = rng.gen_range(0..255);
                *v = if rng.gen() {
                    map[i]
                } else {
                    (map[i] + map[i + 1]) * 0.5
                } * 0.03;
            }
            if n >= 512 {
                x[256..512].fill(0.0);
            }
            check_dynamic(&x);
        }
        // Every map entry and midpoint, and their float neighbours, in blocks whose absmax is 1 (so
        // they reach the search unscaled): the ties and the ends of the map (the bit pattern below
        // 0.0 is a NaN, which the scalar code also skips in the absmax).
        let mut x = Vec::new();
        for i in 0..256 {
            let mid = if i < 255 {
                (map[i] + map[i + 1]) * 0.5
            } else {
                1.0
            };
            for v in [map[i], mid] {
                let b = v.to_bits();
                for w in [v, f32::from_bits(b.wrapping_sub(1)), f32::from_bits(b + 1)] {
                    if x.len() % 256 == 0 {
                        x.push(1.0);
                    }
                    x.push(w.clamp(-1.0, 1.0));
                }
            }
        }
        check_dynamic(&x);
        // Uniform over the whole map range.
        let x: Vec<f32> = (0..100_000).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
        check_dynamic(&x);
    }
}
