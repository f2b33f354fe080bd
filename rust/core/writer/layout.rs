//! Where every output tensor goes, decided before a byte is written: its dtype, shape and size (known
//! from the source and the quantization spec), its shard (transformers' split), its offset in the shard
//! (safetensors' order) and each shard's header.
//!
//! - Shards: `huggingface_hub.split_torch_state_dict_into_shards`, which `save_pretrained` calls: tensors
//!   in state-dict order fill a shard until the next one would tip it over `max_shard_size`; a tensor
//!   larger than that gets a shard of its own, placed before the shard being filled. One shard is
//!   `model.safetensors`, several are `model-00001-of-0000N.safetensors`.
//! - Inside a shard: safetensors' `prepare` order (descending dtype, then name) and header (compact JSON,
//!   `__metadata__` first, padded with spaces to a multiple of 8), so a shard is byte for byte the
//!   file `safetensors.torch.save_file` writes for the same tensors.
//! - The one size not known in advance is the `quant_state` JSON of a double-quantized weight (its
//!   `nested_offset` is printed with as many digits as the float needs). Those tensors go last in their
//!   shard, and the header is given room for the longest JSON and padded with spaces; it is written
//!   when the shard is complete. Such a shard holds the same tensors as safetensors' file, in another
//!   order, and transformers' split is computed with the longest size.

use std::collections::HashMap;

use sha2::{Digest, Sha256};

use crate::checkpoint::Checkpoint;
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::job::Job;
use crate::pack::QuantSpec;
use crate::quant::NESTED_BLOCKSIZE;

use super::pyjson::quant_state_json_bound;

/// One tensor of a quantization result, named as transformers saves it (`M.weight` + suffix).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    /// 4-bit: the packed codes (`M.weight`); int8: the int8 weight (`M.weight`).
    Weight,
    /// `M.weight.absmax`: f32 per block, or the u8 nested codes with double quantization.
    Absmax,
    /// `M.weight.quant_map`: the 16 code values.
    QuantMap,
    /// `M.weight.nested_absmax`: f32 per 256 nested codes.
    NestedAbsmax,
    /// `M.weight.nested_quant_map`: the 256-entry dynamic map.
    NestedQuantMap,
    /// `M.weight.quant_state.bitsandbytes__<type>`: the JSON of the QuantState's other fields.
    QuantState,
    /// `M.SCB`: int8 row scales.
    Scb,
    /// `M.weight_format`: a u8 0 (row-major).
    WeightFormat,
}

impl Part {
    /// Every part, in the order a result's tensors are saved.
    pub const ALL: [Part; 8] = [
        Part::Weight,
        Part::Absmax,
        Part::QuantMap,
        Part::NestedAbsmax,
        Part::NestedQuantMap,
        Part::QuantState,
        Part::Scb,
        Part::WeightFormat,
    ];

    /// The name the binding uses: the suffix after the weight's name for a 4-bit statistic
    /// ("absmax", "quant_state", ...), the module's key for an int8 one ("SCB", "weight_format").
    pub fn as_str(self) -> &'static str {
        match self {
            Part::Weight => "weight",
            Part::Absmax => "absmax",
            Part::QuantMap => "quant_map",
            Part::NestedAbsmax => "nested_absmax",
            Part::NestedQuantMap => "nested_quant_map",
            Part::QuantState => "quant_state",
            Part::Scb => "SCB",
            Part::WeightFormat => "weight_format",
        }
    }

    /// Parses a name `as_str` gives.
    pub fn parse(s: &str) -> Result<Self> {
        Part::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| Error::InvalidArgument(format!("unknown result part '{s}'")))
    }
}

/// What an output tensor is made of.
#[derive(Clone, Debug)]
pub enum Content {
    /// A checkpoint tensor, optionally transposed (2-D) and cast to another float dtype.
    Copy {
        /// Name of the checkpoint tensor.
        source: String,
        /// Write the transpose of the (2-D) tensor.
        transpose: bool,
        /// Cast to this float dtype (F32, F16 or BF16) on the way.
        cast: Option<Dtype>,
    },
    /// Bytes given by the caller (a buffer the checkpoint does not hold).
    Inline {
        /// The tensor's dtype.
        dtype: Dtype,
        /// The tensor's shape.
        shape: Vec<usize>,
        /// The data, little-endian, exactly shape x dtype bytes.
        bytes: Vec<u8>,
    },
    /// A part of the result of job `job`.
    Quantized {
        /// Index into the layout's jobs.
        job: usize,
        /// Which tensor of the job's result.
        part: Part,
    },
}

