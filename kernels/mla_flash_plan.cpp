// The schedule of kernels/mla_flash.cu for one step: which query rows and key tiles each block takes.
// Plain C++ (built with or without CUDA) so that the CPU test suite checks it.
#include <algorithm>

#include "kernels.h"

namespace dsrt::kernels {

MlaFlashPlan mla_flash_plan(const std::vector<MlaSeq> &seqs, int64_t nh, int n_sm) {
  struct QBlock {
    int32_t seq, qoff, nq, n_kv, tiles;
  };
  std::vector<QBlock> qbs;
  int64_t total = 0;
  for (size_t i = 0; i < seqs.size(); i++) {
    const MlaSeq &s = seqs[i];
    const int64_t nq = int64_t(s.n_new) * nh;
    for (int64_t q = 0; q < nq; q += kMlaFlashRows) {
      const int32_t n = int32_t(std::min<int64_t>(kMlaFlashRows, nq - q));
      const int32_t last_token = int32_t((q + n - 1) / nh);  // causal: the block's last row sees the most keys
      const int32_t n_kv = s.n_past + last_token + 1;
      const int32_t tiles = (n_kv + kMlaFlashTile - 1) / kMlaFlashTile;
      qbs.push_back({int32_t(i), int32_t(q), n, n_kv, tiles});
      total += tiles;
    }
  }
  MlaFlashPlan p;
  p.block_items.push_back(0);
  if (qbs.empty()) return p;
  // Persistent blocks (one per SM: a block's shared memory leaves room for no second): the q-blocks' key
  // tiles, laid end to end, are cut into n_blocks equal runs, so every SM gets the same number of tiles
  // whatever the mix of short and long sequences, and no second wave of a few blocks doubles a step. A run
  // covers parts of one or more q-blocks (segments); a q-block cut into several segments gets a partial
  // result per segment, merged by the combine kernel. Short contexts get a block per tile (kMinRun = 1):
  // with 4 tiles per block, a 128-token decode step kept 2 of 132 SMs busy for 37 us per layer.
  constexpr int64_t kMinRun = 1;
  const int64_t n_blocks = std::clamp<int64_t>((total + kMinRun - 1) / kMinRun, 1, std::clamp(n_sm, 1, 1024));
  const int64_t run = (total + n_blocks - 1) / n_blocks;
  std::vector<int32_t> block_of;  // per item: the run (block) it lies in
  int64_t pos = 0;                // tiles handed out so far
  for (const QBlock &qb : qbs) {
    const MlaSeq &s = seqs[size_t(qb.seq)];
    const int32_t qrow0 = int32_t(int64_t(s.row0) * nh + qb.qoff);
    const size_t first = p.items.size();
    for (int32_t t = 0; t < qb.tiles;) {  // segments: cut where a run ends
      const int64_t run_end = (pos / run + 1) * run;
      const int32_t end = int32_t(std::min<int64_t>(qb.tiles, t + (run_end - pos)));
      MlaWorkItem w{};
      w.qrow0 = qrow0;
      w.nq = qb.nq;
      w.qoff = qb.qoff;
      w.n_past = s.n_past;
      w.n_kv = qb.n_kv;
      w.page0 = s.page0;
      w.tile0 = t;
      w.tile1 = end;
      p.items.push_back(w);
      block_of.push_back(int32_t(pos / run));
      pos += end - t;
      t = end;
    }
    const int32_t n_segs = int32_t(p.items.size() - first);
    if (n_segs > 1) {  // partial results in consecutive slots, merged by one combine item
      p.combine.push_back({qrow0, qb.nq, p.n_slots, n_segs});
      for (size_t i = first; i < p.items.size(); i++) p.items[i].slot = p.n_slots++;
    } else {
      p.items[first].slot = -1;
    }
  }
  const int32_t used = block_of.back() + 1;
  p.block_items.assign(size_t(used) + 1, int32_t(p.items.size()));
  for (size_t i = p.items.size(); i-- > 0;) p.block_items[size_t(block_of[i])] = int32_t(i);
  p.block_items[0] = 0;
  return p;
}

}  // namespace dsrt::kernels
