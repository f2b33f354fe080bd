//! `Job`: one tensor to quantize, the one job type every entry point takes (`Checkpoint.quantize`,
//! `convert`, `plan_layout`). Built with `Job.four_bit(...)` or `Job.int8(...)`, frozen, and read back
//! through attributes; it holds the core's `fastq::Job`.

use fastq::dtype::Dtype;
use fastq::{Error, QuantSpec, QuantType};
use pyo3::prelude::*;

use crate::errors::IntoPy;

/// A safetensors dtype name ("BF16") as the core's `Dtype`.
pub fn parse_dtype(s: &str) -> PyResult<Dtype> {
    Dtype::parse(s)
        .ok_or_else(|| Error::UnknownDtype { dtype: s.into() })
        .py_err()
}

/// A float dtype to cast to before quantizing (F32, F16 or BF16), for tensor `tensor`.
pub fn parse_cast(s: Option<&str>, tensor: &str) -> PyResult<Option<Dtype>> {
    let Some(s) = s else { return Ok(None) };
    let d = parse_dtype(s)?;
    if !d.is_float_input() {
        return Err(Error::UnsupportedDtype {
            path: Default::default(),
            tensor: tensor.into(),
            dtype: s.into(),
        })
        .py_err();
    }
    Ok(Some(d))
}

/// One tensor to quantize: `Job.four_bit(name, ...)` or `Job.int8(name, ...)`.
#[pyclass(module = "fastq._fastq", frozen, eq)]
#[derive(Clone, PartialEq)]
pub struct Job(pub fastq::Job);

#[pymethods]
impl Job {
    /// `Job.four_bit(name, quant_type="nf4", blocksize=64, double_quant=True, transpose=False,
    /// cast=None, storage="U8", range=None)`: 4-bit codes of checkpoint tensor `name`, stored as
    /// `storage` (`bnb_4bit_quant_storage`); `cast` (F32, F16, BF16) converts the weight first;
    /// `range=(start, end)` quantizes only those elements of the flattened tensor (see `fastq::Job`:
    /// `start` block-aligned, `double_quant=False`, no transpose).
    #[staticmethod]
    #[pyo3(signature = (name, quant_type="nf4", blocksize=64, double_quant=true, transpose=false, cast=None, storage="U8", range=None))]
    #[allow(clippy::too_many_arguments)] // Python keywords, each with its default
    fn four_bit(
        name: String,
        quant_type: &str,
        blocksize: usize,
        double_quant: bool,
        transpose: bool,
        cast: Option<&str>,
        storage: &str,
        range: Option<(usize, usize)>,
    ) -> PyResult<Self> {
        let spec = QuantSpec::FourBit {
            quant_type: QuantType::parse(quant_type).py_err()?,
            blocksize,
            double_quant,
        };
        spec.validate().py_err()?;
        let cast = parse_cast(cast, &name)?;
        let job = fastq::Job {
            name,
            spec,
            transpose,
            cast,
            storage: parse_dtype(storage)?,
            range: range.map(|(a, b)| a..b),
        };
        job.validate().py_err()?;
        Ok(Job(job))
    }

    /// `Job.int8(name, transpose=False, cast=None)`: LLM.int8 rows of checkpoint tensor `name`.
    #[staticmethod]
    #[pyo3(signature = (name, transpose=false, cast=None))]
    fn int8(name: String, transpose: bool, cast: Option<&str>) -> PyResult<Self> {
        let cast = parse_cast(cast, &name)?;
        Ok(Job(fastq::Job {
            name,
            spec: QuantSpec::Int8,
            transpose,
            cast,
            storage: Dtype::U8,
            range: None,
        }))
    }

    /// The checkpoint tensor.
    #[getter]
    fn name(&self) -> &str {
        &self.0.name
    }

    /// "4bit" or "int8".
    #[getter]
    fn kind(&self) -> &'static str {
        match self.0.spec {
            QuantSpec::FourBit { .. } => "4bit",
            QuantSpec::Int8 => "int8",
        }
    }

    /// "nf4" or "fp4"; None for int8.
    #[getter]
    fn quant_type(&self) -> Option<&'static str> {
        match self.0.spec {
            QuantSpec::FourBit { quant_type, .. } => Some(quant_type.as_str()),
            QuantSpec::Int8 => None,
        }
    }

    /// Elements per absmax block; None for int8.
    #[getter]
    fn blocksize(&self) -> Option<usize> {
        match self.0.spec {
            QuantSpec::FourBit { blocksize, .. } => Some(blocksize),
            QuantSpec::Int8 => None,
        }
    }

    /// Whether the absmax is quantized again (nested, 8-bit); None for int8.
    #[getter]
    fn double_quant(&self) -> Option<bool> {
        match self.0.spec {
            QuantSpec::FourBit { double_quant, .. } => Some(double_quant),
            QuantSpec::Int8 => None,
        }
    }

    /// Whether the transpose of the 2-D weight is quantized (GPT-2's `Conv1D`).
    #[getter]
    fn transpose(&self) -> bool {
        self.0.transpose
    }

    /// The float dtype the weight is cast to first ("BF16"), or None.
    #[getter]
    fn cast(&self) -> Option<&'static str> {
        self.0.cast.map(|d| d.as_str())
    }

    /// The dtype the packed 4-bit bytes are stored as ("U8"; unused by int8).
    #[getter]
    fn storage(&self) -> &'static str {
        self.0.storage.as_str()
    }

    /// The element range `(start, end)` of the flattened tensor quantized, as given; None for all.
    #[getter]
    fn range(&self) -> Option<(usize, usize)> {
        self.0.range.as_ref().map(|r| (r.start, r.end))
    }

    fn __repr__(&self) -> String {
        let j = &self.0;
        let cast = j.cast.map_or("None".into(), |d| format!("'{d}'"));
        let range = j
            .range
            .as_ref()
            .map_or("None".into(), |r| format!("({}, {})", r.start, r.end));
        match j.spec {
            QuantSpec::FourBit {
                quant_type,
                blocksize,
                double_quant,
            } => format!(
                "Job.four_bit('{}', quant_type='{}', blocksize={blocksize}, double_quant={}, \
                 transpose={}, cast={cast}, storage='{}', range={range})",
                j.name,
                quant_type.as_str(),
                py_bool(double_quant),
                py_bool(j.transpose),
                j.storage
            ),
            QuantSpec::Int8 => format!(
                "Job.int8('{}', transpose={}, cast={cast})",
                j.name,
                py_bool(j.transpose)
            ),
        }
    }
}

fn py_bool(b: bool) -> &'static str {
    if b {
        "True"
    } else {
        "False"
    }
}
