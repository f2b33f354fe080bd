//! Parsing and validating a safetensors header and a `model.safetensors.index.json`, on bytes alone (no
//! file access, so that the fuzz targets in `fuzz/` drive exactly what `Checkpoint::open` runs).
//!
//! Every size and offset is computed with checked arithmetic: a header may claim any `u64` or dimension,
//! and a claim that overflows is an error naming the file and the tensor, never a wrapped offset (which
//! would point a tensor at the header's own bytes) or a panic. Nothing is allocated from a claimed size:
//! the JSON is kept as borrowed slices of the file, one per entry, and parsed one entry at a time, so a
//! header costs a small multiple of its own length at most.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::Path;

use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::dtype::Dtype;
use crate::error::{Error, Result};

/// Largest header we accept (safetensors' own limit).
pub const MAX_HEADER: u64 = 100_000_000;

/// The key of the header's free-form string map.
const METADATA: &str = "__metadata__";

/// Where one tensor lives.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    /// The tensor's name, the key of its safetensors header entry.
    pub name: String,
    /// The header entry's `dtype`.
    pub dtype: Dtype,
    /// The header entry's `shape` (its element count, times the dtype's size, fits `usize`).
    pub shape: Vec<usize>,
    /// Index into `Checkpoint::shards`.
    pub shard: usize,
    /// Absolute byte range in the shard file.
    pub start: usize,
    /// End of that range (exclusive); `start <= end <= ` the file's length when it was opened.
    pub end: usize,
}

impl TensorInfo {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// Bytes of data.
    pub fn nbytes(&self) -> usize {
        self.end.saturating_sub(self.start)
    }
}

/// A validated safetensors header.
#[derive(Debug)]
pub struct Header {
    /// The `__metadata__` entries (values that are not strings are kept as their JSON text).
    pub metadata: BTreeMap<String, String>,
    /// Start of the data section: 8 + the header's length.
    pub data_start: usize,
    /// Every tensor, sorted by position in the file (`shard` is 0).
    pub tensors: Vec<TensorInfo>,
}

#[derive(serde::Deserialize)]
struct RawEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: (u64, u64),
}

/// The header's top-level object as (key, unparsed value) pairs in file order, with duplicates kept
/// (serde's maps would silently keep the last one).
struct Entries<'a>(Vec<(String, &'a RawValue)>);

