//! `lookahead sample`: text from a trained model, printed token by token as it is generated;
//! the confidence model's predicted future loss colours each token on a terminal and is a field
//! of each line with `--json`.

use std::io::{IsTerminal, Write};

use anstyle::{AnsiColor, Style};
use anyhow::{Context, anyhow};
use conf_data::Tokenizer;
use conf_train::generate::{Generate, GenerateOptions, GeneratedToken, Sampling};
use conf_train::weights::{self, AnyModel};
use serde::Serialize;

use crate::Failure;
use crate::cli::SampleArgs;

/// One line of `--json` output: a generated token and the text it completes.
#[derive(Serialize)]
struct TokenLine<'a> {
    index: usize,
    id: u32,
    /// The text this token completes (empty while a multi-byte character is unfinished); the
    /// lines' texts concatenate to the generated text.
    text: &'a str,
    predicted_loss: Option<f32>,
}

pub fn run(args: SampleArgs) -> Result<(), Failure> {
    let sampling = Sampling {
        temperature: args.temperature,
        top_p: args.top_p,
    };
    sampling
        .validate()
        .map_err(|e| Failure::BadInput(anyhow!(e)))?;
    let device = super::open_device(&args.target)?;
    let trained = weights::load(&args.source, &device).map_err(super::export::weights_failure)?;
    let tokenizer = trained.card.tokenizer.build();
    let prompt = tokenizer
        .encode(&args.prompt)
        .map_err(|e| Failure::BadInput(anyhow!("--prompt: {e}")))?;
    if prompt.is_empty() {
        return Err(Failure::BadInput(anyhow!(
            "--prompt: give at least one token of text to continue"
        )));
    }
    let gpt = trained.card.architecture.gpt();
    let options = GenerateOptions {
        new_tokens: args.max_new_tokens,
        context: gpt.context_length,
        sampling,
        seed: args.seed,
        conf_input: trained.card.conf_input,
    };
    let mut out = std::io::stdout().lock();
    let mut printer = Printer {
        tokenizer: &*tokenizer,
        ids: Vec::new(),
        total: args.max_new_tokens,
        printed: 0,
        json: args.json,
        colour: !args.json && std::io::stdout().is_terminal(),
        // A prediction is coloured against the loss of a uniform guess, ln V.
        uniform_loss: (gpt.vocab_size as f32).ln(),
        error: None,
    };
    if !args.json {
        write!(out, "{}", args.prompt).context("writing to stdout")?;
    }
    let mut emit = |token: GeneratedToken| printer.emit(&mut out, token);
    match &trained.model {
        AnyModel::Standard(model) => model.generate_each(&prompt, &options, &mut emit),
        AnyModel::Confidence(model) => model.generate_each(&prompt, &options, &mut emit),
    }
    if let Some(e) = printer.error {
        return Err(Failure::Run(e));
    }
    if !args.json {
        writeln!(out).context("writing to stdout")?;
    }
    Ok(())
}

struct Printer<'a> {
    tokenizer: &'a dyn Tokenizer,
    ids: Vec<u32>,
    /// Tokens the generation makes.
    total: usize,
    /// Characters of the decoded generation already printed.
    printed: usize,
    json: bool,
    colour: bool,
    uniform_loss: f32,
    error: Option<anyhow::Error>,
}

impl Printer<'_> {
    fn emit(&mut self, out: &mut impl Write, token: GeneratedToken) {
        if self.error.is_some() {
            return;
        }
        self.ids.push(token.id);
        let text = self.tokenizer.decode(&self.ids);
        // A byte-level token can end inside a character: hold it back until it is complete
        // (or the generation ends).
        let complete = if self.ids.len() < self.total {
            text.trim_end_matches(char::REPLACEMENT_CHARACTER)
        } else {
            &text
        };
        let piece: String = complete.chars().skip(self.printed).collect();
        self.printed += piece.chars().count();
        let written = if self.json {
            let line = TokenLine {
                index: self.ids.len() - 1,
                id: token.id,
                text: &piece,
                predicted_loss: token.predicted_loss,
            };
            serde_json::to_string(&line)
                .map_err(anyhow::Error::from)
                .and_then(|l| writeln!(out, "{l}").map_err(Into::into))
        } else {
            let style = match token.predicted_loss {
                Some(loss) if self.colour => self.style(loss),
                _ => Style::new(),
            };
            write!(out, "{}{piece}{}", style.render(), style.render_reset())
                .and_then(|()| out.flush())
                .map_err(Into::into)
        };
        if let Err(e) = written {
            self.error = Some(e.context("writing to stdout"));
        }
    }

    /// Green for a predicted loss under a quarter of a uniform guess's, yellow under half, red
    /// above.
    fn style(&self, loss: f32) -> Style {
        let colour = if loss < 0.25 * self.uniform_loss {
            AnsiColor::Green
        } else if loss < 0.5 * self.uniform_loss {
            AnsiColor::Yellow
        } else {
            AnsiColor::Red
        };
        Style::new().fg_color(Some(colour.into()))
    }
}
