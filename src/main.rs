//! The `crystald` command: the daemon and its tools.

mod cli;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "crystald",
    version,
    about = "CrystalChat inference for small Linux devices"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a reply to one prompt, streamed to stdout.
    Generate(cli::generate::Args),
    /// Print the token ids of a text or a chat as a JSON array.
    Tokenize(cli::tokenize::Args),
    /// Run token ids through the model: logits at every position and a greedy continuation.
    Eval(cli::eval::Args),
    /// Measure prefill and decode speed, start-up time and memory.
    Bench(cli::bench::Args),
    /// Run the daemon: load the model and answer requests on a Unix socket.
    Serve(cli::serve::Args),
    /// Ask a running daemon one question; the answer streams to stdout.
    Ask(cli::ask::Args),
    /// Talk to the model in the terminal.
    Chat(cli::chat::Args),
    /// Check a model file against the checksum it records, and time it.
    Verify(cli::verify::Args),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(a) => cli::generate::run(a),
        Command::Tokenize(a) => cli::tokenize::run(a),
        Command::Eval(a) => cli::eval::run(a),
        Command::Bench(a) => cli::bench::run(a),
        Command::Serve(a) => cli::serve::run(a),
        Command::Ask(a) => std::process::exit(cli::ask::run(a)),
        Command::Chat(a) => std::process::exit(cli::chat::run(a)),
        Command::Verify(a) => cli::verify::run(a).map(|code| {
            if code != 0 {
                std::process::exit(code)
            }
        }),
    };
    if let Err(e) = result {
        eprintln!("crystald: error: {e:#}");
        std::process::exit(1);
    }
}
