//! libtorch's own profiler (Kineto, what `torch.profiler` runs) around work on a tch backend:
//! every libtorch operation this thread calls and, on CUDA, every kernel the GPU runs, written
//! as a Chrome trace (Perfetto, `chrome://tracing`). The cuda backend has CubeCL's own timing
//! instead (`CUBECL_DEBUG_OPTION=profile`, docs/performance.md).

use std::marker::PhantomData;
use std::path::Path;

use burn::prelude::*;

/// Whether libtorch's profiler can record on `device`; else why not.
pub fn available(device: &Device) -> Result<(), String> {
    #[cfg(feature = "tch")]
    if crate::fused::libtorch_on_cuda(device).is_some() {
        return Ok(());
    }
    Err(format!(
        "libtorch's profiler records the tch backends (tch-cpu, tch-cuda), not {device:?}"
    ))
}

/// A running profile: [`LibtorchProfile::save`] ends it; dropped unsaved, it ends without a
/// trace. It records the thread that started it, so it stays on that thread (not `Send`).
#[derive(Debug)]
pub struct LibtorchProfile {
    running: bool,
    _this_thread: PhantomData<*const ()>,
}

impl LibtorchProfile {
    /// Starts recording what libtorch runs for this thread on `device` (and, on CUDA, the GPU).
    pub fn start(device: &Device) -> Result<Self, String> {
        available(device)?;
        #[cfg(feature = "tch")]
        crate::fused::start_profiler(crate::fused::libtorch_on_cuda(device) == Some(true))?;
        Ok(Self {
            running: true,
            _this_thread: PhantomData,
        })
    }

    /// Ends the profile and writes its Chrome trace to `trace`.
    pub fn save(mut self, trace: &Path) -> Result<(), String> {
        // A path libtorch cannot take leaves the profile running, for `Drop` to end.
        let path = trace
            .to_str()
            .and_then(|p| std::ffi::CString::new(p).ok())
            .ok_or_else(|| format!("{}: not a UTF-8 path", trace.display()))?;
        self.running = false;
        stop(Some(&path))
    }
}

impl Drop for LibtorchProfile {
    fn drop(&mut self) {
        if self.running {
            let _ = stop(None);
        }
    }
}

fn stop(trace: Option<&std::ffi::CStr>) -> Result<(), String> {
    #[cfg(feature = "tch")]
    return crate::fused::stop_profiler(trace);
    #[cfg(not(feature = "tch"))]
    {
        let _ = trace;
        unreachable!("a profile starts only on libtorch")
    }
}
