//! AVX-512 (F, BW, VL) kernels: 16 lanes a vector, absmax from the integer maximum of the |x| bit
//! patterns, and the 4-bit bucket found by a 4-step binary search through permuted bound tables.

use std::arch::x86_64::*;

use super::{first_nonfinite, inf_bits, size, widen_bits, BF16, F16, F32};
use crate::dtype::FloatSlice;
use crate::error::{Error, Result};
use crate::quant::fourbit::{QuantType, ABSMAX_FLOOR};
use crate::quant::int8::{overflow, through_f16 as through_f16_scalar};
use crate::quant::{block_scale, block_scales_avx512, row_scale};

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
        let blocks = (t1 - t0) >> shift;
        for (j, inv_j) in inv.iter_mut().enumerate().take(blocks) {
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
            *inv_j = am.max(ABSMAX_FLOOR);
        }
        block_scales_avx512(&mut inv[..blocks]);
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
pub(crate) unsafe fn quantize_blockwise_dynamic(x: &[f32], codes: &mut [u8], absmax: &mut [f32]) {
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
        let inv = _mm512_set1_ps(block_scale(am));
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
    let up = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(x, _mm512_mul_ps(_mm512_add_ps(upper, val), half));
    let down = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, _mm512_mul_ps(_mm512_add_ps(lower, val), half));
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
        let scale = _mm512_set1_ps(row_scale(am));
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
