#include "engine/step.h"

#include <cstring>

#include "core/status.h"

namespace dsrt {
namespace {

constexpr uint32_t kStepMagic = 0x50545344;  // "DSTP"
constexpr uint32_t kStepVersion = 3;  // 2: the hidden flag; 3: Batch::rank_pages
constexpr uint32_t kMtpMagic = 0x50544d44;  // "DMTP"

void put_u32(std::string &o, uint32_t v) { o.append(reinterpret_cast<const char *>(&v), 4); }
template <class T>
void put_vec(std::string &o, const std::vector<T> &v) {
  static_assert(sizeof(T) == 4);
  put_u32(o, uint32_t(v.size()));
  o.append(reinterpret_cast<const char *>(v.data()), v.size() * 4);
}
void put_i32s(std::string &o, const std::vector<int32_t> &v) { put_vec(o, v); }
void put_f32s(std::string &o, const std::vector<float> &v) { put_vec(o, v); }

struct In {
  std::string_view b;
  size_t at = 0;
  uint32_t u32() {
    if (b.size() - at < 4) fail(DSRT_ERR_FORMAT, "step message is truncated");
    uint32_t v;
    std::memcpy(&v, b.data() + at, 4);
    at += 4;
    return v;
  }
  std::string_view bytes() {
    const uint32_t n = u32();
    if (b.size() - at < n) fail(DSRT_ERR_FORMAT, "step message is truncated");
    std::string_view v = b.substr(at, n);
    at += n;
    return v;
  }
  template <class T>
  std::vector<T> vec() {
    static_assert(sizeof(T) == 4);
    const uint32_t n = u32();
    if ((b.size() - at) / 4 < n) fail(DSRT_ERR_FORMAT, "step message is truncated");
    std::vector<T> v(n);
    if (n) std::memcpy(v.data(), b.data() + at, size_t(n) * 4);
    at += size_t(n) * 4;
    return v;
  }
  std::vector<int32_t> i32s() { return vec<int32_t>(); }
  std::vector<float> f32s() { return vec<float>(); }
};

}  // namespace

std::string Step::encode() const {
  std::string o;
  put_u32(o, kStepMagic);
  put_u32(o, kStepVersion);
  put_u32(o, uint32_t(kind));
  put_u32(o, uint32_t(policy));
  put_u32(o, hidden ? 1 : 0);
  put_u32(o, uint32_t(batch.rank_pages));
  put_i32s(o, batch.tokens);
  put_i32s(o, batch.positions);
  put_i32s(o, batch.pages);
  std::vector<int32_t> seqs;
  for (const SeqSlice &s : batch.seqs) seqs.insert(seqs.end(), {s.row0, s.n_new, s.n_past, s.page0, s.n_pages});
  put_i32s(o, seqs);
  put_i32s(o, logit_rows);
  return o;
}

namespace {
// Step::decode without the final check (MtpPass::decode checks the step with its segments).
Step decode_step(std::string_view bytes);
}  // namespace

Step Step::decode(std::string_view bytes) {
  Step s = decode_step(bytes);
  s.check(DSRT_ERR_FORMAT, "step message");
  return s;
}

namespace {
Step decode_step(std::string_view bytes) {
  In in{bytes};
  if (in.u32() != kStepMagic) fail(DSRT_ERR_FORMAT, "not a step message");
  if (uint32_t v = in.u32(); v != kStepVersion) failf(DSRT_ERR_VERSION_MISMATCH, "step message version ", v, ", expected ", kStepVersion);
  Step s;
  const uint32_t kind = in.u32(), policy = in.u32(), flags = in.u32();
  if (flags > 1) failf(DSRT_ERR_FORMAT, "step flags ", flags);
  s.hidden = flags == 1;
  const uint32_t rank_pages = in.u32();
  if (rank_pages > uint32_t(INT32_MAX)) failf(DSRT_ERR_FORMAT, "step pages per rank ", rank_pages);
  s.batch.rank_pages = int32_t(rank_pages);
  if (kind != uint32_t(Step::Kind::Forward) && kind != uint32_t(Step::Kind::Stop)) failf(DSRT_ERR_FORMAT, "step kind ", kind);
  if (policy > uint32_t(AttentionPolicy::Absorbed)) failf(DSRT_ERR_FORMAT, "step attention policy ", policy);
  s.kind = Step::Kind(kind);
  s.policy = AttentionPolicy(policy);
  s.batch.tokens = in.i32s();
  s.batch.positions = in.i32s();
  s.batch.pages = in.i32s();
  const std::vector<int32_t> seqs = in.i32s();
  s.logit_rows = in.i32s();
  if (in.at != bytes.size() || seqs.size() % 5 || s.batch.positions.size() != s.batch.tokens.size())
    fail(DSRT_ERR_FORMAT, "step message does not hold together");
  for (size_t i = 0; i < seqs.size(); i += 5)
    s.batch.seqs.push_back({seqs[i], seqs[i + 1], seqs[i + 2], seqs[i + 3], seqs[i + 4]});
  return s;
}
}  // namespace

void Step::check(dsrt_status code, const char *what) const {
  const int64_t T = batch.n_tokens(), P = int64_t(batch.pages.size());
  if (int64_t(batch.positions.size()) != T) failf(code, what, ": ", batch.positions.size(), " positions for ", T, " tokens");
  for (const SeqSlice &q : batch.seqs)
    if (q.row0 < 0 || q.n_new < 0 || int64_t(q.row0) + q.n_new > T || q.n_past < 0 || q.page0 < 0 || q.n_pages < 0 ||
        int64_t(q.page0) + q.n_pages > P || (int64_t(q.n_past) + q.n_new + kPageTokens - 1) / kPageTokens > q.n_pages)
      failf(code, what, ": a sequence lies outside the batch or its page table (rows ", q.row0, "..", int64_t(q.row0) + q.n_new,
            " of ", T, ", pages ", q.page0, "..", int64_t(q.page0) + q.n_pages, " of ", P, ", positions to ",
            int64_t(q.n_past) + q.n_new, ")");
  for (int32_t r : logit_rows)
    if (r < 0 || r >= T) failf(code, what, ": logit row ", r, " lies outside the batch of ", T, " rows");
  if (batch.rank_pages < 0) failf(code, what, ": ", batch.rank_pages, " pages per rank");
  if (batch.rank_pages > 0)
    for (const SeqSlice &q : batch.seqs)
      for (int32_t k = 0; k < q.n_pages; k++) {
        const int32_t page = batch.pages_of(q)[k];
        if (page < 0 || batch.rank_of(page) != batch.rank_of(batch.pages_of(q)[0]))
          failf(code, what, ": a sequence's pages lie in the pools of two ranks (", batch.pages_of(q)[0], " and ", page,
                ", ", batch.rank_pages, " pages per rank)");
      }
}

void MtpPass::add_host(const float *rows, int64_t n, int64_t hidden) {
  if (n <= 0) return;
  segments.push_back({From::Host, {}, std::vector<float>(rows, rows + n * hidden)});
}

void MtpPass::add_rows(From from, std::vector<int32_t> rows) {
  if (rows.empty()) return;
  segments.push_back({from, std::move(rows), {}});
}

int64_t MtpPass::n_rows(int64_t hidden) const {
  int64_t n = 0;
  for (const Segment &g : segments) n += g.from == From::Host ? int64_t(g.host.size()) / hidden : int64_t(g.rows.size());
  return n;
}

std::string MtpPass::encode() const {
  std::string o;
  put_u32(o, kMtpMagic);
  const std::string st = step.encode();
  put_u32(o, uint32_t(st.size()));
  o += st;
  put_u32(o, begin_step ? 1 : 0);
  put_u32(o, uint32_t(segments.size()));
  for (const Segment &g : segments) {
    put_u32(o, uint32_t(g.from));
    put_i32s(o, g.rows);
    put_f32s(o, g.host);
  }
  return o;
}

MtpPass MtpPass::decode(std::string_view bytes, int64_t hidden) {
  In in{bytes};
  if (in.u32() != kMtpMagic) fail(DSRT_ERR_FORMAT, "not an MTP pass message");
  MtpPass p;
  p.step = decode_step(in.bytes());  // (checked below, with the segments)
  const uint32_t begin = in.u32();
  if (begin > 1) failf(DSRT_ERR_FORMAT, "MTP pass flag ", begin);
  p.begin_step = begin == 1;
  const uint32_t n = in.u32();
  if (n > bytes.size()) fail(DSRT_ERR_FORMAT, "MTP pass message is truncated");
  for (uint32_t i = 0; i < n; i++) {
    Segment g;
    const uint32_t from = in.u32();
    if (from < uint32_t(From::Host) || from > uint32_t(From::Normed)) failf(DSRT_ERR_FORMAT, "MTP pass segment source ", from);
    g.from = From(from);
    g.rows = in.i32s();
    g.host = in.f32s();
    p.segments.push_back(std::move(g));
  }
  if (in.at != bytes.size()) fail(DSRT_ERR_FORMAT, "MTP pass message has trailing bytes");
  p.check(hidden, DSRT_ERR_FORMAT);
  return p;
}

void MtpPass::check(int64_t hidden, dsrt_status code) const {
  step.check(code, "MTP pass");
  for (const Segment &g : segments) {
    const bool host_rows = g.from == From::Host;
    if (host_rows != g.rows.empty() || host_rows == g.host.empty() || hidden <= 0 || g.host.size() % size_t(hidden))
      fail(code, "MTP pass: a segment does not hold together");
    for (int32_t r : g.rows)
      if (r < 0) fail(code, "MTP pass: a segment row is negative");
  }
  if (n_rows(hidden) != step.batch.n_tokens())
    failf(code, "MTP pass: ", n_rows(hidden), " input rows for a batch of ", step.batch.n_tokens());
}

}  // namespace dsrt
