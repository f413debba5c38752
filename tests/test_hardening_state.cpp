// Session state blobs under attack (issue 16, item 5): a blob is checked whole (checksum), tied to every
// weight byte (model identity), read with aligned copies, its lengths and values validated, and a rejected
// blob leaves the session exactly as it was. docs/reliability-round2-state.md.
#include <doctest/doctest.h>

#include <cstdlib>
#include <cstring>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <thread>

#include "core/hash.h"
#include "helpers.h"
#include "model/identity.h"
#include "model/model.h"

using namespace testing;

namespace {

std::string save(dsrt_session *s) {
  void *b = nullptr;
  size_t n = 0;
  CHECK_OK(dsrt_session_state_save(s, &b, &n));
  std::string out(static_cast<char *>(b), n);
  dsrt_free(b);
  return out;
}

dsrt_status load(dsrt_session *s, const std::string &blob) { return dsrt_session_state_load(s, blob.data(), blob.size()); }

// The v2 layout (runtime/engine/session_state.cpp), taken apart and put back together with a fresh size and
// checksum: what a forger who knows the format can make.
struct Blob {
  std::string header;  // 56 bytes: magic .. vocabulary size
  std::string fingerprint, tokens, pending, messages, tools, rng, logits, kv;
  int64_t rows = 0;

