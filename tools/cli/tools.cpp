// make-tiny (random checkpoints in the published layout) and info (version, build, devices).
#include <cstdio>
#include <memory>

#include "commands.h"
#include "options.h"
#include "tiny_model.h"

namespace dsrt::cli {

void add_tool_commands(CLI::App &app, int &rc) {
  struct TinyOptions {
    std::string preset, out;
    uint64_t seed = 1;
    double route_skew = 0.0;
    int64_t layers = 0;
    bool list = false;
  };
  auto o = std::make_shared<TinyOptions>();
  auto *mk = app.add_subcommand("make-tiny", "write a random tiny checkpoint in the published layout");
  std::string presets = "Presets:\n";
  for (auto &p : dsrt::tools::tiny_presets()) presets += "  " + p.name + std::string(p.name.size() < 16 ? 16 - p.name.size() : 1, ' ') + p.description + "\n";
  mk->footer(presets + "The weights are random: the text a tiny model writes is nonsense.");
  auto *list = mk->add_flag("--list", o->list, "list the presets");
  mk->add_option("--preset", o->preset, "the preset")->excludes(list)->type_name("NAME");
  mk->add_option("--out", o->out, "the directory to write")->excludes(list)->type_name("DIR");
  mk->add_option("--seed", o->seed, "random seed of the weights");
  mk->add_option("--route-skew", o->route_skew,
                 "S: fit each MoE layer's e_score_correction_bias so that expert popularity is Zipf-like with exponent S "
                 "(0: the random biases, near-uniform routing)")
      ->check(CLI::Range(0.0, 8.0))
      ->capture_default_str();
  mk->add_option("--layers", o->layers,
                 "N: hidden layers instead of the preset's (its first_k_dense_replace dense, the rest MoE; the MTP layer, "
                 "if any, after them)")
      ->check(CLI::Range(int64_t(1), int64_t(4096)))
      ->type_name("N");
  mk->callback([o, &rc] {
    if (o->list) {
      for (auto &p : dsrt::tools::tiny_presets()) std::printf("  %-16s %s\n", p.name.c_str(), p.description.c_str());
      rc = 0;
      return;
    }
    if (o->preset.empty() || o->out.empty()) throw Usage{"--preset and --out are required (--list shows the presets)"};
    const auto *p = dsrt::tools::find_tiny_preset(o->preset);
    if (!p) throw Usage{"--preset: unknown preset \"" + o->preset + "\" (dsrt make-tiny --list)"};
    dsrt::tools::make_tiny_model(o->layers ? dsrt::tools::with_layers(*p, o->layers) : *p, o->out, o->seed, o->route_skew);
    std::fprintf(stderr, "wrote %s to %s\n", o->preset.c_str(), o->out.c_str());
    rc = 0;
  });

  auto *info = app.add_subcommand("info", "version, build and devices");
  info->footer("Prints the version, then one JSON object: CPU threads, whether CUDA was built, the GPUs.");
  info->callback([&rc] {
    char *json = nullptr;
    check(dsrt_system_info(&json));
    std::printf("dsrt %s\n%s\n", dsrt_version_string(), json);
    dsrt_free(json);
    rc = 0;
  });
}

}  // namespace dsrt::cli
