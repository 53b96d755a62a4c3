// accelcore._core: binds the C++ API and nothing else. Errors map to Python exceptions:
// NotFound -> FileNotFoundError, InvalidArgument/FormatError/Unsupported -> ValueError.
#include <accelcore/accelcore.h>
#include <nanobind/nanobind.h>
#include <nanobind/stl/function.h>
#include <nanobind/stl/map.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

namespace nb = nanobind;
using namespace nb::literals;
using namespace accelcore;

NB_MODULE(_core, m) {
  m.doc() = "accelcore C++ core";

  // One translator for all accelcore errors (a second one registered later would be tried first
  // and swallow the subclasses). InternalError and other Errors surface as AccelcoreError.
  static PyObject* accel_error = PyErr_NewException("accelcore.AccelcoreError", PyExc_RuntimeError, nullptr);
  m.attr("AccelcoreError") = nb::handle(accel_error);
  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const NotFound& e) {
      PyErr_SetString(PyExc_FileNotFoundError, e.what());
    } catch (const InvalidArgument& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    } catch (const FormatError& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    } catch (const Unsupported& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    } catch (const Error& e) {
      PyErr_SetString(accel_error, e.what());
    }
  });

  nb::class_<SamplingParams>(m, "SamplingParams")
      .def(
          "__init__",
          [](SamplingParams* self, int max_tokens, float temperature, int top_k, float top_p,
             std::optional<uint64_t> seed, std::vector<int32_t> stop_token_ids, bool ignore_eos,
             std::optional<int> logprobs, std::optional<int> prompt_logprobs) {
            new (self) SamplingParams();
            self->max_tokens = max_tokens;
            self->temperature = temperature;
            self->top_k = top_k;
            self->top_p = top_p;
            self->seed = seed;
            self->stop_token_ids = std::move(stop_token_ids);
            self->ignore_eos = ignore_eos;
            self->logprobs = logprobs.value_or(-1);
            self->prompt_logprobs = prompt_logprobs.value_or(-1);
            self->validate();
          },
          "max_tokens"_a = 16, "temperature"_a = 1.0f, "top_k"_a = -1, "top_p"_a = 1.0f, "seed"_a = nb::none(),
          "stop_token_ids"_a = std::vector<int32_t>{}, "ignore_eos"_a = false, "logprobs"_a = nb::none(),
          "prompt_logprobs"_a = nb::none())
      .def_rw("max_tokens", &SamplingParams::max_tokens)
      .def_rw("temperature", &SamplingParams::temperature)
      .def_rw("top_k", &SamplingParams::top_k)
      .def_rw("top_p", &SamplingParams::top_p)
      .def_rw("seed", &SamplingParams::seed)
      .def_rw("stop_token_ids", &SamplingParams::stop_token_ids)
      .def_rw("ignore_eos", &SamplingParams::ignore_eos)
      .def_prop_rw(
          "logprobs", [](const SamplingParams& s) { return s.logprobs < 0 ? std::nullopt : std::optional<int>(s.logprobs); },
          [](SamplingParams& s, std::optional<int> v) { s.logprobs = v.value_or(-1); })
      .def_prop_rw(
          "prompt_logprobs",
          [](const SamplingParams& s) { return s.prompt_logprobs < 0 ? std::nullopt : std::optional<int>(s.prompt_logprobs); },
          [](SamplingParams& s, std::optional<int> v) { s.prompt_logprobs = v.value_or(-1); })
      .def("validate", &SamplingParams::validate)
      .def("__repr__", [](const SamplingParams& s) {
        return "SamplingParams(max_tokens=" + std::to_string(s.max_tokens) + ", temperature=" +
               std::to_string(s.temperature) + ", top_k=" + std::to_string(s.top_k) + ", top_p=" +
               std::to_string(s.top_p) + ", seed=" + (s.seed ? std::to_string(*s.seed) : "None") + ")";
      });

  nb::class_<EngineConfig>(m, "EngineConfig")
      .def(nb::init<>())
      .def_rw("model_path", &EngineConfig::model_path)
      .def_rw("dtype", &EngineConfig::dtype)
      .def_rw("device", &EngineConfig::device)
      .def_rw("num_threads", &EngineConfig::num_threads)
      .def_rw("block_size", &EngineConfig::block_size)
      .def_rw("num_kv_blocks", &EngineConfig::num_kv_blocks)
      .def_rw("kv_cache_memory_bytes", &EngineConfig::kv_cache_memory_bytes)
      .def_rw("max_num_seqs", &EngineConfig::max_num_seqs)
      .def_rw("max_num_batched_tokens", &EngineConfig::max_num_batched_tokens)
      .def_rw("max_model_len", &EngineConfig::max_model_len)
      .def_rw("enable_prefix_caching", &EngineConfig::enable_prefix_caching)
      .def_rw("speculation", &EngineConfig::speculation)
      .def_rw("spec_policy", &EngineConfig::spec_policy)
      .def_rw("spec_max_draft", &EngineConfig::spec_max_draft)
      .def_rw("spec_max_depth", &EngineConfig::spec_max_depth)
      .def_rw("spec_max_match", &EngineConfig::spec_max_match)
      .def_rw("spec_memory_mb", &EngineConfig::spec_memory_mb)
      .def_rw("quantization", &EngineConfig::quantization)
      .def_rw("quant_group_size", &EngineConfig::quant_group_size)
      .def_rw("quant_a8_fraction", &EngineConfig::quant_a8_fraction)
      .def_rw("quant_calibration", &EngineConfig::quant_calibration)
      .def_rw("kv_cache_dtype", &EngineConfig::kv_cache_dtype)
      .def_rw("quant_progress", &EngineConfig::quant_progress)
      .def_rw("quant_method", &EngineConfig::quant_method)
      .def_rw("seed", &EngineConfig::seed);

  nb::class_<RequestMetrics>(m, "RequestMetrics")
      .def_ro("ttft_s", &RequestMetrics::ttft_s)
      .def_ro("tpot_s", &RequestMetrics::tpot_s)
      .def_ro("e2e_s", &RequestMetrics::e2e_s)
      .def_ro("num_cached_tokens", &RequestMetrics::num_cached_tokens)
      .def_ro("num_preemptions", &RequestMetrics::num_preemptions)
      .def_ro("num_steps", &RequestMetrics::num_steps)
      .def_ro("num_draft_tokens", &RequestMetrics::num_draft_tokens)
      .def_ro("num_accepted_draft_tokens", &RequestMetrics::num_accepted_draft_tokens);

  nb::class_<RequestOutput>(m, "RequestOutput")
      .def_ro("request_id", &RequestOutput::request_id)
      .def_ro("new_token_ids", &RequestOutput::new_token_ids)
      .def_ro("new_logprobs", &RequestOutput::new_logprobs)
      .def_ro("prompt_logprobs", &RequestOutput::prompt_logprobs)
      .def_ro("finished", &RequestOutput::finished)
      .def_ro("error", &RequestOutput::error)
      .def_ro("metrics", &RequestOutput::metrics)
      .def_prop_ro("finish_reason", [](const RequestOutput& o) -> std::optional<std::string> {
        if (o.finish_reason == FinishReason::kNone) return std::nullopt;
        return std::string(finish_reason_name(o.finish_reason));
      });

  nb::class_<ModelInfo>(m, "ModelInfo")
      .def_ro("architecture", &ModelInfo::architecture)
      .def_ro("vocab_size", &ModelInfo::vocab_size)
      .def_ro("hidden_size", &ModelInfo::hidden_size)
      .def_ro("num_layers", &ModelInfo::num_layers)
      .def_ro("max_model_len", &ModelInfo::max_model_len)
      .def_ro("eos_token_ids", &ModelInfo::eos_token_ids)
      .def_ro("bos_token_id", &ModelInfo::bos_token_id);

  nb::class_<EngineStats>(m, "EngineStats")
      .def_ro("num_running", &EngineStats::num_running)
      .def_ro("num_waiting", &EngineStats::num_waiting)
      .def_ro("num_free_blocks", &EngineStats::num_free_blocks)
      .def_ro("num_total_blocks", &EngineStats::num_total_blocks)
      .def_ro("num_cached_blocks", &EngineStats::num_cached_blocks)
      .def_ro("kv_block_bytes", &EngineStats::kv_block_bytes)
      .def_ro("kv_cache_bytes", &EngineStats::kv_cache_bytes)
      .def_ro("num_staged_blocks", &EngineStats::num_staged_blocks)
      .def_ro("block_size", &EngineStats::block_size)
      .def_ro("num_steps", &EngineStats::num_steps)
      .def_ro("num_generated_tokens", &EngineStats::num_generated_tokens)
      .def_ro("num_prompt_tokens", &EngineStats::num_prompt_tokens)
      .def_ro("num_preemptions", &EngineStats::num_preemptions)
      .def_ro("prefix_cache_hit_tokens", &EngineStats::prefix_cache_hit_tokens)
      .def_ro("prefix_cache_query_tokens", &EngineStats::prefix_cache_query_tokens)
      .def_ro("step_time_s", &EngineStats::step_time_s)
      .def_ro("forward_time_s", &EngineStats::forward_time_s)
      .def_ro("schedule_time_s", &EngineStats::schedule_time_s)
      .def_ro("spec_policy", &EngineStats::spec_policy)
      .def_ro("num_draft_tokens", &EngineStats::num_draft_tokens)
      .def_ro("num_accepted_draft_tokens", &EngineStats::num_accepted_draft_tokens)
      .def_ro("last_step_draft_tokens", &EngineStats::last_step_draft_tokens)
      .def_ro("last_step_drafted_seqs", &EngineStats::last_step_drafted_seqs)
      .def_ro("spec_acceptance", &EngineStats::spec_acceptance)
      .def_ro("spec_acceptance_sampled", &EngineStats::spec_acceptance_sampled)
      .def_ro("step_time_coefficients", &EngineStats::step_time_coefficients)
      .def_ro("spec_lookup_cost_s", &EngineStats::spec_lookup_cost_s)
      .def_ro("spec_calibration", &EngineStats::spec_calibration)
      .def_ro("spec_calibration_sampled", &EngineStats::spec_calibration_sampled)
      .def_ro("spec_guard_plain_tok_s", &EngineStats::spec_guard_plain_tok_s)
      .def_ro("spec_guard_drafted_tok_s", &EngineStats::spec_guard_drafted_tok_s);

  nb::class_<Engine>(m, "Engine")
      .def(nb::init<const EngineConfig&>(), "config"_a, nb::call_guard<nb::gil_scoped_release>())
      .def("add_request", &Engine::add_request, "prompt_token_ids"_a, "params"_a,
           nb::call_guard<nb::gil_scoped_release>())
      .def("step", &Engine::step, nb::call_guard<nb::gil_scoped_release>())
      .def("abort", &Engine::abort, "request_id"_a, nb::call_guard<nb::gil_scoped_release>())
      .def("has_unfinished_requests", &Engine::has_unfinished_requests)
      .def("stats", &Engine::stats)
      .def_prop_ro("model_info", &Engine::model_info, nb::rv_policy::reference_internal)
      .def_prop_ro("config", &Engine::config, nb::rv_policy::reference_internal)
      .def("save_quantized", &Engine::save_quantized, "out_dir"_a, nb::call_guard<nb::gil_scoped_release>());

  m.def("cuda_available", &cuda_available);
  m.def("cuda_compiled", &cuda_compiled);
  m.def("cpu_isa", &cpu_isa);
  m.def("version", &version);
}
