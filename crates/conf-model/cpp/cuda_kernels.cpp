// Our own CUDA kernels on libtorch's CUDA devices, built without a CUDA toolkit: NVRTC (the
// one PyTorch itself loads) compiles their source at run time for the device, and the driver
// (libcuda) loads and launches them. Both are opened with dlopen and their C interfaces, stable
// across CUDA releases, are declared here. Every function returns null, or the error's message
// (`malloc`ed, to be freed with `free`), and writes its results through its pointers.

#include <dlfcn.h>

#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>

namespace {

using Result = int;  // nvrtcResult and CUresult: 0 is success
using Program = struct NvrtcProgram *;
using Device = int;
using Context = struct CUctx_st *;
using Module = struct CUmod_st *;
using Function = struct CUfunc_st *;
using Stream = struct CUstream_st *;

// The driver's attribute numbers (CUdevice_attribute).
constexpr int kMultiprocessorCount = 16;
constexpr int kComputeCapabilityMajor = 75;
constexpr int kComputeCapabilityMinor = 76;

char *error(const std::string &message) { return strdup(message.c_str()); }

// `name` from `library` (and the libraries it loaded) into `f`; false if missing.
template <typename F>
bool find(void *library, const char *name, F *&f) {
  f = reinterpret_cast<F *>(dlsym(library, name));
  return f != nullptr;
}

struct Nvrtc {
  Result (*create)(Program *, const char *, const char *, int, const char *const *,
                   const char *const *);
  Result (*compile)(Program, int, const char *const *);
  Result (*log_size)(Program, std::size_t *);
  Result (*log)(Program, char *);
  Result (*cubin_size)(Program, std::size_t *);
  Result (*cubin)(Program, char *);
  Result (*destroy)(Program *);
  const char *(*describe)(Result);

  // From `library` or what it loaded; the name of a missing function, or null.
  const char *bind(void *library) {
    if (!find(library, "nvrtcCreateProgram", create)) return "nvrtcCreateProgram";
    if (!find(library, "nvrtcCompileProgram", compile)) return "nvrtcCompileProgram";
    if (!find(library, "nvrtcGetProgramLogSize", log_size)) return "nvrtcGetProgramLogSize";
    if (!find(library, "nvrtcGetProgramLog", log)) return "nvrtcGetProgramLog";
    if (!find(library, "nvrtcGetCUBINSize", cubin_size)) return "nvrtcGetCUBINSize";
    if (!find(library, "nvrtcGetCUBIN", cubin)) return "nvrtcGetCUBIN";
    if (!find(library, "nvrtcDestroyProgram", destroy)) return "nvrtcDestroyProgram";
    if (!find(library, "nvrtcGetErrorString", describe)) return "nvrtcGetErrorString";
    return nullptr;
  }
};

struct Driver {
  Result (*init)(unsigned);
  Result (*device_get)(Device *, int);
  Result (*attribute)(int *, int, Device);
  Result (*primary_context)(Context *, Device);
  Result (*set_current)(Context);
  Result (*load)(Module *, const void *);
  Result (*function)(Function *, Module, const char *);
  Result (*launch)(Function, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                   Stream, void **, void **);
  Result (*describe)(Result, const char **);

  const char *bind(void *library) {
    if (!find(library, "cuInit", init)) return "cuInit";
    if (!find(library, "cuDeviceGet", device_get)) return "cuDeviceGet";
    if (!find(library, "cuDeviceGetAttribute", attribute)) return "cuDeviceGetAttribute";
    if (!find(library, "cuDevicePrimaryCtxRetain", primary_context))
      return "cuDevicePrimaryCtxRetain";
    if (!find(library, "cuCtxSetCurrent", set_current)) return "cuCtxSetCurrent";
    if (!find(library, "cuModuleLoadData", load)) return "cuModuleLoadData";
    if (!find(library, "cuModuleGetFunction", function)) return "cuModuleGetFunction";
    if (!find(library, "cuLaunchKernel", launch)) return "cuLaunchKernel";
    if (!find(library, "cuGetErrorString", describe)) return "cuGetErrorString";
    return nullptr;
  }

