// `dsrt serve`: see server.h. Written against include/dsrt.h only.
#include "server.h"

#include <arpa/inet.h>
#include <httplib.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <functional>
#include <mutex>
#include <optional>
#include <random>
#include <set>
#include <thread>
#include <vector>

#include "dsrt.h"
#include "metrics.h"
#include "openai_json.h"
#include "tool_calls.h"

namespace dsrt::serve {

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

std::string dsrt_error(dsrt_status st) { return std::string(dsrt_status_string(st)) + ": " + dsrt_last_error(); }

int64_t unix_now() {
  return std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count();
}

// The one id of a special-token string, -1 when it is not a single special token of the model.
int32_t single_special(const dsrt_model *m, const char *text) {
  int32_t ids[4];
  size_t n = 0;
  if (dsrt_tokenize(m, text, std::strlen(text), DSRT_TOKENIZE_PARSE_SPECIAL, ids, 4, &n) != DSRT_OK || n != 1) return -1;
  return (dsrt_token_attr(m, ids[0]) & DSRT_TOKEN_ATTR_SPECIAL) ? ids[0] : -1;
}

// The text the detokenizer shows for a token with skip_special (empty for control tokens).
std::string visible_text(const dsrt_model *m, int32_t id) {
  if (id < 0) return "";
  char buf[256];
  size_t n = 0;
  if (dsrt_detokenize(m, &id, 1, DSRT_DETOKENIZE_SKIP_SPECIAL, buf, sizeof buf, &n) != DSRT_OK) return "";
  return std::string(buf, n);
}

std::string token_text(const dsrt_model *m, int32_t id) {
  if (id < 0) return "";
  char buf[256];
  size_t n = 0;
  if (dsrt_token_bytes(m, id, buf, sizeof buf, &n) != DSRT_OK) return "";
  return std::string(buf, n);
}

const char *const kCallsBegin = "<｜tool▁calls▁begin｜>";
const char *const kCallEnd = "<｜tool▁call▁end｜>";

bool constant_time_equal(const std::string &a, const std::string &b) {
  unsigned char diff = a.size() == b.size() ? 0 : 1;
  for (size_t i = 0; i < a.size(); i++) diff |= uint8_t(a[i]) ^ uint8_t(i < b.size() ? b[i] : 0);
  return diff == 0;
}

// Endpoint label for metrics: known routes only, so a client cannot grow the label set.
std::string endpoint_label(const std::string &path) {
  static const char *known[] = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics"};
  for (const char *k : known)
    if (path == k) return k;
  if (path.rfind("/v1/models/", 0) == 0) return "/v1/models/{id}";
  return "other";
}

void send_error(httplib::Response &res, const ApiError &e) {
  res.status = e.status;
  res.set_content(dump(error_body(e)), "application/json");
  if (e.status == 429) res.set_header("Retry-After", "1");
}

// Polls a response's client while its turn has produced nothing yet (a long prompt's prefill gives no event)
// and cancels the session when the client is gone. The sink belongs to the provider's thread, which leaves it
// alone from the watch's start until stop() (the first token, or the turn's end, calls it before anything is
// written), so the two never use it at once.
class ClientWatch {
 public:
  ClientWatch(httplib::DataSink &sink, dsrt_session *s)
      : th_([this, &sink, s] {
          while (true) {
            {
              std::unique_lock lk(mu_);
              if (cv_.wait_for(lk, std::chrono::milliseconds(20), [this] { return stop_; })) return;
            }
            if (!sink.is_writable()) {  // unlocked: it may wait (up to the write timeout) for a full socket
              gone_ = true;
              dsrt_session_cancel(s);
              return;
            }
          }
        }) {}
  ~ClientWatch() { stop(); }
  ClientWatch(const ClientWatch &) = delete;
  ClientWatch &operator=(const ClientWatch &) = delete;
  void stop() {
    if (!th_.joinable()) return;
    {
      std::lock_guard lk(mu_);
      stop_ = true;
    }
    cv_.notify_one();
    th_.join();
  }
  bool gone() const { return gone_; }  // after stop()

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false, gone_ = false;
  std::thread th_;  // last: starts once the members above exist
};

}  // namespace

struct Server::Impl {
  Options opt;
  dsrt_model *model = nullptr;
  dsrt_engine *engine = nullptr;
  int32_t n_vocab = 0;
  int ctx = 0;
  MarkerTokens markers;
  // How the chat template writes an assistant tool call, around the function's name (from rendering a probe
  // call at load): V3 "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>" NAME "\n```json\n",
  // V3.1 "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>" NAME "<｜tool▁sep｜>". tool_choice required/named appends
  // this to the generation prompt, so the turn is a tool call whatever the model would have said. Empty
  // call_before_name: the template writes no tool calls with the model's tokens, so nothing can be forced.
  std::string call_before_name, call_after_name;
  std::string call_format;  // one call with placeholders, for tools_system_prompt; empty with call_before_name
  // The template shows the `tools` variable to the model. DeepSeek-V3's does not: the server then describes the
  // tools in a system message of its own (tools_system_prompt), or the model would never learn them.
  bool template_shows_tools = true;
  httplib::Server http;
  Metrics metrics;
  std::atomic<int> active{0};
  std::mutex mu;
  std::set<dsrt_session *> sessions;  // alive sessions, so stop() can cancel them
  bool stopping = false;
  int64_t created = unix_now();

  ~Impl() {
    dsrt_engine_free(engine);
    dsrt_model_free(model);
  }

  // Renders an assistant message with one probe call and cuts the template's text around the probe's name;
  // renders a user message with and without a probe tool to see whether the template shows tools.
  void probe_tool_call_format() {
    const std::string name = "dsrt_probe_function", args = "{\"dsrt_probe_argument\":1}";
    auto render = [this](const json &m, const json &tools, int32_t flags, std::string &text) {
      char *out = nullptr;
      size_t len = 0;
      const std::string t = tools.is_null() ? "" : dump(tools);
      if (dsrt_chat_apply_n(model, dump(m).c_str(), t.empty() ? nullptr : t.c_str(), nullptr, flags, &out, &len) != DSRT_OK) return false;
      text.assign(out, len);
      dsrt_free(out);
      return true;
    };
    const json user = json::array({{{"role", "user"}, {"content", "x"}}});
    std::string with, without;
    if (render(user, json::array({{{"type", "function"}, {"function", {{"name", name}, {"parameters", {{"type", "object"}}}}}}}),
               DSRT_CHAT_ADD_GENERATION_PROMPT, with) &&
        render(user, nullptr, DSRT_CHAT_ADD_GENERATION_PROMPT, without))
      template_shows_tools = with != without;
    if (markers.calls_begin < 0 || markers.call_begin < 0 || markers.sep < 0) return;
    const json msgs = json::array(
        {{{"role", "user"}, {"content", "x"}},
         {{"role", "assistant"},
          {"content", nullptr},
          {"tool_calls", json::array({{{"id", "call_0"}, {"type", "function"}, {"function", {{"name", name}, {"arguments", args}}}}})}}});
    std::string text;
    if (!render(msgs, nullptr, 0, text)) return;
    const size_t b = text.find(kCallsBegin);
    const size_t n = b == std::string::npos ? b : text.find(name, b);
    const size_t a = n == std::string::npos ? n : text.find(args, n + name.size());
    if (a == std::string::npos) return;
    call_before_name = text.substr(b, n - b);
    call_after_name = text.substr(n + name.size(), a - n - name.size());
    const size_t end = text.find(kCallEnd, a + args.size());
    const std::string after_args = end == std::string::npos ? "" : text.substr(a + args.size(), end + std::strlen(kCallEnd) - a - args.size());
    call_format = call_before_name + "tool_call_name" + call_after_name + "tool_call_arguments" + after_args;
  }

