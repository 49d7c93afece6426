//! Training schedules of the named presets (model shapes live in `conf_model::presets`).

use crate::optim::OptimizerSettings;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SchedulePreset {
    pub training_steps: usize,
    pub eval_interval: usize,
    pub batch_size: usize,
    pub eval_windows: usize,
    pub optimizer: OptimizerSettings,
}

pub fn schedule(preset: &str) -> Option<SchedulePreset> {
    let optimizer = |learning_rate: f64, warmup_steps: usize| OptimizerSettings {
        learning_rate,
        min_learning_rate: learning_rate / 10.0,
        warmup_steps,
        weight_decay: 0.1,
        grad_clip: crate::trainee::GRAD_CLIP,
    };
    match preset {
        // 2 models × 3 seeds in about 3.5 minutes on 2 CPU cores (measured, flex).
        "quick" => Some(SchedulePreset {
            training_steps: 400,
            eval_interval: 50,
            batch_size: 16,
            eval_windows: 32,
            optimizer: optimizer(3e-3, 40),
        }),
        // The seed plan's numbers: 1000 steps of batch 4.
        "seed" => Some(SchedulePreset {
            training_steps: 1000,
            eval_interval: 100,
            batch_size: 4,
            eval_windows: 64,
            optimizer: optimizer(1e-3, 100),
        }),
        "gpu" => Some(SchedulePreset {
            training_steps: 5000,
            eval_interval: 250,
            batch_size: 32,
            eval_windows: 128,
            optimizer: optimizer(6e-4, 200),
        }),
        _ => None,
    }
}
