//! Integration tests of the core crate: safetensors files written by hand (8-byte little-endian header
//! length, JSON header, data), header validation mapped to the right `Error` variant, index routing,
//! round-trip error bounds of the quantizers, and the scalar reference against the SIMD kernels.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use fastq::pack::quantize_tensor;
use fastq::pipeline::{run_all, Options};
use fastq::quant::{dynamic_map, quantize_4bit, quantize_int8, BLOCKSIZES, NESTED_BLOCKSIZE};
use fastq::{Checkpoint, Dtype, Error, FloatSlice, Kernel, Packed, QuantSpec, QuantType};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Map, Value};

/// One tensor entry: name, dtype string, shape, bytes.
type Entry<'a> = (&'a str, &'a str, &'a [usize], Vec<u8>);

/// Writes a safetensors file: tensors back to back in the given order, metadata optional.
fn write_st(path: &Path, entries: &[Entry]) -> PathBuf {
    let mut header = Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut data = Vec::new();
    for (name, dtype, shape, bytes) in entries {
        let start = data.len();
        data.extend_from_slice(bytes);
        header.insert(
            name.to_string(),
            json!({"dtype": dtype, "shape": shape, "data_offsets": [start, data.len()]}),
        );
    }
    let h = Value::Object(header).to_string();
    write_raw(path, h.as_bytes(), h.len() as u64, &data)
}

/// Writes header-length, header and data exactly as given (the length may lie).
fn write_raw(path: &Path, header: &[u8], header_len: u64, data: &[u8]) -> PathBuf {
    let mut out = header_len.to_le_bytes().to_vec();
    out.extend_from_slice(header);
    out.extend_from_slice(data);
    std::fs::write(path, out).unwrap();
    path.to_path_buf()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// `v` encoded as `dtype` (F32, F16 or BF16, rounding to nearest even).
fn encode(v: &[f32], dtype: Dtype) -> Vec<u8> {
    let bits = |x: f32| match dtype {
        Dtype::F16 => half::f16::from_f32(x).to_bits(),
        _ => half::bf16::from_f32(x).to_bits(),
    };
    match dtype {
        Dtype::F32 => f32_bytes(v),
        _ => v.iter().flat_map(|&x| bits(x).to_le_bytes()).collect(),
    }
}

/// Values of every magnitude the dtype holds comfortably, with signs, zeros and exact ties.
fn random(rng: &mut SmallRng, n: usize, dtype: Dtype) -> Vec<f32> {
    let range = if dtype == Dtype::F16 { 4.0 } else { 20.0 };
    (0..n)
        .map(|i| match i % 97 {
            0 => 0.0,
            1 => -0.0,
            2 => 0.5,
            _ => {
                let mag = 10f32.powf(rng.gen_range(-range..range) / 4.0);
                rng.gen_range(-1.0f32..1.0) * mag
            }
        })
        .collect()
}

fn slice(bytes: &[u8], dtype: Dtype) -> FloatSlice<'_> {
    FloatSlice::new(dtype, bytes).unwrap()
}

const FLOATS: [Dtype; 3] = [Dtype::F32, Dtype::F16, Dtype::BF16];
const SCALAR: Kernel = Kernel::Scalar;
const AUTO: Kernel = Kernel::Auto;

fn spec4(quant_type: QuantType, blocksize: usize, double_quant: bool) -> QuantSpec {
    QuantSpec::FourBit {
        quant_type,
        blocksize,
        double_quant,
    }
}

// ------------------------------------------------------------------------------------ reading files

