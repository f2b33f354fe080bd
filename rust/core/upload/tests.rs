//! The upload stage against a `Dma` as asynchronous as a device's, on small rings.

use super::*;

/// A `Dma` as asynchronous as a device's: copies run only when a `wait` or `finish` reaches them,
/// so a slot refilled before its copies were waited for hands over the wrong bytes.
#[derive(Default)]
struct Deferred {
    queue: Vec<(u64, *const u8, usize)>,
    ran: usize,
    marks: Vec<usize>,
    waits: usize,
}

impl Deferred {
    fn run_to(&mut self, end: usize) {
        while self.ran < end {
            let (dst, src, len) = self.queue[self.ran];
            // SAFETY: test destinations are live Vecs; sources are slots the upload keeps.
            unsafe { std::ptr::copy_nonoverlapping(src, dst as *mut u8, len) };
            self.ran += 1;
        }
    }
}

impl Dma for Deferred {
    unsafe fn copy(&mut self, dst: u64, src: *const u8, len: usize) -> Result<()> {
        self.queue.push((dst, src, len));
        Ok(())
    }
    fn record(&mut self, slot: usize) -> Result<()> {
        self.marks.resize(self.marks.len().max(slot + 1), 0);
        self.marks[slot] = self.queue.len();
        Ok(())
    }
    fn wait(&mut self, slot: usize) -> Result<()> {
        self.waits += 1;
        self.run_to(self.marks[slot]);
        Ok(())
    }
    fn finish(&mut self) -> Result<()> {
        self.run_to(self.queue.len());
        Ok(())
    }
}

/// A checkpoint of tensors `t0..t{n}` of the given sizes, bytes from a seeded pattern.
fn checkpoint(dir: &std::path::Path, sizes: &[usize]) -> (Checkpoint, Vec<Vec<u8>>) {
    let data: Vec<Vec<u8>> = sizes
        .iter()
        .enumerate()
        .map(|(k, &n)| (0..n).map(|i| ((i * 31 + k * 7) % 251) as u8).collect())
        .collect();
    let (mut entries, mut off) = (Vec::new(), 0);
    for (k, d) in data.iter().enumerate() {
        entries.push(format!(
            "\"t{k}\":{{\"dtype\":\"U8\",\"shape\":[{}],\"data_offsets\":[{off},{}]}}",
            d.len(),
            off + d.len()
        ));
        off += d.len();
    }
    let header = format!("{{{}}}", entries.join(","));
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    data.iter().for_each(|d| bytes.extend_from_slice(d));
    let path = dir.join("model.safetensors");
    std::fs::write(&path, bytes).unwrap();
    (Checkpoint::open(&path).unwrap(), data)
}

fn whole(k: usize, n: usize, at: usize) -> Piece {
    Piece {
        tensor: format!("t{k}"),
        offset: 0,
        len: n,
        dst_offset: at,
    }
}

fn upload(
    ck: &Checkpoint,
    requests: &[Request],
    slots: usize,
    slot_len: usize,
    dma: &mut dyn Dma,
    stop: bool,
) -> Progress {
    let mut ring = vec![vec![0u8; slot_len]; slots];
    let ptrs: Vec<(usize, usize)> = ring
        .iter_mut()
        .map(|s| (s.as_mut_ptr() as usize, s.len()))
        .collect();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(3)
        .build()
        .unwrap();
    let progress = Progress::default();
    let up = Upload {
        ckpt: ck,
        requests,
        slots: &ptrs,
        pool: &pool,
    };
    // SAFETY: the ring and the destinations outlive the call; nothing else touches them.
    unsafe { up.run(dma, &progress, &AtomicBool::new(stop)) };
    progress
}

#[test]
fn every_request_lands_whole_through_a_ring_refilled_only_after_its_copies() {
    let dir = tempfile::tempdir().unwrap();
    let sizes = [100, 5000, 3, 0, 1300, 2048, 777];
    let (ck, data) = checkpoint(dir.path(), &sizes);
    // t0 alone; t1 split over several slots; t2..t4 one block with gaps; t5, t6 alone.
    let mut dst: Vec<Vec<u8>> = vec![
        vec![0; 100],
        vec![0; 5000],
        vec![0xee; 2000],
        vec![0; 2048],
        vec![0; 777],
    ];
    let pieces = [
        vec![whole(0, 100, 0)],
        vec![whole(1, 5000, 0)],
        vec![whole(2, 3, 0), whole(3, 0, 256), whole(4, 1300, 512)],
        vec![whole(5, 2048, 0)],
        vec![whole(6, 777, 0)],
    ];
    let requests: Vec<Request> = dst
        .iter_mut()
        .zip(pieces)
        .map(|(d, pieces)| Request {
            dst: d.as_mut_ptr() as u64,
            len: d.len(),
            pieces,
        })
        .collect();
    let mut dma = Deferred::default();
    let p = upload(&ck, &requests, 3, 1024, &mut dma, false);
    let s = p.state.lock().unwrap();
    assert!(s.finished && s.error.is_none(), "{:?}", s.error);
    assert_eq!(s.done, 5);
    assert!(dma.waits > 3, "slots were reused: {} waits", dma.waits);
    assert_eq!(s.reads.len(), s.copies.len());
    assert_eq!(
        s.reads.iter().map(|r| r.2).sum::<usize>(),
        100 + 5000 + 2000 + 2048 + 777
    );
    assert_eq!(dst[0], data[0]);
    assert_eq!(dst[1], data[1]);
    assert_eq!(&dst[2][..3], &data[2][..]);
    assert_eq!(&dst[2][512..1812], &data[4][..]);
    assert_eq!(dst[3], data[5]);
    assert_eq!(dst[4], data[6]);
}

