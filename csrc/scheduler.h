// Continuous batching over several KV pools at once (one pool per model: base, nudger, ...).
#pragma once

#include <cstdint>
#include <deque>
#include <memory>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "block_pool.h"
#include "sequence.h"

namespace nudge {

// What one schedule() call decided. Index i of the per-request lists is req_ids[i].
struct ScheduledStep {
  std::vector<int64_t> req_ids;                     // running first (admission order), then admitted
  std::vector<std::vector<int64_t>> num_new_tokens;  // [model][i]: tokens to compute from num_computed
  std::vector<bool> is_final_chunk;                 // every model's pending tokens are scheduled
  std::vector<int64_t> preempted;                   // released and put back at the front of waiting
};

class Scheduler {
 public:
  Scheduler(std::vector<std::shared_ptr<BlockPool>> pools, int64_t max_num_seqs,
            int64_t max_num_batched_tokens);

  // Queues a request (FIFO). seqs[m] must use pools[m]. Throws std::invalid_argument for a
  // duplicate id, a sequence already in use, or a request that could never fit a pool.
  void add_request(int64_t req_id, std::vector<std::shared_ptr<Sequence>> seqs);
  // Per model: slots beyond num_tokens the request needs in its next final step (drafts).
  void set_lookahead(int64_t req_id, const std::vector<int64_t>& lookahead);
  // Both release every block of the request and forget it, from whichever queue it is in.
  void finish(int64_t req_id);
  void abort(int64_t req_id);

  ScheduledStep schedule();

  bool has_request(int64_t req_id) const { return requests_.count(req_id) != 0; }
  int64_t num_models() const { return static_cast<int64_t>(pools_.size()); }
  int64_t num_running() const { return static_cast<int64_t>(running_.size()); }
  int64_t num_waiting() const { return static_cast<int64_t>(waiting_.size()); }
  bool has_unfinished() const { return !requests_.empty(); }
  std::vector<int64_t> running_ids() const;
  std::vector<int64_t> waiting_ids() const;
  const std::vector<std::shared_ptr<Sequence>>& seqs(int64_t req_id) const;

 private:
  struct Request {
    int64_t id;
    std::vector<std::shared_ptr<Sequence>> seqs;  // [model]
    std::vector<int64_t> lookahead;               // [model]
  };
  // How much of one request a step computes, and the slots that needs.
  struct StepPlan {
    std::vector<int64_t> num_new;  // [model]
    std::vector<int64_t> slots;    // [model]: positions [0, slots) must have KV slots
    int64_t cost = 0;              // share of the token budget: max over models
    bool is_final = false;
  };

  Request& find(int64_t req_id);
  const Request& find(int64_t req_id) const;
  // False when the request can do nothing useful within `budget` tokens.
  bool plan_step(const Request& req, int64_t budget, StepPlan* plan) const;
  // Whether every pool can supply the blocks of the plan at once (a pool shared by several
  // models is asked for their sum), so reserve() never leaves a partial reservation behind.
  bool can_reserve(const Request& req, const StepPlan& plan) const;
  void reserve(Request& req, const StepPlan& plan);
  void record(const Request& req, const StepPlan& plan, ScheduledStep* step) const;
  // Prefix caching: each sequence of the request that holds no block yet takes the cached full
  // blocks of its tokens. cache_tried_[m] says which did (and, -1 = none, what they found).
  void take_cached_prefixes(Request& req);
  // Counts the lookups of take_cached_prefixes() in the pools (once the request really runs).
  void count_cache_lookups(const Request& req) const;
  // Gives back what take_cached_prefixes() took (the request was not admitted after all).
  void undo_cached_prefixes(Request& req) const;
  // Releases the most recently admitted running request and puts it first in line.
  void preempt_newest(ScheduledStep* step);
  // Throws `Error` when positions [0, num_tokens + lookahead) can never fit the pools.
  template <typename Error>
  void check_fits_pools(int64_t req_id, const Sequence* const* seqs,
                        const int64_t* lookahead) const;
  void remove(int64_t req_id);

  std::vector<std::shared_ptr<BlockPool>> pools_;  // [model]
  // [model]: the first model that uses the same pool, so models sharing a pool pool their needs.
  std::vector<size_t> pool_owner_;
  mutable std::vector<int64_t> blocks_wanted_;  // scratch of can_reserve(), indexed like pools_
  std::vector<int64_t> cache_tried_;            // scratch of take_cached_prefixes(), [model]
  int64_t max_num_seqs_;
  int64_t max_num_batched_tokens_;
  // Requests live here; the queues point into it (node-based map: pointers stay valid).
  std::unordered_map<int64_t, Request> requests_;
  std::vector<Request*> running_;  // admission order: the newest is at the back
  std::deque<Request*> waiting_;   // FIFO; preempted requests return to the front
  std::unordered_set<const Sequence*> seqs_in_use_;
};

}  // namespace nudge
