//! Positioned reads of tensor bytes straight into a caller's buffer: the first stage of the GPU path,
//! where the buffer is pinned host memory that the device copies from (DMA) as soon as it is filled.
//!
//! A request is a list of pieces (a byte range of one tensor and where it goes in the destination).
//! Pieces are checked (inside their tensor, inside the destination, not overlapping each other), then
//! read in parallel in chunks of `CHUNK` bytes with `pread`, so that no page of the mapping becomes
//! resident in this process and every worker thread has a share of even one large tensor.

use rayon::prelude::*;

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};

/// Bytes one worker reads at a time (large enough for the kernel's read-ahead, small enough that 16
/// threads share a 64 MiB request).
pub const CHUNK: usize = 4 << 20;

/// One byte range of a tensor and its place in the destination buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Piece {
    /// The tensor's name in the checkpoint.
    pub tensor: String,
    /// First byte of the range, counted from the tensor's first byte.
    pub offset: usize,
    /// Bytes to read.
    pub len: usize,
    /// Where the first byte goes in the destination.
    pub dst_offset: usize,
}

/// Checks `pieces` against the checkpoint and a destination of `dst_len` bytes.
pub fn check(ckpt: &Checkpoint, pieces: &[Piece], dst_len: usize) -> Result<()> {
    let mut spans = Vec::with_capacity(pieces.len());
    for p in pieces {
        let t = ckpt.info(&p.tensor)?;
        let end = p.offset.checked_add(p.len);
        if end.is_none_or(|e| e > t.nbytes()) {
            return Err(Error::InvalidArgument(format!(
                "bytes {}..+{} of tensor '{}' are outside its {} bytes",
                p.offset,
                p.len,
                p.tensor,
                t.nbytes()
            )));
        }
        let dst_end = p.dst_offset.checked_add(p.len);
        if dst_end.is_none_or(|e| e > dst_len) {
            return Err(Error::InvalidArgument(format!(
                "tensor '{}': {} bytes at {} do not fit a {dst_len}-byte buffer",
                p.tensor, p.len, p.dst_offset
            )));
        }
        spans.push((p.dst_offset, p.dst_offset + p.len));
    }
    spans.sort_unstable();
    if let Some(w) = spans.windows(2).find(|w| w[0].1 > w[1].0) {
        return Err(Error::InvalidArgument(format!(
            "destination ranges {:?} and {:?} overlap",
            w[0], w[1]
        )));
    }
    Ok(())
}

/// Reads every piece into `dst` on the current rayon pool. `pieces` must have passed `check` for a
/// buffer of `dst.len()` bytes (they are checked again here; a bad request is an error, not a panic).
pub fn read_into(ckpt: &Checkpoint, pieces: &[Piece], dst: &mut [u8]) -> Result<()> {
    check(ckpt, pieces, dst.len())?;
    // Split `dst` into the disjoint windows the pieces name, then each window into chunks.
    let mut order: Vec<&Piece> = pieces.iter().collect();
    order.sort_unstable_by_key(|p| p.dst_offset);
    let mut rest = dst;
    let mut base = 0usize;
    let mut work: Vec<(&Piece, usize, &mut [u8])> = Vec::new();
    for p in order {
        let (_, tail) = rest.split_at_mut(p.dst_offset - base);
        let (window, tail) = tail.split_at_mut(p.len);
        for (i, chunk) in window.chunks_mut(CHUNK).enumerate() {
            work.push((p, p.offset + i * CHUNK, chunk));
        }
        rest = tail;
        base = p.dst_offset + p.len;
    }
    work.into_par_iter().try_for_each(|(p, from, chunk)| {
        let t = ckpt.info(&p.tensor)?;
        ckpt.read_at(t, from, chunk)
    })
}

/// Test helper: drops the last `bytes` bytes of the file at `path` (a shard cut short under a reader).
#[cfg(test)]
pub(crate) fn cut_short(path: &std::path::Path, bytes: u64) {
    let len = std::fs::metadata(path).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len - bytes)
        .unwrap();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checkpoint(dir: &std::path::Path) -> Checkpoint {
        let a: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let b: Vec<u8> = (0..(CHUNK as u32 + 333)).map(|i| (i % 253) as u8).collect();
        let header = format!(
            "{{\"a\":{{\"dtype\":\"U8\",\"shape\":[{}],\"data_offsets\":[0,{}]}},\
             \"b\":{{\"dtype\":\"U8\",\"shape\":[{}],\"data_offsets\":[{},{}]}}}}",
            a.len(),
            a.len(),
            b.len(),
            a.len(),
            a.len() + b.len()
        );
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(&a);
        bytes.extend_from_slice(&b);
        let path = dir.join("model.safetensors");
        std::fs::write(&path, bytes).unwrap();
        Checkpoint::open(&path).unwrap()
    }

    #[test]
    fn pieces_land_where_asked() {
        let dir = tempfile::tempdir().unwrap();
        let ck = checkpoint(dir.path());
        let b_len = ck.info("b").unwrap().nbytes();
        let pieces = vec![
            Piece {
                tensor: "b".into(),
                offset: 5,
                len: b_len - 5,
                dst_offset: 100,
            },
            Piece {
                tensor: "a".into(),
                offset: 0,
                len: 100,
                dst_offset: 0,
            },
        ];
        let mut dst = vec![0u8; 100 + b_len - 5 + 7];
        read_into(&ck, &pieces, &mut dst).unwrap();
        let a = ck.bytes(ck.info("a").unwrap());
        let b = ck.bytes(ck.info("b").unwrap());
        assert_eq!(&dst[..100], &a[..100]);
        assert_eq!(&dst[100..100 + b_len - 5], &b[5..]);
        assert!(dst[100 + b_len - 5..].iter().all(|&x| x == 0));
    }

    #[test]
    fn bad_requests_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let ck = checkpoint(dir.path());
        let piece = |tensor: &str, offset, len, dst_offset| Piece {
            tensor: tensor.into(),
            offset,
            len,
            dst_offset,
        };
        let mut dst = vec![0u8; 1000];
        for bad in [
            vec![piece("a", 9_990, 11, 0)],
            vec![piece("a", 0, 10, 995)],
            vec![piece("a", 0, 10, 0), piece("a", 0, 10, 5)],
            vec![piece("a", usize::MAX, 2, 0)],
        ] {
            let err = read_into(&ck, &bad, &mut dst).unwrap_err();
            assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
        }
        let err = read_into(&ck, &[piece("zz", 0, 1, 0)], &mut dst).unwrap_err();
        assert!(matches!(err, Error::UnknownTensor { .. }), "{err}");
    }

    #[test]
    fn a_shard_cut_short_after_opening_names_the_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let ck = checkpoint(dir.path());
        cut_short(&dir.path().join("model.safetensors"), 1000);
        let n = ck.info("b").unwrap().nbytes();
        let mut dst = vec![0u8; n];
        let err = read_into(&ck, &[piece_b(n)], &mut dst).unwrap_err();
        match err {
            Error::ShardTruncated { tensor, .. } => assert_eq!(tensor, "b"),
            other => panic!("{other}"),
        }
    }

    fn piece_b(n: usize) -> Piece {
        Piece {
            tensor: "b".into(),
            offset: 0,
            len: n,
            dst_offset: 0,
        }
    }
}