#[test]
fn reads_every_dtype_and_checks_quantizable_ones() {
    let dir = tempfile::tempdir().unwrap();
    let w = f32_bytes(&[1.0, -2.0, 3.0, 4.5, 0.0, 6.0]);
    let ids: Vec<u8> = [7i64, -1].iter().flat_map(|x| x.to_le_bytes()).collect();
    let path = write_st(
        &dir.path().join("m.safetensors"),
        &[
            ("w", "F32", &[2, 3], w.clone()),
            ("h", "F16", &[2], encode(&[0.5, -1.0], Dtype::F16)),
            ("b", "BF16", &[1], encode(&[2.0], Dtype::BF16)),
            ("ids", "I64", &[2], ids.clone()),
            ("mask", "BOOL", &[3], vec![1, 0, 1]),
            ("f8", "F8_E4M3", &[2], vec![0x38, 0xb8]),
            ("empty", "F32", &[0, 4], vec![]),
        ],
    );
    let ck = Checkpoint::open(&path).unwrap();
    assert_eq!(ck.tensors().len(), 7);
    assert_eq!(ck.shards[0].metadata.get("format").unwrap(), "pt");
    let t = ck.info("w").unwrap();
    assert_eq!(
        (t.dtype, &t.shape[..], t.numel()),
        (Dtype::F32, &[2, 3][..], 6)
    );
    assert_eq!(ck.bytes(t), &w[..]);
    assert_eq!(ck.floats(t).unwrap().get(3), 4.5);
    assert_eq!(ck.floats(ck.info("b").unwrap()).unwrap().get(0), 2.0);
    assert_eq!(ck.bytes(ck.info("ids").unwrap()), &ids[..]);
    assert_eq!(ck.info("f8").unwrap().dtype, Dtype::F8E4M3);
    assert_eq!(ck.total_bytes(), 24 + 4 + 2 + 16 + 3 + 2);
    assert!(
        matches!(ck.floats(ck.info("ids").unwrap()), Err(Error::UnsupportedDtype { path: p, tensor, dtype })
        if p == path && tensor == "ids" && dtype == "I64")
    );
    assert!(
        matches!(ck.info("nope"), Err(Error::UnknownTensor { tensor, .. }) if tensor == "nope")
    );
}

/// Opens `path`, which must fail; returns the error.
fn open_err(path: &Path) -> Error {
    match Checkpoint::open(path) {
        Ok(_) => panic!("{} opened, but it is broken", path.display()),
        Err(e) => e,
    }
}

#[test]
fn header_lies_map_to_precise_errors() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name);
    let data = vec![0u8; 32];
    let entry = |off: [u64; 2]| json!({"dtype": "F32", "shape": [2, 2], "data_offsets": off});
    let raw = |name: &str, h: Value| {
        let h = h.to_string();
        write_raw(&p(name), h.as_bytes(), h.len() as u64, &data)
    };

    // The file ends before the last tensor's data.
    let two = [
        ("a", "F32", &[2][..], f32_bytes(&[1.0; 2])),
        ("z", "F32", &[3], f32_bytes(&[1.0; 3])),
    ];
    let good = write_st(&p("cut.safetensors"), &two);
    let len = std::fs::metadata(&good).unwrap().len();
    let file = std::fs::File::options().write(true).open(&good).unwrap();
    file.set_len(len - 1).unwrap();
    assert!(
        matches!(open_err(&good), Error::ShardTruncated { path, tensor, end, file_len }
        if path == good && tensor == "z" && end == len && file_len == len - 1)
    );

    let f = raw("size.safetensors", json!({"a": entry([0, 12])}));
    assert!(matches!(open_err(&f),
        Error::SizeMismatch { path, tensor, expected: 16, actual: 12, .. } if path == f && tensor == "a"));
    let f = raw(
        "overlap.safetensors",
        json!({"a": entry([0, 16]), "b": entry([8, 24])}),
    );
    assert!(matches!(open_err(&f),
        Error::Overlap { path, first, second } if path == f && first == "a" && second == "b"));
    let f128 = json!({"a": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}});
    let f = raw("dtype.safetensors", f128);
    assert!(matches!(open_err(&f),
        Error::UnsupportedDtype { path, tensor, dtype } if path == f && tensor == "a" && dtype == "F128"));
    let f = raw("backwards.safetensors", json!({"a": entry([16, 0])}));
    assert!(matches!(open_err(&f), Error::InvalidHeader { path, .. } if path == f));

    // Not JSON, not an object, a length past the end or over the limit, shorter than 8 bytes.
    std::fs::write(p("short.safetensors"), [1u8, 0, 0]).unwrap();
    let invalid: [(&[u8], u64); 4] = [
        (b"{not json", 9),
        (b"[1,2]", 5),
        (b"{}", 4096),
        (b"{}", 1 << 40),
    ];
    for (i, (header, header_len)) in invalid.into_iter().enumerate() {
        let f = write_raw(&p(&format!("{i}.safetensors")), header, header_len, &data);
        assert!(
            matches!(open_err(&f), Error::InvalidHeader { path, .. } if path == f),
            "{i}"
        );
    }
    let f = p("short.safetensors");
    assert!(matches!(open_err(&f), Error::InvalidHeader { path, .. } if path == f));
    assert!(matches!(open_err(&p("absent")), Error::NotFound { .. }));
}

