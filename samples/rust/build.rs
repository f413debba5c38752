// The dsrt crate links libdsrt.so; a link argument of a dependency does not reach this binary, so the RPATH
// (the folder holding libdsrt.so, which the dsrt crate's build script found) is set here.
fn main() {
    if let Ok(dir) = std::env::var("DEP_DSRT_LIB_DIR") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
}