  static std::string field(const std::string &b, size_t &pos) {
    uint64_t n;
    std::memcpy(&n, b.data() + pos, 8);
    REQUIRE(pos + 8 + n <= b.size());
    std::string v = b.substr(pos + 8, size_t(n));
    pos += 8 + size_t(n);
    return v;
  }
  explicit Blob(const std::string &b) {
    REQUIRE(b.size() >= 64);
    header = b.substr(0, 56);
    size_t pos = 56;
    fingerprint = field(b, pos);
    tokens = field(b, pos);
    pending = field(b, pos);
    messages = field(b, pos);
    tools = field(b, pos);
    rng = b.substr(pos, 32);
    pos += 32;
    std::memcpy(&rows, b.data() + pos, 8);
    pos += 8;
    logits = field(b, pos);
    kv = field(b, pos);
    REQUIRE(pos + 8 == b.size());
  }
  std::string str() const {
    std::string o = header;
    auto put = [&](const std::string &f) {
      uint64_t n = f.size();
      o.append(reinterpret_cast<const char *>(&n), 8);
      o += f;
    };
    put(fingerprint);
    put(tokens);
    put(pending);
    put(messages);
    put(tools);
    o += rng;
    o.append(reinterpret_cast<const char *>(&rows), 8);
    put(logits);
    put(kv);
    const uint64_t total = o.size() + 8;
    std::memcpy(o.data() + 16, &total, 8);
    const uint64_t sum = dsrt::hash64(o.data(), o.size());
    o.append(reinterpret_cast<const char *>(&sum), 8);
    return o;
  }
  void set_float(std::string &f, size_t i, float v) {
    REQUIRE((i + 1) * 4 <= f.size());
    std::memcpy(f.data() + i * 4, &v, 4);
  }
};

// Everything a caller can see of a session, to compare before and after a rejected load.
struct Snapshot {
  std::vector<int32_t> tokens;
  std::vector<float> logits;
  size_t rows = 0;
  dsrt_session_stats st{};
  bool operator==(const Snapshot &o) const {
    return tokens == o.tokens && logits.size() == o.logits.size() &&
           (logits.empty() || std::memcmp(logits.data(), o.logits.data(), logits.size() * 4) == 0) &&
           rows == o.rows && st.n_tokens == o.st.n_tokens && st.n_pending == o.st.n_pending &&
           st.n_pages == o.st.n_pages && st.n_evaluated == o.st.n_evaluated && st.prompt_tokens == o.st.prompt_tokens &&
           st.reused_tokens == o.st.reused_tokens && st.generated_tokens == o.st.generated_tokens;
  }
};

Snapshot snap(dsrt_session *s) {
  Snapshot x;
  const int32_t *t;
  size_t n;
  CHECK_OK(dsrt_session_tokens(s, &t, &n));
  x.tokens.assign(t, t + n);
  const float *l;
  size_t v;
  if (dsrt_session_logits(s, &l, &x.rows, &v) == DSRT_OK) x.logits.assign(l, l + x.rows * v);
  x.st.struct_size = sizeof x.st;
  CHECK_OK(dsrt_session_stats_get(s, &x.st));
  return x;
}

// A chat session after one generated turn. The turn's last token is evaluated too: left pending, any other
// session's step could take it at any moment, and two sessions could not be compared.
void chat_turn(Model &m, dsrt_session *s, const std::string &user, int n_new = 4) {
  nlohmann::json msgs = nlohmann::json::array({{{"role", "user"}, {"content", user}}});
  CHECK_OK(dsrt_session_append_chat(s, msgs.dump().c_str(), nullptr, DSRT_CHAT_ADD_GENERATION_PROMPT));
  auto p = greedy_params(m, n_new);
  p.ignore_eos = 1;
  pull(s, &p);
  CHECK_OK(dsrt_session_eval(s, nullptr));
}

// A sampled turn (the session's own random state decides every token).
Turn sampled(Model &m, dsrt_session *s, int n) {
  dsrt_gen_params p;
  dsrt_gen_params_init(&p, sizeof p, m.m);
  p.temperature = 1.5f;
  p.top_k = 0;
  p.top_p = 1.0f;
  p.max_new_tokens = n;
  p.ignore_eos = 1;
  return pull(s, &p);
}

// A copy of a tiny checkpoint with one byte of one weight changed, far past the first 16 bytes the old
// fingerprint looked at: the low byte of a BF16 embedding element in the middle (its lowest mantissa bit).
std::string patched_copy(const std::string &src) {
  namespace fs = std::filesystem;
  fs::path dst = fresh_dir("patched");
  for (auto &e : fs::directory_iterator(src)) fs::copy(e.path(), dst / e.path().filename());
  for (auto &e : fs::directory_iterator(dst)) {
    if (e.path().extension() != ".safetensors") continue;
    std::fstream f(e.path(), std::ios::in | std::ios::out | std::ios::binary);
    uint64_t hlen = 0;
    f.read(reinterpret_cast<char *>(&hlen), 8);
    std::string h(size_t(hlen), '\0');
    f.read(h.data(), std::streamsize(hlen));
    auto j = nlohmann::json::parse(h);
    if (!j.contains("model.embed_tokens.weight")) continue;
    auto &t = j["model.embed_tokens.weight"];
    REQUIRE(t["dtype"] == "BF16");
    const uint64_t b = t["data_offsets"][0], end = t["data_offsets"][1];
    const uint64_t at = 8 + hlen + b + ((end - b) / 2 & ~uint64_t(1));
    f.seekg(std::streamoff(at));
    char c;
    f.read(&c, 1);
    c ^= 1;
    f.seekp(std::streamoff(at));
    f.write(&c, 1);
    REQUIRE(f.good());
    return dst.string();
  }
  FAIL("no shard holds model.embed_tokens.weight");
  return {};
}

}  // namespace

