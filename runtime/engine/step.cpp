#include "engine/step.h"

#include <cstring>

#include "core/status.h"

namespace dsrt {
namespace {

constexpr uint32_t kStepMagic = 0x50545344;  // "DSTP"
constexpr uint32_t kStepVersion = 1;

void put_u32(std::string &o, uint32_t v) { o.append(reinterpret_cast<const char *>(&v), 4); }
void put_i32s(std::string &o, const std::vector<int32_t> &v) {
  put_u32(o, uint32_t(v.size()));
  o.append(reinterpret_cast<const char *>(v.data()), v.size() * 4);
}

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
  std::vector<int32_t> i32s() {
    const uint32_t n = u32();
    if ((b.size() - at) / 4 < n) fail(DSRT_ERR_FORMAT, "step message is truncated");
    std::vector<int32_t> v(n);
    if (n) std::memcpy(v.data(), b.data() + at, size_t(n) * 4);
    at += size_t(n) * 4;
    return v;
  }
};

}  // namespace

std::string Step::encode() const {
  std::string o;
  put_u32(o, kStepMagic);
  put_u32(o, kStepVersion);
  put_u32(o, uint32_t(kind));
  put_u32(o, uint32_t(policy));
  put_i32s(o, batch.tokens);
  put_i32s(o, batch.positions);
  put_i32s(o, batch.pages);
  std::vector<int32_t> seqs;
  for (const SeqSlice &s : batch.seqs) seqs.insert(seqs.end(), {s.row0, s.n_new, s.n_past, s.page0, s.n_pages});
  put_i32s(o, seqs);
  put_i32s(o, logit_rows);
  return o;
}

Step Step::decode(std::string_view bytes) {
  In in{bytes};
  if (in.u32() != kStepMagic) fail(DSRT_ERR_FORMAT, "not a step message");
  if (uint32_t v = in.u32(); v != kStepVersion) failf(DSRT_ERR_VERSION_MISMATCH, "step message version ", v, ", expected ", kStepVersion);
  Step s;
  const uint32_t kind = in.u32(), policy = in.u32();
  if (kind != uint32_t(Kind::Forward) && kind != uint32_t(Kind::Stop)) failf(DSRT_ERR_FORMAT, "step kind ", kind);
  if (policy > uint32_t(AttentionPolicy::Absorbed)) failf(DSRT_ERR_FORMAT, "step attention policy ", policy);
  s.kind = Kind(kind);
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
  s.check(DSRT_ERR_FORMAT, "step message");
  return s;
}

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
}

}  // namespace dsrt
