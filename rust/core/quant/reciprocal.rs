//! The reciprocal bitsandbytes' CUDA kernels scale by. They are built with `--use_fast_math`, so
//! `1.0f / absmax` is `rcp.approx.ftz.f32` (the SFU's MUFU.RCP), within one ulp of the true 1/x but not
//! always the correctly rounded float32. Which mantissas it rounds the other way was measured on a GPU
//! (benches/gpu/rcp_table.py: every float32 in [1, 2), and every binade checked to scale by its power
//! of two) and is kept here as one bit per mantissa; with it a CPU kernel scales a block exactly as the
//! GPU does, so its codes are the GPU's (tests/test_quantize_bnb.py checks that against the codes a GPU
//! wrote, tests/fixtures/bnb_cuda_nested.safetensors).

/// Bit `m` (little-endian within each byte) is set where the GPU's reciprocal of the float32 with
/// mantissa bits `m` is not the correctly rounded one; it is then the other float32 neighbour of 1/x.
static OTHER_SIDE: &[u8; 1 << 20] = include_bytes!("rcp_gpu.bin");

const MANTISSA: u32 = (1 << 23) - 1;

/// The GPU's `rcp.approx.ftz.f32` of `x`, for every `x` but subnormal ones: where `x` and its
/// reciprocal are normal, from the map; a reciprocal below 2^-126 (|x| above 2^126) flushed to a zero
/// of its sign, as the GPU does (`rcp_table.py`'s scaling check found binades 126 and 127 off, and a GPU
/// returned 0 for 1.5 * 2^126, 2^127 and 1.75 * 2^127, -0 for -1.5 * 2^126, 2^-126 for 2^126); zero,
/// infinities and NaN as 1/x. A subnormal `x` keeps the correctly rounded reciprocal (the GPU flushes it
/// to zero and returns inf, but it also flushes the block's values, which fastq keeps: README).
#[inline]
pub(crate) fn gpu_reciprocal(x: f32) -> f32 {
    let r = 1.0 / x;
    if !x.is_normal() || !r.is_normal() {
        return if r.is_subnormal() {
            0f32.copysign(r)
        } else {
            r
        };
    }
    let m = x.to_bits() & MANTISSA;
    let other = (OTHER_SIDE[(m >> 3) as usize] >> (m & 7)) & 1;
    // Which neighbour is the other: above r if r lies below the true 1/x, i.e. if |x * r| < 1 (the
    // product of two float32 is exact in f64). No branch on the map's bit: a random bit mispredicts.
    let step = if ((x as f64) * (r as f64)).abs() < 1.0 {
        1
    } else {
        -1
    };
    f32::from_bits(r.to_bits().wrapping_add_signed(step * other as i32))
}

/// `gpu_reciprocal` of 16 lanes (AVX-512: the map's bits gathered as 32-bit words, the neighbour chosen
/// by the sign of the exact residual `1 - x * r` from one FMA, which is `|x * r| < 1`). Bit for bit the
/// scalar function's results (tests: every mantissa in several binades, both signs, the special values).
///
/// # Safety
/// The CPU must support avx512f and fma.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,fma")]
pub(crate) unsafe fn gpu_reciprocal16(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let r = _mm512_div_ps(_mm512_set1_ps(1.0), x);
    let (xi, ri) = (_mm512_castps_si512(x), _mm512_castps_si512(r));
    let exponent = _mm512_set1_epi32(0x7f80_0000);
    let zero = _mm512_setzero_si512();
    let (ex, er) = (
        _mm512_and_si512(xi, exponent),
        _mm512_and_si512(ri, exponent),
    );
    let normal = _mm512_cmpneq_epi32_mask(ex, zero)
        & _mm512_cmpneq_epi32_mask(ex, exponent)
        & _mm512_cmpneq_epi32_mask(er, zero)
        & _mm512_cmpneq_epi32_mask(er, exponent);
    let m = _mm512_and_si512(xi, _mm512_set1_epi32(MANTISSA as i32));
    // Bit m of the little-endian map is bit (m & 31) of its 32-bit word m >> 5 (only normal lanes read).
    let words = _mm512_mask_i32gather_epi32::<4>(
        zero,
        normal,
        _mm512_srli_epi32::<5>(m),
        OTHER_SIDE.as_ptr() as *const i32,
    );
    let other = _mm512_and_si512(
        _mm512_srlv_epi32(words, _mm512_and_si512(m, _mm512_set1_epi32(31))),
        _mm512_set1_epi32(1),
    );
    let residual = _mm512_fnmadd_ps(x, r, _mm512_set1_ps(1.0));
    let up = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(residual, _mm512_setzero_ps());
    let step = _mm512_mask_blend_epi32(up, _mm512_sub_epi32(zero, other), other);
    let out = _mm512_mask_add_epi32(ri, normal, ri, step);
    // A subnormal reciprocal (a zero one too) becomes the zero of its sign.
    let sign = _mm512_and_si512(ri, _mm512_set1_epi32(i32::MIN));
    let out = _mm512_mask_blend_epi32(_mm512_cmpeq_epi32_mask(er, zero), out, sign);
    _mm512_castsi512_ps(out)
}

