//! The double-quant offset as a GPU computes it: `absmax.mean()` of a contiguous float32 CUDA tensor,
//! summed in float32 in the order torch's CUDA reduction sums it (`ATen/native/cuda/Reduce.cuh`,
//! `setReduceConfig` and `ReduceOp`, torch 2.11 to 2.15; `mean_kernel_cuda` multiplies the sum by the
//! float32 `1 / n`).
//!
//! For a reduction of all `n` values to one output torch launches blocks of `width` threads (512, or the
//! power of two at or below `n / 4` when that is smaller); each thread sums every `threads`-th group of
//! four values into four accumulators (groups of one, strided by `threads`, when `n < 128`), combines them
//! left to right, and the threads of a block are combined by a halving tree. When each thread would get
//! 256 values or more, the input is split over `ctas` blocks, and the blocks' sums are combined by a
//! second tree. `ctas` is `ceil(n / width / 16)` clamped to at least `ceil(n / width / 256)` and at most
//! the GPU's number of resident blocks (SMs x maxThreadsPerMultiProcessor / 512): the only place the GPU
//! enters, and only for more than 8192 x that many values. H100 and H200 (132 SMs x 4) give 528: 4.3
//! million values, the absmax of a 4-bit weight of 276 million elements; an A100 432, an RTX 4090 384,
//! a T4 80 (0.66 million: a 4096 x 11008 weight's 704,512 already differ there).

/// Resident 512-thread blocks of an H100 or H200: 132 SMs x (2048 threads / 512).
pub const H100_RESIDENT_BLOCKS: usize = 528;

/// Largest power of two at or below `n` (1 for 0), as `last_pow2` in Reduce.cuh.
fn last_pow2(n: usize) -> usize {
    if n <= 1 {
        1
    } else {
        1 << (usize::BITS - 1 - n.leading_zeros())
    }
}

/// The halving tree a block's threads (and the last block, over the blocks' sums) combine with:
/// `v[i] += v[i + half]` for `half` = len/2, len/4, ... 1. `v.len()` is a power of two.
fn tree(v: &mut [f32]) -> f32 {
    let mut half = v.len() / 2;
    while half > 0 {
        for i in 0..half {
            v[i] += v[i + half];
        }
        half /= 2;
    }
    v[0]
}

/// How torch launches the reduction of `n` values: whether it loads groups of four, the threads of a
/// block, and how many blocks split the input.
#[derive(Debug, PartialEq, Eq)]
struct Launch {
    vectorized: bool,
    width: usize,
    ctas: usize,
}

fn launch(n: usize, resident_blocks: usize) -> Launch {
    let vectorized = n >= 128;
    let dim0 = if vectorized { n / 4 } else { n };
    let width = if dim0 < 512 { last_pow2(dim0) } else { 512 };
    let per_thread = n.div_ceil(width);
    let ctas = if per_thread >= 256 {
        per_thread
            .div_ceil(16)
            .min(resident_blocks.max(1))
            .max(per_thread.div_ceil(256))
    } else {
        1
    };
    Launch {
        vectorized,
        width,
        ctas,
    }
}

