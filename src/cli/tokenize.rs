use anyhow::{Context, Result};
use crystald::tokenizer::{chat, Message};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
#[command(group = clap::ArgGroup::new("input").required(true))]
pub struct Args {
    #[arg(short, long)]
    model: PathBuf,
    /// Text to encode alone (no <s>, as a segment of the chat layout).
    #[arg(long, group = "input")]
    text: Option<String>,
    /// A JSON file `[{"role": "system"|"user"|"assistant", "content": "..."}]`, rendered with the chat template.
    #[arg(long, group = "input")]
    messages: Option<PathBuf>,
}

pub fn run(a: Args) -> Result<()> {
    // Tokenizing needs the file's tokenizer and ids, not the weights' compute.
    let (model, tok) = super::load(&a.model, Some(1), None, crystald::model::DeviceChoice::Cpu)?;
    drop(model);
    let ids = if let Some(text) = &a.text {
        tok.encode(text)?
    } else {
        let path = a.messages.as_ref().expect("clap requires one input");
        let json = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let messages: Vec<Message> = serde_json::from_str(&json).with_context(|| {
            format!(
                "{}: not a list of {{role, content}} messages",
                path.display()
            )
        })?;
        chat::render(&tok, &messages).with_context(|| path.display().to_string())?
    };
    println!("{}", serde_json::to_string(&ids)?);
    Ok(())
}
