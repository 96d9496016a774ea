//! The egressd command line: `run`, `check`, `explain`.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use egressd::cli;
use egressd::config::DEFAULT_PATH;
use egressd::telemetry::LogFormat;

#[derive(Parser)]
#[command(name = "egressd", version, about = "Egress-enforcing HTTP/HTTPS forward proxy and DNS firewall")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy and DNS firewall (the default command).
    Run {
        #[arg(long, default_value = DEFAULT_PATH)]
        config: PathBuf,
        /// Log format: json (one object per line, the default) or text.
        #[arg(long, default_value = "json", value_parser = ["json", "text"])]
        log_format: String,
    },
    /// Validate the config and every rule file, print a summary and lints; exit 1 on error.
    Check {
        #[arg(long, default_value = DEFAULT_PATH)]
        config: PathBuf,
    },
    /// Explain how the policy decides TARGET: a URL, host:port (CONNECT) or dns:NAME[/QTYPE].
    /// Exit 0 allow, 3 deny.
    Explain {
        #[arg(long, default_value = DEFAULT_PATH)]
        config: PathBuf,
        /// Client source address (client-scoped rules apply only with it).
        #[arg(long)]
        client: Option<IpAddr>,
        /// HTTP method for a URL target.
        #[arg(long, default_value = "GET")]
        method: String,
        /// Print the report as one JSON object.
        #[arg(long)]
        json: bool,
        target: String,
    },
}

fn exit(code: i32) -> ExitCode {
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let command =
        cli.command.unwrap_or(Command::Run { config: PathBuf::from(DEFAULT_PATH), log_format: "json".to_string() });
    let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
    match command {
        Command::Run { config, log_format } => match run(&config, &log_format) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("egressd: {e}");
                ExitCode::from(1)
            }
        },
        Command::Check { config } => exit(cli::check::run(&config, &mut out, &mut err)),
        Command::Explain { config, client, method, json, target } => {
            exit(cli::explain::run(&config, &target, client, &method, json, &mut out, &mut err))
        }
    }
}

fn run(config: &std::path::Path, log_format: &str) -> anyhow::Result<()> {
    let format = if log_format == "text" { LogFormat::Text } else { LogFormat::Json };
    egressd::telemetry::init(format);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let result = runtime.block_on(egressd::app::run(config));
    // Tasks still holding connections are cancelled; do not wait on them.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    // A line another thread is still writing (the last audit lines, the stop line) reaches stdout.
    egressd::telemetry::sink::flush(std::time::Duration::from_secs(5));
    result?;
    Ok(())
}
