// Hostile and changing files (issue 16, items 3, 4, 6, 10, 11): sizes checked before allocating, non-regular
// files refused without blocking, contents never echoed, config ranges the math needs, a linear header
// parse, and shards that change under the loaded model.
#include <doctest/doctest.h>
#include <dlfcn.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <fstream>
#include <future>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include "core/file.h"
#include "core/memory.h"
#include "core/status.h"
#include "helpers.h"
#include "model/config.h"
#include "model/safetensors.h"

using namespace testing;
using json = nlohmann::json;

namespace {

// dsrt_model_load's status and message.
struct Load {
  dsrt_status code;
  std::string msg;
};
Load load(const fs::path &d, dsrt_model_params *p = nullptr) {
  dsrt_model *m = nullptr;
  dsrt_status s = dsrt_model_load(d.string().c_str(), p, &m);
  Load r{s, dsrt_last_error()};
  dsrt_model_free(m);
  return r;
}

// Runs a load that must not block; if it has not returned after 20 s (it blocked in open or read on a FIFO),
// a writer opens and closes the FIFO so the loader sees end-of-file and the suite still finishes, then fails.
Load load_beside_fifo(const fs::path &d, const fs::path &fifo, dsrt_model_params *p = nullptr) {
  auto f = std::async(std::launch::async, [&] { return load(d, p); });
  if (f.wait_for(std::chrono::seconds(20)) == std::future_status::timeout) {
    int w = ::open(fifo.c_str(), O_WRONLY | O_NONBLOCK);
    if (w >= 0) ::close(w);
    f.wait();
    FAIL("the loader blocked on the FIFO " << fifo);
  }
  return f.get();
}

int64_t rss_bytes() {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind("VmRSS:", 0) == 0) return std::stoll(line.substr(6)) * 1024;
  return -1;
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

// ---- item 3: out of memory, allocator

TEST_CASE("libdsrt leaves the host's operator new and malloc alone, and still allocates through mimalloc") {
  // Linked as a DT_NEEDED library, libmimalloc put its operator new in the process's global scope: the host's
  // `new` became mimalloc's, which aborts (SIGABRT) on out of memory instead of throwing std::bad_alloc.
  for (const char *sym : {"_Znwm", "_Znam", "malloc", "free"}) {
    void *p = dlsym(RTLD_DEFAULT, sym);
    REQUIRE(p != nullptr);
    Dl_info info;
    REQUIRE(dladdr(p, &info) != 0);
    INFO(sym, " resolves into ", info.dli_fname);
    CHECK(std::string(info.dli_fname).find("mimalloc") == std::string::npos);
  }
  CHECK(std::string(dsrt::host_allocator_name()) == "mimalloc");
  // A failed huge allocation is an exception the C API turns into DSRT_ERR_OUT_OF_MEMORY, not an abort.
  CHECK_THROWS_AS(dsrt::MiAllocator<float>().allocate(size_t(1) << 60), std::bad_alloc);
}

TEST_CASE("freed host memory goes back to the system when dsrt releases it (the last model's free does)") {
  // Before: RSS stayed ~1 GB after freeing 10k sessions, the engine and the model: mimalloc keeps freed pages
  // for reuse until asked. Many small blocks, as KV pages and scratch are.
  const int64_t before = rss_bytes();
  std::vector<void *> blocks;
  size_t failed = 0;
  for (int i = 0; i < 65536; i++) {  // 256 MiB in 4 KiB blocks
    void *p = mi_malloc_aligned(4096, 64);
    if (!p) {
      failed++;
      continue;
    }
    std::memset(p, 1, 4096);
    blocks.push_back(p);
  }
  REQUIRE(failed == 0);
  CHECK(rss_bytes() > before + (int64_t(200) << 20));
  for (void *p : blocks) mi_free(p);
  dsrt::release_host_memory();
  CHECK(rss_bytes() < before + (int64_t(64) << 20));
}

TEST_CASE("vocab_size is checked against the embedding table before the tokenizer sizes its tables by it") {
  // Before: vocab_size 2^30 aborted the host, 1e8 with 512-row weights cost 3.67 GB before the shape check.
  for (int64_t vocab : {int64_t(1) << 30, int64_t(100000000)}) {
    fs::path d = copy_of();
    json c = json::parse(slurp(d / "config.json"));
    c["vocab_size"] = vocab;
    spit(d / "config.json", c.dump());
    const auto t0 = std::chrono::steady_clock::now();
    Load r = load(d);
    INFO(r.msg);
    CHECK(r.code == DSRT_ERR_FORMAT);
    CHECK(r.msg.find("embed_tokens") != std::string::npos);
    CHECK(r.msg.find(std::to_string(vocab)) != std::string::npos);
    CHECK(seconds_since(t0) < 5.0);
    // Tokenizer-only loads have no embedding: the padding beyond what the tokenizer file can define is capped.
    dsrt_model_params p;
    dsrt_model_params_init(&p, sizeof p);
    p.tokenizer_only = 1;
    Load t = load(d, &p);
    INFO(t.msg);
    CHECK(t.code == DSRT_ERR_FORMAT);
    CHECK(t.msg.find("padding ids") != std::string::npos);
  }
}

// ---- item 4: non-regular files

TEST_CASE("config.json pointing at /dev/zero or /dev/urandom is refused at once, not read until out of memory") {
  for (const char *dev : {"/dev/zero", "/dev/urandom"}) {
    fs::path d = copy_of();
    fs::remove(d / "config.json");
    fs::create_symlink(dev, d / "config.json");
    Load r = load(d);
    INFO(dev, ": ", r.msg);
    CHECK(r.code == DSRT_ERR_IO);
    CHECK(r.msg.find("not a regular file") != std::string::npos);
  }
}

TEST_CASE("a FIFO in place of any checkpoint file is refused without blocking") {
  for (const char *name : {"config.json", "model.safetensors.index.json", "model-00001-of-000002.safetensors",
                           "tokenizer.json", "tokenizer_config.json", "generation_config.json"}) {
    fs::path d = copy_of();
    fs::remove(d / name);
    REQUIRE(::mkfifo((d / name).c_str(), 0600) == 0);
    Load r = load_beside_fifo(d, d / name);
    INFO(name, ": ", r.msg);
    CHECK(r.code != DSRT_OK);
    CHECK(r.msg.find(name) != std::string::npos);
  }
  // A file read directly is checked the same way.
  fs::path fifo = fresh_dir("fifo") / "f";
  REQUIRE(::mkfifo(fifo.c_str(), 0600) == 0);
  CHECK_THROWS_WITH(dsrt::read_text_file(fifo.string(), 100), doctest::Contains("not a regular file"));
  CHECK_THROWS_WITH(dsrt::SafetensorsFile(fifo.string()), doctest::Contains("not a regular file"));
}

TEST_CASE("cancel and progress reach the loader before any file is read and between the text files") {
  fs::path d = copy_of();
  fs::remove(d / "config.json");
  REQUIRE(::mkfifo((d / "config.json").c_str(), 0600) == 0);
  dsrt_cancel *c;
  CHECK_OK(dsrt_cancel_create(&c));
  dsrt_cancel_trigger(c);
  dsrt_model_params p;
  dsrt_model_params_init(&p, sizeof p);
  p.cancel = c;
  Load r = load_beside_fifo(d, d / "config.json", &p);
  CHECK(r.code == DSRT_ERR_CANCELLED);
  dsrt_cancel_free(c);

  // The text files (tokenizer, generation config) are the last stage; a callback can stop the load there.
  struct Seen {
    int text_calls = 0;
  } seen;
  auto cb = [](int32_t stage, uint64_t done, uint64_t total, void *user) -> int32_t {
    if (stage == DSRT_LOAD_STAGE_TEXT) static_cast<Seen *>(user)->text_calls++;
    return stage == DSRT_LOAD_STAGE_TEXT && done == 1 && total == 2;  // stop after the tokenizer
  };
  dsrt_model_params q;
  dsrt_model_params_init(&q, sizeof q);
  q.progress_fn = cb;
  q.progress_user_data = &seen;
  Load s = load(tiny("no-qlora"), &q);
  CHECK(s.code == DSRT_ERR_CANCELLED);
  CHECK(seen.text_calls == 2);
}

TEST_CASE("each small file kind has a size cap") {
  fs::path d = copy_of();
  // A sparse config.json of 2 MiB (the cap is 1 MiB): refused from its size, not read.
  std::string cfg = slurp(d / "config.json");
  spit(d / "config.json", cfg);
  REQUIRE(::truncate((d / "config.json").c_str(), off_t(2) << 20) == 0);
  Load r = load(d);
  INFO(r.msg);
  CHECK(r.code == DSRT_ERR_FORMAT);
  CHECK(r.msg.find("allowed") != std::string::npos);
  // The per-call cap holds for files read through the small-file reader.
  fs::path f = fresh_dir("cap") / "f.json";
  spit(f, std::string(1000, ' ') + "{}");
  CHECK_THROWS_WITH(dsrt::read_text_file(f.string(), 999), doctest::Contains("allowed"));
  CHECK(dsrt::read_text_file(f.string(), 1002).size() == 1002);
  CHECK(dsrt::kConfigFileMax == (uint64_t(1) << 20));
  CHECK(dsrt::kShardHeaderMax == (uint64_t(100) << 20));
}

TEST_CASE("a shard or config symlinked to a foreign file is refused without echoing its contents") {
  fs::path secret = fresh_dir("secret") / "passwd";
  const std::string secret_text = "root:x:0:0:hunter2:/root:/bin/bash\n";
  spit(secret, secret_text);
  uint64_t first8 = 0;
  std::memcpy(&first8, secret_text.data(), 8);

  fs::path d = copy_of();
  const std::string shard = "model-00001-of-000002.safetensors";
  fs::remove(d / shard);
  fs::create_symlink(secret, d / shard);
  Load r = load(d);
  INFO(r.msg);
  CHECK(r.code == DSRT_ERR_FORMAT);
  CHECK(r.msg.find(shard) != std::string::npos);
  CHECK(r.msg.find(std::to_string(first8)) == std::string::npos);  // before: "header length 3471766442030158..."
  CHECK(r.msg.find("hunter2") == std::string::npos);

  fs::path e = copy_of();
  fs::remove(e / "config.json");
  fs::create_symlink(secret, e / "config.json");
  Load c = load(e);
  INFO(c.msg);
  CHECK(c.code == DSRT_ERR_FORMAT);
  CHECK(c.msg.find("hunter2") == std::string::npos);
  CHECK(c.msg.find("x:0:0") == std::string::npos);

  // Symlinks to regular files are fine (Hugging Face caches are made of them).
  fs::path h = copy_of();
  fs::path blobs = fresh_dir("blobs");
  for (auto &ent : fs::directory_iterator(h)) {
    fs::rename(ent.path(), blobs / ent.path().filename());
    fs::create_symlink(blobs / ent.path().filename(), ent.path());
  }
  Load ok = load(h);
  INFO(ok.msg);
  CHECK(ok.code == DSRT_OK);
}

// ---- item 6: config numeric ranges

TEST_CASE("config values outside the ranges the math needs are errors naming the field and the value") {
  const json base = json::parse(slurp(fs::path(tiny("no-qlora")) / "config.json"));
  json yarn = base;
  yarn["rope_scaling"] = {{"type", "yarn"}, {"factor", 40}, {"original_max_position_embeddings", 4096},
                          {"beta_fast", 32}, {"beta_slow", 1}, {"mscale", 1.0}, {"mscale_all_dim", 1.0}};
  CHECK_NOTHROW(dsrt::parse_model_config(yarn.dump(), "cfg"));
  struct Case {
    const char *key;
    json value;
    const char *field, *shown;
  };
  // Before: beta_fast 0 or negative betas loaded fine and every logit was NaN (greedy emitted token 0).
  const Case cases[] = {
      {"beta_fast", 0, "rope_scaling.beta_fast", "is 0"},
      {"beta_fast", -2, "rope_scaling.beta_fast", "is -2"},
      {"beta_slow", -1, "rope_scaling.beta_slow", "is -1"},
      {"beta_slow", 0, "rope_scaling.beta_slow", "is 0"},
      {"beta_slow", 64, "rope_scaling.beta_fast", "is 32"},  // beta_fast below beta_slow
      {"factor", 1e39, "rope_scaling.factor", "is inf"},
      {"mscale_all_dim", -10, "rope_scaling.mscale_all_dim", "is -10"},  // 0.1 * -10 * ln 40 + 1 < 0
      {"mscale", 1e39, "rope_scaling.mscale", "is inf"},
      {"original_max_position_embeddings", 0, "original_max_position_embeddings", "is 0"},
  };
  for (const Case &k : cases) {
    json j = yarn;
    j["rope_scaling"][k.key] = k.value;
    INFO(k.key, " = ", k.value.dump());
    try {
      dsrt::parse_model_config(j.dump(), "cfg");
      FAIL("accepted");
    } catch (const dsrt::Error &e) {
      INFO(e.what());
      CHECK(e.code() == DSRT_ERR_FORMAT);
      CHECK(std::string(e.what()).find(k.field) != std::string::npos);
      CHECK(std::string(e.what()).find(k.shown) != std::string::npos);
    }
  }
  const Case top[] = {
      {"rope_theta", 1e39, "rope_theta", "is inf"},
      {"rope_theta", 0.5, "rope_theta", "is 0.5"},
      {"rms_norm_eps", 0, "rms_norm_eps", "is 0"},
      {"rms_norm_eps", -0.5, "rms_norm_eps", "is -0.5"},
      {"eos_token_id", 512, "eos_token_id", "is 512"},
      {"bos_token_id", -7, "bos_token_id", "is -7"},
  };
  for (const Case &k : top) {
    json j = base;
    j[k.key] = k.value;
    INFO(k.key, " = ", k.value.dump());
    try {
      dsrt::parse_model_config(j.dump(), "cfg");
      FAIL("accepted");
    } catch (const dsrt::Error &e) {
      INFO(e.what());
      CHECK(e.code() == DSRT_ERR_FORMAT);
      CHECK(std::string(e.what()).find(k.field) != std::string::npos);
      CHECK(std::string(e.what()).find(k.shown) != std::string::npos);
    }
  }
  // Kimi-K2 ships beta_fast == beta_slow == 1: a valid one-dim ramp, finite frequencies.
  json k2 = yarn;
  k2["rope_scaling"]["beta_fast"] = 1;
  k2["rope_scaling"]["beta_slow"] = 1;
  for (float f : dsrt::parse_model_config(k2.dump(), "k2").rope_inv_freq()) CHECK(std::isfinite(f));
}

// ---- item 10: linear header parse

TEST_CASE("a shard header listing 200,000 tensors parses in linear time") {
  // Before: nlohmann's callback parser rescanned the object per entry: 100,000 entries took 67-101 s,
  // 200,000 over 300 s. Linear: ~4 s in Release, ~19 s with ASan on a busy 2-core box; the bound leaves
  // room for slow CI machines and still fails a quadratic parse by a wide margin.
  const int n = 200000;
  std::string h = "{";
  for (int i = 0; i < n; i++)
    h += (i ? ",\"t" : "\"t") + std::to_string(i) + "\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[0,0]}";
  h += "}";
  fs::path p = fresh_dir("big-header") / "model.safetensors";
  uint64_t len = h.size();
  spit(p, std::string(reinterpret_cast<const char *>(&len), 8) + h);
  const auto t0 = std::chrono::steady_clock::now();
  dsrt::SafetensorsFile f(p.string());
  CHECK(f.tensors().size() == size_t(n));
  CHECK(seconds_since(t0) < 60.0);

  // Duplicates are still found, at any depth, and in the same linear pass.
  const std::string dup = h.substr(0, h.size() - 1) + ",\"t17\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[0,0]}}";
  const auto t1 = std::chrono::steady_clock::now();
  CHECK(dsrt::find_duplicate_key(dup.data(), dup.data() + dup.size()) == "t17");
  CHECK(seconds_since(t1) < 60.0);
  const std::string nested = R"({"a":{"dtype":"F32","dtype":"F16","shape":[0],"data_offsets":[0,0]}})";
  CHECK(dsrt::find_duplicate_key(nested.data(), nested.data() + nested.size()) == "dtype");
  const std::string fine = R"({"a":{"x":1},"b":{"x":1},"c":[{"x":1},{"x":2}]})";
  CHECK(dsrt::find_duplicate_key(fine.data(), fine.data() + fine.size()).empty());
  len = dup.size();
  spit(p, std::string(reinterpret_cast<const char *>(&len), 8) + dup);
  CHECK_THROWS_WITH(dsrt::SafetensorsFile(p.string()), doctest::Contains("t17 is listed twice"));
}

TEST_CASE("an index listing a tensor twice is an error") {
  fs::path d = copy_of();
  std::string idx = slurp(d / "model.safetensors.index.json");
  const json j = json::parse(idx);
  const std::string first = j["weight_map"].begin().key();
  const size_t at = idx.find("\"weight_map\"");
  REQUIRE(at != std::string::npos);
  const size_t brace = idx.find('{', at);
  idx.insert(brace + 1, "\"" + first + "\": \"model-00002-of-000002.safetensors\",");
  spit(d / "model.safetensors.index.json", idx);
  Load r = load(d);
  INFO(r.msg);
  CHECK(r.code == DSRT_ERR_FORMAT);
  CHECK(r.msg.find(first + " is listed twice") != std::string::npos);
}

// ---- item 11: files changing under the mapping

TEST_CASE("verify_unchanged names a shard that was written, truncated or replaced since load") {
  const std::string shard = "model-00002-of-000002.safetensors";
  auto expect_changed = [&](auto &&change, const char *what) {
    fs::path d = copy_of();
    dsrt::Checkpoint ck(d.string());
    CHECK_NOTHROW(ck.verify_unchanged());
    change(d / shard);
    INFO(what);
    try {
      ck.verify_unchanged();
      FAIL("not detected");
    } catch (const dsrt::Error &e) {
      INFO(e.what());
      CHECK(e.code() == DSRT_ERR_IO);
      CHECK(std::string(e.what()).find(shard) != std::string::npos);
      CHECK(std::string(e.what()).find("use_mmap = 0") != std::string::npos);
    }
  };
  expect_changed([](const fs::path &p) { REQUIRE(::truncate(p.c_str(), 4096) == 0); }, "truncated");
  expect_changed(
      [](const fs::path &p) {  // overwritten in place: same size, same inode
        int fd = ::open(p.c_str(), O_WRONLY);
        REQUIRE(fd >= 0);
        const char junk[4] = {0x7f, 0x7f, 0x7f, 0x7f};
        REQUIRE(::pwrite(fd, junk, 4, 4096) == 4);
        ::close(fd);
      },
      "overwritten");
  expect_changed(
      [](const fs::path &p) {  // replaced by a new file of the same size (rename over it)
        fs::path t = p.string() + ".new";
        fs::copy_file(p, t);
        fs::rename(t, p);
      },
      "replaced");
  expect_changed([](const fs::path &p) { fs::remove(p); }, "deleted");
}

TEST_CASE("use_mmap = 0 copies the weights: the model keeps working after its shards are truncated") {
  fs::path d = copy_of();
  Model mapped(tiny("no-qlora"));
  dsrt_model_params p;
  dsrt_model_params_init(&p, sizeof p);
  CHECK(p.use_mmap == 1);
  p.use_mmap = 0;
  p.n_threads = 2;
  dsrt_model *copied = nullptr;
  CHECK_OK(dsrt_model_load(d.string().c_str(), &p, &copied));
  for (auto &e : fs::directory_iterator(d))
    if (e.path().extension() == ".safetensors") REQUIRE(::truncate(e.path().c_str(), 0) == 0);
  auto greedy = [](dsrt_model *m) {
    dsrt_engine *e = nullptr;
    CHECK_OK(dsrt_engine_create(m, nullptr, &e));
    dsrt_session *s = nullptr;
    CHECK_OK(dsrt_session_create(e, nullptr, &s));
    std::vector<int32_t> out, prompt = prompt_tokens(512, 6);
    CHECK_OK(dsrt_session_append_tokens(s, prompt.data(), prompt.size()));
    for (int i = 0; i < 4; i++) {
      int32_t t;
      CHECK_OK(dsrt_session_eval(s, nullptr));
      CHECK_OK(dsrt_session_sample(s, nullptr, &t));
      CHECK_OK(dsrt_session_append_tokens(s, &t, 1));
      out.push_back(t);
    }
    dsrt_session_free(s);
    dsrt_engine_free(e);
    return out;
  };
  CHECK(greedy(copied) == greedy(mapped.m));
  dsrt_model_free(copied);

  // The checkpoint itself: copied bytes equal the file's, and a copy has nothing to verify.
  fs::path d2 = copy_of();
  dsrt::Checkpoint mapped_ck(d2.string()), copied_ck(d2.string(), nullptr, nullptr, dsrt::ShardAccess::Copy);
  REQUIRE(mapped_ck.all().size() == copied_ck.all().size());
  for (auto &[name, t] : mapped_ck.all()) {
    const dsrt::TensorInfo *c = copied_ck.find(name);
    REQUIRE(c != nullptr);
    CHECK(std::memcmp(c->data, t->data, t->nbytes) == 0);
  }
  for (auto &e : fs::directory_iterator(d2))
    if (e.path().extension() == ".safetensors") REQUIRE(::truncate(e.path().c_str(), 0) == 0);
  CHECK_NOTHROW(copied_ck.verify_unchanged());
  CHECK_THROWS_AS(mapped_ck.verify_unchanged(), dsrt::Error);
}

TEST_CASE("dsrt generate --no-mmap gives the same tokens as the mapped default") {
  auto run = [](const std::string &args) {
    std::string cmd = std::string(DSRT_CLI_PATH) + " generate --model " + tiny("no-qlora") +
                      " --tokens 0,5,17 -n 4 --threads 2 " + args + " 2>/dev/null";
    FILE *p = popen(cmd.c_str(), "r");
    REQUIRE(p != nullptr);
    std::string out;
    char buf[256];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
    CHECK(pclose(p) == 0);
    return out;
  };
  const std::string mapped = run(""), copied = run("--no-mmap");
  CHECK(!mapped.empty());
  CHECK(copied == mapped);
}
