//! Build script. With the `cuda` feature, CUDA kernels live in `kernels/*.cu`; they are compiled
//! to PTX here when nvcc is present, else embedded and compiled by NVRTC at run time (the CUDA
//! engine issue). The default CPU build needs nothing from here.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
}
