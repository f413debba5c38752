#include "engine/ranks.h"

#include <cstring>

#include "core/log.h"
#include "core/status.h"
#include "dist/host_staged_communicator.h"
#include "dist/process_group.h"
#if DSRT_WITH_CUDA
#include "dist/nccl_communicator.h"
#include "dist/nccl_library.h"
#endif

namespace dsrt {
namespace {

// Rank 0's messages to its followers: a tag, then the payload.
enum class Msg : uint32_t {
  Forward = 1,   // Step::encode
  Stop = 2,      // leave the loop
  KvInit = 3,    // n_layers, width, max_pages, dtype: prepare weights, then the KV pool (followers in
                 // other processes only; in-process followers' backends are set up by rank 0 directly)
  CopyPages = 4, // (from, to) pairs
  KvWrite = 5,   // n_tokens, n_pages, pages, floats
  Mtp = 6,       // MtpPass::encode
  KvRead = 7,    // n_tokens, n_pages, pages: their rank (data-parallel attention) broadcasts the floats
};

void put(std::string &o, const void *p, size_t n) { o.append(static_cast<const char *>(p), n); }
template <class T>
void put(std::string &o, T v) {
  put(o, &v, sizeof v);
}
std::string message(Msg m) {
  std::string o;
  put(o, uint32_t(m));
  return o;
}

struct Reader {
  std::string_view b;
  size_t at = 0;
  void take(void *p, size_t n) {
    if (b.size() - at < n) fail(DSRT_ERR_FORMAT, "rank 0's message is truncated");
    std::memcpy(p, b.data() + at, n);
    at += n;
  }
  template <class T>
  T get() {
    T v;
    take(&v, sizeof v);
    return v;
  }
  void done() const {
    if (at != b.size()) fail(DSRT_ERR_FORMAT, "rank 0's message has trailing bytes");
  }
};

// One MTP pass on one rank: the input rebuilt from the pass's segments (host rows, rows of the last forward's
// hidden states, rows of the previous pass's output), the module run, its head-normed output kept in `normed`
// for a pass that chains on it.
void run_mtp_pass(const ModelShard &shard, Backend &be, Communicator &comm, const MtpPass &p, Tensor &step_hidden,
                  Tensor &normed, float *logits_out) {
  const int64_t H = shard.cfg().hidden_size;
  if (p.begin_step) {  // (the last forward's hidden states and pass's output die with the scratch step)
    be.begin_step();
    step_hidden = normed = Tensor{};
  }
  Tensor in = be.alloc(p.step.batch.n_tokens(), H);
  int64_t row = 0;
  for (const MtpPass::Segment &g : p.segments) {
    if (g.from == MtpPass::From::Host) {
      const int64_t n = int64_t(g.host.size()) / H;
      be.from_host(in.rows_view(row, n), g.host.data());
      row += n;
      continue;
    }
    const Tensor &src = g.from == MtpPass::From::StepHidden ? step_hidden : normed;
    for (int32_t r : g.rows)
      if (r >= src.rows) failf(DSRT_ERR_FORMAT, "MTP pass: source row ", r, " of ", src.rows);
    be.gather_rows(src, g.rows, in.rows_view(row, int64_t(g.rows.size())));
    row += int64_t(g.rows.size());
  }
  Tensor out;
  mtp_forward(shard, be, comm, p.step.batch, in, p.step.logit_rows, p.step.policy, logits_out, &out);
  normed = out;  // (none when the pass has no logit rows: nothing chains on a catch-up pass)
}

// Rank 0's page `page` in the pool of rank `rank`: itself, or with data-parallel attention (rank_pages > 0) its
// number in that rank's pool when it lies there, else -1 (another rank's).
int32_t page_on_rank(int32_t page, int rank, int64_t rank_pages) {
  if (rank_pages <= 0) return page;
  return rank_of_page(page, rank_pages) == rank ? int32_t(page % rank_pages) : -1;
}

// A sequence's pages on rank `rank` (all of them or none: they lie in one rank's pool).
bool pages_on_rank(const std::vector<int32_t> &pages, int rank, int64_t rank_pages, std::vector<int32_t> &out) {
  out.clear();
  for (int32_t p : pages) {
    const int32_t q = page_on_rank(p, rank, rank_pages);
    if (q < 0) return false;
    out.push_back(q);
  }
  return true;
}

// The page copies and cache writes rank 0 asks of every rank, done on one rank: the part in its pool.
void copy_pages_on_rank(Backend &be, int rank, int64_t rank_pages, const std::vector<std::pair<int32_t, int32_t>> &from_to) {
  for (auto [from, to] : from_to) {
    const int32_t a = page_on_rank(from, rank, rank_pages), b = page_on_rank(to, rank, rank_pages);
    if (a >= 0 && b >= 0) be.kv_copy_page(a, b);
  }
}
void write_pages_on_rank(Backend &be, int rank, int64_t rank_pages, const std::vector<int32_t> &pages, int64_t n_tokens,
                         const float *src) {
  std::vector<int32_t> mine;
  if (pages_on_rank(pages, rank, rank_pages, mine)) be.kv_write(mine.data(), n_tokens, src);
}

// A rank's shard: its communicator's mapping with the attention split (which the transports do not need).
ModelShard bind_shard(const Model &model, Mapping m, bool dp_attention) {
  m.dp_attention = dp_attention;
  return ModelShard::bind(model, m);
}

// Runs rank 0's messages until Stop, or throws.
void follow_messages(const ModelShard &shard, Backend &be, Communicator &comm) {
  Tensor hidden, normed;  // the last forward's hidden states and MTP pass's output (MTP drafts)
  const int rank = shard.map.rank;
  int64_t rank_pages = 0;  // data-parallel attention: this rank's pool, from KvInit
  int64_t floats_per_token = 0;  // the cache's n_layers * width, from KvInit
  for (;;) {
    std::string bytes;
    comm.broadcast(bytes, 0);
    Reader in{bytes};
    const auto kind = Msg(in.get<uint32_t>());
    switch (kind) {
      case Msg::Stop:
        return;
      case Msg::Forward: {
        const Step step = Step::decode(std::string_view(bytes).substr(4));
        hidden = normed = Tensor{};  // (a new scratch step)
        dsrt::forward(shard, be, comm, step.batch, step.logit_rows, step.policy, nullptr, step.hidden ? &hidden : nullptr);
        comm.check();
        break;
      }
      case Msg::Mtp: {
        const MtpPass pass = MtpPass::decode(std::string_view(bytes).substr(4), shard.cfg().hidden_size);
        run_mtp_pass(shard, be, comm, pass, hidden, normed, nullptr);
        comm.check();
        break;
      }
      case Msg::KvInit: {
        KvCacheSpec spec;
        spec.n_layers = in.get<int64_t>();
        spec.width = in.get<int64_t>();
        spec.max_pages = in.get<int64_t>();
        spec.dtype = DType(in.get<int32_t>());
        const bool mtp = in.get<int32_t>() != 0;
        in.done();
        if (mtp && shard.mtp.empty())
          failf(DSRT_ERR_INVALID_ARGUMENT, "rank ", comm.mapping().rank, ": rank 0 runs MTP drafts, but this rank loaded "
                "the model without its MTP layer (load it with the MTP layer, or turn drafts off on rank 0)");
        // Its shard only (the MTP layer's part when drafts are on).
        be.prepare_weights(shard.model->device_weights, shard.weights(mtp), {});
        be.kv_init(spec);
        rank_pages = shard.map.attention_data_parallel() ? spec.max_pages : 0;
        floats_per_token = spec.n_layers * spec.width;
        break;
      }
      case Msg::CopyPages: {
        const auto n = in.get<uint64_t>();
        if (n > bytes.size() / 8) fail(DSRT_ERR_FORMAT, "rank 0's page copy message is malformed");
        std::vector<std::pair<int32_t, int32_t>> from_to(n);
        for (auto &[from, to] : from_to) {
          from = in.get<int32_t>();
          to = in.get<int32_t>();
        }
        in.done();
        copy_pages_on_rank(be, rank, rank_pages, from_to);
        break;
      }
      case Msg::KvWrite: {
        const auto n_tok = in.get<int64_t>();
        const auto n_pages = in.get<uint64_t>();
        if (n_pages > bytes.size() / 4 || n_tok < 0) fail(DSRT_ERR_FORMAT, "rank 0's cache write message is malformed");
        std::vector<int32_t> pages(n_pages);
        in.take(pages.data(), n_pages * 4);
        const size_t floats = (bytes.size() - in.at) / 4;
        std::vector<float> data(floats);
        in.take(data.data(), floats * 4);
        in.done();
        write_pages_on_rank(be, rank, rank_pages, pages, n_tok, data.data());
        break;
      }
      case Msg::KvRead: {
        const auto n_tok = in.get<int64_t>();
        const auto n_pages = in.get<uint64_t>();
        if (n_pages == 0 || n_pages > bytes.size() / 4 || n_tok < 0 || n_tok > int64_t(n_pages) * kPageTokens ||
            rank_pages <= 0)
          fail(DSRT_ERR_FORMAT, "rank 0's cache read message is malformed");
        std::vector<int32_t> pages(n_pages), mine;
        in.take(pages.data(), n_pages * 4);
        in.done();
        std::string out;  // (filled by the pages' rank, which every rank finds alike)
        if (pages_on_rank(pages, rank, rank_pages, mine)) {
          out.resize(size_t(n_tok * floats_per_token) * sizeof(float));
          be.kv_read(mine.data(), n_tok, reinterpret_cast<float *>(out.data()));
        }
        comm.broadcast(out, rank_of_page(pages[0], rank_pages));
        break;
      }
      default:
        failf(DSRT_ERR_FORMAT, "unknown message ", uint32_t(kind), " from rank 0");
    }
  }
}

}  // namespace

RankGroup::RankGroup(const Model &model, int tp, int ep,
                     const std::function<std::unique_ptr<Backend>(int rank)> &make_backend, const MakeComms &make_comms,
                     bool dp_attention) {
  Mapping shape{tp * ep, 0, tp, ep, dp_attention};
  shape.check_divides(model.cfg);
  ranks_.resize(size_t(shape.world));
  std::vector<Backend *> backends;
  for (int r = 0; r < shape.world; r++) {  // backends first: a device communicator queues on their streams
    ranks_[size_t(r)].backend = make_backend(r);
    backends.push_back(ranks_[size_t(r)].backend.get());
  }
  std::vector<std::unique_ptr<Communicator>> comms;
  if (make_comms) comms = make_comms(backends);
  else if (shape.world == 1) comms.push_back(make_single_communicator());
  else comms = make_local_group(tp, ep);
  if (comms.size() != ranks_.size()) fail(DSRT_ERR_INTERNAL, "a rank group needs one communicator per rank");
  for (int r = 0; r < shape.world; r++) {
    Rank &k = ranks_[size_t(r)];
    k.comm = std::move(comms[size_t(r)]);
    k.shard = bind_shard(model, k.comm->mapping(), dp_attention);
  }
  for (int r = 1; r < shape.world; r++) {
    Rank &k = ranks_[size_t(r)];
    k.thread = std::thread([this, &k] { follow(k); });
  }
  if (shape.world > 1) log(LogLevel::Info, "dsrt: " + std::to_string(shape.world) + " in-process ranks (tp " +
                                               std::to_string(tp) + " x ep " + std::to_string(ep) +
                                               (dp_attention ? ", data-parallel attention)" : ")"));
}

RankGroup::RankGroup(const Model &model, std::unique_ptr<Communicator> comm, std::unique_ptr<Backend> backend,
                     bool dp_attention)
    : remote_(true) {
  if (comm->mapping().rank != 0) fail(DSRT_ERR_INTERNAL, "a rank group is led by rank 0");
  ranks_.resize(1);
  Rank &k = ranks_[0];
  k.shard = bind_shard(model, comm->mapping(), dp_attention);
  k.comm = std::move(comm);
  k.backend = std::move(backend);
}

RankGroup::~RankGroup() {
  if (world() > 1) {
    try {
      std::string bytes = message(Msg::Stop);
      ranks_[0].comm->broadcast(bytes, 0);
    } catch (const std::exception &) {  // the group already failed: its followers have left
    }
  }
  for (Rank &r : ranks_)
    if (r.thread.joinable()) r.thread.join();
}

void RankGroup::follow(Rank &r) {
  try {
    follow_messages(r.shard, *r.backend, *r.comm);
  } catch (const std::exception &e) {
    r.comm->abort("rank " + std::to_string(r.comm->mapping().rank) + ": " + e.what());
  }
}

void RankGroup::send(const std::string &m) {
  std::string bytes = m;
  try {
    ranks_[0].comm->broadcast(bytes, 0);
  } catch (const std::exception &e) {
    ranks_[0].comm->abort(std::string("rank 0: ") + e.what());
    throw;
  }
}

void RankGroup::for_each_backend(const std::function<void(Backend &)> &fn) {
  for (Rank &r : ranks_) fn(*r.backend);
}

void RankGroup::for_each_rank(const std::function<void(Backend &, const ModelShard &)> &fn) {
  for (Rank &r : ranks_) fn(*r.backend, r.shard);
}

void RankGroup::kv_init(const KvCacheSpec &spec, bool mtp) {
  for_each_backend([&](Backend &be) { be.kv_init(spec); });
  rank_pages_ = ranks_[0].shard.map.attention_data_parallel() ? spec.max_pages : 0;
  kv_floats_per_token_ = spec.n_layers * spec.width;
  if (!remote_) return;
  std::string m = message(Msg::KvInit);
  put(m, spec.n_layers);
  put(m, spec.width);
  put(m, spec.max_pages);
  put(m, int32_t(spec.dtype));
  put(m, int32_t(mtp ? 1 : 0));
  send(m);
}

void RankGroup::kv_copy_pages(const std::vector<std::pair<int32_t, int32_t>> &from_to) {
  for (Rank &r : ranks_) copy_pages_on_rank(*r.backend, r.shard.map.rank, rank_pages_, from_to);
  if (!remote_) return;
  std::string m = message(Msg::CopyPages);
  put(m, uint64_t(from_to.size()));
  for (auto [from, to] : from_to) {
    put(m, from);
    put(m, to);
  }
  send(m);
}

void RankGroup::kv_write(const std::vector<int32_t> &pages, int64_t n_tokens, const float *src, size_t n_floats) {
  for (Rank &r : ranks_) write_pages_on_rank(*r.backend, r.shard.map.rank, rank_pages_, pages, n_tokens, src);
  if (!remote_) return;
  std::string m = message(Msg::KvWrite);
  put(m, n_tokens);
  put(m, uint64_t(pages.size()));
  put(m, pages.data(), pages.size() * 4);
  put(m, src, n_floats * sizeof(float));
  send(m);
}

void RankGroup::kv_read(const std::vector<int32_t> &pages, int64_t n_tokens, float *dst) {
  std::vector<int32_t> mine;
  for (Rank &r : ranks_)
    if (pages_on_rank(pages, r.shard.map.rank, rank_pages_, mine)) {
      r.backend->kv_read(mine.data(), n_tokens, dst);
      return;
    }
  if (!remote_ || rank_pages_ <= 0 || pages.empty())
    fail(DSRT_ERR_INTERNAL, "kv_read: the pages are on no rank of the group");
  // Another process's pool: that rank reads the pages and broadcasts them.
  std::string m = message(Msg::KvRead);
  put(m, n_tokens);
  put(m, uint64_t(pages.size()));
  put(m, pages.data(), pages.size() * 4);
  send(m);
  std::string got;
  const int owner = rank_of_page(pages[0], rank_pages_);
  try {
    ranks_[0].comm->broadcast(got, owner);
  } catch (const std::exception &e) {
    ranks_[0].comm->abort(std::string("rank 0: ") + e.what());
    throw;
  }
  if (got.size() != size_t(n_tokens * kv_floats_per_token_) * sizeof(float))
    failf(DSRT_ERR_IO, "rank ", owner, " sent ", got.size(), " bytes of cache for ", n_tokens, " tokens");
  std::memcpy(dst, got.data(), got.size());
}

void RankGroup::forward(const Step &step, float *logits_out, Tensor *hidden_out, Tensor *logits_tensor_out) {
  Rank &r = ranks_[0];
  if (logits_tensor_out && world() > 1) fail(DSRT_ERR_INTERNAL, "logits stay on the device with one rank only");
  if (hidden_out && !step.hidden) fail(DSRT_ERR_INTERNAL, "hidden states asked of a step without Step::hidden");
  step.check(DSRT_ERR_INTERNAL, "rank group forward");  // (the caller's mistake: the group stays usable)
  try {
    if (world() > 1) {
      std::string bytes = message(Msg::Forward) + step.encode();
      r.comm->broadcast(bytes, 0);
    }
    r.hidden = r.normed = Tensor{};  // (a new scratch step)
    dsrt::forward(r.shard, *r.backend, *r.comm, step.batch, step.logit_rows, step.policy, logits_out,
                  step.hidden ? &r.hidden : nullptr, logits_tensor_out);
    r.comm->check();  // (a failure of a collective whose results reached the host shows here, at the latest)
    if (hidden_out) *hidden_out = r.hidden;
  } catch (const std::exception &e) {
    r.comm->abort(std::string("rank 0: ") + e.what());
    throw;
  }
}

void RankGroup::mtp_forward(const MtpPass &pass, float *logits_out) {
  Rank &r = ranks_[0];
  pass.check(r.shard.cfg().hidden_size, DSRT_ERR_INTERNAL);  // (what a follower's decode would refuse)
  try {
    if (world() > 1) {
      std::string bytes = message(Msg::Mtp) + pass.encode();
      r.comm->broadcast(bytes, 0);
    }
    run_mtp_pass(r.shard, *r.backend, *r.comm, pass, r.hidden, r.normed, logits_out);
    r.comm->check();
  } catch (const std::exception &e) {
    r.comm->abort(std::string("rank 0: ") + e.what());
    throw;
  }
}

#if DSRT_WITH_CUDA
bool nccl_or_host_staged(const std::string &who) {
  std::string why;
  if (nccl::load(&why)) return true;
  log(LogLevel::Warn, "dsrt: " + who + ": NCCL is not available (" + why + "): GPU tensors go through host memory");
  return false;
}
#endif

void check_gpu_split(BackendKind kind, const Model &model, int tp, int ep) {
  if (kind != BackendKind::Cuda || tp == 1) return;  // (an expert-parallel rank's experts are whole tensors)
  for (int r = 0; r < tp * ep; r++) {
    const std::string cut = ModelShard::bind(model, Mapping{tp * ep, r, tp, ep}).fp8_block_cut();
    if (!cut.empty())
      failf(DSRT_ERR_UNSUPPORTED, "tp ", tp, " on GPUs: ", cut, "; a GPU holds a rank's part of an FP8 tensor with "
            "its own 128 x 128 scale blocks, so the split must fall on them (choose another tp, or split by experts: "
            "tp 1, ep ", tp * ep, ")");
  }
}

ProcessRank join_as_process(const Model &model, const DistSpec &spec, BackendKind kind, const BackendOptions &opt) {
  ProcessRank me;
  if (kind == BackendKind::Cpu) {
    me.backend = make_backend(kind, opt);
    me.comm = join_process_group(spec, model.fingerprint);
    return me;
  }
#if DSRT_WITH_CUDA
  BackendOptions o = opt;
  std::string why;
  const int n_devices = cuda_devices(&why);
  if (n_devices < 1) failf(DSRT_ERR_NO_DEVICE, "rank ", spec.rank, " asks for a GPU: ", why);
  o.device = local_device_index(spec.rank, n_devices);
  me.backend = make_backend(kind, o);
  log(LogLevel::Info, "dsrt: rank " + std::to_string(spec.rank) + " of " + std::to_string(spec.world) + " on cuda:" + std::to_string(o.device));
  Backend &be = *me.backend;
  // (ranks decide alike where the same dsrt and NCCL are installed; a world where only some have NCCL fails
  // within the join timeout)
  const bool nccl = nccl_or_host_staged("rank " + std::to_string(spec.rank));
  me.comm = join_process_group(spec, model.fingerprint, [&](RendezvousClient &store, std::unique_ptr<Communicator> host) {
    return nccl ? make_nccl_communicator(store, std::move(host), be, spec.timeout_ms)
                : make_host_staged_communicator(std::move(host), be);
  });
  return me;
#else
  fail(DSRT_ERR_UNSUPPORTED, "ranks on several GPUs need a build of dsrt with CUDA (and NCCL at run time)");
#endif
}

void run_follower_process(const Model &model, const DistSpec &spec, BackendKind kind, const BackendOptions &opt) {
  if (spec.world < 2 || spec.rank < 1) failf(DSRT_ERR_INVALID_ARGUMENT, "a follower is rank 1..world-1 of a world of >= 2, not rank ", spec.rank, " of ", spec.world);
  const Mapping m{spec.world, spec.rank, spec.tp, spec.ep, spec.dp_attention};
  m.check_divides(model.cfg);  // before joining: rank 0 checks the same and the group would not start
  check_gpu_split(kind, model, spec.tp, spec.ep);
  const ModelShard shard = ModelShard::bind(model, m);
  ProcessRank me = join_as_process(model, spec, kind, opt);
  try {
    follow_messages(shard, *me.backend, *me.comm);
  } catch (const std::exception &e) {
    me.comm->abort("rank " + std::to_string(spec.rank) + ": " + e.what());
    throw;
  }
  log(LogLevel::Info, "dsrt: rank " + std::to_string(spec.rank) + ": rank 0 stopped the group");
}

}  // namespace dsrt
