//! `crystal-quantize`: a Hugging Face CrystalChat checkpoint in, one
//! self-contained GGUF file out.

use anyhow::{bail, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use crystal_quantize::convert::{self, Preset, Progress};
use crystal_quantize::synth::{self, SynthFormat, SynthOptions, SynthShape};
use crystald::quant::GgmlType;
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Parser)]
#[command(
    name = "crystal-quantize",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    convert: ConvertArgs,
}

#[derive(Args)]
struct ConvertArgs {
    /// Hugging Face model directory (config.json, tokenizer.json, weights).
    input: Option<PathBuf>,
    /// Output GGUF file.
    #[arg(short, long)]
    output: Option<PathBuf>,
    /// Storage preset: q4_k_m (k-quant int4 mix, README "Quantization
    /// quality"), q4_k_s, q5_k_m, q6_k, q4_0 (int4 matrices, Q8_0
    /// embedding), q8_0, f16 or f32.
    #[arg(long = "type", default_value = "q4_0", value_parser = parse_preset)]
    preset: Preset,
    /// Overwrite an existing output file.
    #[arg(long)]
    force: bool,
    /// No progress output; errors are still printed.
    #[arg(short, long)]
    quiet: bool,
    /// Worker threads for quantization (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Importance-weighted rounding: run the checkpoint over these token
    /// sequences first (JSON lines, each an array of token ids as
    /// `crystald tokenize` prints, or {"token_ids": [...]}) and round each
    /// matrix to minimise the error weighted by its inputs' energy. Applies
    /// to q4_0 and the k-quants (README "Calibration").
    #[arg(long, value_name = "FILE")]
    calibrate: Option<PathBuf>,
    /// Tokens of the calibration file to run (the pass costs about this
    /// many tokens of f32 prefill).
    #[arg(long, value_name = "N", default_value_t = crystal_quantize::calibrate::DEFAULT_TOKENS, requires = "calibrate", value_parser = parse_positive)]
    calibrate_tokens: usize,
}

#[derive(Subcommand)]
enum Command {
    /// Write a random-weight checkpoint in real HF layouts, for benchmarks and tests.
    Synth {
        /// Output directory (created).
        #[arg(short, long)]
        output: PathBuf,
        #[arg(long, value_enum, default_value = "tiny")]
        shape: ShapeArg,
        #[arg(long, value_enum, default_value = "safetensors-bf16")]
        format: FormatArg,
        /// Shards for the .bin format.
        #[arg(long, default_value_t = 4)]
        shards: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// tokenizer.json to copy into the checkpoint.
        #[arg(long)]
        tokenizer: PathBuf,
        #[arg(short, long)]
        quiet: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum ShapeArg {
    /// The real CrystalChat 7B shapes.
    #[value(name = "7b")]
    Real7B,
    Tiny,
}

#[derive(Clone, Copy, ValueEnum)]
enum FormatArg {
    SafetensorsBf16,
    BinF32,
}

fn parse_positive(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("'{s}' is not a positive number of tokens")),
    }
}

fn parse_preset(s: &str) -> Result<Preset, String> {
    Preset::parse(s).ok_or_else(|| {
        let names: Vec<_> = Preset::ALL.iter().map(|p| p.name()).collect();
        format!("unknown type '{s}' ({})", names.join(", "))
    })
}

/// A bar on a terminal, one line per tensor elsewhere (journals, CI logs).
struct Reporter {
    bar: Option<ProgressBar>,
    plain: bool,
    n_tensors: usize,
    done: usize,
}

impl Progress for Reporter {
    fn start(&mut self, total_bytes: u64, n_tensors: usize) {
        self.n_tensors = n_tensors;
        if let Some(bar) = &self.bar {
            bar.set_length(total_bytes);
        }
    }
    fn tensor_done(&mut self, name: &str, ty: GgmlType, input_bytes_done: u64) {
        self.done += 1;
        if let Some(bar) = &self.bar {
            bar.set_position(input_bytes_done);
            bar.set_message(name.to_string());
        } else if self.plain {
            eprintln!("[{}/{}] {name} -> {ty}", self.done, self.n_tensors);
        }
    }
    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
    fn note(&mut self, msg: &str) {
        match &self.bar {
            Some(bar) => bar.set_message(msg.to_string()),
            None if self.plain => eprintln!("{msg}"),
            None => {}
        }
    }
}

