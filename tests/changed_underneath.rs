//! Shards cut short by another process while fastq has them mapped (`fastq::guard`): reads through
//! the mapping survive (zeros), and every check point reports the tensor that lost its bytes. Faults
//! that are not fastq's still end the process (checked in a child process).

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use fastq::pipeline::{run_all, spawn_jobs, Options};
use fastq::{Checkpoint, Error, Job, QuantSpec, QuantType};

const ROWS: usize = 256;
const COLS: usize = 512;

/// Three F32 `ROWS x COLS` tensors `a`, `b`, `c` back to back (512 KiB each), values `i % 7 - 3`.
fn write_three(dir: &Path) -> PathBuf {
    let n = ROWS * COLS;
    let mut header = String::from("{");
    for (i, name) in ["a", "b", "c"].iter().enumerate() {
        let (s, e) = (i * n * 4, (i + 1) * n * 4);
        header += &format!(
            "\"{name}\":{{\"dtype\":\"F32\",\"shape\":[{ROWS},{COLS}],\"data_offsets\":[{s},{e}]}},"
        );
    }
    header.pop();
    header.push('}');
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    for i in 0..3 * n {
        out.extend_from_slice(&((i % 7) as f32 - 3.0).to_le_bytes());
    }
    let path = dir.join("model.safetensors");
    std::fs::write(&path, out).unwrap();
    path
}

/// Cuts the file at the middle of tensor `b`.
fn cut_in_b(ck: &Checkpoint, path: &Path) -> u64 {
    let b = ck.info("b").unwrap();
    let at = (b.start + b.nbytes() / 2 + 100) as u64;
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(at)
        .unwrap();
    at
}

fn truncated_tensor(e: Error, path: &Path) -> String {
    match e {
        Error::ShardTruncated {
            path: p, tensor, ..
        } if p == path => tensor,
        other => panic!("expected ShardTruncated for {}: {other:?}", path.display()),
    }
}

#[test]
fn reads_through_the_mapping_survive_and_checks_name_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_three(dir.path());
    let ck = Checkpoint::open(&path).unwrap();
    assert!(ck.shards[0].map.is_guarded());
    let (a, b, c) = (
        ck.info("a").unwrap(),
        ck.info("b").unwrap(),
        ck.info("c").unwrap(),
    );
    ck.populate(b).unwrap();
    let before: u64 = ck.bytes(b).iter().map(|&x| x as u64).sum();
    let at = cut_in_b(&ck, &path);
    // Without the guard this read ends the process with SIGBUS (see the child test below).
    let after = ck.bytes(b);
    // Zeros from the first page wholly past the new end (the page holding the end is the file's).
    let lost = (at as usize).div_ceil(4096) * 4096 - b.start;
    assert!(after[lost..].iter().all(|&x| x == 0));
    assert!(after.iter().map(|&x| x as u64).sum::<u64>() < before);
    assert!(ck.bytes(c).iter().all(|&x| x == 0));
    assert!(ck.shards[0].map.faulted().is_some());
    ck.check(a).unwrap();
    assert_eq!(truncated_tensor(ck.check(b).unwrap_err(), &path), "b");
    assert_eq!(truncated_tensor(ck.populate(c).unwrap_err(), &path), "c");
    let e = ck.check_all(ck.tensors()).unwrap_err();
    assert_eq!(truncated_tensor(e, &path), "b");
    assert!(matches!(ck.check(b).unwrap_err(),
        Error::ShardTruncated { end, file_len, .. } if end == b.end as u64 && file_len == at));
}

#[test]
fn populate_of_a_cut_shard_is_an_error_without_a_fault() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_three(dir.path());
    let ck = Checkpoint::open(&path).unwrap();
    cut_in_b(&ck, &path);
    ck.populate(ck.info("a").unwrap()).unwrap();
    let e = ck.populate(ck.info("c").unwrap()).unwrap_err();
    assert_eq!(truncated_tensor(e, &path), "c");
    assert!(
        ck.shards[0].map.faulted().is_none(),
        "populate does not fault"
    );
}

