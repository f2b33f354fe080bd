//! Where each output tensor's bytes come from: a checkpoint tensor copied (transposed, cast) in
//! chunks, or a quantization result's buffers.

use crate::cast::cast_into;
use crate::checkpoint::{Checkpoint, TensorInfo};
use crate::dtype::FloatSlice;
use crate::error::Result;
use crate::job::transpose_bytes;
use crate::pack::Packed;
use crate::quant::dynamic_map;

use super::files::Shards;
use super::layout::{Content, Layout, Part};
use super::manifest::Hasher;
use super::pyjson::quant_state_json;

/// Writes unquantized tensor `t` (inline bytes, or a checkpoint tensor copied, transposed or cast);
/// returns the source bytes it consumed. `copy_buf` is reused across calls.
pub(super) fn write_plain(
    out: &mut Shards<'_>,
    layout: &Layout,
    ckpt: &Checkpoint,
    t: usize,
    copy_buf: &mut Vec<u8>,
    hasher: &Hasher,
) -> Result<u64> {
    match &layout.tensors[t].content {
        Content::Inline { bytes, .. } => out.put(t, bytes, hasher).map(|()| 0),
        Content::Copy {
            source,
            transpose,
            cast,
        } => {
            let info = ckpt.info(source)?;
            let (transpose, cast) = (*transpose, *cast);
            let input = info.nbytes() as u64;
            if !transpose && cast.is_none() {
                copy_range(out, t, ckpt, info, copy_buf)?;
                out.mark(t, hasher)?;
            } else {
                let mut bytes = if transpose {
                    let b = transpose_bytes(
                        ckpt.bytes(info),
                        info.shape[0],
                        info.shape[1],
                        info.dtype.size(),
                    );
                    ckpt.release(info);
                    // The transpose read the mapping: were its bytes still the file's?
                    ckpt.check(info)?;
                    b
                } else {
                    read(ckpt, info, 0, info.nbytes())?
                };
                if let Some(to) = cast.filter(|&to| to != info.dtype) {
                    let x =
                        FloatSlice::new(info.dtype, &bytes).expect("float, checked by the layout");
                    let mut out = Vec::new();
                    cast_into(x, to, &mut out);
                    bytes = out;
                }
                out.put(t, &bytes, hasher)?;
            }
            Ok(input)
        }
        Content::Quantized { .. } => unreachable!("quantized tensors come from their job"),
    }
}

/// Bytes `a..b` of a tensor, read with `pread`.
fn read(ckpt: &Checkpoint, info: &TensorInfo, a: usize, b: usize) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; b - a];
    ckpt.read_at(info, a, &mut buf)?;
    Ok(buf)
}

/// Copies a tensor's bytes unchanged into tensor `t`'s place, a few MB at a time.
fn copy_range(
    out: &mut Shards<'_>,
    t: usize,
    ckpt: &Checkpoint,
    info: &TensorInfo,
    buf: &mut Vec<u8>,
) -> Result<()> {
    const STEP: usize = 8 << 20;
    buf.resize(STEP.min(info.nbytes()), 0);
    let mut done = 0usize;
    while done < info.nbytes() {
        let n = STEP.min(info.nbytes() - done);
        ckpt.read_at(info, done, &mut buf[..n])?;
        out.put_at(t, done as u64, &buf[..n])?;
        done += n;
    }
    Ok(())
}

/// Writes tensor `t`, a part of a quantization result; returns the source bytes it stands for (the
/// weight part counts the job's input).
pub(super) fn write_part(
    out: &mut Shards<'_>,
    layout: &Layout,
    t: usize,
    packed: &Packed,
    hasher: &Hasher,
) -> Result<u64> {
    let tensor = &layout.tensors[t];
    let Content::Quantized { part, .. } = tensor.content else {
        unreachable!("a part")
    };
    let json: Vec<u8>;
    let (code, dmap) = (packed_code(packed), dynamic_map());
    let bytes: &[u8] = match (packed, part) {
        (Packed::FourBit(p), Part::Weight) => &p.codes,
        (Packed::FourBit(p), Part::Absmax) => match &p.nested {
            Some(n) => &n.codes,
            None => f32_bytes(&p.absmax),
        },
        (Packed::FourBit(_), Part::QuantMap) => f32_bytes(&code),
        (Packed::FourBit(p), Part::NestedAbsmax) => {
            f32_bytes(&p.nested.as_ref().expect("double quant").absmax)
        }
        (Packed::FourBit(_), Part::NestedQuantMap) => f32_bytes(&dmap),
        (Packed::FourBit(p), Part::QuantState) => {
            let offset = p.nested.as_ref().map(|n| n.offset);
            json =
                quant_state_json(p.quant_type, p.blocksize, p.dtype, &p.shape, offset).into_bytes();
            &json
        }
        (Packed::Int8(p), Part::Weight) => i8_bytes(&p.cb),
        (Packed::Int8(p), Part::Scb) => f32_bytes(&p.scb),
        (Packed::Int8(_), Part::WeightFormat) => &[0u8],
        _ => unreachable!("parts checked by the layout"),
    };
    out.put(t, bytes, hasher)?;
    Ok(if part == Part::Weight {
        tensor.input_bytes
    } else {
        0
    })
}

/// The 16 code values of a 4-bit result (the saved `quant_map`).
fn packed_code(p: &Packed) -> [f32; 16] {
    match p {
        Packed::FourBit(p) => p.quant_type.code(),
        Packed::Int8(_) => [0.0; 16],
    }
}

// safetensors is little-endian; so is every target fastq builds for (x86-64, aarch64).
#[cfg(not(target_endian = "little"))]
compile_error!("fastq's writer assumes a little-endian target");

/// The bytes of f32s as safetensors stores them.
fn f32_bytes(v: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding and every byte is initialized; u8 needs no alignment; the length
    // covers exactly the slice; on a little-endian target the memory order is the file's.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

/// The bytes of i8s (the int8 weight): the same bits as u8.
fn i8_bytes(v: &[i8]) -> &[u8] {
    // SAFETY: i8 and u8 have the same size and alignment and every bit pattern is valid for both.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, v.len()) }
}
