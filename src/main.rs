use clap::Parser;
use modelpress::config::{Cli, Command};
use modelpress::startup::{shutdown_signal, Application, Role};

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Compress(args)) => std::process::exit(modelpress::cli::compress(args)),
        Some(Command::Inspect(args)) => std::process::exit(modelpress::cli::inspect(args)),
        Some(Command::Decompress(args)) => std::process::exit(modelpress::cli::decompress(args)),
        Some(Command::Evaluate(args)) => std::process::exit(modelpress::cli::evaluate(args)),
        Some(Command::Keys(args)) => std::process::exit(modelpress::cli::keys(args)),
        Some(Command::Verify(args)) => std::process::exit(modelpress::cli::verify(args)),
        Some(Command::Serve(cfg)) => serve(cfg, Role::Serve),
        Some(Command::Worker(cfg)) => serve(cfg, Role::Worker),
        None => serve(cli.serve, Role::Serve),
    }
}

fn serve(cfg: modelpress::config::ServeConfig, role: Role) -> anyhow::Result<()> {
    modelpress::telemetry::init_logging(&cfg.log_format);
    // What the server writes (the database with every tenant's webhook secret, the signing
    // key, models, artifacts) is the owner's alone: files 0600, directories 0700.
    modelpress::startup::private_umask();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let app = Application::build_as(cfg, role).await?;
        tracing::info!(addr = %app.local_addr(), ?role, "modelpress listening");
        app.run(shutdown_signal()).await
    })
}
