// Which NCCL this process uses, and how it is opened (design.md §5): NCCL is loaded at run time (dlopen of
// libnccl.so.2, or the path in DSRT_NCCL_LIBRARY), as cuBLASLt is, so libdsrt has no link-time dependency on
// it and loads and runs on one GPU (and on the CPU) where NCCL is absent; only a GPU world of several ranks
// needs it, and asking for one without it is a clear DSRT_ERR_UNSUPPORTED. The few NCCL types used are
// declared here from NCCL's stable C ABI, so this file builds without nccl.h and without the CUDA toolkit.
#pragma once
#include <cstddef>
#include <memory>
#include <string>
#include <vector>

namespace dsrt::nccl {

// ncclResult_t values that the callers tell apart; every other value is an error.
enum Result : int { kSuccess = 0, kInProgress = 7 };
// ncclDataType_t / ncclRedOp_t values used.
enum DataType : int { kInt8 = 0, kUint8 = 1, kInt32 = 2, kFloat16 = 6, kFloat32 = 7, kBfloat16 = 9 };
enum RedOp : int { kSum = 0 };

struct UniqueId {
  char internal[128];
};
struct CommHandle;  // ncclComm
using Comm = CommHandle *;
using Stream = void *;  // cudaStream_t

// The head of ncclConfig_t (NCCL 2.17's fields; 2.14's, the first config, ended at `blocking`), stamped version
// 2.14.0. NCCL (init.cc, parseCommConfig) copies min(size, its own sizeof) bytes from here into a config of its
// own that starts with its defaults, and gives every field newer than the stamped version its default, so only
// `blocking` is read from this struct and no field past it (netName, commName, ...) is ever taken from the
// caller: a valid config for every NCCL from 2.14 on (checked against 2.28.9 and 2.30).
struct Config {
  size_t size = sizeof(Config);
  unsigned int magic = 0xcafebeef;
  unsigned int version = 21400;  // NCCL_VERSION(2, 14, 0)
  int blocking = kUndefInt;
  int cga_cluster_size = kUndefInt;
  int min_ctas = kUndefInt;
  int max_ctas = kUndefInt;
  const char *net_name = nullptr;
  static constexpr int kUndefInt = -2147483647 - 1;  // NCCL_CONFIG_UNDEF_INT
};

// NCCL's entry points, resolved from one opened library.
struct Api {
  Result (*GetVersion)(int *version) = nullptr;
  Result (*GetUniqueId)(UniqueId *id) = nullptr;
  Result (*CommInitRankConfig)(Comm *comm, int nranks, UniqueId id, int rank, Config *config) = nullptr;
  Result (*CommSplit)(Comm comm, int color, int key, Comm *newcomm, Config *config) = nullptr;
  Result (*AllReduce)(const void *send, void *recv, size_t count, int dtype, int op, Comm comm, Stream s) = nullptr;
  Result (*AllGather)(const void *send, void *recv, size_t send_count, int dtype, Comm comm, Stream s) = nullptr;
  Result (*Send)(const void *send, size_t count, int dtype, int peer, Comm comm, Stream s) = nullptr;
  Result (*Recv)(void *recv, size_t count, int dtype, int peer, Comm comm, Stream s) = nullptr;
  Result (*GroupStart)() = nullptr;
  Result (*GroupEnd)() = nullptr;
  Result (*CommGetAsyncError)(Comm comm, Result *async_error) = nullptr;
  Result (*CommAbort)(Comm comm) = nullptr;
  Result (*CommDestroy)(Comm comm) = nullptr;
  const char *(*GetErrorString)(Result r) = nullptr;

  int version = 0;   // ncclGetVersion's code: 22809 for 2.28.9
  std::string path;  // the file the loader found (dladdr)
};

// NCCL 2.18 or later: non-blocking communicators with ncclCommGetAsyncError and ncclCommAbort as this code
// uses them, and ncclCommSplit.
constexpr int kMinVersion = 21800;

// Opens the first of `candidates` that loads and resolves every entry point; null with *why saying what
// was tried and what failed (none found, a missing entry point, too old). Not cached: load() is.
std::unique_ptr<Api> load_from(const std::vector<std::string> &candidates, std::string *why);
// The process's NCCL: DSRT_NCCL_LIBRARY when set, else libnccl.so.2 from the loader's search path. Opened
// once per process; null with *why when it cannot be used.
const Api *load(std::string *why);
// load(), or DSRT_ERR_UNSUPPORTED saying that `purpose` needs NCCL and why it cannot be used.
const Api &require(const std::string &purpose);

// 22809 -> "2.28.9" (NCCL >= 2.9 encodes major * 10000 + minor * 100 + patch).
std::string version_string(int code);
// The environment variables that choose NCCL's transport and network (NCCL_NET_PLUGIN, NCCL_NET,
// NCCL_IB_HCA, NCCL_SOCKET_IFNAME, NCCL_NVLS_ENABLE, NCCL_P2P_DISABLE, NCCL_IB_DISABLE), as
// "NAME=value" or "NAME unset", for the log line at communicator start.
std::string env_summary();
// NVLink multicast (NVLS) stays off unless the user asked for it: sets NCCL_NVLS_ENABLE=0 when the variable
// is unset (NCCL reads it at its first communicator). Returns true when it set it.
bool default_nvls_off();

}  // namespace dsrt::nccl
