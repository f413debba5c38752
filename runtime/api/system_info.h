// Facts about the machine for dsrt_system_info: CPU threads and, in CUDA builds, the devices.
#pragma once
#include <string>

namespace dsrt {
std::string system_info_json();
}  // namespace dsrt