  // Runs the forced prefix of a turn (tokens of the prompt, not generated) through the output parser, so the
  // client sees the call it opens (its id, and its name when tool_choice named it) like generated output.
  ParsedDelta replay(OutputParser &p, const std::vector<int32_t> &ids) {
    ParsedDelta all;
    auto add = [&all](ParsedDelta d) {
      all.content += d.content;
      all.reasoning += d.reasoning;
      for (auto &c : d.calls) all.calls.push_back(std::move(c));
    };
    dsrt_detok *dt = nullptr;
    if (dsrt_detok_create(model, DSRT_DETOKENIZE_SKIP_SPECIAL, &dt) != DSRT_OK) throw ApiError(500, "cannot create a detokenizer: " + std::string(dsrt_last_error()));
    const char *t = nullptr;
    size_t n = 0;
    for (int32_t id : ids) {
      if (dsrt_detok_push(dt, id, &t, &n) != DSRT_OK) n = 0;
      add(p.push(id, std::string(t ? t : "", n)));
    }
    if (dsrt_detok_flush(dt, &t, &n) == DSRT_OK && n) add(p.push(-1, std::string(t, n)));
    dsrt_detok_free(dt);
    return all;
  }

  // ---- a request's hold on a session slot and its session

  struct Slot {
    Impl &srv;
    bool held = false;
    explicit Slot(Impl &s) : srv(s) {
      if (srv.active.fetch_add(1) >= srv.opt.max_sessions) {
        srv.active.fetch_sub(1);
        srv.metrics.rejected();
        throw ApiError(429, "the server is busy: all " + std::to_string(srv.opt.max_sessions) +
                                " sessions (--max-sessions) are generating; retry shortly",
                       "", "rate_limit_exceeded");
      }
      held = true;
    }
    ~Slot() {
      if (held) srv.active.fetch_sub(1);
    }
  };

  struct Session {
    Impl &srv;
    dsrt_session *s = nullptr;
    Session(Impl &i, uint64_t seed, bool logits_all = false) : srv(i) {
      dsrt_session_params sp;
      dsrt_session_params_init(&sp, sizeof sp);
      sp.max_ctx = srv.ctx;
      sp.seed = seed;
      sp.logits_all = logits_all ? 1 : 0;
      dsrt_status st = dsrt_session_create(srv.engine, &sp, &s);
      if (st != DSRT_OK) throw ApiError(500, "cannot create a session: " + dsrt_error(st));
      std::lock_guard lk(srv.mu);
      if (srv.stopping) {
        dsrt_session_free(s);
        s = nullptr;
        throw ApiError(503, "the server is shutting down", "", "", "server_error");
      }
      srv.sessions.insert(s);
    }
    ~Session() {
      if (!s) return;
      {
        std::lock_guard lk(srv.mu);
        srv.sessions.erase(s);
      }
      dsrt_session_free(s);
    }
  };

  // ---- a prepared generation: tokens and sampling parameters (the pointers in gp point into this object)

  struct Gen {
    std::vector<int32_t> prompt;
    std::string prompt_text;  // the rendered prompt (chat) or the prompt (completions)
    dsrt_gen_params gp{};
    std::vector<std::string> stop_storage;
    std::vector<const char *> stops;
    std::vector<int32_t> bias_ids;
    std::vector<float> bias_values;
    uint64_t seed = 0;
    bool logprobs = false;  // each token's log-probability (dsrt_session_token_logprobs) ...
    size_t top_logprobs = 0;  // ... and this many alternatives
    bool score_prompt = false;  // completions' echo with logprobs: the prompt tokens' log-probabilities too
    bool no_turn = false;       // max_tokens 0 (with echo): the prompt is scored, nothing is generated
    std::vector<TokenLogprob> prompt_logprobs;  // (score_prompt) one per prompt token, the first without
    std::vector<int64_t> prompt_offsets;        // each prompt token's character offset in the echoed text
    Clock::time_point arrival = Clock::now();
  };

  std::vector<int32_t> tokenize(const std::string &text, int32_t flags) {
    size_t n = 0;
    dsrt_status st = dsrt_tokenize(model, text.data(), text.size(), flags, nullptr, 0, &n);
    if (st != DSRT_OK && st != DSRT_ERR_BUFFER_TOO_SMALL) throw ApiError(400, "cannot tokenize the prompt: " + dsrt_error(st));
    std::vector<int32_t> ids(n);
    if (n) {
      st = dsrt_tokenize(model, text.data(), text.size(), flags, ids.data(), ids.size(), &n);
      if (st != DSRT_OK) throw ApiError(400, "cannot tokenize the prompt: " + dsrt_error(st));
      ids.resize(n);
    }
    return ids;
  }

  void check_model(const std::string &name) const {
    if (!name.empty() && name != opt.model_name)
      throw ApiError(404, "The model '" + name + "' does not exist (this server serves '" + opt.model_name + "')",
                     "model", "model_not_found");
  }

  // Context check and sampling parameters, common to both endpoints.
  void prepare(const SamplingRequest &r, Gen &g) {
    const int64_t n = int64_t(g.prompt.size());
    if (n == 0) throw ApiError(400, "the prompt is empty", "prompt");
    if (n >= ctx)
      throw ApiError(400, "This model's maximum context length is " + std::to_string(ctx) + " tokens. However, your prompt is " +
                              std::to_string(n) + " tokens, which leaves no room for a completion.",
                     "messages", "context_length_exceeded");
    if (r.max_tokens && n + *r.max_tokens > ctx)
      throw ApiError(400, "This model's maximum context length is " + std::to_string(ctx) + " tokens. However, you requested " +
                              std::to_string(n + *r.max_tokens) + " tokens (" + std::to_string(n) + " in the prompt, " +
                              std::to_string(*r.max_tokens) + " in the completion). Please reduce the length of the prompt or the completion.",
                     "max_tokens", "context_length_exceeded");
    for (int32_t t : g.prompt)
      if (t < 0 || t >= n_vocab) throw ApiError(400, "token id " + std::to_string(t) + " is outside the vocabulary", "prompt");
    dsrt_gen_params_init(&g.gp, sizeof g.gp, model);
    g.gp.max_new_tokens = r.max_tokens ? int32_t(*r.max_tokens) : 0;  // 0: until the context is full
    if (r.temperature) g.gp.temperature = float(*r.temperature);
    if (r.top_p) g.gp.top_p = float(*r.top_p);
    if (r.top_k) g.gp.top_k = int32_t(*r.top_k);
    if (r.min_p) g.gp.min_p = float(*r.min_p);
    if (r.presence_penalty) g.gp.presence_penalty = float(*r.presence_penalty);
    if (r.frequency_penalty) g.gp.frequency_penalty = float(*r.frequency_penalty);
    if (r.repetition_penalty) g.gp.repetition_penalty = float(*r.repetition_penalty);
    g.seed = r.seed ? uint64_t(*r.seed) : std::random_device{}() * 0x9e3779b97f4a7c15ull + std::random_device{}();
    g.gp.has_seed = 1;
    g.gp.seed = g.seed;
    g.gp.ignore_eos = r.ignore_eos ? 1 : 0;
    g.gp.skip_special = 1;
    g.stop_storage = r.stop;
    for (const auto &s : g.stop_storage) g.stops.push_back(s.c_str());
    g.gp.stop_strings = g.stops.empty() ? nullptr : g.stops.data();
    g.gp.n_stop_strings = g.stops.size();
    for (const auto &[id, v] : r.logit_bias) {
      if (id >= n_vocab) throw ApiError(400, "'logit_bias': token id " + std::to_string(id) + " is outside the vocabulary", "logit_bias");
      g.bias_ids.push_back(int32_t(id));
      g.bias_values.push_back(float(v));
    }
    g.gp.logit_bias_tokens = g.bias_ids.empty() ? nullptr : g.bias_ids.data();
    g.gp.logit_bias_values = g.bias_values.empty() ? nullptr : g.bias_values.data();
    g.gp.n_logit_bias = g.bias_ids.size();
    g.logprobs = r.logprobs;
    g.top_logprobs = size_t(std::max<int64_t>(r.top_logprobs, 0));
  }

