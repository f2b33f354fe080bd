//! Helpers shared by the criterion benches: seeded weight-like data, a minimal safetensors writer, and
//! the cached ~2 GB Llama-shaped checkpoint that `load.rs` (and `bench_pipeline.py`) read.
//!
//! Included with `#[path = "common/mod.rs"] mod common;`; each bench uses a subset of it.
#![allow(dead_code)]

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use rand::rngs::SmallRng;
use rand::{RngCore, SeedableRng};

/// Shape of the matrix the quantize bench uses (Llama-7B's MLP: intermediate x hidden).
pub const ROWS: usize = 4096;
pub const COLS: usize = 11008;

/// `n` bf16 values (little-endian bytes) of a seeded, roughly normal distribution with standard
/// deviation `std`. Each value is the centred sum of four uniform 16-bit draws (Irwin-Hall), which is
/// bell-shaped and bounded; real weights look like this except for rare outliers.
pub fn normal_bf16(n: usize, seed: u64, std: f32) -> Vec<u8> {
    let mut rng = SmallRng::seed_from_u64(seed);
    // Sum of 4 U(0, 65535) has mean 2 * 65535 and standard deviation 65535 * sqrt(4 / 12).
    let scale = std / (65535.0 * (4.0f32 / 12.0).sqrt());
    let mut out = Vec::with_capacity(n * 2);
    for _ in 0..n {
        let r = rng.next_u64();
        let s = (r & 0xffff) + ((r >> 16) & 0xffff) + ((r >> 32) & 0xffff) + (r >> 48);
        let v = (s as f32 - 2.0 * 65535.0) * scale;
        out.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes());
    }
    out
}

/// One tensor of a shard to write: name, shape, and a seed for its bf16 contents.
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub seed: u64,
}

impl TensorSpec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Writes a safetensors file of bf16 tensors (header: JSON padded with spaces to a multiple of 8, as
/// the safetensors crate does). Tensors are generated one at a time, so memory stays at one tensor.
pub fn write_safetensors(path: &Path, tensors: &[TensorSpec]) -> std::io::Result<()> {
    let mut header = serde_json::Map::new();
    let mut meta = serde_json::Map::new();
    meta.insert("format".into(), "pt".into());
    header.insert("__metadata__".into(), meta.into());
    let mut offset = 0usize;
    for t in tensors {
        let nbytes = t.numel() * 2;
        header.insert(
            t.name.clone(),
            serde_json::json!({
                "dtype": "BF16",
                "shape": t.shape,
                "data_offsets": [offset, offset + nbytes],
            }),
        );
        offset += nbytes;
    }
    let mut text = serde_json::Value::Object(header).to_string().into_bytes();
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }
    let mut w = BufWriter::with_capacity(8 << 20, File::create(path)?);
    w.write_all(&(text.len() as u64).to_le_bytes())?;
    w.write_all(&text)?;
    for t in tensors {
        // Norm weights are ones, as in a freshly initialised model; matrices are weight-like.
        let data = if t.shape.len() == 1 {
            half::bf16::from_f32(1.0).to_le_bytes().repeat(t.numel())
        } else {
            normal_bf16(t.numel(), t.seed, 0.02)
        };
        w.write_all(&data)?;
    }
    w.into_inner().map_err(|e| e.into_error())?.sync_all()
}

/// Shape of the bench checkpoint: TinyLlama-1.1B (hidden 2048, intermediate 5632, 22 layers, 32 query
/// and 4 key/value heads of 64, vocabulary 32000): 1.1 B parameters, 2.2 GB in bf16.
pub const HIDDEN: usize = 2048;
pub const INTERMEDIATE: usize = 5632;
pub const LAYERS: usize = 22;
pub const KV_DIM: usize = 256;
pub const VOCAB: usize = 32000;
pub const SHARDS: usize = 3;

/// Every tensor of the bench checkpoint, in file order, with the shard it goes to.
pub fn llama_tensors() -> Vec<(usize, TensorSpec)> {
    let mut v: Vec<(String, Vec<usize>)> =
        vec![("model.embed_tokens.weight".into(), vec![VOCAB, HIDDEN])];
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}");
        v.push((format!("{p}.input_layernorm.weight"), vec![HIDDEN]));
        v.push((format!("{p}.self_attn.q_proj.weight"), vec![HIDDEN, HIDDEN]));
        v.push((format!("{p}.self_attn.k_proj.weight"), vec![KV_DIM, HIDDEN]));
        v.push((format!("{p}.self_attn.v_proj.weight"), vec![KV_DIM, HIDDEN]));
        v.push((format!("{p}.self_attn.o_proj.weight"), vec![HIDDEN, HIDDEN]));
        v.push((format!("{p}.post_attention_layernorm.weight"), vec![HIDDEN]));
        v.push((
            format!("{p}.mlp.gate_proj.weight"),
            vec![INTERMEDIATE, HIDDEN],
        ));
        v.push((
            format!("{p}.mlp.up_proj.weight"),
            vec![INTERMEDIATE, HIDDEN],
        ));
        v.push((
            format!("{p}.mlp.down_proj.weight"),
            vec![HIDDEN, INTERMEDIATE],
        ));
    }
    v.push(("model.norm.weight".into(), vec![HIDDEN]));
    v.push(("lm_head.weight".into(), vec![VOCAB, HIDDEN]));
    let total: usize = v.iter().map(|(_, s)| s.iter().product::<usize>()).sum();
    let mut acc = 0usize;
    v.into_iter()
        .enumerate()
        .map(|(i, (name, shape))| {
            // A tensor goes to the shard in which its first byte falls when split in equal thirds.
            let shard = (acc * SHARDS / total).min(SHARDS - 1);
            acc += shape.iter().product::<usize>();
            (
                shard,
                TensorSpec {
                    name,
                    shape,
                    seed: 0x5eed_0000 + i as u64,
                },
            )
        })
        .collect()
}

