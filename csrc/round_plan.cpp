#include "round_plan.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

namespace nudge {

namespace {

constexpr double kMaxRate = 1 - 1e-6;   // a = 1 would make every draft free
constexpr double kMinSeconds = 1e-12;
constexpr double kTie = 1e-9;           // a candidate must beat the best so far by more than rounding

double tokens_of(const PlanInputs& in, size_t i, int64_t k) {
  return in.nudging[i] ? expected_tokens(std::max<int64_t>(k - 1, 0), in.rate[i]) : expected_tokens(k, in.rate[i]);
}

// DraftPolicy._rate for draft counts ks with expected tokens `tokens`.
double rate_of(const PlanInputs& in, const std::vector<int64_t>& ks, double tokens) {
  int64_t passes = 0, low = ks.empty() ? 0 : ks[0], sum = 0, drafted = 0;
  for (size_t i = 0; i < ks.size(); ++i) {
    passes = std::max(passes, ks[i]);
    low = std::min(low, ks[i]);
    sum += ks[i];
    if (ks[i] > 0) drafted += in.pending[i] + ks[i] - 1;
  }
  const PassCosts& c = low == passes ? in.uniform : in.mixed;
  const int64_t n = static_cast<int64_t>(ks.size());
  const int64_t verify_tokens = in.padded ? n * (1 + passes) : n + sum;
  const double seconds = in.overhead + c.verify_pass + c.verify_token * static_cast<double>(verify_tokens) +
                         (passes ? c.draft_pass * static_cast<double>(passes) + c.draft_token * static_cast<double>(drafted)
                                 : 0.0);
  return tokens / std::max(seconds, kMinSeconds);
}

double tokens_sum(const PlanInputs& in, const std::vector<int64_t>& ks) {
  double total = 0;
  for (size_t i = 0; i < ks.size(); ++i) total += tokens_of(in, i, ks[i]);
  return total;
}

}  // namespace

double expected_tokens(int64_t k, double accept_rate) {
  const double a = std::min(std::max(accept_rate, 0.0), kMaxRate);
  return (1 - std::pow(a, static_cast<double>(k + 1))) / (1 - a);
}

PlanResult best_round_plan(const PlanInputs& in) {
  const size_t n = in.rate.size();
  if (in.nudging.size() != n || in.cap.size() != n || in.fixed.size() != n || in.pending.size() != n) {
    throw std::invalid_argument("best_round_plan: every per-request list must have " + std::to_string(n) + " entries");
  }
  PlanResult out;
  out.floor.resize(n);
  int64_t top = 0;
  for (size_t i = 0; i < n; ++i) {
    if (in.cap[i] < 0) {
      throw std::invalid_argument("best_round_plan: request " + std::to_string(i) + " has a negative cap");
    }
    out.floor[i] = in.fixed[i] >= 0 ? in.fixed[i] : (in.nudging[i] ? std::min<int64_t>(1, in.cap[i]) : 0);
    top = std::max(top, in.fixed[i] >= 0 ? out.floor[i] : in.cap[i]);
  }
  out.floor_tokens = tokens_sum(in, out.floor);
  out.floor_rate = rate_of(in, out.floor, out.floor_tokens);
  // Tokens forgone per extra draft token in the two passes, at the floor's rate.
  const double per_token = out.floor_rate * (in.mixed.verify_token + in.mixed.draft_token);

  // upto[i][b]: request i's best draft count <= b (>= its floor): its k-th draft pays while its
  // expected tokens exceed what its extra tokens cost (drafting at all also computes its pending
  // catch-up tokens; the passes themselves are paid once, by the plan).
  std::vector<std::vector<int64_t>> upto(n);
  for (size_t i = 0; i < n; ++i) {
    if (in.fixed[i] >= 0) continue;
    const int64_t f = out.floor[i];
    const double penalty = f == 0 ? per_token * static_cast<double>(in.pending[i] - 1) : 0.0;
    int64_t best_k = f;
    double best_gain = tokens_of(in, i, f) - per_token * static_cast<double>(f);
    upto[i].assign(static_cast<size_t>(in.cap[i] + 1), f);
    for (int64_t k = f + 1; k <= in.cap[i]; ++k) {
      const double gain = tokens_of(in, i, k) - per_token * static_cast<double>(k) - penalty;
      if (gain > best_gain) {
        best_k = k;
        best_gain = gain;
      }
      upto[i][static_cast<size_t>(k)] = best_k;
    }
  }

  out.ks = out.floor;
  out.tokens = out.floor_tokens;
  double best = out.floor_rate * (1 + in.margin);   // drafts that barely pay are a coin toss
  out.rate = out.floor_rate;
  std::vector<int64_t> ks(n);
  for (int64_t K = 1; K <= top; ++K) {
    for (const bool uniform : {false, true}) {
      for (size_t i = 0; i < n; ++i) {
        if (in.fixed[i] >= 0) {
          ks[i] = out.floor[i];
        } else {
          const int64_t bound = std::min(K, in.cap[i]);
          ks[i] = uniform ? bound : upto[i][static_cast<size_t>(bound)];
        }
      }
      const double tokens = tokens_sum(in, ks);
      const double rate = rate_of(in, ks, tokens);
      if (rate > best * (1 + kTie)) {
        best = rate;
        out.ks = ks;
        out.tokens = tokens;
        out.rate = rate;
      }
    }
  }
  return out;
}

}  // namespace nudge