  // Creates the session, appends the prompt (scoring it when g.score_prompt) and starts the turn (none when
  // g.no_turn); errors here are still HTTP errors.
  std::unique_ptr<Session> start(Gen &g) {
    auto s = std::make_unique<Session>(*this, g.seed, g.score_prompt);
    dsrt_status st = g.logprobs ? dsrt_session_keep_logprobs(s->s, 1) : DSRT_OK;
    if (st != DSRT_OK) throw ApiError(500, "cannot keep logprobs: " + dsrt_error(st));
    if (g.score_prompt) {
      score_prompt(*s, g);
    } else {
      append_prompt(*s, g.prompt.data(), g.prompt.size());
    }
    if (g.no_turn) return s;
    st = dsrt_session_start(s->s, &g.gp);
    if (st == DSRT_ERR_INVALID_ARGUMENT) throw ApiError(400, dsrt_error(st));
    if (st != DSRT_OK) throw ApiError(500, "cannot start generating: " + dsrt_error(st));
    return s;
  }

  // The character offset of the first generated token: after the echoed text, or after the prompt tokens'
  // own texts when the prompt was scored (its offsets count those).
  static int64_t prompt_chars(const Gen &g, const std::string &echo) {
    if (g.prompt_offsets.empty()) return utf8_chars(echo);
    return g.prompt_offsets.back() + utf8_chars(g.prompt_logprobs.back().token);
  }

  void append_prompt(Session &s, const int32_t *ids, size_t n) {
    const dsrt_status st = dsrt_session_append_tokens(s.s, ids, n);
    if (st == DSRT_ERR_CONTEXT_FULL) throw ApiError(400, "the prompt does not fit the context: " + dsrt_error(st), "messages", "context_length_exceeded");
    if (st != DSRT_OK) throw ApiError(400, "cannot append the prompt: " + dsrt_error(st));
  }

  // Echo with logprobs: evaluates the prompt in a session made with logits_all, kScoreChunk tokens at a time
  // (an evaluation's logits stay in the session: kScoreChunk rows of n_vocab floats, not the whole prompt's),
  // and gives every prompt token after the first the log-softmax of the raw logits row before it, with the
  // g.top_logprobs best alternatives — as dsrt_session_token_logprobs gives a sampled token (before bias,
  // penalties and temperature). Offsets count the tokens' own texts (as vLLM's text_offset).
  void score_prompt(Session &s, Gen &g) {
    constexpr size_t kScoreChunk = 64;
    const std::vector<int32_t> &p = g.prompt;
    g.prompt_logprobs.assign(p.size(), TokenLogprob{});
    g.prompt_offsets.assign(p.size(), 0);
    int64_t chars = 0;
    for (size_t i = 0; i < p.size(); i++) {
      g.prompt_logprobs[i].token = token_text(model, p[i]);
      g.prompt_offsets[i] = chars;
      chars += utf8_chars(g.prompt_logprobs[i].token);
    }
    g.prompt_logprobs[0].none = true;
    std::vector<int32_t> ids;
    for (size_t at = 0; at < p.size(); at += kScoreChunk) {
      const size_t n = std::min(kScoreChunk, p.size() - at);
      append_prompt(s, p.data() + at, n);
      dsrt_status st = dsrt_session_eval(s.s, nullptr);
      if (st != DSRT_OK) throw ApiError(500, "cannot evaluate the prompt: " + dsrt_error(st), "", "", "server_error");
      const float *logits = nullptr;
      size_t rows = 0, V = 0;
      st = dsrt_session_logits(s.s, &logits, &rows, &V);
      if (st != DSRT_OK || rows != n) throw ApiError(500, "cannot read the prompt's logits: " + dsrt_error(st), "", "", "server_error");
      for (size_t j = 0; j < n && at + j + 1 < p.size(); j++) {
        const float *x = logits + j * V;
        TokenLogprob &out = g.prompt_logprobs[at + j + 1];
        float mx = -INFINITY;
        for (size_t v = 0; v < V; v++) mx = std::max(mx, x[v]);
        double sum = 0.0;
        for (size_t v = 0; v < V; v++) sum += std::exp(double(x[v]) - double(mx));
        const double lse = double(mx) + std::log(sum);
        out.logprob = double(x[size_t(p[at + j + 1])]) - lse;
        const size_t k = std::min(g.top_logprobs, V);
        if (k == 0) continue;
        ids.resize(V);
        for (size_t v = 0; v < V; v++) ids[v] = int32_t(v);
        std::partial_sort(ids.begin(), ids.begin() + std::ptrdiff_t(k), ids.end(),
                          [x](int32_t a, int32_t b) { return x[a] > x[b] || (x[a] == x[b] && a < b); });
        for (size_t i = 0; i < k; i++) out.top.push_back({token_text(model, ids[i]), double(x[ids[i]]) - lse});
      }
    }
  }

  struct Outcome {
    int finish = DSRT_FINISH_NONE;
    std::string error;
    int64_t completion_tokens = 0;
    int64_t cached_tokens = 0;  // prompt tokens served from the engine's prefix cache
    bool client_gone = false;
  };

  // The log-probability of the token the session just sampled and its g.top_logprobs alternatives, from the C
  // API (raw logits, copied by the session when it sampled: no race with the step thread).
  bool token_logprob(Session &s, const Gen &g, TokenLogprob &out) {
    int32_t tok = -1;
    float lp = 0;
    std::vector<int32_t> ids(g.top_logprobs);
    std::vector<float> lps(g.top_logprobs);
    size_t n = 0;
    if (dsrt_session_token_logprobs(s.s, &tok, &lp, ids.data(), lps.data(), ids.size(), &n) != DSRT_OK) return false;
    out.token = token_text(model, tok);
    out.logprob = lp;
    out.top.clear();
    for (size_t i = 0; i < n; i++) out.top.push_back({token_text(model, ids[i]), lps[i]});
    return true;
  }

