use clap::Parser;
use sprintlink::cli::{self, Cli, Command};

fn main() {
    let cli = Cli::parse();
    let json_logs =
        std::env::var("SPRINTLINK_LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    let code = match cli.command {
        Command::CheckConfig { config, online } => cli::check_config(config, online),
        Command::Sign {
            config,
            source,
            file,
            content_type,
        } => cli::sign(config, &source, file, &content_type),
        command => {
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("sprintlink: cannot start the runtime: {e}");
                    std::process::exit(1);
                }
            };
            runtime.block_on(async {
                match command {
                    Command::Serve { config } => {
                        sprintlink::telemetry::init_logging(json_logs);
                        cli::serve(config).await
                    }
                    Command::Demo => cli::demo().await,
                    Command::Sprinthub {
                        command: cli::SprinthubCommand::Definitions { config },
                    } => cli::sprinthub_definitions(config).await,
                    Command::Migrate { config, dry_run } => cli::migrate(config, dry_run).await,
                    Command::Backup { config, to } => cli::backup(config, to).await,
                    Command::Healthcheck { url, config } => cli::healthcheck(url, config).await,
                    Command::AlertTest { config } => cli::alert_test(config).await,
                    _ => unreachable!("handled above"),
                }
            })
        }
    };
    std::process::exit(code);
}