const NF4: QuantSpec = QuantSpec::FourBit {
    quant_type: QuantType::Nf4,
    blocksize: 64,
    double_quant: true,
};

#[test]
fn quantizing_a_cut_shard_names_the_tensor_on_both_read_paths() {
    for transpose in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let path = write_three(dir.path());
        let ck = Arc::new(Checkpoint::open(&path).unwrap());
        let job = |name: &str| Job {
            transpose,
            ..Job::new(name, NF4)
        };
        // One tensor per batch and one result in the channel: jobs after the first two run after the
        // cut (the pipeline cannot run further ahead than that).
        let opts = Options {
            threads: Some(1),
            batch_bytes: 1,
            channel_capacity: 1,
            ..Options::default()
        };
        let jobs = ["a", "a", "a", "b", "c"].map(job).to_vec();
        let rx = spawn_jobs(ck.clone(), jobs, opts).unwrap();
        let (_, first) = rx.recv().unwrap();
        first.unwrap();
        cut_in_b(&ck, &path);
        let mut got = Vec::new();
        for (_, r) in rx {
            got.push(r);
        }
        let e = got.pop().unwrap().unwrap_err();
        assert_eq!(truncated_tensor(e, &path), "b", "transpose {transpose}");
        assert!(got.iter().all(|r| r.is_ok()), "transpose {transpose}");
        assert_eq!(
            ck.shards[0].map.faulted().is_some(),
            transpose,
            "only the transposed job reads through the mapping"
        );
    }
}

#[test]
fn a_shard_cut_before_a_run_fails_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_three(dir.path());
    let ck = Arc::new(Checkpoint::open(&path).unwrap());
    cut_in_b(&ck, &path);
    let e = run_all(ck, vec![("c".into(), QuantSpec::Int8)], Options::default()).unwrap_err();
    assert_eq!(truncated_tensor(e, &path), "c");
}

/// Runs test `name` of this binary in a child process with `env` set, its files in `dir`; returns how
/// it ended.
fn child(name: &str, dir: &Path, env: &[(&str, &str)]) -> std::process::ExitStatus {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env("FASTQ_GUARD_CHILD", dir);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap().status
}

/// In a child: fault on a cut shard, through fastq's mapping (`FASTQ_GUARD_CHILD_OWN` unset) or
/// through a mapping of its own made after fastq's handler was installed.
#[test]
fn child_faults_on_a_cut_mapping() {
    let Some(dir) = std::env::var_os("FASTQ_GUARD_CHILD") else {
        return;
    };
    let path = write_three(Path::new(&dir));
    let ck = Checkpoint::open(&path).unwrap();
    let b = ck.info("b").unwrap().clone();
    if std::env::var_os("FASTQ_GUARD_CHILD_OWN").is_some() {
        let file = std::fs::File::open(&path).unwrap();
        // SAFETY: a read-only mapping of a file this test owns; the SIGBUS it raises is the point.
        let own = unsafe { memmap2::Mmap::map(&file) }.unwrap();
        cut_in_b(&ck, &path);
        let sum: u64 = own[b.start..b.end].iter().map(|&x| x as u64).sum();
        println!("own mapping read {sum}");
    } else {
        cut_in_b(&ck, &path);
        let sum: u64 = ck.bytes(&b).iter().map(|&x| x as u64).sum();
        println!("fastq mapping read {sum}");
    }
}

#[test]
fn faults_outside_fastq_mappings_still_end_the_process() {
    if std::env::var_os("FASTQ_GUARD_CHILD").is_some() {
        return;
    }
    let name = "child_faults_on_a_cut_mapping";
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    assert!(
        child(name, d, &[]).success(),
        "fastq's own mapping: survives"
    );
    let own = child(name, d, &[("FASTQ_GUARD_CHILD_OWN", "1")]);
    assert_eq!(own.signal(), Some(libc::SIGBUS), "another mapping: {own:?}");
    let off = child(name, d, &[("FASTQ_SIGBUS_GUARD", "0")]);
    assert_eq!(off.signal(), Some(libc::SIGBUS), "guard disabled: {off:?}");
}
