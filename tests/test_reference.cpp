// End to end against an independent implementation: logits and greedy tokens of every tiny preset compared
// with Hugging Face transformers' DeepseekV3ForCausalLM (fp32), recorded by tools/reference/hf_reference.py
// on the GPU machine (tests/data/reference/reference.json says how). The checkpoint made here must be
// byte-identical to the one the reference saw: its SHA-256 is checked first.
#include <doctest/doctest.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "core/sha256.h"
#include "helpers.h"

using namespace testing;

namespace {

std::string shard_sha256(const std::string &dir) {
  std::vector<fs::path> files;
  for (auto &e : fs::directory_iterator(dir))
    if (e.path().extension() == ".safetensors") files.push_back(e.path());
  std::sort(files.begin(), files.end());
  dsrt::Sha256 h;
  std::vector<char> buf(1 << 20);
  for (auto &f : files) {
    std::ifstream in(f, std::ios::binary);
    while (in) {
      in.read(buf.data(), std::streamsize(buf.size()));
      h.update(buf.data(), size_t(in.gcount()));
    }
  }
  return h.hex_digest();
}

}  // namespace

TEST_CASE("every preset matches transformers: logits rel L2 <= 1e-3 per position, 24 greedy tokens equal") {
  const std::string dir = std::string(DSRT_TEST_DATA) + "/reference";
  std::ifstream jf(dir + "/reference.json");
  REQUIRE(jf.good());
  nlohmann::json ref = nlohmann::json::parse(jf);
  REQUIRE(ref["presets"].size() == preset_names().size());
  for (const std::string &p : preset_names()) {
    CAPTURE(p);
    const auto &r = ref["presets"][p];
    const std::string ckpt = tiny(p);
    REQUIRE(shard_sha256(ckpt) == r["checkpoint_sha256"].get<std::string>());
    std::vector<int32_t> prompt = r["prompt"].get<std::vector<int32_t>>();
    const size_t V = r["vocab"].get<size_t>(), T = prompt.size();
    std::vector<float> want(T * V);
    std::ifstream bf(dir + "/ref_" + p + ".bin", std::ios::binary);
    bf.read(reinterpret_cast<char *>(want.data()), std::streamsize(want.size() * sizeof(float)));
    REQUIRE(bf.gcount() == std::streamsize(want.size() * sizeof(float)));

    Model m(ckpt);
    Engine e(m);
    Session s(e, true);
    s.append(prompt);
    s.eval();
    size_t rows;
    auto got = s.logits(&rows);
    REQUIRE(rows == T);
    double worst = 0;
    for (size_t t = 0; t < T; t++) worst = std::max(worst, rel_l2(got.data() + t * V, want.data() + t * V, V));
    MESSAGE(p << ": max relative L2 error over " << T << " positions = " << worst);
    CHECK(worst <= 1e-3);

    Session g(e);
    g.append(prompt);
    std::vector<int32_t> greedy;
    for (int i = 0; i < 24; i++) {
      g.eval();
      greedy.push_back(g.greedy());
      g.append({greedy.back()});
    }
    CHECK(greedy == r["greedy"].get<std::vector<int32_t>>());
  }
}
