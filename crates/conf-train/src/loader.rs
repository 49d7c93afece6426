//! Iteration-based training on burn-train's epoch loop: one "epoch" is `eval_interval`
//! optimizer steps, each the next batch of the run's window sequence, so the data order is a
//! function of (seed, step) alone.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use burn::data::dataloader::batcher::Batcher;
use burn::data::dataloader::{DataLoader, DataLoaderIterator, Progress};
use burn::data::dataset::{Dataset, DatasetError};
use burn::prelude::*;
use conf_data::{Corpus, Split, TrainWindows};

use crate::batch::{LookaheadBatch, LookaheadBatcher};

/// Time spent inside training epochs: from the request of an epoch's first batch to the end of
/// its last step, the epoch in progress included.
#[derive(Debug, Clone, Default)]
pub struct StepTimer(Arc<Mutex<TimerState>>);

#[derive(Debug, Default)]
struct TimerState {
    done: Duration,
    epoch_started: Option<Instant>,
}

impl StepTimer {
    pub fn seconds(&self) -> f64 {
        let state = self.0.lock().expect("timer lock");
        let running = state.epoch_started.map_or(Duration::ZERO, |s| s.elapsed());
        (state.done + running).as_secs_f64()
    }

    fn start_epoch(&self) {
        let mut state = self.0.lock().expect("timer lock");
        state.epoch_started.get_or_insert_with(Instant::now);
    }

    pub(crate) fn end_epoch(&self) {
        let mut state = self.0.lock().expect("timer lock");
        if let Some(started) = state.epoch_started.take() {
            state.done += started.elapsed();
        }
    }
}

/// The batch of each optimizer step of a run: step k takes training windows
/// `k·B .. (k + 1)·B` of the seed's window sequence.
#[derive(Clone)]
pub struct TrainBatches {
    windows: Arc<TrainWindows>,
    batcher: LookaheadBatcher,
    batch_size: usize,
    device: Device,
}

impl TrainBatches {
    /// Enough windows for `steps` steps of `batch_size` windows of `seq_len + 2` tokens.
    pub fn new(
        corpus: &Corpus,
        split: &Split,
        seq_len: usize,
        batch_size: usize,
        steps: usize,
        seed: u64,
        device: Device,
    ) -> Self {
        let windows = TrainWindows::new(
            corpus.tokens.clone(),
            split.train.clone(),
            seq_len,
            seed,
            steps * batch_size,
        );
        Self {
            windows: Arc::new(windows),
            batcher: LookaheadBatcher { seed },
            batch_size,
            device,
        }
    }

    pub fn batch(&self, step: usize) -> Result<LookaheadBatch, DatasetError> {
        let items = (step * self.batch_size..(step + 1) * self.batch_size)
            .map(|i| self.windows.get(i))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(self.batcher.batch(items, &self.device))
    }
}

/// Yields the next `steps_per_epoch` batches of a fixed sequence each time it is iterated.
#[derive(Clone)]
pub struct StepLoader {
    batches: TrainBatches,
    steps_per_epoch: usize,
    total_steps: usize,
    /// The next optimizer step; shared by clones, so a copy moved to another device continues.
    next_step: Arc<AtomicUsize>,
    timer: StepTimer,
}

impl StepLoader {
    pub fn new(batches: TrainBatches, steps_per_epoch: usize, total_steps: usize) -> Self {
        Self {
            batches,
            steps_per_epoch,
            total_steps,
            next_step: Arc::new(AtomicUsize::new(0)),
            timer: StepTimer::default(),
        }
    }

    pub fn with_timer(self, timer: StepTimer) -> Self {
        Self { timer, ..self }
    }

    /// Moves the cursor, e.g. to continue a resumed run.
    pub fn set_next_step(&self, step: usize) {
        self.next_step.store(step, Ordering::SeqCst);
    }

    pub fn next_step(&self) -> usize {
        self.next_step.load(Ordering::SeqCst)
    }
}

struct StepIterator<'a> {
    loader: &'a StepLoader,
    end: usize,
    done: usize,
    total: usize,
}

impl Iterator for StepIterator<'_> {
    type Item = Result<LookaheadBatch, DatasetError>;

    fn next(&mut self) -> Option<Self::Item> {
        let step = self.loader.next_step();
        if step >= self.end {
            self.loader.timer.end_epoch();
            return None;
        }
        self.loader.timer.start_epoch();
        self.loader.next_step.store(step + 1, Ordering::SeqCst);
        self.done += 1;
        Some(self.loader.batches.batch(step))
    }
}

impl DataLoaderIterator<LookaheadBatch> for StepIterator<'_> {
    fn progress(&self) -> Progress {
        let batch_size = self.loader.batches.batch_size;
        Progress::new(
            self.done * batch_size,
            self.total * batch_size,
            Some("items".into()),
        )
    }
}

impl DataLoader<LookaheadBatch> for StepLoader {
    fn iter<'a>(&'a self) -> Box<dyn DataLoaderIterator<LookaheadBatch> + 'a> {
        // Epochs end on multiples of `steps_per_epoch`, also after a resume mid-epoch.
        let start = self.next_step();
        let end = ((start / self.steps_per_epoch + 1) * self.steps_per_epoch).min(self.total_steps);
        Box::new(StepIterator {
            loader: self,
            end,
            done: 0,
            total: end.saturating_sub(start),
        })
    }

    fn num_items(&self) -> usize {
        self.steps_per_epoch * self.batches.batch_size
    }

    fn to_device(&self, device: &Device) -> Arc<dyn DataLoader<LookaheadBatch>> {
        let mut moved = self.clone();
        moved.batches.device = device.clone();
        Arc::new(moved)
    }

    fn slice(&self, _start: usize, _end: usize) -> Arc<dyn DataLoader<LookaheadBatch>> {
        // Training here runs on one device; the loader is never split across workers.
        Arc::new(self.clone())
    }
}
