// Malformed checkpoints: every load fails with a status whose message names the file and the tensor.
#include <doctest/doctest.h>

#include <cmath>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "helpers.h"
#include "model/model.h"

using namespace testing;
using json = nlohmann::json;

namespace {

struct Shard {
  json header;
  std::string data;
  static Shard read(const fs::path &p) {
    std::string s = slurp(p);
    uint64_t n;
    std::memcpy(&n, s.data(), 8);
    return {json::parse(s.substr(8, n)), s.substr(8 + n)};
  }
  void write(const fs::path &p) const {
    std::string h = header.dump();
    h.append((8 - h.size() % 8) % 8, ' ');
    uint64_t n = h.size();
    spit(p, std::string(reinterpret_cast<const char *>(&n), 8) + h + data);
  }
};

// The shard holding `tensor`, per the index.
fs::path shard_of(const fs::path &d, const std::string &tensor) {
  json idx = json::parse(slurp(d / "model.safetensors.index.json"));
  return d / idx["weight_map"][tensor].get<std::string>();
}

void expect_load_error(const fs::path &d, dsrt_status code, std::initializer_list<std::string> needles) {
  dsrt_model *m = nullptr;
  dsrt_status s = dsrt_model_load(d.string().c_str(), nullptr, &m);
  std::string msg = dsrt_last_error();
  INFO("status ", dsrt_status_string(s), ": ", msg);
  CHECK(s == code);
  CHECK(m == nullptr);
  for (auto &n : needles) CHECK(msg.find(n) != std::string::npos);
  dsrt_model_free(m);
}

const std::string kDown = "model.layers.1.mlp.experts.3.down_proj.weight";
const std::string kScale = kDown + "_scale_inv";

}  // namespace

TEST_CASE("a good checkpoint loads") {
  fs::path d = copy_of();
  Model m(d.string());
  CHECK(m.vocab() == 512);
}

TEST_CASE("missing files") {
  fs::path d = copy_of();
  fs::remove(d / "config.json");
  expect_load_error(d, DSRT_ERR_IO, {"config.json"});
  d = copy_of();
  fs::path shard = shard_of(d, kDown);
  fs::remove(shard);
  expect_load_error(d, DSRT_ERR_IO, {shard.filename().string(), "missing"});
  expect_load_error(fresh_dir("empty"), DSRT_ERR_IO, {"config.json"});
}

TEST_CASE("a config missing a field") {
  fs::path d = copy_of();
  json c = json::parse(slurp(d / "config.json"));
  c.erase("kv_lora_rank");
  spit(d / "config.json", c.dump());
  expect_load_error(d, DSRT_ERR_FORMAT, {"config.json", "kv_lora_rank"});
}

TEST_CASE("a truncated shard") {
  fs::path d = copy_of();
  fs::path shard = shard_of(d, kDown);
  fs::resize_file(shard, fs::file_size(shard) - 1000);
  expect_load_error(d, DSRT_ERR_FORMAT, {shard.filename().string(), "outside the data section"});
  fs::resize_file(shard, 5);
  expect_load_error(d, DSRT_ERR_FORMAT, {shard.filename().string(), "too short"});
}

TEST_CASE("header offsets and lengths outside the file") {
  fs::path d = copy_of();
  fs::path shard = shard_of(d, kDown);
  Shard s = Shard::read(shard);
  s.header[kDown]["data_offsets"] = {uint64_t(1) << 40, (uint64_t(1) << 40) + 10};
  s.write(shard);
  expect_load_error(d, DSRT_ERR_FORMAT, {shard.filename().string(), kDown, "outside"});

  d = copy_of();
  shard = shard_of(d, kDown);
  std::string bytes = slurp(shard);
  uint64_t huge = uint64_t(1) << 50;
  std::memcpy(bytes.data(), &huge, 8);
  spit(shard, bytes);
  expect_load_error(d, DSRT_ERR_FORMAT, {shard.filename().string(), "header length"});

  d = copy_of();
  shard = shard_of(d, kDown);
  s = Shard::read(shard);
  auto off = s.header[kDown]["data_offsets"];
  s.header[kDown]["data_offsets"] = {off[0].get<uint64_t>() + 1, off[1].get<uint64_t>() + 1};  // overlaps its neighbour
  s.write(shard);
  expect_load_error(d, DSRT_ERR_FORMAT, {shard.filename().string(), kDown});
}

