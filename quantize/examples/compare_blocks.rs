//! Our k-quant (and Q4_0/Q8_0) blocks against another quantizer's, for the
//! same f32 rows: `scripts/compare-llama-quantize.sh` feeds it an f32 GGUF
//! and what llama.cpp's `llama-quantize` made of it.
//!
//!     compare_blocks SRC_F32.gguf QUANTIZED.gguf
//!
//! Prints, per storage type: tensors, blocks, blocks byte-identical to ours,
//! and the relative L2 error against the f32 source of both encodings, so a
//! difference shows whether it matters.

use crystald::gguf::Gguf;
use crystald::quant::{self, GgmlType};
use std::collections::BTreeMap;

#[derive(Default)]
struct Tally {
    tensors: usize,
    blocks: usize,
    identical: usize,
    src_sq: f64,
    ours_sq: f64,
    theirs_sq: f64,
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(
        args.len() == 3,
        "usage: compare_blocks SRC_F32.gguf QUANTIZED.gguf"
    );
    let src = Gguf::open(std::path::Path::new(&args[1]))?;
    let out = Gguf::open(std::path::Path::new(&args[2]))?;
    let mut by_type: BTreeMap<&str, Tally> = BTreeMap::new();
    for t in &out.header.tensors {
        if matches!(t.ty, GgmlType::F32 | GgmlType::F16) {
            continue;
        }
        let s = src
            .header
            .tensor(&t.name)
            .ok_or_else(|| anyhow::anyhow!("{} is not in the source", t.name))?;
        anyhow::ensure!(
            s.ty == GgmlType::F32 && s.dims == t.dims,
            "{}: source is not f32 of the same shape",
            t.name
        );
        let cols = t.dims[0] as usize;
        let row_bytes = t.ty.row_bytes(cols).expect("valid file");
        let values: Vec<f32> = src
            .data(s)
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let theirs = out.data(t);
        let tally = by_type.entry(t.ty.name()).or_default();
        tally.tensors += 1;
        let (mut ours, mut deq_ours, mut deq_theirs) =
            (vec![0u8; row_bytes], vec![0f32; cols], vec![0f32; cols]);
        for (x, theirs) in values
            .chunks_exact(cols)
            .zip(theirs.chunks_exact(row_bytes))
        {
            quant::quantize_row(t.ty, x, None, &mut ours);
            for (a, b) in ours
                .chunks_exact(t.ty.type_size())
                .zip(theirs.chunks_exact(t.ty.type_size()))
            {
                tally.blocks += 1;
                tally.identical += usize::from(a == b);
            }
            quant::dequantize_row(t.ty, &ours, &mut deq_ours);
            quant::dequantize_row(t.ty, theirs, &mut deq_theirs);
            for ((&v, &a), &b) in x.iter().zip(&deq_ours).zip(&deq_theirs) {
                tally.src_sq += (v as f64).powi(2);
                tally.ours_sq += (a as f64 - v as f64).powi(2);
                tally.theirs_sq += (b as f64 - v as f64).powi(2);
            }
        }
    }
    println!("| type | tensors | blocks | byte-identical | rel. L2 error, ours | rel. L2 error, theirs |");
    println!("|---|---|---|---|---|---|");
    for (ty, t) in &by_type {
        println!(
            "| {ty} | {} | {} | {} ({:.4} %) | {:.6e} | {:.6e} |",
            t.tensors,
            t.blocks,
            t.identical,
            100.0 * t.identical as f64 / t.blocks.max(1) as f64,
            (t.ours_sq / t.src_sq).sqrt(),
            (t.theirs_sq / t.src_sq).sqrt()
        );
    }
    Ok(())
}
