//! Property tests of the quantizers (proptest): on arbitrary inputs - any finite bit pattern of the
//! three input formats, any length, every blocksize - the invariants bitsandbytes' formats promise:
//! codes in range, the round trip within half the largest code spacing times the block's absmax, the
//! first element in the high nibble, and the SIMD kernels byte for byte equal to the scalar reference
//! (errors included: the same non-finite element is reported).

use fastq::quant::{
    dynamic_map, quantize_4bit, quantize_int8, quantize_nested, QuantType, BLOCKSIZES,
    NESTED_BLOCKSIZE,
};
use fastq::{Dtype, FloatSlice, Kernel};
use proptest::prelude::*;

/// Values in format `dtype` as little-endian bytes, from raw bit patterns (any value, subnormals and
/// extremes included); `finite` replaces NaN and infinities by zero.
fn from_bits(bits: &[u32], dtype: Dtype, finite: bool) -> Vec<u8> {
    let keep = |ok: bool, v: u32| if ok || !finite { v } else { 0 };
    match dtype {
        Dtype::F32 => bits
            .iter()
            .flat_map(|&b| keep(f32::from_bits(b).is_finite(), b).to_le_bytes())
            .collect(),
        Dtype::F16 => bits
            .iter()
            .flat_map(|&b| {
                let h = b as u16;
                (keep(half::f16::from_bits(h).is_finite(), h as u32) as u16).to_le_bytes()
            })
            .collect(),
        _ => bits
            .iter()
            .flat_map(|&b| {
                let h = b as u16;
                let ok = half::bf16::from_bits(h).is_finite();
                (keep(ok, h as u32) as u16).to_le_bytes()
            })
            .collect(),
    }
}

fn dtype() -> impl Strategy<Value = Dtype> {
    prop_oneof![Just(Dtype::F32), Just(Dtype::F16), Just(Dtype::BF16)]
}

fn quant_type() -> impl Strategy<Value = QuantType> {
    prop_oneof![Just(QuantType::Nf4), Just(QuantType::Fp4)]
}

/// A blocksize and a length: up to three whole blocks and a tail.
fn block_and_len() -> impl Strategy<Value = (usize, usize)> {
    (
        prop::sample::select(BLOCKSIZES.to_vec()),
        0usize..4,
        0usize..4096,
    )
        .prop_map(|(bs, blocks, extra)| (bs, (blocks * bs + extra % bs).max(1)))
}

/// `v` in format `dtype` (rounded to nearest even), little-endian.
fn encode(v: &[f32], dtype: Dtype) -> Vec<u8> {
    match dtype {
        Dtype::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Dtype::F16 => v
            .iter()
            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
            .collect(),
        _ => v
            .iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
            .collect(),
    }
}

/// Half the largest gap between adjacent sorted values of a code.
fn half_gap(code: &[f32]) -> f32 {
    let mut c = code.to_vec();
    c.sort_by(f32::total_cmp);
    c.windows(2).map(|w| w[1] - w[0]).fold(0.0, f32::max) / 2.0
}

/// The index of the code nearest zero (the first of two zeros).
fn zero_code(code: &[f32]) -> usize {
    (0..code.len())
        .min_by(|&a, &b| code[a].abs().total_cmp(&code[b].abs()))
        .unwrap()
}

