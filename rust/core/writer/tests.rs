//! End-to-end tests of the writer: a small checkpoint converted, read back, cancelled and resumed.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::checkpoint::Checkpoint;
use crate::dtype::Dtype;
use crate::pack::{quantize_tensor, Packed, QuantSpec};
use crate::quant::{Kernel, QuantType};

use super::digest::file_checksum;
use super::layout::{Content, Layout, Output, Part};
use super::manifest::{Manifest, MANIFEST_NAME};
use super::run::{convert, Options, Progress};
use crate::job::Job;

/// Writes a safetensors file of (name, dtype, shape, bytes).
fn write_source(path: &Path, tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) {
    let mut header = serde_json::Map::new();
    let mut at = 0usize;
    for (name, dtype, shape, bytes) in tensors {
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": dtype.as_str(), "shape": shape, "data_offsets": [at, at + bytes.len()]}),
        );
        at += bytes.len();
    }
    let mut text = serde_json::Value::Object(header).to_string().into_bytes();
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    for (_, _, _, bytes) in tensors {
        out.extend_from_slice(bytes);
    }
    std::fs::write(path, out).unwrap();
}

fn bf16(n: usize, seed: u32) -> Vec<u8> {
    (0..n)
        .flat_map(|i| {
            let x = (((i as u32).wrapping_mul(2654435761) ^ seed) % 2001) as f32 / 1000.0 - 1.0;
            half::bf16::from_f32(x * 0.05).to_le_bytes()
        })
        .collect()
}

fn f32s(n: usize) -> Vec<u8> {
    (0..n)
        .flat_map(|i| (1.0 + i as f32 / 7.0).to_le_bytes())
        .collect()
}

fn nf4(double_quant: bool) -> QuantSpec {
    QuantSpec::FourBit {
        quant_type: QuantType::Nf4,
        blocksize: 64,
        double_quant,
    }
}

fn source(dir: &Path) -> PathBuf {
    let path = dir.join("src.safetensors");
    write_source(
        &path,
        &[
            ("a.weight", Dtype::BF16, vec![64, 128], bf16(64 * 128, 1)),
            ("b.weight", Dtype::BF16, vec![96, 64], bf16(96 * 64, 2)),
            ("c.weight", Dtype::F32, vec![32, 64], f32s(32 * 64)),
            ("norm.weight", Dtype::F32, vec![128], f32s(128)),
            (
                "ids",
                Dtype::I64,
                vec![3],
                [1i64, 2, 3].iter().flat_map(|v| v.to_le_bytes()).collect(),
            ),
        ],
    );
    path
}

fn part(name: &str, job: usize, part: Part) -> Output {
    Output {
        name: name.into(),
        content: Content::Quantized { job, part },
    }
}

fn layout(ckpt: &Checkpoint, max_shard_size: u64) -> Layout {
    let job = |source: &str, spec, cast| Job {
        name: source.into(),
        spec,
        transpose: false,
        cast,
        storage: Dtype::U8,
        range: None,
    };
    let jobs = vec![
        job("a.weight", nf4(true), None),
        job("b.weight", QuantSpec::Int8, None),
        job("c.weight", nf4(false), Some(Dtype::BF16)),
    ];
    let outputs = vec![
        part("a.weight", 0, Part::Weight),
        part("a.weight.absmax", 0, Part::Absmax),
        part("a.weight.quant_map", 0, Part::QuantMap),
        part("a.weight.nested_absmax", 0, Part::NestedAbsmax),
        part("a.weight.nested_quant_map", 0, Part::NestedQuantMap),
        part(
            "a.weight.quant_state.bitsandbytes__nf4",
            0,
            Part::QuantState,
        ),
        part("b.weight", 1, Part::Weight),
        part("b.SCB", 1, Part::Scb),
        part("b.weight_format", 1, Part::WeightFormat),
        part("c.weight", 2, Part::Weight),
        part("c.weight.absmax", 2, Part::Absmax),
        part("c.weight.quant_map", 2, Part::QuantMap),
        part(
            "c.weight.quant_state.bitsandbytes__nf4",
            2,
            Part::QuantState,
        ),
        Output {
            name: "norm.weight".into(),
            content: Content::Copy {
                source: "norm.weight".into(),
                transpose: false,
                cast: Some(Dtype::BF16),
            },
        },
        Output {
            name: "ids".into(),
            content: Content::Copy {
                source: "ids".into(),
                transpose: false,
                cast: None,
            },
        },
        Output {
            name: "extra".into(),
            content: Content::Inline {
                dtype: Dtype::U8,
                shape: vec![2],
                bytes: vec![7, 9],
            },
        },
    ];
    Layout::new(ckpt, jobs, outputs, max_shard_size).unwrap()
}

