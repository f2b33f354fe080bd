//! Quantizing one tensor handed over from Python as raw bytes (`fastq.ops` wraps these).

use fastq::dtype::{Dtype, FloatSlice};
use fastq::pack::quantize_tensor;
use fastq::quant::{self, Kernel, QuantType};
use fastq::{Error, QuantSpec};
use pyo3::buffer::PyBuffer;
use pyo3::prelude::*;

use crate::buffer::Buffer;
use crate::errors::IntoPy;
use crate::job::parse_cast;
use crate::packed;

/// The dtype of a tensor handed over for quantization: F32, F16 or BF16.
fn parse_dtype(dtype: &str) -> PyResult<Dtype> {
    Ok(parse_cast(Some(dtype), "")?.expect("a dtype was given"))
}

fn kernel(reference: bool) -> Kernel {
    if reference {
        Kernel::Scalar
    } else {
        Kernel::Auto
    }
}

/// Runs `f` over the bytes of `data` with the GIL released, on a pool of `threads` threads.
fn with_bytes<T: Send>(
    py: Python<'_>,
    data: &PyBuffer<u8>,
    threads: Option<usize>,
    f: impl FnOnce(&[u8]) -> fastq::Result<T> + Send,
) -> PyResult<T> {
    if !data.is_c_contiguous() {
        return Err(Error::InvalidArgument(
            "the tensor's bytes must be contiguous".into(),
        ))
        .py_err();
    }
    let (ptr, len) = (data.buf_ptr() as usize, data.len_bytes());
    let pool = fastq::pipeline::pool(threads).py_err()?;
    py.allow_threads(|| {
        // SAFETY: `data` holds the exporter's buffer (and so its memory) until this function returns;
        // the bytes are only read.
        let bytes = unsafe { std::slice::from_raw_parts(ptr as *const u8, len) };
        pool.install(|| f(bytes))
    })
    .py_err()
}

/// quantize_4bit(data, dtype, shape, quant_type="nf4", blocksize=64, double_quant=True, threads=None,
/// reference=False) -> Packed4bit
#[pyfunction]
#[pyo3(signature = (data, dtype, shape, quant_type="nf4", blocksize=64, double_quant=true, threads=None, reference=false))]
#[allow(clippy::too_many_arguments)]
pub fn quantize_4bit<'py>(
    py: Python<'py>,
    data: PyBuffer<u8>,
    dtype: &str,
    shape: Vec<usize>,
    quant_type: &str,
    blocksize: usize,
    double_quant: bool,
    threads: Option<usize>,
    reference: bool,
) -> PyResult<PyObject> {
    let dt = parse_dtype(dtype)?;
    let spec = QuantSpec::FourBit {
        quant_type: QuantType::parse(quant_type).py_err()?,
        blocksize,
        double_quant,
    };
    let packed = with_bytes(py, &data, threads, |b| {
        let x = FloatSlice::new(dt, b).expect("float dtype");
        check_len(&x, &shape)?;
        quantize_tensor(x, &shape, dt, spec, kernel(reference))
    })?;
    packed::to_py(py, packed)
}

/// quantize_int8(data, dtype, shape, threads=None, reference=False) -> Packed4bit with CB and SCB
#[pyfunction]
#[pyo3(signature = (data, dtype, shape, threads=None, reference=false))]
pub fn quantize_int8<'py>(
    py: Python<'py>,
    data: PyBuffer<u8>,
    dtype: &str,
    shape: Vec<usize>,
    threads: Option<usize>,
    reference: bool,
) -> PyResult<PyObject> {
    let dt = parse_dtype(dtype)?;
    let packed = with_bytes(py, &data, threads, |b| {
        let x = FloatSlice::new(dt, b).expect("float dtype");
        check_len(&x, &shape)?;
        quantize_tensor(x, &shape, dt, QuantSpec::Int8, kernel(reference))
    })?;
    packed::to_py(py, packed)
}

fn check_len(x: &FloatSlice, shape: &[usize]) -> fastq::Result<()> {
    let n = fastq::dtype::numel(shape);
    if n != Some(x.len()) {
        let n = n.map_or("more than 2^64".into(), |n| n.to_string());
        return Err(Error::BadShape {
            path: Default::default(),
            tensor: String::new(),
            reason: format!(
                "shape {shape:?} needs {n} elements, the buffer holds {}",
                x.len()
            ),
        });
    }
    Ok(())
}

/// The kernel the fast path runs on this CPU ("avx512", "avx2" or "scalar"; `FASTQ_DISABLE_AVX512=1`
/// forces AVX2 on an AVX-512 machine).
#[pyfunction]
pub fn kernel_name() -> &'static str {
    quant::kernel_name()
}

/// Worker threads a run uses for `threads` (the argument, else FASTQ_NUM_THREADS, else all cores).
#[pyfunction]
#[pyo3(signature = (threads=None))]
pub fn thread_count(threads: Option<usize>) -> usize {
    fastq::pipeline::thread_count(threads)
}

/// The nested 8-bit map (`create_dynamic_map(signed=True)`), 256 floats.
#[pyfunction]
pub fn dynamic_map() -> Vec<f32> {
    quant::dynamic_map().to_vec()
}

/// The 16 code values of "nf4" or "fp4" (`get_4bit_type`).
#[pyfunction]
pub fn code_4bit(quant_type: &str) -> PyResult<Vec<f32>> {
    Ok(QuantType::parse(quant_type).py_err()?.code().to_vec())
}

/// Little-endian float32 values of `b` (a trailing partial value is dropped).
fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// The nested 8-bit step alone (CUDA rounding): float32 bytes in, (codes, absmax per 256) out.
#[pyfunction]
pub fn quantize_nested_blockwise(py: Python<'_>, data: PyBuffer<u8>) -> PyResult<(Buffer, Buffer)> {
    let (codes, absmax) = with_bytes(py, &data, Some(1), |b| {
        Ok(quant::double::quantize_blockwise_dynamic(&f32s(b)))
    })?;
    Ok((Buffer::from_bytes(codes), Buffer::from_f32(absmax)))
}

/// `quantize_nested(absmax, threads=None) -> (codes, absmax2, offset)`: bitsandbytes' double
/// quantization of one 4-bit tensor's float32 absmax (`compress_statistics=True`): the mean offset
/// (summed as torch sums it on an H100/H200: `quant::cuda_mean`), then 8-bit codes per block against
/// the signed dynamic map with one float32 absmax per 256 codes, rounded as the CUDA kernel does (the
/// statistics the whole-tensor path writes, byte for byte).
#[pyfunction]
#[pyo3(signature = (absmax, threads=None))]
pub fn quantize_nested(
    py: Python<'_>,
    absmax: PyBuffer<u8>,
    threads: Option<usize>,
) -> PyResult<(Buffer, Buffer, f32)> {
    if !absmax.len_bytes().is_multiple_of(4) {
        return Err(Error::InvalidArgument(format!(
            "the absmax must be float32 bytes; {} bytes is not a multiple of 4",
            absmax.len_bytes()
        )))
        .py_err();
    }
    let nested = with_bytes(py, &absmax, threads, |b| {
        Ok(quant::double::quantize_nested(&f32s(b)))
    })?;
    Ok((
        Buffer::from_bytes(nested.codes),
        Buffer::from_f32(nested.absmax),
        nested.offset,
    ))
}