  // Runs the turn to its end; on_token(token, text, logprob) returns false when the client is gone (the session
  // is then cancelled at its next step); logprob is null unless g.logprobs; on_done(text) gets the final flush.
  // sink: the response's, watched until the first token (ClientWatch), so a client that hangs up during the
  // prefill is cancelled then and not only at the first token.
  Outcome run(Session &s, Gen &g, const std::function<bool(int32_t, const std::string &, const TokenLogprob *)> &on_token,
              const std::function<void(const std::string &)> &on_done, httplib::DataSink *sink) {
    Outcome o;
    TokenLogprob lp;
    Clock::time_point last{};
    bool cancelled = false;
    std::optional<ClientWatch> watch;
    if (sink) watch.emplace(*sink, s.s);
    auto unwatch = [&] {  // before the sink is used here
      if (!watch) return;
      watch->stop();
      if (watch->gone() && !cancelled) cancelled = o.client_gone = true;
      watch.reset();
    };
    while (true) {
      if (!cancelled) {
        bool stop_now;
        {
          std::lock_guard lk(mu);
          stop_now = stopping;
        }
        if (stop_now) {
          dsrt_session_cancel(s.s);
          cancelled = true;
        }
      }
      dsrt_event ev;
      std::memset(&ev, 0, sizeof ev);
      ev.struct_size = sizeof ev;
      dsrt_status st = dsrt_session_next(s.s, &ev);
      if (st != DSRT_OK) {
        o.finish = DSRT_FINISH_ERROR;
        o.error = dsrt_error(st);
        break;
      }
      unwatch();
      std::string text(ev.text ? ev.text : "", ev.text ? ev.text_len : 0);
      if (ev.type == DSRT_EVENT_TOKEN) {
        o.completion_tokens++;
        if (o.completion_tokens == 1) metrics.ttft(seconds_since(g.arrival));
        else metrics.inter_token(std::chrono::duration<double>(Clock::now() - last).count());
        last = Clock::now();
        const TokenLogprob *lpp = g.logprobs && token_logprob(s, g, lp) ? &lp : nullptr;
        if (!cancelled && !on_token(ev.token, text, lpp)) {
          dsrt_session_cancel(s.s);
          cancelled = o.client_gone = true;
        }
        continue;
      }
      if (ev.token >= 0) o.completion_tokens++;  // the end-of-generation or stop token
      o.finish = ev.finish_reason;
      if (ev.finish_reason == DSRT_FINISH_ERROR) o.error = std::string(dsrt_status_string(ev.status)) + ": " + dsrt_last_error();
      if (!cancelled) on_done(text);
      break;
    }
    unwatch();
    int32_t cached = 0;
    if (dsrt_session_cached_tokens(s.s, &cached) == DSRT_OK) o.cached_tokens = cached;
    if (o.client_gone) metrics.cancelled();
    metrics.tokens(int64_t(g.prompt.size()), o.completion_tokens);
    metrics.duration(seconds_since(g.arrival));
    return o;
  }

  // A non-stream turn, run inside a chunked content provider. httplib has sent the headers when it calls the
  // provider, and the sink's is_writable() (cpp-httplib 0.11: select for writing, then a MSG_PEEK read that
  // sees the peer's FIN) tells whether the client is still connected; a plain handler has no such test. It is
  // asked before the turn and at every token, so a client that hangs up cancels its session at its next step
  // instead of holding a batch slot until its last token. (A client that only shuts down its sending side
  // counts as gone.) False: the client is gone, or the generation failed after the 200 went out; the provider
  // then returns false, which aborts the connection without the final chunk, so the client sees an error
  // rather than a truncated success (the failure is logged).
  bool run_for_client(Session &s, Gen &g, httplib::DataSink &sink, Outcome &o,
                      const std::function<void(int32_t, const std::string &, const TokenLogprob *)> &on_token,
                      const std::function<void(const std::string &)> &on_done) {
    if (!sink.is_writable()) {
      dsrt_session_cancel(s.s);
      metrics.cancelled();
      return false;
    }
    o = run(
        s, g,
        [&](int32_t tok, const std::string &text, const TokenLogprob *lp) {
          on_token(tok, text, lp);
          return sink.is_writable();
        },
        on_done, &sink);
    if (o.client_gone) return false;
    if (o.finish == DSRT_FINISH_ERROR) {
      std::fprintf(stderr, "dsrt serve: generation failed after the response began: %s\n", o.error.c_str());
      return false;
    }
    return true;
  }

  // Frees a finished request's session and then its slot before its last bytes go out: a client that sends its
  // next request as soon as it has the answer must find them free (else --max-sessions 1 answers it 429).
  static void release(std::shared_ptr<Session> &session, std::shared_ptr<Slot> &slot) {
    session.reset();
    slot.reset();
  }

  static std::string finish_reason(int f, bool calls) {
    switch (f) {
      case DSRT_FINISH_LENGTH:
      case DSRT_FINISH_CONTEXT_FULL: return "length";
      default: return calls ? "tool_calls" : "stop";
    }
  }

  // ---- POST /v1/chat/completions

