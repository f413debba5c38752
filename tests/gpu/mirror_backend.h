// A Backend that runs every op twice: on the backend under test and on the CPU reference, feeding the
// reference the tested backend's own inputs (copied over before each op). Differences therefore do not
// accumulate through the model: each op's error is measured alone, and the first op that goes wrong in a
// real forward pass is named with its call number. The latent cache is kept in both (each backend writes
// its own), so attention is measured against a cache that differs only by the cache-write op's error.
#pragma once
#include <algorithm>
#include <cmath>
#include <memory>
#include <stdexcept>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "core/dtype.h"

namespace testing {

class MirrorBackend final : public dsrt::Backend {
 public:
  struct OpError {
    double worst = 0;  // max relative L2 of any call
    int64_t calls = 0, worst_call = -1;
  };

  MirrorBackend(std::unique_ptr<dsrt::Backend> test, std::unique_ptr<dsrt::Backend> ref)
      : t_(std::move(test)), r_(std::move(ref)) {}

  std::map<std::string, OpError> errors;  // by op name
  bool per_weight = false;                 // linear errors by weight label and row count, not only by dtype
  int64_t call = 0;

  const char *name() const override { return "mirror"; }
  dsrt::Device device() const override { return t_->device(); }
  void begin_step() override {
    t_->begin_step();
    r_->begin_step();
    twins_.clear();
    marks_.clear();
  }
  dsrt::Tensor alloc(int64_t rows, int64_t cols, dsrt::DType dt) override {
    dsrt::Tensor a = t_->alloc(rows, cols, dt), b = r_->alloc(rows, cols, dt);
    char *p = static_cast<char *>(a.data);  // forget released tensors this one now overlaps
    twins_.erase(twins_.lower_bound(p), twins_.lower_bound(p + std::max<size_t>(1, size_t(rows * cols) * dsrt::dtype_size(dt))));
    twins_[p] = {a, b};
    return a;
  }
  uint64_t scratch_mark() override {
    marks_.push_back({t_->scratch_mark(), r_->scratch_mark()});
    return marks_.size() - 1;
  }
  void scratch_release(uint64_t m) override {
    t_->scratch_release(marks_[m].first);
    r_->scratch_release(marks_[m].second);
    marks_.resize(m);
  }
  dsrt::DType default_kv_dtype() const override { return t_->default_kv_dtype(); }
  void kv_init(const dsrt::KvCacheSpec &s) override {
    t_->kv_init(s);
    r_->kv_init(s);
  }
  void kv_copy_page(int32_t a, int32_t b) override {
    t_->kv_copy_page(a, b);
    r_->kv_copy_page(a, b);
  }
  void kv_read(const int32_t *p, int64_t n, float *d) override { t_->kv_read(p, n, d); }
  void kv_write(const int32_t *p, int64_t n, const float *s) override {
    t_->kv_write(p, n, s);
    r_->kv_write(p, n, s);
  }

