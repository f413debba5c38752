// Session state blobs: what a session holds (tokens, messages, random state, latent KV) as bytes that load
// back into a session of the same model (docs/reliability-round2-state.md).
//
// Format 2, host byte order (little-endian: x86-64, aarch64); every field is copied out with memcpy, so no
// field needs any alignment in the caller's buffer:
//   0   char[8]  magic "DSRTSESS"
//   8   u32      format version (2)
//   12  u32      reserved, 0
//   16  u64      size of the whole blob in bytes, checksum included
//   24  u64      model identity: hash of every weight byte (model/identity.h)
//   32  u64      cache layers (main layers + loaded MTP layers)
//   40  u64      cache values per token per layer (kv_lora_rank + qk_rope_head_dim)
//   48  u64      vocabulary size
//   56  field    model fingerprint (hex text, <= 64 bytes)
//       field    tokens in the cache (int32 each)
//       field    pending tokens (int32 each)
//       field    messages (JSON array of message objects)
//       field    tools (JSON text, or empty)
//       u64[4]   random state (xoshiro256**, not all zero)
//       i64      logits rows (0 .. tokens in the cache)
//       field    logits (fp32, rows x vocabulary, finite)
//       field    latent KV (fp32, tokens x cache layers x values per token, finite)
//   n-8 u64      checksum: hash64 of bytes [0, n-8)
// A field is a u64 byte count and the bytes. A load checks magic, version, size and checksum before it reads
// anything else, then the model, then every length and value; only then does it touch the session, so a
// rejected blob leaves the session as it was.
#include <cmath>
#include <cstring>

#include "core/hash.h"
#include "core/json.h"
#include "core/status.h"
#include "engine/engine.h"
#include "model/identity.h"

