//! The `gve` binary.

use clap::Parser;

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("GVE_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // Colours only for people: logs sent to files and pipes stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    gve::libvirt_log::route_to_log();
    gve::api::server::raise_fd_limit();
    let cli = gve::cli::Cli::parse();
    std::process::exit(gve::cli::run(cli).await);
}
