//! `lookahead results load FILE`: validate a results file.

use crate::Failure;
use crate::cli::ResultsCommand;

pub fn run(command: ResultsCommand) -> Result<(), Failure> {
    match command {
        ResultsCommand::Load { file } => {
            let results = crate::results::load(&file).map_err(|e| Failure::BadInput(e.into()))?;
            println!(
                "{}: valid (schema {}, {} seeds, backend {})",
                file.display(),
                results.schema_version,
                results.standard_model_results.len(),
                results.backend
            );
            print!("{}", crate::report::summary_markdown(&results));
            Ok(())
        }
    }
}
