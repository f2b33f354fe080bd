//! Packed results as Python dicts of Buffers, keyed by bitsandbytes' QuantState field names.

use fastq::{Packed, QuantSpec, QuantType};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::buffer::Buffer;

/// Builds `{"kind": "4bit", "codes": Buffer, "absmax": Buffer | None, "nested_codes": ..., ...}` or
/// `{"kind": "int8", "CB": Buffer, "SCB": Buffer, "shape": [...]}`; the Vecs move into the Buffers.
pub fn to_dict(py: Python<'_>, p: Packed) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    match p {
        Packed::FourBit(p) => {
            d.set_item("kind", "4bit")?;
            d.set_item("quant_type", p.quant_type.as_str())?;
            d.set_item("blocksize", p.blocksize)?;
            d.set_item("shape", p.shape.clone())?;
            d.set_item("dtype", p.dtype.as_str())?;
            d.set_item("codes", Bound::new(py, Buffer::from_bytes(p.codes))?)?;
            match p.nested {
                Some(n) => {
                    d.set_item("absmax", py.None())?;
                    d.set_item("nested_codes", Bound::new(py, Buffer::from_bytes(n.codes))?)?;
                    d.set_item("nested_absmax", Bound::new(py, Buffer::from_f32(n.absmax))?)?;
                    d.set_item("offset", n.offset)?;
                }
                None => {
                    d.set_item("absmax", Bound::new(py, Buffer::from_f32(p.absmax))?)?;
                    d.set_item("nested_codes", py.None())?;
                }
            }
        }
        Packed::Int8(p) => {
            d.set_item("kind", "int8")?;
            d.set_item("shape", p.shape.clone())?;
            d.set_item("CB", Bound::new(py, Buffer::from_i8(p.cb))?)?;
            d.set_item("SCB", Bound::new(py, Buffer::from_f32(p.scb))?)?;
        }
    }
    Ok(d)
}

/// Parses a spec given from Python: ("4bit", quant_type, blocksize, double_quant) or ("int8",).
pub fn spec_from_py(
    kind: &str,
    quant_type: &str,
    blocksize: usize,
    double_quant: bool,
) -> PyResult<QuantSpec> {
    match kind {
        "4bit" => Ok(QuantSpec::FourBit {
            quant_type: QuantType::parse(quant_type).map_err(crate::errors::to_py)?,
            blocksize,
            double_quant,
        }),
        "int8" => Ok(QuantSpec::Int8),
        other => Err(PyValueError::new_err(format!(
            "unknown quantization kind '{other}' (expected '4bit' or 'int8')"
        ))),
    }
}
