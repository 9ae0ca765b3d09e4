use anyhow::Context;
use clap::Parser;
use wsfleet::config::{Cli, Command};
use wsfleet::gateway::{Gateway, shutdown_signal};
use wsfleet::telemetry::logging;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(config) => {
            logging::init(config.log_format);
            let gateway = Gateway::bind(*config)
                .await
                .context("starting wsfleet serve")?;
            gateway.run(shutdown_signal()).await;
        }
    }
    Ok(())
}