TEST_CASE("hash64 is XXH64: known answers of the reference library, one changed byte changes it") {
  unsigned char buf[256];
  for (int i = 0; i < 256; i++) buf[i] = static_cast<unsigned char>(i * 31 + 7);
  // Computed with libxxhash 0.8 (XXH64(buf, len, seed)) for seeds 0 and 0x9E3779B97F4A7C15: every tail path
  // (bytes, 4, 8, the 32-byte stripes) is covered.
  struct Known {
    size_t len;
    uint64_t seed0, seed1;
  } known[] = {
      {0, 0xEF46DB3751D8E999ULL, 0xC4349FC93C010000ULL},   {1, 0xA96C7F0CE858BBB7ULL, 0x585882422A6165E7ULL},
      {3, 0x56E6957632A487F9ULL, 0x5ACB303E78133C22ULL},   {4, 0xC60D15B1E3FF8F04ULL, 0x7D51D5E2461732B3ULL},
      {7, 0xAFBEFC3D6C6F9A8EULL, 0x2CE9ADEC2B2C8104ULL},   {8, 0x3DA5C7AA269683E0ULL, 0x758848F033FA76A2ULL},
      {31, 0x4A74F3A1A39AD4A1ULL, 0x8137041F5AF88413ULL},  {32, 0x8D57D6A4671CC43DULL, 0x184EBCF3745CD46CULL},
      {33, 0x62C9FD21ED857664ULL, 0x52FAC3C981F3CC2EULL},  {63, 0x5C320A0D2707057FULL, 0x64EF99A2E94CC7BDULL},
      {100, 0xEFA0AD2D3E70C151ULL, 0xBC7AB33BE7528C18ULL}, {256, 0x7C1FF7B1D57C10D5ULL, 0xAABAF17C38DF7868ULL},
  };
  for (const Known &k : known) {
    INFO("len ", k.len);
    CHECK(dsrt::hash64(buf, k.len) == k.seed0);
    CHECK(dsrt::hash64(buf, k.len, 0x9E3779B97F4A7C15ULL) == k.seed1);
  }
  CHECK(dsrt::hash64("abc", 3) == 0x44BC2CF5AD770999ULL);
  // Unaligned input hashes the same as aligned.
  alignas(8) unsigned char shifted[260];
  std::memcpy(shifted + 3, buf, 256);
  CHECK(dsrt::hash64(shifted + 3, 256) == 0x7C1FF7B1D57C10D5ULL);
  // Every single-bit change of a 256-byte buffer changes the hash.
  const uint64_t h = dsrt::hash64(buf, 256);
  int same = 0;
  for (int i = 0; i < 256; i++)
    for (int bit = 0; bit < 8; bit++) {
      buf[i] ^= static_cast<unsigned char>(1 << bit);
      same += dsrt::hash64(buf, 256) == h;
      buf[i] ^= static_cast<unsigned char>(1 << bit);
    }
  CHECK(same == 0);
}

TEST_CASE("model identity covers every weight byte: one changed byte changes it, the cheap fingerprint does not see it") {
  const std::string a_dir = tiny("no-qlora"), b_dir = patched_copy(a_dir);
  dsrt::LoadOptions o;
  auto a = dsrt::Model::load(a_dir, o), b = dsrt::Model::load(b_dir, o), a2 = dsrt::Model::load(a_dir, o);
  CHECK(a->fingerprint == b->fingerprint);  // what let such a blob through before
  // Concurrent first calls agree (one computes, the others wait for it).
  uint64_t got[4];
  std::vector<std::thread> th;
  for (int i = 0; i < 4; i++) th.emplace_back([&, i] { got[i] = dsrt::model_identity(*a); });
  for (auto &t : th) t.join();
  for (uint64_t g : got) CHECK(g == got[0]);
  CHECK(dsrt::model_identity(*a) == got[0]);
  CHECK(dsrt::model_identity(*a2) == got[0]);  // the same files, loaded again
  CHECK(dsrt::model_identity(*b) != got[0]);
  // A model loaded without its MTP layer has other weights bound: another identity.
  const std::string mtp_dir = tiny("partial-yarn");
  dsrt::LoadOptions no_mtp;
  no_mtp.load_mtp = false;
  CHECK(dsrt::model_identity(*dsrt::Model::load(mtp_dir, o)) != dsrt::model_identity(*dsrt::Model::load(mtp_dir, no_mtp)));
}

TEST_CASE("a blob saved with other weights (one byte differs) is refused with VERSION_MISMATCH") {
  const std::string a_dir = tiny("no-qlora"), b_dir = patched_copy(a_dir);
  Model ma(a_dir), mb(b_dir);
  Engine ea(ma), eb(mb);
  Session sa(ea), sb(eb);
  sa.append(prompt_tokens(ma.vocab(), 9));
  sa.eval();
  const std::string blob = save(sa.s);
  CHECK(load(sb.s, blob) == DSRT_ERR_VERSION_MISMATCH);
  CHECK(std::string(dsrt_last_error()).find("different weights") != std::string::npos);
  CHECK(snap(sb.s).tokens.empty());
  Session sa2(ea);
  CHECK_OK(load(sa2.s, blob));  // the model it came from takes it
  // MTP loaded or not: the cache has another number of layers.
  Model with(tiny("partial-yarn"));
  dsrt_model_params p;
  dsrt_model_params_init(&p, sizeof p);
  p.load_mtp = 0;
  dsrt_model *without = nullptr;
  CHECK_OK(dsrt_model_load(tiny("partial-yarn").c_str(), &p, &without));
  {
    Engine ew(with);
    Session sw(ew);
    sw.append(prompt_tokens(with.vocab(), 5));
    sw.eval();
    const std::string b2 = save(sw.s);
    dsrt_engine *e2 = nullptr;
    CHECK_OK(dsrt_engine_create(without, nullptr, &e2));
    dsrt_session *s2 = nullptr;
    CHECK_OK(dsrt_session_create(e2, nullptr, &s2));
    CHECK(load(s2, b2) == DSRT_ERR_VERSION_MISMATCH);
    dsrt_session_free(s2);
    dsrt_engine_free(e2);
  }
  dsrt_model_free(without);
}

