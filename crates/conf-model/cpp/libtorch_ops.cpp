// libtorch operations that tch does not wrap, called from `fused::torch`. A `tensor` is tch's
// `C_tensor`, which is a `torch::Tensor*` (torch-sys's torch_api.h). Every function catches
// what libtorch throws and returns its message (null when all went well), to be freed with
// `free`: an exception must not unwind into Rust.

#include <ATen/core/Tensor.h>
#include <ATen/ops/_foreach_mul.h>
#include <ATen/ops/_fused_adamw.h>
#include <ATen/ops/full.h>
#include <ATen/ops/native_layer_norm_backward.h>
#include <torch/csrc/autograd/profiler_kineto.h>

#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

extern "C" {

// PyTorch's fused AdamW (`torch.optim.AdamW(fused=True)`) on one parameter, in place: one
// kernel where the same update in separate operations launches nine. `step` is t of the bias
// corrections `1 - beta^t`, which the kernel reads from a tensor on the parameter's device;
// that tensor is kept for the next parameters of the same step (one fill per step, not per
// parameter), and never freed, so that no CUDA memory is released after CUDA has shut down.
char *lookahead_fused_adamw(at::Tensor *param, const at::Tensor *grad, at::Tensor *moment_1,
                            at::Tensor *moment_2, double learning_rate, double beta_1,
                            double beta_2, double weight_decay, double epsilon, double step) {
  try {
    thread_local at::Tensor *step_tensor = new at::Tensor();
    thread_local double step_value = 0.0;
    if (!step_tensor->defined() || step_tensor->device() != param->device() ||
        step_value != step) {
      *step_tensor = at::full({}, step, param->options().dtype(at::kFloat));
      step_value = step;
    }
    // The kernel walks the tensors' memory as dense arrays.
    for (at::Tensor *updated : {param, moment_1, moment_2}) {
      if (!updated->is_contiguous()) {
        *updated = updated->contiguous();
      }
    }
    at::_fused_adamw_({*param}, {grad->contiguous()}, {*moment_1}, {*moment_2}, {}, {*step_tensor},
                      learning_rate, beta_1, beta_2, weight_decay, epsilon,
                      /*amsgrad=*/false, /*maximize=*/false, std::nullopt, std::nullopt);
    return nullptr;
  } catch (const std::exception &e) {
    return strdup(e.what());
  }
}

// Multiplies each of `count` tensors in place by the one-element `factor` on their device:
// `torch._foreach_mul_`, a few kernels for all of them where a product each launches one per
// tensor.
char *lookahead_foreach_mul_(at::Tensor *const *tensors, std::size_t count,
                             const at::Tensor *factor) {
  try {
    std::vector<at::Tensor> list;
    list.reserve(count);
    for (std::size_t i = 0; i < count; ++i) {
      list.push_back(*tensors[i]);
    }
    at::_foreach_mul_(list, factor->reshape({}));
    return nullptr;
  } catch (const std::exception &e) {
    return strdup(e.what());
  }
}

// LayerNorm's backward over the last dimension as libtorch's own kernels run it
// (`native_layer_norm_backward`, what PyTorch's autograd calls): from the output's gradient,
// the input, and each row's mean and `1 / std` that `native_layer_norm` returned: one kernel
// for the input's gradient and one for the gain's and bias's, where the same maths in separate
// operations makes about ten passes over `[N, d]`. `weight` and `bias` may be null (no affine
// part; libtorch sizes the bias's gradient by `bias`, so it must be given when that is needed).
// Writes the gradients asked for (`need`: input, weight, bias) to `out` as new tensors, the
// others as null.
char *lookahead_layer_norm_backward(const at::Tensor *grad, const at::Tensor *input,
                                    const at::Tensor *mean, const at::Tensor *rstd,
                                    const at::Tensor *weight, const at::Tensor *bias,
                                    const bool *need, at::Tensor **out) {
  try {
    const auto optional = [](const at::Tensor *t) {
      return t != nullptr ? std::optional<at::Tensor>(*t) : std::nullopt;
    };
    auto gradients = at::native_layer_norm_backward(
        grad->contiguous(), input->contiguous(), {input->size(-1)}, *mean, *rstd,
        optional(weight), optional(bias),
        {need[0], need[1], need[2]});
    at::Tensor *computed[3] = {nullptr, nullptr, nullptr};
    const at::Tensor *parts[3] = {&std::get<0>(gradients), &std::get<1>(gradients),
                                  &std::get<2>(gradients)};
    for (int i = 0; i < 3; ++i) {
      if (need[i] && parts[i]->defined()) {
        computed[i] = new at::Tensor(*parts[i]);
      }
    }
    for (int i = 0; i < 3; ++i) {
      out[i] = computed[i];
    }
    return nullptr;
  } catch (const std::exception &e) {
    return strdup(e.what());
  }
}

// Starts libtorch's profiler as `torch.profiler.profile` does (Kineto): the operations libtorch
// runs on this thread and, with `cuda`, the kernels the GPU runs (CUPTI).
char *lookahead_profiler_start(bool cuda) {
  try {
    using torch::profiler::impl::ActivityType;
    const torch::profiler::impl::ProfilerConfig config(torch::profiler::impl::ProfilerState::KINETO);
    std::set<ActivityType> activities{ActivityType::CPU};
    if (cuda) {
      activities.insert(ActivityType::CUDA);
    }
    torch::autograd::profiler::prepareProfiler(config, activities);
    torch::autograd::profiler::enableProfiler(config, activities);
    return nullptr;
  } catch (const std::exception &e) {
    return strdup(e.what());
  }
}

// Stops the profiler and, unless `path` is null, writes what it recorded there as a Chrome
// trace (the JSON that `torch.profiler`'s `export_chrome_trace` writes).
char *lookahead_profiler_stop(const char *path) {
  try {
    std::unique_ptr<torch::autograd::profiler::ProfilerResult> result =
        torch::autograd::profiler::disableProfiler();
    if (path != nullptr && result) {
      result->save(std::string(path));
    }
    return nullptr;
  } catch (const std::exception &e) {
    return strdup(e.what());
  }
}
}