  void chat(const httplib::Request &req, httplib::Response &res) {
    auto g = std::make_shared<Gen>();
    const ChatRequest r = parse_chat_request(parse_body(req.body));
    check_model(r.model);
    const bool has_tools = !r.tools.is_null() && !r.tools.empty();
    const bool use_tools = has_tools && (r.tool_choice_named || r.tool_choice != "none");
    const bool force_call = use_tools && (r.tool_choice_named || r.tool_choice == "required");
    if (force_call && call_before_name.empty())
      throw ApiError(400, "this model's chat template does not write tool calls with DeepSeek's tool-call tokens, so tool_choice " +
                              std::string(r.tool_choice_named ? "naming a function" : "\"required\"") + " cannot be enforced",
                     "tool_choice", "unsupported_value");
    json messages = r.messages;
    if (use_tools && !template_shows_tools && !call_format.empty()) {  // after the request's system messages
      size_t at = 0;
      while (at < messages.size() && messages[at]["role"] == "system") at++;
      messages.insert(messages.begin() + std::ptrdiff_t(at), json{{"role", "system"}, {"content", tools_system_prompt(r.tools, call_format)}});
    }
    const std::string msgs = dump(messages), tools = use_tools ? dump(r.tools) : "",
                      kwargs = r.template_kwargs.is_null() ? "" : dump(r.template_kwargs);
    char *prompt = nullptr;
    size_t len = 0;
    dsrt_status st = dsrt_chat_apply_n(model, msgs.c_str(), use_tools ? tools.c_str() : nullptr,
                                       kwargs.empty() ? nullptr : kwargs.c_str(), DSRT_CHAT_ADD_GENERATION_PROMPT, &prompt, &len);
    if (st != DSRT_OK) throw ApiError(400, "the chat template cannot render these messages: " + dsrt_error(st), "messages");
    g->prompt_text.assign(prompt, len);
    dsrt_free(prompt);
    g->prompt = tokenize(g->prompt_text, DSRT_TOKENIZE_PARSE_SPECIAL);
    // R1-style templates end the generation prompt with <think>: the output starts inside the reasoning.
    std::string tail = g->prompt_text;
    while (!tail.empty() && (tail.back() == '\n' || tail.back() == ' ')) tail.pop_back();
    const std::string &tb = markers.think_begin_text;
    const bool in_reasoning = !tb.empty() && tail.size() >= tb.size() && tail.compare(tail.size() - tb.size(), tb.size(), tb) == 0;
    // tool_choice required / named: the assistant turn starts with the template's tool-call opening (and the
    // name), so the output is a call. A prompt left inside <think> closes it first: a call inside the reasoning
    // would not be one. The forced tokens are prompt tokens (usage.prompt_tokens counts them).
    std::vector<int32_t> forced;
    if (force_call) {
      std::string text = in_reasoning ? token_text(model, markers.think_end) + "\n\n" : "";
      text += call_before_name;
      if (r.tool_choice_named) text += r.tool_choice + call_after_name;
      forced = tokenize(text, DSRT_TOKENIZE_PARSE_SPECIAL);
      g->prompt.insert(g->prompt.end(), forced.begin(), forced.end());
      g->prompt_text += text;
    }
    prepare(r, *g);

    auto slot = std::make_shared<Slot>(*this);
    std::shared_ptr<Session> session = start(*g);
    auto parser = std::make_shared<OutputParser>(markers, use_tools, in_reasoning);
    const ParsedDelta opened = replay(*parser, forced);
    const std::string id = random_id("chatcmpl-"), name = opt.model_name;
    const int64_t created_at = unix_now();

    if (!r.stream) {
      res.set_chunked_content_provider(
          "application/json", [this, g, slot, session, parser, opened, id, name, created_at](size_t, httplib::DataSink &sink) mutable {
            std::string content, reasoning;
            std::vector<ToolCall> calls;
            auto absorb = [&](const ParsedDelta &d) {
              content += d.content;
              reasoning += d.reasoning;
              for (const auto &c : d.calls) {
                if (c.first) calls.push_back({c.id, c.name, ""});
                if (!calls.empty()) calls.back().arguments += c.arguments;
              }
            };
            absorb(opened);
            std::vector<TokenLogprob> lps;
            Outcome o;
            if (!run_for_client(*session, *g, sink, o,
                                [&](int32_t tok, const std::string &text, const TokenLogprob *lp) {
                                  if (lp) lps.push_back(*lp);
                                  absorb(parser->push(tok, text));
                                },
                                [&](const std::string &text) { absorb(parser->finish(text)); }))
              return false;
            Usage u{int64_t(g->prompt.size()), o.completion_tokens, o.cached_tokens};
            const std::string body = dump(chat_completion(id, created_at, name, content, reasoning, calls,
                                                          finish_reason(o.finish, !calls.empty()), u,
                                                          g->logprobs ? chat_logprobs(lps) : json(nullptr)));
            release(session, slot);
            if (!sink.write(body.data(), body.size())) return false;
            sink.done();
            return true;
          });
      return;
    }

    const bool include_usage = r.include_usage;
    res.set_header("Cache-Control", "no-cache");
    res.set_chunked_content_provider(
        "text/event-stream",
        [this, g, slot, session, parser, opened, id, name, created_at, include_usage](size_t, httplib::DataSink &sink) mutable {
          // Token logprobs wait for the next chunk sent (a token whose text is held back, a marker token), so
          // every token's entry is in exactly one chunk; what is left goes with the finish chunk.
          std::vector<TokenLogprob> lps;
          auto take_logprobs = [&]() -> json {
            if (lps.empty()) return nullptr;
            json j = chat_logprobs(lps);
            lps.clear();
            return j;
          };
          auto send = [&](const json &delta, const json &finish) {
            const std::string s = sse(chat_chunk(id, created_at, name, delta, finish, include_usage, take_logprobs()));
            return sink.write(s.data(), s.size());
          };
          bool ok = send({{"role", "assistant"}, {"content", ""}}, nullptr);
          auto emit = [&](const ParsedDelta &d) {
            if (!d.reasoning.empty()) ok = ok && send({{"reasoning_content", d.reasoning}}, nullptr);
            if (!d.content.empty()) ok = ok && send({{"content", d.content}}, nullptr);
            for (const auto &c : d.calls) {
              json tc = {{"index", c.index}, {"function", {{"arguments", c.arguments}}}};
              if (c.first) {
                tc["id"] = c.id;
                tc["type"] = "function";
                tc["function"]["name"] = c.name;
              }
              ok = ok && send({{"tool_calls", json::array({tc})}}, nullptr);
            }
            return ok;
          };
          if (!ok || !emit(opened)) {  // gone before the first token: nothing generated yet
            dsrt_session_cancel(session->s);
            metrics.cancelled();
            return false;
          }
          Outcome o = run(
              *session, *g,
              [&](int32_t tok, const std::string &text, const TokenLogprob *lp) {
                if (lp) lps.push_back(*lp);
                return emit(parser->push(tok, text));
              },
              [&](const std::string &text) { emit(parser->finish(text)); }, &sink);
          if (o.client_gone || !ok) return false;
          std::string tail;
          if (o.finish == DSRT_FINISH_ERROR) {
            tail = sse(error_body("generation failed: " + o.error, "server_error", "", ""));
          } else {
            tail = sse(chat_chunk(id, created_at, name, json::object(), finish_reason(o.finish, parser->n_calls() > 0), include_usage,
                                  take_logprobs()));
            if (include_usage)
              tail += sse(usage_chunk(id, created_at, name, "chat.completion.chunk",
                                      Usage{int64_t(g->prompt.size()), o.completion_tokens, o.cached_tokens}));
          }
          tail += sse_done();
          release(session, slot);
          if (!sink.write(tail.data(), tail.size())) return false;
          sink.done();
          return true;
        });
  }

  // ---- POST /v1/completions

