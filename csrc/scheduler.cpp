#include "scheduler.h"

#include <algorithm>
#include <stdexcept>
#include <string>

namespace nudge {

namespace {

std::string unknown_request(int64_t req_id) {
  return "unknown request id " + std::to_string(req_id);
}

}  // namespace

Scheduler::Scheduler(std::vector<std::shared_ptr<BlockPool>> pools, int64_t max_num_seqs,
                     int64_t max_num_batched_tokens)
    : pools_(std::move(pools)),
      max_num_seqs_(max_num_seqs),
      max_num_batched_tokens_(max_num_batched_tokens) {
  if (pools_.empty()) throw std::invalid_argument("Scheduler needs at least one BlockPool");
  for (const auto& pool : pools_) {
    if (!pool) throw std::invalid_argument("Scheduler: pools must not contain None");
  }
  if (max_num_seqs <= 0) {
    throw std::invalid_argument("max_num_seqs must be >= 1, got " + std::to_string(max_num_seqs));
  }
  if (max_num_batched_tokens <= 0) {
    throw std::invalid_argument("max_num_batched_tokens must be >= 1, got " +
                                std::to_string(max_num_batched_tokens));
  }
  pool_owner_.resize(pools_.size());
  for (size_t m = 0; m < pools_.size(); ++m) {
    size_t owner = m;
    for (size_t k = 0; k < m; ++k) {
      if (pools_[k] == pools_[m]) {
        // The cache keys blocks by tokens alone: the K/V of two models must never meet there.
        if (pools_[m]->prefix_caching()) {
          throw std::invalid_argument("Scheduler: a pool with prefix caching must serve one model only");
        }
        owner = k;
        break;
      }
    }
    pool_owner_[m] = owner;
  }
  blocks_wanted_.resize(pools_.size());
  cache_tried_.resize(pools_.size());
}

Scheduler::Request& Scheduler::find(int64_t req_id) {
  auto it = requests_.find(req_id);
  if (it == requests_.end()) throw std::invalid_argument(unknown_request(req_id));
  return it->second;
}

const Scheduler::Request& Scheduler::find(int64_t req_id) const {
  auto it = requests_.find(req_id);
  if (it == requests_.end()) throw std::invalid_argument(unknown_request(req_id));
  return it->second;
}

const std::vector<std::shared_ptr<Sequence>>& Scheduler::seqs(int64_t req_id) const {
  return find(req_id).seqs;
}

template <typename Error>
void Scheduler::check_fits_pools(int64_t req_id, const Sequence* const* seqs,
                                 const int64_t* lookahead) const {
  std::fill(blocks_wanted_.begin(), blocks_wanted_.end(), 0);
  for (size_t m = 0; m < pools_.size(); ++m) {
    blocks_wanted_[pool_owner_[m]] +=
        blocks_for_slots(seqs[m]->num_tokens() + lookahead[m], pools_[m]->block_size());
  }
  for (size_t m = 0; m < pools_.size(); ++m) {
    if (blocks_wanted_[m] > pools_[m]->num_blocks()) {
      throw Error("request " + std::to_string(req_id) + " needs " + std::to_string(blocks_wanted_[m]) + " blocks of pool " +
                  std::to_string(m) + " but the pool has only " +
                  std::to_string(pools_[m]->num_blocks()) +
                  " in total; cap the sequence length below the pool size");
    }
  }
}

void Scheduler::add_request(int64_t req_id, std::vector<std::shared_ptr<Sequence>> seqs) {
  if (requests_.count(req_id)) {
    throw std::invalid_argument("request id " + std::to_string(req_id) + " already exists");
  }
  if (seqs.size() != pools_.size()) {
    throw std::invalid_argument("add_request: expected one Sequence per pool (" +
                                std::to_string(pools_.size()) + "), got " +
                                std::to_string(seqs.size()));
  }
  std::vector<const Sequence*> raw(seqs.size());
  bool any_pending = false;
  for (size_t m = 0; m < seqs.size(); ++m) {
    const Sequence* seq = seqs[m].get();
    if (!seq) throw std::invalid_argument("add_request: sequences must not be None");
    if (seq->pool() != pools_[m]) {
      throw std::invalid_argument("add_request: sequence " + std::to_string(m) +
                                  " does not use pool " + std::to_string(m) +
                                  " of this scheduler");
    }
    // Two owners of one Sequence would each release its blocks and schedule its tokens.
    if (seqs_in_use_.count(seq) || std::find(raw.begin(), raw.begin() + m, seq) != raw.begin() + m) {
      throw std::invalid_argument("add_request: a Sequence can belong to only one request");
    }
    raw[m] = seq;
    any_pending = any_pending || seq->num_pending() > 0;
  }
  if (!any_pending) {
    throw std::invalid_argument("add_request: request " + std::to_string(req_id) +
                                " has no pending tokens (append its prompt first)");
  }
  const std::vector<int64_t> no_lookahead(pools_.size(), 0);
  check_fits_pools<std::invalid_argument>(req_id, raw.data(), no_lookahead.data());

  Request& req = requests_[req_id];
  req.id = req_id;
  req.seqs = std::move(seqs);
  req.lookahead = no_lookahead;
  for (const Sequence* seq : raw) seqs_in_use_.insert(seq);
  waiting_.push_back(&req);
}

void Scheduler::set_lookahead(int64_t req_id, const std::vector<int64_t>& lookahead) {
  Request& req = find(req_id);
  if (lookahead.size() != pools_.size()) {
    throw std::invalid_argument("set_lookahead: expected one value per pool (" +
                                std::to_string(pools_.size()) + "), got " +
                                std::to_string(lookahead.size()));
  }
  for (int64_t extra : lookahead) {
    if (extra < 0) {
      throw std::invalid_argument("set_lookahead: values must be >= 0, got " + std::to_string(extra));
    }
    // A final step costs at least 1 + lookahead tokens; more than the budget would never run.
    if (extra >= max_num_batched_tokens_) {
      throw std::invalid_argument("set_lookahead: " + std::to_string(extra) +
                                  " extra slots leave no room in max_num_batched_tokens = " +
                                  std::to_string(max_num_batched_tokens_));
    }
  }
  std::vector<const Sequence*> raw;
  for (const auto& seq : req.seqs) raw.push_back(seq.get());
  check_fits_pools<std::invalid_argument>(req_id, raw.data(), lookahead.data());
  req.lookahead = lookahead;
}

void Scheduler::remove(int64_t req_id) {
  Request& req = find(req_id);
  for (const auto& seq : req.seqs) {
    seq->release();
    seqs_in_use_.erase(seq.get());
  }
  auto run_it = std::find(running_.begin(), running_.end(), &req);
  if (run_it != running_.end()) running_.erase(run_it);
  auto wait_it = std::find(waiting_.begin(), waiting_.end(), &req);
  if (wait_it != waiting_.end()) waiting_.erase(wait_it);
  requests_.erase(req_id);
}

void Scheduler::finish(int64_t req_id) { remove(req_id); }
void Scheduler::abort(int64_t req_id) { remove(req_id); }

bool Scheduler::plan_step(const Request& req, int64_t budget, StepPlan* plan) const {
  const size_t num_models = pools_.size();
  plan->num_new.resize(num_models);
  plan->slots.resize(num_models);
  int64_t full_cost = 0;
  bool any_pending = false;
  for (size_t m = 0; m < num_models; ++m) {
    const int64_t pending = req.seqs[m]->num_pending();
    any_pending = any_pending || pending > 0;
    full_cost = std::max(full_cost, pending + req.lookahead[m]);
  }
  // Nothing to compute means no logits either: such a request waits for new tokens.
  if (!any_pending || budget <= 0) return false;

  if (full_cost <= budget) {
    for (size_t m = 0; m < num_models; ++m) {
      const Sequence& seq = *req.seqs[m];
      plan->num_new[m] = seq.num_pending();
      plan->slots[m] = seq.num_tokens() + req.lookahead[m];
    }
    plan->cost = full_cost;
    plan->is_final = true;
    return true;
  }
  // A chunk keeps at least one pending token in every model that has any, so the final step
  // still computes each model's last token and every model gets logits to emit from.
  int64_t cost = 0;
  for (size_t m = 0; m < num_models; ++m) {
    const Sequence& seq = *req.seqs[m];
    const int64_t chunk = std::min(std::max<int64_t>(seq.num_pending() - 1, 0), budget);
    plan->num_new[m] = chunk;
    plan->slots[m] = seq.num_computed() + chunk;
    cost = std::max(cost, chunk);
  }
  plan->cost = cost;
  plan->is_final = false;
  return cost > 0;
}

bool Scheduler::can_reserve(const Request& req, const StepPlan& plan) const {
  std::fill(blocks_wanted_.begin(), blocks_wanted_.end(), 0);
  for (size_t m = 0; m < pools_.size(); ++m) {
    blocks_wanted_[pool_owner_[m]] += req.seqs[m]->blocks_needed(plan.slots[m]);
  }
  for (size_t m = 0; m < pools_.size(); ++m) {
    if (blocks_wanted_[m] > pools_[m]->num_free()) return false;
  }
  return true;
}

void Scheduler::reserve(Request& req, const StepPlan& plan) {
  for (size_t m = 0; m < pools_.size(); ++m) {
    if (!req.seqs[m]->reserve(plan.slots[m])) {
      // can_reserve() said yes a moment ago and nothing ran in between.
      throw std::logic_error("Scheduler: reserve failed after can_reserve succeeded");
    }
  }
}

void Scheduler::record(const Request& req, const StepPlan& plan, ScheduledStep* step) const {
  step->req_ids.push_back(req.id);
  for (size_t m = 0; m < pools_.size(); ++m) step->num_new_tokens[m].push_back(plan.num_new[m]);
  step->is_final_chunk.push_back(plan.is_final);
}

void Scheduler::take_cached_prefixes(Request& req) {
  for (size_t m = 0; m < pools_.size(); ++m) {
    Sequence& seq = *req.seqs[m];
    const bool fresh = seq.block_table().empty() && seq.num_computed() == 0 && seq.num_tokens() > 0;
    cache_tried_[m] = -1;
    if (fresh && seq.pool()->prefix_caching() && seq.reuse_cached_prefix()) {
      cache_tried_[m] = seq.match_cached_prefix();
    }
  }
}

void Scheduler::count_cache_lookups(const Request& req) const {
  for (size_t m = 0; m < pools_.size(); ++m) {
    if (cache_tried_[m] >= 0) pools_[m]->record_lookup(req.seqs[m]->num_tokens(), cache_tried_[m]);
  }
}

void Scheduler::undo_cached_prefixes(Request& req) const {
  for (size_t m = 0; m < pools_.size(); ++m) {
    if (cache_tried_[m] > 0) req.seqs[m]->release();
  }
}

void Scheduler::preempt_newest(ScheduledStep* step) {
  Request* victim = running_.back();
  running_.pop_back();
  for (const auto& seq : victim->seqs) seq->release();
  waiting_.push_front(victim);
  step->preempted.push_back(victim->id);
}

ScheduledStep Scheduler::schedule() {
  // Fail before changing anything: a request that outgrew a pool (tokens appended past its
  // capacity) would otherwise preempt everyone and then wait forever.
  std::vector<const Sequence*> raw(pools_.size());
  for (const auto& [id, req] : requests_) {
    for (size_t m = 0; m < pools_.size(); ++m) raw[m] = req.seqs[m].get();
    check_fits_pools<std::runtime_error>(id, raw.data(), req.lookahead.data());
  }

  ScheduledStep step;
  step.num_new_tokens.resize(pools_.size());
  int64_t budget = max_num_batched_tokens_;
  StepPlan plan;  // reused: keeps its vectors' capacity across requests

  // Running requests first, oldest first. Preemption takes from the back, never from the
  // part of the queue that is already scheduled.
  for (size_t i = 0; i < running_.size(); ++i) {
    if (static_cast<int64_t>(step.req_ids.size()) >= max_num_seqs_ || budget <= 0) break;
    Request* req = running_[i];
    // A running request's sequence may have got its first tokens just now (the nudger reads
    // its prompt lazily); the lookup counts at once: the blocks stay with a running request.
    take_cached_prefixes(*req);
    count_cache_lookups(*req);
    if (!plan_step(*req, budget, &plan)) continue;
    bool preempted_self = false;
    while (!can_reserve(*req, plan)) {
      preempted_self = running_.back() == req;
      preempt_newest(&step);
      if (preempted_self) break;
    }
    if (preempted_self) break;  // it was the newest, so nothing after it is left
    reserve(*req, plan);
    record(*req, plan, &step);
    budget -= plan.cost;
  }

  // Admit waiting requests in FIFO order. Not in a step that had to preempt: the pools are
  // short, and re-admitting what was just released would only thrash.
  if (step.preempted.empty()) {
    while (!waiting_.empty() && budget > 0 &&
           static_cast<int64_t>(running_.size()) < max_num_seqs_ &&
           static_cast<int64_t>(step.req_ids.size()) < max_num_seqs_) {
      Request* req = waiting_.front();
      // Its cached prefix first: what is cached needs neither budget nor new blocks.
      take_cached_prefixes(*req);
      // Stop at the first that does not fit, so later requests never overtake it. A waiting
      // request holds no blocks, so it gives back what the lookup took.
      if (!plan_step(*req, budget, &plan) || !can_reserve(*req, plan)) {
        undo_cached_prefixes(*req);
        break;
      }
      count_cache_lookups(*req);
      reserve(*req, plan);
      waiting_.pop_front();
      running_.push_back(req);
      record(*req, plan, &step);
      budget -= plan.cost;
    }
  }
  return step;
}

std::vector<int64_t> Scheduler::running_ids() const {
  std::vector<int64_t> ids;
  ids.reserve(running_.size());
  for (const Request* req : running_) ids.push_back(req->id);
  return ids;
}

std::vector<int64_t> Scheduler::waiting_ids() const {
  std::vector<int64_t> ids;
  ids.reserve(waiting_.size());
  for (const Request* req : waiting_) ids.push_back(req->id);
  return ids;
}

}  // namespace nudge