fn run(
    src: &Path,
    dir: &Path,
    max_shard_size: u64,
    resume: bool,
    stop_after: Option<usize>,
) -> (Option<super::Summary>, Vec<Progress>) {
    let ckpt = Arc::new(Checkpoint::open(src).unwrap());
    let layout = layout(&ckpt, max_shard_size);
    std::fs::create_dir_all(dir).unwrap();
    let opts = Options {
        resume,
        fsync: false,
        params_json: r#"{"test": 1}"#.into(),
        progress_interval: std::time::Duration::ZERO,
        ..Options::default()
    };
    let mut seen = Vec::new();
    let mut cb = |p: &Progress| {
        seen.push(p.clone());
        stop_after.is_none_or(|n| p.shards_done < n)
    };
    let summary = convert(ckpt, &layout, dir, &opts, &mut cb).unwrap();
    (summary, seen)
}

/// A run into `dir` cancelled once two shards are done; the manifest it leaves.
/// Every file of `whole` has the same bytes in `part`.
fn assert_same_files(whole: &Path, part: &Path) {
    for entry in std::fs::read_dir(whole).unwrap() {
        let name = entry.unwrap().file_name();
        assert_eq!(
            std::fs::read(whole.join(&name)).unwrap(),
            std::fs::read(part.join(&name)).unwrap(),
            "{name:?}"
        );
    }
}

fn cancelled_after_two_shards(src: &Path, dir: &Path) -> Manifest {
    let (s, _) = run(src, dir, 1500, false, Some(2));
    assert!(s.is_none(), "cancelled");
    serde_json::from_slice(&std::fs::read(dir.join(MANIFEST_NAME)).unwrap()).unwrap()
}