  void completions(const httplib::Request &req, httplib::Response &res) {
    auto g = std::make_shared<Gen>();
    const CompletionRequest r = parse_completion_request(parse_body(req.body));
    check_model(r.model);
    if (r.prompt_is_tokens) {
      g->prompt = r.prompt_tokens;
    } else {
      g->prompt = tokenize(r.prompt, DSRT_TOKENIZE_ADD_SPECIAL | DSRT_TOKENIZE_PARSE_SPECIAL);
    }
    prepare(r, *g);
    g->score_prompt = r.echo && r.logprobs;
    g->no_turn = r.max_tokens && *r.max_tokens == 0;  // (the parser allows 0 only with echo)
    std::string echo;
    if (r.echo) {
      if (r.prompt_is_tokens) {
        std::vector<char> buf(g->prompt.size() * 16 + 64);
        size_t n = 0;
        dsrt_status st = dsrt_detokenize(model, g->prompt.data(), g->prompt.size(), DSRT_DETOKENIZE_SKIP_SPECIAL, buf.data(), buf.size(), &n);
        if (st == DSRT_ERR_BUFFER_TOO_SMALL) {
          buf.resize(n);
          st = dsrt_detokenize(model, g->prompt.data(), g->prompt.size(), DSRT_DETOKENIZE_SKIP_SPECIAL, buf.data(), buf.size(), &n);
        }
        if (st != DSRT_OK) throw ApiError(400, "cannot detokenize the prompt for 'echo': " + dsrt_error(st), "prompt");
        echo.assign(buf.data(), n);
      } else {
        echo = r.prompt;
      }
    }
    auto slot = std::make_shared<Slot>(*this);
    std::shared_ptr<Session> session = start(*g);
    const std::string id = random_id("cmpl-"), name = opt.model_name;
    const int64_t created_at = unix_now();
    if (!r.stream) {
      res.set_chunked_content_provider("application/json", [this, g, slot, session, id, name, created_at, echo](size_t, httplib::DataSink &sink) mutable {
        std::string text = echo;
        std::vector<TokenLogprob> lps = g->prompt_logprobs;
        std::vector<int64_t> offsets = g->prompt_offsets;  // each token's offset: the characters before it
        int64_t chars = prompt_chars(*g, text);
        Outcome o;
        if (g->no_turn) {
          o.finish = DSRT_FINISH_LENGTH;
        } else if (!run_for_client(*session, *g, sink, o,
                                   [&](int32_t, const std::string &t, const TokenLogprob *lp) {
                                     if (lp) {
                                       lps.push_back(*lp);
                                       offsets.push_back(chars);
                                     }
                                     text += t;
                                     chars += utf8_chars(t);
                                   },
                                   [&](const std::string &t) { text += t; })) {
          return false;
        }
        Usage u{int64_t(g->prompt.size()), o.completion_tokens, o.cached_tokens};
        const std::string body = dump(text_completion(id, created_at, name, text, finish_reason(o.finish, false), u,
                                                      g->logprobs ? completion_logprobs(lps, offsets) : json(nullptr)));
        release(session, slot);
        if (!sink.write(body.data(), body.size())) return false;
        sink.done();
        return true;
      });
      return;
    }
    const bool include_usage = r.include_usage;
    res.set_header("Cache-Control", "no-cache");
    res.set_chunked_content_provider(
        "text/event-stream",
        [this, g, slot, session, id, name, created_at, include_usage, echo](size_t, httplib::DataSink &sink) mutable {
          // As in chat: token logprobs go with the next chunk sent, what is left with the finish chunk.
          std::vector<TokenLogprob> lps = g->prompt_logprobs;  // (with echo: they go with the echoed text)
          std::vector<int64_t> offsets = g->prompt_offsets;
          int64_t chars = prompt_chars(*g, echo);
          auto take_logprobs = [&]() -> json {
            if (lps.empty()) return nullptr;
            json j = completion_logprobs(lps, offsets);
            lps.clear();
            offsets.clear();
            return j;
          };
          auto send = [&](const std::string &text) {
            const std::string s = sse(text_chunk(id, created_at, name, text, nullptr, include_usage, take_logprobs()));
            return sink.write(s.data(), s.size());
          };
          if ((!echo.empty() || !lps.empty()) && !send(echo)) {
            dsrt_session_cancel(session->s);
            metrics.cancelled();
            return false;
          }
          bool ok = true;
          Outcome o;
          if (g->no_turn) o.finish = DSRT_FINISH_LENGTH;
          else o = run(
              *session, *g,
              [&](int32_t, const std::string &t, const TokenLogprob *lp) {
                if (lp) {
                  lps.push_back(*lp);
                  offsets.push_back(chars);
                }
                chars += utf8_chars(t);
                return t.empty() || (ok = send(t));
              },
              [&](const std::string &t) {
                if (!t.empty()) ok = send(t);
              },
              &sink);
          if (o.client_gone || !ok) return false;
          std::string tail;
          if (o.finish == DSRT_FINISH_ERROR) {
            tail = sse(error_body("generation failed: " + o.error, "server_error", "", ""));
          } else {
            tail = sse(text_chunk(id, created_at, name, "", finish_reason(o.finish, false), include_usage, take_logprobs()));
            if (include_usage)
              tail += sse(usage_chunk(id, created_at, name, "text_completion", Usage{int64_t(g->prompt.size()), o.completion_tokens, o.cached_tokens}));
          }
          tail += sse_done();
          release(session, slot);
          if (!sink.write(tail.data(), tail.size())) return false;
          sink.done();
          return true;
        });
  }

  // ---- GET endpoints

  json model_object() const {
    return {{"id", opt.model_name}, {"object", "model"}, {"created", created}, {"owned_by", "dsrt"}, {"max_model_len", ctx}};
  }

  Gauges gauges() const {
    Gauges g;
    g.active_sessions = active.load();
    g.max_sessions = opt.max_sessions;
    dsrt_engine_stats es;
    std::memset(&es, 0, sizeof es);
    es.struct_size = sizeof es;
    if (dsrt_engine_stats_get(engine, &es) == DSRT_OK) {
      g.kv_pages_used = es.kv_pages_used;
      g.kv_pages_total = es.kv_pages_total;
      g.kv_page_tokens = es.kv_page_tokens;
      g.engine_steps = es.n_steps;
      g.engine_tokens = es.n_tokens;
      g.max_batch_seqs = es.max_batch_seqs;
      g.forward_seconds = es.forward_seconds;
    }
    dsrt_prefix_cache_stats pc;
    std::memset(&pc, 0, sizeof pc);
    pc.struct_size = sizeof pc;
    if (dsrt_engine_prefix_cache_stats(engine, &pc) == DSRT_OK) {
      g.prefix_hits = pc.hits;
      g.prefix_tokens = pc.cached_tokens;
      g.prefix_pages = pc.pages;
    }
    return g;
  }

  // Every handler: ApiError -> its JSON error; anything else -> 500, never a crash.
  httplib::Server::Handler guarded(void (Impl::*fn)(const httplib::Request &, httplib::Response &)) {
    return [this, fn](const httplib::Request &req, httplib::Response &res) {
      try {
        (this->*fn)(req, res);
      } catch (const ApiError &e) {
        send_error(res, e);
      } catch (const std::bad_alloc &) {
        send_error(res, ApiError(500, "out of memory", "", "", "server_error"));
      } catch (const std::exception &e) {
        send_error(res, ApiError(500, std::string("internal error: ") + e.what(), "", "", "server_error"));
      }
    };
  }