TEST_CASE("shapes: byte count, overflow and disagreement with the config") {
  fs::path d = copy_of();
  fs::path shard = shard_of(d, kDown);
  Shard s = Shard::read(shard);
  auto shape = s.header[kDown]["shape"];
  s.header[kDown]["shape"] = {shape[1], shape[0]};  // same bytes, transposed
  s.write(shard);
  expect_load_error(d, DSRT_ERR_FORMAT, {shard.filename().string(), kDown, "shape"});

  s.header[kDown]["shape"] = {uint64_t(1) << 40, uint64_t(1) << 40};  // element count overflows 64 bits
  s.write(shard);
  expect_load_error(d, DSRT_ERR_FORMAT, {kDown});

  s.header[kDown]["shape"] = {shape[0], 7};  // byte count disagrees with the offsets
  s.write(shard);
  expect_load_error(d, DSRT_ERR_FORMAT, {kDown, "bytes"});
}

TEST_CASE("dtypes: unknown, and not allowed for the tensor") {
  fs::path d = copy_of();
  fs::path shard = shard_of(d, kDown);
  Shard s = Shard::read(shard);
  s.header[kDown]["dtype"] = "F8_E5M2FNUZ";
  s.write(shard);
  expect_load_error(d, DSRT_ERR_FORMAT, {shard.filename().string(), kDown, "F8_E5M2FNUZ"});

  d = copy_of();
  const std::string norm = "model.layers.0.input_layernorm.weight";
  shard = shard_of(d, norm);
  s = Shard::read(shard);
  auto off = s.header[norm]["data_offsets"];
  s.header[norm]["dtype"] = "F8_E4M3";  // norms are never FP8; offsets halved to keep the byte count valid
  s.header[norm]["data_offsets"] = {off[0], off[0].get<uint64_t>() + (off[1].get<uint64_t>() - off[0].get<uint64_t>()) / 2};
  s.write(shard);
  expect_load_error(d, DSRT_ERR_FORMAT, {norm, "F8_E4M3"});
}

TEST_CASE("FP8 scales: NaN, Inf, zero, negative, missing, wrong shape") {
  for (float bad : {NAN, INFINITY, 0.0f, -0.5f}) {
    CAPTURE(bad);
    fs::path d = copy_of();
    fs::path shard = shard_of(d, kScale);
    Shard s = Shard::read(shard);
    uint64_t off = s.header[kScale]["data_offsets"][0].get<uint64_t>() + 4;  // block [1, 0] of [2, 1]
    std::memcpy(s.data.data() + off, &bad, 4);
    s.write(shard);
    expect_load_error(d, DSRT_ERR_FORMAT, {shard.filename().string(), kScale, "block [1, 0]"});
  }
  fs::path d = copy_of();
  fs::path shard = shard_of(d, kScale);
  Shard s = Shard::read(shard);
  s.header.erase(kScale);
  s.write(shard);
  json idx = json::parse(slurp(d / "model.safetensors.index.json"));
  idx["weight_map"].erase(kScale);
  spit(d / "model.safetensors.index.json", idx.dump());
  expect_load_error(d, DSRT_ERR_FORMAT, {kDown, kScale, "missing"});

  d = copy_of();
  shard = shard_of(d, kScale);
  s = Shard::read(shard);
  s.header[kScale]["shape"] = {1, 2};  // right byte count (2 x 1 blocks transposed), wrong shape
  s.write(shard);
  expect_load_error(d, DSRT_ERR_FORMAT, {kScale, "[1, 2]", "[2, 1]"});
}

