// The draft plan's search over a round's draft counts (engine/draft_policy.py DraftPolicy.plan_round):
// the cost model's best candidate, computed as the Python reference does, number for number.
#pragma once

#include <cstdint>
#include <vector>

namespace nudge {

// Seconds of one round: overhead + verify pass (per pass + per token) + draft passes (per pass + per
// token), with the verify costs of the round's shape (uniform: every request verifies as many tokens).
struct PassCosts {
  double verify_pass, verify_token, draft_pass, draft_token;
};

struct PlanInputs {
  std::vector<double> rate;       // per request: accept rate in BASE mode, nudge rate while nudging
  std::vector<uint8_t> nudging;   // per request: in NUDGE mode (needs >= 1 nudger pass)
  std::vector<int64_t> cap;       // most drafts this round
  std::vector<int64_t> fixed;     // a count decided outside the plan, or -1
  std::vector<int64_t> pending;   // nudger tokens its first pass computes
  double overhead = 0;
  PassCosts uniform{}, mixed{};
  bool padded = false;            // the backend pads a mixed verify pass to its longest query
  double margin = 0;              // drafts beyond the floor must promise this much more
};

struct PlanResult {
  std::vector<int64_t> ks;        // the best candidate (the floor when none beats it by the margin)
  double tokens = 0, rate = 0;    // its expected tokens and tokens per second
  std::vector<int64_t> floor;
  double floor_tokens = 0, floor_rate = 0;
};

// Expected tokens of k drafts each accepted with probability a: 1 + a + ... + a^k.
double expected_tokens(int64_t k, double accept_rate);

PlanResult best_round_plan(const PlanInputs& in);

}  // namespace nudge