  void routes() {
    http.set_payload_max_length(opt.max_body_bytes);
    const size_t workers = size_t(opt.max_sessions) + 8;  // requests over the limit still get their 429 promptly
    http.new_task_queue = [workers] { return new httplib::ThreadPool(workers); };
    http.set_pre_routing_handler([this](const httplib::Request &req, httplib::Response &res) {
      if (opt.api_key.empty() || req.path == "/health") return httplib::Server::HandlerResponse::Unhandled;
      const std::string auth = req.get_header_value("Authorization");
      const std::string prefix = "Bearer ";
      if (auth.rfind(prefix, 0) == 0 && constant_time_equal(auth.substr(prefix.size()), opt.api_key))
        return httplib::Server::HandlerResponse::Unhandled;
      send_error(res, ApiError(401,
                               auth.empty() ? "You didn't provide an API key. Send it as 'Authorization: Bearer KEY'."
                                            : "Incorrect API key provided.",
                               "", "invalid_api_key", "invalid_request_error"));
      return httplib::Server::HandlerResponse::Handled;
    });
    http.set_error_handler(httplib::Server::HandlerWithResponse([](const httplib::Request &req, httplib::Response &res) {
      if (!res.body.empty()) return httplib::Server::HandlerResponse::Unhandled;
      std::string msg;
      if (res.status == 404) msg = "Unknown request URL: " + req.method + " " + req.path;
      else if (res.status == 413) msg = "The request body is too large.";
      else if (res.status == 400) msg = "Bad request.";
      else msg = "HTTP " + std::to_string(res.status);
      res.set_content(dump(error_body(msg, error_type_for_status(res.status), "", res.status == 413 ? "request_too_large" : "")),
                      "application/json");
      return httplib::Server::HandlerResponse::Handled;
    }));
    http.set_exception_handler([](const httplib::Request &, httplib::Response &res, std::exception_ptr) {
      send_error(res, ApiError(500, "internal error", "", "", "server_error"));
    });
    http.set_logger([this](const httplib::Request &req, const httplib::Response &res) {
      metrics.request(endpoint_label(req.path), res.status);
      if (opt.log_requests) std::fprintf(stderr, "dsrt serve: %s %s %d\n", req.method.c_str(), endpoint_label(req.path).c_str(), res.status);
    });
    http.Post("/v1/chat/completions", guarded(&Impl::chat));
    http.Post("/v1/completions", guarded(&Impl::completions));
    http.Get("/v1/models", [this](const httplib::Request &, httplib::Response &res) {
      res.set_content(dump(json{{"object", "list"}, {"data", json::array({model_object()})}}), "application/json");
    });
    http.Get("/v1/models/(.+)", [this](const httplib::Request &req, httplib::Response &res) {
      if (req.matches[1] != opt.model_name) {
        send_error(res, ApiError(404, "The model '" + std::string(req.matches[1]) + "' does not exist", "model", "model_not_found"));
        return;
      }
      res.set_content(dump(model_object()), "application/json");
    });
    http.Get("/health", [](const httplib::Request &, httplib::Response &res) {
      res.set_content("{\"status\":\"ok\"}", "application/json");
    });
    http.Get("/metrics", [this](const httplib::Request &, httplib::Response &res) {
      res.set_content(metrics.render(gauges()), "text/plain; version=0.0.4");
    });
  }
};

Server::Server(const Options &o) : impl_(std::make_unique<Impl>()) {
  Impl &I = *impl_;
  I.opt = o;
  if (o.max_sessions < 1) throw std::runtime_error("--max-sessions must be >= 1");
  if (dsrt_check_version(DSRT_API_VERSION) != DSRT_OK) throw std::runtime_error("libdsrt does not match dsrt.h: " + std::string(dsrt_last_error()));
  dsrt_model_params mp;
  dsrt_model_params_init(&mp, sizeof mp);
  mp.backend = o.backend;
  mp.n_threads = o.threads;
  mp.use_mmap = o.no_mmap ? 0 : 1;
  dsrt_status st = dsrt_model_load(o.model_dir.c_str(), &mp, &I.model);
  if (st != DSRT_OK) throw std::runtime_error("cannot load " + o.model_dir + ": " + dsrt_error(st));
  dsrt_model_info info;
  std::memset(&info, 0, sizeof info);
  info.struct_size = sizeof info;
  st = dsrt_model_info_get(I.model, &info);
  if (st != DSRT_OK) throw std::runtime_error(dsrt_error(st));
  I.n_vocab = info.n_vocab;
  dsrt_engine_params ep;
  dsrt_engine_params_init(&ep, sizeof ep);
  ep.max_tokens = o.kv_tokens > 0 ? o.kv_tokens : 0;  // 0: the engine's default pool
  if (o.max_batch_tokens > 0) ep.max_batch_tokens = o.max_batch_tokens;
  st = dsrt_engine_create(I.model, &ep, &I.engine);
  if (st != DSRT_OK) throw std::runtime_error("cannot create the engine: " + dsrt_error(st));
  dsrt_engine_stats es;
  std::memset(&es, 0, sizeof es);
  es.struct_size = sizeof es;
  st = dsrt_engine_stats_get(I.engine, &es);
  if (st != DSRT_OK) throw std::runtime_error(dsrt_error(st));
  const int pool = es.kv_pages_total * es.kv_page_tokens;
  if (o.ctx > pool)
    throw std::runtime_error("--ctx " + std::to_string(o.ctx) + " is larger than the KV pool (" + std::to_string(pool) +
                             " tokens): raise --kv-tokens");
  I.ctx = o.ctx > 0 ? o.ctx : std::min(pool, info.n_ctx_train > 0 ? info.n_ctx_train : pool);
  if (I.opt.model_name.empty()) {
    std::filesystem::path p(o.model_dir);
    if (!p.has_filename()) p = p.parent_path();
    I.opt.model_name = p.filename().string();
    if (I.opt.model_name.empty()) I.opt.model_name = "dsrt";
  }
  MarkerTokens &m = I.markers;
  m.think_begin = dsrt_special_token(I.model, DSRT_SPECIAL_THINK_BEGIN);
  m.think_end = dsrt_special_token(I.model, DSRT_SPECIAL_THINK_END);
  m.calls_begin = single_special(I.model, kCallsBegin);
  m.calls_end = single_special(I.model, "<｜tool▁calls▁end｜>");
  m.call_begin = single_special(I.model, "<｜tool▁call▁begin｜>");
  m.call_end = single_special(I.model, kCallEnd);
  m.sep = single_special(I.model, "<｜tool▁sep｜>");
  m.think_begin_text = visible_text(I.model, m.think_begin);
  m.think_end_text = visible_text(I.model, m.think_end);
  m.calls_begin_text = visible_text(I.model, m.calls_begin);
  m.calls_end_text = visible_text(I.model, m.calls_end);
  m.call_begin_text = visible_text(I.model, m.call_begin);
  m.call_end_text = visible_text(I.model, m.call_end);
  m.sep_text = visible_text(I.model, m.sep);
  // The generation prompt's <think> is in the rendered prompt text whether or not it is a control token.
  if (m.think_begin_text.empty()) m.think_begin_text = token_text(I.model, m.think_begin);
  I.probe_tool_call_format();
  I.routes();
}

Server::~Server() = default;

namespace {
// cpp-httplib 0.11 as Debian builds it listens with a backlog of 5 (CPPHTTPLIB_LISTEN_BACKLOG, fixed when the
// library was compiled), which a burst of clients connecting at once overflows (seen: a connection of 32 at
// once ending with no response on a loaded 2-core box). listen() again on a listening socket sets its backlog
// (Linux), and httplib does not hand out its socket: it is found among this process's by its port.
void widen_backlog(int port) {
  for (int fd = 0; fd < 4096; fd++) {
    int accepting = 0;
    socklen_t len = sizeof accepting;
    if (getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &accepting, &len) != 0 || !accepting) continue;
    sockaddr_storage a{};
    socklen_t alen = sizeof a;
    if (getsockname(fd, reinterpret_cast<sockaddr *>(&a), &alen) != 0) continue;
    const int p = a.ss_family == AF_INET    ? ntohs(reinterpret_cast<const sockaddr_in *>(&a)->sin_port)
                  : a.ss_family == AF_INET6 ? ntohs(reinterpret_cast<const sockaddr_in6 *>(&a)->sin6_port)
                                            : -1;
    if (p == port) ::listen(fd, SOMAXCONN);
  }
}
}  // namespace

