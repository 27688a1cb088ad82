use clap::Parser;

fn main() {
    let args = vmblkd::Args::parse();
    vmblkd::init_tracing(args.log_format, args.verbose);
    if let Err(e) = vmblkd::run(args) {
        tracing::error!("{e:#}");
        eprintln!("vmblkd: {e:#}");
        std::process::exit(1);
    }
}
