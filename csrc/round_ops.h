// One round's sequence updates for many requests in one call (pairing/token.py): what the engine
// used to do per request in Python between its passes and after the walk.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "sequence.h"

namespace nudge {

using SequenceList = std::vector<std::shared_ptr<Sequence>>;
// (index into the list, what went wrong) for each sequence whose update threw; the others went on.
using Failures = std::vector<std::pair<int64_t, std::string>>;

// seqs[i].set_num_computed(num_computed + nums[i]).
Failures advance_computed(const SequenceList& seqs, const std::vector<int64_t>& nums);

// seqs[i].append_provisional([placeholder] * counts[i]) (drafts whose values stay on the device).
Failures append_placeholders(const SequenceList& seqs, const std::vector<int64_t>& counts,
                             int64_t placeholder);

// After the walk, for each sequence i with counts[i] drafts at its end (placeholders until now):
// the drafts' values (values[sum(counts[:i]) : ...]) over the placeholders, the rejected ones cut
// (keep accepted[i] of them), emit[i] appended unless kNoToken (-1), and the newest token left
// pending (num_computed <= num_tokens - 1), the invariant between rounds.
Failures settle_round(const SequenceList& seqs, const std::vector<int64_t>& values,
                      const std::vector<int64_t>& counts, const std::vector<int64_t>& accepted,
                      const std::vector<int64_t>& emit);

}  // namespace nudge
