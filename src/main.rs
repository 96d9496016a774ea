//! The egressd command line: `run`, `check`, `explain`.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use egressd::cli;
use egressd::config::DEFAULT_PATH;

#[derive(Parser)]
#[command(name = "egressd", version, about = "Egress-enforcing HTTP/HTTPS forward proxy and DNS firewall")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
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
    let command = cli.command.unwrap_or(Command::Check { config: PathBuf::from(DEFAULT_PATH) });
    let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
    match command {
        Command::Check { config } => exit(cli::check::run(&config, &mut out, &mut err)),
        Command::Explain { config, client, method, json, target } => {
            exit(cli::explain::run(&config, &target, client, &method, json, &mut out, &mut err))
        }
    }
}