fn reporter(quiet: bool) -> Reporter {
    let tty = std::io::stderr().is_terminal();
    let bar = (!quiet && tty).then(|| {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template(
                "{bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta} {msg}",
            )
            .expect("valid template"),
        );
        bar
    });
    Reporter {
        bar,
        plain: !quiet && !tty,
        n_tensors: 0,
        done: 0,
    }
}

fn run_convert(a: ConvertArgs) -> Result<()> {
    let (Some(input), Some(output)) = (a.input, a.output) else {
        bail!("usage: crystal-quantize <HF_DIR> -o <OUT.gguf> [--type q4_0|q8_0|f16|f32] (see --help)");
    };
    let threads = a
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let opts = convert::Options {
        input,
        output,
        preset: a.preset,
        force: a.force,
        threads,
        calibration: a.calibrate.map(|path| convert::CalibrationInput {
            path,
            max_tokens: a.calibrate_tokens,
        }),
    };
    let mut rep = reporter(a.quiet);
    let s = convert::convert(&opts, &mut rep)?;
    if !a.quiet {
        let types: Vec<String> = s
            .tensors_by_type
            .iter()
            .map(|(t, n)| format!("{n} {t}"))
            .collect();
        eprintln!(
            "wrote {}: {} tensors ({}), {:.2} bits/weight over {:.2}B weights{}, {:.2} GiB, xxh3 {:016x}, in {:.1}s ({:.2} GB/s input), peak RSS {}",
            opts.output.display(),
            s.tensors_by_type.values().sum::<usize>(),
            types.join(", "),
            s.bits_per_weight(),
            s.params as f64 / 1e9,
            s.calibration_tokens.map_or(String::new(), |n| format!(", calibrated on {n} tokens")),
            s.output_bytes as f64 / (1u64 << 30) as f64,
            s.checksum,
            s.elapsed.as_secs_f64(),
            s.input_gb_per_s(),
            crystald::procfs::peak_rss().map_or("unknown".into(), |b| format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)),
        );
    }
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    // An interrupted conversion must not leave a partial file behind.
    let _ = ctrlc::set_handler(|| {
        convert::remove_partial_output();
        eprintln!("crystal-quantize: interrupted");
        std::process::exit(130);
    });
    let result = match cli.command {
        None => run_convert(cli.convert),
        Some(Command::Synth {
            output,
            shape,
            format,
            shards,
            seed,
            tokenizer,
            quiet,
        }) => {
            let opts = SynthOptions {
                shape: match shape {
                    ShapeArg::Real7B => SynthShape::Real7B,
                    ShapeArg::Tiny => SynthShape::Tiny,
                },
                format: match format {
                    FormatArg::SafetensorsBf16 => SynthFormat::SafetensorsBf16,
                    FormatArg::BinF32 => SynthFormat::BinF32Sharded { shards },
                },
                seed,
                tokenizer_json: tokenizer,
            };
            let started = Instant::now();
            let mut last = Instant::now();
            let mut report = |name: &str, done: u64, total: u64| {
                if !quiet && (last.elapsed().as_secs() >= 2 || done == total) {
                    eprintln!("{:5.1}% {name}", 100.0 * done as f64 / total.max(1) as f64);
                    last = Instant::now();
                }
            };
            synth::write_synthetic(&output, &opts, &mut report).map(|()| {
                if !quiet {
                    eprintln!(
                        "wrote {} in {:.1}s",
                        output.display(),
                        started.elapsed().as_secs_f64()
                    );
                }
            })
        }
    };
    if let Err(e) = result {
        eprintln!("crystal-quantize: error: {e:#}");
        std::process::exit(1);
    }
}
