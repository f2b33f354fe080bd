//! Float casts as torch performs them (`tensor.to(dtype)`), for tensors whose output dtype is not the
//! checkpoint's: unquantized tensors saved in the model's dtype, and weights transformers casts to the
//! model's dtype before quantizing them (so their codes and `quant_state` dtype are the cast's).
//!
//! f16 and bf16 widen to f32 exactly; f32 narrows with round-to-nearest-even; f16 <-> bf16 goes
//! through f32 (c10/util/BFloat16.h `round_to_nearest_even`, c10/util/Half.h
//! `fp16_ieee_from_fp32_value`). NaN becomes torch's canonical NaN of the target type.

use std::cell::RefCell;

use crate::dtype::{Dtype, FloatSlice};
use crate::error::Result;
use crate::pack::ChunkSource;

/// f32 -> bf16 bits, as torch rounds (NaN -> 0x7FC0).
#[inline]
pub fn f32_to_bf16(x: f32) -> u16 {
    if x.is_nan() {
        return 0x7FC0;
    }
    let bits = x.to_bits();
    let rounding_bias = 0x7FFF + ((bits >> 16) & 1);
    ((bits + rounding_bias) >> 16) as u16
}

/// f32 -> f16 bits, as torch rounds (NaN -> sign | 0x7E00).
#[inline]
pub fn f32_to_f16(x: f32) -> u16 {
    if x.is_nan() {
        return ((x.to_bits() >> 16) & 0x8000) as u16 | 0x7E00;
    }
    half::f16::from_f32(x).to_bits()
}

/// Appends the elements of `x` converted to `to` (a float dtype) to `out`, little-endian.
pub fn cast_into(x: FloatSlice, to: Dtype, out: &mut Vec<u8>) {
    let n = x.len();
    out.reserve(n * to.size());
    const STEP: usize = 4096;
    let mut tmp = [0f32; STEP];
    let mut i = 0;
    while i < n {
        let m = STEP.min(n - i);
        x.widen_into(i, &mut tmp[..m]);
        match to {
            Dtype::F32 => tmp[..m]
                .iter()
                .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
            Dtype::BF16 => tmp[..m]
                .iter()
                .for_each(|&v| out.extend_from_slice(&f32_to_bf16(v).to_le_bytes())),
            Dtype::F16 => tmp[..m]
                .iter()
                .for_each(|&v| out.extend_from_slice(&f32_to_f16(v).to_le_bytes())),
            other => panic!("cast to {other} is not a float cast (checked by the layout)"),
        }
        i += m;
    }
}

thread_local! {
    static CAST_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// A `ChunkSource` that casts another's chunks to `to` before handing them on, so that a weight is
/// quantized from the values transformers quantizes (the cast happens chunk by chunk, in cache).
pub struct Cast<S> {
    /// The source whose chunks are cast.
    pub inner: S,
    /// The float dtype (F32, F16 or BF16) the chunks are cast to.
    pub to: Dtype,
}

impl<S: ChunkSource> ChunkSource for Cast<S> {
    fn len(&self) -> usize {
        self.inner.len()
    }

    fn with_chunk<R>(
        &self,
        start: usize,
        end: usize,
        f: impl FnOnce(FloatSlice) -> Result<R>,
    ) -> Result<R> {
        self.inner.with_chunk(start, end, |x| {
            CAST_BUF.with(|cell| {
                let mut buf = cell.borrow_mut();
                buf.clear();
                cast_into(x, self.to, &mut buf);
                f(FloatSlice::new(self.to, &buf).expect("cast targets are float dtypes"))
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounds_to_nearest_even() {
        // 1 + 2^-8 is halfway between two bf16 values: ties go to the even one (1.0).
        assert_eq!(f32_to_bf16(1.0 + 1.0 / 256.0), 0x3F80);
        // 1 + 3 * 2^-8 is halfway too: the even neighbour is above.
        assert_eq!(f32_to_bf16(1.0 + 3.0 / 256.0), 0x3F82);
        assert_eq!(f32_to_bf16(f32::NAN), 0x7FC0);
        assert_eq!(f32_to_bf16(-0.0), 0x8000);
        assert_eq!(f32_to_bf16(f32::MAX), 0x7F80); // rounds up to inf, as torch does
    }

    #[test]
    fn f16_matches_half_and_canonical_nan() {
        assert_eq!(f32_to_f16(1.0), 0x3C00);
        assert_eq!(f32_to_f16(65520.0), 0x7C00);
        assert_eq!(f32_to_f16(-f32::NAN), 0xFE00);
        assert_eq!(f32_to_f16(f32::NAN), 0x7E00);
    }

    #[test]
    fn cast_source_hands_on_cast_chunks() {
        let vals: Vec<u8> = [1.0f32, 1.0 + 1.0 / 256.0, -3.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let src = FloatSlice::new(Dtype::F32, &vals).unwrap();
        let cast = Cast {
            inner: src,
            to: Dtype::BF16,
        };
        let got = cast
            .with_chunk(1, 3, |x| {
                Ok((0..x.len()).map(|i| x.get(i)).collect::<Vec<_>>())
            })
            .unwrap();
        assert_eq!(got, vec![1.0, -3.0]);
    }
}
