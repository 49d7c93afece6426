//! `lookahead results load FILE`: validate a results file.

use crate::Failure;
use crate::cli::ResultsCommand;

pub fn run(command: ResultsCommand) -> Result<(), Failure> {
    match command {
        ResultsCommand::Load { file } => {
            let results = crate::results::load(&file).map_err(|e| Failure::BadInput(e.into()))?;
            let seeds = results.config.seeds.len();
            println!(
                "{}: valid (schema {}, {seeds} seed{}, backend {}, {})",
                file.display(),
                results.schema_version,
                if seeds == 1 { "" } else { "s" },
                results.backend,
                match results.status {
                    crate::results::ExperimentStatus::Complete => "complete",
                    crate::results::ExperimentStatus::Incomplete => "INCOMPLETE",
                }
            );
            print!("{}", crate::report::summary_markdown(&results));
            Ok(())
        }
    }
}
