//! What opening a checkpoint and the check points cost (BENCHMARKS.md, "Files that change
//! underneath"): `Checkpoint::open` of a shard with 4,000 small tensors and 8 large ones (header
//! validation, mapping, registering it with the SIGBUS guard), `check` of one tensor (one `fstat`),
//! `check_all` of every tensor (one `fstat` per shard), `populate` of a resident 32 MiB tensor
//! (`MADV_POPULATE_READ` + the check), and the source digest a conversion takes of every tensor it reads
//! (`writer::sources`, over the same shard: 256 MiB of bf16), from a warm page cache.

#[path = "common/mod.rs"]
mod common;

use std::time::Duration;

use common::{write_safetensors, TensorSpec};
use criterion::Criterion;
use criterion::Throughput;
use fastq::writer::layout::{Content, Layout, Output};
use fastq::writer::sources::source_digests;
use fastq::Checkpoint;

fn main() {
    let dir = tempfile::tempdir().expect("a temporary folder");
    let path = dir.path().join("model.safetensors");
    let mut specs: Vec<TensorSpec> = (0..4000)
        .map(|i| TensorSpec {
            name: format!("small.{i:05}"),
            shape: vec![64],
            seed: i,
        })
        .collect();
    specs.extend((0..8).map(|i| TensorSpec {
        name: format!("large.{i:02}.weight"),
        shape: vec![4096, 4096],
        seed: 10_000 + i,
    }));
    write_safetensors(&path, &specs).expect("write the bench checkpoint");
    std::fs::read(&path).expect("warm the page cache");
    let mut c = Criterion::default()
        .configure_from_args()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    c.bench_function("open_4008_tensors", |b| {
        b.iter(|| Checkpoint::open(&path).expect("open"))
    });
    let ck = Checkpoint::open(&path).expect("open");
    let large = ck.info("large.00.weight").expect("tensor").clone();
    ck.populate(&large).expect("populate");
    c.bench_function("check_one_tensor", |b| {
        b.iter(|| ck.check(&large).expect("check"))
    });
    c.bench_function("check_all_4008_tensors", |b| {
        b.iter(|| ck.check_all(ck.tensors()).expect("check"))
    });
    c.bench_function("populate_resident_32MiB", |b| {
        b.iter(|| ck.populate(&large).expect("populate"))
    });
    let outputs = ck
        .tensors()
        .iter()
        .map(|t| Output {
            name: t.name.clone(),
            content: Content::Copy {
                source: t.name.clone(),
                transpose: false,
                cast: None,
            },
        })
        .collect();
    let layout = Layout::new(&ck, vec![], outputs, 5_000_000_000).expect("layout");
    let pool = fastq::pipeline::pool(None).expect("a pool");
    let mut g = c.benchmark_group("source_digests");
    g.throughput(Throughput::Bytes(ck.total_bytes() as u64));
    g.bench_function("all_4008_tensors", |b| {
        b.iter(|| {
            pool.install(|| source_digests(&ck, &layout))
                .expect("digest")
        })
    });
    g.finish();
    c.final_summary();
}
