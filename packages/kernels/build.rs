fn main() {
    napi_build::setup();
    // The target triple the addon was compiled for, reported by info().
    println!(
        "cargo:rustc-env=MOE8_TARGET={}",
        std::env::var("TARGET").unwrap()
    );
}
