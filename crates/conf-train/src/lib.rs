//! Training of both models: objectives, the no-gradient lookahead passes, metrics, the wiring
//! into burn-train's Learner, and the pipeline that runs one model end to end.

pub mod batch;
pub mod bench;
pub mod calibration;
pub mod checkpoint;
pub mod cost;
pub mod generate;
pub mod history;
pub mod loader;
pub mod lookahead;
pub mod metrics;
pub mod objective;
pub mod optim;
pub mod pipeline;
pub mod profile;
pub mod renderer;
pub mod step;
pub mod stop;
pub mod trainee;
pub mod training;
pub mod weights;

pub use batch::{LookaheadBatch, LookaheadBatcher};
pub use lookahead::ConfInput;
pub use objective::{
    ConfidenceSettings, DenseObjective, LookaheadStats, Objective, ObjectiveKind, ObjectiveOutput,
    SeedObjective, StandardObjective, TeacherObjective, TokenStats, WindowParts,
};
