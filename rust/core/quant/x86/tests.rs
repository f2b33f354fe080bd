//! The x86 kernels against the scalar references, byte for byte.

//! The AVX2 and AVX-512 kernels against the scalar reference, byte for byte, on every input
//! format, blocksize and awkward length, including the error index of non-finite inputs.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::quant::fourbit::{quantize_4bit, redo_small_blocks, BLOCKSIZES};
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

type FourBitKernel = unsafe fn(FloatSlice, QuantType, usize, &mut [u8], &mut [f32]) -> Result<()>;

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
                        // All-zero and denormal blocks are the scalar path's, as in quantize_4bit.
                        redo_small_blocks(x, qt, bs, &mut codes, &mut absmax).unwrap();
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
        let inv = crate::quant::block_scale(am);
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
