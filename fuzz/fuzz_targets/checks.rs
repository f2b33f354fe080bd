//! What each fuzz target checks, on raw bytes. Shared with the regression test in tests/checkpoint.rs
//! (`fuzz_regressions_are_errors_not_panics`), which replays every file under `fuzz/regressions/` and
//! `fuzz/seeds/` through these same functions: an input that once crashed a target stays a test.
//!
//! The contract: no input panics, and whatever parses satisfies the invariants the rest of the core
//! relies on (byte ranges inside the file, sizes that match shape x dtype, no overlaps; SIMD kernels
//! equal to the scalar reference, errors included).
#![allow(dead_code)]

use std::path::Path;

use fastq::header::{parse_header, parse_index};
use fastq::pack::quantize_tensor;
use fastq::quant::BLOCKSIZES;
use fastq::{Dtype, FloatSlice, Kernel, Packed, QuantSpec, QuantType};

/// `data` as a whole safetensors file.
pub fn header(data: &[u8]) {
    let Ok(h) = parse_header(Path::new("fuzz.safetensors"), data) else {
        return;
    };
    assert!(h.data_start >= 8 && h.data_start <= data.len());
    let mut prev_end = h.data_start;
    for t in &h.tensors {
        assert!(
            t.start >= prev_end,
            "'{}' overlaps or precedes the data",
            t.name
        );
        assert!(t.start <= t.end && t.end <= data.len(), "'{}'", t.name);
        assert_eq!(Some(t.nbytes()), t.dtype.nbytes(&t.shape), "'{}'", t.name);
        prev_end = t.end;
    }
}

/// `data` as a `model.safetensors.index.json`.
pub fn index(data: &[u8]) {
    let _ = parse_index(Path::new("model.safetensors.index.json"), data);
}

/// Reads `data` front to back; zeros once it runs out.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn u8(&mut self) -> u8 {
        let (b, rest) = self.0.split_first().map_or((0, &[][..]), |(b, r)| (*b, r));
        self.0 = rest;
        b
    }
    fn u64(&mut self) -> u64 {
        (0..8).fold(0u64, |acc, _| acc << 8 | self.u8() as u64)
    }
    /// A number shaped to reach the edges: small, near a power of two, near 2^64, or any.
    fn number(&mut self) -> u64 {
        match self.u8() % 6 {
            0 | 1 => self.u8() as u64,
            2 => 1u64 << (self.u8() % 64),
            3 => u64::MAX - self.u8() as u64,
            4 => (self.u8() as u64) << 32 | self.u8() as u64,
            _ => self.u64(),
        }
    }
}

/// A safetensors file built from `data`: a few entries with chosen (and often absurd) dtypes, shapes
/// and offsets, serialized as JSON, a header length that may lie, and a short data section; then
/// `header` on it. Reaches the arithmetic that random bytes rarely get past the JSON parser to.
pub fn header_structured(data: &[u8]) {
    const DTYPES: [&str; 8] = ["F32", "F16", "BF16", "U8", "I64", "BOOL", "F8_E4M3", "F7"];
    let mut b = Bytes(data);
    let mut json = String::from("{");
    if b.u8() % 2 == 0 {
        json += r#""__metadata__":{"format":"pt"},"#;
    }
    for i in 0..b.u8() % 6 {
        let name = if b.u8() % 8 == 0 {
            "t0".to_string()
        } else {
            format!("t{i}")
        };
        let dtype = DTYPES[b.u8() as usize % DTYPES.len()];
        let dims: Vec<String> = (0..b.u8() % 4).map(|_| b.number().to_string()).collect();
        let (begin, len) = (b.number(), b.number());
        let end = if b.u8() % 2 == 0 {
            begin.wrapping_add(len)
        } else {
            len
        };
        let negative = if b.u8() % 16 == 0 { "-" } else { "" };
        json += &format!(
            r#""{name}":{{"dtype":"{dtype}","shape":[{}],"data_offsets":[{negative}{begin},{end}]}},"#,
            dims.join(",")
        );
    }
    if json.ends_with(',') {
        json.pop();
    }
    json.push('}');
    let header_len = match b.u8() % 8 {
        0 => b.number(),
        _ => json.len() as u64,
    };
    let mut file = header_len.to_le_bytes().to_vec();
    file.extend_from_slice(json.as_bytes());
    file.extend(std::iter::repeat_n(0x3c, b.u8() as usize * 4));
    header(&file);
}

/// A quantization of bytes taken from `data`: dtype, format, blocksize (sometimes invalid) and a shape
/// (sometimes wrong, sometimes overflowing) from its first bytes, the values from the rest; the SIMD
/// kernels must give exactly what the scalar reference gives, and a result must have the sizes its
/// shape implies.
pub fn quantize(data: &[u8]) {
    let mut b = Bytes(data);
    let dtype = [Dtype::F32, Dtype::F16, Dtype::BF16][b.u8() as usize % 3];
    let mode = b.u8();
    let blocksize = match b.u8() {
        250.. => 48,
        k => BLOCKSIZES[k as usize % BLOCKSIZES.len()],
    };
    let spec = if mode & 1 == 1 {
        QuantSpec::Int8
    } else {
        QuantSpec::FourBit {
            quant_type: if mode & 2 == 0 {
                QuantType::Nf4
            } else {
                QuantType::Fp4
            },
            blocksize,
            double_quant: mode & 4 != 0,
        }
    };
    let ndims = b.u8() % 4;
    let explicit: Vec<usize> = (0..ndims)
        .map(|_| match b.u8() % 4 {
            0 => b.number() as usize,
            _ => b.u8() as usize % 64 + 1,
        })
        .collect();
    let rest = b.0;
    let n = rest.len() / dtype.size();
    let bytes = &rest[..n * dtype.size()];
    // Mostly a shape that fits the values (the last dimension absorbs them), sometimes the explicit one.
    let shape = if mode & 8 == 0 && !explicit.is_empty() {
        explicit
    } else {
        let lead = &explicit[..explicit.len().saturating_sub(1)];
        match lead.iter().try_fold(1usize, |a, &d| a.checked_mul(d)) {
            Some(head) if head > 0 && n.is_multiple_of(head) => {
                let mut s = lead.to_vec();
                s.push(n / head);
                s
            }
            _ => vec![n],
        }
    };
    let x = FloatSlice::new(dtype, bytes).expect("a float dtype");
    let fast = quantize_tensor(x, &shape, dtype, spec, Kernel::Auto);
    let slow = quantize_tensor(x, &shape, dtype, spec, Kernel::Scalar);
    assert_eq!(
        format!("{fast:?}"),
        format!("{slow:?}"),
        "SIMD and scalar disagree"
    );
    match slow {
        Ok(Packed::FourBit(p)) => {
            assert_eq!(p.codes.len(), n.div_ceil(2));
            let blocks = n.div_ceil(p.blocksize);
            match &p.nested {
                Some(nested) => assert_eq!(nested.codes.len(), blocks),
                None => assert_eq!(p.absmax.len(), blocks),
            }
        }
        Ok(Packed::Int8(p)) => {
            assert_eq!(p.cb.len(), n);
            assert_eq!(p.scb.len(), shape[0]);
            assert!(p.cb.iter().all(|&c| c >= -127));
        }
        Err(_) => {}
    }
}
