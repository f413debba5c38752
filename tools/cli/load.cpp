#include "load.h"

#include "progress.h"

namespace dsrt::cli {

void load(const ModelOptions &mo, const EngineOptions &eo, Loaded &l, int max_tokens, dsrt_cancel *cancel,
          const dsrt_dist_params *dist) {
  dsrt_model_params mp = model_params(mo);
  Progress progress(mo.quiet);
  if (progress.enabled()) {
    mp.progress_fn = Progress::load_callback;
    mp.progress_user_data = &progress;
  }
  mp.cancel = cancel;
  const dsrt_status st = dsrt_model_load(mo.model.c_str(), &mp, &l.model);
  progress.finish();
  check(st);
  check_mtp(eo, l.model);
  const dsrt_engine_params ep = engine_params(eo, max_tokens);
  check(dist ? dsrt_engine_create_dist(l.model, &ep, dist, &l.engine) : dsrt_engine_create(l.model, &ep, &l.engine));
}

void load_tokenizer_only(const std::string &dir, Loaded &l) {
  dsrt_model_params mp;
  dsrt_model_params_init(&mp, sizeof mp);
  mp.tokenizer_only = 1;
  check(dsrt_model_load(dir.c_str(), &mp, &l.model));
}

}  // namespace dsrt::cli
