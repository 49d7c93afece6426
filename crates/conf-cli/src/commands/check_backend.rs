//! `lookahead check-backend`: the backend against flex (`crate::equivalence`), and with
//! `--bf16-training` its bf16 training against its f32 training (`crate::bf16_training`), one
//! line per comparison; exit 1 when one is off.

use anyhow::anyhow;

use crate::Failure;
use crate::cli::CheckBackendArgs;
use crate::commands::{open_device, print_json};
use crate::{bf16_training, equivalence};

pub fn run(args: CheckBackendArgs) -> Result<(), Failure> {
    let device = open_device(&args.target)?;
    let mut checks = equivalence::check(&device);
    if args.bf16_training {
        checks.extend(bf16_training::check(&device)?);
    }
    let backend = args.target.backend;
    if args.json {
        print_json(&checks)?;
    } else {
        println!("{backend} against flex: deviation / tolerance (at most 1 passes)");
        for check in &checks {
            let verdict = if check.passed() { "ok" } else { "OFF" };
            println!(
                "{verdict:>3} {:>9.3}  {}  ({})",
                check.worst, check.what, check.detail
            );
        }
    }
    let off: Vec<&str> = checks
        .iter()
        .filter(|c| !c.passed())
        .map(|c| c.what.as_str())
        .collect();
    if off.is_empty() {
        if !args.json {
            println!(
                "{backend} matches flex: {} comparisons within tolerance",
                checks.len()
            );
        }
        Ok(())
    } else {
        Err(Failure::Run(anyhow!(
            "{backend} differs from flex in {} of {} comparisons: {}",
            off.len(),
            checks.len(),
            off.join("; ")
        )))
    }
}
