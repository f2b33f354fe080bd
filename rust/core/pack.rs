//! The packed tensors the quantizers produce. Field names follow bitsandbytes' `QuantState` so the
//! binding can hand each buffer to Python under the name bitsandbytes expects.

use rayon::prelude::*;

use crate::dtype::{Dtype, FloatSlice};
use crate::error::{Error, Result};
use crate::quant::double::{quantize_nested, Nested};
use crate::quant::fourbit::{check_blocksize, quantize_4bit_into, Out4};
use crate::quant::int8::quantize_int8_into;
use crate::quant::{Kernel, QuantType};

/// What to turn a tensor into.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuantSpec {
    /// 4-bit blockwise (`Linear4bit`); `double_quant` is bitsandbytes' `compress_statistics`.
    FourBit {
        /// NF4 or FP4 (`bnb_4bit_quant_type`).
        quant_type: QuantType,
        /// Elements per absmax block (one of bitsandbytes' `BLOCKSIZES`).
        blocksize: usize,
        /// Quantize the absmax statistics too (`bnb_4bit_use_double_quant`).
        double_quant: bool,
    },
    /// LLM.int8 row-wise (`Linear8bitLt`).
    Int8,
}

impl QuantSpec {
    /// Checks the arguments bitsandbytes would reject.
    pub fn validate(&self) -> Result<()> {
        match self {
            QuantSpec::FourBit { blocksize, .. } => check_blocksize(*blocksize),
            QuantSpec::Int8 => Ok(()),
        }
    }
}

/// A 4-bit tensor: bitsandbytes' packed weight plus the fields of its `QuantState`.
#[derive(Clone, Debug)]
pub struct Packed4 {
    /// Two codes a byte, first element in the high nibble; (n + 1) / 2 bytes.
    pub codes: Vec<u8>,
    /// One f32 absmax per block (empty when `nested` holds the statistics).
    pub absmax: Vec<f32>,
    /// The double-quantized statistics, when double quantization is on.
    pub nested: Option<Nested>,
    /// `QuantState.quant_type`: NF4 or FP4.
    pub quant_type: QuantType,
    /// `QuantState.blocksize`: elements per absmax block.
    pub blocksize: usize,
    /// The original shape and dtype (the dtype the weight is dequantized back to).
    pub shape: Vec<usize>,
    /// `QuantState.dtype`: the dtype the weight is dequantized back to.
    pub dtype: Dtype,
}

/// An LLM.int8 tensor: the int8 weight (CB) and its per-row scale (SCB).
#[derive(Clone, Debug)]
pub struct PackedInt8 {
    /// `CB`: the row-major int8 weight, round(w * 127 / SCB) per row.
    pub cb: Vec<i8>,
    /// `SCB`: max |w| of each row (0 for an all-zero row).
    pub scb: Vec<f32>,
    /// The weight's 2-D shape, `[rows, cols]`.
    pub shape: Vec<usize>,
}

/// Either kind of packed tensor.
#[derive(Clone, Debug)]
pub enum Packed {
    /// A 4-bit (NF4/FP4) tensor.
    FourBit(Packed4),
    /// An LLM.int8 tensor.
    Int8(PackedInt8),
}

impl Packed {
    /// Bytes held by the packed buffers.
    pub fn nbytes(&self) -> usize {
        match self {
            Packed::FourBit(p) => {
                p.codes.len()
                    + p.absmax.len() * 4
                    + p.nested
                        .as_ref()
                        .map_or(0, |n| n.codes.len() + n.absmax.len() * 4 + 4)
            }
            Packed::Int8(p) => p.cb.len() + p.scb.len() * 4,
        }
    }
}

/// Elements per parallel chunk of one tensor (a multiple of every blocksize).
const CHUNK: usize = 1 << 18;

/// Outputs of this many bytes or more get transparent huge pages (`fresh_output`).
const HUGE_OUTPUT: usize = 4 << 20;

