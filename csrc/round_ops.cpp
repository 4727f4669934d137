#include "round_ops.h"

#include <algorithm>
#include <exception>
#include <stdexcept>

namespace nudge {

namespace {

constexpr int64_t kNoEmit = -1;

void check_sizes(const char* what, size_t seqs, size_t values) {
  if (seqs != values) {
    throw std::invalid_argument(std::string(what) + ": " + std::to_string(seqs) + " sequences but " +
                                std::to_string(values) + " values");
  }
}

// Runs fn(i) for every i; a throw is recorded for i alone.
template <typename Fn>
Failures each(size_t n, Fn fn) {
  Failures failures;
  for (size_t i = 0; i < n; ++i) {
    try {
      fn(i);
    } catch (const std::exception& e) {
      failures.emplace_back(static_cast<int64_t>(i), e.what());
    }
  }
  return failures;
}

}  // namespace

Failures advance_computed(const SequenceList& seqs, const std::vector<int64_t>& nums) {
  check_sizes("advance_computed", seqs.size(), nums.size());
  return each(seqs.size(), [&](size_t i) {
    Sequence& seq = *seqs[i];
    seq.set_num_computed(seq.num_computed() + nums[i]);
  });
}

Failures append_placeholders(const SequenceList& seqs, const std::vector<int64_t>& counts,
                             int64_t placeholder) {
  check_sizes("append_placeholders", seqs.size(), counts.size());
  std::vector<int64_t> run;
  return each(seqs.size(), [&](size_t i) {
    if (counts[i] < 0) throw std::invalid_argument("append_placeholders: a count must be >= 0");
    run.assign(static_cast<size_t>(counts[i]), placeholder);
    seqs[i]->append_provisional(run);
  });
}

Failures settle_round(const SequenceList& seqs, const std::vector<int64_t>& values,
                      const std::vector<int64_t>& counts, const std::vector<int64_t>& accepted,
                      const std::vector<int64_t>& emit) {
  check_sizes("settle_round", seqs.size(), counts.size());
  check_sizes("settle_round", seqs.size(), accepted.size());
  check_sizes("settle_round", seqs.size(), emit.size());
  std::vector<size_t> offset(seqs.size() + 1, 0);
  for (size_t i = 0; i < seqs.size(); ++i) {
    if (counts[i] < 0 || accepted[i] < 0 || accepted[i] > counts[i]) {
      throw std::invalid_argument("settle_round: sequence " + std::to_string(i) + ": accepted " +
                                  std::to_string(accepted[i]) + " of " + std::to_string(counts[i]) + " drafts");
    }
    offset[i + 1] = offset[i] + static_cast<size_t>(counts[i]);
  }
  if (offset.back() != values.size()) {
    throw std::invalid_argument("settle_round: " + std::to_string(values.size()) + " draft values for " +
                                std::to_string(offset.back()) + " drafts");
  }
  std::vector<int64_t> drafts;
  return each(seqs.size(), [&](size_t i) {
    Sequence& seq = *seqs[i];
    const int64_t count = counts[i];
    if (count > 0) {
      drafts.assign(values.begin() + static_cast<std::ptrdiff_t>(offset[i]),
                    values.begin() + static_cast<std::ptrdiff_t>(offset[i + 1]));
      seq.overwrite(seq.num_tokens() - count, drafts);
      seq.truncate(seq.num_tokens() - (count - accepted[i]));
    }
    if (emit[i] != kNoEmit) seq.append(emit[i]);
    seq.set_num_computed(std::min(seq.num_computed(), seq.num_tokens() - 1));
  });
}

}  // namespace nudge
