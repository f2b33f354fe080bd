//! One job of the contract between the caller and the core: which checkpoint tensor to quantize, how,
//! and in what dtype its packed bytes are stored. The pipeline (`pipeline.rs`) runs jobs for a load,
//! the writer (`writer/`) for a conversion; the binding builds them from `fastq._fastq.Job`.

use crate::cast::Cast;
use crate::checkpoint::Checkpoint;
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::pack::{quantize_source, quantize_tensor, Packed, QuantSpec};
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
}

impl Job {
    /// A job without transposition or cast, stored as U8.
    pub fn new(name: impl Into<String>, spec: QuantSpec) -> Self {
        Job {
            name: name.into(),
            spec,
            transpose: false,
            cast: None,
            storage: Dtype::U8,
        }
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
    if !job.transpose {
        // Positioned reads, chunk by chunk: see `TensorReader`.
        let reader = ckpt.reader(t)?;
        return match job.cast {
            Some(to) => quantize_source(
                &Cast { inner: reader, to },
                &t.shape,
                dtype,
                job.spec,
                kernel,
            ),
            None => quantize_source(&reader, &t.shape, dtype, job.spec, kernel),
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
