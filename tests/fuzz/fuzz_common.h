// Shared pieces of the libFuzzer targets: a private temp directory, writing inputs to files, a tiny model
// made once per process. Each target feeds untrusted bytes to one parser; a dsrt::Error is the expected
// outcome for bad input, anything else (a crash, a sanitizer report, an unexpected exception) is a finding.
#pragma once
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

#include "core/status.h"
#include "tiny_model.h"

namespace fuzz {

namespace fs = std::filesystem;

inline const fs::path &workdir() {
  static fs::path d = [] {
    fs::path p = fs::temp_directory_path() / ("dsrt-fuzz-" + std::to_string(getpid()));
    fs::create_directories(p);
    return p;
  }();
  return d;
}

inline void write_file(const fs::path &p, const uint8_t *data, size_t n) {
  std::ofstream f(p, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char *>(data), std::streamsize(n));
}

// The no-qlora tiny checkpoint (with its trained tokenizer), written once.
inline const fs::path &tiny_model() {
  static fs::path d = [] {
    fs::path p = workdir() / "tiny";
    dsrt::tools::make_tiny_model(*dsrt::tools::find_tiny_preset("no-qlora"), p.string(), 1);
    return p;
  }();
  return d;
}

}  // namespace fuzz
