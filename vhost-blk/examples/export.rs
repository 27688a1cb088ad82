//! Runs an export from the command line until SIGINT/SIGTERM.
//!
//! `export VOLUME SOCKET [LOGICAL_BLOCK_SIZE] [NUM_QUEUES] [QUEUE_SIZE] [ro]`
//!
//! `IO_THREADS` in the environment sets the I/O threads per queue. Prints the export's
//! counters as JSON on exit.

use std::path::PathBuf;

use vhost_blk::{Export, ExportConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: export VOLUME SOCKET [LBS] [NUM_QUEUES] [QUEUE_SIZE] [ro]");
        std::process::exit(2);
    }
    let num = |i: usize, d: u32| -> Result<u32, Box<dyn std::error::Error>> {
        Ok(match args.get(i) {
            Some(s) => s.parse()?,
            None => d,
        })
    };
    let cfg = ExportConfig {
        volume: PathBuf::from(&args[1]),
        socket: PathBuf::from(&args[2]),
        logical_block_size: num(3, 512)?,
        num_queues: u16::try_from(num(4, 1)?)?,
        queue_size: u16::try_from(num(5, 256)?)?,
        read_only: args.get(6).is_some_and(|s| s == "ro"),
        serial: "vmblk-example".into(),
        io_threads_per_queue: match std::env::var("IO_THREADS") {
            Ok(v) => v.parse()?,
            Err(_) => vhost_blk::DEFAULT_IO_THREADS,
        },
        ..ExportConfig::default()
    };
    let export = Export::new(cfg)?;
    let stop = export.stop_handle();
    // Stop on SIGINT/SIGTERM: block them here (threads spawned later inherit the mask) and
    // wait for them on a dedicated thread.
    let mut signals = nix::sys::signal::SigSet::empty();
    signals.add(nix::sys::signal::Signal::SIGINT);
    signals.add(nix::sys::signal::Signal::SIGTERM);
    signals.thread_block()?;
    let s3 = stop.clone();
    std::thread::spawn(move || {
        if signals.wait().is_ok() {
            s3.stop();
        }
    });
    eprintln!("serving {} on {}", args[1], args[2]);
    export.serve()?;
    println!("{}", serde_json::to_string(&export.metrics())?);
    Ok(())
}
