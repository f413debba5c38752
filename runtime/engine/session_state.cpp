// Session state blobs: what a session holds (tokens, messages, random state, latent KV) as bytes that load
// back into a session of the same model.
#include <cstring>

#include "core/status.h"
#include "engine/engine.h"

namespace dsrt {

namespace {
constexpr char kMagic[8] = {'D', 'S', 'R', 'T', 'S', 'E', 'S', 'S'};
constexpr uint32_t kStateVersion = 1;

struct Writer {
  std::string out;
  template <class T>
  void pod(const T &v) {
    out.append(reinterpret_cast<const char *>(&v), sizeof v);
  }
  void bytes(const void *p, size_t n) {
    pod(uint64_t(n));
    out.append(static_cast<const char *>(p), n);
  }
};
struct Reader {
  std::string_view in;
  size_t pos = 0;
  void need(size_t n) {
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
  std::string_view bytes(size_t max) {
    uint64_t n = pod<uint64_t>();
    if (n > max) fail(DSRT_ERR_FORMAT, "session state holds a field larger than it may be");
    need(size_t(n));
    std::string_view v = in.substr(pos, size_t(n));
    pos += size_t(n);
    return v;
  }
};
}  // namespace

std::string Session::save_state() const {
  auto lk = engine_->lock_idle(*this);
  if (turn_active_) fail(DSRT_ERR_BAD_STATE, "cannot save a session in the middle of a generation turn");
  const Model &m = engine_->model();
  Writer w;
  w.out.append(kMagic, 8);
  w.pod(kStateVersion);
  w.bytes(m.fingerprint.data(), m.fingerprint.size());
  w.bytes(tokens_.data(), tokens_.size() * sizeof(int32_t));
  w.bytes(pending_.data(), pending_.size() * sizeof(int32_t));
  std::string msgs = messages_.dump(), tools = tools_json_;
  w.bytes(msgs.data(), msgs.size());
  w.bytes(tools.data(), tools.size());
  uint64_t st[4];
  rng_.state(st);
  w.bytes(st, sizeof st);
  w.bytes(logits_.data(), logits_.size() * sizeof(float));
  w.pod(int64_t(logits_rows_));
  const int64_t per_token = (m.cfg.num_hidden_layers + int64_t(m.w.mtp.size())) * m.cfg.kv_cache_width();
  std::vector<float> kv(tokens_.size() * size_t(per_token));
  const std::vector<int32_t> pages = kv_.pages;
  const int64_t n = int64_t(tokens_.size());
  lk.unlock();  // the cache is read on the step thread, between steps (this thread owns the session meanwhile)
  if (n > 0) engine_->run_between_steps([&] { engine_->backend().kv_read(pages.data(), n, kv.data()); });
  w.bytes(kv.data(), kv.size() * sizeof(float));
  return w.out;
}

void Session::load_state(const std::string &blob) {
  const Model &m = engine_->model();
  Reader r{blob};
  r.need(8);
  if (std::memcmp(blob.data(), kMagic, 8) != 0) fail(DSRT_ERR_FORMAT, "not a dsrt session state (bad magic)");
  r.pos = 8;
  if (uint32_t v = r.pod<uint32_t>(); v != kStateVersion)
    failf(DSRT_ERR_VERSION_MISMATCH, "session state format version ", v, ", this library reads ", kStateVersion);
  if (r.bytes(256) != m.fingerprint)
    fail(DSRT_ERR_VERSION_MISMATCH, "session state was saved with a different model (fingerprint mismatch)");
  const size_t cap = size_t(max_ctx_) * sizeof(int32_t);
  auto tok = r.bytes(cap), pend = r.bytes(cap);
  if (tok.size() % 4 || pend.size() % 4) fail(DSRT_ERR_FORMAT, "session state: token arrays are corrupt");
  std::string msgs(r.bytes(size_t(1) << 30)), tools(r.bytes(size_t(1) << 30));
  auto st = r.bytes(32);
  const int64_t V = m.cfg.vocab_size;
  auto lg = r.bytes(size_t(max_ctx_) * size_t(V) * sizeof(float));
  int64_t lrows = r.pod<int64_t>();
  const int64_t per_token = (m.cfg.num_hidden_layers + int64_t(m.w.mtp.size())) * m.cfg.kv_cache_width();
  const size_t n_tok = tok.size() / 4;
  auto kv = r.bytes(n_tok * size_t(per_token) * sizeof(float));
  // lrows is checked before it is multiplied: a hostile value must not overflow.
  if (lrows < 0 || lrows > max_ctx_ || st.size() != 32 || kv.size() != n_tok * size_t(per_token) * sizeof(float) ||
      lg.size() != size_t(lrows) * size_t(V) * sizeof(float) || r.pos != blob.size())
    fail(DSRT_ERR_FORMAT, "session state is corrupt (sizes disagree)");
  std::vector<int32_t> t(n_tok), p(pend.size() / 4);
  if (!tok.empty()) std::memcpy(t.data(), tok.data(), tok.size());
  if (!pend.empty()) std::memcpy(p.data(), pend.data(), pend.size());
  for (int32_t id : t)
    if (id < 0 || id >= V) fail(DSRT_ERR_FORMAT, "session state holds a token id outside the vocabulary");
  for (int32_t id : p)
    if (id < 0 || id >= V) fail(DSRT_ERR_FORMAT, "session state holds a token id outside the vocabulary");
  nlohmann::ordered_json mj;
  try {
    mj = nlohmann::ordered_json::parse(msgs);
  } catch (const std::exception &) {
    fail(DSRT_ERR_FORMAT, "session state: messages are corrupt");
  }
  if (int64_t(t.size() + p.size()) > max_ctx_) fail(DSRT_ERR_CONTEXT_FULL, "session state is longer than this session's context");
  std::vector<int32_t> pages;
  {
    auto lk = engine_->lock_idle(*this);
    if (turn_active_) fail(DSRT_ERR_BAD_STATE, "cannot load state in the middle of a generation turn");
    engine_->release_pages(*this, 0);
    tokens_.clear();
    pending_.clear();
    if (!engine_->ensure_pages(*this, int64_t(t.size()))) fail(DSRT_ERR_CONTEXT_FULL, "the engine's KV pool has no room for this state");
    pages = kv_.pages;
  }
  if (!t.empty())  // every rank's cache, on the step thread between steps
    engine_->run_between_steps([&] {
      engine_->ranks_->for_each_backend([&](Backend &be) {
        be.kv_write(pages.data(), int64_t(t.size()), reinterpret_cast<const float *>(kv.data()));
      });
    });
  auto lk = engine_->lock_idle(*this);
  tokens_ = std::move(t);
  pending_ = std::move(p);
  pending_started_ = false;
  sampled_pending_ = false;
  drafts_.clear();
  mtp_pos_ = int64_t(tokens_.size());  // the blob has no hidden states: the MTP cache goes on from here
  mtp_hidden_.clear();
  messages_ = std::move(mj);
  tools_json_ = tools;
  uint64_t s4[4];
  std::memcpy(s4, st.data(), 32);
  rng_.set_state(s4);
  logits_.assign(reinterpret_cast<const float *>(lg.data()), reinterpret_cast<const float *>(lg.data()) + lrows * V);
  logits_rows_ = lrows;
  failed_ = DSRT_OK;
}

}  // namespace dsrt
