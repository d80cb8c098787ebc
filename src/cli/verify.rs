use anyhow::Result;
use crystald::gguf::{checksum, Gguf};
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The GGUF model file.
    model: PathBuf,
}

/// Exit status: 0 the checksum matches, 1 it does not, a block scale is
/// NaN or infinite, or the file cannot be read, 2 the file records no
/// checksum.
pub fn run(a: Args) -> Result<i32> {
    let file = Gguf::open(&a.model).map_err(|e| anyhow::anyhow!("{}: {e}", a.model.display()))?;
    let started = Instant::now();
    let verdict = checksum::verify(&file);
    let secs = started.elapsed().as_secs_f64();
    // A checksum vouches for the bytes, not for what wrote them.
    if !matches!(verdict, checksum::Verdict::Mismatch { .. }) {
        if let Err(e) = checksum::check_scales(&file) {
            eprintln!("crystald: error: {}: {e}", a.model.display());
            return Ok(1);
        }
    }
    let gb = file.file_len() as f64 / 1e9;
    let shown = a.model.display();
    match verdict {
        checksum::Verdict::Match(_) => {
            println!(
                "{shown}: {} ({gb:.2} GB in {secs:.2}s, {:.2} GB/s)",
                verdict.describe(),
                gb / secs.max(1e-9)
            );
            Ok(0)
        }
        checksum::Verdict::Mismatch { .. } => {
            eprintln!("crystald: error: {shown}: {}", verdict.describe());
            Ok(1)
        }
        checksum::Verdict::Absent => {
            // Still read it all: the hash to compare by hand, and the time.
            let started = Instant::now();
            let h = xxhash_rust::xxh3::xxh3_64(file.map());
            let secs = started.elapsed().as_secs_f64();
            eprintln!(
                "{shown}: {}; the file hashes to xxh3 {h:016x} ({gb:.2} GB in {secs:.2}s)",
                verdict.describe()
            );
            Ok(2)
        }
    }
}