/// A zeroed output of `n` elements. From `HUGE_OUTPUT` bytes on, its pages are advised to the kernel as
/// transparent huge pages before anything writes them (`MADV_HUGEPAGE`, where the system allows it):
/// a fresh 45 MB int8 output took 11k first-touch faults of 4 KiB, about 70% of its quantization's CPU
/// time (BENCHMARKS.md, "Where the time goes"). Only the whole 2 MiB pages inside the buffer are
/// advised; a refusal (huge pages off) changes nothing.
fn fresh_output<T: Copy + Default>(n: usize) -> Vec<T> {
    let mut v = vec![T::default(); n];
    #[cfg(target_os = "linux")]
    {
        let (at, bytes) = (v.as_mut_ptr() as usize, std::mem::size_of_val(v.as_slice()));
        const HUGE: usize = 2 << 20;
        let (start, end) = ((at + HUGE - 1) & !(HUGE - 1), (at + bytes) & !(HUGE - 1));
        if bytes >= HUGE_OUTPUT && end > start {
            // SAFETY: [start, end) lies inside the vector's allocation; the advice changes no contents.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
        }
    }
    v
}

/// Where a quantizer reads its input from, one chunk at a time: a slice already in memory, or a file
/// read with `pread` into a small per-thread buffer (no page faults, no resident mapping, and the
/// chunk is still in cache when it is quantized).
pub trait ChunkSource: Sync {
    /// Number of elements.
    fn len(&self) -> usize;
    /// True when there are no elements.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Calls `f` with elements `start..end`.
    fn with_chunk<R>(
        &self,
        start: usize,
        end: usize,
        f: impl FnOnce(FloatSlice) -> Result<R>,
    ) -> Result<R>;
}

impl ChunkSource for FloatSlice<'_> {
    fn len(&self) -> usize {
        FloatSlice::len(self)
    }
    fn with_chunk<R>(
        &self,
        start: usize,
        end: usize,
        f: impl FnOnce(FloatSlice) -> Result<R>,
    ) -> Result<R> {
        f(self.slice(start, end))
    }
}

/// Elements `range` of another source, as a source of their own (a range job, `Job::range`): chunk
/// `a..b` of the window is chunk `start + a..start + b` of the source, read as the source reads it.
pub struct Window<S> {
    inner: S,
    start: usize,
    len: usize,
}

impl<S: ChunkSource> Window<S> {
    /// The window; `range` must lie inside the source (`BadRange` without file or tensor otherwise:
    /// callers add them with `Error::at`).
    pub fn new(inner: S, range: std::ops::Range<usize>) -> Result<Self> {
        if range.start > range.end || range.end > inner.len() {
            return Err(Error::BadRange {
                path: Default::default(),
                tensor: String::new(),
                start: range.start,
                end: range.end,
                reason: format!("the range is outside the tensor's {} elements", inner.len()),
            });
        }
        Ok(Window {
            inner,
            start: range.start,
            len: range.len(),
        })
    }
}

impl<S: ChunkSource> ChunkSource for Window<S> {
    fn len(&self) -> usize {
        self.len
    }

    fn with_chunk<R>(
        &self,
        start: usize,
        end: usize,
        f: impl FnOnce(FloatSlice) -> Result<R>,
    ) -> Result<R> {
        let shifted = (start <= end && end <= self.len)
            .then(|| Some((self.start.checked_add(start)?, self.start.checked_add(end)?)))
            .flatten();
        let Some((a, b)) = shifted else {
            return Err(Error::Internal(format!(
                "chunk {start}..{end} is outside a window of {} elements",
                self.len
            )));
        };
        self.inner.with_chunk(a, b, f)
    }
}

/// Quantizes one tensor, splitting it across the current rayon pool when it is large. Errors carry
/// no file or tensor name; callers add them with `Error::at`.
pub fn quantize_tensor(
    x: FloatSlice,
    shape: &[usize],
    dtype: Dtype,
    spec: QuantSpec,
    kernel: Kernel,
) -> Result<Packed> {
    quantize_source(&x, shape, dtype, spec, kernel)
}