/// One output tensor as the caller describes it.
#[derive(Clone, Debug)]
pub struct Output {
    /// The tensor's name in the output (its safetensors header key).
    pub name: String,
    /// Where its bytes come from.
    pub content: Content,
}

/// One output tensor with everything the writer needs.
#[derive(Clone, Debug)]
pub struct Planned {
    /// The tensor's name in the output (its safetensors header key).
    pub name: String,
    /// The header entry's `dtype`.
    pub dtype: Dtype,
    /// The header entry's `shape`.
    pub shape: Vec<usize>,
    /// Bytes of data; for an inexact tensor, the most it can take.
    pub size: u64,
    /// False for the `quant_state` of a double-quantized weight.
    pub exact: bool,
    /// Where its bytes come from.
    pub content: Content,
    /// Source bytes this tensor accounts for in the progress (a copy's, a job's on its weight).
    pub input_bytes: u64,
}

/// One output file.
#[derive(Clone, Debug)]
pub struct ShardPlan {
    /// The file name (`shard_name`).
    pub name: String,
    /// Tensors (indices into `Layout::tensors`) in state-dict order.
    pub members: Vec<usize>,
    /// The same tensors in file order: exact ones in safetensors' order, then inexact ones.
    pub order: Vec<usize>,
    /// Data offsets of `order`; an inexact tensor's are provisional (its size is a bound).
    pub offsets: Vec<(u64, u64)>,
    /// Length of the header JSON including padding: exact, or the room reserved for it.
    pub header_len: u64,
    /// Whether every size is known (the header can be written first).
    pub exact: bool,
}

impl ShardPlan {
    /// Where the data section starts.
    pub fn data_start(&self) -> u64 {
        8 + self.header_len
    }
}

/// The whole output.
#[derive(Clone, Debug)]
pub struct Layout {
    /// The quantization jobs, indexed by `Content::Quantized::job`.
    pub jobs: Vec<Job>,
    /// Every output tensor, in state-dict order.
    pub tensors: Vec<Planned>,
    /// The output files, in order.
    pub shards: Vec<ShardPlan>,
    /// Most data bytes a shard holds (transformers' `max_shard_size`), unless one tensor is larger.
    pub max_shard_size: u64,
}

/// safetensors writes data in descending `Dtype` order (its enum's derived `Ord`), then by name.
fn dtype_rank(d: Dtype) -> u8 {
    use Dtype::*;
    match d {
        U64 => 0,
        I64 => 1,
        F64 => 2,
        F32 => 3,
        U32 => 4,
        I32 => 5,
        BF16 => 6,
        F16 => 7,
        U16 => 8,
        I16 => 9,
        F8E4M3 => 10,
        F8E5M2 => 11,
        I8 => 12,
        U8 => 13,
        Bool => 14,
    }
}

/// The file name of shard `i` of `n` (transformers' pattern).
pub fn shard_name(i: usize, n: usize) -> String {
    if n == 1 {
        "model.safetensors".into()
    } else {
        format!("model-{:05}-of-{:05}.safetensors", i + 1, n)
    }
}

/// One header entry: name, dtype, shape, data offsets.
pub type HeaderEntry<'a> = (&'a str, Dtype, &'a [usize], (u64, u64));

