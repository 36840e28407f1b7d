//! Build script. With the `cuda` feature, the CUDA kernels in `kernels/*.cu` are compiled here
//! to fatbins (sm_90 machine code + compute_90 PTX) when nvcc is on the PATH (or `$NVCC`), and
//! embedded; without nvcc (or if it fails, or `SETAR_NVCC=0`) nothing is embedded and the
//! engine compiles the embedded sources with NVRTC at run time. `SETAR_REQUIRE_NVCC=1` turns
//! a missing or failing nvcc into a build error (CI uses it to check this path). Changes of
//! PATH are not tracked (they would rebuild the crate needlessly): after installing nvcc, set
//! `NVCC=/path/to/nvcc` (tracked) or `touch build.rs`.
//! The default CPU build needs nothing from here.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Architectures of the fatbins: Hopper (H100 / H200). Other GPUs use NVRTC at run time.
const GENCODE: &str = "arch=compute_90,code=[sm_90,compute_90]";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=SETAR_NVCC");
    println!("cargo:rerun-if-env-changed=SETAR_REQUIRE_NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let require = std::env::var("SETAR_REQUIRE_NVCC").is_ok_and(|v| v == "1");
    let entries = match prebuild(&out) {
        Ok(entries) => entries,
        Err(why) => {
            if require {
                panic!("SETAR_REQUIRE_NVCC=1 but the kernels were not prebuilt: {why}");
            }
            if !why.is_empty() {
                println!("cargo:warning=CUDA kernels not prebuilt ({why}); NVRTC will compile them at run time");
            }
            Vec::new()
        }
    };
    let mut code = String::from(
        "/// Fatbins of kernels/*.cu made by build.rs with nvcc: (file stem, bytes).\n\
         pub const PREBUILT: &[(&str, &[u8])] = &[\n",
    );
    for (unit, path) in &entries {
        code.push_str(&format!("    ({unit:?}, include_bytes!({path:?})),\n"));
    }
    code.push_str("];\n");
    std::fs::write(out.join("prebuilt_kernels.rs"), code).expect("write prebuilt_kernels.rs");
}

/// nvcc on each kernel file; an empty reason means "no nvcc, silently".
fn prebuild(out: &Path) -> Result<Vec<(String, PathBuf)>, String> {
    if std::env::var("SETAR_NVCC").is_ok_and(|v| v == "0") {
        return Err("SETAR_NVCC=0".into());
    }
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    match Command::new(&nvcc).arg("--version").output() {
        Ok(o) if o.status.success() => {}
        _ => return Err(String::new()),
    }
    let mut units: Vec<PathBuf> = std::fs::read_dir("kernels")
        .map_err(|e| format!("kernels/: {e}"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    units.sort();
    let mut entries = Vec::new();
    for src in units {
        let stem = src
            .file_stem()
            .and_then(|s| s.to_str())
            .ok_or("bad kernel file name")?
            .to_string();
        let dst = out.join(format!("{stem}.fatbin"));
        let o = Command::new(&nvcc)
            .args([
                "-fatbin",
                "-std=c++17",
                "-gencode",
                GENCODE,
                "-I",
                "kernels",
                "-o",
            ])
            .arg(&dst)
            .arg(&src)
            .output()
            .map_err(|e| format!("{nvcc}: {e}"))?;
        if !o.status.success() {
            return Err(format!(
                "{nvcc} failed on {}: {}",
                src.display(),
                String::from_utf8_lossy(&o.stderr).trim()
            ));
        }
        entries.push((stem, dst));
    }
    Ok(entries)
}