int Server::bind() {
  Impl &I = *impl_;
  int port = I.opt.port;
  if (port == 0) {
    port = I.http.bind_to_any_port(I.opt.host);
    if (port <= 0) throw std::runtime_error("cannot bind to " + I.opt.host + " (an ephemeral port)");
  } else if (!I.http.bind_to_port(I.opt.host, port)) {
    throw std::runtime_error("cannot bind to " + I.opt.host + ":" + std::to_string(port));
  }
  widen_backlog(port);
  return port;
}

bool Server::listen() { return impl_->http.listen_after_bind(); }

void Server::stop() {
  {
    std::lock_guard lk(impl_->mu);
    impl_->stopping = true;
    for (dsrt_session *s : impl_->sessions) dsrt_session_cancel(s);
  }
  impl_->http.stop();
}

int Server::active_sessions() const { return impl_->active.load(); }
bool Server::is_running() const { return impl_->http.is_running(); }
const std::string &Server::model_name() const { return impl_->opt.model_name; }

// ---- command line

const char *usage_text() {
  return "usage: dsrt serve --model DIR [--host 127.0.0.1] [--port 8080] [--backend auto|cpu|cuda] [--api-key KEY]\n"
         "                  [--max-sessions N] [--ctx N] [--kv-tokens N] [--threads N] [--model-name NAME]\n"
         "                  [--max-body-bytes N] [--max-batch-tokens N] [--no-mmap] [--quiet]\n"
         "An OpenAI-compatible HTTP server: POST /v1/chat/completions, POST /v1/completions, GET /v1/models,\n"
         "GET /health, GET /metrics (Prometheus). Every request is a session of one engine (batched together).\n"
         "  --host H             address to bind (default 127.0.0.1: loopback only; 0.0.0.0 for every interface)\n"
         "  --port P             TCP port (default 8080; 0 picks a free one)\n"
         "  --api-key KEY        require 'Authorization: Bearer KEY' (also read from DSRT_API_KEY); /health is open\n"
         "  --max-sessions N     concurrent generating requests (default 16); more are refused with 429 + Retry-After\n"
         "  --ctx N              context per request, prompt + completion (default: the KV pool, at most the\n"
         "                       model's max_position_embeddings)\n"
         "  --kv-tokens N        KV pool over all requests, in tokens (default: the engine's, min(n_ctx_train, 16384))\n"
         "  --model-name NAME    the model id of /v1/models and requests (default: the directory's name)\n"
         "  --max-body-bytes N   larger request bodies get 413 (default 8 MiB)\n"
         "  --threads N          CPU threads (default: all)\n"
         "  --quiet              no per-request log line on stderr\n";
}

long long option_integer(const std::string &opt, const std::string &v, long long lo, long long hi) {
  char *end = nullptr;
  errno = 0;
  const long long n = std::strtoll(v.c_str(), &end, 10);
  if (v.empty() || *end || errno || n < lo || n > hi)
    throw std::invalid_argument(opt + " expects an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) + "], got \"" + v + "\"");
  return n;
}

Options parse_options(int argc, char **argv) {
  const auto integer = option_integer;
  Options o;
  if (const char *k = std::getenv("DSRT_API_KEY")) o.api_key = k;
  for (int i = 0; i < argc; i++) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw std::invalid_argument("option " + a + " needs a value");
      return argv[++i];
    };
    if (a == "--model") o.model_dir = value();
    else if (a == "--model-name") o.model_name = value();
    else if (a == "--host") o.host = value();
    else if (a == "--port") o.port = int(integer(a, value(), 0, 65535));
    else if (a == "--api-key") o.api_key = value();
    else if (a == "--max-sessions") o.max_sessions = int(integer(a, value(), 1, 4096));
    else if (a == "--ctx") o.ctx = int(integer(a, value(), 1, INT32_MAX));
    else if (a == "--kv-tokens") o.kv_tokens = int(integer(a, value(), 1, INT32_MAX));
    else if (a == "--max-batch-tokens") o.max_batch_tokens = int(integer(a, value(), 1, INT32_MAX));
    else if (a == "--threads") o.threads = int(integer(a, value(), 0, 65536));
    else if (a == "--max-body-bytes") o.max_body_bytes = size_t(integer(a, value(), 1024, (long long)1 << 34));
    else if (a == "--no-mmap") o.no_mmap = true;
    else if (a == "--quiet") o.log_requests = false;
    else if (a == "--backend") {
      const std::string b = value();
      if (b == "auto") o.backend = DSRT_BACKEND_AUTO;
      else if (b == "cpu") o.backend = DSRT_BACKEND_CPU;
      else if (b == "cuda") o.backend = DSRT_BACKEND_CUDA;
      else throw std::invalid_argument("--backend must be auto, cpu or cuda, not \"" + b + "\"");
    } else {
      throw std::invalid_argument("unknown option \"" + a + "\" (dsrt serve --help)");
    }
  }
  if (o.model_dir.empty()) throw std::invalid_argument("missing --model");
  return o;
}

}  // namespace dsrt::serve

int dsrt_serve_command(int argc, char **argv) {
  using namespace dsrt::serve;
  for (int i = 0; i < argc; i++)
    if (!std::strcmp(argv[i], "--help") || !std::strcmp(argv[i], "-h")) {
      std::fputs(usage_text(), stdout);
      return 0;
    }
  try {
    return run_serve(parse_options(argc, argv));
  } catch (const std::exception &e) {
    std::fprintf(stderr, "dsrt serve: %s\n", e.what());
    return 1;
  }
}

int run_serve(const dsrt::serve::Options &o) {
  using namespace dsrt::serve;
  try {
    // SIGINT/SIGTERM stop the server from a thread of ours (a signal handler may not take locks).
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &set, nullptr);  // before any thread starts, so every thread inherits it
    signal(SIGPIPE, SIG_IGN);
    Server srv(o);
    const int port = srv.bind();
    std::atomic<bool> finished{false};
    std::thread waiter([&srv, &finished, set] {
      int sig = 0;
      sigwait(&set, &sig);
      if (!finished.load()) {
        std::fprintf(stderr, "dsrt serve: stopping\n");
        srv.stop();
      }
    });
    std::fprintf(stderr, "dsrt serve: model '%s' on http://%s:%d (%s)\n", srv.model_name().c_str(), o.host.c_str(), port,
                 o.api_key.empty() ? "no API key" : "API key required");
    const bool ok = srv.listen();
    finished = true;
    if (waiter.joinable()) {
      pthread_kill(waiter.native_handle(), SIGTERM);  // wake the waiter if listen ended on its own
      waiter.join();
    }
    return ok ? 0 : 1;
  } catch (const std::exception &e) {
    std::fprintf(stderr, "dsrt serve: %s\n", e.what());
    return 1;
  }
}
