//! Quantization results as frozen Python objects whose attributes are bitsandbytes' `QuantState`
//! fields: `Packed4bit` (codes, absmax or nested statistics) and `PackedInt8` (`CB`, `SCB`). The core's
//! vectors move into `Buffer`s, which torch wraps without a copy (`fastq/results.py`).

use fastq::Packed;
use pyo3::prelude::*;

use crate::buffer::Buffer;

/// A 4-bit result: the packed codes and the statistics `QuantState` holds.
#[pyclass(module = "fastq._fastq", frozen, get_all)]
pub struct Packed4bit {
    /// "nf4" or "fp4".
    quant_type: &'static str,
    /// Elements per absmax block.
    blocksize: usize,
    /// The weight's shape.
    shape: Vec<usize>,
    /// The weight's dtype as quantized ("BF16"): `QuantState.dtype`.
    dtype: &'static str,
    /// Two codes per byte, first element in the high nibble (`(n + 1) / 2` bytes).
    codes: Py<Buffer>,
    /// f32 per block without double quantization; None with it.
    absmax: Option<Py<Buffer>>,
    /// With double quantization: the u8 codes of the absmax (`QuantState.absmax`).
    nested_codes: Option<Py<Buffer>>,
    /// With double quantization: f32 per 256 nested codes (`state2.absmax`).
    nested_absmax: Option<Py<Buffer>>,
    /// With double quantization: the mean subtracted before nesting (`QuantState.offset`).
    offset: Option<f32>,
}

/// An LLM.int8 result: the int8 weight and its row scales.
#[pyclass(module = "fastq._fastq", frozen, get_all)]
pub struct PackedInt8 {
    /// The weight's shape `[rows, cols]`.
    shape: Vec<usize>,
    /// The int8 weight, row-major (`Int8Params.CB`).
    #[pyo3(name = "CB")]
    cb: Py<Buffer>,
    /// f32 absmax per row (`Int8Params.SCB`).
    #[pyo3(name = "SCB")]
    scb: Py<Buffer>,
}

#[pymethods]
impl Packed4bit {
    fn __repr__(&self) -> String {
        format!(
            "Packed4bit(quant_type='{}', blocksize={}, shape={:?}, dtype='{}', nested={})",
            self.quant_type,
            self.blocksize,
            self.shape,
            self.dtype,
            if self.nested_codes.is_some() {
                "True"
            } else {
                "False"
            }
        )
    }
}

#[pymethods]
impl PackedInt8 {
    fn __repr__(&self) -> String {
        format!("PackedInt8(shape={:?})", self.shape)
    }
}

/// Moves a core result into its Python object.
pub fn to_py(py: Python<'_>, p: Packed) -> PyResult<PyObject> {
    let buf = |b: Buffer| Py::new(py, b);
    Ok(match p {
        Packed::FourBit(p) => {
            let (absmax, nested_codes, nested_absmax, offset) = match p.nested {
                Some(n) => (
                    None,
                    Some(buf(Buffer::from_bytes(n.codes))?),
                    Some(buf(Buffer::from_f32(n.absmax))?),
                    Some(n.offset),
                ),
                None => (Some(buf(Buffer::from_f32(p.absmax))?), None, None, None),
            };
            let r = Packed4bit {
                quant_type: p.quant_type.as_str(),
                blocksize: p.blocksize,
                shape: p.shape,
                dtype: p.dtype.as_str(),
                codes: buf(Buffer::from_bytes(p.codes))?,
                absmax,
                nested_codes,
                nested_absmax,
                offset,
            };
            Py::new(py, r)?.into_any()
        }
        Packed::Int8(p) => {
            let r = PackedInt8 {
                shape: p.shape,
                cb: buf(Buffer::from_i8(p.cb))?,
                scb: buf(Buffer::from_f32(p.scb))?,
            };
            Py::new(py, r)?.into_any()
        }
    })
}
