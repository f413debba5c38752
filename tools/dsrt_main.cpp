// The `dsrt` command: generate, eval, inspect, bench, make-tiny, info. The forms
//   dsrt eval --model DIR --tokens 5,17,42 --logits-out FILE
//   dsrt generate --model DIR --tokens 5,17,42 -n 24 --temperature 0 --print-ids
// are a public contract: other tools script against them. Errors: non-zero exit, one line on stderr.
#include <algorithm>
#include <cmath>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <sstream>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "backend/backend.h"
#include "core/file.h"
#include "core/json.h"
#include "core/status.h"
#include "dist/mapping.h"
#include "dsrt.h"
#include "model/config.h"
#include "model/placement.h"
#include "model/safetensors.h"
#include "model/weights.h"
#include "repl.h"
#include "bench_ops.h"
#include "bench_serve.h"
#include "dist_cli.h"
#include "server.h"
#include "tiny_model.h"

namespace {

struct Fail {
  std::string msg;
};

struct Args {
  std::map<std::string, std::string> kv;
  std::vector<std::string> flags;
  bool has(const std::string &k) const { return kv.count(k) || std::count(flags.begin(), flags.end(), k); }
  std::string get(const std::string &k, const std::string &def = "") const {
    auto it = kv.find(k);
    return it == kv.end() ? def : it->second;
  }
  long long num(const std::string &k, long long def) const {
    if (!kv.count(k)) return def;
    const std::string &s = kv.at(k);
    char *end = nullptr;
    long long v = std::strtoll(s.c_str(), &end, 10);
    if (s.empty() || *end) throw Fail{"option " + k + " expects an integer, got \"" + s + "\""};
    return v;
  }
  double real(const std::string &k, double def) const {
    if (!kv.count(k)) return def;
    const std::string &s = kv.at(k);
    char *end = nullptr;
    double v = std::strtod(s.c_str(), &end);
    if (s.empty() || *end) throw Fail{"option " + k + " expects a number, got \"" + s + "\""};
    return v;
  }
};

// Options that take a value; everything else starting with '-' is a flag.
const char *kValued[] = {"--model", "--tokens", "--logits-out", "-n", "--temperature", "--threads", "--backend", "--precision", "--kv-memory-fraction",
                         "--seed", "--preset", "--out", "--prompt", "--gen", "--batch", "--max-batch-tokens",
                         "--attention", "--ctx", "--text-file", "--messages", "--tools", "--kwargs", "--system",
                         "--top-p", "--top-k", "--min-p", "--stop", "--repeat", "--mtp-drafts", "--tp", "--ep",
                         "--gpu-memory", "--rows", "--world", "--rank", "--coordinator"};

Args parse(int argc, char **argv, int first) {
  Args a;
  for (int i = first; i < argc; i++) {
    std::string s = argv[i];
    if (s.rfind("-", 0) != 0) throw Fail{"unexpected argument \"" + s + "\""};
    bool valued = std::any_of(std::begin(kValued), std::end(kValued), [&](const char *v) { return s == v; });
    if (valued) {
      if (i + 1 >= argc) throw Fail{"option " + s + " needs a value"};
      a.kv[s] = argv[++i];
    } else {
      a.flags.push_back(s);
    }
  }
  return a;
}

void check(dsrt_status st) {
  if (st != DSRT_OK) throw Fail{std::string(dsrt_status_string(st)) + ": " + dsrt_last_error()};
}

std::vector<int32_t> parse_tokens(const std::string &s) {
  std::vector<int32_t> out;
  size_t i = 0;
  while (i < s.size()) {
    size_t j = s.find(',', i);
    if (j == std::string::npos) j = s.size();
    std::string t = s.substr(i, j - i);
    char *end = nullptr;
    long v = std::strtol(t.c_str(), &end, 10);
    if (t.empty() || *end || v < 0 || v > INT32_MAX) throw Fail{"--tokens: \"" + t + "\" is not a token id"};
    out.push_back(int32_t(v));
    i = j + 1;
  }
  if (out.empty()) throw Fail{"--tokens is empty"};
  return out;
}

int backend_of(const Args &a) {
  std::string b = a.get("--backend", "auto");
  if (b == "auto") return DSRT_BACKEND_AUTO;
  if (b == "cpu") return DSRT_BACKEND_CPU;
  if (b == "cuda") return DSRT_BACKEND_CUDA;
  throw Fail{"--backend must be auto, cpu or cuda, not \"" + b + "\""};
}

std::string need(const Args &a, const std::string &k) {
  if (!a.kv.count(k)) throw Fail{"missing " + k};
  return a.kv.at(k);
}

struct Loaded {
  dsrt_model *model = nullptr;
  dsrt_engine *engine = nullptr;
  ~Loaded() {
    dsrt_engine_free(engine);
    dsrt_model_free(model);
  }
};

// Ranks in several processes (tools/dist_cli.h).
dsrt::tools::DistArgs dist_args(const Args &a) {
  dsrt::tools::DistArgs d;
  d.model = a.get("--model");
  d.coordinator = a.get("--coordinator");
  d.world = int(a.num("--world", 0));
  d.rank = int(a.num("--rank", -1));
  d.tp = int(a.num("--tp", 0));
  d.ep = int(a.num("--ep", 0));
  d.threads = int(a.num("--threads", 0));
  return d;
}

void load(const Args &a, Loaded &l, int max_tokens = 0) {
  dsrt_model_params mp;
  dsrt_model_params_init(&mp, sizeof mp);
  mp.backend = backend_of(a);
  mp.n_threads = int32_t(a.num("--threads", 0));
  mp.device_memory = uint64_t(a.num("--gpu-memory", 0));
  mp.use_mmap = a.has("--no-mmap") ? 0 : 1;
  check(dsrt_model_load(need(a, "--model").c_str(), &mp, &l.model));
  dsrt_engine_params ep;
  dsrt_engine_params_init(&ep, sizeof ep);
  ep.max_tokens = max_tokens;
  ep.max_batch_tokens = int32_t(a.num("--max-batch-tokens", 512));
  std::string att = a.get("--attention", "auto");
  ep.attention = att == "naive" ? DSRT_ATTENTION_NAIVE : att == "absorbed" ? DSRT_ATTENTION_ABSORBED : DSRT_ATTENTION_AUTO;
  if (att != "auto" && att != "naive" && att != "absorbed") throw Fail{"--attention must be auto, naive or absorbed"};
  const std::string prec = a.get("--precision", "auto");
  if (prec != "auto" && prec != "fp32" && prec != "fp8") throw Fail{"--precision must be auto, fp32 or fp8"};
  ep.precision = prec == "fp8" ? DSRT_PRECISION_FP8 : prec == "fp32" ? DSRT_PRECISION_FP32 : DSRT_PRECISION_AUTO;
  ep.kv_memory_fraction = float(a.real("--kv-memory-fraction", 0.0));
  ep.mtp_drafts = a.has("--mtp") ? int32_t(a.num("--mtp-drafts", 1)) : 0;
  ep.tp = int32_t(a.num("--tp", 1));
  ep.ep = int32_t(a.num("--ep", 1));
  const dsrt_dist_params dp = dsrt::tools::dist_params(dist_args(a));
  check(dsrt_engine_create_dist(l.model, &ep, &dp, &l.engine));
}

const char *kCommonHelp =
    "  --model DIR          checkpoint directory (config.json, safetensors index + shards)\n"
    "  --threads N          CPU threads (default: all)\n"
    "  --backend B          auto | cpu | cuda (default auto)\n"
    "  --precision P        auto | fp32 | fp8 (GPU GEMM activations; fp8 is experimental)\n"
    "  --kv-memory-fraction F  size the KV pool as this share of free (device) memory after the weights\n"
    "  --mtp                speculative decoding with the checkpoint's MTP module (same output, fewer steps)\n"
    "  --mtp-drafts N       with --mtp: tokens drafted per step, 1-4 (default 1)\n"
    "  --tp N, --ep N       tensor- and expert-parallel ranks (tp * ep in-process ranks on the CPU backend;\n"
    "                       output identical in format to one rank)\n"
    "  --world W, --rank R, --coordinator HOST:PORT\n"
    "                       ranks in W processes (CPU backend; start the command W times, R = 0..W-1; rank 0\n"
    "                       listens at HOST:PORT and writes the output, the others print nothing); default\n"
    "                       from mpirun, srun or torchrun variables when a coordinator is known\n"
    "  --gpu-memory BYTES   GPU memory the weights may take (default: what is free, less 1 GiB)\n"
    "  --no-mmap            copy the weights into memory at load instead of mapping the shards: use it when\n"
    "                       the checkpoint's files may change while dsrt runs (costs RAM and load time)\n";

// ---- generate
int cmd_generate_text(const Args &a);

int cmd_generate(const Args &a) {
  if (a.has("--help")) {
    std::printf("usage: dsrt generate --model DIR --tokens 5,17,42 [-n 24] [--temperature 0] [--seed S] [--print-ids]\n"
                "       dsrt generate --model DIR --prompt TEXT [-n 256] [--temperature T] [--top-p P] [--top-k K]\n"
                "                     [--min-p P] [--seed S] [--stop STRING]\n"
                "With --tokens: greedy/temperature sampling after the given ids; prints the generated ids\n"
                "comma-separated on one line of stdout and nothing else. With --prompt: the text (BOS added, special\n"
                "tokens matched) is the prompt and the reply streams to stdout as it is generated.\n%s",
                kCommonHelp);
    return 0;
  }
  if (a.kv.count("--prompt")) return cmd_generate_text(a);
  std::vector<int32_t> prompt = parse_tokens(need(a, "--tokens"));
  const long long n = a.num("-n", 16);
  if (n < 0) throw Fail{"-n must be >= 0"};
  Loaded l;
  load(a, l, int(prompt.size() + size_t(n)));
  dsrt_session_params sp;
  dsrt_session_params_init(&sp, sizeof sp);
  sp.seed = uint64_t(a.num("--seed", 0));
  dsrt_session *s = nullptr;
  check(dsrt_session_create(l.engine, &sp, &s));
  std::unique_ptr<dsrt_session, void (*)(dsrt_session *)> guard(s, dsrt_session_free);
  dsrt_sampling_params smp;
  dsrt_sampling_params_init(&smp, sizeof smp);
  smp.temperature = float(a.real("--temperature", 0.0));
  check(dsrt_session_append_tokens(s, prompt.data(), prompt.size()));
  std::string line;
  for (long long i = 0; i < n; i++) {
    check(dsrt_session_eval(s, nullptr));
    int32_t tok;
    check(dsrt_session_sample(s, &smp, &tok));
    line += (i ? "," : "") + std::to_string(tok);
    if (i + 1 < n) check(dsrt_session_append_tokens(s, &tok, 1));
  }
  std::printf("%s\n", line.c_str());
  return 0;
}

int32_t print_delta(const dsrt_event *ev, void *) {
  std::fwrite(ev->text, 1, ev->text_len, stdout);
  std::fflush(stdout);
  return 0;
}

int cmd_generate_text(const Args &a) {
  const std::string prompt = a.get("--prompt");
  const long long n = a.num("-n", 256);
  if (n < 0) throw Fail{"-n must be >= 0"};
  Loaded l;
  load(a, l, 0);
  dsrt_session *s = nullptr;
  check(dsrt_session_create(l.engine, nullptr, &s));
  std::unique_ptr<dsrt_session, void (*)(dsrt_session *)> guard(s, dsrt_session_free);
  check(dsrt_session_append_text(s, prompt.data(), prompt.size(), DSRT_TOKENIZE_ADD_SPECIAL | DSRT_TOKENIZE_PARSE_SPECIAL));
  dsrt_gen_params p;
  dsrt_gen_params_init(&p, sizeof p, l.model);
  p.max_new_tokens = int32_t(n);
  p.temperature = float(a.real("--temperature", p.temperature));
  p.top_p = float(a.real("--top-p", p.top_p));
  p.top_k = int32_t(a.num("--top-k", p.top_k));
  p.min_p = float(a.real("--min-p", p.min_p));
  if (a.kv.count("--seed")) {
    p.has_seed = 1;
    p.seed = uint64_t(a.num("--seed", 0));
  }
  std::string stop = a.get("--stop");
  const char *stops[] = {stop.c_str()};
  if (!stop.empty()) {
    p.stop_strings = stops;
    p.n_stop_strings = 1;
  }
  check(dsrt_session_generate(s, &p, print_delta, nullptr));
  std::printf("\n");
  if (a.has("--mtp")) {
    dsrt_session_stats st;
    st.struct_size = sizeof st;
    check(dsrt_session_stats_get(s, &st));
    std::fprintf(stderr, "MTP: %d of %d drafts kept; %d tokens at %.2f tokens/s\n", st.mtp_accepted, st.mtp_drafted,
                 st.generated_tokens, st.decode_tokens_per_second);
  }
  return 0;
}

// ---- tokenize / template: tokenizer-only loads, public forms other tools script against
void load_tokenizer_only(const Args &a, Loaded &l) {
  dsrt_model_params mp;
  dsrt_model_params_init(&mp, sizeof mp);
  mp.tokenizer_only = 1;
  check(dsrt_model_load(need(a, "--model").c_str(), &mp, &l.model));
}

std::string read_file_arg(const Args &a, const std::string &key) {
  const std::string path = need(a, key);
  std::ifstream f(path, std::ios::binary);
  if (!f) throw Fail{key + ": cannot read " + path};
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

int cmd_tokenize(const Args &a) {
  if (a.has("--help")) {
    std::printf("usage: dsrt tokenize --model DIR --text-file FILE [--add-special]\n"
                "Prints the ids of FILE's exact bytes comma-separated on one line. Special-token strings in the text\n"
                "are matched as special tokens (as Hugging Face tokenizers does); BOS/EOS are added only with\n"
                "--add-special. Needs only config.json and the tokenizer files.\n");
    return 0;
  }
  const std::string text = read_file_arg(a, "--text-file");
  Loaded l;
  load_tokenizer_only(a, l);
  int32_t flags = DSRT_TOKENIZE_PARSE_SPECIAL | (a.has("--add-special") ? DSRT_TOKENIZE_ADD_SPECIAL : 0);
  size_t n = 0;
  dsrt_status st = dsrt_tokenize(l.model, text.data(), text.size(), flags, nullptr, 0, &n);
  if (st != DSRT_OK && st != DSRT_ERR_BUFFER_TOO_SMALL) check(st);
  std::vector<int32_t> ids(n);
  check(dsrt_tokenize(l.model, text.data(), text.size(), flags, ids.data(), ids.size(), &n));
  std::string line;
  for (size_t i = 0; i < n; i++) line += (i ? "," : "") + std::to_string(ids[i]);
  std::printf("%s\n", line.c_str());
  return 0;
}

int cmd_template(const Args &a) {
  if (a.has("--help")) {
    std::printf("usage: dsrt template --model DIR --messages FILE.json [--add-generation-prompt] [--tools FILE.json]\n"
                "                     [--kwargs FILE.json]\n"
                "Prints exactly the prompt the model's chat template renders for the messages, nothing else.\n");
    return 0;
  }
  const std::string messages = read_file_arg(a, "--messages");
  const std::string tools = a.kv.count("--tools") ? read_file_arg(a, "--tools") : "";
  const std::string kwargs = a.kv.count("--kwargs") ? read_file_arg(a, "--kwargs") : "";
  Loaded l;
  load_tokenizer_only(a, l);
  char *out = nullptr;
  size_t len = 0;  // a message's content may hold U+0000: print every byte of the prompt
  check(dsrt_chat_apply_n(l.model, messages.c_str(), tools.empty() ? nullptr : tools.c_str(),
                          kwargs.empty() ? nullptr : kwargs.c_str(),
                          a.has("--add-generation-prompt") ? DSRT_CHAT_ADD_GENERATION_PROMPT : 0, &out, &len));
  std::fwrite(out, 1, len, stdout);
  dsrt_free(out);
  return 0;
}

int cmd_bench_tokenizer(const Args &a) {
  if (a.has("--help")) {
    std::printf("usage: dsrt bench-tokenizer --model DIR --text-file FILE [--repeat N]\n"
                "Encode speed in MB/s on one thread (the text is encoded N times, default 5; the best run counts).\n");
    return 0;
  }
  const std::string text = read_file_arg(a, "--text-file");
  Loaded l;
  load_tokenizer_only(a, l);
  std::vector<int32_t> ids(text.size() + 16);
  double best = 1e30;
  size_t n = 0;
  for (long long r = 0; r < a.num("--repeat", 5); r++) {
    auto t0 = std::chrono::steady_clock::now();
    check(dsrt_tokenize(l.model, text.data(), text.size(), 0, ids.data(), ids.size(), &n));
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::printf("encoded %zu bytes into %zu tokens: %.1f MB/s (best of %lld runs, one thread)\n", text.size(), n,
              double(text.size()) / best / 1e6, a.num("--repeat", 5));
  return 0;
}

int cmd_chat(const Args &a) {
  if (a.has("--help")) {
    std::printf("usage: dsrt chat --model DIR [--system TEXT] [--temperature T] [-n MAX_TOKENS] [--ctx N] [--threads N] [--mtp]\n"
                "                 [--no-mmap]\n"
                "Interactive chat (the samples/chat REPL): /help lists its commands.\n");
    return 0;
  }
  const std::string model = need(a, "--model"), system = a.get("--system");
  chat_options o;
  chat_options_init(&o);
  o.model_dir = model.c_str();
  o.system = system.empty() ? nullptr : system.c_str();
  o.n_threads = int32_t(a.num("--threads", 0));
  o.max_ctx = int32_t(a.num("--ctx", 0));
  o.max_new_tokens = int32_t(a.num("-n", 1024));
  o.temperature = float(a.real("--temperature", -1.0));
  o.mtp = a.has("--mtp") ? 1 : 0;
  o.no_mmap = a.has("--no-mmap") ? 1 : 0;
  return chat_repl(&o);
}

// ---- eval
int cmd_eval(const Args &a) {
  if (a.has("--help")) {
    std::printf("usage: dsrt eval --model DIR --tokens 5,17,42 --logits-out FILE\n"
                "Writes the logits of every position as float32 little-endian, row-major [T, vocab], into FILE.\n%s",
                kCommonHelp);
    return 0;
  }
  std::vector<int32_t> toks = parse_tokens(need(a, "--tokens"));
  const std::string out = need(a, "--logits-out");
  Loaded l;
  load(a, l, int(toks.size()));
  dsrt_session_params sp;
  dsrt_session_params_init(&sp, sizeof sp);
  sp.logits_all = 1;
  dsrt_session *s = nullptr;
  check(dsrt_session_create(l.engine, &sp, &s));
  std::unique_ptr<dsrt_session, void (*)(dsrt_session *)> guard(s, dsrt_session_free);
  check(dsrt_session_append_tokens(s, toks.data(), toks.size()));
  check(dsrt_session_eval(s, nullptr));
  const float *logits;
  size_t rows, vocab;
  check(dsrt_session_logits(s, &logits, &rows, &vocab));
  if (rows != toks.size()) throw Fail{"internal: expected logits for every position"};
  std::ofstream f(out, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char *>(logits), std::streamsize(rows * vocab * sizeof(float)));
  if (!f) throw Fail{out + ": write failed"};
  std::fprintf(stderr, "wrote logits [%zu, %zu] to %s\n", rows, vocab, out.c_str());
  return 0;
}

// ---- inspect
// The layer index in "model.layers.L.xxx" (any prefix), or -1.
long long layer_of(const std::string &name) {
  size_t lp = name.find("model.layers.");
  return lp == std::string::npos ? -1 : std::atoll(name.c_str() + lp + 13);
}

std::string human(double b) {
  const char *u[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int i = 0;
  while (b >= 1024 && i < 4) {
    b /= 1024;
    i++;
  }
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2f %s", b, u[i]);
  return buf;
}

// Where the weights would go (model/placement.h) for --backend and --gpu-memory, and each rank's share for
// --tp/--ep (dist/mapping.h).
void print_placement(const Args &a, const dsrt::ModelConfig &c, const dsrt::ModelWeights &w) {
  using namespace dsrt;
  std::vector<Device> devices;
  const int backend = backend_of(a);
  std::string why;
  if (backend == DSRT_BACKEND_CUDA || (backend == DSRT_BACKEND_AUTO && cuda_devices(&why) > 0)) devices.push_back(Device::cuda(0));
  uint64_t budget = uint64_t(a.num("--gpu-memory", 0));
  if (!devices.empty() && budget == 0) {
    const uint64_t free_b = device_free_memory(devices[0]), reserve = uint64_t(1) << 30;
    budget = free_b > reserve ? free_b - reserve : 0;
  }
  Mapping shape;
  shape.tp = int(a.num("--tp", 1));
  shape.ep = int(a.num("--ep", 1));
  shape.world = shape.tp * shape.ep;
  std::printf("placement   %s\n", devices.empty() ? "host memory (CPU backend)" : devices[0].str().c_str());
  try {
    std::printf("%s", Placement::plan(w, devices, budget).str().c_str());
  } catch (const Error &e) {
    std::printf("  does not fit: %s\n", e.what());
  }
  try {
    shape.check_divides(c);
  } catch (const Error &e) {
    std::printf("ranks       %s\n", e.what());
    return;
  }
  std::printf("ranks       tp %d x ep %d\n", shape.tp, shape.ep);
  for (int r = 0; r < shape.world; r++) {
    Mapping m = shape;
    m.rank = r;
    const Range h = m.heads(c.num_attention_heads), e = m.experts(c.n_routed_experts), v = m.columns(c.vocab_size);
    std::printf("  rank %d: heads [%lld, %lld), routed experts [%lld, %lld), vocabulary rows [%lld, %lld)%s\n", r,
                (long long)h.begin, (long long)h.end, (long long)e.begin, (long long)e.end, (long long)v.begin,
                (long long)v.end, m.ep_rank() == 0 && c.n_shared_experts ? ", shared experts" : "");
  }
}

int cmd_inspect(const Args &a) {
  if (a.has("--help")) {
    std::printf("usage: dsrt inspect --model DIR [--no-mmap] [--placement [--backend B] [--gpu-memory BYTES] [--tp N]\n"
                "                    [--ep N]]\n"
                "Config summary, tensor count by dtype, bytes by part, unknown tensors, validation result;\n"
                "--placement: where the weights go (device, budget, bytes by part) and each rank's share.\n");
    return 0;
  }
  using namespace dsrt;
  const std::string dir = need(a, "--model");
  ModelConfig c = parse_model_config(read_text_file(dir + "/config.json", kConfigFileMax), dir + "/config.json");
  std::printf("config      %s/config.json (model_type %s)\n", dir.c_str(), c.model_type.c_str());
  std::printf("  layers %lld (dense %lld, MoE %lld), MTP %lld, hidden %lld, heads %lld, vocab %lld\n",
              (long long)c.num_hidden_layers, (long long)std::min(c.first_k_dense_replace, c.num_hidden_layers),
              (long long)(c.n_routed_experts ? c.num_hidden_layers - std::min(c.first_k_dense_replace, c.num_hidden_layers) : 0),
              (long long)c.num_nextn_predict_layers, (long long)c.hidden_size, (long long)c.num_attention_heads,
              (long long)c.vocab_size);
  std::printf("  MLA: q_lora %lld, kv_lora %lld, nope %lld, rope %lld, v %lld; softmax scale %.8f\n",
              (long long)c.q_lora_rank, (long long)c.kv_lora_rank, (long long)c.qk_nope_head_dim,
              (long long)c.qk_rope_head_dim, (long long)c.v_head_dim, c.softmax_scale());
  if (c.n_routed_experts)
    std::printf("  MoE: %lld experts (%lld per token, %lld groups pick %lld), %lld shared, inter %lld, scale %.3f, %s%s\n",
                (long long)c.n_routed_experts, (long long)c.num_experts_per_tok, (long long)c.n_group,
                (long long)c.topk_group, (long long)c.n_shared_experts, (long long)c.moe_intermediate_size,
                c.routed_scaling_factor, c.scoring_func == ScoringFunc::Sigmoid ? "sigmoid" : "softmax",
                c.norm_topk_prob ? ", normalised" : "");
  std::printf("  RoPE: theta %g%s", c.rope.theta, c.rope.yarn ? ", YaRN" : "\n");
  if (c.rope.yarn)
    std::printf(" factor %g over %lld, beta %g/%g, mscale %g/%g\n", c.rope.factor, (long long)c.rope.original_max_position,
                c.rope.beta_fast, c.rope.beta_slow, c.rope.mscale, c.rope.mscale_all_dim);
  std::printf("  weights: %s\n", c.fp8 ? "FP8 e4m3, 128x128 block scales" : "unquantised");
  Checkpoint ck(dir, nullptr, nullptr, a.has("--no-mmap") ? ShardAccess::Copy : ShardAccess::Map);
  std::map<std::string, std::pair<uint64_t, uint64_t>> by_dtype;  // count, bytes
  std::map<std::string, uint64_t> by_part;
  for (auto &[name, t] : ck.all()) {
    auto &d = by_dtype[dtype_name(t->dtype)];
    d.first++;
    d.second += t->nbytes;
    std::string part = "other";
    const long long layer = layer_of(name);
    if (layer >= c.num_hidden_layers)
      part = "MTP";
    else if (name.find(".mlp.experts.") != std::string::npos)
      part = "routed experts";
    else if (name.find(".mlp.shared_experts.") != std::string::npos)
      part = "shared experts";
    else if (name.find(".mlp.gate.") != std::string::npos)
      part = "router";
    else if (name.find(".mlp.") != std::string::npos)
      part = "dense FFN";
    else if (name.find(".self_attn.") != std::string::npos || name.find("layernorm") != std::string::npos)
      part = "attention + norms";
    else if (name.find("embed_tokens") != std::string::npos || name.find("lm_head") != std::string::npos ||
             name.find("model.norm") != std::string::npos)
      part = "embeddings/head";
    by_part[part] += t->nbytes;
  }
  std::printf("checkpoint  %zu shards, %zu tensors, %s\n", ck.n_shards(), ck.all().size(), human(double(ck.total_bytes())).c_str());
  for (auto &[d, v] : by_dtype) std::printf("  %-8s %8llu tensors  %s\n", d.c_str(), (unsigned long long)v.first, human(double(v.second)).c_str());
  std::printf("bytes by part\n");
  for (auto &[p, b] : by_part) std::printf("  %-18s %s\n", p.c_str(), human(double(b)).c_str());
  ModelWeights w;
  BindOptions bo;
  try {
    bind_weights(c, ck, bo, w);
  } catch (const Error &e) {
    std::printf("validation  FAILED: %s\n", e.what());
    return 1;
  }
  for (auto &u : w.unknown) std::printf("unknown     %s\n", u.c_str());
  std::printf("validation  OK: %zu tensors bound (%zu MTP layers), %zu unknown\n", w.all.size(), w.mtp.size(), w.unknown.size());
  if (a.has("--placement")) print_placement(a, c, w);
  return 0;
}

// ---- bench
std::vector<int> int_list(const Args &a, const std::string &k, const std::string &def) {
  std::vector<int> v;
  std::string s = a.get(k, def), part;
  std::stringstream ss(s);
  while (std::getline(ss, part, ',')) {
    char *end = nullptr;
    long n = std::strtol(part.c_str(), &end, 10);
    if (part.empty() || *end || n < 1 || n > 1000000) throw Fail{"option " + k + " expects positive integers like 1,8,32, got \"" + s + "\""};
    v.push_back(int(n));
  }
  return v;
}

// Bytes that must move per decode step and FLOPs per token, from the checkpoint (MTP is not run).
struct StepCost {
  double dense_bytes = 0, expert_bytes = 0;  // per step: all non-expert weights; all routed experts
  double flops_per_token = 0;                // 2 x weights touched per token (embedding rows excluded)
  double kv_bytes_per_token = 0;             // latent cache read per context token per step (pool dtype)
  // Attention FLOPs of one (query token, key token) pair over all layers in the absorbed form: per head the
  // scores q_lat . c_kv + q_pe . k_pe (dc + dr) and the output P . c_kv (dc), a multiply and an add each.
  double attn_flops_per_pair = 0;
  int64_t n_experts = 0, top_k = 0;
  // Routed experts a batch of b tokens touches, if routing were uniform: E (1 - (1 - K/E)^b).
  double experts_touched(int b) const {
    if (!n_experts) return 0;
    return double(n_experts) * (1.0 - std::pow(1.0 - double(top_k) / double(n_experts), b));
  }
  double step_bytes(int batch, int ctx) const {
    const double per_expert = n_experts ? expert_bytes / double(n_experts) : 0.0;
    return dense_bytes + experts_touched(batch) * per_expert + double(batch) * ctx * kv_bytes_per_token;
  }
};

StepCost step_cost(const std::string &dir, size_t kv_elem_bytes) {
  using namespace dsrt;
  ModelConfig c = parse_model_config(read_text_file(dir + "/config.json", kConfigFileMax), dir);
  Checkpoint ck(dir);
  StepCost sc;
  sc.n_experts = c.n_routed_experts;
  sc.top_k = c.num_experts_per_tok;
  double expert_params = 0;
  for (auto &[name, t] : ck.all()) {
    if (layer_of(name) >= c.num_hidden_layers) continue;           // MTP is not run by decode
    if (name.find("embed_tokens") != std::string::npos) continue;  // one row per token
    if (name.find("weight_scale_inv") != std::string::npos || name.find("norm") != std::string::npos) {
      sc.dense_bytes += double(t->nbytes);
      continue;
    }
    const double params = double(t->nbytes) / double(dtype_size(t->dtype));
    if (name.find(".mlp.experts.") != std::string::npos) {
      sc.expert_bytes += double(t->nbytes);
      expert_params += params;
    } else {
      sc.dense_bytes += double(t->nbytes);
      sc.flops_per_token += 2.0 * params;
    }
  }
  if (sc.n_experts) sc.flops_per_token += 2.0 * expert_params * double(sc.top_k) / double(sc.n_experts);
  sc.kv_bytes_per_token = double(c.num_hidden_layers * c.kv_cache_width()) * double(kv_elem_bytes);
  sc.attn_flops_per_pair = 2.0 * double(c.num_hidden_layers * c.num_attention_heads) *
                           double(2 * c.kv_lora_rank + c.qk_rope_head_dim);
  return sc;
}

double host_copy_bandwidth() {  // bytes read + written per second for a large memcpy on one thread
  const size_t n = size_t(256) << 20;
  std::vector<char> a(n, 1), b(n, 0);
  double best = 0;
  for (int r = 0; r < 3; r++) {
    auto t0 = std::chrono::steady_clock::now();
    std::memcpy(b.data(), a.data(), n);
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, 2.0 * double(n) / s);
  }
  return best;
}

// The engine's per-op times since profiling was turned on, divided by `steps` ("per decode step"), or the
// totals with steps = 0 (a whole prefill).
// Returns each op's total ms.
std::map<std::string, double> print_op_table(dsrt_engine *e, int steps, bool gpu) {
  char *json = nullptr;
  check(dsrt_engine_profile_json(e, &json));
  const auto j = dsrt::parse_json_sorted(json, "the engine profile", DSRT_ERR_FORMAT);
  dsrt_free(json);
  double total = 0;
  for (const auto &r : j) total += r["ms"].get<double>();
  const int div = steps > 0 ? steps : 1;
  std::printf("  per-op time %s (%s):\n  %-36s %8s %10s %7s\n", steps > 0 ? "per decode step" : "of the whole prefill",
              gpu ? "CUDA events" : "wall clock", "op", "calls", steps > 0 ? "us/step" : "ms", "share");
  for (const auto &r : j)
    std::printf("  %-36s %8lld %10.1f %6.1f%%\n", r["op"].get<std::string>().c_str(),
                (long long)(r["calls"].get<int64_t>() / div), (steps > 0 ? 1e3 : 1.0) * r["ms"].get<double>() / div,
                100.0 * r["ms"].get<double>() / total);
  std::printf("  %-36s %8s %10.1f\n", "sum", "", (steps > 0 ? 1e3 : 1.0) * total / div);
  std::map<std::string, double> ms;
  for (const auto &r : j) ms[r["op"].get<std::string>()] += r["ms"].get<double>();
  return ms;
}

// The tensor-core attention kernel's rate from a profile (when it ran): `flops` of attention and `bytes` of
// latent cache per step (or per prefill), against the copy bandwidth `bw`.
void print_attention_rate(const std::map<std::string, double> &ms, double flops, double bytes, double bw, int steps) {
  auto it = ms.find("mla_attend");
  if (it == ms.end() || it->second <= 0) return;
  const double s = it->second / std::max(steps, 1) * 1e-3;
  std::printf("  mla_attend: %.3f ms for %.3f TFLOP = %.1f TFLOP/s; %.1f MB of latent cache = %.0f GB/s (%.1f%% of the copy "
              "rate)\n",
              s * 1e3, flops / 1e12, flops / s / 1e12, bytes / 1e6, bytes / s / 1e9, 100.0 * bytes / s / bw);
}

int cmd_bench(const Args &a) {
  if (a.has("--help")) {
    std::printf("usage: dsrt bench --model DIR [--prompt 512,4096] [--batch 1,8,32,128] [--ctx 128,4096] [--gen 32]\n"
                "       (defaults: those lists on a GPU; --prompt 64 --batch 1 on the CPU)\n"
                "                  [--profile] [--max-batch-tokens N]\n"
                "Prefill tokens/s for each prompt length (one sequence) and decode tokens/s for each batch (sessions of\n"
                "each --ctx tokens, forks of one prefilled context, decoding --gen steps together), each beside its roofline: bytes that must move per step\n"
                "(weights touched + latent cache read) over the measured copy bandwidth (device memory on a GPU, one\n"
                "CPU thread's memcpy on the CPU). --profile adds a per-op time table for each batch size.\n"
                "       dsrt bench --ops [--rows N] [--sweep]   (GPU; no model)\n"
                "Every weight-streaming kernel of a V3 decode step on V3's shapes, GB/s against the copy rate; --sweep\n"
                "also times each cut of the GEMV kernel (K slices x rows per warp).\n%s",
                kCommonHelp);
    return 0;
  }
  using namespace dsrt;
  if (a.has("--ops")) {
    tools::BenchOpsOptions o;
    o.rows = int(a.num("--rows", 1));
    o.sweep = a.has("--sweep");
    if (o.rows < 1 || o.rows > 8) throw Fail{"--rows must be 1 to 8"};
    return tools::bench_ops(o);
  }
  // Defaults: the GPU table (prefill 512 and 4096, decode at batch 1 to 128) on a GPU, a quick run on
  // the CPU reference.
  const int be = backend_of(a);
  const bool on_gpu = be == DSRT_BACKEND_CUDA || (be == DSRT_BACKEND_AUTO && cuda_devices(nullptr) > 0);
  const std::vector<int> prompts = int_list(a, "--prompt", on_gpu ? "512,4096" : "64"),
                         batches = int_list(a, "--batch", on_gpu ? "1,8,32,128" : "1");
  const std::vector<int> ctxs = int_list(a, "--ctx", "128");
  const int gen = int(a.num("--gen", 32));
  if (*std::min_element(ctxs.begin(), ctxs.end()) < 1 || gen < 4) throw Fail{"--ctx must be >= 1 and --gen >= 4 (three warm-up steps)"};
  const int max_batch = *std::max_element(batches.begin(), batches.end());
  const int max_prompt = *std::max_element(prompts.begin(), prompts.end());
  const int max_ctx = *std::max_element(ctxs.begin(), ctxs.end());
  Loaded l;
  auto pages = [](int tokens) { return (tokens + 63) / 64 * 64; };  // the KV pool hands out 64-token pages
  // The decode sessions of a batch are forks of one prefilled context (each holds its own copy of the cache,
  // so a step reads B contexts' latents as B independent chats would), plus that context while forking.
  load(a, l, std::max(pages(max_prompt), (max_batch + 1) * pages(max_ctx + gen + 1)));
  dsrt_model_info info;
  info.struct_size = sizeof info;
  check(dsrt_model_info_get(l.model, &info));
  const bool gpu = info.backend == DSRT_BACKEND_CUDA;
  const std::string dir = need(a, "--model");
  // The engine's latent pool takes its backend's default dtype (Backend::default_kv_dtype): BF16 on a GPU.
  const StepCost sc = step_cost(dir, dsrt::dtype_size(gpu ? dsrt::DType::BF16 : dsrt::DType::F32));
  const double bw = gpu ? device_copy_bandwidth(0) : host_copy_bandwidth();
  std::printf("model %s: %s weights, backend %s\n", dir.c_str(), info.weights_format ? "FP8" : "BF16", gpu ? "cuda" : "cpu");
  std::printf("copy bandwidth (%s, read + write): %.1f GB/s\n", gpu ? "device memcpy" : "one thread memcpy", bw / 1e9);
  // The prefill roofline's denominator: cuBLASLt's block-scaled FP8 GEMM on a V3 shape (4096 x 7168 x 7168).
  const double fp8_rate = gpu ? fp8_gemm_tflops(0, 4096, 7168, 7168) : 0.0;
  if (gpu)
    std::printf("FP8 GEMM rate (%s, 4096 x 7168 x 7168, activation quantisation included): %.0f TFLOP/s\n",
                cublaslt_status().c_str(), fp8_rate);
  std::printf("per token: %.2f GFLOP (2 x weights touched); per step at batch 1: %.1f MB of weights\n",
              sc.flops_per_token / 1e9, sc.step_bytes(1, 0) / 1e6);
  auto now = [] { return std::chrono::steady_clock::now(); };
  auto secs = [&](auto t0) { return std::chrono::duration<double>(now() - t0).count(); };
  auto tokens = [&](int n, int salt) {
    std::vector<int32_t> t(static_cast<size_t>(n));
    for (int i = 0; i < n; i++) t[size_t(i)] = int32_t((int64_t(i) * 7919 + 13 + salt * 104729) % info.n_vocab);
    return t;
  };
  dsrt_session_params sp;
  dsrt_session_params_init(&sp, sizeof sp);

  // A new session holding `t`, evaluated (one sequence, chunked by the engine's max_batch_tokens); *dt: the
  // seconds the evaluation took.
  auto prefilled = [&](const std::vector<int32_t> &t, double *dt) {
    dsrt_session *s = nullptr;
    check(dsrt_session_create(l.engine, &sp, &s));
    check(dsrt_session_append_tokens(s, t.data(), t.size()));
    auto t0 = now();
    check(dsrt_session_eval(s, nullptr));
    *dt = secs(t0);
    return s;
  };
  const bool profile = a.has("--profile");
  for (int P : prompts) {
    const auto t = tokens(P, 0);
    double dt = 0, dt2 = 0;
    dsrt_session_free(prefilled(t, &dt));
    const double flops = sc.flops_per_token * P;
    const double attn = sc.attn_flops_per_pair * double(P) * double(P + 1) / 2.0;
    std::printf("prefill %5d tokens: %8.3f s = %9.1f tokens/s, %7.2f TFLOP/s (weights only; attention adds %.2f TFLOP)", P,
                dt, P / dt, flops / dt / 1e12, attn / 1e12);
    if (fp8_rate > 0)
      std::printf("; roofline %.3f s at the FP8 GEMM rate: %.1f%% of it", flops / (fp8_rate * 1e12),
                  100.0 * flops / (fp8_rate * 1e12) / dt);
    std::printf("\n");
    if (profile) {  // the same prompt again, timed op by op (the timing events cost a little speed)
      check(dsrt_engine_set_profiling(l.engine, 1));
      dsrt_session_free(prefilled(t, &dt2));
      print_attention_rate(print_op_table(l.engine, 0, gpu), attn, sc.kv_bytes_per_token * double(P) * double(P + 1) / 2.0, bw, 1);
      check(dsrt_engine_set_profiling(l.engine, 0));
    }
  }

  for (int ctx : ctxs) {
    // One context prefilled once (timed: a prompt of ctx tokens), forked for every decoding session.
    double dt = 0;
    dsrt_session *base = prefilled(tokens(ctx, 1), &dt);
    std::printf("context %d: prefilled in %.3f s = %.1f tokens/s\n", ctx, dt, ctx / dt);
    for (int B : batches) {
      std::vector<dsrt_session *> ss(static_cast<size_t>(B));
      for (int i = 0; i < B; i++) check(dsrt_session_fork(base, &ss[size_t(i)]));
      double t_forward = 0;
      dsrt_sampling_params greedy;
      dsrt_sampling_params_init(&greedy, sizeof greedy);
      greedy.temperature = 0;  // argmax: the sampler's cheapest path; a step's cost is the forward's
      auto decode_step = [&] {
        for (auto *s : ss) {
          int32_t tok;
          check(dsrt_session_sample(s, &greedy, &tok));
          check(dsrt_session_append_tokens(s, &tok, 1));
        }
        int32_t n;
        auto t1 = now();
        check(dsrt_engine_step(l.engine, &n));  // one step decodes every session together
        t_forward += secs(t1);
      };
      // Warm-up: first-use uploads and allocations; the step's CUDA graph is captured at the second step, and
      // the device time of a step is read at the next one's start.
      for (int w = 0; w < 3; w++) decode_step();
      if (profile) check(dsrt_engine_set_profiling(l.engine, 1));
      t_forward = 0;
      auto engine_stats = [&] {
        dsrt_engine_stats st;
        st.struct_size = sizeof st;
        check(dsrt_engine_stats_get(l.engine, &st));
        return st;
      };
      const dsrt_engine_stats st0 = engine_stats();
      auto t0 = now();
      for (int g = 3; g < gen; g++) decode_step();
      const double dt = secs(t0), steps = gen - 3;
      const dsrt_engine_stats st1 = engine_stats();  // device time lags a step: the window is shifted by one
      const double gpu = (st1.device_seconds - st0.device_seconds) / steps;
      std::printf("  batch %d ctx %d step: %.3f ms = forward %.3f ms (engine step, logits to host) + sampling %.3f ms\n", B,
                  ctx, 1e3 * dt / steps, 1e3 * t_forward / steps, 1e3 * (dt - t_forward) / steps);
      if (gpu > 0)
        std::printf("  batch %d ctx %d GPU time %.3f ms/step; host overhead (step - GPU) %.1f us/step, of it sampling %.1f us; "
                    "graph segments replayed %llu, captured %llu\n",
                    B, ctx, 1e3 * gpu, 1e6 * (dt / steps - gpu), 1e6 * (dt - t_forward) / steps,
                    (unsigned long long)(st1.graph_replays - st0.graph_replays),
                    (unsigned long long)(st1.graph_captures - st0.graph_captures));
      const double bytes = sc.step_bytes(B, ctx + gen / 2), roof = bw / bytes, rate = steps / dt;
      std::printf("decode batch %4d ctx %6d: %8.2f steps/s = %9.1f tokens/s; roofline %.1f MB/step (latent cache %.1f MB) "
                  "/ %.0f GB/s = %.1f steps/s; %5.1f%% of it\n",
                  B, ctx, rate, rate * B, bytes / 1e6, (bytes - sc.step_bytes(B, 0)) / 1e6, bw / 1e9, roof,
                  100.0 * rate / roof);
      if (profile) {
        print_attention_rate(print_op_table(l.engine, int(steps), gpu),
                             sc.attn_flops_per_pair * double(B) * double(ctx + gen / 2),
                             sc.kv_bytes_per_token * double(B) * double(ctx + gen / 2), bw, int(steps));
        check(dsrt_engine_set_profiling(l.engine, 0));
      }
      for (auto *s : ss) {  // a session the engine could not serve (KV pool) would make the figures lie
        dsrt_session_stats st;
        st.struct_size = sizeof st;
        check(dsrt_session_stats_get(s, &st));
        if (st.n_tokens != ctx + gen)
          throw Fail{"a session did not decode every step (" + std::to_string(st.n_tokens) + " tokens)"};
        dsrt_session_free(s);
      }
    }
    dsrt_session_free(base);
  }
  return 0;
}

// ---- make-tiny
int cmd_make_tiny(const Args &a) {
  if (a.has("--help") || a.has("--list")) {
    std::printf("usage: dsrt make-tiny --preset NAME --out DIR [--seed S]\nWrites a random checkpoint in the published layout. Presets:\n");
    for (auto &p : dsrt::tools::tiny_presets()) std::printf("  %-16s %s\n", p.name.c_str(), p.description.c_str());
    return 0;
  }
  const std::string name = need(a, "--preset");
  const auto *p = dsrt::tools::find_tiny_preset(name);
  if (!p) throw Fail{"unknown preset \"" + name + "\" (dsrt make-tiny --list)"};
  dsrt::tools::make_tiny_model(*p, need(a, "--out"), uint64_t(a.num("--seed", 1)));
  std::fprintf(stderr, "wrote %s to %s\n", name.c_str(), need(a, "--out").c_str());
  return 0;
}

int cmd_info(const Args &) {
  char *json = nullptr;
  check(dsrt_system_info(&json));
  std::printf("dsrt %s\n%s\n", dsrt_version_string(), json);
  dsrt_free(json);
  return 0;
}

void usage(FILE *f) {
  std::fprintf(f,
               "usage: dsrt COMMAND [options]   (dsrt COMMAND --help for each)\n"
               "  generate   sample tokens after a prompt (token ids or text)\n"
               "  chat       interactive chat\n"
               "  serve      OpenAI-compatible HTTP server (tools/serve, docs/server.md)\n"
               "  bench-serve  concurrent streaming clients against an in-process server: requests/s, TTFT, ITL\n"
               "  tokenize   print the ids of a file's text\n"
               "  template   print the chat template's rendering of messages\n"
               "  bench-tokenizer  tokenizer encode speed\n"
               "  eval       write the logits of every position to a file\n"
               "  inspect    describe and validate a checkpoint\n"
               "  bench      prefill and decode speed beside the roofline\n"
               "  worker     a follower rank of ranks in several processes\n"
               "  make-tiny  write a random tiny checkpoint in the published layout\n"
               "  info       version, build and devices\n");
}

}  // namespace

int main(int argc, char **argv) {
  if (argc < 2) {
    usage(stderr);
    return 2;
  }
  const std::string cmd = argv[1];
  if (cmd == "serve") return dsrt_serve_command(argc - 2, argv + 2);  // tools/serve parses its own options
  if (cmd == "bench-serve") return dsrt_bench_serve_command(argc - 2, argv + 2);
  if (cmd == "--help" || cmd == "-h" || cmd == "help") {
    usage(stdout);
    return 0;
  }
  if (cmd == "worker") {
    try {
      const Args args = parse(argc, argv, 2);
      if (args.has("--help")) {
        std::printf("usage: dsrt worker --model DIR --coordinator HOST:PORT --rank R --world W [--tp N] [--ep N] [--threads N]\n"
                    "Runs follower rank R (1..W-1) of the engine that rank 0 runs (dsrt eval|generate ... --rank 0, or a\n"
                    "program on dsrt_engine_create_dist); exits 0 when rank 0 is done, 1 when the group fails. Rank and\n"
                    "world default to mpirun's, srun's or torchrun's variables, the coordinator to DSRT_COORDINATOR or\n"
                    "MASTER_ADDR:MASTER_PORT.\n");
        return 0;
      }
      return dsrt::tools::run_worker(dist_args(args), "worker");
    } catch (const Fail &f) {
      std::fprintf(stderr, "dsrt worker: %s\n", f.msg.c_str());
    } catch (const dsrt::Error &e) {
      std::fprintf(stderr, "dsrt worker: %s: %s\n", dsrt_status_string(e.code()), e.what());
    }
    return 1;
  }
  std::map<std::string, std::function<int(const Args &)>> cmds = {
      {"generate", cmd_generate}, {"eval", cmd_eval},           {"inspect", cmd_inspect},
      {"bench", cmd_bench},       {"make-tiny", cmd_make_tiny}, {"info", cmd_info},
      {"tokenize", cmd_tokenize}, {"template", cmd_template},   {"chat", cmd_chat},
      {"bench-tokenizer", cmd_bench_tokenizer}};
  auto it = cmds.find(cmd);
  if (it == cmds.end()) {
    std::fprintf(stderr, "dsrt: unknown command \"%s\" (dsrt --help)\n", cmd.c_str());
    return 2;
  }
  try {
    const Args args = parse(argc, argv, 2);
    // Ranks in several processes: a follower rank of eval/generate runs the worker instead (prints nothing).
    if ((cmd == "eval" || cmd == "generate") && !args.has("--help") && dsrt::tools::is_follower(dist_args(args)))
      return dsrt::tools::run_worker(dist_args(args), cmd.c_str());
    return it->second(args);
  } catch (const Fail &f) {
    std::fprintf(stderr, "dsrt %s: %s\n", cmd.c_str(), f.msg.c_str());
  } catch (const dsrt::Error &e) {
    std::fprintf(stderr, "dsrt %s: %s: %s\n", cmd.c_str(), dsrt_status_string(e.code()), e.what());
  } catch (const std::exception &e) {
    std::fprintf(stderr, "dsrt %s: %s\n", cmd.c_str(), e.what());
  }
  return 1;
}