/// A header padded with spaces to exactly `len` bytes, so that the data section starts at `8 + len`
/// whatever the numbers in it (the offsets below are chosen relative to that start).
fn padded(h: Value, len: usize) -> Vec<u8> {
    let mut h = h.to_string().into_bytes();
    assert!(h.len() <= len, "header longer than {len}");
    h.resize(len, b' ');
    h
}

/// Header claims whose arithmetic overflows: each must be a typed error naming the file and the
/// tensor (before checked arithmetic some passed, pointing the tensor at the header's own bytes, and
/// some panicked in the binding's slice assertion).
#[test]
fn overflowing_claims_are_typed_errors_naming_file_and_tensor() {
    let dir = tempfile::tempdir().unwrap();
    const H: usize = 256;
    let ds = 8 + H as u64; // data_start of every file below
    let data = vec![7u8; 64];
    let write = |name: &str, h: Value| {
        let path = dir.path().join(name);
        write_raw(&path, &padded(h, H), H as u64, &data)
    };
    let one = |dtype: &str, shape: Value, off: [u64; 2]| json!({"a": {"dtype": dtype, "shape": shape, "data_offsets": off}});
    let invalid = |f: &Path, want: &str| {
        let e = open_err(f);
        match &e {
            Error::InvalidHeader {
                path,
                tensor,
                reason,
            } if path == f && tensor == "a" && reason.contains(want) => {}
            _ => panic!("{}: {e:?}", f.display()),
        }
        assert!(e.to_string().contains(&f.display().to_string()), "{e}");
    };
    let max = u64::MAX;
    // An end that overflows on its own once the data section's start is added ...
    invalid(
        &write("end.st", one("F32", json!([2, 2]), [max - 16, max])),
        "overflow",
    );
    // ... and a begin that does not, with an end that wraps past 2^64 to a small offset.
    let begin = max - ds - 7;
    invalid(
        &write("wrap.st", one("F32", json!([2, 2]), [begin, begin + 16])),
        "overflow",
    );
    // Far past the end without overflowing: the file is too short for it.
    let far = write(
        "far.st",
        one("F32", json!([2, 2]), [1 << 63, (1 << 63) + 16]),
    );
    assert!(matches!(open_err(&far),
        Error::ShardTruncated { path, tensor, end, .. } if path == far && tensor == "a" && end == ds + (1 << 63) + 16));
    // Element counts that overflow, or whose size in bytes does; a product that wraps to the span.
    invalid(
        &write(
            "numel.st",
            one("F32", json!([1u64 << 32, 1u64 << 32, 2]), [0, 16]),
        ),
        "overflows",
    );
    invalid(
        &write("bytes.st", one("F32", json!([1u64 << 62]), [0, 16])),
        "overflows",
    );
    invalid(
        &write("wraps.st", one("U8", json!([(1u64 << 62) + 1, 4]), [0, 4])),
        "overflows",
    );
    invalid(
        &write(
            "zero.st",
            one("F32", json!([1u64 << 32, 1u64 << 32, 0]), [0, 0]),
        ),
        "overflows",
    );
    // Negative, fractional and too-large dimensions or offsets are malformed entries.
    invalid(
        &write("neg.st", one("F32", json!([-1, 4]), [0, 16])),
        "malformed",
    );
    invalid(
        &write("frac.st", one("F32", json!([2.5, 4]), [0, 16])),
        "malformed",
    );
    let huge = json!({"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1e30]}});
    invalid(&write("huge.st", huge), "malformed");
    let neg = json!({"a": {"dtype": "U8", "shape": [1], "data_offsets": [-1, 0]}});
    invalid(&write("negoff.st", neg), "malformed");
    // The same name twice (serde would keep the last silently).
    let twice = br#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#;
    let f = write_raw(
        &dir.path().join("twice.st"),
        twice,
        twice.len() as u64,
        &data,
    );
    invalid(&f, "twice");
    // A zero-sized tensor with huge other dimensions is valid (its count is 0 before any overflow).
    let ok = write("empty.st", one("F32", json!([0, 1u64 << 62]), [0, 0]));
    let ck = Checkpoint::open(&ok).unwrap();
    let t = ck.info("a").unwrap();
    assert_eq!((t.numel(), t.nbytes(), ck.bytes(t).len()), (0, 0, 0));

    // Header lengths near 2^64, past the end, or zero.
    for (i, len) in [max, max - 7, 1 << 63, 100_000_001, (H + 64) as u64 + 1, 0]
        .into_iter()
        .enumerate()
    {
        let f = write_raw(
            &dir.path().join(format!("len{i}.st")),
            &padded(json!({}), H),
            len,
            &data,
        );
        assert!(
            matches!(open_err(&f), Error::InvalidHeader { path, tensor, .. } if path == f && tensor.is_empty()),
            "{len}"
        );
    }
    // Exactly 8 bytes: a header length and nothing else.
    let f = write_raw(&dir.path().join("eight.st"), b"", 0, b"");
    assert!(matches!(open_err(&f), Error::InvalidHeader { .. }));
}

/// Shapes handed to the quantizers directly must agree with the data, with checked products.
#[test]
fn quantizer_shapes_are_checked() {
    let x = f32_bytes(&[1.0, 2.0, 3.0, 4.0]);
    let x = slice(&x, Dtype::F32);
    for shape in [
        vec![(1usize << 62) + 1, 4],
        vec![1 << 63, 2],
        vec![3],
        vec![],
    ] {
        for spec in [spec4(QuantType::Nf4, 64, false), QuantSpec::Int8] {
            let e = quantize_tensor(x, &shape, Dtype::F32, spec, AUTO).unwrap_err();
            assert!(matches!(e, Error::BadShape { .. }), "{shape:?} {e}");
        }
    }
    assert!(matches!(
        quantize_int8(x, 1 << 32, 1 << 32, AUTO),
        Err(Error::BadShape { .. })
    ));
}

/// The fuzz targets' checks (`fuzz/fuzz_targets/checks.rs`), shared so that every input a target ever
/// crashed on stays a test.
#[path = "../fuzz/fuzz_targets/checks.rs"]
mod fuzz_checks;

/// Replays the fuzz seeds and every crash input kept under `fuzz/regressions/<target>/` (copied there
/// from `fuzz/artifacts/` when `make fuzz` finds one) through the target's own check: each must be an
/// error or a valid result, never a panic.
#[test]
fn fuzz_regressions_are_errors_not_panics() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    type Check = fn(&[u8]);
    let targets: [(&str, Check); 4] = [
        ("header", fuzz_checks::header),
        ("header_structured", fuzz_checks::header_structured),
        ("index", fuzz_checks::index),
        ("quantize", fuzz_checks::quantize),
    ];
    let mut replayed = 0;
    for (target, check) in targets {
        for kind in ["seeds", "regressions"] {
            let Ok(entries) = std::fs::read_dir(root.join(kind).join(target)) else {
                continue;
            };
            for entry in entries {
                let path = entry.unwrap().path();
                let data = std::fs::read(&path).unwrap();
                let run = std::panic::catch_unwind(|| check(&data));
                assert!(run.is_ok(), "{} panics", path.display());
                replayed += 1;
            }
        }
    }
    assert!(replayed >= 4, "the seeds are missing: {replayed} inputs");
}

const ONE: &str = "model-00001-of-00002.safetensors";
const TWO: &str = "model-00002-of-00002.safetensors";

/// Two shards, named as transformers names them: x and y in the first, z in the second.
fn sharded(dir: &Path) -> (PathBuf, PathBuf) {
    let xy = [
        ("x", "F32", &[2][..], f32_bytes(&[1.0, 2.0])),
        ("y", "F32", &[1], f32_bytes(&[3.0])),
    ];
    let z = [("z", "BF16", &[2][..], encode(&[4.0, 5.0], Dtype::BF16))];
    (write_st(&dir.join(ONE), &xy), write_st(&dir.join(TWO), &z))
}

fn write_index(dir: &Path, map: Value) -> PathBuf {
    let p = dir.join("model.safetensors.index.json");
    let text = json!({"metadata": {"total_size": 16}, "weight_map": map}).to_string();
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn index_routes_tensors_and_is_checked() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (a, b) = sharded(d);
    // A folder of shards without an index reads the same tensors.
    assert_eq!(Checkpoint::open(d).unwrap().tensors().len(), 3);

    let index = write_index(d, json!({"x": ONE, "y": ONE, "z": TWO}));
    std::fs::write(d.join("stray.safetensors"), b"junk").unwrap(); // not in the index: ignored
    let ck = Checkpoint::open(d).unwrap();
    assert_eq!(ck.shards.len(), 2);
    assert_eq!(ck.path_of(ck.info("x").unwrap()), a);
    assert_eq!(ck.path_of(ck.info("z").unwrap()), b);
    assert_eq!(ck.floats(ck.info("z").unwrap()).unwrap().get(1), 5.0);
    std::fs::remove_file(d.join("stray.safetensors")).unwrap();

    write_index(d, json!({"x": TWO, "y": ONE, "z": TWO}));
    assert!(
        matches!(open_err(d), Error::IndexMismatch { index: i, shard, tensor }
        if i == index && shard == TWO && tensor == "x")
    );
    write_index(d, json!({"x": ONE, "y": ONE, "z": TWO, "ghost": ONE}));
    assert!(matches!(open_err(d), Error::IndexMismatch { tensor, .. } if tensor == "ghost"));
    let three = "model-00003-of-00003.safetensors";
    write_index(d, json!({"x": ONE, "y": ONE, "z": three}));
    assert!(
        matches!(open_err(d), Error::MissingShard { index: i, shard, tensor }
        if i == index && shard == three && tensor == "z")
    );
    std::fs::write(&index, b"{nope").unwrap();
    assert!(matches!(open_err(d), Error::InvalidHeader { path, .. } if path == index));

    // Without the index, the same name in two shards is an error.
    std::fs::remove_file(&index).unwrap();
    write_st(
        &d.join("extra.safetensors"),
        &[("x", "F32", &[1], f32_bytes(&[9.0]))],
    );
    assert!(matches!(open_err(d), Error::DuplicateTensor { tensor, .. } if tensor == "x"));
    let empty = tempfile::tempdir().unwrap();
    assert!(matches!(open_err(empty.path()), Error::NotFound { .. }));
}

#[test]
fn pipeline_names_file_and_tensor_in_errors() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = SmallRng::seed_from_u64(7);
    let mut w = random(&mut rng, 64 * 48, Dtype::BF16);
    w.iter_mut().for_each(|v| *v = v.clamp(-6e4, 6e4)); // finite in float16, for int8
    let mut bad = w.clone();
    bad[100] = f32::NAN;
    let ids = vec![0u8; 16];
    let path = write_st(
        &dir.path().join("m.safetensors"),
        &[
            ("w", "BF16", &[64, 48], encode(&w, Dtype::BF16)),
            ("bad", "F32", &[64, 48], f32_bytes(&bad)),
            ("ids", "I64", &[2], ids),
        ],
    );
    let ck = Arc::new(Checkpoint::open(&path).unwrap());
    let run = |jobs: &[(&str, QuantSpec)]| {
        let jobs = jobs.iter().map(|(n, s)| (n.to_string(), *s)).collect();
        run_all(ck.clone(), jobs, Options::default())
    };
    let spec = spec4(QuantType::Nf4, 64, true);
    let got = run(&[("w", spec), ("w", QuantSpec::Int8)]).unwrap();
    let bytes = encode(&w, Dtype::BF16);
    for (p, s) in got.iter().zip([spec, QuantSpec::Int8]) {
        let direct = quantize_tensor(
            slice(&bytes, Dtype::BF16),
            &[64, 48],
            Dtype::BF16,
            s,
            SCALAR,
        );
        assert_eq!(format!("{p:?}"), format!("{:?}", direct.unwrap()));
    }
    assert!(matches!(run(&[("bad", QuantSpec::Int8)]),
        Err(Error::NonFinite { path: p, tensor, index: 100 }) if p == path && tensor == "bad"));
    assert!(matches!(run(&[("ids", spec)]),
        Err(Error::UnsupportedDtype { path: p, tensor, .. }) if p == path && tensor == "ids"));
    let bad_blocksize = spec4(QuantType::Fp4, 48, false);
    assert!(matches!(
        run(&[("w", bad_blocksize)]),
        Err(Error::InvalidArgument(_))
    ));
}