/// A safetensors header for `entries`, in the given order, padded with spaces to `min_len` and then to
/// a multiple of 8; returns the bytes after the length prefix.
pub fn header_json(entries: &[HeaderEntry<'_>], min_len: usize) -> Vec<u8> {
    let mut s = String::from("{\"__metadata__\":{\"format\":\"pt\"}");
    for (name, dtype, shape, (a, b)) in entries {
        let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
        s.push(',');
        s.push_str(&serde_json::Value::from(*name).to_string());
        s.push_str(&format!(
            ":{{\"dtype\":\"{}\",\"shape\":[{}],\"data_offsets\":[{},{}]}}",
            dtype.as_str(),
            dims.join(","),
            a,
            b
        ));
    }
    s.push('}');
    let mut bytes = s.into_bytes();
    while bytes.len() < min_len || !bytes.len().is_multiple_of(8) {
        bytes.push(b' ');
    }
    bytes
}

fn invalid(msg: String) -> Error {
    Error::InvalidArgument(msg)
}

impl Layout {
    /// Plans the output of `outputs` (in state-dict order) read from `ckpt`.
    pub fn new(
        ckpt: &Checkpoint,
        jobs: Vec<Job>,
        outputs: Vec<Output>,
        max_shard_size: u64,
    ) -> Result<Self> {
        for job in &jobs {
            job.spec.validate()?;
            let t = ckpt.info(&job.name)?;
            if let Some(r) = &job.range {
                // A conversion writes whole tensors; a range is the FSDP share's (python/fastq/shard.py).
                return Err(Error::BadRange {
                    path: ckpt.path_of(t).to_path_buf(),
                    tensor: t.name.clone(),
                    start: r.start,
                    end: r.end,
                    reason: "a conversion quantizes whole tensors; a range is for loading only"
                        .into(),
                });
            }
            if !t.dtype.is_float_input() {
                return Err(Error::UnsupportedDtype {
                    path: ckpt.path_of(t).to_path_buf(),
                    tensor: t.name.clone(),
                    dtype: t.dtype.to_string(),
                });
            }
            if let Some(c) = job.cast {
                check_float(c)?;
            }
        }
        let mut seen = HashMap::new();
        let mut has_weight = vec![false; jobs.len()];
        let mut tensors = Vec::with_capacity(outputs.len());
        for out in outputs {
            if seen.insert(out.name.clone(), ()).is_some() {
                return Err(invalid(format!(
                    "output tensor '{}' is listed twice",
                    out.name
                )));
            }
            if let Content::Quantized {
                job,
                part: Part::Weight,
            } = out.content
            {
                if let Some(w) = has_weight.get_mut(job) {
                    *w = true;
                }
            }
            tensors.push(plan_tensor(ckpt, &jobs, out)?);
        }
        if let Some(j) = has_weight.iter().position(|w| !w) {
            return Err(invalid(format!(
                "job {j} ('{}') has no weight output",
                jobs[j].name
            )));
        }
        let shards = split(&tensors, max_shard_size);
        let n = shards.len();
        let shards = shards
            .into_iter()
            .enumerate()
            .map(|(i, members)| shard_plan(&tensors, shard_name(i, n), members))
            .collect::<Result<_>>()?;
        Ok(Layout {
            jobs,
            tensors,
            shards,
            max_shard_size,
        })
    }

    /// Sum of the planned data sizes (bounds for inexact tensors).
    pub fn planned_size(&self) -> u64 {
        self.tensors
            .iter()
            .fold(0u64, |acc, t| acc.saturating_add(t.size))
    }

    /// A digest of everything that decides the output's bytes, so that a resumed run can check it
    /// continues the same conversion.
    pub fn fingerprint(&self, ckpt: &Checkpoint) -> String {
        let mut h = Sha256::new();
        for job in &self.jobs {
            let src = ckpt.info(&job.name).ok();
            h.update(format!(
                "job {} {:?} {} {:?} {} {:?}\n",
                job.name,
                job.spec,
                job.transpose,
                job.cast,
                job.storage,
                src.map(|t| (t.dtype, t.shape.clone()))
            ));
        }
        for shard in &self.shards {
            h.update(format!("shard {} {}\n", shard.name, shard.header_len));
            for (&i, off) in shard.order.iter().zip(&shard.offsets) {
                let t = &self.tensors[i];
                let content = match &t.content {
                    Content::Inline { bytes, .. } => format!("inline {:x}", Sha256::digest(bytes)),
                    other => format!("{other:?}"),
                };
                h.update(format!(
                    "{} {} {:?} {} {:?} {}\n",
                    t.name, t.dtype, t.shape, t.size, off, content
                ));
            }
        }
        format!("{:x}", h.finalize())
    }
}

fn check_float(d: Dtype) -> Result<()> {
    if d.is_float_input() {
        Ok(())
    } else {
        Err(invalid(format!(
            "cannot cast to {d}: only F32, F16 and BF16 are cast targets"
        )))
    }
}

fn plan_tensor(ckpt: &Checkpoint, jobs: &[Job], out: Output) -> Result<Planned> {
    let (dtype, shape, exact, input_bytes) = match &out.content {
        Content::Copy {
            source,
            transpose,
            cast,
        } => {
            let t = ckpt.info(source)?;
            if let Some(c) = cast {
                check_float(*c)?;
                if !t.dtype.is_float_input() {
                    return Err(Error::UnsupportedDtype {
                        path: ckpt.path_of(t).to_path_buf(),
                        tensor: t.name.clone(),
                        dtype: t.dtype.to_string(),
                    });
                }
            }
            let shape = if *transpose {
                if t.shape.len() != 2 {
                    return Err(Error::BadShape {
                        path: ckpt.path_of(t).to_path_buf(),
                        tensor: t.name.clone(),
                        reason: format!("only a 2-D tensor can be transposed, got {:?}", t.shape),
                    });
                }
                vec![t.shape[1], t.shape[0]]
            } else {
                t.shape.clone()
            };
            (cast.unwrap_or(t.dtype), shape, true, t.nbytes() as u64)
        }
        Content::Inline {
            dtype,
            shape,
            bytes,
        } => {
            let want = dtype.nbytes(shape);
            if want != Some(bytes.len()) {
                let want = want.map_or("more than 2^64".into(), |w| w.to_string());
                return Err(invalid(format!(
                    "inline tensor '{}': shape {shape:?} x {dtype} needs {want} bytes, got {}",
                    out.name,
                    bytes.len()
                )));
            }
            (*dtype, shape.clone(), true, 0)
        }
        Content::Quantized { job, part } => {
            let j = jobs.get(*job).ok_or_else(|| {
                invalid(format!(
                    "'{}' names job {job}, which does not exist",
                    out.name
                ))
            })?;
            let t = ckpt.info(&j.name)?;
            let n = t.numel();
            let qshape = if j.transpose && t.shape.len() == 2 {
                vec![t.shape[1], t.shape[0]]
            } else {
                t.shape.clone()
            };
            let input = if *part == Part::Weight {
                t.nbytes() as u64
            } else {
                0
            };
            let wrong = || {
                invalid(format!(
                    "'{}': part {part:?} does not belong to a {:?} job",
                    out.name, j.spec
                ))
            };
            let (dtype, shape, exact) = match (j.spec, part) {
                (QuantSpec::FourBit { .. }, Part::Weight) => {
                    let bytes = n.div_ceil(2);
                    let item = j.storage.size();
                    if bytes % item != 0 {
                        return Err(Error::BadShape {
                            path: ckpt.path_of(t).to_path_buf(),
                            tensor: t.name.clone(),
                            reason: format!(
                                "{bytes} packed bytes cannot be viewed as {} ({item} bytes each)",
                                j.storage
                            ),
                        });
                    }
                    (j.storage, vec![bytes / item, 1], true)
                }
                (
                    QuantSpec::FourBit {
                        blocksize,
                        double_quant,
                        ..
                    },
                    Part::Absmax,
                ) => {
                    let dt = if double_quant { Dtype::U8 } else { Dtype::F32 };
                    (dt, vec![n.div_ceil(blocksize)], true)
                }
                (QuantSpec::FourBit { .. }, Part::QuantMap) => (Dtype::F32, vec![16], true),
                (
                    QuantSpec::FourBit {
                        blocksize,
                        double_quant: true,
                        ..
                    },
                    Part::NestedAbsmax,
                ) => (
                    Dtype::F32,
                    vec![n.div_ceil(blocksize).div_ceil(NESTED_BLOCKSIZE)],
                    true,
                ),
                (
                    QuantSpec::FourBit {
                        double_quant: true, ..
                    },
                    Part::NestedQuantMap,
                ) => (Dtype::F32, vec![256], true),
                (
                    QuantSpec::FourBit {
                        quant_type,
                        blocksize,
                        double_quant,
                    },
                    Part::QuantState,
                ) => {
                    let dt = j.cast.unwrap_or(t.dtype);
                    let len =
                        quant_state_json_bound(quant_type, blocksize, dt, &qshape, double_quant);
                    (Dtype::U8, vec![len], !double_quant)
                }
                (QuantSpec::Int8, Part::Weight) => (Dtype::I8, qshape.clone(), true),
                (QuantSpec::Int8, Part::Scb) => (Dtype::F32, vec![qshape[0]], true),
                (QuantSpec::Int8, Part::WeightFormat) => (Dtype::U8, vec![], true),
                _ => return Err(wrong()),
            };
            (dtype, shape, exact, input)
        }
    };
    // Every shape here is a checkpoint tensor's (validated on opening), derived from one, or an inline
    // one checked above; the check stays so that no future path wraps.
    let size = dtype.nbytes(&shape).ok_or_else(|| {
        invalid(format!(
            "output tensor '{}': shape {shape:?} x {dtype} overflows 64 bits",
            out.name
        ))
    })? as u64;
    Ok(Planned {
        name: out.name,
        dtype,
        shape,
        size,
        exact,
        content: out.content,
        input_bytes,
    })
}

/// `split_state_dict_into_shards_factory` of huggingface_hub (serialization/_base.py).
fn split(tensors: &[Planned], max: u64) -> Vec<Vec<usize>> {
    let mut shards = Vec::new();
    let mut current = Vec::new();
    let mut current_size = 0u64;
    for (i, t) in tensors.iter().enumerate() {
        if t.size > max {
            shards.push(vec![i]);
            continue;
        }
        if current_size.saturating_add(t.size) > max {
            shards.push(std::mem::take(&mut current));
            current_size = 0;
        }
        current.push(i);
        current_size = current_size.saturating_add(t.size);
    }
    if !current.is_empty() || shards.is_empty() {
        shards.push(current);
    }
    shards
}

fn shard_plan(tensors: &[Planned], name: String, members: Vec<usize>) -> Result<ShardPlan> {
    let mut order = members.clone();
    order.sort_by(|&a, &b| {
        let (x, y) = (&tensors[a], &tensors[b]);
        (!x.exact, dtype_rank(x.dtype), x.name.as_bytes()).cmp(&(
            !y.exact,
            dtype_rank(y.dtype),
            y.name.as_bytes(),
        ))
    });
    let mut offsets = Vec::with_capacity(order.len());
    let mut at = 0u64;
    for &i in &order {
        let end = at.checked_add(tensors[i].size).ok_or_else(|| {
            invalid(format!(
                "shard '{name}' would hold more than 2^64 bytes (at tensor '{}')",
                tensors[i].name
            ))
        })?;
        offsets.push((at, end));
        at = end;
    }
    let entries: Vec<_> = order
        .iter()
        .zip(&offsets)
        .map(|(&i, &off)| {
            let t = &tensors[i];
            (t.name.as_str(), t.dtype, t.shape.as_slice(), off)
        })
        .collect();
    let exact = order.iter().all(|&i| tensors[i].exact);
    let header_len = header_json(&entries, 0).len() as u64;
    Ok(ShardPlan {
        name,
        members,
        order,
        offsets,
        header_len,
        exact,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn planned(name: &str, dtype: Dtype, size: u64) -> Planned {
        Planned {
            name: name.into(),
            dtype,
            shape: vec![size as usize / dtype.size()],
            size,
            exact: true,
            content: Content::Inline {
                dtype,
                shape: vec![],
                bytes: vec![],
            },
            input_bytes: 0,
        }
    }

    #[test]
    fn split_follows_huggingface_hub() {
        // The docstring's example: [6, 6, 2, 6, 2, 2] with a limit of 10 -> [6], [6+2], [6+2+2].
        let ts: Vec<_> = [6, 6, 2, 6, 2, 2]
            .iter()
            .enumerate()
            .map(|(i, &s)| planned(&format!("t{i}"), Dtype::U8, s))
            .collect();
        assert_eq!(split(&ts, 10), vec![vec![0], vec![1, 2], vec![3, 4, 5]]);
        // A tensor over the limit gets its own shard, placed before the one being filled.
        let ts: Vec<_> = [3, 12, 3]
            .iter()
            .enumerate()
            .map(|(i, &s)| planned(&format!("t{i}"), Dtype::U8, s))
            .collect();
        assert_eq!(split(&ts, 10), vec![vec![1], vec![0, 2]]);
    }

    #[test]
    fn shard_order_and_header_match_safetensors() {
        let ts = vec![
            planned("b", Dtype::U8, 3),
            planned("a", Dtype::BF16, 4),
            planned("c", Dtype::F32, 8),
            planned("a.x", Dtype::U8, 1),
        ];
        let s = shard_plan(&ts, "model.safetensors".into(), vec![0, 1, 2, 3]).unwrap();
        assert_eq!(s.order, vec![2, 1, 3, 0]);
        assert_eq!(s.offsets, vec![(0, 8), (8, 12), (12, 13), (13, 16)]);
        let entries: Vec<_> = s
            .order
            .iter()
            .zip(&s.offsets)
            .map(|(&i, &o)| (ts[i].name.as_str(), ts[i].dtype, ts[i].shape.as_slice(), o))
            .collect();
        let h = header_json(&entries, 0);
        assert_eq!(h.len() % 8, 0);
        assert!(h.starts_with(
            br#"{"__metadata__":{"format":"pt"},"c":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":"#
        ));
    }
}
