//! One job of the contract between the caller and the core: which checkpoint tensor to quantize, how,
//! and in what dtype its packed bytes are stored. The pipeline (`pipeline.rs`) runs jobs for a load,
//! the writer (`writer/`) for a conversion; the binding builds them from `fastq._fastq.Job`.

use std::ops::Range;

use crate::cast::Cast;
use crate::checkpoint::{Checkpoint, TensorInfo};
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::pack::{quantize_source, quantize_tensor, ChunkSource, Packed, QuantSpec, Window};
use crate::quant::Kernel;

/// One tensor to quantize.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Job {
    /// The checkpoint tensor.
    pub name: String,
    /// The format: 4-bit (type, blocksize, double quantization) or int8.
    pub spec: QuantSpec,
    /// Quantize the transpose of a 2-D weight (GPT-2's `Conv1D` stores `[in, out]`; bitsandbytes
    /// quantizes the `[out, in]` weight of the `Linear` that replaces it).
    pub transpose: bool,
    /// Cast to this float dtype before quantizing (transformers casts a weight to the model's dtype
    /// first); chunk by chunk, in cache.
    pub cast: Option<Dtype>,
    /// The dtype the packed 4-bit bytes are viewed as (`bnb_4bit_quant_storage`): the writer records it
    /// in the header; a load views the bytes in it. U8 for int8.
    pub storage: Dtype,
    /// Quantize only elements `start..end` of the flattened tensor (FSDP's share, python/fastq/shard.py:
    /// a rank's rows of the packed weight): `start` on a block boundary, `end` on one or at or past the
    /// tensor's end (clipped to it), so that the result is these blocks of the whole tensor's
    /// quantization. 4-bit without transposition or double quantization only (the caller
    /// double-quantizes the gathered full absmax). The result's shape is `[end - start]`.
    pub range: Option<Range<usize>>,
}

impl Job {
    /// A job without transposition, cast or range, stored as U8.
    pub fn new(name: impl Into<String>, spec: QuantSpec) -> Self {
        Job {
            name: name.into(),
            spec,
            transpose: false,
            cast: None,
            storage: Dtype::U8,
            range: None,
        }
    }

    /// Checks what can be checked without the tensor: the spec, and that a range is block-aligned and
    /// asked of a 4-bit job without transposition or double quantization (`BadRange` naming the
    /// tensor; `quantize_job` adds the file).
    pub fn validate(&self) -> Result<()> {
        self.spec.validate()?;
        let Some(r) = &self.range else { return Ok(()) };
        let bad = |reason: String| Err(self.bad_range(r, reason));
        let QuantSpec::FourBit {
            blocksize,
            double_quant,
            ..
        } = self.spec
        else {
            return bad("a range is for 4-bit jobs only, not int8".into());
        };
        if self.transpose {
            return bad("a range cannot be taken of a transposed weight".into());
        }
        if double_quant {
            return bad(
                "a range is quantized without double quantization (double_quant=False): \
                        double quantization needs the whole tensor's absmax"
                    .into(),
            );
        }
        if r.start >= r.end {
            return bad("the range is empty".into());
        }
        if !r.start.is_multiple_of(blocksize) {
            return bad(format!(
                "start is not on a {blocksize}-element block boundary"
            ));
        }
        Ok(())
    }

    /// The elements of `t` this job quantizes: all of them, or its range checked against the tensor
    /// (start inside it, end on a block boundary unless at or past the end, clipped).
    pub fn elements(&self, t: &TensorInfo) -> Result<Range<usize>> {
        let n = t.numel();
        let Some(r) = &self.range else {
            return Ok(0..n);
        };
        self.validate()?;
        let blocksize = match self.spec {
            QuantSpec::FourBit { blocksize, .. } => blocksize,
            QuantSpec::Int8 => unreachable!("validate refuses a range on int8"),
        };
        let bad = |reason: String| self.bad_range(r, reason);
        if r.start >= n {
            return Err(bad(format!(
                "the range starts outside the tensor's {n} elements"
            )));
        }
        if r.end < n && !r.end.is_multiple_of(blocksize) {
            return Err(bad(format!(
                "end is neither on a {blocksize}-element block boundary nor at the tensor's end ({n})"
            )));
        }
        Ok(r.start..r.end.min(n))
    }