/// `gpu_reciprocal` of 8 lanes (AVX2), as `gpu_reciprocal16`.
///
/// # Safety
/// The CPU must support avx2 and fma.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn gpu_reciprocal8(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let r = _mm256_div_ps(_mm256_set1_ps(1.0), x);
    let (xi, ri) = (_mm256_castps_si256(x), _mm256_castps_si256(r));
    let exponent = _mm256_set1_epi32(0x7f80_0000);
    let zero = _mm256_setzero_si256();
    let (ex, er) = (
        _mm256_and_si256(xi, exponent),
        _mm256_and_si256(ri, exponent),
    );
    let not_normal = _mm256_or_si256(
        _mm256_or_si256(
            _mm256_cmpeq_epi32(ex, zero),
            _mm256_cmpeq_epi32(ex, exponent),
        ),
        _mm256_or_si256(
            _mm256_cmpeq_epi32(er, zero),
            _mm256_cmpeq_epi32(er, exponent),
        ),
    );
    let normal = _mm256_andnot_si256(not_normal, _mm256_set1_epi32(-1));
    let m = _mm256_and_si256(xi, _mm256_set1_epi32(MANTISSA as i32));
    let words = _mm256_mask_i32gather_epi32::<4>(
        zero,
        OTHER_SIDE.as_ptr() as *const i32,
        _mm256_srli_epi32::<5>(m),
        normal,
    );
    let other = _mm256_and_si256(
        _mm256_and_si256(
            _mm256_srlv_epi32(words, _mm256_and_si256(m, _mm256_set1_epi32(31))),
            _mm256_set1_epi32(1),
        ),
        normal,
    );
    let residual = _mm256_fnmadd_ps(x, r, _mm256_set1_ps(1.0));
    let up = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GT_OQ>(residual, _mm256_setzero_ps()));
    let step = _mm256_blendv_epi8(_mm256_sub_epi32(zero, other), other, up);
    let out = _mm256_add_epi32(ri, step);
    let sign = _mm256_and_si256(ri, _mm256_set1_epi32(i32::MIN));
    let out = _mm256_blendv_epi8(out, sign, _mm256_cmpeq_epi32(er, zero));
    _mm256_castsi256_ps(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn within_one_ulp_of_the_true_reciprocal_and_scaling_by_powers_of_two() {
        for m in (0..1u32 << 23).step_by(97) {
            let x = f32::from_bits((127 << 23) | m);
            let g = gpu_reciprocal(x);
            let t = 1.0 / x as f64;
            let r = 1.0 / x;
            // the two float32 around 1/x bracket it; g is one of them
            let (lo, hi) = if (r as f64) < t {
                (r, f32::from_bits(r.to_bits() + 1))
            } else {
                (f32::from_bits(r.to_bits() - 1), r)
            };
            assert!(g == lo || g == hi || (r as f64) == t, "mantissa {m:#x}");
            for e in [-100i32, -20, -1, 1, 20, 100] {
                let s = x * 2f32.powi(e);
                assert_eq!(
                    gpu_reciprocal(s),
                    g * 2f32.powi(-e),
                    "mantissa {m:#x} times 2^{e}"
                );
                assert_eq!(gpu_reciprocal(-s), -g * 2f32.powi(-e));
            }
        }
    }

    #[test]
    fn outside_the_normal_range_it_is_the_correctly_rounded_reciprocal() {
        for x in [0.0f32, -0.0, 1e-40, f32::INFINITY, f32::MIN_POSITIVE / 2.0] {
            assert_eq!(gpu_reciprocal(x).to_bits(), (1.0 / x).to_bits(), "{x:e}");
        }
        assert!(gpu_reciprocal(f32::NAN).is_nan());
        assert_eq!(gpu_reciprocal(1.0), 1.0);
        assert_eq!(gpu_reciprocal(0.5), 2.0);
    }

    #[test]
    fn a_reciprocal_below_the_normal_range_is_flushed_to_zero_as_on_the_gpu() {
        // what an H100 returned (2026-12-08, rcp.approx.ftz.f32 through rcp_table.approx_gpu)
        let two126 = 2f32.powi(126);
        assert_eq!(gpu_reciprocal(two126), f32::MIN_POSITIVE);
        for x in [
            1.5 * two126,
            2f32.powi(127),
            1.75 * 2f32.powi(127),
            f32::MAX,
        ] {
            assert_eq!(gpu_reciprocal(x).to_bits(), 0, "{x:e}");
        }
        assert_eq!(gpu_reciprocal(-1.5 * two126).to_bits(), (-0f32).to_bits());
        assert_eq!(gpu_reciprocal(f32::MIN_POSITIVE), two126);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn sixteen_and_eight_lanes_are_the_scalar_function_bit_for_bit() {
        let avx512 = is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma");
        let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
        let check = |xs: &[f32]| {
            let mut out = [0f32; 16];
            for chunk in xs.chunks(16) {
                let mut lanes = [1f32; 16];
                lanes[..chunk.len()].copy_from_slice(chunk);
                // SAFETY: the features were detected above; 16 floats in, 16 out.
                unsafe {
                    use std::arch::x86_64::*;
                    if avx512 {
                        let v = gpu_reciprocal16(_mm512_loadu_ps(lanes.as_ptr()));
                        _mm512_storeu_ps(out.as_mut_ptr(), v);
                        for (x, y) in lanes.iter().zip(&out) {
                            assert_eq!(
                                y.to_bits(),
                                gpu_reciprocal(*x).to_bits(),
                                "16 lanes: {x:e}"
                            );
                        }
                    }
                    if avx2 {
                        for h in [0, 8] {
                            let v = gpu_reciprocal8(_mm256_loadu_ps(lanes.as_ptr().add(h)));
                            _mm256_storeu_ps(out.as_mut_ptr().add(h), v);
                        }
                        for (x, y) in lanes.iter().zip(&out) {
                            assert_eq!(y.to_bits(), gpu_reciprocal(*x).to_bits(), "8 lanes: {x:e}");
                        }
                    }
                }
            }
        };
        // every mantissa of a few binades (a stride in debug builds), both signs
        let stride = if cfg!(debug_assertions) { 61 } else { 1 };
        for exp in [1u32, 100, 127, 200, 252, 253, 254] {
            for sign in [0u32, 1 << 31] {
                let xs: Vec<f32> = (0..1u32 << 23)
                    .step_by(stride)
                    .map(|m| f32::from_bits(sign | (exp << 23) | m))
                    .collect();
                check(&xs);
            }
        }
        check(&[
            0.0,
            -0.0,
            1e-40,
            -1e-45,
            f32::MIN_POSITIVE,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::MAX,
            -f32::MAX,
            1.0,
            0.5,
            3.0,
        ]);
    }
}
