//! Whole-checkpoint quantization: every 2-D `*proj.weight` of a ~2.2 GB, three-shard, bf16 checkpoint
//! shaped like TinyLlama-1.1B (154 tensors, 1.94 GB) to NF4 with double quantization, on every core,
//! from a warm page cache. The checkpoint is written once under `target/bench-data` (or
//! `$FASTQ_BENCH_DIR`).
//!
//! Each iteration opens the checkpoint (mmap + header validation), runs `pipeline::spawn` and drops
//! every result as it arrives: the bounded-memory streaming pattern a loader uses. Throughput is the
//! bf16 bytes of the quantized tensors. Peak memory is measured by `benches/bench_pipeline.py`.
//!
//! With `FASTQ_BENCH_CPU_TIME=1` the group `..._cputime` reports process CPU time (summed over the
//! threads) instead of wall time: the CPU cost of a load, which other jobs on a shared machine disturb
//! much less; on an idle machine the wall time is at least CPU time / threads.

#[path = "common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::Duration;

use criterion::measurement::Measurement;
use criterion::{Criterion, Throughput};
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

fn bench_load<M: Measurement>(c: &mut Criterion<M>, suffix: &str) {
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

    let mut g = c.benchmark_group(format!("checkpoint_1.1b_bf16_nf4_dq{suffix}"));
    g.throughput(Throughput::Bytes(in_bytes as u64))
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(20));
    g.bench_function(format!("{threads}t"), |b| {
        b.iter(|| quantize_checkpoint(&dir, &names, None))
    });
    g.finish();
}

fn main() {
    if std::env::var_os("FASTQ_BENCH_CPU_TIME").is_some_and(|v| v != "0") {
        let mut c = Criterion::default()
            .with_measurement(common::CpuTime)
            .configure_from_args();
        bench_load(&mut c, "_cputime");
        c.final_summary();
    } else {
        let mut c = Criterion::default().configure_from_args();
        bench_load(&mut c, "");
        c.final_summary();
    }
}
