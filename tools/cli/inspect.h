// Checkpoint facts that inspect and bench both read.
#pragma once
#include <string>

namespace dsrt::cli {

long long layer_of(const std::string &name);  // L in "model.layers.L.xxx" (any prefix), or -1
std::string human(double bytes);              // "1.50 GiB"

}  // namespace dsrt::cli
