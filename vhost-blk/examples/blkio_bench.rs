//! A small libblkio load generator for a vhost-user-blk socket.
//!
//! `blkio_bench SOCKET {randread|randwrite|seqread|seqwrite} BLOCK_SIZE QUEUE_DEPTH SECONDS`
//!
//! Prints one JSON line: IOPS, MiB/s and p50/p99 latency in microseconds.

use std::mem::MaybeUninit;
use std::time::{Duration, Instant};

use blkio::{Blkio, Completion, ReqFlags};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a: Vec<String> = std::env::args().collect();
    if a.len() != 6 {
        eprintln!("usage: blkio_bench SOCKET MODE BLOCK_SIZE QUEUE_DEPTH SECONDS");
        std::process::exit(2);
    }
    let mode = a[2].as_str();
    let bs: usize = a[3].parse()?;
    let qd: usize = a[4].parse()?;
    let secs: u64 = a[5].parse()?;
    let write = mode.ends_with("write");
    let random = mode.starts_with("rand");

    let mut b = Blkio::new("virtio-blk-vhost-user")?;
    b.set_str("path", &a[1])?;
    b.connect()?;
    b.set_i32("num-queues", 1)?;
    b.set_i32("queue-size", 1024)?;
    let mut out = b.start()?;
    let mut q = out.queues.remove(0);
    let cap = b.get_u64("capacity")?;
    let region = b.alloc_mem_region(bs * qd)?;
    b.map_mem_region(&region)?;
    let blocks = cap / bs as u64;

    let mut rng: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next_seq = 0u64;
    let mut pick = |rng: &mut u64| -> u64 {
        if random {
            *rng ^= *rng << 13;
            *rng ^= *rng >> 7;
            *rng ^= *rng << 17;
            (*rng % blocks) * bs as u64
        } else {
            let o = (next_seq % blocks) * bs as u64;
            next_seq += 1;
            o
        }
    };
    let mut started = vec![Instant::now(); qd];
    let mut submit =
        |q: &mut blkio::Blkioq, slot: usize, rng: &mut u64, started: &mut [Instant]| {
            let off = pick(rng);
            let p = region.addr + slot * bs;
            started[slot] = Instant::now();
            if write {
                q.write(off, p as *const u8, bs, slot, ReqFlags::empty());
            } else {
                q.read(off, p as *mut u8, bs, slot, ReqFlags::empty());
            }
        };
    for slot in 0..qd {
        submit(&mut q, slot, &mut rng, &mut started);
    }
    let end = Instant::now() + Duration::from_secs(secs);
    let mut lat_us: Vec<u32> = Vec::new();
    let mut done = 0u64;
    let t0 = Instant::now();
    let mut comps: Vec<MaybeUninit<Completion>> = (0..qd).map(|_| MaybeUninit::uninit()).collect();
    while Instant::now() < end {
        let mut t = Duration::from_secs(30);
        let n = q.do_io(&mut comps, 1, Some(&mut t), None)?;
        if n == 0 {
            return Err("no completion within 30 s".into());
        }
        for c in &comps[..n] {
            // SAFETY: do_io initialised the first `n` completions.
            let c = unsafe { c.assume_init_ref() };
            if c.ret != 0 {
                return Err(format!("I/O failed: {}", c.ret).into());
            }
            let slot = c.user_data;
            lat_us.push(started[slot].elapsed().as_micros().min(u32::MAX as u128) as u32);
            done += 1;
            submit(&mut q, slot, &mut rng, &mut started);
        }
    }
    let el = t0.elapsed().as_secs_f64();
    lat_us.sort_unstable();
    let pct = |p: f64| {
        lat_us
            .get(((lat_us.len() as f64 * p) as usize).min(lat_us.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    println!(
        "{{\"mode\":\"{mode}\",\"bs\":{bs},\"qd\":{qd},\"iops\":{:.0},\"mib_s\":{:.1},\"p50_us\":{},\"p99_us\":{}}}",
        done as f64 / el,
        done as f64 * bs as f64 / el / 1048576.0,
        pct(0.5),
        pct(0.99)
    );
    Ok(())
}