// ------------------------------------------------------------------------------ quantizer accuracy

/// Half the largest gap between adjacent sorted values of a code.
fn half_gap(code: &[f32]) -> f32 {
    let mut c = code.to_vec();
    c.sort_by(f32::total_cmp);
    c.windows(2).map(|w| w[1] - w[0]).fold(0.0, f32::max) / 2.0
}

fn unpack(codes: &[u8], n: usize) -> Vec<usize> {
    codes
        .iter()
        .flat_map(|b| [(b >> 4) as usize, (b & 15) as usize])
        .take(n)
        .collect()
}

#[test]
fn four_bit_round_trip_is_within_half_a_code_gap() {
    let mut rng = SmallRng::seed_from_u64(1);
    for qt in [QuantType::Nf4, QuantType::Fp4] {
        let code = qt.code();
        let gap = half_gap(&code);
        for dtype in FLOATS {
            for &bs in &[32, 64, 256, 4096] {
                let n = 3 * bs + 37; // a tail block, and an odd count
                let x = random(&mut rng, n, dtype);
                let bytes = encode(&x, dtype);
                let xs = slice(&bytes, dtype);
                let (packed, absmax) = quantize_4bit(xs, qt, bs, AUTO).unwrap();
                assert_eq!(packed.len(), n.div_ceil(2));
                for (i, q) in unpack(&packed, n).into_iter().enumerate() {
                    let am = absmax[i / bs];
                    let err = (xs.get(i) - code[q] * am).abs();
                    assert!(
                        err <= (gap + 1e-6) * am,
                        "{qt:?} {dtype} bs {bs} elt {i}: {err} > {gap} * {am}"
                    );
                }
                // Double quantization: the stored absmax comes back within half a gap of the map.
                let spec = spec4(qt, bs, true);
                let Ok(Packed::FourBit(p)) = quantize_tensor(xs, &[n], dtype, spec, AUTO) else {
                    panic!("4-bit result expected")
                };
                let nested = p.nested.unwrap();
                let map = dynamic_map();
                let mgap = half_gap(&map);
                for (i, &a) in absmax.iter().enumerate() {
                    let na = nested.absmax[i / NESTED_BLOCKSIZE];
                    let back = map[nested.codes[i] as usize] * na + nested.offset;
                    assert!((back - a).abs() <= (mgap + 1e-6) * na + 1e-6 * a.abs());
                }
            }
        }
    }
}

