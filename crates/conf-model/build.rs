//! With the `tch` feature, compiles `cpp/libtorch_ops.cpp` (libtorch operations tch does not
//! wrap) against the headers of the libtorch torch-sys links, which its build script reports
//! as `DEP_TCH_LIBTORCH_LIB` (the `lib` folder; the headers are beside it in `include`); and
//! `cpp/cuda_kernels.cpp` (NVRTC and the CUDA driver, opened at run time) and
//! `cpp/cuda_emulation.cpp` (the CUDA kernels on the host, for the tests), which need no
//! header beyond the C++ library's.

use std::env;
use std::path::PathBuf;

fn main() {
    for file in [
        "libtorch_ops.cpp",
        "cuda_kernels.cpp",
        "cuda_emulation.cpp",
        "adaptive_norm.cuh",
    ] {
        println!("cargo:rerun-if-changed=cpp/{file}");
    }
    if env::var_os("CARGO_FEATURE_TCH").is_none() {
        return;
    }
    let lib = env::var_os("DEP_TCH_LIBTORCH_LIB")
        .map(PathBuf::from)
        .expect("torch-sys reports where libtorch is (DEP_TCH_LIBTORCH_LIB)");
    let include = lib
        .parent()
        .expect("libtorch's lib folder has a parent")
        .join("include");
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .std("c++17")
        // libtorch's headers do not compile cleanly under -Wall -Wextra.
        .warnings(false)
        .include(&include)
        .file("cpp/libtorch_ops.cpp")
        .file("cpp/cuda_kernels.cpp")
        .file("cpp/cuda_emulation.cpp")
        .compile("lookahead_libtorch_ops");
}
