//! AVX2 (+F16C, FMA) kernels. Each computes exactly what the scalar reference in `fourbit.rs` /
//! `int8.rs` computes (same IEEE operations in the same order per element); tests compare them.

use std::arch::x86_64::*;

use super::fourbit::{QuantType, ABSMAX_FLOOR};
use super::int8::overflow;
use crate::dtype::FloatSlice;
use crate::error::{Error, Result};

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

/// Bucket index (0..=15) of each lane: the number of bounds strictly below it.
#[inline]
#[target_feature(enable = "avx2,f16c,fma")]
unsafe fn buckets(s: __m256, bounds: &[__m256; 15]) -> __m256i {
    let mut acc = _mm256_setzero_si256();
    for b in bounds {
        // all-ones (-1) where bound < s
        acc = _mm256_sub_epi32(acc, _mm256_castps_si256(_mm256_cmp_ps(*b, s, _CMP_LT_OQ)));
    }
    acc
}

/// Quantizes whole blocks (x.len() is a multiple of `blocksize`, itself a multiple of 32).
///
/// # Safety
/// The CPU must support avx2, f16c and fma.
#[target_feature(enable = "avx2,f16c,fma")]
pub(crate) unsafe fn quantize_4bit_full_blocks(
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
    let bounds: [__m256; 15] = qt.bounds().map(|b| _mm256_set1_ps(b));
    let order = qt.order();
    let order_tbl = _mm256_broadcastsi128_si256(_mm_loadu_si128(order.as_ptr() as *const __m128i));
    let remap = qt == QuantType::Fp4;
    let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    let one = _mm256_set1_ps(1.0);
    let neg_one = _mm256_set1_ps(-1.0);
    let lane_fix = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    let low_byte = _mm256_set1_epi16(0x00ff);
    for (b, am_out) in absmax.iter_mut().enumerate() {
        let start = b * blocksize;
        let end = start + blocksize;
        let mut vmax = _mm256_setzero_ps();
        let mut bad = _mm256_setzero_ps();
        let mut i = start;
        while i < end {
            let a = _mm256_and_ps(load8(&x, i), abs_mask);
            bad = _mm256_or_ps(bad, nonfinite_mask(a));
            vmax = _mm256_max_ps(vmax, a);
            i += 8;
        }
        if _mm256_movemask_ps(bad) != 0 {
            return Err(Error::NonFinite {
                path: Default::default(),
                tensor: String::new(),
                index: first_nonfinite(&x, start, end),
            });
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), vmax);
        let am = lanes.iter().fold(0f32, |m, &v| m.max(v));
        *am_out = am;
        let inv = _mm256_set1_ps(1.0f32 / am.max(ABSMAX_FLOOR));
        let mut i = start;
        while i < end {
            let mut q = [_mm256_setzero_si256(); 4];
            for (k, qk) in q.iter_mut().enumerate() {
                let s = _mm256_mul_ps(load8(&x, i + 8 * k), inv);
                let s = _mm256_min_ps(_mm256_max_ps(s, neg_one), one);
                *qk = buckets(s, &bounds);
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

/// Int8 row-wise quantization of whole rows.
///
/// # Safety
/// The CPU must support avx2, f16c and fma.
#[target_feature(enable = "avx2,f16c,fma")]
pub(crate) unsafe fn quantize_int8_rows(
    x: FloatSlice,
    cols: usize,
    cb: &mut [i8],
    scb: &mut [f32],
) -> Result<()> {
    let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    let lane_fix = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    let vec_end = cols / 32 * 32;
    for (r, scb_out) in scb.iter_mut().enumerate() {
        let base = r * cols;
        let mut vmax = _mm256_setzero_ps();
        let mut bad = _mm256_setzero_ps();
        let mut c = 0;
        while c + 8 <= cols {
            let a = _mm256_and_ps(through_f16(load8(&x, base + c)), abs_mask);
            bad = _mm256_or_ps(bad, nonfinite_mask(a));
            vmax = _mm256_max_ps(vmax, a);
            c += 8;
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), vmax);
        let mut am = lanes.iter().fold(0f32, |m, &v| m.max(v));
        let mut bad_any = _mm256_movemask_ps(bad) != 0;
        for cc in c..cols {
            let v = super::int8::through_f16(x.get(base + cc));
            bad_any |= !v.is_finite();
            am = am.max(v.abs());
        }
        if bad_any {
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
