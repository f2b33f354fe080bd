//! bitsandbytes' quantized formats: 4-bit NF4/FP4 blockwise with optional double quantization of the
//! statistics, and LLM.int8 row-wise. Each format has a scalar reference implementation and fast ones
//! (AVX-512 or AVX2 on x86-64, whichever the CPU has); tests compare them.

pub mod cuda_mean;
pub mod double;
pub mod fourbit;
pub mod int8;
mod reciprocal;
pub mod tables;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use double::{dynamic_map, quantize_nested, Nested, NESTED_BLOCKSIZE};
pub use fourbit::{quantize_4bit, quantize_4bit_reference, QuantType, BLOCKSIZES};
pub use int8::{quantize_int8, quantize_int8_reference};

/// The factor a block's values are multiplied by before they are coded, from its absmax: the kernels
/// of bitsandbytes' `kQuantizeBlockwise` scale by `1.0f / absmax` (csrc/kernels.cu), which its CUDA
/// build (`--use_fast_math`) computes with the GPU's approximate reciprocal; fastq takes that same
/// reciprocal (`reciprocal::gpu_reciprocal`), so its codes are the GPU's (README, "How exact it is").
/// Every 4-bit and nested kernel, scalar and SIMD, takes it from here.
#[inline(always)]
pub(crate) fn block_scale(absmax: f32) -> f32 {
    reciprocal::gpu_reciprocal(absmax)
}

/// `block_scale` of every value of `v`, in place, 16 at a time (the AVX-512 4-bit kernel takes a tile's
/// scales this way; the same bits as `block_scale`, `reciprocal::gpu_reciprocal16`).
///
/// # Safety
/// The CPU must support avx512f and fma.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
pub(crate) unsafe fn block_scales_avx512(v: &mut [f32]) {
    use std::arch::x86_64::{_mm512_mask_storeu_ps, _mm512_maskz_loadu_ps};
    for chunk in v.chunks_mut(16) {
        let lanes = ((1u32 << chunk.len()) - 1) as u16;
        // SAFETY: only the chunk's lanes are read and written.
        let x = _mm512_maskz_loadu_ps(lanes, chunk.as_ptr());
        _mm512_mask_storeu_ps(chunk.as_mut_ptr(), lanes, reciprocal::gpu_reciprocal16(x));
    }
}

/// `block_scales_avx512` with AVX2, 8 at a time.
///
/// # Safety
/// The CPU must support avx2 and fma.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn block_scales_avx2(v: &mut [f32]) {
    use std::arch::x86_64::{_mm256_loadu_ps, _mm256_storeu_ps};
    for chunk in v.chunks_mut(8) {
        let mut lanes = [1f32; 8];
        lanes[..chunk.len()].copy_from_slice(chunk);
        // SAFETY: 8 floats in, 8 out, of a local array.
        let r = reciprocal::gpu_reciprocal8(_mm256_loadu_ps(lanes.as_ptr()));
        _mm256_storeu_ps(lanes.as_mut_ptr(), r);
        chunk.copy_from_slice(&lanes[..chunk.len()]);
    }
}

/// LLM.int8's factor for a row from its absmax (SCB): `127.0 / SCB`, which torch evaluates as
/// `SCB.reciprocal() * 127` (Tensor.__rtruediv__) and bitsandbytes' `kInt8VectorQuant` as the GPU's
/// reciprocal times 127 - two roundings either way, the reciprocal the same as a 4-bit block's. Every
/// int8 kernel, scalar and SIMD, takes it from here.
#[inline(always)]
pub(crate) fn row_scale(absmax: f32) -> f32 {
    block_scale(absmax) * 127.0
}

/// Which implementation a kernel uses. `Auto` picks the fastest the CPU supports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Kernel {
    /// The fastest available.
    #[default]
    Auto,
    /// The portable scalar reference.
    Scalar,
}

/// True when the AVX2 kernels can run on this CPU.
pub fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("f16c")
            && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// True when the AVX-512 kernels can run on this CPU (F, BW and VL on top of what AVX2 needs). On
/// such CPUs `Kernel::Auto` uses them in place of the AVX2 ones, unless the environment variable
/// `FASTQ_DISABLE_AVX512` is set to anything but "" or "0" when first asked (to test or time the AVX2
/// kernels on an AVX-512 machine).
pub fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *ON.get_or_init(|| {
            has_avx2()
                && std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512bw")
                && std::is_x86_feature_detected!("avx512vl")
                && std::env::var_os("FASTQ_DISABLE_AVX512").is_none_or(|v| v.is_empty() || v == "0")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Name of the kernel `Kernel::Auto` runs on this CPU ("avx512", "avx2" or "scalar").
pub fn kernel_name() -> &'static str {
    if has_avx512() {
        "avx512"
    } else if has_avx2() {
        "avx2"
    } else {
        "scalar"
    }
}