/// `x.mean()` of a contiguous float32 CUDA tensor, bit for bit, on a GPU with `resident_blocks`
/// 512-thread blocks resident at once (SMs x maxThreadsPerMultiProcessor / 512). 0 for no values.
pub fn cuda_mean(x: &[f32], resident_blocks: usize) -> f32 {
    let n = x.len();
    if n == 0 {
        return 0.0;
    }
    let Launch {
        vectorized,
        width,
        ctas,
    } = launch(n, resident_blocks);
    let threads = width * ctas;
    let mut sums = vec![0f32; threads];
    if vectorized {
        // Thread t sums groups t, t + threads, ... of four values, one accumulator per position.
        let groups = n / 4;
        let mut acc = vec![[0f32; 4]; threads];
        for row in x[..groups * 4].chunks(threads * 4) {
            for (a, g) in acc.iter_mut().zip(row.chunks_exact(4)) {
                for i in 0..4 {
                    a[i] += g[i];
                }
            }
        }
        // The last n % 4 values go to the first threads of the first block, after their loop.
        for (t, &v) in x[groups * 4..].iter().enumerate() {
            acc[t][0] += v;
        }
        for (s, a) in sums.iter_mut().zip(&acc) {
            *s = ((a[0] + a[1]) + a[2]) + a[3];
        }
    } else {
        // Fewer than 128 values: one block; thread t sums t, t + width, ... into four accumulators in
        // turn (four at a time while four remain, then the rest one by one).
        for (t, s) in sums.iter_mut().enumerate() {
            let mut acc = [0f32; 4];
            let mut idx = t;
            while idx + 3 * threads < n {
                for (i, a) in acc.iter_mut().enumerate() {
                    *a += x[idx + i * threads];
                }
                idx += 4 * threads;
            }
            for a in acc.iter_mut() {
                if idx >= n {
                    break;
                }
                *a += x[idx];
                idx += threads;
            }
            *s = ((acc[0] + acc[1]) + acc[2]) + acc[3];
        }
    }
    let blocks: Vec<f32> = sums.chunks_mut(width).map(tree).collect();
    let total = if ctas == 1 {
        blocks[0]
    } else {
        // The last block to finish: thread i sums blocks i, i + width, ... from zero, then the tree.
        let mut lanes = vec![0f32; width];
        for (k, &b) in blocks.iter().enumerate() {
            lanes[k % width] += b;
        }
        tree(&mut lanes)
    };
    total * (1.0f32 / n as f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TINY: f32 = 1.0 / 16_777_216.0; // 2^-24: half an ulp of 1.0

    #[test]
    fn last_pow2_is_the_power_at_or_below() {
        let got: Vec<usize> = [0, 1, 2, 3, 4, 511, 512, 513].map(last_pow2).to_vec();
        assert_eq!(got, [1, 1, 2, 2, 4, 256, 512, 512]);
    }

    #[test]
    fn three_values_sum_as_two_threads_and_a_tree() {
        // width 2: thread 0 holds x0 + x2, thread 1 x1; the tree adds them. Left to right, 2^-24 + 1.0
        // rounds back to 1.0 and the second 2^-24 is lost too; in the GPU's order the two tiny values
        // meet first and survive.
        let x = [TINY, 1.0, TINY];
        let sum = (TINY + TINY) + 1.0;
        assert_eq!(sum, 1.0 + 2.0 * TINY);
        assert_ne!((TINY + 1.0) + TINY, sum);
        assert_eq!(cuda_mean(&x, H100_RESIDENT_BLOCKS), sum * (1.0f32 / 3.0));
    }

    #[test]
    fn four_accumulators_per_thread_in_the_vectorized_loop() {
        // 128 values: width 32, each thread one group of four. Value 4t + i lands in thread t's
        // accumulator i; only thread 0 is non-zero here: ((x0 + x1) + x2) + x3.
        let mut x = vec![0f32; 128];
        x[..4].copy_from_slice(&[1.0, TINY, TINY, TINY]);
        let thread0 = ((1.0f32 + TINY) + TINY) + TINY;
        assert_eq!(thread0, 1.0);
        assert_eq!(
            cuda_mean(&x, H100_RESIDENT_BLOCKS),
            thread0 * (1.0f32 / 128.0)
        );
        // The same values in positions 0, 4, 8, 12 (threads 0..3, accumulator 0) meet in the tree:
        // thread 0 + thread 2 and 1 + 3 first, so the three tiny values are not all lost.
        let mut y = vec![0f32; 128];
        for (k, v) in [1.0, TINY, TINY, TINY].into_iter().enumerate() {
            y[4 * k] = v;
        }
        let tree_sum = (1.0f32 + TINY) + (TINY + TINY);
        assert_eq!(
            cuda_mean(&y, H100_RESIDENT_BLOCKS),
            tree_sum * (1.0f32 / 128.0)
        );
    }

    #[test]
    fn the_tail_goes_to_the_first_threads_after_their_groups() {
        // 131 values: 32 groups of four (width 32), then values 128..131 to threads 0, 1, 2.
        let mut x = vec![0f32; 131];
        x[0] = 1.0;
        x[128] = TINY;
        x[1] = TINY;
        // thread 0: acc0 = 1.0 + tail 2^-24 = 1.0, acc1 = 2^-24: (1.0 + 2^-24) -> 1.0.
        let thread0 = (((1.0f32 + TINY) + TINY) + 0.0) + 0.0;
        assert_eq!(
            cuda_mean(&x, H100_RESIDENT_BLOCKS),
            thread0 * (1.0f32 / 131.0)
        );
    }

    #[test]
    fn blocks_split_the_input_only_for_long_vectors() {
        // 262,144 values (a 4096 x 4096 weight): 512 values per thread, so 32 blocks; the mean of
        // equal values is exact whatever the order.
        let x = vec![0.25f32; 262_144];
        assert_eq!(cuda_mean(&x, H100_RESIDENT_BLOCKS), 0.25);
        // Block b's threads start at group 512 b: put 1.0 in block 0 and 2^-24 in blocks 1 and 2. The
        // last block's thread k takes block k, and its tree adds lane 2 to lane 0 before lane 1:
        // (1 + 2^-24) + 2^-24 = 1.0, where the two tiny values meeting first would give 1 + 2^-23.
        let mut y = vec![0f32; 262_144];
        y[0] = 1.0;
        y[512 * 4] = TINY;
        y[2 * 512 * 4] = TINY;
        assert_eq!(
            cuda_mean(&y, H100_RESIDENT_BLOCKS),
            ((1.0f32 + TINY) + TINY) * (1.0f32 / 262_144.0)
        );
    }

    #[test]
    fn the_launch_follows_set_reduce_config() {
        let l = |n, r| {
            let Launch {
                vectorized,
                width,
                ctas,
            } = launch(n, r);
            (vectorized, width, ctas)
        };
        assert_eq!(l(64, 528), (false, 64, 1)); // fewer than 128: one value at a time
        assert_eq!(l(127, 528), (false, 64, 1));
        assert_eq!(l(1000, 528), (true, 128, 1)); // 250 groups: 128 threads
        assert_eq!(l(65_536, 528), (true, 512, 1)); // 128 values per thread: one block
        assert_eq!(l(262_144, 528), (true, 512, 32)); // a 4096 x 4096 weight's absmax

        // A 4096 x 11008 weight's: 86 blocks wherever 86 are resident, a T4's 80 otherwise.
        assert_eq!(l(704_512, 528), (true, 512, 86));
        assert_eq!(l(704_512, 86), (true, 512, 86));
        assert_eq!(l(704_512, 80), (true, 512, 80));
        // 5 million values: bound by the GPU (H100 528, A100 432), and never below 256 per thread.
        assert_eq!(l(5_000_000, 528), (true, 512, 528));
        assert_eq!(l(5_000_000, 432), (true, 512, 432));
        assert_eq!(l(5_000_000, 1), (true, 512, 39));
    }
}
