//! `lookahead export`: a run's weights as a SafeTensors file with PyTorch's names and layouts.

use conf_train::weights::{self, WeightsError};

use crate::Failure;
use crate::cli::{ExportArgs, ExportFormat};

/// A file that cannot be read or does not fit is the user's input (exit 2).
pub fn weights_failure(e: WeightsError) -> Failure {
    Failure::BadInput(e.into())
}

pub fn run(args: ExportArgs) -> Result<(), Failure> {
    // Exporting reads and writes weights only: the default CPU backend does it.
    let device = crate::backend::device(crate::backend::BackendChoice::default_compiled(), None)?;
    let trained = weights::load(&args.source, &device).map_err(weights_failure)?;
    let out = match (&args.out, &trained.run_dir, args.format) {
        (Some(out), _, _) => out.clone(),
        (None, Some(run_dir), ExportFormat::Safetensors) => run_dir.join("model.safetensors"),
        (None, None, _) => {
            return Err(Failure::BadInput(anyhow::anyhow!(
                "{} is already an export: name another file with --out",
                args.source.display()
            )));
        }
    };
    match args.format {
        ExportFormat::Safetensors => {
            weights::export_safetensors(&trained, &out).map_err(|e| Failure::Run(e.into()))?
        }
    }
    let step = trained
        .step
        .map_or(String::new(), |s| format!(" at step {s}"));
    println!(
        "exported the {} model ({} objective){step} from {} to {}",
        trained.card.architecture.name(),
        trained.card.objective.name(),
        trained.source.display(),
        out.display()
    );
    Ok(())
}
