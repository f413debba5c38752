// Facts about the machine for dsrt_system_info: CPU threads and, in CUDA builds, the devices.
#pragma once
#include <string>

namespace dsrt {
std::string system_info_json();
// Number of usable CUDA devices (0 in builds without CUDA or without a driver); `why` explains a 0.
int cuda_device_count(std::string *why);
}  // namespace dsrt