    /// `BadRange` for range `r` of this job's tensor (`quantize_job` adds the file).
    fn bad_range(&self, r: &Range<usize>, reason: String) -> Error {
        Error::BadRange {
            path: Default::default(),
            tensor: self.name.clone(),
            start: r.start,
            end: r.end,
            reason,
        }
    }

    /// Input bytes the job reads from `t` (its range's, when it has one).
    pub fn input_bytes(&self, t: &TensorInfo) -> usize {
        self.elements(t).map_or(0, |r| r.len()) * t.dtype.size()
    }
}

/// Quantizes one job (errors name the file and the tensor).
pub fn quantize_job(ckpt: &Checkpoint, job: &Job, kernel: Kernel) -> Result<Packed> {
    let t = ckpt.info(&job.name)?;
    let path = ckpt.path_of(t);
    let at = |e: Error| e.at(path, &job.name);
    if let Some(to) = job.cast {
        if !to.is_float_input() {
            return Err(Error::InvalidArgument(format!(
                "cannot cast '{}' to {to}: F32, F16 or BF16 only",
                job.name
            )));
        }
    }
    let dtype = job.cast.unwrap_or(t.dtype);
    if job.range.is_some() || !job.transpose {
        // Positioned reads, chunk by chunk: see `TensorReader`; a range's elements through a window
        // over them, as a 1-D tensor (a range of a transposed weight is refused by `elements`).
        let reader = ckpt.reader(t)?;
        return match job.range {
            Some(_) => {
                let r = job.elements(t).map_err(at)?;
                let shape = [r.len()];
                quantize_cast(
                    Window::new(reader, r).map_err(at)?,
                    &shape,
                    dtype,
                    job,
                    kernel,
                )
            }
            None => quantize_cast(reader, &t.shape, dtype, job, kernel),
        }
        .map_err(at);
    }
    ckpt.floats(t)?; // checks the dtype
    if t.shape.len() != 2 {
        return Err(at(Error::BadShape {
            path: Default::default(),
            tensor: String::new(),
            reason: format!(
                "only a 2-D weight can be transposed, got shape {:?}",
                t.shape
            ),
        }));
    }
    let (rows, cols) = (t.shape[0], t.shape[1]);
    let bytes = transpose_bytes(ckpt.bytes(t), rows, cols, t.dtype.size());
    // The transpose read the mapping: were its bytes still the file's (see `guard`)?
    ckpt.check(t)?;
    let xt =
        crate::dtype::FloatSlice::new(t.dtype, &bytes).expect("float dtype checked by floats()");
    let shape = [cols, rows];
    match job.cast {
        Some(to) => quantize_source(&Cast { inner: xt, to }, &shape, dtype, job.spec, kernel),
        None => quantize_tensor(xt, &shape, dtype, job.spec, kernel),
    }
    .map_err(at)
}

/// `quantize_source` of `src`, cast chunk by chunk first when the job asks for it.
fn quantize_cast<S: ChunkSource>(
    src: S,
    shape: &[usize],
    dtype: Dtype,
    job: &Job,
    kernel: Kernel,
) -> Result<Packed> {
    match job.cast {
        Some(to) => quantize_source(&Cast { inner: src, to }, shape, dtype, job.spec, kernel),
        None => quantize_source(&src, shape, dtype, job.spec, kernel),
    }
}

/// Transposes a row-major `rows x cols` matrix of `elem`-byte elements, in cache-sized tiles.
pub fn transpose_bytes(src: &[u8], rows: usize, cols: usize, elem: usize) -> Vec<u8> {
    const TILE: usize = 32;
    let mut out = vec![0u8; src.len()];
    for r0 in (0..rows).step_by(TILE) {
        for c0 in (0..cols).step_by(TILE) {
            for r in r0..(r0 + TILE).min(rows) {
                for c in c0..(c0 + TILE).min(cols) {
                    let s = (r * cols + c) * elem;
                    let d = (c * rows + r) * elem;
                    out[d..d + elem].copy_from_slice(&src[s..s + elem]);
                }
            }
        }
    }
    out
}