#[test]
fn all_zero_blocks_are_the_cuda_kernels() {
    // The CUDA kernel stores an all-zero block's absmax as 0, the tail's too, and its values scale into
    // NaN, which both searches send to code 0 (bitsandbytes' CPU kernel: 1e-38 in the tail, code 7).
    for qt in [QuantType::Nf4, QuantType::Fp4] {
        let x = f32_bytes(&[0.0; 64 + 5]);
        let (codes, absmax) = quantize_4bit(slice(&x, Dtype::F32), qt, 64, AUTO).unwrap();
        assert_eq!(absmax, vec![0.0, 0.0], "{qt:?}");
        assert!(codes.iter().all(|&c| c == 0), "{qt:?}");
    }
}

#[test]
fn int8_round_trip_is_within_half_a_step() {
    let mut rng = SmallRng::seed_from_u64(2);
    for dtype in FLOATS {
        let (rows, cols) = (19, 133);
        let mut x = random(&mut rng, rows * cols, dtype);
        x.iter_mut().for_each(|v| *v = v.clamp(-6e4, 6e4));
        x[5 * cols..6 * cols].fill(0.0); // a zero row
        let bytes = encode(&x, dtype);
        let xs = slice(&bytes, dtype);
        let (cb, scb) = quantize_int8(xs, rows, cols, AUTO).unwrap();
        assert_eq!(scb[5], 0.0);
        for i in 0..rows * cols {
            let v = half::f16::from_f32(xs.get(i)).to_f32();
            let s = scb[i / cols];
            let back = cb[i] as f32 * s / 127.0;
            assert!(
                (v - back).abs() <= s / 254.0 * (1.0 + 1e-5),
                "{dtype} elt {i}"
            );
        }
    }
}

