// A Backend that forwards every op to another one and counts what the engine's sampling path asks of it: the
// rows sampled through sample_rows and the floats copied to the host. With device_sampling = true it claims to
// sample where the logits are, so a CPU engine runs the engine's device-sampling path (logits left in the
// backend, the sampled rows through Backend::sample_rows: here its default, the CPU sampler) without a GPU.
// kv_dtype (optional) replaces the backend's latent cache dtype (a CPU engine with the GPU's BF16 cache).
#pragma once
#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <vector>

#include "backend/backend.h"
#include "core/status.h"

namespace testing {

class ForwardingBackend final : public dsrt::Backend {
 public:
  ForwardingBackend(std::unique_ptr<dsrt::Backend> b, bool device_sampling, dsrt::DType kv_dtype = dsrt::DType::F32,
                    bool override_kv = false)
      : b_(std::move(b)), device_sampling_(device_sampling), kv_dtype_(kv_dtype), override_kv_(override_kv) {}
  struct Counts {
    std::atomic<int64_t> sample_calls{0}, sampled_rows{0}, host_floats{0};
  };
  std::shared_ptr<Counts> counts = std::make_shared<Counts>();  // (kept by the test after the engine owns this)
  // A gate at the start of every forward (begin_step: once per step without MTP), which the test opens one step
  // at a time: the engine's step thread waits there (unlocked, its sessions in flight) until a step is allowed,
  // so the test decides what happens while a step runs, with no timing involved. Closed: no step passes until
  // allow(); open (the default): every step passes.
  struct Gate {
    std::mutex m;
    std::condition_variable cv;
    bool closed = false;
    int64_t permits = 0, arrived = 0, passed = 0;
    int64_t fail_at = -1;  // the step (counted by passed, from 1) that throws instead of running
    void close() {
      std::lock_guard l(m);
      closed = true;
    }
    void open() {
      std::lock_guard l(m);
      closed = false;
      cv.notify_all();
    }
    void allow(int64_t n = 1) {
      std::lock_guard l(m);
      permits += n;
      cv.notify_all();
    }
    // Until `n` steps in all have reached the gate (the last one possibly waiting there).
    void wait_arrived(int64_t n) {
      std::unique_lock l(m);
      cv.wait(l, [&] { return arrived >= n; });
    }
    // Lets one step through and waits until the next step reaches the gate.
    void step_and_wait() {
      int64_t a;
      {
        std::lock_guard l(m);
        a = arrived;
      }
      allow(1);
      wait_arrived(a + 1);
    }
    int64_t n_arrived() {
      std::lock_guard l(m);
      return arrived;
    }
    bool enter() {  // false: this step fails
      std::unique_lock l(m);
      arrived++;
      cv.notify_all();
      cv.wait(l, [&] { return !closed || permits > 0; });
      if (closed) permits--;
      passed++;
      return passed != fail_at;
    }
  };
  std::shared_ptr<Gate> gate = std::make_shared<Gate>();  // (kept by the test after the engine owns this)

