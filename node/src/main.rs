//! The `fanout` binary: parse the configuration, start a node, and stop it
//! gracefully on SIGINT or SIGTERM.

use clap::{CommandFactory, Parser, error::ErrorKind};
use fanout::{Config, Server, config::LogFormat};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    if let Err(e) = config.validate() {
        Config::command()
            .error(ErrorKind::ArgumentConflict, e)
            .exit();
    }
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    match config.log_format {
        LogFormat::Text => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
            .init(),
        LogFormat::Json => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .json()
            .init(),
    }
    if config.publish_key.is_none() {
        tracing::warn!(
            "no publish key configured (--publish-key / FANOUT_PUBLISH_KEY): \
             POST /api/publish is accepted from loopback addresses only"
        );
    }
    if config.pocketbase_secret.is_some() && config.pocketbase_url.is_none() {
        tracing::warn!(
            "--pocketbase-secret (FANOUT_POCKETBASE_SECRET) is set but --pocketbase-url \
             (FANOUT_POCKETBASE_URL) is not: companion mode is off"
        );
    }
    if config.jwt_secret.is_none() && config.pocketbase_url.is_none() {
        tracing::info!("no JWT secret configured: every realtime client is a guest");
    }
    let server = Server::start(config).await?;
    shutdown_signal().await;
    tracing::info!("shutting down: closing streams so clients reconnect elsewhere");
    server.shutdown().await?;
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
