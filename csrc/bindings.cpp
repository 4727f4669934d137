// Python bindings of the C++ core: nudge_engine._core.
// Errors: std::invalid_argument -> ValueError, std::runtime_error -> RuntimeError.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstddef>
#include <new>
#include <stdexcept>
#include <string>

#include "batch_builder.h"
#include "block_pool.h"
#include "handoff_walk.h"
#include "round_ops.h"
#include "pass_fit.h"
#include "round_plan.h"
#include "scheduler.h"
#include "sequence.h"

namespace py = pybind11;
using namespace nudge;

namespace {

// Arrays of one batch share one allocation; each starts on its own cache line.
constexpr size_t kArrayAlignment = 64;

size_t aligned(size_t bytes) {
  return (bytes + kArrayAlignment - 1) / kArrayAlignment * kArrayAlignment;
}

template <typename T>
T* view(std::byte* buffer, size_t offset) {
  return reinterpret_cast<T*>(buffer + offset);
}

// The numpy arrays of one build_batch() call. They own a fresh buffer (no later call
// overwrites it), so they are left writable: torch.from_numpy warns on read-only arrays.
struct BatchArrays {
  py::array_t<int64_t> input_ids, positions, slot_mapping, logits_indices;
  py::array_t<int32_t> query_start_loc, seq_lens, block_tables;
  BatchShape shape;
};

BatchArrays build_batch(const SequenceList& seqs, const std::vector<int64_t>& num_new,
                        int64_t block_size) {
  const BatchShape shape = measure_batch(seqs, num_new, block_size);
  const size_t tokens = static_cast<size_t>(shape.num_tokens);
  const size_t rows = static_cast<size_t>(shape.num_seqs);
  const size_t table_cells = rows * static_cast<size_t>(shape.max_blocks);

  // Byte offsets of the arrays inside the one buffer.
  size_t total = 0;
  auto place = [&total](size_t bytes) {
    const size_t at = total;
    total += aligned(bytes);
    return at;
  };
  const size_t input_ids_at = place(tokens * sizeof(int64_t));
  const size_t positions_at = place(tokens * sizeof(int64_t));
  const size_t slot_mapping_at = place(tokens * sizeof(int64_t));
  const size_t logits_indices_at = place(rows * sizeof(int64_t));
  const size_t query_start_loc_at = place((rows + 1) * sizeof(int32_t));
  const size_t seq_lens_at = place(rows * sizeof(int32_t));
  const size_t block_tables_at = place(table_cells * sizeof(int32_t));

  auto* buffer = static_cast<std::byte*>(::operator new(total, std::align_val_t(kArrayAlignment)));
  // The capsule frees the buffer when the last array that views it goes away.
  py::capsule owner(buffer, [](void* p) { ::operator delete(p, std::align_val_t(kArrayAlignment)); });

  const BatchBuffers out{
      view<int64_t>(buffer, input_ids_at),       view<int64_t>(buffer, positions_at),
      view<int64_t>(buffer, slot_mapping_at),    view<int32_t>(buffer, query_start_loc_at),
      view<int32_t>(buffer, seq_lens_at),        view<int32_t>(buffer, block_tables_at),
      view<int64_t>(buffer, logits_indices_at),
  };
  fill_batch(seqs, num_new, block_size, shape, out);

  const auto n_tokens = static_cast<py::ssize_t>(tokens);
  const auto n_rows = static_cast<py::ssize_t>(rows);
  BatchArrays arrays;
  arrays.shape = shape;
  arrays.input_ids = py::array_t<int64_t>({n_tokens}, out.input_ids, owner);
  arrays.positions = py::array_t<int64_t>({n_tokens}, out.positions, owner);
  arrays.slot_mapping = py::array_t<int64_t>({n_tokens}, out.slot_mapping, owner);
  arrays.logits_indices = py::array_t<int64_t>({n_rows}, out.logits_indices, owner);
  arrays.query_start_loc = py::array_t<int32_t>({n_rows + 1}, out.query_start_loc, owner);
  arrays.seq_lens = py::array_t<int32_t>({n_rows}, out.seq_lens, owner);
  arrays.block_tables = py::array_t<int32_t>(
      {n_rows, static_cast<py::ssize_t>(shape.max_blocks)}, out.block_tables, owner);
  return arrays;
}


template <typename T>
using Array = py::array_t<T, py::array::c_style | py::array::forcecast>;

// Reads each input array with its length checked against what the walk expects.
template <typename T>
const T* checked(const Array<T>& a, py::ssize_t n, const char* name) {
  if (a.ndim() != 1 || a.shape(0) != n) {
    throw std::invalid_argument(std::string("handoff_walk: ") + name + " must have shape [" +
                                std::to_string(n) + "]");
  }
  return a.data();
}

py::tuple handoff_walk_numpy(const Array<int64_t>& argmax, const Array<float>& top1, const Array<int64_t>& drafts,
                             const Array<int32_t>& pos_start, const Array<int32_t>& mode, const Array<int32_t>& run,
                             const Array<float>& gamma, const Array<uint8_t>& resume_on_agreement,
                             const Array<uint8_t>& word_start) {
  const py::ssize_t num_pos = drafts.ndim() == 1 ? drafts.shape(0) : -1;
  const py::ssize_t num_req = mode.ndim() == 1 ? mode.shape(0) : -1;
  if (num_pos < 0 || num_req < 0 || word_start.ndim() != 1) {
    throw std::invalid_argument("handoff_walk: every input must be one-dimensional");
  }
  WalkInputs in{checked(argmax, num_pos, "argmax"), checked(top1, num_pos, "top1"), drafts.data(),
                checked(pos_start, num_req + 1, "pos_start"), mode.data(), checked(run, num_req, "run"),
                checked(gamma, num_req, "gamma"), checked(resume_on_agreement, num_req, "resume_on_agreement"),
                word_start.data(), num_req, num_pos, word_start.shape(0)};
  py::array_t<int32_t> num_accepted(num_req), new_mode(num_req), new_run(num_req);
  py::array_t<int64_t> emit_token(num_req);
  py::array_t<int8_t> source(num_pos);
  WalkOutputs out{num_accepted.mutable_data(), emit_token.mutable_data(), new_mode.mutable_data(),
                  new_run.mutable_data(), source.mutable_data()};
  handoff_walk(in, out);
  return py::make_tuple(num_accepted, emit_token, new_mode, new_run, source);
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "nudge_engine C++ core: KV block pools, sequences, scheduler, batch builder";
  m.attr("NO_BLOCK") = kNoBlock;
  m.attr("NO_LOGITS") = kNoLogits;

  py::class_<BlockPool, std::shared_ptr<BlockPool>>(m, "BlockPool",
                                                    "Fixed set of KV blocks with reference counts.")
      .def(py::init<int64_t, int64_t, bool>(), py::arg("num_blocks"), py::arg("block_size"),
           py::arg("enable_prefix_caching") = false)
      .def("allocate", &BlockPool::allocate,
           "Take a free block (ref count 1). RuntimeError when the pool is exhausted.")
      .def("incref", &BlockPool::incref, py::arg("block"))
      .def("decref", &BlockPool::decref, py::arg("block"),
           "Drop one reference; at zero the block is free again.")
      .def("ref_count", &BlockPool::ref_count, py::arg("block"))
      .def("all_free", &BlockPool::all_free)
      .def("can_allocate", &BlockPool::can_allocate, py::arg("n"))
      .def("is_cached", &BlockPool::is_cached, py::arg("block"),
           "Whether the block is registered in the prefix cache (referenced or not).")
      .def("reset_prefix_cache", &BlockPool::reset_prefix_cache,
           "Forget every unreferenced cached block (they stay free). Returns how many.")
      .def_property_readonly("num_free", &BlockPool::num_free,
                             "Blocks nobody references: uncached free ones and evictable cached ones.")
      .def_property_readonly("num_cached", &BlockPool::num_cached,
                             "Blocks registered in the prefix cache, referenced or not.")
      .def_property_readonly("num_evictable", &BlockPool::num_evictable,
                             "Cached blocks nobody references (counted in num_free).")
      .def_property_readonly("enable_prefix_caching", &BlockPool::prefix_caching)
      .def_property_readonly("prefix_cache_hit_tokens", &BlockPool::hit_tokens)
      .def_property_readonly("prefix_cache_query_tokens", &BlockPool::query_tokens)
      .def_property_readonly("prefix_cache_evictions", &BlockPool::evictions)
      .def_property_readonly("num_blocks", &BlockPool::num_blocks)
      .def_property_readonly("block_size", &BlockPool::block_size)
      .def("__repr__", [](const BlockPool& p) {
        return "BlockPool(num_blocks=" + std::to_string(p.num_blocks()) +
               ", block_size=" + std::to_string(p.block_size()) +
               ", num_free=" + std::to_string(p.num_free()) +
               ", num_cached=" + std::to_string(p.num_cached()) + ")";
      });

  py::class_<Sequence, std::shared_ptr<Sequence>>(
      m, "Sequence", "One model's view of one request: its tokens and its KV blocks.")
      .def(py::init<std::shared_ptr<BlockPool>>(), py::arg("pool"))
      .def("append", py::overload_cast<int64_t>(&Sequence::append), py::arg("ids"))
      .def("append", py::overload_cast<const std::vector<int64_t>&>(&Sequence::append),
           py::arg("ids"))
      .def("set_num_computed", &Sequence::set_num_computed, py::arg("n"))
      .def("append_provisional", &Sequence::append_provisional, py::arg("placeholders"),
           "Append drafts picked on the device (values unknown here): not cached until overwrite().")
      .def("overwrite", &Sequence::overwrite, py::arg("start"), py::arg("tokens"),
           "tokens[start:start + len(tokens)] = tokens (placeholder drafts get their values).")
      .def("truncate", &Sequence::truncate, py::arg("n"),
           "Keep tokens[:n]; free the blocks not needed for n slots.")
      .def("blocks_needed", &Sequence::blocks_needed, py::arg("total_slots"))
      .def("reserve", &Sequence::reserve, py::arg("total_slots"),
           "Give positions [0, total_slots) slots. All-or-nothing: False when the pool is short.")
      .def("release", &Sequence::release, "Free every block; num_computed = 0; tokens kept.")
      .def("match_cached_prefix", &Sequence::match_cached_prefix,
           "With no block yet: take the cached full blocks of the tokens (never the last token). "
           "Returns the tokens taken.")
      .def_property("reuse_cached_prefix", &Sequence::reuse_cached_prefix,
                    &Sequence::set_reuse_cached_prefix,
                    "False: never take cached blocks (still registers its own).")
      .def_property_readonly("num_cached_tokens", &Sequence::num_cached_tokens)
      .def_property_readonly("num_hashed_blocks", &Sequence::num_hashed_blocks)
      .def_property_readonly("tokens", &Sequence::tokens)
      .def_property_readonly("block_table", &Sequence::block_table)
      .def_property_readonly("pool", &Sequence::pool)
      .def_property_readonly("num_tokens", &Sequence::num_tokens)
      .def_property_readonly("num_computed", &Sequence::num_computed)
      .def_property_readonly("num_reserved_slots", &Sequence::num_reserved_slots)
      .def("__repr__", [](const Sequence& s) {
        return "Sequence(num_tokens=" + std::to_string(s.num_tokens()) +
               ", num_computed=" + std::to_string(s.num_computed()) +
               ", num_blocks=" + std::to_string(s.block_table().size()) + ")";
      });

  py::class_<ScheduledStep>(m, "ScheduledStep", "What one Scheduler.schedule() call decided.")
      .def_readonly("req_ids", &ScheduledStep::req_ids)
      .def_readonly("num_new_tokens", &ScheduledStep::num_new_tokens)
      .def_readonly("is_final_chunk", &ScheduledStep::is_final_chunk)
      .def_readonly("preempted", &ScheduledStep::preempted)
      .def("__repr__", [](const ScheduledStep& s) {
        return "ScheduledStep(num_reqs=" + std::to_string(s.req_ids.size()) +
               ", num_preempted=" + std::to_string(s.preempted.size()) + ")";
      });

  py::class_<Scheduler>(m, "Scheduler", "Continuous batching over one KV pool per model.")
      .def(py::init<std::vector<std::shared_ptr<BlockPool>>, int64_t, int64_t>(),
           py::arg("pools"), py::arg("max_num_seqs"), py::arg("max_num_batched_tokens"))
      .def("add_request", &Scheduler::add_request, py::arg("req_id"), py::arg("seqs"))
      .def("set_lookahead", &Scheduler::set_lookahead, py::arg("req_id"), py::arg("lookahead"))
      .def("finish", &Scheduler::finish, py::arg("req_id"))
      .def("abort", &Scheduler::abort, py::arg("req_id"))
      .def("schedule", &Scheduler::schedule)
      .def("has_request", &Scheduler::has_request, py::arg("req_id"))
      .def("seqs", &Scheduler::seqs, py::arg("req_id"), "The request's sequences, one per model.")
      .def("has_unfinished", &Scheduler::has_unfinished)
      .def("running_ids", &Scheduler::running_ids)
      .def("waiting_ids", &Scheduler::waiting_ids)
      .def_property_readonly("num_running", &Scheduler::num_running)
      .def_property_readonly("num_waiting", &Scheduler::num_waiting)
      .def_property_readonly("num_models", &Scheduler::num_models);

  py::class_<BatchArrays>(m, "BatchArrays", "Flat arrays of one model pass (numpy, zero-copy).")
      .def_readonly("input_ids", &BatchArrays::input_ids)
      .def_readonly("positions", &BatchArrays::positions)
      .def_readonly("slot_mapping", &BatchArrays::slot_mapping)
      .def_readonly("query_start_loc", &BatchArrays::query_start_loc)
      .def_readonly("seq_lens", &BatchArrays::seq_lens)
      .def_readonly("block_tables", &BatchArrays::block_tables)
      .def_readonly("logits_indices", &BatchArrays::logits_indices)
      .def_property_readonly("num_tokens", [](const BatchArrays& b) { return b.shape.num_tokens; })
      .def_property_readonly("num_seqs", [](const BatchArrays& b) { return b.shape.num_seqs; })
      .def_property_readonly("max_query_len",
                             [](const BatchArrays& b) { return b.shape.max_query_len; })
      .def_property_readonly("max_seq_len", [](const BatchArrays& b) { return b.shape.max_seq_len; });

  m.attr("NO_TOKEN") = kNoToken;
  m.def("handoff_walk", &handoff_walk_numpy, py::arg("argmax"), py::arg("top1"), py::arg("drafts"),
        py::arg("pos_start"), py::arg("mode"), py::arg("run"), py::arg("gamma"), py::arg("resume_on_agreement"),
        py::arg("word_start"),
        "The greedy walk of NUDGING.md section 5 (pairing/handoff_torch.py's rules) on host arrays -> "
        "(num_accepted [R] int32, emit_token [R] int64, new_mode [R] int32, new_run [R] int32, source [P] int8).");
  m.def("advance_computed", &advance_computed, py::arg("seqs"), py::arg("nums"),
        "seqs[i].set_num_computed(num_computed + nums[i]) for all i -> [(i, error)] of those that raised.");
  m.def("append_placeholders", &append_placeholders, py::arg("seqs"), py::arg("counts"), py::arg("placeholder"),
        "seqs[i].append_provisional([placeholder] * counts[i]) for all i -> [(i, error)].");
  m.def("settle_round", &settle_round, py::arg("seqs"), py::arg("values"), py::arg("counts"), py::arg("accepted"),
        py::arg("emit"),
        "After the walk: drafts' values over their placeholders, rejected ones cut, emit[i] (-1: none) appended, "
        "the newest token left pending -> [(i, error)].");

  m.def("best_round_plan",
        [](std::vector<double> rate, std::vector<uint8_t> nudging, std::vector<int64_t> cap, std::vector<int64_t> fixed,
           std::vector<int64_t> pending, double overhead, std::array<double, 4> uniform, std::array<double, 4> mixed,
           bool padded, double margin) {
          PlanInputs in{std::move(rate), std::move(nudging), std::move(cap), std::move(fixed), std::move(pending),
                        overhead, {uniform[0], uniform[1], uniform[2], uniform[3]},
                        {mixed[0], mixed[1], mixed[2], mixed[3]}, padded, margin};
          PlanResult r = best_round_plan(in);
          return py::make_tuple(r.ks, r.tokens, r.rate, r.floor, r.floor_tokens, r.floor_rate);
        },
        py::arg("rate"), py::arg("nudging"), py::arg("cap"), py::arg("fixed"), py::arg("pending"), py::arg("overhead"),
        py::arg("uniform"), py::arg("mixed"), py::arg("padded"), py::arg("margin"),
        "The draft plan's best candidate (engine/draft_policy.py) -> (ks, tokens, rate, floor, floor tokens, "
        "floor rate). fixed: -1 where the plan decides; costs: (verify s/pass, verify s/token, draft s/pass, "
        "draft s/token) of a uniform and of a mixed verify pass.");
  m.def("robust_pass_fit",
        [](const std::vector<std::array<double, 3>>& obs, double ridge, double trim_scale, double trim_floor,
           int trim_rounds, size_t min_obs) {
          std::vector<Observation> o;
          o.reserve(obs.size());
          for (const auto& x : obs) o.push_back({x[0], x[1], x[2]});
          return robust_pass_fit(o, FitSettings{ridge, trim_scale, trim_floor, trim_rounds, min_obs});
        },
        py::arg("obs"), py::arg("ridge"), py::arg("trim_scale"), py::arg("trim_floor"), py::arg("trim_rounds"),
        py::arg("min_obs"),
        "obs: [(seconds, passes, tokens)] -> (seconds per pass, per token) of the draft plan's robust cost fit "
        "(engine/draft_policy.py PassCost).");
  m.def("expected_tokens", &expected_tokens, py::arg("k"), py::arg("accept_rate"));
  m.def("build_batch", &build_batch, py::arg("seqs"), py::arg("num_new"), py::arg("block_size"),
        "Flat batch of seqs[i].tokens[num_computed : num_computed + num_new[i]].");
}