#[test]
fn a_failed_read_ends_the_upload_with_its_error_and_what_was_done() {
    let dir = tempfile::tempdir().unwrap();
    let (ck, _) = checkpoint(dir.path(), &[1000, 1000, 1000]);
    crate::staging::cut_short(&dir.path().join("model.safetensors"), 10);
    let mut dst = [vec![0u8; 1000], vec![0u8; 1000], vec![0u8; 1000]];
    let requests: Vec<Request> = dst
        .iter_mut()
        .enumerate()
        .map(|(k, d)| Request {
            dst: d.as_mut_ptr() as u64,
            len: 1000,
            pieces: vec![whole(k, 1000, 0)],
        })
        .collect();
    // SAFETY: host destinations that outlive the upload.
    let mut dma = unsafe { HostDma::new() };
    let p = upload(&ck, &requests, 2, 1024, &mut dma, false);
    let s = p.state.lock().unwrap();
    assert!(s.finished && s.done < 3);
    match &s.error {
        Some(Error::ShardTruncated { tensor, .. }) => assert_eq!(tensor, "t2"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_stopped_upload_ends_cancelled_and_a_bad_request_is_refused_before_any_read() {
    let dir = tempfile::tempdir().unwrap();
    let (ck, _) = checkpoint(dir.path(), &[1000]);
    let mut d = vec![0u8; 1000];
    let ok = [Request {
        dst: d.as_mut_ptr() as u64,
        len: 1000,
        pieces: vec![whole(0, 1000, 0)],
    }];
    // SAFETY: a host destination that outlives the upload.
    let mut dma = unsafe { HostDma::new() };
    let p = upload(&ck, &ok, 2, 1024, &mut dma, true);
    let s = p.state.lock().unwrap();
    assert!(s.finished && matches!(s.error, Some(Error::Cancelled)) && s.reads.is_empty());
    let bad = [Request {
        dst: d.as_mut_ptr() as u64,
        len: 10,
        pieces: vec![whole(0, 1000, 0)],
    }];
    let p = upload(&ck, &bad, 2, 1024, &mut dma, false);
    let s = p.state.lock().unwrap();
    assert!(matches!(s.error, Some(Error::InvalidArgument(_))) && s.reads.is_empty());
    assert!(d.iter().all(|&b| b == 0));
}

fn req(len: usize) -> Request {
    Request {
        dst: 0,
        len,
        pieces: vec![],
    }
}

#[test]
fn requests_are_laid_out_aligned_and_split_across_slots() {
    let b = batches(&[req(100), req(1000), req(0), req(300)], 1024);
    assert_eq!(
        b,
        vec![
            vec![
                Span {
                    req: 0,
                    a: 0,
                    b: 100,
                    at: 0
                },
                Span {
                    req: 1,
                    a: 0,
                    b: 768,
                    at: 256
                },
            ],
            vec![
                Span {
                    req: 1,
                    a: 768,
                    b: 1000,
                    at: 0
                },
                Span {
                    req: 3,
                    a: 0,
                    b: 300,
                    at: 256
                },
            ],
        ]
    );
}

#[test]
fn a_span_reads_only_its_part_of_each_piece() {
    let r = Request {
        dst: 0,
        len: 600,
        pieces: vec![
            Piece {
                tensor: "a".into(),
                offset: 10,
                len: 300,
                dst_offset: 0,
            },
            Piece {
                tensor: "b".into(),
                offset: 0,
                len: 200,
                dst_offset: 400,
            },
        ],
    };
    let got: Vec<Piece> = reads(
        &r,
        &Span {
            req: 0,
            a: 250,
            b: 450,
            at: 1000,
        },
    )
    .collect();
    assert_eq!(
        got,
        vec![
            Piece {
                tensor: "a".into(),
                offset: 260,
                len: 50,
                dst_offset: 1000
            },
            Piece {
                tensor: "b".into(),
                offset: 0,
                len: 50,
                dst_offset: 1150
            },
        ]
    );
}
