//! Stopping a run from outside: a signal (SIGINT, SIGTERM) or the dashboard's stop. A stopped
//! run finishes its current optimizer step, saves a checkpoint at it, and returns what it
//! trained, marked as such, so that it can be recorded honestly and resumed.

use std::sync::{Arc, Mutex};

use burn::train::Interrupter;
use serde::{Deserialize, Serialize};

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    /// Every configured step trained.
    Complete,
    /// Stopped from the dashboard.
    Stopped,
    /// Stopped by a signal (SIGINT, SIGTERM).
    Interrupted,
}

/// Why a stop was requested from outside the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// A signal, by number (2 SIGINT, 15 SIGTERM).
    Signal(i32),
}

impl StopReason {
    /// The shell's exit code for it: 128 + the signal number.
    pub fn exit_code(self) -> u8 {
        match self {
            Self::Signal(n) => (128 + n).clamp(0, 255) as u8,
        }
    }

    pub fn describe(self) -> String {
        match self {
            Self::Signal(2) => "interrupted (SIGINT)".into(),
            Self::Signal(15) => "terminated (SIGTERM)".into(),
            Self::Signal(n) => format!("stopped by signal {n}"),
        }
    }
}

#[derive(Default)]
struct StopState {
    reason: Option<StopReason>,
    /// The interrupter of the run in progress, if any.
    current: Option<Interrupter>,
}

/// A stop request shared by whoever receives signals and the runs of this process.
#[derive(Clone, Default)]
pub struct StopRequest(Arc<Mutex<StopState>>);

impl std::fmt::Debug for StopRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("StopRequest")
            .field(&self.requested())
            .finish()
    }
}

impl StopRequest {
    /// Asks the run in progress, and every later one, to stop.
    pub fn request(&self, reason: StopReason) {
        let mut state = self.0.lock().expect("stop lock");
        state.reason.get_or_insert(reason);
        if let Some(interrupter) = &state.current {
            interrupter.stop(Some(&reason.describe()));
        }
    }

    /// The stop asked for, if any.
    pub fn requested(&self) -> Option<StopReason> {
        self.0.lock().expect("stop lock").reason
    }

    /// Makes `interrupter` the run in progress (stopping it at once if a stop is pending).
    pub(crate) fn attach(&self, interrupter: Interrupter) {
        let mut state = self.0.lock().expect("stop lock");
        if let Some(reason) = state.reason {
            interrupter.stop(Some(&reason.describe()));
        }
        state.current = Some(interrupter);
    }

    pub(crate) fn detach(&self) {
        self.0.lock().expect("stop lock").current = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_stops_the_attached_run_and_any_later_one() {
        let stop = StopRequest::default();
        let first = Interrupter::new();
        stop.attach(first.clone());
        assert!(!first.should_stop());
        stop.request(StopReason::Signal(15));
        assert!(first.should_stop());
        assert_eq!(stop.requested(), Some(StopReason::Signal(15)));
        let later = Interrupter::new();
        stop.attach(later.clone());
        assert!(later.should_stop());
        assert_eq!(StopReason::Signal(2).exit_code(), 130);
        assert_eq!(StopReason::Signal(15).exit_code(), 143);
    }
}
