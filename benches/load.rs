//! Whole-checkpoint quantization: every 2-D `*proj.weight` of a ~2.2 GB, three-shard, bf16 checkpoint
//! shaped like TinyLlama-1.1B (154 tensors, 1.94 GB) to NF4 with double quantization, on every core,
//! from a warm page cache. The checkpoint is written once under `target/bench-data` (or
//! `$FASTQ_BENCH_DIR`).
//!
//! Each iteration opens the checkpoint (mmap + header validation), runs `pipeline::spawn` and drops
//! every result as it arrives: the bounded-memory streaming pattern a loader uses. Throughput is the
//! bf16 bytes of the quantized tensors. Peak memory is measured by `benches/bench_pipeline.py`.

#[path = "common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use fastq::pipeline::{spawn, Options};
use fastq::{Checkpoint, Kernel, QuantSpec, QuantType};

const NF4_DQ: QuantSpec = QuantSpec::FourBit {
    quant_type: QuantType::Nf4,
    blocksize: 64,
    double_quant: true,
};

/// Opens the checkpoint, quantizes `names`, drops each result as it comes; returns packed bytes.
fn quantize_checkpoint(path: &std::path::Path, names: &[String], threads: Option<usize>) -> usize {
    let ckpt = Arc::new(Checkpoint::open(path).expect("open the bench checkpoint"));
    let jobs = names.iter().map(|n| (n.clone(), NF4_DQ)).collect();
    let opts = Options {
        threads,
        kernel: Kernel::Auto,
        ..Options::default()
    };
    let rx = spawn(ckpt, jobs, opts).expect("start the pipeline");
    rx.into_iter()
        .map(|(_, r)| r.expect("quantize").nbytes())
        .sum()
}

fn bench_load(c: &mut Criterion) {
    let dir = common::llama_checkpoint();
    common::warm_page_cache(&dir);
    let ckpt = Checkpoint::open(&dir).expect("open the bench checkpoint");
    let names = common::proj_weights(&ckpt);
    let in_bytes: usize = names
        .iter()
        .map(|n| ckpt.info(n).expect("tensor").nbytes())
        .sum();
    drop(ckpt);
    let threads = fastq::pipeline::thread_count(None);
    eprintln!(
        "{}: {} tensors, {:.3} GB of bf16, kernel {}, {threads} threads",
        dir.display(),
        names.len(),
        in_bytes as f64 / 1e9,
        fastq::quant::kernel_name(),
    );

    let mut g = c.benchmark_group("checkpoint_1.1b_bf16_nf4_dq");
    g.throughput(Throughput::Bytes(in_bytes as u64))
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(20));
    g.bench_function(format!("{threads}t"), |b| {
        b.iter(|| quantize_checkpoint(&dir, &names, None))
    });
    g.finish();
}

criterion_group!(benches, bench_load);
criterion_main!(benches);
