// Links libdsrt.so, found (in this order) in DSRT_LIB_DIR (e.g. the CMake build folder) or through
// pkg-config (dsrt.pc: installed by `cmake --install`, or the build tree's <build>/pkgconfig on
// PKG_CONFIG_PATH). The folder is recorded as an RPATH of this crate's tests and passed on to dependents as
// DEP_DSRT_LIB_DIR (see samples/rust/build.rs): binaries then run without LD_LIBRARY_PATH.
use std::process::Command;

fn pkg_config_libdir() -> Option<String> {
    let out = Command::new("pkg-config").args(["--variable=libdir", "dsrt"]).output().ok()?;
    let dir = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && !dir.is_empty()).then_some(dir)
}

fn main() {
    println!("cargo:rerun-if-env-changed=DSRT_LIB_DIR");
    println!("cargo:rerun-if-env-changed=PKG_CONFIG_PATH");
    let dir = match std::env::var("DSRT_LIB_DIR") {
        Ok(d) if !d.is_empty() => d,
        _ => pkg_config_libdir().unwrap_or_else(|| {
            eprintln!(
                "error: libdsrt was not found. Either install dsrt (cmake --install build), which puts dsrt.pc \
                 where pkg-config looks (or add <prefix>/lib/pkgconfig to PKG_CONFIG_PATH), or set DSRT_LIB_DIR \
                 to the folder that holds libdsrt.so (the CMake build folder, e.g. DSRT_LIB_DIR=$PWD/build)."
            );
            std::process::exit(1);
        }),
    };
    if !std::path::Path::new(&dir).join("libdsrt.so").exists() {
        eprintln!("error: {dir}/libdsrt.so does not exist (build it: cmake --build build --target dsrt)");
        std::process::exit(1);
    }
    println!("cargo:rustc-link-search=native={dir}");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    println!("cargo:rustc-link-lib=dylib=dsrt");
    println!("cargo:lib_dir={dir}");
}