// ----------------------------------------------------------------------- scalar reference vs SIMD

#[test]
fn simd_equals_scalar_four_bit() {
    let mut rng = SmallRng::seed_from_u64(3);
    for dtype in FLOATS {
        for qt in [QuantType::Nf4, QuantType::Fp4] {
            for &bs in BLOCKSIZES.iter() {
                for n in [1, 31, bs, bs + 1, 5 * bs + 17, 3 * 4096 + 9] {
                    let x = random(&mut rng, n, dtype);
                    let bytes = encode(&x, dtype);
                    let xs = slice(&bytes, dtype);
                    let fast = quantize_4bit(xs, qt, bs, AUTO).unwrap();
                    let slow = quantize_4bit(xs, qt, bs, SCALAR).unwrap();
                    assert_eq!(fast, slow, "{dtype} {qt:?} bs {bs} n {n}");
                }
            }
        }
    }
}

#[test]
fn simd_equals_scalar_on_extremes_and_across_chunks() {
    let mut rng = SmallRng::seed_from_u64(4);
    let n = (1 << 19) + 4096 + 33; // longer than two parallel chunks, with a tail
    for dtype in FLOATS {
        let max = match dtype {
            Dtype::F16 => 65504.0,
            Dtype::BF16 => 3.38e38, // below bfloat16's largest value, so rounding stays finite
            _ => f32::MAX,
        };
        let x: Vec<f32> = (0..n)
            .map(|i| match (i / 64) % 4 {
                0 => rng.gen_range(-1.0f32..1.0) * max,   // huge blocks
                1 => rng.gen_range(-1.0f32..1.0) * 1e-40, // subnormal blocks
                2 => 0.0,                                 // zero blocks
                _ => rng.gen_range(-1.0f32..1.0),
            })
            .collect();
        let bytes = encode(&x, dtype);
        let xs = slice(&bytes, dtype);
        for spec in [
            spec4(QuantType::Nf4, 64, true),
            spec4(QuantType::Fp4, 4096, false),
        ] {
            let fast = quantize_tensor(xs, &[n], dtype, spec, AUTO).unwrap();
            let slow = quantize_tensor(xs, &[n], dtype, spec, SCALAR).unwrap();
            assert_eq!(format!("{fast:?}"), format!("{slow:?}"), "{dtype} {spec:?}");
        }
    }
}