TEST_CASE("chat-session blobs whose fields start at every offset mod 8 load with aligned copies and round-trip") {
  // Before: the KV and logits were read as floats straight from the blob, at an offset that follows the
  // messages' length (UBSan: misaligned load). Messages of 1..8 characters move them through every residue.
  Model m(tiny("no-qlora"));
  Engine e(m);
  for (int len = 1; len <= 8; len++) {
    INFO("message length ", len);
    Session a(e, false, 7);
    chat_turn(m, a.s, std::string(size_t(len), 'a' + char(len)));
    const std::string blob = save(a.s);
    const Snapshot before = snap(a.s);
    Session b(e, false, 99);
    CHECK_OK(load(b.s, blob));
    CHECK(snap(b.s).tokens == before.tokens);
    CHECK(snap(b.s).logits == before.logits);
    // And the blob read from an odd address of the caller's memory.
    std::string shifted = "x" + blob;
    Session c(e);
    CHECK_OK(dsrt_session_state_load(c.s, shifted.data() + 1, blob.size()));
    CHECK(snap(c.s).logits == before.logits);
    // The conversation goes on the same way (messages, random state and cache restored).
    chat_turn(m, a.s, "more");
    chat_turn(m, b.s, "more");
    CHECK(snap(b.s).tokens == snap(a.s).tokens);
    CHECK(sampled(m, b.s, 6).tokens == sampled(m, a.s, 6).tokens);
  }
}

TEST_CASE("every single-byte change and every truncation of a blob is refused, and the session stays as it was") {
  Model m(tiny("no-qlora"));
  Engine e(m);
  Session a(e, false, 5);
  chat_turn(m, a.s, "hi", 2);
  const std::string blob = save(a.s);
  REQUIRE(blob.size() < 64 * 1024);  // bounded runtime: one load per byte
  Session t(e, false, 3);
  t.append(prompt_tokens(m.vocab(), 6));
  t.eval();
  const Snapshot before = snap(t.s);
  size_t accepted = 0;
  std::string bad = blob;
  for (size_t i = 0; i < blob.size(); i++) {
    for (unsigned char x : {0x01, 0x80, 0xFF}) {
      bad[i] = char(blob[i] ^ x);
      if (load(t.s, bad) == DSRT_OK) accepted++;
    }
    bad[i] = blob[i];
  }
  CHECK(accepted == 0);
  size_t cut_ok = 0;
  for (size_t cut = 0; cut < blob.size(); cut++) cut_ok += dsrt_session_state_load(t.s, blob.data(), cut) == DSRT_OK;
  CHECK(cut_ok == 0);
  std::string longer = blob + '\0';
  CHECK(load(t.s, longer) == DSRT_ERR_FORMAT);
  CHECK(snap(t.s) == before);
  CHECK_OK(load(t.s, blob));  // and the genuine one still loads
  CHECK(snap(t.s).tokens == snap(a.s).tokens);
}

