// The draft plan's cost fits (engine/draft_policy.py PassCost): seconds ~= per_pass * passes +
// per_token * tokens, robust to passes that waited for a core. The Python it replaced is the
// reference in tests/test_draft_policy.py.
#pragma once

#include <cstddef>
#include <utility>
#include <vector>

namespace nudge {

struct FitSettings {
  double ridge;        // ties a per-token slope the data cannot tell apart to zero
  double trim_scale;   // residuals beyond this many median absolute residuals are outliers
  double trim_floor;   // ... and beyond this share of the median time
  int trim_rounds;     // trim, refit, trim again
  size_t min_obs;      // fewer kept observations than this: keep the previous line
};

struct Observation {
  double seconds, passes, tokens;
};

// (per_pass, per_token), both >= 0: least squares (weights default 1) with the ridge.
std::pair<double, double> least_squares(const std::vector<Observation>& obs, const std::vector<double>* weights,
                                        double ridge);

// A first line through each pass size's median time (weighted by its count, never above a larger
// size's), then least squares on the observations near it, trim_rounds times.
std::pair<double, double> robust_pass_fit(const std::vector<Observation>& obs, const FitSettings& settings);

}  // namespace nudge
