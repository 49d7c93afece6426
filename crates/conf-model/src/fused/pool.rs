//! Where a training step's CPU work runs on flex: on a thread of rayon's pool, with the pool's
//! other threads kept polling for work until the step ends.

use burn::prelude::*;
#[cfg(feature = "flex")]
use std::sync::atomic::{AtomicBool, Ordering};

#[cfg(feature = "flex")]
use super::extension;

/// Runs `work` on a thread of rayon's pool when `device` is flex (in a build with the `flex`
/// feature), else on this one. Every parallel loop of flex and of the fused kernels started
/// from outside the pool is handed to it while the calling thread sleeps, two thread wake-ups
/// per operation; started from a pool thread, that thread takes part instead. A training step
/// runs hundreds of such loops (docs/performance.md), with serial work between them long
/// enough for the pool's other threads to fall asleep, so they keep polling for work until
/// `work` returns instead of waking for each loop.
///
/// One step at a time has pollers: a step called while another has them (from another
/// thread: tests side by side) runs on the pool without. Two sets of pollers
/// deadlock: a thread inside one step's work, waiting for a parallel loop, takes the other
/// step's polling job and spins until that step ends, which can wait on what lies beneath.
pub fn on_cpu_pool<R: Send>(device: &Device, work: impl FnOnce() -> R + Send) -> R {
    #[cfg(feature = "flex")]
    if extension::is_flex(device) && rayon::current_thread_index().is_none() {
        static POLLED: AtomicBool = AtomicBool::new(false);
        if POLLED
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return rayon::scope(|_| work());
        }
        // Cleared once the pollers have returned, also when `work` panics.
        let _polled = StoreOnDrop(&POLLED, false);
        let done = AtomicBool::new(false);
        return rayon::scope(|scope| {
            let worker = rayon::current_thread_index();
            let done = &done;
            scope.spawn_broadcast(move |_, thread| {
                if Some(thread.index()) != worker {
                    poll_until(done);
                }
            });
            // Set also when `work` panics, or the scope would wait for the pollers forever.
            let _finished = StoreOnDrop(done, true);
            work()
        });
    }
    let _ = device;
    work()
}

/// Runs the pool's pending jobs on this thread until `done` is set.
#[cfg(feature = "flex")]
fn poll_until(done: &AtomicBool) {
    while !done.load(Ordering::Acquire) {
        if rayon::yield_now() == Some(rayon::Yield::Idle) {
            std::thread::yield_now();
        }
    }
}

/// Stores its value in the flag when dropped.
#[cfg(feature = "flex")]
struct StoreOnDrop<'a>(&'a AtomicBool, bool);

#[cfg(feature = "flex")]
impl Drop for StoreOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(self.1, Ordering::Release);
    }
}

#[cfg(all(test, feature = "flex"))]
mod tests {
    use super::*;

    #[test]
    fn work_for_flex_runs_on_a_pool_thread_and_other_work_where_it_is_called() {
        let on_pool = || rayon::current_thread_index().is_some();
        assert!(!on_pool(), "the test itself runs outside the pool");
        assert!(on_cpu_pool(&Device::flex(), on_pool));
        assert!(on_cpu_pool(&Device::flex().autodiff(), on_pool));
        // Nested: already on the pool, it stays there.
        assert!(on_cpu_pool(&Device::flex(), || on_cpu_pool(
            &Device::flex(),
            on_pool
        )));
    }

    #[test]
    fn parallel_work_inside_completes_and_a_panic_comes_back_instead_of_hanging() {
        let sum: u64 = on_cpu_pool(&Device::flex(), || {
            use rayon::prelude::*;
            (0..10_000u64).into_par_iter().sum()
        });
        assert_eq!(sum, 10_000 * 9_999 / 2);
        let panicked = std::panic::catch_unwind(|| on_cpu_pool(&Device::flex(), || panic!("step")));
        assert!(panicked.is_err());
        // The pool is free again afterwards.
        assert_eq!(on_cpu_pool(&Device::flex(), || 7), 7);
    }

    /// Steps on several threads at once (as tests run side by side) with nested parallel
    /// loops inside each: every one completes, within a minute.
    #[test]
    fn steps_called_from_several_threads_at_once_all_complete() {
        use rayon::prelude::*;
        let (sender, receiver) = std::sync::mpsc::channel();
        for caller in 0..4u64 {
            let sender = sender.clone();
            std::thread::spawn(move || {
                for round in 0..300u64 {
                    let sum: u64 = on_cpu_pool(&Device::flex(), || {
                        (0..64u64)
                            .into_par_iter()
                            .map(|i| (0..i + round % 7).into_par_iter().sum::<u64>())
                            .sum()
                    });
                    let expected: u64 = (0..64u64).map(|i| (0..i + round % 7).sum::<u64>()).sum();
                    assert_eq!(sum, expected, "caller {caller}, round {round}");
                }
                sender
                    .send(caller)
                    .expect("the test waits for every caller");
            });
        }
        for _ in 0..4 {
            receiver
                .recv_timeout(std::time::Duration::from_secs(60))
                .expect("every caller's steps complete within a minute");
        }
    }
}