TEST_CASE("forged blobs with a valid checksum: non-finite values, bad ids, sizes and random state are refused") {
  Model m(tiny("no-qlora"));
  Engine e(m);
  Session a(e, false, 11);
  chat_turn(m, a.s, "tell me", 3);
  const std::string blob = save(a.s);
  Session t(e);
  REQUIRE(Blob(blob).str() == blob);  // the forger's layout is the library's
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  auto refused = [&](const std::string &why, const std::string &b, dsrt_status want = DSRT_ERR_FORMAT) {
    INFO(why);
    CHECK(load(t.s, b) == want);
    CHECK(snap(t.s).tokens.empty());
  };
  for (float v : {nan, inf, -inf}) {
    Blob f(blob);
    f.set_float(f.kv, f.kv.size() / 8, v);
    refused("non-finite KV", f.str());
    Blob g(blob);
    g.set_float(g.logits, 17, v);
    refused("non-finite logit", g.str());
  }
  {
    Blob f(blob);
    int32_t id = m.vocab();
    std::memcpy(f.tokens.data() + 4, &id, 4);
    refused("token id = vocab", f.str());
    id = -1;
    Blob g(blob);
    g.pending = std::string(reinterpret_cast<char *>(&id), 4);
    refused("pending id -1", g.str());
  }
  {
    Blob f(blob);
    f.rng.assign(32, '\0');
    refused("all-zero random state", f.str());
  }
  {
    Blob f(blob);
    f.rows = int64_t(f.tokens.size() / 4) + 1;
    refused("more logits rows than tokens", f.str());
    f.rows = -1;
    refused("negative logits rows", f.str());
    Blob g(blob);
    g.rows = 2;  // rows say 2, the logits field holds 1
    refused("rows and logits disagree", g.str());
    Blob h(blob);
    h.kv.resize(h.kv.size() - 4);
    refused("KV one value short", h.str());
    Blob k(blob);
    k.tokens += std::string(4, '\0');  // one token more than the KV holds
    refused("a token without its KV", k.str());
    Blob l(blob);
    l.tokens.resize(l.tokens.size() - 2);
    refused("a partial token id", l.str());
  }
  {
    Blob f(blob);
    f.header[12] = 1;
    refused("reserved field", f.str());
    Blob g(blob);
    g.header[32] ^= 1;  // cache layers
    refused("other cache geometry", g.str(), DSRT_ERR_VERSION_MISMATCH);
    Blob h(blob);
    h.header[24] ^= 1;  // model identity
    refused("other model identity", h.str(), DSRT_ERR_VERSION_MISMATCH);
    Blob k(blob);
    k.fingerprint[0] ^= 1;
    refused("other fingerprint", k.str(), DSRT_ERR_VERSION_MISMATCH);
    Blob l(blob);
    l.header[8] = 1;  // a format-1 header
    refused("format 1", l.str(), DSRT_ERR_VERSION_MISMATCH);
  }
  {
    Blob f(blob);
    f.messages = R"({"role":"user"})";
    refused("messages not an array", f.str());
    f.messages = R"([{"content":"x"}])";
    refused("a message without a role", f.str());
    f.messages = R"([{"role":"user","content":"x"})";
    refused("messages cut short", f.str());
  }
  // A session larger than this session's context.
  {
    Session small(e, false, 0, 4);
    CHECK(load(small.s, blob) == DSRT_ERR_CONTEXT_FULL);
    CHECK(snap(small.s).tokens.empty());
  }
}

TEST_CASE("forged messages or tools nested 200,000 deep are refused; the session appends and renders afterwards") {
  // Before: accepted, then the next append copied the conversation recursively and overflowed the stack.
  Model m(tiny("no-qlora"));
  Engine e(m);
  Session a(e);
  chat_turn(m, a.s, "hello", 2);
  const std::string blob = save(a.s);
  Session t(e);
  const size_t deep = 200000;
  {
    Blob f(blob);
    f.messages = R"([{"role":"user","content":)" + std::string(deep, '[') + std::string(deep, ']') + "}]";
    CHECK(load(t.s, f.str()) == DSRT_ERR_FORMAT);
    CHECK(std::string(dsrt_last_error()).find("deeper than") != std::string::npos);
  }
  {
    Blob f(blob);
    f.tools = std::string(deep, '{');  // not even valid: the depth bound holds before any parse
    CHECK(load(t.s, f.str()) == DSRT_ERR_FORMAT);
    Blob g(blob);
    g.messages = R"([{"role":"user","content":")" + std::string(deep, '[') + R"("}])";  // brackets in a string
    CHECK_OK(load(t.s, g.str()));
  }
  // Depth 129 (one past the bound) is refused, depth 128 is taken.
  {
    Blob f(blob);
    f.messages = "[{\"role\":\"user\",\"x\":" + std::string(126, '[') + std::string(126, ']') + "}]";  // 128 deep
    CHECK_OK(load(t.s, f.str()));
    f.messages = "[{\"role\":\"user\",\"x\":" + std::string(127, '[') + std::string(127, ']') + "}]";  // 129 deep
    CHECK(load(t.s, f.str()) == DSRT_ERR_FORMAT);
  }
  CHECK_OK(load(t.s, blob));
  chat_turn(m, t.s, "and again", 2);
  CHECK(snap(t.s).tokens.size() > Blob(blob).tokens.size() / 4);
}

