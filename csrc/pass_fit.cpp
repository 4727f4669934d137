#include "pass_fit.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <stdexcept>
#include <utility>

namespace nudge {

namespace {

// Python's statistics.median: the middle value, or the mean of the two middle ones.
double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

}  // namespace

std::pair<double, double> least_squares(const std::vector<Observation>& obs, const std::vector<double>* weights,
                                        double ridge) {
  double spp = 0, spt = 0, stt = 0, sy_p = 0, sy_t = 0;
  for (size_t i = 0; i < obs.size(); ++i) {
    const double w = weights ? (*weights)[i] : 1.0;
    const Observation& o = obs[i];
    spp += w * o.passes * o.passes;
    spt += w * o.passes * o.tokens;
    stt += w * o.tokens * o.tokens;
    sy_p += w * o.seconds * o.passes;
    sy_t += w * o.seconds * o.tokens;
  }
  stt = stt * (1 + ridge) + 1e-12;
  const double det = spp * stt - spt * spt;
  if (det <= 1e-12 * spp * stt) return {sy_p / std::max(spp, 1e-12), 0.0};  // collinear: all per pass
  const double per_pass = (stt * sy_p - spt * sy_t) / det;
  const double per_token = (spp * sy_t - spt * sy_p) / det;
  if (per_token < 0) return {sy_p / spp, 0.0};
  if (per_pass < 0) return {0.0, sy_t / stt};
  return {per_pass, per_token};
}

std::pair<double, double> robust_pass_fit(const std::vector<Observation>& obs, const FitSettings& s) {
  if (obs.empty()) throw std::invalid_argument("robust_pass_fit: no observations");
  // Pass sizes in order of first appearance, with their times.
  std::map<std::pair<double, double>, size_t> index;
  std::vector<std::pair<double, double>> sizes;
  std::vector<std::vector<double>> times;
  for (const Observation& o : obs) {
    const auto key = std::make_pair(o.passes, o.tokens);
    auto it = index.find(key);
    if (it == index.end()) {
      it = index.emplace(key, sizes.size()).first;
      sizes.push_back(key);
      times.emplace_back();
    }
    times[it->second].push_back(o.seconds);
  }
  std::vector<double> medians(sizes.size());
  for (size_t g = 0; g < sizes.size(); ++g) medians[g] = median(times[g]);
  // A pass is never dearer than a larger one.
  std::vector<Observation> firsts;
  std::vector<double> weights;
  for (size_t g = 0; g < sizes.size(); ++g) {
    double envelope = medians[g];
    for (size_t h = 0; h < sizes.size(); ++h) {
      if (sizes[h].first >= sizes[g].first && sizes[h].second >= sizes[g].second) envelope = std::min(envelope, medians[h]);
    }
    firsts.push_back({envelope, sizes[g].first, sizes[g].second});
    weights.push_back(static_cast<double>(times[g].size()));
  }
  std::pair<double, double> line = least_squares(firsts, &weights, s.ridge);
  std::vector<double> all(obs.size());
  for (size_t i = 0; i < obs.size(); ++i) all[i] = obs[i].seconds;
  const double floor = s.trim_floor * median(all);
  std::vector<double> residuals(obs.size());
  std::vector<Observation> kept;
  for (int round = 0; round < s.trim_rounds; ++round) {
    for (size_t i = 0; i < obs.size(); ++i) {
      residuals[i] = std::fabs(obs[i].seconds - line.first * obs[i].passes - line.second * obs[i].tokens);
    }
    const double bound = s.trim_scale * std::max(median(residuals), floor);
    kept.clear();
    for (size_t i = 0; i < obs.size(); ++i) {
      if (residuals[i] <= bound) kept.push_back(obs[i]);
    }
    if (kept.size() < s.min_obs) break;
    line = least_squares(kept, nullptr, s.ridge);
  }
  return line;
}

}  // namespace nudge
