// Greedy generation with the installed accelcore library.
//
// usage: accelcore_example MODEL_DIR [-n MAX_TOKENS] [TOKEN_ID ...]
//
// Loads the Hugging Face model directory, generates MAX_TOKENS (default 16) tokens greedily after
// the prompt ids (default 1 403 407 261 378, "<s> Once upon a time" in the stories260K
// vocabulary) and prints the generated ids on one line:
//
//   generated_ids: 432 383 286 ...
#include <accelcore/accelcore.h>

#include <cstdlib>
#include <iostream>
#include <string>
#include <vector>

namespace {

int usage(const char* argv0) {
  std::cerr << "usage: " << argv0 << " MODEL_DIR [-n MAX_TOKENS] [TOKEN_ID ...]\n";
  return 2;
}

bool parse_int(const std::string& s, long* out) {
  if (s.empty()) return false;
  char* end = nullptr;
  *out = std::strtol(s.c_str(), &end, 10);
  return end != nullptr && *end == '\0';
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) return usage(argv[0]);
  accelcore::EngineConfig config;
  config.model_path = argv[1];
  int max_tokens = 16;
  std::vector<int32_t> prompt;
  for (int i = 2; i < argc; ++i) {
    const std::string arg = argv[i];
    long v = 0;
    if (arg == "-n" && i + 1 < argc && parse_int(argv[i + 1], &v)) {
      max_tokens = static_cast<int>(v);
      ++i;
    } else if (parse_int(arg, &v)) {
      prompt.push_back(static_cast<int32_t>(v));
    } else {
      return usage(argv[0]);
    }
  }
  if (prompt.empty()) prompt = {1, 403, 407, 261, 378};

  try {
    accelcore::Engine engine(config);
    accelcore::SamplingParams params;
    params.temperature = 0.0f;  // greedy
    params.max_tokens = max_tokens;
    const accelcore::RequestId id = engine.add_request(prompt, params);

    std::vector<int32_t> generated;
    while (engine.has_unfinished_requests()) {
      for (const accelcore::RequestOutput& out : engine.step()) {
        if (out.request_id != id) continue;
        generated.insert(generated.end(), out.new_token_ids.begin(), out.new_token_ids.end());
        if (out.finished) {
          std::cerr << "finished: " << accelcore::finish_reason_name(out.finish_reason) << "\n";
        }
      }
    }
    std::cerr << "accelcore " << accelcore::version() << ", " << engine.model_info().architecture << ", cpu isa "
              << accelcore::cpu_isa() << "\n";
    std::cout << "generated_ids:";
    for (int32_t t : generated) std::cout << ' ' << t;
    std::cout << std::endl;
  } catch (const accelcore::Error& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
