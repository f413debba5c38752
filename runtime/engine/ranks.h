// The ranks an engine runs its forward on (design.md §5): one per device share of the Mapping, each with its
// own backend, communicator and ModelShard. Rank 0 is driven by the engine's step thread; every other rank
// runs a follower loop that receives rank 0's messages (each step as plain data, and the few backend jobs
// that must reach every rank's cache: the KV pool's set-up, page copies, cache writes) and runs the same
// forward in lockstep. The followers are either threads of this process (in-process ranks) or other
// processes (run_follower_process, behind the Gloo communicator, or the NCCL one for ranks on GPUs): the
// same loop either way.
#pragma once
#include <functional>
#include <memory>
#include <thread>
#include <utility>
#include <vector>

#include "backend/backend.h"
#include "dist/communicator.h"
#include "dist/launcher_env.h"
#include "engine/step.h"
#include "model/shard.h"

namespace dsrt {

class RankGroup {
 public:
  // Makes the communicators of in-process ranks from their backends, one per rank in rank order.
  using MakeComms = std::function<std::vector<std::unique_ptr<Communicator>>(const std::vector<Backend *> &backends)>;
  // tp * ep ranks of `model` in this process, each with a backend made by make_backend(rank), and communicators
  // made by make_comms (default: the single communicator for one rank, else make_local_group, whose
  // collectives exchange host memory). Throws DSRT_ERR_INVALID_ARGUMENT when the mapping does not divide the model.
  // dp_attention: data-parallel attention (dist/mapping.h; tp must be 1).
  RankGroup(const Model &model, int tp, int ep, const std::function<std::unique_ptr<Backend>(int rank)> &make_backend,
            const MakeComms &make_comms = {}, bool dp_attention = false);
  // Rank 0 of ranks in several processes: `comm` is rank 0's, joined to the others (join_process_group);
  // the other ranks run run_follower_process.
  RankGroup(const Model &model, std::unique_ptr<Communicator> comm, std::unique_ptr<Backend> backend,
            bool dp_attention = false);
  ~RankGroup();  // stops the followers (threads joined; processes told to leave)

  int world() const { return ranks_[0].comm->mapping().world; }
  bool remote() const { return remote_; }
  Backend &leader() { return *ranks_[0].backend; }
  // Runs fn on the backend of every rank of this process, from the calling thread, between steps (followers
  // are then waiting for rank 0's next message and do not touch their backends). Ranks in other processes
  // are not reached: what they need goes through the calls below.
  void for_each_backend(const std::function<void(Backend &)> &fn);
  // The same with each rank's shard (the weights it computes with).
  void for_each_rank(const std::function<void(Backend &, const ModelShard &)> &fn);
  // Backend jobs for every rank, here and in other processes, between steps.
  // Followers in other processes also prepare their shard's weights (the MTP layer's with `mtp`).
  // Page ids are the engine's (KvPagePool); with data-parallel attention (each rank's device pool spec.max_pages
  // pages of its own sessions) a rank does the part that falls in its pool, as its own page ids.
  void kv_init(const KvCacheSpec &spec, bool mtp = false);
  void kv_copy_pages(const std::vector<std::pair<int32_t, int32_t>> &from_to);
  void kv_write(const std::vector<int32_t> &pages, int64_t n_tokens, const float *src, size_t n_floats);
  // Backend::kv_read from the rank holding the pages: rank 0, or with data-parallel attention the rank whose
  // pool they are in; a rank in another process reads them there and broadcasts them (a KvRead message).
  void kv_read(const std::vector<int32_t> &pages, int64_t n_tokens, float *dst);
  // One forward step on every rank; rank 0's logits of step.logit_rows to logits_out (host). logits_tensor_out
  // (optional, one rank only: world() == 1): the logits left where rank 0's backend computed them, valid until
  // its next step; logits_out may then be null (forward() in deepseek_v3.h). With step.hidden every rank keeps
  // the final normed hidden states for MTP passes; hidden_out (optional) gets rank 0's.
  void forward(const Step &step, float *logits_out, Tensor *hidden_out = nullptr, Tensor *logits_tensor_out = nullptr);
  // One MTP pass on every rank (MTP drafts: StepRunner::draft, catch_up); rank 0's logits of its logit rows to
  // logits_out (host, may be null).
  void mtp_forward(const MtpPass &pass, float *logits_out);

 private:
  struct Rank {
    std::unique_ptr<Backend> backend;
    std::unique_ptr<Communicator> comm;
    ModelShard shard;
    std::thread thread;
    Tensor hidden, normed;  // the last forward's hidden states and MTP pass's output (rank 0; followers keep theirs)
  };
  void follow(Rank &r);
  void send(const std::string &message);  // to every follower; aborts the group when it fails
  std::vector<Rank> ranks_;
  bool remote_ = false;
  int64_t rank_pages_ = 0;  // data-parallel attention: pages of each rank's pool (from kv_init), else 0
  int64_t kv_floats_per_token_ = 0;  // n_layers * width (from kv_init)
};

// A follower rank in its own process (`dsrt worker`, dsrt_worker_run): joins the group of `spec` (resolved,
// world > 1, rank > 0) through the rendezvous, then runs rank 0's steps on `model` until rank 0 stops the
// group (returns) or the group fails (throws: rank 0 died or hung, a collective failed). On the CUDA backend
// the rank takes the GPU local_device_index (dist/launcher_env.h) names and joins over NCCL.
void run_follower_process(const Model &model, const DistSpec &spec, BackendKind kind, const BackendOptions &opt);

// Whether GPU ranks exchange their tensors over NCCL (true) or through host memory (dist/
// host_staged_communicator.h: NCCL not installed), saying so in a warning that names `who`. CUDA builds only.
bool nccl_or_host_staged(const std::string &who);

// A tensor-parallel rank on a GPU holds its parts of the checkpoint's tensors as device tensors of their own
// (pack_weight), which an FP8 part can be only when it starts on a 128 x 128 scale block. For kind Cuda, checks
// every rank of a tp x ep world of `model` and throws DSRT_ERR_UNSUPPORTED naming the first weight cut inside
// a block, before anything is uploaded or joined. (DeepSeek-V3 and Kimi-K2 split at tp 2-8 on block bounds.)
void check_gpu_split(BackendKind kind, const Model &model, int tp, int ep);

// The backend and communicator of rank spec.rank when every rank is a process (rank 0: the engine; the
// others: run_follower_process): on the CPU, Gloo; on the CUDA backend, the GPU local_device_index picks
// (opt.device is ignored: the launcher's local rank decides) and NCCL over Gloo. Joins the group (blocks until
// every rank has joined). DSRT_ERR_UNSUPPORTED for a GPU world in a build without CUDA.
struct ProcessRank {
  std::unique_ptr<Backend> backend;
  std::unique_ptr<Communicator> comm;
};
ProcessRank join_as_process(const Model &model, const DistSpec &spec, BackendKind kind, const BackendOptions &opt);

}  // namespace dsrt