#[test]
fn simd_equals_scalar_int8() {
    let mut rng = SmallRng::seed_from_u64(5);
    for dtype in FLOATS {
        let shapes = [
            (1, 1),
            (3, 7),
            (5, 8),
            (4, 31),
            (6, 32),
            (7, 33),
            (9, 100),
            (300, 1000),
        ];
        for (rows, cols) in shapes {
            let mut x = random(&mut rng, rows * cols, dtype);
            x.iter_mut().for_each(|v| *v = v.clamp(-6e4, 6e4)); // finite in float16, for int8
            if rows > 2 {
                x[cols..2 * cols].fill(0.0);
            }
            let (i, j) = (rng.gen_range(0..x.len()), rng.gen_range(0..x.len()));
            x[i] = 126.5; // halfway cases after scaling are likelier with round numbers
            x[j] = -0.0;
            let bytes = encode(&x, dtype);
            let xs = slice(&bytes, dtype);
            let fast = quantize_int8(xs, rows, cols, AUTO).unwrap();
            let slow = quantize_int8(xs, rows, cols, SCALAR).unwrap();
            assert_eq!(fast, slow, "{dtype} {rows}x{cols}");
        }
    }
}

#[test]
fn non_finite_is_found_by_every_kernel() {
    for dtype in FLOATS {
        for (at, bad) in [
            (0, f32::NAN),
            (70, f32::INFINITY),
            (511, f32::NAN),
            (999, -f32::INFINITY),
        ] {
            let mut x = vec![0.25f32; 1000]; // 15 blocks of 64 and a tail; 40 rows of 25 for int8
            x[at] = bad;
            let bytes = encode(&x, dtype);
            for kernel in [AUTO, SCALAR] {
                let r = quantize_4bit(slice(&bytes, dtype), QuantType::Nf4, 64, kernel);
                assert!(
                    matches!(r, Err(Error::NonFinite { index, .. }) if index == at),
                    "{dtype} {at}"
                );
                let r = quantize_int8(slice(&bytes, dtype), 40, 25, kernel);
                assert!(
                    matches!(r, Err(Error::NonFinite { index, .. }) if index == at),
                    "{dtype} {at}"
                );
            }
        }
    }
    // float32 beyond float16's range is an error for int8 (bitsandbytes would make it inf).
    let big = f32_bytes(&[1.0, 70000.0]);
    for kernel in [AUTO, SCALAR] {
        let r = quantize_int8(slice(&big, Dtype::F32), 1, 2, kernel);
        assert!(matches!(r, Err(Error::NonFinite { index: 1, .. })));
    }
}
