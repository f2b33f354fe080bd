//! Single-tensor quantization speed: a 4096 x 11008 bf16 matrix (Llama-7B's MLP shape, 90 MB) to NF4
//! and FP4 (blocksize 64, without and with double quantization) and to LLM.int8, on one thread and on
//! every core, plus the scalar reference kernel on one thread.
//!
//! Throughput is the bf16 input in bytes; elements/s is half of it. `cargo bench --bench quantize`
//! takes about two minutes; `cargo bench --bench quantize -- nf4` runs a subset. With
//! `FASTQ_BENCH_CPU_TIME=1` the one-thread runs are timed in process CPU time (group
//! `..._cputime`), which other jobs on a shared machine disturb much less than wall time.

#[path = "common/mod.rs"]
mod common;

use std::time::Duration;

use criterion::measurement::Measurement;
use criterion::{black_box, BenchmarkId, Criterion, Throughput};
use fastq::pack::quantize_tensor;
use fastq::{Dtype, FloatSlice, Kernel, QuantSpec, QuantType};

fn four(quant_type: QuantType, double_quant: bool) -> QuantSpec {
    QuantSpec::FourBit {
        quant_type,
        blocksize: 64,
        double_quant,
    }
}

fn bench_quantize<M: Measurement>(c: &mut Criterion<M>, group: &str, multi_thread: bool) {
    let (rows, cols) = (common::ROWS, common::COLS);
    let data = common::normal_bf16(rows * cols, 42, 0.02);
    let x = FloatSlice::BF16(&data);
    let shape = [rows, cols];
    let all = fastq::pipeline::thread_count(None);
    let counts: &[usize] = if multi_thread { &[1, all] } else { &[1] };
    let pools: Vec<(String, rayon::ThreadPool)> = counts
        .iter()
        .map(|&t| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(t)
                .build()
                .expect("rayon pool");
            (format!("{t}t"), pool)
        })
        .collect();
    eprintln!(
        "kernel: {}, all threads: {all}",
        fastq::quant::kernel_name()
    );

    let specs = [
        ("nf4", four(QuantType::Nf4, false)),
        ("nf4-dq", four(QuantType::Nf4, true)),
        ("fp4", four(QuantType::Fp4, false)),
        ("fp4-dq", four(QuantType::Fp4, true)),
        ("int8", QuantSpec::Int8),
    ];
    let mut g = c.benchmark_group(group);
    g.throughput(Throughput::Bytes(data.len() as u64))
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    for (name, spec) in specs {
        for (threads, pool) in &pools {
            g.bench_function(BenchmarkId::new(name, threads), |b| {
                b.iter(|| {
                    pool.install(|| {
                        quantize_tensor(black_box(x), &shape, Dtype::BF16, spec, Kernel::Auto)
                            .expect("quantize")
                    })
                })
            });
        }
    }
    // The portable reference, for scale (one thread).
    let (_, one) = &pools[0];
    for (name, spec) in [specs[0], specs[2], specs[4]] {
        g.bench_function(BenchmarkId::new(format!("{name}-scalar"), "1t"), |b| {
            b.iter(|| {
                one.install(|| {
                    quantize_tensor(black_box(x), &shape, Dtype::BF16, spec, Kernel::Scalar)
                        .expect("quantize")
                })
            })
        });
    }
    g.finish();
}

fn main() {
    if std::env::var_os("FASTQ_BENCH_CPU_TIME").is_some_and(|v| v != "0") {
        let mut c = Criterion::default()
            .with_measurement(common::CpuTime)
            .configure_from_args();
        bench_quantize(&mut c, "quantize_4096x11008_bf16_cputime", false);
        c.final_summary();
    } else {
        let mut c = Criterion::default().configure_from_args();
        bench_quantize(&mut c, "quantize_4096x11008_bf16", true);
        c.final_summary();
    }
}