  std::string message(Result result, const char *call) const {
    const char *text = nullptr;
    describe(result, &text);
    return std::string(call) + ": " + (text != nullptr ? text : "CUDA error " + std::to_string(result));
  }
};

// The folder of the library that defines `symbol` (with a trailing '/'), or "".
std::string folder_of(const char *symbol) {
  Dl_info info{};
  void *address = dlsym(RTLD_DEFAULT, symbol);
  if (address == nullptr || dladdr(address, &info) == 0 || info.dli_fname == nullptr) return "";
  std::string path(info.dli_fname);
  const std::size_t slash = path.rfind('/');
  return slash == std::string::npos ? "" : path.substr(0, slash + 1);
}

// NVRTC from `path`, or else the one PyTorch loads: its `libcaffe2_nvrtc.so` (beside libc10_cuda,
// whose `c10::cuda::getCurrentCUDAStream` finds it) links the NVRTC of PyTorch's CUDA. False,
// with `failure` saying why, if that fails.
bool open_nvrtc(const char *path, Nvrtc &nvrtc, std::string &failure) {
  std::string library = path != nullptr ? path : "";
  if (library.empty()) {
    library = folder_of("_ZN3c104cuda20getCurrentCUDAStreamEa") + "libcaffe2_nvrtc.so";
  }
  void *handle = dlopen(library.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (handle == nullptr) {
    const char *why = dlerror();
    failure = "NVRTC: cannot open " + library + ": " + (why != nullptr ? why : "?");
    return false;
  }
  if (const char *missing = nvrtc.bind(handle)) {
    failure = "NVRTC: " + library + " has no " + missing;
    return false;
  }
  return true;
}

// The driver, opened and initialised once; the error, or null.
const char *open_driver(const Driver *&out) {
  static Driver driver;
  static std::string failure;
  static std::once_flag once;
  std::call_once(once, [] {
    void *handle = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (handle == nullptr) {
      const char *why = dlerror();
      failure = std::string("the CUDA driver: cannot open libcuda.so.1: ") + (why ? why : "?");
      return;
    }
    if (const char *missing = driver.bind(handle)) {
      failure = std::string("the CUDA driver has no ") + missing;
      return;
    }
    if (const Result r = driver.init(0)) failure = driver.message(r, "cuInit");
  });
  out = &driver;
  return failure.empty() ? nullptr : failure.c_str();
}

// Makes the device's primary context, the one PyTorch's CUDA runtime uses, current on this
// thread (retained once per device, for the life of the process).
Result enter(const Driver &driver, int ordinal, std::string &failure) {
  static std::mutex lock;
  static std::map<int, Context> contexts;
  Context context = nullptr;
  {
    std::lock_guard<std::mutex> guard(lock);
    auto found = contexts.find(ordinal);
    if (found == contexts.end()) {
      Device device = 0;
      Result r = driver.device_get(&device, ordinal);
      if (r == 0) {
        r = driver.primary_context(&context, device);
      }
      if (r != 0) {
        failure = driver.message(r, "the device's primary context");
        return r;
      }
      found = contexts.emplace(ordinal, context).first;
    }
    context = found->second;
  }
  const Result r = driver.set_current(context);
  if (r != 0) failure = driver.message(r, "cuCtxSetCurrent");
  return r;
}

}  // namespace

extern "C" {

// Compiles `source` with NVRTC (the library at `nvrtc_path`, or null for PyTorch's) into a cubin
// for compute capability `major.minor`: `*image` (`malloc`ed) of `*size` bytes. Needs no GPU.
char *lookahead_nvrtc_compile(const char *nvrtc_path, const char *source, int major, int minor,
                              char **image, std::size_t *size) {
  Nvrtc nvrtc{};
  std::string failure;
  if (!open_nvrtc(nvrtc_path, nvrtc, failure)) return error(failure);
  Program program = nullptr;
  Result r = nvrtc.create(&program, source, "lookahead_kernels.cu", 0, nullptr, nullptr);
  if (r != 0) return error(std::string("nvrtcCreateProgram: ") + nvrtc.describe(r));
  const std::string arch = "--gpu-architecture=sm_" + std::to_string(major) + std::to_string(minor);
  const char *options[] = {arch.c_str(), "--std=c++17"};
  r = nvrtc.compile(program, 2, options);
  if (r != 0) {
    std::size_t length = 0;
    nvrtc.log_size(program, &length);
    std::string log(length, '\0');
    nvrtc.log(program, log.data());
    nvrtc.destroy(&program);
    return error(std::string("NVRTC refused the kernels (") + arch + "): " + nvrtc.describe(r) +
                 "\n" + log);
  }
  r = nvrtc.cubin_size(program, size);
  if (r == 0) {
    *image = static_cast<char *>(std::malloc(*size));
    r = nvrtc.cubin(program, *image);
  }
  nvrtc.destroy(&program);
  if (r != 0) return error(std::string("nvrtcGetCUBIN: ") + nvrtc.describe(r));
  return nullptr;
}

// The compute capability and the number of multiprocessors of CUDA device `ordinal`.
char *lookahead_cuda_device(int ordinal, int *major, int *minor, int *processors) {
  const Driver *driver = nullptr;
  if (const char *failure = open_driver(driver)) return error(failure);
  Device device = 0;
  Result r = driver->device_get(&device, ordinal);
  if (r != 0) return error(driver->message(r, "cuDeviceGet"));
  const int attributes[] = {kComputeCapabilityMajor, kComputeCapabilityMinor,
                            kMultiprocessorCount};
  int *values[] = {major, minor, processors};
  for (int i = 0; i < 3; ++i) {
    r = driver->attribute(values[i], attributes[i], device);
    if (r != 0) return error(driver->message(r, "cuDeviceGetAttribute"));
  }
  return nullptr;
}

// Loads the cubin `image` on device `ordinal` and finds its `count` kernels `names`.
char *lookahead_cuda_load(int ordinal, const char *image, const char *const *names, int count,
                          void **functions) {
  const Driver *driver = nullptr;
  if (const char *failure = open_driver(driver)) return error(failure);
  std::string failure;
  if (enter(*driver, ordinal, failure) != 0) return error(failure);
  Module module = nullptr;
  Result r = driver->load(&module, image);
  if (r != 0) return error(driver->message(r, "cuModuleLoadData"));
  for (int i = 0; i < count; ++i) {
    Function function = nullptr;
    r = driver->function(&function, module, names[i]);
    if (r != 0) return error(driver->message(r, names[i]));
    functions[i] = function;
  }
  return nullptr;
}

// Launches `function` on device `ordinal` over `grid` blocks of `threads` threads with the
// arguments `args` (pointers to each), on the default stream: the one libtorch's operations run
// on here (nothing in this program sets another), so it runs after what they queued before and
// before what they queue after.
char *lookahead_cuda_launch(int ordinal, void *function, unsigned grid, unsigned threads,
                            void **args) {
  const Driver *driver = nullptr;
  if (const char *failure = open_driver(driver)) return error(failure);
  std::string failure;
  if (enter(*driver, ordinal, failure) != 0) return error(failure);
  const Result r = driver->launch(static_cast<Function>(function), grid, 1, 1, threads, 1, 1, 0,
                                  nullptr, args, nullptr);
  if (r != 0) return error(driver->message(r, "cuLaunchKernel"));
  return nullptr;
}
}