fn nibble(codes: &[u8], i: usize) -> usize {
    let b = codes[i / 2];
    (if i.is_multiple_of(2) {
        b >> 4
    } else {
        b & 0x0f
    }) as usize
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn four_bit_round_trip_and_simd_equal_scalar(
        (bs, n) in block_and_len(),
        seed_bits in prop::collection::vec(any::<u32>(), 1..64),
        dt in dtype(),
        qt in quant_type(),
    ) {
        // Repeat the random words to length n, each scaled by a block-dependent shift of its exponent
        // bits, so that one tensor holds blocks of very different magnitudes.
        let bits: Vec<u32> = (0..n).map(|i| seed_bits[i % seed_bits.len()].rotate_left((i / bs) as u32)).collect();
        let bytes = from_bits(&bits, dt, true);
        let x = FloatSlice::new(dt, &bytes).unwrap();
        let scalar = quantize_4bit(x, qt, bs, Kernel::Scalar).unwrap();
        let simd = quantize_4bit(x, qt, bs, Kernel::Auto).unwrap();
        prop_assert_eq!(&simd, &scalar);
        let (codes, absmax) = scalar;
        prop_assert_eq!(codes.len(), n.div_ceil(2));
        prop_assert_eq!(absmax.len(), n.div_ceil(bs));
        let code = qt.code();
        let tol = half_gap(&code) + 1e-6;
        for (b, &am) in absmax.iter().enumerate() {
            let block = b * bs..((b + 1) * bs).min(n);
            let max = block.clone().map(|i| x.get(i).abs()).fold(0.0f32, f32::max);
            // Every block saves its absmax as it is (the CUDA kernel), the tail too.
            prop_assert_eq!(am, max);
            for i in block {
                let q = nibble(&codes, i);
                prop_assert!(q < 16);
                let err = (x.get(i) - code[q] * am).abs();
                if (1.0f32 / am).is_subnormal() {
                    // Above 2^126 the GPU's reciprocal is flushed to zero: every value scales to 0.
                    prop_assert_eq!(q, zero_code(&code), "element {}", i);
                } else if am >= 1e-38 {
                    prop_assert!(err <= am * tol, "element {i}: {} -> {} (absmax {am})", x.get(i), code[q] * am);
                } else {
                    // Scaled by 1 / absmax into infinities or NaN: both sides are still below absmax.
                    prop_assert!(err <= 2.0 * am, "element {i}");
                }
            }
        }
        if n % 2 == 1 {
            // The pad nibble is the code of a zero scaled as the last block: code 0 where that scale
            // is infinite (0 * inf is NaN), else the code nearest zero.
            let last = absmax[absmax.len() - 1];
            prop_assert_eq!(nibble(&codes, n), if (1.0f32 / last).is_infinite() { 0 } else { zero_code(&code) });
        }
    }

    #[test]
    fn four_bit_first_element_is_the_high_nibble(
        (bs, n) in block_and_len(),
        bits in prop::collection::vec(any::<u32>(), 2..2000),
        dt in dtype(),
        qt in quant_type(),
    ) {
        let n = n.min(bits.len()) & !1;
        prop_assume!(n >= 2);
        let bytes = from_bits(&bits[..n], dt, true);
        let size = dt.size();
        let mut swapped = bytes.clone();
        for pair in swapped.chunks_exact_mut(2 * size) {
            let (a, b) = pair.split_at_mut(size);
            a.swap_with_slice(b);
        }
        for kernel in [Kernel::Scalar, Kernel::Auto] {
            let x = FloatSlice::new(dt, &bytes).unwrap();
            let y = FloatSlice::new(dt, &swapped).unwrap();
            let (cx, ax) = quantize_4bit(x, qt, bs, kernel).unwrap();
            let (cy, ay) = quantize_4bit(y, qt, bs, kernel).unwrap();
            prop_assert_eq!(ax, ay); // a swap inside a pair stays inside its block
            for (p, q) in cx.iter().zip(&cy) {
                prop_assert_eq!(*p, q.rotate_left(4));
            }
            // +absmax then -absmax: the code of 1.0 in the high nibble, of -1.0 in the low one.
            let code = qt.code();
            let top = (0..16).max_by(|&a, &b| code[a].total_cmp(&code[b])).unwrap() as u8;
            let bottom = (0..16).min_by(|&a, &b| code[a].total_cmp(&code[b])).unwrap() as u8;
            let v = x.get(0).abs().max(1.0).min(2f32.powi(126)); // above, both would be the code of 0
            let pair: Vec<u8> = [v, -v].iter().flat_map(|f| f.to_le_bytes()).collect();
            let (c, _) = quantize_4bit(FloatSlice::F32(&pair), qt, bs, kernel).unwrap();
            prop_assert_eq!(c[0], (top << 4) | bottom);
        }
    }

    #[test]
    fn four_bit_non_finite_is_reported_at_the_same_index_by_every_kernel(
        (bs, n) in block_and_len(),
        bits in prop::collection::vec(any::<u32>(), 1..3000),
        dt in dtype(),
        qt in quant_type(),
    ) {
        let n = n.min(bits.len());
        let bytes = from_bits(&bits[..n], dt, false);
        let x = FloatSlice::new(dt, &bytes).unwrap();
        let scalar = quantize_4bit(x, qt, bs, Kernel::Scalar);
        let simd = quantize_4bit(x, qt, bs, Kernel::Auto);
        prop_assert_eq!(format!("{simd:?}"), format!("{scalar:?}"));
        let first_bad = (0..n).find(|&i| !x.get(i).is_finite());
        match (first_bad, scalar) {
            (None, r) => prop_assert!(r.is_ok()),
            (Some(i), Err(fastq::Error::NonFinite { index, .. })) => prop_assert_eq!(index, i),
            (Some(i), other) => prop_assert!(false, "element {i} is not finite: {other:?}"),
        }
    }

    #[test]
    fn int8_codes_scales_round_trip_and_simd_equal_scalar(
        rows in 1usize..6,
        cols in 1usize..400,
        vals in prop::collection::vec((any::<i16>(), -40i32..17), 1..64),
        zero_row in any::<bool>(),
        poison in prop::option::weighted(0.2, (any::<usize>(), prop_oneof![
            Just(f32::NAN), Just(f32::INFINITY), Just(-1e6f32), Just(65520.0f32)
        ])),
        dt in dtype(),
    ) {
        // Magnitudes from 2^-40 (below float16's subnormals) to 2^16 (past its largest value), a row
        // of zeros, and now and then one value float16 cannot hold.
        let n = rows * cols;
        let mut v: Vec<f32> = (0..n)
            .map(|i| {
                let (m, e) = vals[i % vals.len()];
                m as f32 / 32768.0 * 2f32.powi(e - (i / cols) as i32)
            })
            .collect();
        if zero_row {
            v[..cols].fill(0.0);
        }
        if let Some((at, bad)) = poison {
            v[at % n] = bad;
        }
        let bytes = encode(&v, dt);
        let x = FloatSlice::new(dt, &bytes).unwrap();
        let scalar = quantize_int8(x, rows, cols, Kernel::Scalar);
        let simd = quantize_int8(x, rows, cols, Kernel::Auto);
        prop_assert_eq!(format!("{simd:?}"), format!("{scalar:?}"));
        // LLM.int8 casts to float16 first: a value that is not finite there is an error at its index.
        let w16 = |i: usize| half::f16::from_f32(x.get(i)).to_f32();
        let first_bad = (0..n).find(|&i| !w16(i).is_finite());
        let (cb, scb) = match (first_bad, scalar) {
            (None, Ok(r)) => r,
            (Some(i), Err(fastq::Error::NonFinite { index, .. })) => {
                prop_assert_eq!(index, i);
                return Ok(());
            }
            (bad, r) => return Err(TestCaseError::fail(format!("{bad:?}: {r:?}"))),
        };
        for (r, &s) in scb.iter().enumerate() {
            let row = r * cols..(r + 1) * cols;
            let max = row.clone().map(|i| w16(i).abs()).fold(0.0f32, f32::max);
            prop_assert_eq!(s, max);
            for i in row {
                prop_assert!((-127..=127).contains(&cb[i]), "code {}", cb[i]);
                let err = (w16(i) - cb[i] as f32 * max / 127.0).abs();
                prop_assert!(err <= max / 127.0 * (0.5 + 1e-5), "row {r} element {i}: {err} (SCB {max})");
            }
        }
    }

    #[test]
    fn nested_statistics_round_trip_within_half_a_map_gap(
        absmax in prop::collection::vec(1e-6f32..1e3, 1..1200),
    ) {
        let nested = quantize_nested(&absmax);
        let map = dynamic_map();
        prop_assert_eq!(nested.codes.len(), absmax.len());
        prop_assert_eq!(nested.absmax.len(), absmax.len().div_ceil(NESTED_BLOCKSIZE));
        let tol = half_gap(&map) + 1e-6;
        for (i, &a) in absmax.iter().enumerate() {
            let nabs = nested.absmax[i / NESTED_BLOCKSIZE];
            let back = map[nested.codes[i] as usize] * nabs + nested.offset;
            let ulps = 4.0 * f32::EPSILON * a.abs().max(nested.offset.abs());
            prop_assert!((back - a).abs() <= nabs * tol + ulps, "{i}: {back} vs {a} (block absmax {nabs})");
        }
    }
}