  const char *name() const override { return b_->name(); }
  void begin_step() override {
    if (!gate->enter()) throw dsrt::Error(DSRT_ERR_OUT_OF_MEMORY, "a step failure injected by the test");
    b_->begin_step();
  }
  dsrt::Tensor alloc(int64_t rows, int64_t cols, dsrt::DType dt) override { return b_->alloc(rows, cols, dt); }
  uint64_t scratch_mark() override { return b_->scratch_mark(); }
  void scratch_release(uint64_t m) override { b_->scratch_release(m); }
  void kv_init(const dsrt::KvCacheSpec &s) override { b_->kv_init(s); }
  dsrt::DType default_kv_dtype() const override { return override_kv_ ? kv_dtype_ : b_->default_kv_dtype(); }
  void prepare_weights(dsrt::DeviceWeightRegistry &r, const std::vector<const dsrt::Weight *> &w,
                       const std::vector<const dsrt::Weight *> &host) override {
    b_->prepare_weights(r, w, host);
  }
  dsrt::Device device() const override { return b_->device(); }
  size_t available_memory() const override { return b_->available_memory(); }
  void kv_copy_page(int32_t s, int32_t d) override { b_->kv_copy_page(s, d); }
  void kv_read(const int32_t *p, int64_t n, float *dst) override { b_->kv_read(p, n, dst); }
  void kv_write(const int32_t *p, int64_t n, const float *src) override { b_->kv_write(p, n, src); }
  void embed(const dsrt::Weight &t, const dsrt::Batch &b, dsrt::Tensor o) override { b_->embed(t, b, o); }
  void rms_norm(dsrt::Tensor x, const dsrt::Weight &w, float eps, dsrt::Tensor o) override { b_->rms_norm(x, w, eps, o); }
  void linear(dsrt::Tensor x, const dsrt::Weight &w, dsrt::Tensor o) override { b_->linear(x, w, o); }
  void add(dsrt::Tensor x, dsrt::Tensor y) override { b_->add(x, y); }
  void silu_mul(dsrt::Tensor g, dsrt::Tensor u, dsrt::Tensor o) override { b_->silu_mul(g, u, o); }
  void rope(dsrt::Tensor x, int64_t nh, int64_t hd, int64_t off, const dsrt::RopeTable &rt, const dsrt::Batch &b) override {
    b_->rope(x, nh, hd, off, rt, b);
  }
  void mla_cache_write(int64_t l, dsrt::Tensor kv, const dsrt::Weight &n, float eps, const dsrt::RopeTable &rt,
                       const dsrt::Batch &b) override {
    b_->mla_cache_write(l, kv, n, eps, rt, b);
  }
  void mla_attention(int64_t l, dsrt::Tensor q, const dsrt::Weight &kv_b, const dsrt::MlaDims &d, const dsrt::Batch &b,
                     dsrt::AttnForm f, dsrt::Tensor o) override {
    b_->mla_attention(l, q, kv_b, d, b, f, o);
  }
  void moe_route(dsrt::Tensor x, const dsrt::Weight &g, const dsrt::Weight &bias, const dsrt::RouterParams &p,
                 dsrt::Tensor ids, dsrt::Tensor w) override {
    b_->moe_route(x, g, bias, p, ids, w);
  }
  void moe_experts(dsrt::Tensor x, const std::vector<dsrt::FfnWeights> &e, dsrt::Tensor ids, dsrt::Tensor w,
                   dsrt::Tensor o) override {
    b_->moe_experts(x, e, ids, w, o);
  }
  bool moe_takes_fp8(const std::vector<dsrt::FfnWeights> &e, int64_t rows, int64_t k) const override {
    return b_->moe_takes_fp8(e, rows, k);
  }
  void quantize_fp8_rows(dsrt::Tensor x, dsrt::Tensor q, dsrt::Tensor s) override { b_->quantize_fp8_rows(x, q, s); }
  void dequantize_fp8_rows(dsrt::Tensor q, dsrt::Tensor s, dsrt::Tensor o) override { b_->dequantize_fp8_rows(q, s, o); }
  void gather_rows(dsrt::Tensor x, const std::vector<int32_t> &rows, dsrt::Tensor o) override { b_->gather_rows(x, rows, o); }
  void to_host(dsrt::Tensor t, float *dst) override {
    counts->host_floats += t.rows * t.cols;
    b_->to_host(t, dst);
  }
  void from_host(dsrt::Tensor t, const void *src) override { b_->from_host(t, src); }
  void set_profiling(bool on) override { b_->set_profiling(on); }
  std::vector<dsrt::OpTime> op_times() override { return b_->op_times(); }
  dsrt::BackendCounters counters() const override { return b_->counters(); }

  std::vector<dsrt::SampleResult> sample_rows(dsrt::Tensor logits, const std::vector<dsrt::SampleRequest> &rows) override {
    counts->sample_calls++;
    counts->sampled_rows += int64_t(rows.size());
    return b_->sample_rows(logits, rows);
  }
  bool samples_on_device() const override { return device_sampling_; }

 private:
  std::unique_ptr<dsrt::Backend> b_;
  bool device_sampling_;
  dsrt::DType kv_dtype_;
  bool override_kv_;
};

}  // namespace testing