/// File name of shard `i` (transformers' pattern).
pub fn shard_name(i: usize) -> String {
    format!("model-{:05}-of-{:05}.safetensors", i + 1, SHARDS)
}

/// Folder of the bench checkpoint: `$FASTQ_BENCH_DIR`, else `target/bench-data` of this workspace.
pub fn bench_dir() -> PathBuf {
    std::env::var_os("FASTQ_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-data"))
        .join("llama-1.1b-bf16")
}

/// The bench checkpoint, written on first use. The index is written last, so a folder with an index
/// and shards of the expected sizes is complete (bench_pipeline.py writes the same layout).
pub fn llama_checkpoint() -> PathBuf {
    let dir = bench_dir();
    let index = dir.join(fastq::checkpoint::INDEX_NAME);
    let tensors = llama_tensors();
    if index.is_file() && shards_complete(&dir, &tensors) {
        return dir;
    }
    std::fs::create_dir_all(&dir).expect("create the bench checkpoint folder");
    let _ = std::fs::remove_file(&index);
    eprintln!("writing the bench checkpoint to {} (once)", dir.display());
    let mut weight_map = serde_json::Map::new();
    for s in 0..SHARDS {
        let part: Vec<TensorSpec> = tensors
            .iter()
            .filter(|(i, _)| *i == s)
            .map(|(_, t)| TensorSpec {
                name: t.name.clone(),
                shape: t.shape.clone(),
                seed: t.seed,
            })
            .collect();
        for t in &part {
            weight_map.insert(t.name.clone(), shard_name(s).into());
        }
        let tmp = dir.join(format!("{}.tmp", shard_name(s)));
        write_safetensors(&tmp, &part).expect("write a bench shard");
        std::fs::rename(&tmp, dir.join(shard_name(s))).expect("rename a bench shard");
    }
    let total: usize = tensors.iter().map(|(_, t)| t.numel() * 2).sum();
    let idx = serde_json::json!({
        "metadata": {"total_size": total},
        "weight_map": weight_map,
    });
    std::fs::write(&index, serde_json::to_string_pretty(&idx).unwrap()).expect("write the index");
    dir
}

fn shards_complete(dir: &Path, tensors: &[(usize, TensorSpec)]) -> bool {
    (0..SHARDS).all(|s| {
        let data: u64 = tensors
            .iter()
            .filter(|(i, _)| *i == s)
            .map(|(_, t)| t.numel() as u64 * 2)
            .sum();
        std::fs::metadata(dir.join(shard_name(s))).is_ok_and(|m| m.len() > data)
    })
}

/// Reads every file of `dir` once so that the page cache holds them (a warm start).
pub fn warm_page_cache(dir: &Path) {
    let mut buf = vec![0u8; 8 << 20];
    for e in std::fs::read_dir(dir)
        .expect("read the bench folder")
        .flatten()
    {
        if let Ok(mut f) = File::open(e.path()) {
            while f.read(&mut buf).is_ok_and(|n| n > 0) {}
        }
    }
}

/// The 2-D `*proj.weight` tensors of a checkpoint: the ones a 4-bit load quantizes.
pub fn proj_weights(ckpt: &fastq::Checkpoint) -> Vec<String> {
    ckpt.tensors()
        .iter()
        .filter(|t| t.shape.len() == 2 && t.name.ends_with("proj.weight"))
        .map(|t| t.name.clone())
        .collect()
}

/// A criterion measurement of the CPU time of the whole process instead of wall time. On a machine
/// shared with other jobs a one-thread run then reports the time its thread really ran, not the
/// time it waited for a core (set `FASTQ_BENCH_CPU_TIME=1`; multi-thread runs report the sum over
/// threads, so they are skipped in that mode).
pub struct CpuTime;

#[repr(C)]
struct Timespec {
    tv_sec: i64,
    tv_nsec: i64,
}

extern "C" {
    fn clock_gettime(clock: i32, ts: *mut Timespec) -> i32;
}

/// CPU time of this process so far.
pub fn process_cpu_time() -> std::time::Duration {
    const CLOCK_PROCESS_CPUTIME_ID: i32 = 2;
    let mut ts = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec (two i64 on x86-64 Linux) into `ts`.
    let rc = unsafe { clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_PROCESS_CPUTIME_ID) failed");
    std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

impl criterion::measurement::Measurement for CpuTime {
    type Intermediate = std::time::Duration;
    type Value = std::time::Duration;

    fn start(&self) -> Self::Intermediate {
        process_cpu_time()
    }
    fn end(&self, i: Self::Intermediate) -> Self::Value {
        process_cpu_time() - i
    }
    fn add(&self, v1: &Self::Value, v2: &Self::Value) -> Self::Value {
        *v1 + *v2
    }
    fn zero(&self) -> Self::Value {
        std::time::Duration::ZERO
    }
    fn to_f64(&self, value: &Self::Value) -> f64 {
        value.as_nanos() as f64
    }
    fn formatter(&self) -> &dyn criterion::measurement::ValueFormatter {
        static WALL: criterion::measurement::WallTime = criterion::measurement::WallTime;
        criterion::measurement::Measurement::formatter(&WALL)
    }
}