TEST_CASE("a rejected load leaves tokens, logits, stats, conversation and random state exactly as they were") {
  Model m(tiny("no-qlora"));
  Engine e(m);
  const std::string other_blob = [&] {
    Model o(tiny("partial-yarn"));
    Engine oe(o);
    Session os(oe);
    os.append(prompt_tokens(o.vocab(), 5));
    os.eval();
    return save(os.s);
  }();
  // Two sessions with the same history and seed: one takes every bad blob, the other none.
  Session a(e, false, 42), b(e, false, 42);
  for (dsrt_session *s : {a.s, b.s}) {
    chat_turn(m, s, "first question", 3);
    chat_turn(m, s, "second", 3);
  }
  Session src(e, false, 8);
  chat_turn(m, src.s, "a different conversation entirely", 5);
  const std::string blob = save(src.s);
  const Snapshot before = snap(a.s);
  REQUIRE(before == snap(b.s));

  std::vector<std::pair<std::string, std::string>> bad;
  {
    std::string f = blob;
    f[f.size() / 2] ^= 0x10;
    bad.push_back({"flipped byte", f});
  }
  bad.push_back({"truncated", blob.substr(0, blob.size() - 1)});
  bad.push_back({"empty", std::string()});
  {
    Blob f(blob);
    f.set_float(f.kv, 3, std::numeric_limits<float>::quiet_NaN());
    bad.push_back({"NaN KV", f.str()});
  }
  {
    Blob f(blob);
    f.set_float(f.logits, 3, std::numeric_limits<float>::quiet_NaN());
    bad.push_back({"NaN logits", f.str()});
  }
  {
    Blob f(blob);
    f.messages = "[" + std::string(200000, '[') + std::string(200000, ']') + "]";
    bad.push_back({"deep messages", f.str()});
  }
  bad.push_back({"another model", other_blob});
  bad.push_back({"format 1 seed", slurp(std::string(DSRT_TEST_DATA) + "/../fuzz/corpus/session_state/tiny-after-one-turn.bin")});
  for (auto &[why, bb] : bad) {
    INFO(why);
    CHECK(load(a.s, bb) != DSRT_OK);
    CHECK(snap(a.s) == before);
  }
  // The same conversation goes on identically in both: messages (the render reuses the cache), random state.
  chat_turn(m, a.s, "third", 3);
  chat_turn(m, b.s, "third", 3);
  CHECK(snap(a.s) == snap(b.s));
  CHECK(sampled(m, a.s, 8).tokens == sampled(m, b.s, 8).tokens);
}

TEST_CASE("a genuine blob round-trips: generation after a load equals generation without save and load") {
  Model m(tiny("partial-yarn"));  // MTP layer loaded: its cache layer travels too
  Engine e(m);
  Session a(e, true, 21);  // logits_all: several logits rows
  a.append(prompt_tokens(m.vocab(), 12));
  a.eval();
  const std::string blob = save(a.s);
  const Snapshot sa = snap(a.s);
  CHECK(sa.rows == 12);
  // Into a fresh session and into one that already holds another state (its pages are replaced).
  Session b(e, false, 1), c(e, false, 2);
  c.append(prompt_tokens(m.vocab(), 70));
  c.eval();
  CHECK_OK(load(b.s, blob));
  CHECK_OK(load(c.s, blob));
  for (dsrt_session *s : {b.s, c.s}) {
    const Snapshot x = snap(s);
    CHECK(x.tokens == sa.tokens);
    CHECK(x.logits == sa.logits);
    CHECK(x.st.n_pages == sa.st.n_pages);
  }
  const Turn ta = sampled(m, a.s, 10), tb = sampled(m, b.s, 10), tc = sampled(m, c.s, 10);
  CHECK(tb.tokens == ta.tokens);
  CHECK(tc.tokens == ta.tokens);
  // An empty session's blob round-trips too.
  Session empty(e, false, 4), into(e, false, 9);
  CHECK_OK(load(into.s, save(empty.s)));
  CHECK(snap(into.s).tokens.empty());
}

