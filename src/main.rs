use anyhow::Context;
use clap::Parser;
use wsfleet::config::{Cli, Command};
use wsfleet::controller;
use wsfleet::gateway::{Gateway, shutdown_signal};
use wsfleet::telemetry::logging;

#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(config) => {
            let telemetry = logging::init(config.log_format);
            let gateway = Gateway::bind(*config)
                .await
                .context("starting wsfleet serve")?;
            gateway.run(shutdown_signal()).await;
            telemetry.shutdown();
        }
        Command::Controller(config) => {
            let telemetry = logging::init(config.log_format);
            config.validate().context("wsfleet controller")?;
            let client = kube::Client::try_default()
                .await
                .context("connecting to the Kubernetes API")?;
            let namespace = config
                .namespace
                .clone()
                .or_else(|| std::env::var("POD_NAMESPACE").ok())
                .unwrap_or_else(|| client.default_namespace().to_string());
            let shutdown = tokio_util::sync::CancellationToken::new();
            let pods = controller::reflect_pods(
                kube::Api::namespaced(client.clone(), &namespace),
                &config.pod_selector,
                shutdown.clone(),
            );
            let stop = shutdown.clone();
            tokio::spawn(async move {
                shutdown_signal().await;
                stop.cancel();
            });
            controller::run(*config, client, std::sync::Arc::new(pods), shutdown)
                .await
                .context("running wsfleet controller")?;
            telemetry.shutdown();
        }
    }
    Ok(())
}
