//! Range jobs (`Job::range`, the FSDP share's: python/fastq/shard.py): quantizing elements
//! `start..end` of a checkpoint tensor, read through a window over its positioned reads, gives the
//! bytes of quantizing that slice on its own, which are those blocks of the whole tensor's result; a
//! range that cannot be quantized alone is a `BadRange` naming the file and the tensor.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use fastq::job::quantize_job;
use fastq::pack::quantize_tensor;
use fastq::pipeline::{spawn_jobs, Options};
use fastq::{
    Checkpoint, Dtype, Error, FloatSlice, Job, Kernel, Packed, Packed4, QuantSpec, QuantType,
};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// One safetensors file holding `w` (`dtype`, `shape`).
fn write_one(dir: &Path, dtype: Dtype, shape: &[usize], w: &[f32]) -> PathBuf {
    let data: Vec<u8> = match dtype {
        Dtype::F32 => w.iter().flat_map(|x| x.to_le_bytes()).collect(),
        _ => w
            .iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_bits().to_le_bytes())
            .collect(),
    };
    let header = serde_json::json!({
        "w": {"dtype": dtype.as_str(), "shape": shape, "data_offsets": [0, data.len()]}
    })
    .to_string();
    let path = dir.join("m.safetensors");
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(&data);
    std::fs::write(&path, out).unwrap();
    path
}

fn nf4(blocksize: usize, double_quant: bool) -> QuantSpec {
    QuantSpec::FourBit {
        quant_type: QuantType::Nf4,
        blocksize,
        double_quant,
    }
}

fn ranged(spec: QuantSpec, range: std::ops::Range<usize>) -> Job {
    Job {
        range: Some(range),
        ..Job::new("w", spec)
    }
}

fn four(p: Packed) -> Packed4 {
    match p {
        Packed::FourBit(p) => p,
        Packed::Int8(_) => panic!("a 4-bit job gave int8"),
    }
}

/// Every range, cast or not, equals quantizing its slice alone, and is its blocks of the whole
/// tensor's result (codes and absmax), across the pipeline's chunk boundaries (2^18 elements).
#[test]
fn a_range_is_the_slice_quantized_alone() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = SmallRng::seed_from_u64(11);
    let (rows, cols) = (300, 1001); // odd element count: the last packed byte holds one code
    let n = rows * cols;
    let w: Vec<f32> = (0..n).map(|_| rng.gen_range(-3.0f32..3.0)).collect();
    let path = write_one(dir.path(), Dtype::F32, &[rows, cols], &w);
    let ck = Checkpoint::open(&path).unwrap();
    let bs = 64;
    let whole = four(quantize_job(&ck, &Job::new("w", nf4(bs, false)), Kernel::Auto).unwrap());
    let bytes: Vec<u8> = w.iter().flat_map(|x| x.to_le_bytes()).collect();
    for (start, end) in [
        (0, n),
        (0, 64),
        (64 * 5, 64 * 4100),
        (64 * 4000, n),
        (64 * 4000, n + 63),
        (n / 64 * 64, n + 1000),
    ] {
        let got =
            four(quantize_job(&ck, &ranged(nf4(bs, false), start..end), Kernel::Auto).unwrap());
        let end = end.min(n);
        let x = FloatSlice::new(Dtype::F32, &bytes[start * 4..end * 4]).unwrap();
        let alone = four(
            quantize_tensor(x, &[end - start], Dtype::F32, nf4(bs, false), Kernel::Auto).unwrap(),
        );
        assert_eq!(format!("{got:?}"), format!("{alone:?}"), "{start}..{end}");
        assert_eq!(got.shape, vec![end - start]);
        assert_eq!(
            got.codes[..],
            whole.codes[start / 2..end.div_ceil(2)],
            "{start}..{end}"
        );
        assert_eq!(
            got.absmax[..],
            whole.absmax[start / bs..end.div_ceil(bs)],
            "{start}..{end}"
        );
    }
    // Cast first (F32 -> BF16, as torch rounds), then the window: the whole cast tensor's blocks.
    let cast = |range| Job {
        cast: Some(Dtype::BF16),
        range,
        ..Job::new("w", nf4(128, false))
    };
    let whole = four(quantize_job(&ck, &cast(None), Kernel::Auto).unwrap());
    let got = four(quantize_job(&ck, &cast(Some(128 * 7..128 * 2100)), Kernel::Auto).unwrap());
    assert_eq!(got.dtype, Dtype::BF16);
    assert_eq!(got.codes[..], whole.codes[128 * 7 / 2..128 * 2100 / 2]);
    assert_eq!(got.absmax[..], whole.absmax[7..2100]);
}