TEST_CASE("a pool too small for both states: the load replaces the session's cache in place, or refuses and keeps it") {
  Model m(tiny("no-qlora"));
  Engine e(m, DSRT_ATTENTION_AUTO, 512, 128);  // two pages of 64 tokens
  Session a(e, false, 3);
  a.append(prompt_tokens(m.vocab(), 100));
  a.eval();
  const std::string blob = save(a.s);
  const Snapshot before = snap(a.s);
  CHECK(before.st.n_pages == 2);
  CHECK_OK(load(a.s, blob));  // no free page: in place
  CHECK(snap(a.s).tokens == before.tokens);
  CHECK(snap(a.s).logits == before.logits);
  CHECK(snap(a.s).st.n_pages == 2);
  // An empty session cannot take a two-page state while a holds both pages: refused.
  Session b(e);
  CHECK(load(b.s, blob) == DSRT_ERR_CONTEXT_FULL);
  CHECK(snap(b.s).tokens.empty());
  dsrt_session_reset(a.s);
  b.append(prompt_tokens(m.vocab(), 10));
  b.eval();
  const Snapshot bb = snap(b.s);
  Session holder(e);
  holder.append(prompt_tokens(m.vocab(), 60));
  holder.eval();  // one page left in use by holder, one by b: none free
  CHECK(load(b.s, blob) == DSRT_ERR_CONTEXT_FULL);
  CHECK(snap(b.s) == bb);
}

TEST_CASE("fuzz seeds: the format-1 seeds are refused cleanly; the format-2 seeds load into the fuzz target's model") {
  const std::string dir = std::string(DSRT_TEST_DATA) + "/../fuzz/corpus/session_state/";
  Model m(tiny("no-qlora"));  // the fuzz target's model: no-qlora, seed 1
  Engine e(m);
  Session s(e);
  for (const char *old : {"crash-logit-rows-overflow.bin", "empty.bin", "tiny-after-one-turn.bin"}) {
    INFO(old);
    CHECK(load(s.s, slurp(dir + old)) == DSRT_ERR_VERSION_MISMATCH);
  }
  // The format-2 seeds, made here; DSRT_WRITE_STATE_SEEDS=<dir> writes them (tests/fuzz/corpus/session_state).
  std::vector<std::pair<std::string, std::string>> seeds;
  {
    Session x(e);
    seeds.push_back({"v2-empty.bin", save(x.s)});
    x.append(prompt_tokens(m.vocab(), 5));
    x.eval();
    seeds.push_back({"v2-tokens.bin", save(x.s)});
  }
  {
    Session x(e, false, 2);
    chat_turn(m, x.s, "hi", 2);
    seeds.push_back({"v2-chat-turn.bin", save(x.s)});
  }
  {
    Session x(e, true, 3);
    x.append(prompt_tokens(m.vocab(), 3));
    x.eval();
    x.append({7, 8});  // pending, not evaluated
    seeds.push_back({"v2-logits-all-pending.bin", save(x.s)});
  }
  if (const char *out = std::getenv("DSRT_WRITE_STATE_SEEDS"))
    for (auto &[name, b] : seeds) std::ofstream(std::string(out) + "/" + name, std::ios::binary) << b;
  for (auto &[name, b] : seeds) {
    INFO(name);
    Session y(e), z(e);
    CHECK_OK(load(y.s, b));
    CHECK_OK(load(z.s, slurp(dir + name)));  // the committed seed passes checksum, identity and values
    CHECK(snap(z.s).tokens == snap(y.s).tokens);
  }
}