namespace dsrt {

namespace {
constexpr char kMagic[8] = {'D', 'S', 'R', 'T', 'S', 'E', 'S', 'S'};
constexpr uint32_t kStateVersion = 2;
constexpr size_t kHeaderBytes = 56;  // through the vocabulary size
constexpr size_t kMinBlob = kHeaderBytes + 8;
constexpr size_t kMaxFingerprint = 64;
constexpr size_t kMaxJsonBytes = size_t(1) << 30;
// Nesting depth of the messages and tools JSON. A message is an object in an array, its content may be an
// array of part objects, tool calls carry arguments objects: real conversations stay well under 20 levels.
// Deeper JSON would overflow the stack when the conversation is copied and rendered at the next append.
constexpr int kMaxStateJsonDepth = 128;

struct Writer {
  std::string out;
  template <class T>
  void pod(const T &v) {
    out.append(reinterpret_cast<const char *>(&v), sizeof v);
  }
  void bytes(const void *p, size_t n) {
    pod(uint64_t(n));
    if (n) out.append(static_cast<const char *>(p), n);
  }
};

struct Reader {
  std::string_view in;
  size_t pos = 0;
  void need(size_t n) const {
    if (in.size() - pos < n) fail(DSRT_ERR_FORMAT, "session state is truncated or corrupt");
  }
  template <class T>
  T pod() {
    need(sizeof(T));
    T v;
    std::memcpy(&v, in.data() + pos, sizeof v);
    pos += sizeof v;
    return v;
  }
  // A field of at most `max` bytes (and never past the end of the blob).
  std::string_view bytes(size_t max, const char *what) {
    const uint64_t n = pod<uint64_t>();
    if (n > max) failf(DSRT_ERR_FORMAT, "session state: ", what, " is larger than it may be");
    need(size_t(n));
    std::string_view v = in.substr(pos, size_t(n));
    pos += size_t(n);
    return v;
  }
};

// Copies a field into typed values: the blob's bytes have no alignment.
template <class T>
std::vector<T> typed(std::string_view b, const char *what) {
  if (b.size() % sizeof(T)) failf(DSRT_ERR_FORMAT, "session state: ", what, " has a partial element");
  std::vector<T> v(b.size() / sizeof(T));
  if (!v.empty()) std::memcpy(v.data(), b.data(), b.size());
  return v;
}

int64_t cache_layers(const Model &m) { return m.cfg.num_hidden_layers + int64_t(m.w.mtp.size()); }
}  // namespace

std::string Session::save_state() const {
  const Model &m = engine_->model();
  const uint64_t identity = model_identity(m);  // the first call reads every weight: not under the engine lock
  auto lk = engine_->lock_idle(*this);  // (refused mid-turn: no token run ahead with)
  if (turn_active_) fail(DSRT_ERR_BAD_STATE, "cannot save a session in the middle of a generation turn");
  const int64_t layers = cache_layers(m), width = m.cfg.kv_cache_width(), V = m.cfg.vocab_size;
  const int64_t per_token = layers * width;
  const std::vector<int32_t> tokens = tokens_, pending = pending_;
  const std::string msgs = messages_.dump(), tools = tools_json_;
  uint64_t st[4];
  rng_.state(st);
  const std::vector<float> logits(logits_.data(), logits_.data() + size_t(logits_rows_ * V));
  const int64_t rows = logits_rows_;
  const std::vector<int32_t> pages = kv_.pages;
  lk.unlock();  // the cache is read on the step thread, between steps (this thread owns the session meanwhile)
  const int64_t n = int64_t(tokens.size());
  std::vector<float> kv(size_t(n) * size_t(per_token));
  if (n > 0) engine_->run_between_steps([&] { engine_->ranks_->kv_read(pages, n, kv.data()); });

  Writer w;
  w.out.reserve(kMinBlob + 8 * 8 + m.fingerprint.size() + (tokens.size() + pending.size()) * 4 + msgs.size() +
                tools.size() + 40 + logits.size() * 4 + kv.size() * 4);
  w.out.append(kMagic, 8);
  w.pod(kStateVersion);
  w.pod(uint32_t(0));
  w.pod(uint64_t(0));  // the size, written at the end
  w.pod(identity);
  w.pod(uint64_t(layers));
  w.pod(uint64_t(width));
  w.pod(uint64_t(V));
  w.bytes(m.fingerprint.data(), m.fingerprint.size());
  w.bytes(tokens.data(), tokens.size() * sizeof(int32_t));
  w.bytes(pending.data(), pending.size() * sizeof(int32_t));
  w.bytes(msgs.data(), msgs.size());
  w.bytes(tools.data(), tools.size());
  w.out.append(reinterpret_cast<const char *>(st), sizeof st);
  w.pod(rows);
  w.bytes(logits.data(), logits.size() * sizeof(float));
  w.bytes(kv.data(), kv.size() * sizeof(float));
  const uint64_t total = w.out.size() + 8;
  std::memcpy(w.out.data() + 16, &total, 8);
  w.pod(hash64(w.out.data(), w.out.size()));
  return w.out;
}

void Session::load_state(const std::string &blob) {
  const Model &m = engine_->model();
  // 1. What the blob is: magic, version, size, checksum. Nothing else is read before the checksum holds.
  if (blob.size() < 12 || std::memcmp(blob.data(), kMagic, 8) != 0)
    fail(DSRT_ERR_FORMAT, "not a dsrt session state (bad magic)");
  Reader r{blob};
  r.pos = 8;
  if (uint32_t v = r.pod<uint32_t>(); v != kStateVersion)
    failf(DSRT_ERR_VERSION_MISMATCH, "session state format version ", v, ", this library reads ", kStateVersion);
  if (blob.size() < kMinBlob) fail(DSRT_ERR_FORMAT, "session state is truncated or corrupt");
  const uint32_t reserved = r.pod<uint32_t>();
  if (r.pod<uint64_t>() != blob.size()) fail(DSRT_ERR_FORMAT, "session state is truncated or corrupt (size differs)");
  uint64_t sum;
  std::memcpy(&sum, blob.data() + blob.size() - 8, 8);
  if (sum != hash64(blob.data(), blob.size() - 8)) fail(DSRT_ERR_FORMAT, "session state is corrupt (checksum mismatch)");
  if (reserved != 0) fail(DSRT_ERR_FORMAT, "session state is corrupt (reserved field)");
  r.in = std::string_view(blob).substr(0, blob.size() - 8);  // the checksum is no field

  // 2. The model: the cheap fingerprint first (another checkpoint), then the cache geometry (MTP layers loaded
  // or not), then every weight byte.
  const uint64_t identity = r.pod<uint64_t>();
  const uint64_t layers = r.pod<uint64_t>(), width = r.pod<uint64_t>(), vocab = r.pod<uint64_t>();
  if (r.bytes(kMaxFingerprint, "the model fingerprint") != m.fingerprint)
    fail(DSRT_ERR_VERSION_MISMATCH, "session state was saved with a different model (fingerprint mismatch)");
  const int64_t V = m.cfg.vocab_size, per_token = cache_layers(m) * m.cfg.kv_cache_width();
  if (layers != uint64_t(cache_layers(m)) || width != uint64_t(m.cfg.kv_cache_width()) || vocab != uint64_t(V))
    failf(DSRT_ERR_VERSION_MISMATCH, "session state holds ", layers, " cache layers of ", width, " values and ", vocab,
          " logits per row; this engine's model has ", cache_layers(m), ", ", m.cfg.kv_cache_width(), " and ", V,
          " (loaded with a different MTP setting?)");
  if (identity != model_identity(m))
    fail(DSRT_ERR_VERSION_MISMATCH, "session state was saved with different weights (model identity mismatch)");

  // 3. Every length against the session and the rest of the blob, then every value.
  // (The token lists are bounded by the blob here and by the session's context just below: a state longer
  // than this session's context is CONTEXT_FULL, not a corrupt blob.)
  std::vector<int32_t> t = typed<int32_t>(r.bytes(r.in.size(), "the token list"), "the token list");
  std::vector<int32_t> p = typed<int32_t>(r.bytes(r.in.size(), "the pending token list"), "the pending token list");
  if (int64_t(t.size() + p.size()) > max_ctx_) fail(DSRT_ERR_CONTEXT_FULL, "session state is longer than this session's context");
  const std::string_view msgs = r.bytes(kMaxJsonBytes, "the messages"), tools = r.bytes(kMaxJsonBytes, "the tools");
  uint64_t s4[4];
  for (uint64_t &x : s4) x = r.pod<uint64_t>();
  const int64_t lrows = r.pod<int64_t>();
  if (lrows < 0 || lrows > int64_t(t.size())) fail(DSRT_ERR_FORMAT, "session state is corrupt (logits rows)");
  const size_t n_tok = t.size();
  std::vector<float> lg = typed<float>(r.bytes(size_t(lrows) * size_t(V) * sizeof(float), "the logits"), "the logits");
  std::vector<float> kv = typed<float>(r.bytes(n_tok * size_t(per_token) * sizeof(float), "the KV cache"), "the KV cache");
  if (lg.size() != size_t(lrows) * size_t(V) || kv.size() != n_tok * size_t(per_token) || r.pos != r.in.size())
    fail(DSRT_ERR_FORMAT, "session state is corrupt (sizes disagree)");
  for (int32_t id : t)
    if (id < 0 || id >= V) fail(DSRT_ERR_FORMAT, "session state holds a token id outside the vocabulary");
  for (int32_t id : p)
    if (id < 0 || id >= V) fail(DSRT_ERR_FORMAT, "session state holds a token id outside the vocabulary");
  if ((s4[0] | s4[1] | s4[2] | s4[3]) == 0)
    fail(DSRT_ERR_FORMAT, "session state holds an all-zero random state (the generator would only give zeros)");
  for (float x : lg)
    if (!std::isfinite(x)) fail(DSRT_ERR_FORMAT, "session state holds a logit that is not finite");
  for (float x : kv)
    if (!std::isfinite(x)) fail(DSRT_ERR_FORMAT, "session state holds a KV cache value that is not finite");
  if (json_text_depth(tools, kMaxStateJsonDepth) > kMaxStateJsonDepth)
    failf(DSRT_ERR_FORMAT, "session state: tools nest deeper than ", kMaxStateJsonDepth, " levels");
  const nlohmann::ordered_json mj = parse_json(msgs, "session state: messages", DSRT_ERR_FORMAT, kMaxStateJsonDepth);
  if (!mj.is_array()) fail(DSRT_ERR_FORMAT, "session state: messages are not a JSON array");
  for (const auto &msg : mj)  // as append_chat requires of every message
    if (!msg.is_object() || !msg.contains("role") || !msg["role"].is_string())
      fail(DSRT_ERR_FORMAT, "session state: a message has no string \"role\"");
  // The tools are parsed (with their errors) where they are used, at the next append_chat; a session keeps
  // them as given, so they need not be valid JSON here, only bounded.

  // 4. The cache. The state goes into pages of its own while the session keeps its pages, so a failure here
  // still leaves the session as it was. Only when the pool cannot hold both is the session's own cache
  // replaced in place; a failure after that leaves the session empty (said in the error).
  PageHolding fresh;
  bool in_place = false;
  {
    auto lk = lock_settled();
    if (turn_active_) fail(DSRT_ERR_BAD_STATE, "cannot load state in the middle of a generation turn");
    KvPagePool &pool = *engine_->pool_;
    if (!pool.grow(fresh, int64_t(n_tok))) {
      // What the session lets go of comes back to its own region only; without pages it has nothing to let go
      // of, and the state did not fit in the region with the most room.
      if (kv_.region < 0 || pool.unreserved(kv_.region) + pool.releasable(kv_) < KvPagePool::pages_for(int64_t(n_tok)))
        fail(DSRT_ERR_CONTEXT_FULL, "the engine's KV pool has no room for this state");
      in_place = true;
      drop_drafts();
      forget_mtp_after(0);
      tokens_.clear();
      pending_.clear();
      pending_started_ = false;
      sampled_pending_ = false;
      logits_.clear();
      logits_rows_ = 0;
      engine_->release_pages(*this, 0);
      pool.unreserve(kv_);
      if (!pool.grow(fresh, int64_t(n_tok)))
        fail(DSRT_ERR_INTERNAL, "the engine's KV pool lost the pages of a state load; the session is now empty");
    }
  }
  auto give_back = [&] {
    std::lock_guard lk(engine_->mu_);
    engine_->pool_->shrink(fresh, 0);
  };
  try {
    if (n_tok > 0)  // every rank's cache, on the step thread between steps
      engine_->run_between_steps([&] { engine_->ranks_->kv_write(fresh.pages, int64_t(n_tok), kv.data(), kv.size()); });
  } catch (const Error &e) {
    give_back();
    if (in_place) failf(e.code(), e.what(), " (while loading a session state; the session is now empty)");
    throw;
  } catch (...) {
    give_back();
    throw;
  }
  auto lk = lock_settled();
  engine_->release_pages(*this, 0);  // the old pages, if any (none when replaced in place)
  engine_->pool_->unreserve(kv_);
  kv_ = std::move(fresh);  // its pages and their region (it has no reservation)
  published_ = 0;
  tokens_ = std::move(t);
  pending_ = std::move(p);
  pending_started_ = false;
  sampled_pending_ = false;
  drafts_.clear();
  mtp_pos_ = int64_t(tokens_.size());  // the blob has no hidden states: the MTP cache goes on from here
  mtp_hidden_.clear();
  messages_ = std::move(mj);
  tools_json_ = std::string(tools);
  rng_.set_state(s4);
  logits_.assign(lg.begin(), lg.end());
  logits_rows_ = lrows;
  logits_on_device_ = false;
  presampled_ = {};
  failed_ = DSRT_OK;
  failed_msg_.clear();
}

}  // namespace dsrt
