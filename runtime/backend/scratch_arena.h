// Bump allocator for a backend's per-step scratch tensors: blocks are never moved once handed out, a step
// that outgrows them gets another block, and marks let a layer's temporaries be dropped together.
#pragma once
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "core/status.h"

namespace dsrt {

class ScratchArena {
 public:
  // alloc(bytes) returns a block (throwing on failure), release(p) frees it; blocks are at least min_block.
  ScratchArena(std::function<void *(size_t)> alloc, std::function<void(void *)> release, size_t min_block, size_t align)
      : alloc_(std::move(alloc)), release_(std::move(release)), min_block_(min_block), align_(align) {}
  ~ScratchArena() {
    for (char *b : blocks_) release_(b);
  }
  ScratchArena(const ScratchArena &) = delete;
  ScratchArena &operator=(const ScratchArena &) = delete;

  void *take(size_t bytes) {
    bytes = (bytes + align_ - 1) / align_ * align_;
    while (block_ < blocks_.size() && used_ + bytes > sizes_[block_]) {
      block_++;
      used_ = 0;
    }
    if (block_ == blocks_.size()) {
      const size_t sz = std::max(bytes, min_block_);
      blocks_.push_back(static_cast<char *>(alloc_(sz)));
      sizes_.push_back(sz);
      used_ = 0;
    }
    void *p = blocks_[block_] + used_;
    used_ += bytes;
    return p;
  }
  void reset() { block_ = used_ = 0; }
  uint64_t mark() const { return uint64_t(block_) << 40 | used_; }
  void release_to(uint64_t m) {
    block_ = size_t(m >> 40);
    used_ = size_t(m & ((uint64_t(1) << 40) - 1));
  }

 private:
  std::function<void *(size_t)> alloc_;
  std::function<void(void *)> release_;
  size_t min_block_, align_;
  std::vector<char *> blocks_;
  std::vector<size_t> sizes_;
  size_t block_ = 0, used_ = 0;
};

// A Backend whose scratch tensors come from a ScratchArena (both the CPU and the CUDA backend).
class ArenaBackend : public Backend {
 public:
  ArenaBackend(Device device, std::function<void *(size_t)> alloc, std::function<void(void *)> release,
               size_t min_block, size_t align)
      : device_(device), arena_(std::move(alloc), std::move(release), min_block, align) {}
  Device device() const override { return device_; }
  void begin_step() override { arena_.reset(); }
  Tensor alloc(int64_t rows, int64_t cols, DType dtype = DType::F32) override {
    return {arena_.take(size_t(rows * cols) * dtype_size(dtype)), dtype, rows, cols, device_};
  }
  uint64_t scratch_mark() override { return arena_.mark(); }
  void scratch_release(uint64_t mark) override { arena_.release_to(mark); }

 protected:
  // Aggregates op times by label, in first-seen order.
  void add_op_time(const std::string &label, double ms) {
    auto [it, fresh] = op_index_.try_emplace(label, op_list_.size());
    if (fresh) op_list_.push_back({label, 0, 0.0});
    op_list_[it->second].calls++;
    op_list_[it->second].ms += ms;
  }
  void clear_op_times() {
    op_index_.clear();
    op_list_.clear();
  }
  // Every tensor an op receives must be in this backend's memory: no op copies across devices.
  void check_device(const Tensor &t, const char *op) const {
    if (!(t.device == device_)) failf(DSRT_ERR_INTERNAL, op, ": a tensor on ", t.device.str(), " given to the ", device_.str(), " backend");
  }
  std::vector<OpTime> sorted_op_times() const {
    std::vector<OpTime> v = op_list_;
    std::stable_sort(v.begin(), v.end(), [](const OpTime &a, const OpTime &b) { return a.ms > b.ms; });
    return v;
  }

 private:
  Device device_;
  ScratchArena arena_;
  std::map<std::string, size_t> op_index_;
  std::vector<OpTime> op_list_;
};

}  // namespace dsrt
