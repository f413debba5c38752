#include <cstdio>
#include <stdexcept>

#include "commands.h"
#include "options.h"

namespace dsrt::cli {

namespace {

// CLI11's help, with "usage:" as the rest of dsrt spells it.
class Formatter : public CLI::Formatter {
 public:
  std::string make_usage(const CLI::App *app, std::string name) const override {
    std::string s = CLI::Formatter::make_usage(app, name);
    const size_t p = s.find("Usage:");
    if (p != std::string::npos) s.replace(p, 6, "usage:");
    return s;
  }
};

std::string command_name(const CLI::App &app) {
  std::string name = app.get_name();
  for (const CLI::App *a = &app; !a->get_subcommands().empty();) {
    a = a->get_subcommands().front();
    name += " " + a->get_name();
  }
  return name;
}

}  // namespace

void setup_app(CLI::App &app) {
  app.formatter(std::make_shared<Formatter>());
  app.get_formatter()->column_width(34);
  app.option_defaults()->always_capture_default();
  app.set_help_flag("-h,--help", "print this help and exit");
}

int run_app(CLI::App &app, int argc, char **argv, const int &rc) {
  try {
    app.parse(argc, argv);
    return rc;
  } catch (const CLI::ParseError &e) {
    if (e.get_exit_code() == 0) return app.exit(e);  // --help, --version
    std::fprintf(stderr, "%s: %s (%s --help)\n", command_name(app).c_str(), e.what(), command_name(app).c_str());
    return 2;
  } catch (const Usage &u) {
    std::fprintf(stderr, "%s: %s\n", command_name(app).c_str(), u.msg.c_str());
    return 2;
  } catch (const Fail &f) {
    std::fprintf(stderr, "%s: %s\n", command_name(app).c_str(), f.msg.c_str());
  } catch (const std::exception &e) {
    std::fprintf(stderr, "%s: %s\n", command_name(app).c_str(), e.what());
  }
  return 1;
}

}  // namespace dsrt::cli