/// `quantize_tensor` over any `ChunkSource`.
pub fn quantize_source<S: ChunkSource>(
    x: &S,
    shape: &[usize],
    dtype: Dtype,
    spec: QuantSpec,
    kernel: Kernel,
) -> Result<Packed> {
    spec.validate()?;
    let n = x.len();
    // The output buffers are sized from `n` and `shape`: they must agree (checked, so that a shape
    // whose product wraps cannot pass for the input's length).
    if crate::dtype::numel(shape) != Some(n) {
        return Err(bad_shape(format!(
            "shape {shape:?} does not hold the {n} elements given"
        )));
    }
    if n == 0 {
        return Err(bad_shape("cannot quantize an empty tensor".into()));
    }
    match spec {
        QuantSpec::FourBit {
            quant_type,
            blocksize,
            double_quant,
        } => {
            let mut codes = fresh_output::<u8>(n.div_ceil(2));
            let mut absmax = vec![0f32; n.div_ceil(blocksize)];
            codes
                .par_chunks_mut(CHUNK / 2)
                .zip(absmax.par_chunks_mut(CHUNK / blocksize))
                .enumerate()
                .try_for_each(|(c, (codes, absmax))| {
                    let start = c * CHUNK;
                    let end = (start + CHUNK).min(n);
                    x.with_chunk(start, end, |chunk| {
                        quantize_4bit_into(
                            chunk,
                            quant_type,
                            blocksize,
                            kernel,
                            Out4 { codes, absmax },
                        )
                    })
                    .map_err(|e| e.offset_index(start))
                })?;
            let nested = double_quant.then(|| quantize_nested(&absmax));
            if nested.is_some() {
                absmax = Vec::new();
            }
            Ok(Packed::FourBit(Packed4 {
                codes,
                absmax,
                nested,
                quant_type,
                blocksize,
                shape: shape.to_vec(),
                dtype,
            }))
        }
        QuantSpec::Int8 => {
            if shape.len() != 2 {
                return Err(bad_shape(format!(
                    "int8 quantization needs a 2-D weight, got shape {shape:?}"
                )));
            }
            let (rows, cols) = (shape[0], shape[1]);
            let mut cb = fresh_output::<i8>(n);
            let mut scb = vec![0f32; rows];
            let rows_per = (CHUNK / cols.max(1)).max(1);
            cb.par_chunks_mut(rows_per * cols)
                .zip(scb.par_chunks_mut(rows_per))
                .enumerate()
                .try_for_each(|(c, (cb, scb))| {
                    let start = c * rows_per * cols;
                    x.with_chunk(start, start + cb.len(), |chunk| {
                        quantize_int8_into(chunk, cols, kernel, cb, scb)
                    })
                    .map_err(|e| e.offset_index(start))
                })?;
            Ok(Packed::Int8(PackedInt8 {
                cb,
                scb,
                shape: shape.to_vec(),
            }))
        }
    }
}

fn bad_shape(reason: String) -> Error {
    Error::BadShape {
        path: Default::default(),
        tensor: String::new(),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_outputs_are_zeroed_and_sized_on_either_side_of_the_huge_page_threshold() {
        for n in [
            1,
            4095,
            HUGE_OUTPUT - 1,
            HUGE_OUTPUT,
            HUGE_OUTPUT + 3,
            3 * HUGE_OUTPUT + 5,
        ] {
            let v = fresh_output::<i8>(n);
            assert_eq!(v.len(), n);
            assert!(v.iter().all(|&b| b == 0), "{n} bytes");
            let f = fresh_output::<f32>(n / 4 + 1);
            assert_eq!(f.len(), n / 4 + 1);
            assert!(f.iter().all(|&x| x.to_bits() == 0), "{n} bytes of f32");
        }
    }
}