#[test]
fn converts_what_the_quantizers_produce() {
    let tmp = tempfile::tempdir().unwrap();
    let src = source(tmp.path());
    let out = tmp.path().join("out");
    let (summary, seen) = run(&src, &out, 1 << 30, false, None);
    let summary = summary.expect("not cancelled");
    assert_eq!(summary.shards.len(), 1);
    assert_eq!(
        seen.last().unwrap().bytes_done,
        seen.last().unwrap().bytes_total
    );
    let got = Checkpoint::open(out.join("model.safetensors")).unwrap();
    let read = |name: &str| {
        let t = got.info(name).unwrap();
        (t.dtype, t.shape.clone(), got.bytes(t).to_vec())
    };
    let src_ckpt = Checkpoint::open(&src).unwrap();
    let x = src_ckpt.floats(src_ckpt.info("a.weight").unwrap()).unwrap();
    let Packed::FourBit(p) =
        quantize_tensor(x, &[64, 128], Dtype::BF16, nf4(true), Kernel::Auto).unwrap()
    else {
        unreachable!()
    };
    assert_eq!(
        read("a.weight"),
        (Dtype::U8, vec![4096, 1], p.codes.clone())
    );
    let nested = p.nested.as_ref().unwrap();
    assert_eq!(read("a.weight.absmax").2, nested.codes);
    let json = String::from_utf8(read("a.weight.quant_state.bitsandbytes__nf4").2).unwrap();
    assert!(json.starts_with(
        r#"{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [64, 128]"#
    ));
    assert!(json.ends_with(&format!(
        "\"nested_offset\": {}}}",
        super::py_float_repr(nested.offset as f64)
    )));
    // the cast job is quantized from bf16 values and says so
    let cjson = String::from_utf8(read("c.weight.quant_state.bitsandbytes__nf4").2).unwrap();
    assert!(cjson.contains(r#""dtype": "bfloat16""#), "{cjson}");
    assert_eq!(read("b.weight").0, Dtype::I8);
    assert_eq!(read("b.weight_format"), (Dtype::U8, vec![], vec![0]));
    assert_eq!(read("norm.weight").0, Dtype::BF16);
    assert_eq!(
        read("ids").2,
        [1i64, 2, 3]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect::<Vec<_>>()
    );
    assert_eq!(read("extra").2, vec![7, 9]);
    // data_size is the index's total_size: every tensor's bytes
    let total: usize = got.tensors().iter().map(|t| t.nbytes()).sum();
    assert_eq!(summary.total_size, total as u64);
    // the manifest vouches for the shard
    let m: Manifest =
        serde_json::from_slice(&std::fs::read(out.join(MANIFEST_NAME)).unwrap()).unwrap();
    let rec = &m.shards["model.safetensors"];
    assert_eq!(
        rec.digest,
        file_checksum(&out.join("model.safetensors")).unwrap()
    );
}

#[test]
fn cancel_then_resume_gives_the_same_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let src = source(tmp.path());
    let whole = tmp.path().join("whole");
    let (s, _) = run(&src, &whole, 1500, false, None);
    let n = s.unwrap().shards.len();
    assert!(n >= 4, "{n} shards");
    let part = tmp.path().join("part");
    let m = cancelled_after_two_shards(&src, &part);
    let kept = m.shards.len();
    assert!(kept >= 2 && kept < n, "{kept} of {n}");
    // damage one finished shard: the resumed run writes it again
    let victim = part.join(m.shards.keys().next().unwrap());
    let mut bytes = std::fs::read(&victim).unwrap();
    *bytes.last_mut().unwrap() ^= 1;
    std::fs::write(&victim, bytes).unwrap();
    let (s, seen) = run(&src, &part, 1500, true, None);
    assert!(s.unwrap().shards.iter().filter(|s| s.resumed).count() == kept - 1);
    assert_eq!(seen[0].shards_resumed, kept - 1);
    assert_same_files(&whole, &part);
}

#[test]
fn resume_refuses_other_parameters() {
    let tmp = tempfile::tempdir().unwrap();
    let src = source(tmp.path());
    let out = tmp.path().join("out");
    run(&src, &out, 4096, false, Some(1));
    let ckpt = Arc::new(Checkpoint::open(&src).unwrap());
    let layout = layout(&ckpt, 4096);
    let opts = Options {
        resume: true,
        params_json: r#"{"test": 2}"#.into(),
        ..Options::default()
    };
    let err = convert(ckpt, &layout, &out, &opts, &mut |_| true).unwrap_err();
    assert!(err.to_string().contains("other parameters"), "{err}");
}

#[test]
fn a_nan_names_the_file_and_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("nan.safetensors");
    let mut w = bf16(64 * 128, 3);
    w[10..12].copy_from_slice(&half::bf16::NAN.to_le_bytes());
    write_source(&path, &[("a.weight", Dtype::BF16, vec![64, 128], w)]);
    let ckpt = Arc::new(Checkpoint::open(&path).unwrap());
    let jobs = vec![Job {
        name: "a.weight".into(),
        spec: nf4(false),
        transpose: false,
        cast: None,
        storage: Dtype::U8,
        range: None,
    }];
    let layout = Layout::new(
        &ckpt,
        jobs,
        vec![part("a.weight", 0, Part::Weight)],
        1 << 30,
    )
    .unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let err = convert(ckpt, &layout, &out, &Options::default(), &mut |_| true).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("nan.safetensors") && msg.contains("a.weight") && msg.contains("element 5"),
        "{msg}"
    );
}

#[test]
fn resume_rewrites_the_shards_of_a_source_changed_in_place() {
    use std::os::unix::fs::FileExt;
    let tmp = tempfile::tempdir().unwrap();
    let src = source(tmp.path());
    let part = tmp.path().join("part");
    let m = cancelled_after_two_shards(&src, &part);
    let kept = m.shards.len();
    assert!(
        m.shards.values().all(|r| r.source.starts_with("xxh3-128:")),
        "{m:?}"
    );
    // The first output shards hold a.weight's parts: change its source bytes, same size. (Size and
    // mtime are the caller's parameters; the core must not need them to notice.)
    let a = Checkpoint::open(&src)
        .unwrap()
        .info("a.weight")
        .unwrap()
        .clone();
    let file = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
    file.write_all_at(&bf16(64, 99), a.start as u64).unwrap();
    let (s, _) = run(&src, &part, 1500, true, None);
    let s = s.unwrap();
    let resumed: Vec<&str> = s
        .shards
        .iter()
        .filter(|s| s.resumed)
        .map(|s| s.name.as_str())
        .collect();
    assert!(resumed.len() < kept, "{resumed:?} of {kept}");
    for shard in s.shards.iter().filter(|s| s.resumed) {
        assert!(
            !shard.tensors.iter().any(|t| t.starts_with("a.weight")),
            "{} was kept",
            shard.name
        );
    }
    let whole = tmp.path().join("whole");
    run(&src, &whole, 1500, false, None).0.unwrap();
    assert_same_files(&whole, &part);
}
