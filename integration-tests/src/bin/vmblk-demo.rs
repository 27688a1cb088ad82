//! The demo behind `scripts/demo.sh`: a simulated 4K NVMe drive, a sample VM image built
//! for 512-byte sectors, `vmblk unpack` onto the drive, `vmblk export` to QEMU, and a
//! UEFI guest that boots from it and reports what it sees. Everything it creates (loop
//! devices, processes, files) is removed when it ends.

use std::process::Command;

use anyhow::{bail, Context, Result};
use integration_tests::{
    vmblk_bin, CommandExport, CommandExportParams, Guest, GuestParams, TestImage, Volume,
};

const VOLUME_BYTES: u64 = 1 << 30;

fn step(n: u32, what: &str) {
    println!("\n=== {n}. {what}");
}

fn vmblk(args: &[&std::ffi::OsStr]) -> Result<()> {
    let bin = vmblk_bin();
    let shown: Vec<_> = args.iter().map(|a| a.to_string_lossy()).collect();
    println!("$ vmblk {}", shown.join(" "));
    let st = Command::new(&bin)
        .args(args)
        .status()
        .with_context(|| format!("running {}", bin.display()))?;
    if !st.success() {
        bail!("vmblk {} failed: {st}", shown.join(" "));
    }
    Ok(())
}

fn main() -> Result<()> {
    step(
        1,
        "A sample VM image built for 512-byte sectors (GPT, ESP with systemd-boot, ext4 root)",
    );
    let image = TestImage::standard().context("building the sample image")?;
    vmblk(&["inspect".as_ref(), image.qcow2.as_os_str()])?;

    step(
        2,
        "A simulated 4K NVMe drive: a 4096-byte-sector loop device over a sparse 1 GiB file",
    );
    let volume = Volume::new(4096, VOLUME_BYTES)?;
    println!(
        "{} (logical block size {})",
        volume.device().display(),
        volume.loop_device().logical_block_size()?
    );

    step(
        3,
        "vmblk unpack: copy, then repair the GPT through a 512-byte bridge, verify",
    );
    vmblk(&[
        "unpack".as_ref(),
        image.qcow2.as_os_str(),
        volume.device().as_os_str(),
    ])?;

    step(
        4,
        "vmblk export: serve the volume over vhost-user-blk with 512-byte sectors",
    );
    let export = CommandExport::start(CommandExportParams::vmblk(volume.device(), 512))?;
    println!("socket ready");

    step(
        5,
        "A UEFI guest (QEMU, TCG) boots from it and runs its checks",
    );
    let mut guest = Guest::start(&GuestParams::boot_from(&export).log_name("demo"))?;
    let outcome = guest.run_to_completion(1)?;
    let Some(boot) = outcome.report.last() else {
        bail!("the guest did not report\n{}", guest.diagnostics());
    };
    for c in &boot.checks {
        println!(
            "  guest: {:<40} {:<4} {}",
            c.name,
            if c.ok { "ok" } else { "FAIL" },
            c.value
        );
    }
    println!(
        "guest powered off after {:.1} s",
        outcome.elapsed.as_secs_f64()
    );
    boot.ensure_passed()?;
    println!("\nThe image built for 512-byte sectors boots from a 4096-byte-sector drive.");
    Ok(())
}
