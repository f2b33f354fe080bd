//! safetensors dtypes and the conversion of the three float formats to f32.

use std::fmt;

/// A safetensors dtype. Only F32, F16 and BF16 are read as numbers; the others pass through as bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dtype {
    /// Boolean, one byte (`BOOL`).
    Bool,
    /// Unsigned 8-bit integer.
    U8,
    /// Signed 8-bit integer.
    I8,
    /// 8-bit float, 4 exponent and 3 mantissa bits (`F8_E4M3`).
    F8E4M3,
    /// 8-bit float, 5 exponent and 2 mantissa bits (`F8_E5M2`).
    F8E5M2,
    /// Signed 16-bit integer.
    I16,
    /// Unsigned 16-bit integer.
    U16,
    /// 16-bit IEEE float (half).
    F16,
    /// 16-bit bfloat16 (the top half of an f32).
    BF16,
    /// Signed 32-bit integer.
    I32,
    /// Unsigned 32-bit integer.
    U32,
    /// 32-bit IEEE float.
    F32,
    /// Signed 64-bit integer.
    I64,
    /// Unsigned 64-bit integer.
    U64,
    /// 64-bit IEEE float.
    F64,
}

impl Dtype {
    /// Parses the dtype string of a safetensors header.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "BOOL" => Dtype::Bool,
            "U8" => Dtype::U8,
            "I8" => Dtype::I8,
            "F8_E4M3" => Dtype::F8E4M3,
            "F8_E5M2" => Dtype::F8E5M2,
            "I16" => Dtype::I16,
            "U16" => Dtype::U16,
            "F16" => Dtype::F16,
            "BF16" => Dtype::BF16,
            "I32" => Dtype::I32,
            "U32" => Dtype::U32,
            "F32" => Dtype::F32,
            "I64" => Dtype::I64,
            "U64" => Dtype::U64,
            "F64" => Dtype::F64,
            _ => return None,
        })
    }

    /// The string safetensors writes for this dtype.
    pub fn as_str(self) -> &'static str {
        match self {
            Dtype::Bool => "BOOL",
            Dtype::U8 => "U8",
            Dtype::I8 => "I8",
            Dtype::F8E4M3 => "F8_E4M3",
            Dtype::F8E5M2 => "F8_E5M2",
            Dtype::I16 => "I16",
            Dtype::U16 => "U16",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::I32 => "I32",
            Dtype::U32 => "U32",
            Dtype::F32 => "F32",
            Dtype::I64 => "I64",
            Dtype::U64 => "U64",
            Dtype::F64 => "F64",
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::Bool | Dtype::U8 | Dtype::I8 | Dtype::F8E4M3 | Dtype::F8E5M2 => 1,
            Dtype::I16 | Dtype::U16 | Dtype::F16 | Dtype::BF16 => 2,
            Dtype::I32 | Dtype::U32 | Dtype::F32 => 4,
            Dtype::I64 | Dtype::U64 | Dtype::F64 => 8,
        }
    }

    /// Bytes of a tensor of this dtype and `shape`; None when the count overflows `usize`.
    pub fn nbytes(self, shape: &[usize]) -> Option<usize> {
        numel(shape)?.checked_mul(self.size())
    }

    /// Whether the quantizers can read this dtype.
    pub fn is_float_input(self) -> bool {
        matches!(self, Dtype::F32 | Dtype::F16 | Dtype::BF16)
    }
}

/// Elements of a tensor of `shape`; None when the product overflows `usize`. Every size the core
/// derives from a shape it was handed (a header, a caller) goes through this or `Dtype::nbytes`, so that
/// a lying shape is an error instead of a wrapped count (a slice of the wrong bytes) or a panic.
pub fn numel(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A borrowed run of float elements in one of the three input formats, little-endian as on disk.
#[derive(Clone, Copy, Debug)]
pub enum FloatSlice<'a> {
    /// 32-bit IEEE floats, 4 bytes each.
    F32(&'a [u8]),
    /// 16-bit IEEE floats, 2 bytes each.
    F16(&'a [u8]),
    /// bfloat16s, 2 bytes each.
    BF16(&'a [u8]),
}

impl<'a> FloatSlice<'a> {
    /// Views `bytes` as elements of `dtype`; None for dtypes the quantizers do not read.
    pub fn new(dtype: Dtype, bytes: &'a [u8]) -> Option<Self> {
        match dtype {
            Dtype::F32 => Some(FloatSlice::F32(bytes)),
            Dtype::F16 => Some(FloatSlice::F16(bytes)),
            Dtype::BF16 => Some(FloatSlice::BF16(bytes)),
            _ => None,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            FloatSlice::F32(b) => b.len() / 4,
            FloatSlice::F16(b) | FloatSlice::BF16(b) => b.len() / 2,
        }
    }

    /// True when there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Elements `start..end` as a new slice.
    pub fn slice(&self, start: usize, end: usize) -> Self {
        match self {
            FloatSlice::F32(b) => FloatSlice::F32(&b[start * 4..end * 4]),
            FloatSlice::F16(b) => FloatSlice::F16(&b[start * 2..end * 2]),
            FloatSlice::BF16(b) => FloatSlice::BF16(&b[start * 2..end * 2]),
        }
    }

    /// Element `i` widened to f32 (exact for all three formats).
    #[inline(always)]
    pub fn get(&self, i: usize) -> f32 {
        match self {
            FloatSlice::F32(b) => {
                f32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]])
            }
            FloatSlice::F16(b) => {
                half::f16::from_bits(u16::from_le_bytes([b[2 * i], b[2 * i + 1]])).to_f32()
            }
            FloatSlice::BF16(b) => {
                f32::from_bits((u16::from_le_bytes([b[2 * i], b[2 * i + 1]]) as u32) << 16)
            }
        }
    }

    /// Widens elements `start..start+out.len()` into `out`.
    pub fn widen_into(&self, start: usize, out: &mut [f32]) {
        match self {
            FloatSlice::F32(b) => {
                for (o, c) in out.iter_mut().zip(b[start * 4..].chunks_exact(4)) {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            FloatSlice::F16(b) => {
                let src = &b[start * 2..start * 2 + out.len() * 2];
                let bits: Vec<u16> = src
                    .chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]]))
                    .collect();
                half::slice::HalfFloatSliceExt::convert_to_f32_slice(
                    half::slice::HalfBitsSliceExt::reinterpret_cast::<half::f16>(&bits[..]),
                    out,
                );
            }
            FloatSlice::BF16(b) => {
                for (o, c) in out.iter_mut().zip(b[start * 2..].chunks_exact(2)) {
                    *o = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
                }
            }
        }
    }
}