  void embed(const dsrt::Weight &w, const dsrt::Batch &b, dsrt::Tensor out) override {
    r_->embed(w, b, ref(out, false));
    t_->embed(w, b, out);
    compare("embed", out);
  }
  void rms_norm(dsrt::Tensor x, const dsrt::Weight &w, float eps, dsrt::Tensor out) override {
    r_->rms_norm(ref(x), w, eps, ref(out, false));
    t_->rms_norm(x, w, eps, out);
    compare("rms_norm", out);
  }
  void linear(dsrt::Tensor x, const dsrt::Weight &w, dsrt::Tensor out) override {
    r_->linear(ref(x), w, ref(out, false));
    t_->linear(x, w, out);
    compare(std::string("linear ") + dsrt::dtype_name(w.dtype) +
                (per_weight ? " " + dsrt::op_label_of_weight(w.name()) + " M=" + std::to_string(x.rows) : ""),
            out);
  }
  void add(dsrt::Tensor x, dsrt::Tensor y) override {
    r_->add(ref(x), ref(y));
    t_->add(x, y);
    compare("add", x);
  }
  void silu_mul(dsrt::Tensor g, dsrt::Tensor u, dsrt::Tensor out) override {
    r_->silu_mul(ref(g), ref(u), ref(out, false));
    t_->silu_mul(g, u, out);
    compare("silu_mul", out);
  }
  void rope(dsrt::Tensor x, int64_t nh, int64_t hd, int64_t off, const dsrt::RopeTable &rt,
            const dsrt::Batch &b) override {
    r_->rope(ref(x), nh, hd, off, rt, b);
    t_->rope(x, nh, hd, off, rt, b);
    compare("rope", x);
  }
  void mla_cache_write(int64_t layer, dsrt::Tensor kv, const dsrt::Weight &norm, float eps, const dsrt::RopeTable &rt,
                       const dsrt::Batch &b) override {
    r_->mla_cache_write(layer, ref(kv), norm, eps, rt, b);
    t_->mla_cache_write(layer, kv, norm, eps, rt, b);
  }
  void mla_attention(int64_t layer, dsrt::Tensor q, const dsrt::Weight &kv_b, const dsrt::MlaDims &d,
                     const dsrt::Batch &b, dsrt::AttnForm f, dsrt::Tensor out) override {
    // out is written only in the rows of b's sequences: copy the rest over so the comparison sees them equal
    r_->mla_attention(layer, ref(q), kv_b, d, b, f, ref(out));
    t_->mla_attention(layer, q, kv_b, d, b, f, out);
    compare(f == dsrt::AttnForm::Absorbed ? "mla_attention absorbed" : "mla_attention naive", out);
  }
  void moe_route(dsrt::Tensor x, const dsrt::Weight &g, const dsrt::Weight &bias, const dsrt::RouterParams &p,
                 dsrt::Tensor ids, dsrt::Tensor w) override {
    r_->moe_route(ref(x), g, bias, p, ref(ids, false), ref(w, false));
    t_->moe_route(x, g, bias, p, ids, w);
    std::vector<int32_t> a(size_t(ids.rows * ids.cols)), c(a.size());
    t_->to_host(ids, reinterpret_cast<float *>(a.data()));
    r_->to_host(ref(ids, false), reinterpret_cast<float *>(c.data()));
    record("moe_route ids", a == c ? 0.0 : 1.0);
    compare("moe_route weights", w);
  }
  void moe_experts(dsrt::Tensor x, const std::vector<dsrt::FfnWeights> &e, dsrt::Tensor ids, dsrt::Tensor w,
                   dsrt::Tensor out) override {
    r_->moe_experts(ref(x), e, ref(ids), ref(w), ref(out, false));
    t_->moe_experts(x, e, ids, w, out);
    compare("moe_experts", out);
  }
  void gather_rows(dsrt::Tensor x, const std::vector<int32_t> &rows, dsrt::Tensor out) override {
    r_->gather_rows(ref(x), rows, ref(out, false));
    t_->gather_rows(x, rows, out);
    compare("gather_rows", out);
  }
  void to_host(dsrt::Tensor t, float *dst) override { t_->to_host(t, dst); }
  void set_profiling(bool on) override { t_->set_profiling(on); }
  size_t available_memory() const override { return t_->available_memory(); }
  std::vector<dsrt::OpTime> op_times() override { return t_->op_times(); }
  void from_host(dsrt::Tensor t, const void *src) override {
    t_->from_host(t, src);
    r_->from_host(ref(t, false), src);
  }

 private:
  // The reference twin of a tested tensor (or of a row view into one); with copy, it first receives the
  // tested tensor's current contents.
  dsrt::Tensor ref(dsrt::Tensor x, bool copy = true) {
    auto it = twins_.upper_bound(static_cast<char *>(x.data));
    if (it == twins_.begin()) throw std::runtime_error("mirror: tensor not allocated through the mirror");
    --it;
    const auto &[a, b] = it->second;
    dsrt::Tensor y = x;
    y.data = static_cast<char *>(b.data) + (static_cast<char *>(x.data) - static_cast<char *>(a.data));
    y.device = b.device;
    if (copy) {
      std::vector<float> h(size_t(x.rows * x.cols) * dsrt::dtype_size(x.dtype) / sizeof(float) + 1);
      t_->to_host(x, h.data());
      r_->from_host(y, h.data());
    }
    return y;
  }
  void compare(const std::string &op, dsrt::Tensor out) {
    std::vector<float> a(size_t(out.rows * out.cols)), b(a.size());
    t_->to_host(out, a.data());
    r_->to_host(ref(out, false), b.data());
    double num = 0, den = 0;
    for (size_t i = 0; i < a.size(); i++) {
      num += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
      den += double(b[i]) * b[i];
    }
    record(op, den > 0 ? std::sqrt(num / den) : std::sqrt(num));
  }
  void record(const std::string &op, double e) {
    OpError &o = errors[op];
    o.calls++;
    if (e > o.worst || o.worst_call < 0) {
      o.worst = e;
      o.worst_call = call;
    }
    call++;
  }

  std::unique_ptr<dsrt::Backend> t_, r_;
  std::map<char *, std::pair<dsrt::Tensor, dsrt::Tensor>> twins_;
  std::vector<std::pair<uint64_t, uint64_t>> marks_;
};

}  // namespace testing