TEST_CASE("index problems: a missing tensor, a tensor in the wrong shard, a duplicate, a bad name") {
  fs::path d = copy_of();
  fs::path shard = shard_of(d, kDown);
  Shard s = Shard::read(shard);
  s.header.erase(kDown);
  s.write(shard);
  expect_load_error(d, DSRT_ERR_FORMAT, {kDown});  // the index still lists it

  json idx = json::parse(slurp(d / "model.safetensors.index.json"));
  idx["weight_map"].erase(kDown);
  spit(d / "model.safetensors.index.json", idx.dump());
  expect_load_error(d, DSRT_ERR_FORMAT, {kDown, "missing"});

  d = copy_of();
  idx = json::parse(slurp(d / "model.safetensors.index.json"));
  idx["weight_map"]["model.norm.weight"] = "../../etc/passwd";
  spit(d / "model.safetensors.index.json", idx.dump());
  expect_load_error(d, DSRT_ERR_FORMAT, {"model.norm.weight"});

  d = copy_of();  // the same tensor in both shards
  fs::path other = shard_of(d, "model.norm.weight") == shard_of(d, kDown) ? shard_of(d, "lm_head.weight") : shard_of(d, "model.norm.weight");
  Shard a = Shard::read(shard_of(d, kDown)), b = Shard::read(other);
  b.header[kDown] = a.header[kDown];
  auto off = a.header[kDown]["data_offsets"];
  uint64_t len = off[1].get<uint64_t>() - off[0].get<uint64_t>();
  b.header[kDown]["data_offsets"] = {b.data.size(), b.data.size() + len};
  b.data += a.data.substr(off[0].get<uint64_t>(), len);
  b.write(other);
  expect_load_error(d, DSRT_ERR_FORMAT, {kDown, "both"});
}

TEST_CASE("unknown extra tensors are reported, not fatal") {
  fs::path d = copy_of();
  fs::path shard = shard_of(d, "model.norm.weight");
  Shard s = Shard::read(shard);
  s.header["model.extra.bias"] = {{"dtype", "F32"}, {"shape", {2}}, {"data_offsets", {s.data.size(), s.data.size() + 8}}};
  s.data += std::string(8, '\0');
  s.write(shard);
  json idx = json::parse(slurp(d / "model.safetensors.index.json"));
  idx["weight_map"]["model.extra.bias"] = shard.filename().string();
  spit(d / "model.safetensors.index.json", idx.dump());
  dsrt::LoadOptions lo;
  auto m = dsrt::Model::load(d.string(), lo);
  REQUIRE(m->w.unknown.size() == 1);
  CHECK(m->w.unknown[0] == "model.extra.bias");
}

TEST_CASE("a single model.safetensors without an index loads") {
  fs::path d = copy_of();
  Shard a = Shard::read(d / "model-00001-of-000002.safetensors"), b = Shard::read(d / "model-00002-of-000002.safetensors");
  for (auto it = b.header.begin(); it != b.header.end(); ++it) {
    if (it.key() == "__metadata__") continue;
    json t = it.value();
    t["data_offsets"] = {t["data_offsets"][0].get<uint64_t>() + a.data.size(), t["data_offsets"][1].get<uint64_t>() + a.data.size()};
    a.header[it.key()] = t;
  }
  a.data += b.data;
  fs::path single = fresh_dir("single");
  a.write(single / "model.safetensors");
  fs::copy_file(d / "config.json", single / "config.json");
  Model m(single.string());
  CHECK(m.vocab() == 512);
}

TEST_CASE("the MTP layer is recognised and loaded, or skipped on request") {
  dsrt::LoadOptions lo;
  auto m = dsrt::Model::load(tiny("v3-mini"), lo);
  CHECK(m->w.mtp.size() == 1);
  CHECK(m->w.mtp[0].index == 4);
  CHECK(m->w.mtp[0].eh_proj.cols == 2 * 512);
  CHECK(m->w.unknown.empty());
  lo.load_mtp = false;
  auto m2 = dsrt::Model::load(tiny("v3-mini"), lo);
  CHECK(m2->w.mtp.empty());
  CHECK(m2->w.unknown.empty());  // skipped on purpose, not unknown
}
