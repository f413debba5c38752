// Links libdsrt.so. DSRT_LIB_DIR names the folder holding it (the CMake build folder).
fn main() {
    println!("cargo:rerun-if-env-changed=DSRT_LIB_DIR");
    if let Ok(dir) = std::env::var("DSRT_LIB_DIR") {
        println!("cargo:rustc-link-search=native={dir}");
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
    println!("cargo:rustc-link-lib=dylib=dsrt");
}
