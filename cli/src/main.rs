use clap::Parser;

fn main() {
    let cli = vmblk::Cli::parse();
    vmblk::init_tracing(&cli);
    std::process::exit(vmblk::run(cli));
}
