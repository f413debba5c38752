#include "dist/nccl_library.h"

#include <dlfcn.h>

#include <cstdlib>
#include <mutex>
#include <type_traits>

#include "core/status.h"

namespace dsrt::nccl {

std::unique_ptr<Api> load_from(const std::vector<std::string> &candidates, std::string *why) {
  std::string tried;
  for (const std::string &name : candidates) {
    if (name.empty()) continue;
    if (!tried.empty()) tried += ", ";
    tried += name;
    void *h = dlopen(name.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!h) continue;
    auto api = std::make_unique<Api>();
    std::string missing;
    // Each entry point by its C name; a library without one of them is not a usable NCCL.
    auto bind = [&](auto &fn, const char *sym) {
      void *p = dlsym(h, sym);
      if (!p && missing.empty()) missing = sym;
      fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(p);
    };
    bind(api->GetVersion, "ncclGetVersion");
    bind(api->GetUniqueId, "ncclGetUniqueId");
    bind(api->CommInitRankConfig, "ncclCommInitRankConfig");
    bind(api->CommSplit, "ncclCommSplit");
    bind(api->AllReduce, "ncclAllReduce");
    bind(api->AllGather, "ncclAllGather");
    bind(api->Send, "ncclSend");
    bind(api->Recv, "ncclRecv");
    bind(api->GroupStart, "ncclGroupStart");
    bind(api->GroupEnd, "ncclGroupEnd");
    bind(api->CommGetAsyncError, "ncclCommGetAsyncError");
    bind(api->CommAbort, "ncclCommAbort");
    bind(api->CommDestroy, "ncclCommDestroy");
    bind(api->GetErrorString, "ncclGetErrorString");
    if (!missing.empty()) {
      if (why) *why = name + " is not a usable NCCL: it lacks " + missing;
      dlclose(h);
      return nullptr;
    }
    if (api->GetVersion(&api->version) != kSuccess || api->version < kMinVersion) {
      if (why) *why = name + " is NCCL " + version_string(api->version) + "; dsrt needs " + version_string(kMinVersion) + " or later";
      dlclose(h);
      return nullptr;
    }
    Dl_info info{};
    api->path = dladdr(reinterpret_cast<void *>(api->GetVersion), &info) && info.dli_fname ? info.dli_fname : name;
    // The library stays open for the life of the process: NCCL keeps threads and CUDA resources of its own.
    return api;
  }
  if (why) *why = "NCCL not found (tried " + (tried.empty() ? std::string("nothing") : tried) +
                  "; install NCCL 2.18+ or set DSRT_NCCL_LIBRARY to libnccl.so.2's path)";
  return nullptr;
}

const Api *load(std::string *why) {
  static std::once_flag once;
  static std::unique_ptr<Api> api;
  static std::string error;
  std::call_once(once, [] {
    const char *env = std::getenv("DSRT_NCCL_LIBRARY");  // an explicit path wins over the loader's search
    api = load_from(env && *env ? std::vector<std::string>{env} : std::vector<std::string>{"libnccl.so.2"}, &error);
  });
  if (!api && why) *why = error;
  return api.get();
}

const Api &require(const std::string &purpose) {
  std::string why;
  const Api *api = load(&why);
  if (!api) failf(DSRT_ERR_UNSUPPORTED, purpose, " needs NCCL: ", why);
  return *api;
}

std::string version_string(int code) {
  if (code <= 0) return "unknown";
  return std::to_string(code / 10000) + "." + std::to_string(code / 100 % 100) + "." + std::to_string(code % 100);
}

std::string env_summary() {
  std::string s;
  for (const char *name : {"NCCL_NET_PLUGIN", "NCCL_NET", "NCCL_IB_HCA", "NCCL_SOCKET_IFNAME", "NCCL_NVLS_ENABLE",
                           "NCCL_P2P_DISABLE", "NCCL_IB_DISABLE"}) {
    if (!s.empty()) s += ", ";
    const char *v = std::getenv(name);
    s += v ? std::string(name) + "=" + v : std::string(name) + " unset";
  }
  return s;
}

bool default_nvls_off() {
  if (std::getenv("NCCL_NVLS_ENABLE")) return false;
  return setenv("NCCL_NVLS_ENABLE", "0", 0) == 0;
}

}  // namespace dsrt::nccl
