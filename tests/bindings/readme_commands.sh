#!/bin/sh
# The commands README.md's "Bindings" section shows, run from a fresh checkout's layout: the build folder is
# BUILD (build/ in the README), the model MODEL. Each sample chats one message read from stdin and must print
# a reply; nothing sets LD_LIBRARY_PATH except where the README says so (Mono).
#   readme_commands.sh go|rust|rust-missing|csharp SOURCE_DIR BUILD_DIR MODEL_DIR
set -eu
lang=$1 src=$2 build=$3 model=$4
cd "$src"
unset LD_LIBRARY_PATH
reply() {  # the sample's stdout must hold a reply of some text
  out=$(cat)
  printf '%s\n' "$out"
  [ -n "$(printf '%s' "$out" | tr -d '[:space:]')" ] || { echo "no reply"; exit 1; }
}
case $lang in
  go)
    # README: cd samples/go && PKG_CONFIG_PATH=$PWD/../../build/pkgconfig go run . MODEL_DIR
    (cd samples/go && echo Hello | PKG_CONFIG_PATH="$build/pkgconfig" GOPROXY=off go run . "$model") | reply
    ;;
  rust)
    # README: DSRT_LIB_DIR=$PWD/build cargo build --release --manifest-path samples/rust/Cargo.toml
    #         samples/rust/target/release/dsrt-chat MODEL_DIR
    DSRT_LIB_DIR="$build" cargo build --offline --quiet --release --manifest-path samples/rust/Cargo.toml
    echo Hello | "${CARGO_TARGET_DIR:-samples/rust/target}/release/dsrt-chat" "$model" | reply
    ;;
  rust-missing)
    # Neither DSRT_LIB_DIR nor pkg-config: the build stops with a message that says what to do.
    if PKG_CONFIG_PATH=/nonexistent PKG_CONFIG_LIBDIR=/nonexistent cargo build --offline --quiet \
        --manifest-path bindings/rust/Cargo.toml 2>"$CARGO_TARGET_DIR.err"; then
      echo "cargo build succeeded without libdsrt"; exit 1
    fi
    grep "libdsrt was not found" "$CARGO_TARGET_DIR.err"
    grep "DSRT_LIB_DIR" "$CARGO_TARGET_DIR.err" >/dev/null
    ;;
  csharp)
    # README: mcs -target:library -out:build/Dsrt.dll bindings/csharp/Dsrt.cs
    #         mcs -r:build/Dsrt.dll -out:build/Chat.exe samples/csharp/Chat.cs
    #         LD_LIBRARY_PATH=build MONO_PATH=build mono build/Chat.exe MODEL_DIR
    mcs -nologo -target:library -out:"$build/Dsrt.dll" bindings/csharp/Dsrt.cs
    mcs -nologo -r:"$build/Dsrt.dll" -out:"$build/Chat.exe" samples/csharp/Chat.cs
    echo Hello | LD_LIBRARY_PATH="$build" MONO_PATH="$build" mono "$build/Chat.exe" "$model" | reply
    # Without the native library (Mono also looks beside the assembly, so the program moves away from
    # build/): one clear message, not a DllNotFoundException trace.
    nolib="$build/csharp-nolib"
    mkdir -p "$nolib"
    cp "$build/Chat.exe" "$build/Dsrt.dll" "$nolib/"
    if echo Hello | mono "$nolib/Chat.exe" "$model" >/dev/null 2>"$build/csharp-missing.err"; then
      echo "ran without libdsrt"; exit 1
    fi
    grep "libdsrt.so was not found" "$build/csharp-missing.err"
    ;;
  *) echo "unknown: $lang"; exit 2 ;;
esac