/// The pipeline runs range jobs beside whole ones, in order.
#[test]
fn the_pipeline_runs_range_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = SmallRng::seed_from_u64(12);
    let w: Vec<f32> = (0..64 * 640).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
    let path = write_one(dir.path(), Dtype::BF16, &[640, 64], &w);
    let ck = Arc::new(Checkpoint::open(&path).unwrap());
    let jobs = vec![
        ranged(nf4(64, false), 0..64 * 320),
        ranged(nf4(64, false), 64 * 320..64 * 640),
        Job::new("w", nf4(64, false)),
    ];
    let got: Vec<Packed4> = spawn_jobs(ck, jobs, Options::default())
        .unwrap()
        .into_iter()
        .map(|(_, r)| four(r.unwrap()))
        .collect();
    assert_eq!(
        [&got[0].codes[..], &got[1].codes[..]].concat(),
        got[2].codes
    );
    assert_eq!(
        [&got[0].absmax[..], &got[1].absmax[..]].concat(),
        got[2].absmax
    );
}

/// Ranges that cannot be quantized alone are `BadRange` naming the file and the tensor (from the
/// pipeline too, before any read); a conversion refuses ranges.
#[test]
fn bad_ranges_are_typed_errors_naming_file_and_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let w = vec![0.5f32; 64 * 10 + 3];
    let path = write_one(dir.path(), Dtype::F32, &[64 * 10 + 3], &w);
    let ck = Checkpoint::open(&path).unwrap();
    let n = w.len();
    let bad = |job: Job, why: &str| match quantize_job(&ck, &job, Kernel::Auto) {
        Err(Error::BadRange {
            path: p,
            tensor,
            reason,
            ..
        }) => {
            assert_eq!(
                (p.as_path(), tensor.as_str()),
                (path.as_path(), "w"),
                "{why}"
            );
            assert!(reason.contains(why), "{reason:?} lacks {why:?}");
        }
        other => panic!("{why}: {other:?}"),
    };
    bad(
        ranged(nf4(64, false), 32..128),
        "start is not on a 64-element block boundary",
    );
    bad(
        ranged(nf4(64, false), 64..100),
        "end is neither on a 64-element block boundary",
    );
    bad(
        ranged(nf4(64, false), 64 * 11..64 * 12),
        "starts outside the tensor's 643 elements",
    );
    bad(ranged(nf4(64, false), 64 * 2..64 * 2), "empty");
    bad(
        ranged(nf4(64, false), usize::MAX - 63..usize::MAX),
        "starts outside",
    );
    bad(ranged(nf4(64, true), 0..64), "double_quant=False");
    bad(ranged(QuantSpec::Int8, 0..64), "4-bit jobs only");
    bad(
        Job {
            transpose: true,
            ..ranged(nf4(64, false), 0..64)
        },
        "transposed",
    );
    // At or past the end is clipped to it, even when the end is not on a block boundary.
    let tail = four(
        quantize_job(
            &ck,
            &ranged(nf4(64, false), 64 * 10..usize::MAX),
            Kernel::Auto,
        )
        .unwrap(),
    );
    assert_eq!(tail.shape, vec![n - 640]);
    let rx = spawn_jobs(
        Arc::new(Checkpoint::open(&path).unwrap()),
        vec![ranged(nf4(64, true), 0..64)],
        Options::default(),
    );
    assert!(matches!(rx, Err(Error::BadRange { tensor, .. }) if tensor == "w"));
    let layout =
        fastq::writer::Layout::new(&ck, vec![ranged(nf4(64, false), 0..64)], vec![], 1 << 30);
    assert!(matches!(layout, Err(Error::BadRange { path: p, .. }) if p == path));
}
