// The `dsrt` command's public forms: exact stdout/file contracts, --help everywhere, one-line errors.
#include <doctest/doctest.h>

#include <cstdio>
#include <fstream>
#include <sstream>

#include "helpers.h"

using namespace testing;

namespace {

using Run = ShellRun;

Run run(const std::string &args) { return run_shell(std::string(DSRT_CLI_PATH) + " " + args); }

std::string join(const std::vector<int32_t> &v) {
  std::string s;
  for (size_t i = 0; i < v.size(); i++) s += (i ? "," : "") + std::to_string(v[i]);
  return s;
}

}  // namespace

TEST_CASE("every subcommand has --help") {
  CHECK(run("--help").code == 0);
  for (const char *c : {"generate", "eval", "inspect", "bench", "make-tiny"}) {
    CAPTURE(c);
    Run r = run(std::string(c) + " --help");
    CHECK(r.code == 0);
    CHECK(r.out.find("usage: dsrt") != std::string::npos);
  }
}

TEST_CASE("dsrt generate --print-ids prints the greedy ids on one line and nothing else") {
  const std::string model = tiny("partial-yarn");
  std::vector<int32_t> prompt = {0, 5, 17, 42};
  Run r = run("generate --model " + model + " --tokens 0,5,17,42 -n 24 --temperature 0 --print-ids --threads 2");
  REQUIRE(r.code == 0);
  Model m(model);
  Engine e(m);
  Session s(e);
  s.append(prompt);
  std::vector<int32_t> want;
  for (int i = 0; i < 24; i++) {
    s.eval();
    want.push_back(s.greedy());
    s.append({want.back()});
  }
  CHECK(r.out == join(want) + "\n");
}

TEST_CASE("dsrt eval writes float32 [T, vocab] logits and nothing else") {
  const std::string model = tiny("no-qlora");
  fs::path out = fresh_dir("eval") / "logits.bin";
  Run r = run("eval --model " + model + " --tokens 5,17,42,7,9 --logits-out " + out.string() + " --backend cpu");
  REQUIRE(r.code == 0);
  CHECK(r.out.empty());
  REQUIRE(fs::file_size(out) == 5 * 512 * sizeof(float));
  std::vector<float> got(5 * 512);
  std::ifstream(out, std::ios::binary).read(reinterpret_cast<char *>(got.data()), std::streamsize(got.size() * 4));
  Model m(model);
  Engine e(m);
  Session s(e, true);
  s.append({5, 17, 42, 7, 9});
  s.eval();
  CHECK(s.logits() == got);
}

TEST_CASE("errors: non-zero exit and a single line on stderr") {
  for (const std::string &args :
       {std::string("generate --model /nonexistent --tokens 1,2"), std::string("eval --model " + tiny("no-qlora") + " --tokens 1,x"),
        std::string("generate --model " + tiny("no-qlora") + " --tokens 1,99999 -n 2"), std::string("frobnicate"),
        std::string("eval --model " + tiny("no-qlora") + " --tokens 1"), std::string("make-tiny --preset nope --out /tmp/x"),
        std::string("generate --model " + tiny("no-qlora") + " --tokens 1 --backend tpu")}) {
    CAPTURE(args);
    Run r = run(args);
    CHECK(r.code != 0);
    CHECK(r.out.empty());
    CHECK(!r.err.empty());
    CHECK(std::count(r.err.begin(), r.err.end(), '\n') == 1);
  }
}

TEST_CASE("make-tiny --layers N: N hidden layers (the preset's dense ones first, then MoE; MTP after the last)") {
  fs::path d = fresh_dir("mk-layers") / "m";
  Run mk = run("make-tiny --preset v3-mini --layers 3 --out " + d.string());  // v3-mini: 4 layers, 2 dense, MTP
  REQUIRE(mk.code == 0);
  Model m(d.string());
  dsrt_model_info info;
  info.struct_size = sizeof info;
  REQUIRE(dsrt_model_info_get(m.m, &info) == DSRT_OK);
  CHECK(info.n_layers == 3);
  CHECK(info.n_mtp_layers == 1);
  std::stringstream index;
  index << std::ifstream(d / "model.safetensors.index.json").rdbuf();
  CHECK(index.str().find("model.layers.2.mlp.experts.0.gate_proj.weight") != std::string::npos);  // MoE
  CHECK(index.str().find("model.layers.1.mlp.gate_proj.weight") != std::string::npos);            // dense
  CHECK(index.str().find("model.layers.3.eh_proj.weight") != std::string::npos);                  // MTP
  CHECK(index.str().find("model.layers.4.") == std::string::npos);
  Run g = run("generate --model " + d.string() + " --tokens 0,5,17,42 -n 8 --temperature 0 --print-ids --backend cpu --threads 2");
  CHECK(g.code == 0);
  CHECK(std::count(g.out.begin(), g.out.end(), ',') == 7);
  for (const char *bad : {"0", "-1", "4097", "x"}) {
    CAPTURE(bad);
    Run r = run("make-tiny --preset v3-mini --layers " + std::string(bad) + " --out " + (d.string() + "-bad"));
    CHECK(r.code == 2);
    CHECK(r.err.find("--layers") != std::string::npos);
    CHECK(!fs::exists(d.string() + "-bad"));
  }
}

TEST_CASE("dsrt inspect summarises and validates; make-tiny is deterministic") {
  fs::path d = fresh_dir("mk") / "m";
  Run mk = run("make-tiny --preset v3-mini --out " + d.string() + " --seed 1");
  REQUIRE(mk.code == 0);
  for (const char *f : {"model-00001-of-000002.safetensors", "model-00002-of-000002.safetensors"}) {
    std::ifstream a(d / f, std::ios::binary), b(fs::path(tiny("v3-mini")) / f, std::ios::binary);
    std::stringstream sa, sb;
    sa << a.rdbuf();
    sb << b.rdbuf();
    CHECK(sa.str() == sb.str());
  }
  Run r = run("inspect --model " + d.string());
  CHECK(r.code == 0);
  for (const char *needle : {"validation  OK", "F8_E4M3", "routed experts", "MTP", "8 groups pick 4", "YaRN"})
    CHECK(r.out.find(needle) != std::string::npos);
}
