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

    /// The same batches, made on `device`.
    pub fn on(&self, device: &Device) -> Self {
        Self {
            device: device.clone(),
            ..self.clone()
        }
    }

    pub fn batch(&self, step: usize) -> Result<LookaheadBatch, DatasetError> {
        self.batch_part(step, (0, 1))
    }

    /// Part `index` of `parts` equal parts of step `step`'s batch.
    pub fn batch_part(
        &self,
        step: usize,
        (index, parts): (usize, usize),
    ) -> Result<LookaheadBatch, DatasetError> {
        let size = self.batch_size / parts;
        let first = step * self.batch_size + index * size;
        let items = (first..first + size)
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
    /// Data parallel: this loader yields part `part.0` of `part.1` equal parts of each step's
    /// batch (the whole batch when `(0, 1)`).
    part: (usize, usize),
}

impl StepLoader {
    pub fn new(batches: TrainBatches, steps_per_epoch: usize, total_steps: usize) -> Self {
        Self {
            batches,
            steps_per_epoch,
            total_steps,
            next_step: Arc::new(AtomicUsize::new(0)),
            timer: StepTimer::default(),
            part: (0, 1),
        }
    }

    /// A loader that burn-train's multi-device strategy splits into `parts` loaders (one per
    /// device, through [`DataLoader::slice`]), each yielding its part of every step's batch.
    pub fn split_into(self, parts: usize) -> Self {
        Self {
            part: (0, parts.max(1)),
            ..self
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
        Some(self.loader.batches.batch_part(step, self.loader.part))
    }
}

impl DataLoaderIterator<LookaheadBatch> for StepIterator<'_> {
    fn progress(&self) -> Progress {
        let batch_size = self.loader.batches.batch_size / self.loader.part.1;
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

    /// burn-train hands device `i` of `n` the items `i·N/n .. (i+1)·N/n`: that worker takes
    /// part `i` of every step, with a step cursor of its own.
    fn slice(&self, start: usize, _end: usize) -> Arc<dyn DataLoader<LookaheadBatch>> {
        let parts = self.part.1;
        let index = start * parts / self.num_items().max(1);
        Arc::new(Self {
            next_step: Arc::new(AtomicUsize::new(self.next_step())),
            part: (index.min(parts - 1), parts),
            ..self.clone()
        })
    }
}