impl<'de> Deserialize<'de> for Entries<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Entries<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(entry) = map.next_entry::<String, &'de RawValue>()? {
                    out.push(entry);
                }
                Ok(Entries(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// Validates the header of a safetensors file whose bytes are `file` (the whole file: the header is
/// read from its front, offsets are checked against its length). `path` only names the file in errors.
pub fn parse_header(path: &Path, file: &[u8]) -> Result<Header> {
    let file_len = file.len() as u64;
    let invalid = |tensor: &str, reason: String| Error::InvalidHeader {
        path: path.to_path_buf(),
        tensor: tensor.to_string(),
        reason,
    };
    let Some(len_bytes) = file.first_chunk::<8>() else {
        return Err(invalid(
            "",
            format!("file is {file_len} bytes, shorter than the 8-byte header length"),
        ));
    };
    let header_len = u64::from_le_bytes(*len_bytes);
    if header_len > MAX_HEADER {
        return Err(invalid(
            "",
            format!("header length {header_len} exceeds the {MAX_HEADER}-byte limit"),
        ));
    }
    // header_len <= MAX_HEADER: neither sum below can overflow, nor the cast.
    let data_start = 8 + header_len;
    if data_start > file_len {
        return Err(invalid(
            "",
            format!("header length {header_len} runs past the end of the {file_len}-byte file"),
        ));
    }
    let json = &file[8..data_start as usize];
    let entries: Entries<'_> = serde_json::from_slice(json)
        .map_err(|e| invalid("", format!("header is not a JSON object: {e}")))?;
    let mut metadata = BTreeMap::new();
    let mut seen = HashSet::with_capacity(entries.0.len());
    let mut tensors = Vec::with_capacity(entries.0.len());
    for (name, raw) in entries.0 {
        if !seen.insert(name.clone()) {
            return Err(invalid(
                &name,
                format!("tensor '{name}' appears twice in the header"),
            ));
        }
        if name == METADATA {
            // Not an object (or not JSON we keep): ignored, as safetensors' Python loader ignores it.
            if let Ok(m) = serde_json::from_str::<BTreeMap<String, serde_json::Value>>(raw.get()) {
                for (k, v) in m {
                    let v = v.as_str().map_or_else(|| v.to_string(), str::to_string);
                    metadata.insert(k, v);
                }
            }
            continue;
        }
        tensors.push(entry(path, data_start, file_len, name, raw)?);
    }
    tensors.sort_by(|a, b| (a.start, a.end, &a.name).cmp(&(b.start, b.end, &b.name)));
    if let Some(w) = tensors.windows(2).find(|w| w[1].start < w[0].end) {
        return Err(Error::Overlap {
            path: path.to_path_buf(),
            first: w[0].name.clone(),
            second: w[1].name.clone(),
        });
    }
    Ok(Header {
        metadata,
        data_start: data_start as usize,
        tensors,
    })
}

/// One tensor's entry, checked against the data section `data_start..file_len`.
fn entry(
    path: &Path,
    data_start: u64,
    file_len: u64,
    name: String,
    raw: &RawValue,
) -> Result<TensorInfo> {
    let invalid = |name: &str, reason: String| Error::InvalidHeader {
        path: path.to_path_buf(),
        tensor: name.to_string(),
        reason,
    };
    let e: RawEntry = serde_json::from_str(raw.get()).map_err(|err| {
        invalid(
            &name,
            format!("entry for tensor '{name}' is malformed: {err}"),
        )
    })?;
    let dtype = Dtype::parse(&e.dtype).ok_or_else(|| Error::UnsupportedDtype {
        path: path.to_path_buf(),
        tensor: name.clone(),
        dtype: e.dtype.clone(),
    })?;
    let (begin, end) = e.data_offsets;
    if end < begin {
        return Err(invalid(
            &name,
            format!("tensor '{name}' has data_offsets [{begin}, {end}] that run backwards"),
        ));
    }
    let Some(expected) = dtype.nbytes(&e.shape) else {
        return Err(invalid(
            &name,
            format!(
                "tensor '{name}' has shape {:?}, whose size in {dtype} overflows 64 bits",
                e.shape
            ),
        ));
    };
    if expected as u64 != end - begin {
        return Err(Error::SizeMismatch {
            path: path.to_path_buf(),
            tensor: name,
            shape: e.shape,
            dtype: dtype.to_string(),
            expected: expected as u64,
            actual: end - begin,
        });
    }
    let (Some(abs_begin), Some(abs_end)) =
        (data_start.checked_add(begin), data_start.checked_add(end))
    else {
        return Err(invalid(
            &name,
            format!(
                "tensor '{name}' has data_offsets [{begin}, {end}], which overflow 64 bits once \
                 the data section's start ({data_start}) is added"
            ),
        ));
    };
    if abs_end > file_len {
        return Err(Error::ShardTruncated {
            path: path.to_path_buf(),
            tensor: name,
            end: abs_end,
            file_len,
        });
    }
    // abs_begin <= abs_end <= file_len, the length of a slice: both fit usize.
    Ok(TensorInfo {
        name,
        dtype,
        shape: e.shape,
        shard: 0,
        start: abs_begin as usize,
        end: abs_end as usize,
    })
}

#[derive(serde::Deserialize)]
struct RawIndex {
    weight_map: BTreeMap<String, String>,
}

/// The `weight_map` (tensor name to shard file name) of the index file whose bytes are `text`.
pub fn parse_index(path: &Path, text: &[u8]) -> Result<BTreeMap<String, String>> {
    let raw: RawIndex = serde_json::from_slice(text).map_err(|e| Error::InvalidHeader {
        path: path.to_path_buf(),
        tensor: String::new(),
        reason: format!("bad index JSON: {e}"),
    })?;
    Ok(raw.weight_map)
}
